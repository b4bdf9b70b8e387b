"""sail's sigmoid loss against the public peers: one process, the same inputs, the same GPU (a section of gpu.py).

    make peers                                        # fetch the peers' wheels into benchmarks/peers/
    python benchmarks/gpu.py --only matmul,peers      # through gpu.py (the bf16 peak comes from its matmul section)
    python benchmarks/gpu.py --smoke --only peers     # tiny sizes on CPU: checks the wiring, times nothing of note

The peers (both pure Python; their wheels travel with the working tree to a GPU machine and install there with
`pip install --no-deps benchmarks/peers/*.whl`, see `make peers`):
- siglip-kernel 0.1.2 (`siglip_kernel.fused_siglip_loss`): its default router (`auto`: bf16 inputs go to its
  chunked cuBLAS + fused BCE path) and its best backend, chosen by timing the candidates at the first size;
  SigLIP+ (`fused_siglip_plus_loss`) for the multi-positive rows.
- open_clip 3.3.0 (`open_clip.loss.SigLipLoss`): what most users run; it builds the B x B logits. Only its
  `loss.py` is loaded (the package's `__init__` imports torchvision, which the loss does not need).

Each implementation runs forward + backward on the same bf16 L2-normalised embeddings (B rows, D columns;
t = 20, b = -10 as SAIL initialises them), median of a few timed calls after a warm-up (which includes autotuning);
peak CUDA memory during those calls (inputs included: they are the same for every row); the share of the bf16
peak measured in the same run counts the three matmuls of a fused loss (6 B^2 D flops; 6 B (K B) D with K
captions). A size that does not fit is a row with `"oom": true`. sail's Triton loss also runs with each way of
computing the similarities forced ("sail-triton-fused", "sail-triton-gemm"; sail.train.triton_sigmoid's
STRATEGIES) up to B = 262144, so the record shows what auto chose ("sail-triton") against both.

The objectives differ by a constant: sail averages over all B^2 pairs (SAIL's choice), the peers divide the sum
by B. Accuracy is therefore checked per implementation against float64 of its own convention on the same inputs
(B = 2048 on a GPU): relative error of the loss and of the embeddings' gradients. The multi-positive rows are
not the same objective either: sail's averages the pairwise term over both captions (SAIL eq. 2), SigLIP+
weights positives per anchor; both do the same work (B x 2B logits), which is what the timing compares.
"""

from __future__ import annotations

import importlib.util
import math
import os
import time
from unittest import mock

import torch
import torch.nn.functional as F

SIZES = (36864, 65536, 262144, 1048576)
DIMS = (1024, 768)
SIGLIP_BACKENDS = ("chunked_bf16", "chunked_bf16_pipelined", "chunked_epilogue", "hopper")


def _module_file(package: str, filename: str):
    """One file of an installed package, loaded alone (its package __init__ is not run), or None."""
    spec = importlib.util.find_spec(package)  # finds a top-level package without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    path = f"{list(spec.submodule_search_locations)[0]}/{filename}"
    file_spec = importlib.util.spec_from_file_location(f"_peer_{package}_{filename[:-3]}", path)
    module = importlib.util.module_from_spec(file_spec)
    file_spec.loader.exec_module(module)
    return module


def _open_clip_loss():
    """open_clip's SigLipLoss class, from its loss.py alone (the package imports torchvision), or a reason string."""
    module = _module_file("open_clip", "loss.py")
    if module is None:
        return "open_clip is not installed (make peers; pip install --no-deps benchmarks/peers/open_clip*.whl)"
    return module.SigLipLoss


