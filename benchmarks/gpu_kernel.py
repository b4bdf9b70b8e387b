"""The fused Triton loss against the blockwise torch loss and the bf16 matmul peak (a section of gpu.py).

    python benchmarks/gpu.py --only loss-kernel          # through gpu.py (B = 36864, 262144, 1048576)

loss_kernel(): the fused Triton sigmoid loss (sail.train.triton_sigmoid, impl="triton") against the blockwise
torch loss (impl="torch") on the same bf16 inputs, forward + backward, and against the bf16 matmul peak
measured in the same run (the best of a few large torch.mm shapes). Reported: seconds per forward +
backward, TFLOP/s counting the three matmuls (logits, G @ Y, G^T @ X: 6 B^2 D flops), share of the
measured peak (goal >= 70 %), peak memory; first triton and torch each against float64 at B = 4096.
Goal at B = 1,048,576: <= 10 s on an H100-class GPU. The first triton call autotunes the tile configs
(sail.train.triton_sigmoid.GPU_CONFIGS); the timed calls come after it. Needs CUDA.
"""

import json
import time

import torch
import torch.nn.functional as F


def _sync_time(fn, repeats):
    """Median wall seconds of fn() over repeats, synchronising the GPU (when there is one) around each call."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


# The one definition of "the bf16 peak" every GPU figure's share refers to (gpu.py's matmul section uses it too):
# the best median bf16 torch.mm throughput over these shapes, measured in the same run.
PEAK_SHAPES = ((8192, 8192, 8192), (16384, 16384, 1024), (16384, 1024, 16384), (4096, 16384, 16384))


def bf16_matmul_peak(repeats=10, shapes=PEAK_SHAPES, device="cuda"):
    """Best bf16 torch.mm throughput (TFLOP/s) over `shapes`: the 'peak' the loss is compared with."""
    best = {}
    for m, n, k in shapes:
        a = torch.randn(m, k, device=device, dtype=torch.bfloat16)
        b = torch.randn(k, n, device=device, dtype=torch.bfloat16)
        torch.mm(a, b)  # warm-up (cuBLAS heuristics, clocks)
        sec = _sync_time(lambda: torch.mm(a, b), repeats)
        best[f"{m}x{n}x{k}"] = 2 * m * n * k / sec / 1e12
        del a, b
    return max(best.values()), best


def kernel_breakdown(n, dim, repeats):
    """Where the fused loss's time goes at batch n (bf16): the tile kernel over all stripes writing G, the same
    without writing G (loss only), the "gemm" strategy's step 1 (cuBLAS fp32 S + the epilogue kernel) writing
    G, and the two cuBLAS GEMMs per stripe that turn G into gradients."""
    from sail.train import triton_sigmoid as ts

    x = F.normalize(torch.randn(n, dim, device="cuda"), dim=-1).to(torch.bfloat16)
    y = F.normalize(torch.randn(n, dim, device="cuda"), dim=-1).to(torch.bfloat16)
    t, b = torch.tensor([20.0], device="cuda"), torch.tensor([-10.0], device="cuda")
    rows = ts.STRIPE_ROWS
    g = x.new_empty((rows, n))
    stripes = [(r0, min(r0 + rows, n)) for r0 in range(0, n, rows)]

    def kernel(store, strategy="fused"):
        for r0, r1 in stripes:
            ts.stripe_sums(x[r0:r1], y, t, b, diag=r0, g=g[: r1 - r0] if store else None, strategy=strategy)

    def gemms():
        for r0, r1 in stripes:
            torch.mm(g[: r1 - r0], y)
            torch.mm(g[: r1 - r0].T, x[r0:r1])

    out = {"B": n}
    for name, fn, flops in (("kernel_with_G", lambda: kernel(True), 2), ("kernel_loss_only", lambda: kernel(False), 2),
                            ("gemm_strategy_with_G", lambda: kernel(True, "gemm"), 2), ("two_gemms", gemms, 4)):
        fn()  # warm-up (autotuning for this shape)
        sec = _sync_time(fn, repeats)
        out[f"{name}_s"] = sec
        out[f"{name}_tflops"] = flops * n * n * dim / sec / 1e12
        if name.startswith("kernel"):  # the tile config autotune chose for this shape
            out[f"{name}_config"] = str(getattr(ts._tuned_kernel, "best_config", None))
    print("breakdown at B={B}: kernel with G {kernel_with_G_s:.3f} s ({kernel_with_G_tflops:.0f} TFLOP/s), loss only "
          "{kernel_loss_only_s:.3f} s ({kernel_loss_only_tflops:.0f}), gemm strategy with G {gemm_strategy_with_G_s:.3f} s "
          "({gemm_strategy_with_G_tflops:.0f}), two GEMMs {two_gemms_s:.3f} s ({two_gemms_tflops:.0f})".format(**out))
    del x, y, g
    torch.cuda.empty_cache()
    return out


def loss_kernel(sizes=(36864, 262144, 1048576), dim=1024, repeats=3, torch_max=262144, peak=None):
    """Section loss-kernel: fused Triton sigmoid loss vs blockwise torch loss vs bf16 matmul peak (measured here
    unless gpu.py's matmul section passes the run's own)."""
    from sail.train.losses import sigmoid_loss

    shapes = None
    if peak is None:
        peak, shapes = bf16_matmul_peak()
        print(f"bf16 matmul peak {peak:.0f} TFLOP/s ({', '.join(f'{k}: {v:.0f}' for k, v in shapes.items())})")
    torch.manual_seed(0)

    def inputs(n):
        x = F.normalize(torch.randn(n, dim, device="cuda"), dim=-1).to(torch.bfloat16).requires_grad_()
        y = F.normalize(torch.randn(n, dim, device="cuda"), dim=-1).to(torch.bfloat16).requires_grad_()
        log_t = torch.tensor(2.996, device="cuda", requires_grad=True)  # ln 20, SAIL's init
        b = torch.tensor(-10.0, device="cuda", requires_grad=True)
        return x, y, log_t, b

    def step(impl, x, y, log_t, b, block_size):
        for v in (x, y, log_t, b):
            v.grad = None
        loss = sigmoid_loss(x, y, log_t.exp(), b, impl=impl, block_size=block_size)
        loss.backward()
        return loss

    # correctness first: triton and torch on the same bf16 inputs, each against float64 on those inputs
    # (the gradient of log t is a sum with much cancellation: compare each impl's error, not the two)
    x, y, log_t, b = inputs(4096)
    res = {}
    for impl in ("triton", "torch", "float64"):
        args = [v.detach().double().requires_grad_() for v in (x, y, log_t, b)] if impl == "float64" else (x, y, log_t, b)
        value = step("torch" if impl == "float64" else impl, *args, None).item()
        res[impl] = [value, args[0].grad.double(), args[1].grad.double(), args[2].grad.item()]
    ref = res["float64"]
    check = {}
    for impl in ("triton", "torch"):
        got = res[impl]
        check[f"{impl}_loss_rel"] = abs(got[0] - ref[0]) / abs(ref[0])
        check[f"{impl}_dx_rel"] = ((got[1] - ref[1]).norm() / ref[1].norm()).item()
        check[f"{impl}_dy_rel"] = ((got[2] - ref[2]).norm() / ref[2].norm()).item()
        check[f"{impl}_dlogt_rel"] = abs(got[3] - ref[3]) / max(abs(ref[3]), 1e-30)
    # triton may be no worse than twice torch's error on each quantity (or below a floor of 1e-5 / 1e-3)
    ok = all(check[f"triton_{q}"] <= max(2 * check[f"torch_{q}"], 1e-5 if q == "loss_rel" else 1e-3)
             for q in ("loss_rel", "dx_rel", "dy_rel", "dlogt_rel"))
    print("check at B=4096 against float64: " + ", ".join(f"{k} {v:.2e}" for k, v in check.items())
          + ("  OK" if ok else "  MISMATCH"))
    del x, y, res

    rows = []
    for n in sizes:
        flops = 6 * n * n * dim
        for impl in ("triton", "torch"):
            if impl == "torch" and n > torch_max:
                continue
            x, y, log_t, b = inputs(n)
            # torch: blocks of ~2 GiB of fp32 logits (its 32 MiB default means 8-row blocks at B = 1M)
            block = None if impl == "triton" else max(1, min(n, 2**31 // (4 * n)))
            torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            step(impl, x, y, log_t, b, block)  # warm-up; for triton this includes autotuning
            torch.cuda.synchronize()
            first = time.perf_counter() - t0
            sec = _sync_time(lambda: step(impl, x, y, log_t, b, block), repeats if n < 10**6 else 1)  # 1M: ~15 s a call
            tflops = flops / sec / 1e12
            rows.append({"B": n, "D": dim, "impl": impl, "seconds": sec, "first_call_s": first, "tflops": tflops,
                         "share_of_peak": tflops / peak,
                         "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30})
            r = rows[-1]
            print(f"B={n:>8} {impl:>6}: {sec:8.3f} s  {tflops:6.0f} TFLOP/s  {100 * r['share_of_peak']:5.1f} % of peak"
                  f"  peak mem {r['peak_mem_gib']:.1f} GiB  (first call {first:.1f} s)")
            del x, y, log_t, b
            torch.cuda.empty_cache()
    breakdown = kernel_breakdown(max(n for n in sizes if n <= 262144), dim, repeats) if sizes else {}
    result = {"section": "loss-kernel", "device": torch.cuda.get_device_name(), "peak_tflops": peak,
              "peak_shapes": shapes, "check": check, "check_ok": ok, "runs": rows,
              "breakdown": breakdown}
    print(json.dumps(result))
    return result
