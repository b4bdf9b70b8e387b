"""Benchmark: one full `sail align` training step (sail.train.step.train_step, chunked heads) at large batch.

    python benchmarks/align_step.py                        # B = 36864 and 131072, glu 2048/1024 -> 1024, width 4
    python benchmarks/align_step.py --batch 36864 --precision bf16
    python benchmarks/align_step.py --quick                # B = 4096
    python benchmarks/align_step.py --model-only           # just the memory model (B = 1,048,576, 80 GB GPU)

One step is what the trainer does per batch: heads forward in chunks without autograd, the blockwise
sigmoid loss on the whole batch (it computes the embeddings' gradients), each chunk forward again and
backward with its rows of those gradients, Lion step, clamp of log t. Inputs are float16 features as the
stores hold them. Each batch size runs in a FRESH subprocess so its peak RSS (ru_maxrss) is its own; a
warm-up step at B = 512 creates the optimizer state first. Reported per batch: seconds per step, pairs/s,
achieved GFLOP/s counting
    heads: 4 x 2 x B x (weights of the Linear layers)   (forward twice, two backward matmuls)
    loss:  3 x 2 x B^2 x D                              (logits, G @ Y, G^T @ X)
against a plain (4096, 4096) @ (4096, 4096) matmul in the step's dtype timed in the same process, the
chunk size, the peak RSS, and the median |gradient| of the heads' weights (what sail.train.optim's eps must be
far below). Then the memory model (sail.train.step.memory_model) for B = 1,048,576 on an 80 GB GPU.
Target: <= 3 GiB peak at B = 36864 on CPU (the unchunked step took 10.8 GB). Prints a table, then one
JSON line. Heavy: run under `flock /tmp/sail-heavy.lock` on a shared machine.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

GPU_BYTES = 80e9


def rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_gflops(device, dtype, n=4096, repeats=3):
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        torch.mm(a, b)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def linear_weights(heads):
    return sum(m.weight.numel() for m in heads.modules() if isinstance(m, torch.nn.Linear))


def build(head, width, device, image_dim=2048, text_dim=1024, out_dim=1024):
    from sail.train.heads import AlignmentHeads
    from sail.train.optim import build_optimizer

    heads = AlignmentHeads(image_dim, text_dim, out_dim, head, width).to(device)
    return heads, build_optimizer("lion", heads.param_groups(1e-7), lr=1e-5, weight_decay=1e-7)


def inputs(heads, batch, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(batch, heads.image_dim, generator=g).half().to(device)
    text = torch.randn(batch, heads.text_dim, generator=g).half().to(device)
    return image, text


def one_step(heads, opt, image, text, prec, chunk):
    from sail.train.losses import sigmoid_loss
    from sail.train.step import train_step

    opt.zero_grad(set_to_none=True)
    stats = train_step(heads, image, [text], lambda x, ys, t, b: sigmoid_loss(x, ys[0], t, b),
                       precision=prec, chunk_size=chunk)
    opt.step()
    heads.clamp_()
    return stats


def worker(batch, head, width, precision, chunk, repeats, device):
    """One batch size in this (fresh) process; returns a dict of measurements."""
    from sail.core.precision import resolve_precision
    from sail.train.step import auto_chunk_size

    device = torch.device(device)
    prec = resolve_precision(precision, device)
    heads, opt = build(head, width, device)
    one_step(heads, opt, *inputs(heads, 512, device, seed=1), prec, chunk)  # optimizer state, thread pools
    peak_mm = matmul_gflops(device, prec.dtype)
    image, text = inputs(heads, batch, device)
    base = rss_mb()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    used_chunk = chunk or auto_chunk_size(heads, batch, device)
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        stats = one_step(heads, opt, image, text, prec, chunk)
        loss = stats[0].item()  # the one sync
        best = min(best, time.perf_counter() - t0)
    peak = rss_mb()
    grads = {n: p.grad.abs().median().item() for n, p in heads.named_parameters()
             if p.grad is not None and n.endswith("weight") and p.ndim == 2}
    flops = {"heads": 4 * 2 * batch * linear_weights(heads), "loss": 3 * 2 * batch**2 * heads.out_dim}
    out = {"device": str(device), "precision": str(prec), "threads": torch.get_num_threads(), "head": head,
           "width": width, "batch": batch, "chunk": used_chunk, "params": heads.num_parameters(),
           "step_s": best, "pairs_s": batch / best, "tflop": (flops["heads"] + flops["loss"]) / 1e12,
           "gflops": (flops["heads"] + flops["loss"]) / best / 1e9, "matmul_gflops": peak_mm,
           "base_rss_mb": base, "peak_rss_mb": peak, "loss": loss,
           "grad_median_min": min(grads.values()), "grad_median_max": max(grads.values())}
    out["fraction_of_peak"] = out["gflops"] / peak_mm
    if device.type == "cuda":
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def measure(batch, head="glu", width=4, repeats=1, device=None, precision="auto"):
    """In this process: one step at `batch` split into phases for extrapolation (benchmarks/loader.py):
    loss = the sigmoid loss forward + backward alone on (B, D) embeddings, optimizer = Lion step alone,
    heads_fwd = the rest (both head passes and their backward: ~B); backward is folded into heads_fwd."""
    from sail.core.precision import resolve_precision
    from sail.train.losses import sigmoid_loss

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    prec = resolve_precision(precision, device)
    heads, opt = build(head, width, device)
    one_step(heads, opt, *inputs(heads, min(batch, 512), device, seed=1), prec, None)
    image, text = inputs(heads, batch, device)
    total = float("inf")
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        one_step(heads, opt, image, text, prec, None)[0].item()
        total = min(total, time.perf_counter() - t0)
    emb_dtype = torch.bfloat16 if prec.name == "bf16" else torch.float32
    x = torch.nn.functional.normalize(torch.randn(batch, heads.out_dim, device=device), dim=1).to(emb_dtype)
    y = torch.nn.functional.normalize(torch.randn(batch, heads.out_dim, device=device), dim=1).to(emb_dtype)
    x.requires_grad_(), y.requires_grad_()
    sync(device)
    t0 = time.perf_counter()
    sigmoid_loss(x, y, heads.scale(), heads.logit_bias).backward()
    sync(device)
    t1 = time.perf_counter()
    opt.step()
    sync(device)
    t2 = time.perf_counter()
    loss_s, opt_s = t1 - t0, t2 - t1
    phases = {"heads_fwd": max(0.0, total - loss_s - opt_s), "loss": loss_s, "backward": 0.0, "optimizer": opt_s,
              "total": total}
    return {"step_s": total, "phases_s": phases, "batch": batch, "device": str(device), "precision": str(prec)}


def model_line():
    from sail.train.heads import AlignmentHeads
    from sail.train.step import memory_model

    with torch.device("meta"):
        heads = AlignmentHeads(2048, 1024, 1024, "glu", 4)
    m = memory_model(heads, 1 << 20)
    gib = {k: round(v / 2**30, 2) for k, v in m.items()}
    print("memory model, B = 1,048,576, glu 2048/1024 -> 1024 width 4, bf16 autocast, fp16 features, chunk 32768, "
          "1 GiB loss block (peak = parameters + features + the larger of the loss and chunk phases):")
    print("  " + "  ".join(f"{k} {v:.2f} GiB" for k, v in gib.items()))
    print(f"  fits an 80 GB GPU: {m['peak'] < GPU_BYTES} ({m['peak'] / GPU_BYTES:.0%} of it)")
    # the same model for this CPU's fp32 run at B = 36864 (chunk 4096, 32 MiB loss blocks, Lion: 1 state)
    cpu = {b: memory_model(heads, b, chunk=4096, emb_bytes=4, act_bytes=4, block_bytes=32 * 2**20,
                           optimizer_states=1)["peak"] for b in (36864, 131072)}
    flop = {b: 4 * 2 * b * linear_weights(heads) + 3 * 2 * b * b * heads.out_dim for b in cpu}
    print("memory model on CPU in fp32 (chunk 4096), + the process itself (torch, allocator; ~0.4 GiB): "
          + ", ".join(f"B = {b}: peak {v / 2**30:.2f} GiB, {flop[b] / 1e12:.0f} TFLOP" for b, v in cpu.items())
          + f" (B = 131072 does {flop[131072] / flop[36864]:.1f}x the work of 36864: the loss grows as B^2)")
    return {"model_B": 1 << 20, "model_gib": gib, "model_fits_80GB": m["peak"] < GPU_BYTES,
            **{f"model_cpu_{b}_gib": round(v / 2**30, 2) for b, v in cpu.items()},
            "tflop": {str(b): round(v / 1e12, 1) for b, v in flop.items()}}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="short run: B = 4096")
    p.add_argument("--batch", default="36864,131072", help="comma-separated batch sizes")
    p.add_argument("--head", default="glu", choices=["linear", "mlp", "glu"])
    p.add_argument("--width", type=int, default=4)
    p.add_argument("--precision", default="auto", help="auto | fp32 | bf16 | fp16 (see sail.core.precision)")
    p.add_argument("--chunk-size", type=int, default=None, help="rows per head chunk (default: automatic)")
    p.add_argument("--repeats", type=int, default=1, help="timed steps (the fastest is reported)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--model-only", action="store_true", help="print the memory model only")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.worker:
        r = worker(int(args.batch), args.head, args.width, args.precision, args.chunk_size, args.repeats, device)
        print(json.dumps(r))
        return
    if args.model_only:
        print(json.dumps({"benchmark": "align_step", **model_line()}))
        return
    sizes = [4096] if args.quick else [int(b) for b in args.batch.split(",")]
    rows = []
    for b in sizes:
        cmd = [sys.executable, __file__, "--worker", "--batch", str(b), "--head", args.head, "--width", str(args.width),
               "--precision", args.precision, "--repeats", str(args.repeats), "--device", device]
        if args.chunk_size:
            cmd += ["--chunk-size", str(args.chunk_size)]
        res = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
        if res.returncode != 0:
            print(f"B = {b}: worker failed\n{res.stderr[-2000:]}")
            rows.append({"batch": b, "error": res.stderr[-300:]})
            continue
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
    ok = [r for r in rows if "error" not in r]
    if ok:
        r0 = ok[0]
        print(f"{r0['head']} heads, width {r0['width']}, {r0['params'] / 1e6:.2f}M params, {r0['device']} "
              f"{r0['precision']}, {r0['threads']} threads")
        print(f"{'B':>7} {'chunk':>6} {'step s':>8} {'pairs/s':>8} {'TFLOP':>6} {'GFLOP/s':>8} {'mm GFLOP/s':>10} "
              f"{'of peak':>7} {'base MB':>8} {'peak MB':>8} {'|grad| median':>18}")
        for r in ok:
            print(f"{r['batch']:>7} {r['chunk']:>6} {r['step_s']:>8.1f} {r['pairs_s']:>8.0f} {r['tflop']:>6.1f} "
                  f"{r['gflops']:>8.1f} {r['matmul_gflops']:>10.1f} {r['fraction_of_peak']:>7.3f} "
                  f"{r['base_rss_mb']:>8.0f} {r['peak_rss_mb']:>8.0f} "
                  f"{r['grad_median_min']:.1e}..{r['grad_median_max']:.1e}")
            if "peak_cuda_mb" in r:
                print(f"        peak CUDA memory {r['peak_cuda_mb']:.0f} MB")
    model = model_line()
    load = round(os.getloadavg()[0], 2)
    print(f"load average {load} on {os.cpu_count()} CPUs (other jobs slow the step and the matmul peak alike)")
    round4 = lambda d: {k: (float(f"{v:.4g}") if isinstance(v, float) else v) for k, v in d.items()}  # noqa: E731
    print(json.dumps({"benchmark": "align_step", "loadavg": load, "runs": [round4(r) for r in rows], **model}))


if __name__ == "__main__":
    main()