def implementations(device: torch.device) -> tuple[dict, dict]:
    """(name -> loss(x, y, log_t, b), name -> why it is missing). Every loss takes log t, as the peers do."""
    from sail.train.losses import sigmoid_loss

    impls, missing = {}, {}
    if device.type == "cuda":
        impls["sail-triton"] = lambda x, y, log_t, b: sigmoid_loss(x, y, log_t.exp(), b, impl="triton")
    else:
        missing["sail-triton"] = "needs CUDA (its CPU tests run it through TRITON_INTERPRET=1)"
    # torch: blocks of ~2 GiB of fp32 logits (its 32 MiB default means 8-row blocks at B = 1M)
    impls["sail-torch"] = lambda x, y, log_t, b: sigmoid_loss(
        x, y, log_t.exp(), b, impl="torch", block_size=max(1, min(x.shape[0], 2**31 // (4 * x.shape[0]))))
    if importlib.util.find_spec("siglip_kernel") is None:
        missing["siglip-kernel"] = "not installed (make peers; pip install --no-deps benchmarks/peers/siglip_kernel*.whl)"
    elif device.type == "cuda":
        import siglip_kernel

        impls["siglip-kernel"] = lambda x, y, log_t, b: siglip_kernel.fused_siglip_loss(x, y, log_t, b)
        for name in SIGLIP_BACKENDS:
            impls[f"siglip-kernel:{name}"] = (
                lambda x, y, log_t, b, name=name: siglip_kernel.fused_siglip_loss(x, y, log_t, b, backend=name))
    else:  # the package asks CUDA for the GPU's architecture on import; its reference formula checks the wiring
        reference = _module_file("siglip_kernel", "reference.py").siglip_loss_reference
        impls["siglip-kernel:reference"] = lambda x, y, log_t, b: reference(x, y, log_t.exp(), b)
    loss_cls = _open_clip_loss()
    if isinstance(loss_cls, str):
        missing["open_clip"] = loss_cls
    else:
        module = loss_cls()
        impls["open_clip"] = lambda x, y, log_t, b: module(x, y, log_t.exp(), b)
    return impls, missing


def strategy_implementations(device: torch.device) -> dict:
    """sail's Triton loss with each way of computing the similarities forced (SAIL_SIGMOID_STRATEGY), next to
    "sail-triton", which is what auto chose: "sail-triton-fused" (the tile kernel) and "sail-triton-gemm"
    (cuBLAS fp32-output GEMM + the epilogue kernel). CUDA only."""
    from sail.train.losses import sigmoid_loss
    from sail.train.triton_sigmoid import STRATEGIES

    def forced(strategy):
        def loss(x, y, log_t, b):
            # read per stripe, in the forward (which computes the gradients too)
            with mock.patch.dict(os.environ, {"SAIL_SIGMOID_STRATEGY": strategy}):
                return sigmoid_loss(x, y, log_t.exp(), b, impl="triton")
        return loss

    return {f"sail-triton-{name}": forced(name) for name in STRATEGIES} if device.type == "cuda" else {}


def multi_positive_implementations(device: torch.device) -> tuple[dict, dict]:
    """K = 2 captions per image: name -> loss(x, [y1, y2], log_t, b)."""
    from sail.train.losses import multi_positive_loss

    impls, missing = {}, {}
    impls["sail"] = lambda x, ys, log_t, b: multi_positive_loss(x, ys, log_t.exp(), b)
    if device.type != "cuda" or importlib.util.find_spec("siglip_kernel") is None:
        missing["siglip-kernel-plus"] = "needs siglip-kernel (make peers) and CUDA"
    else:
        from siglip_kernel import fused_siglip_plus_loss

        def plus(x, ys, log_t, b):
            n = x.shape[0]
            ids = torch.arange(n, device=x.device)
            return fused_siglip_plus_loss(x, torch.cat(ys), log_t, b, img_gid=ids, txt_gid=ids.repeat(len(ys)),
                                          num_groups=n)

        impls["siglip-kernel-plus"] = plus
    return impls, missing


def _inputs(n, dim, device, captions=1, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    x = F.normalize(torch.randn(n, dim, device=device, generator=g), dim=-1)
    ys = [F.normalize(0.6 * x + 0.8 * F.normalize(torch.randn(n, dim, device=device, generator=g), dim=-1), dim=-1)
          for _ in range(captions)]
    dtype = torch.bfloat16
    x = x.to(dtype).requires_grad_()
    ys = [y.to(dtype).requires_grad_() for y in ys]
    log_t = torch.tensor(math.log(20.0), device=device, requires_grad=True)
    b = torch.tensor(-10.0, device=device, requires_grad=True)
    return x, ys, log_t, b


def _run(fn, x, ys, log_t, b, multi):
    for v in (x, *ys, log_t, b):
        v.grad = None
    loss = fn(x, ys, log_t, b) if multi else fn(x, ys[0], log_t, b)
    loss.backward()
    return loss


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_seconds(fn, device, repeats):
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def reference_sum(x, ys, log_t, b):
    """float64 sum over every (image, caption) pair of -log sigmoid(z (t x.y + b)), z = +1 on its own caption."""
    x = x.detach().double().requires_grad_()
    ys = [y.detach().double().requires_grad_() for y in ys]
    t, bias = log_t.detach().double().exp(), b.detach().double()
    total = 0.0
    for y in ys:
        logits = t * x @ y.T + bias
        z = 2 * torch.eye(x.shape[0], dtype=torch.float64, device=x.device) - 1
        total = total + (-F.logsigmoid(z * logits)).sum()
    total.backward()
    return total.item(), x.grad, [y.grad for y in ys]


def _accuracy(impls, device, n, dim):
    """Each implementation on the same bf16 inputs against float64 of its own normalisation."""
    x, ys, log_t, b = _inputs(n, dim, device)
    total, gx, gys = reference_sum(x, ys, log_t, b)
    out = {}
    for name, fn in impls.items():
        value = _run(fn, x, ys, log_t, b, multi=False).item()
        norm = n * n if name.startswith("sail") else n  # SAIL averages over pairs; the peers divide by B
        out[name] = {"loss_rel": abs(value - total / norm) / abs(total / norm),
                     "dx_rel": ((x.grad.double() - gx / norm).norm() / (gx / norm).norm()).item(),
                     "dy_rel": ((ys[0].grad.double() - gys[0] / norm).norm() / (gys[0] / norm).norm()).item()}
    return out


def _time_one(fn, n, dim, device, repeats, captions=1):
    """One measurement row (without impl/batch/dim): seconds, peak memory, or oom."""
    try:
        x, ys, log_t, b = _inputs(n, dim, device, captions)
        multi = captions > 1
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        _run(fn, x, ys, log_t, b, multi)  # warm-up (autotuning, cuBLAS heuristics)
        _sync(device)
        first = time.perf_counter() - t0
        sec = _median_seconds(lambda: _run(fn, x, ys, log_t, b, multi), device, repeats)
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
        return {"seconds": sec, "first_call_s": first, "peak_gib": peak}
    except torch.OutOfMemoryError:
        return {"oom": True}
    finally:
        x = ys = None
        if device.type == "cuda":
            torch.cuda.empty_cache()


def peers(device: torch.device, bf16_peak_tflops: float, sizes=SIZES, dims=DIMS, repeats=3, check_n=2048,
          deadline: float = float("inf")) -> dict:
    """The peers section: accuracy rows, then a row per (impl, batch) at D = dims[0], each sail strategy forced,
    multi-positive K = 2, and the rows at the other dims, in that order; past `deadline` (time.perf_counter())
    the remaining rows are recorded as skipped instead of measured."""
    impls, missing = implementations(device)
    accuracy = _accuracy(impls, device, check_n, dims[0])
    # the best siglip-kernel backend, timed once at the first size and D = dims[0]; the others are dropped
    candidates = {k: v for k, v in impls.items() if k.startswith("siglip-kernel:")}
    best = None
    if len(candidates) > 1:
        timed = {k: _time_one(v, sizes[0], dims[0], device, repeats) for k, v in candidates.items()}
        ok = {k: r["seconds"] for k, r in timed.items() if "seconds" in r}
        best = min(ok, key=ok.get) if ok else None
        for k in candidates:
            if k != best:
                impls.pop(k)
    strategies = strategy_implementations(device)  # each sail strategy forced, up to B = 262144
    accuracy.update(_accuracy(strategies, device, check_n, dims[0]) if strategies else {})
    multi, multi_missing = multi_positive_implementations(device)
    plan = [(name, fn, n, dims[0], 1) for n in sizes for name, fn in impls.items()]
    plan += [(name, fn, n, dims[0], 1) for n in sizes if n <= 262144 for name, fn in strategies.items()]
    plan += [(name, fn, n, dims[0], 2) for n in sizes[:2] for name, fn in multi.items()]
    plan += [(name, fn, n, dim, 1) for dim in dims[1:] for n in sizes for name, fn in impls.items()]
    rows = []
    for name, fn, n, dim, captions in plan:
        row = {"impl": name, "batch": n, "dim": dim, "dtype": "bf16", "captions": captions}
        if time.perf_counter() > deadline:
            row["skipped"] = "time budget (benchmarks/gpu.py --budget)"
        else:
            row.update(_time_one(fn, n, dim, device, repeats if n < 10**6 or captions > 1 else 1, captions=captions))
        rows.append(_with_share(row, bf16_peak_tflops))
        _print_row(row)
    return {"rows": rows, "accuracy": accuracy, "siglip_kernel_best_backend": best,
            "missing": {**missing, **multi_missing}}


def _with_share(row, peak):
    if "seconds" in row:
        flops = 6 * row["batch"] * (row["captions"] * row["batch"]) * row["dim"]
        row["tflops"] = flops / row["seconds"] / 1e12
        row["share_of_peak"] = row["tflops"] / peak if peak and math.isfinite(peak) else None
    return row


def _print_row(r):
    head = f"  {r['impl']:<28} B={r['batch']:>8} D={r['dim']:>5} K={r['captions']}"
    if r.get("oom"):
        print(f"{head}  does not fit")
    elif "seconds" not in r:
        print(f"{head}  {r.get('skipped') or r.get('error') or 'not measured'}")
    else:
        share = f"{100 * r['share_of_peak']:5.1f} % of peak" if r.get("share_of_peak") else ""
        print(f"{head}  {r['seconds']:8.4f} s  {r['tflops']:7.1f} TFLOP/s  {share}  {r['peak_gib']:.2f} GiB")
