"""Benchmark: one full `sail align` training step at SAIL's batch, against a plain matmul peak.

    python benchmarks/align_step.py                   # B = 36864, glu heads, 2048 / 1024 -> 1024, width 4
    python benchmarks/align_step.py --quick           # B = 4096
    python benchmarks/align_step.py --batch 16384 --head mlp --repeats 2

One step is what the trainer (sail.align) does per batch: both heads forward (LayerNorm + GLU, L2
normalise), sail.losses.sigmoid_loss forward (which also computes its gradients, blockwise), backward
through the heads, Lion step, clamp of log t. Inputs are float16 features as the stores hold them;
compute is float32 on CPU, bf16 autocast on CUDA (as sail.align does). A warm-up step at a small
batch creates the optimizer state first. Reported: seconds per step (best of --repeats) split into
heads forward / loss / backward / optimizer, pairs/s, achieved GFLOP/s counting
    heads: 3 x 2 x B x (weights of the Linear layers)   (forward + two backward matmuls)
    loss:  3 x 2 x B^2 x D                              (logits, G @ Y, G^T @ X)
against a plain (4096, 4096) @ (4096, 4096) matmul timed in the same process (float32 on CPU, bf16 on
CUDA; best of 3, before and after the step), the peak RSS (and peak CUDA memory on GPU).

Target: the step reaches a reasonable fraction of the matmul peak (the matmuls are the whole cost);
the figure also tells benchmarks/loader.py whether the trainer would wait for data. Prints a table,
then one JSON line.
"""

import argparse
import json
import os
import resource
import time

import torch

from sail.encoders import autocast
from sail.heads import AlignmentHeads
from sail.losses import sigmoid_loss
from sail.optim import build_optimizer


def rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_gflops(device, n=4096, repeats=3):
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
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


def step_flops(heads, batch):
    return {"heads": 3 * 2 * batch * linear_weights(heads), "loss": 3 * 2 * batch**2 * heads.out_dim}


def build(head="glu", width=4, image_dim=2048, text_dim=1024, out_dim=1024, device="cpu"):
    heads = AlignmentHeads(image_dim, text_dim, out_dim, head, width).to(device)
    opt = build_optimizer("lion", heads.param_groups(1e-7), lr=1e-5, weight_decay=1e-7)
    return heads, opt


def inputs(heads, batch, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(batch, heads.image_dim, generator=g).half().to(device)
    text = torch.randn(batch, heads.text_dim, generator=g).half().to(device)
    return image, text


def step(heads, opt, image, text):
    """One training step as in sail.align; returns (loss, seconds per phase)."""
    device = image.device
    times = {}
    sync(device)
    t0 = time.perf_counter()
    with autocast(device):
        x, y = heads(image, text)  # (B, out) each, unit norm
    sync(device)
    t1 = time.perf_counter()
    loss = sigmoid_loss(x.float(), y.float(), heads.scale(), heads.logit_bias)  # gradients computed here
    sync(device)
    t2 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    sync(device)
    t3 = time.perf_counter()
    opt.step()
    heads.clamp_()
    value = loss.item()
    t4 = time.perf_counter()
    times = {"heads_fwd": t1 - t0, "loss": t2 - t1, "backward": t3 - t2, "optimizer": t4 - t3, "total": t4 - t0}
    return value, times


def measure(batch, head="glu", width=4, repeats=1, device=None):
    """Build heads, warm up at a small batch, time `repeats` steps at `batch`; returns a dict."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    heads, opt = build(head, width, device=device)
    step(heads, opt, *inputs(heads, min(batch, 512), device, seed=1))  # optimizer state, thread pools
    peak_before = matmul_gflops(device)
    image, text = inputs(heads, batch, device)
    base = rss_mb()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    best = None
    for _ in range(repeats):
        loss, times = step(heads, opt, image, text)
        if best is None or times["total"] < best["total"]:
            best = times
    peak_rss = rss_mb()
    del image, text
    peak_after = matmul_gflops(device)
    flops = step_flops(heads, batch)
    total_flops = flops["heads"] + flops["loss"]
    out = {
        "device": str(device), "dtype": "bf16 autocast" if device.type == "cuda" else "float32",
        "threads": torch.get_num_threads(), "head": head, "width": width, "batch": batch,
        "params": heads.num_parameters(), "linear_weights": linear_weights(heads),
        "step_s": best["total"], "phases_s": best, "pairs_s": batch / best["total"],
        "tflop_heads": flops["heads"] / 1e12, "tflop_loss": flops["loss"] / 1e12,
        "gflops": total_flops / best["total"] / 1e9,
        "matmul_gflops": max(peak_before, peak_after),
        "matmul_gflops_before_after": [round(peak_before, 1), round(peak_after, 1)],
        "base_rss_mb": base, "peak_rss_mb": peak_rss, "loss": loss,
    }
    out["fraction_of_peak"] = out["gflops"] / out["matmul_gflops"]
    if device.type == "cuda":
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="short run: B = 4096, 2 repeats")
    p.add_argument("--batch", type=int, default=36864)
    p.add_argument("--head", default="glu", choices=["linear", "mlp", "glu"])
    p.add_argument("--width", type=int, default=4)
    p.add_argument("--repeats", type=int, default=1, help="timed steps (the fastest is reported)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.repeats = 4096, 2
    if args.threads:
        torch.set_num_threads(args.threads)

    r = measure(args.batch, args.head, args.width, args.repeats, args.device)
    ph = r["phases_s"]
    print(f"{r['head']} heads, width {r['width']}, {r['params'] / 1e6:.2f}M params, B = {r['batch']}, "
          f"{r['device']} {r['dtype']}, {r['threads']} threads")
    print(f"{'step s':>8} {'heads fwd':>9} {'loss':>7} {'bwd':>7} {'opt':>6} {'pairs/s':>8} {'TFLOP':>6} "
          f"{'GFLOP/s':>8} {'mm GFLOP/s':>10} {'of peak':>7} {'base MB':>8} {'peak MB':>8}")
    print(f"{r['step_s']:>8.2f} {ph['heads_fwd']:>9.2f} {ph['loss']:>7.2f} {ph['backward']:>7.2f} "
          f"{ph['optimizer']:>6.2f} {r['pairs_s']:>8.0f} {r['tflop_heads'] + r['tflop_loss']:>6.2f} "
          f"{r['gflops']:>8.1f} {r['matmul_gflops']:>10.1f} {r['fraction_of_peak']:>7.3f} "
          f"{r['base_rss_mb']:>8.0f} {r['peak_rss_mb']:>8.0f}")
    if "peak_cuda_mb" in r:
        print(f"peak CUDA memory {r['peak_cuda_mb']:.0f} MB")
    load = round(os.getloadavg()[0], 2)
    print(f"load average {load} on {os.cpu_count()} CPUs (other jobs slow both the step and the peak)")
    fields = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items() if k != "phases_s"}
    print(json.dumps({"benchmark": "align_step", "loadavg": load, **fields,
                      "phases_s": {k: round(v, 4) for k, v in ph.items()}}))


if __name__ == "__main__":
    main()
