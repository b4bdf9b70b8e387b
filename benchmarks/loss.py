"""Benchmark: blockwise sigmoid loss (float32 and bfloat16 inputs) vs the plain B x B formula, on CPU.

    python benchmarks/loss.py --sizes 16384            # the issue's check: fp32, bf16 and plain at B = 16384
    python benchmarks/loss.py                          # B in 4096 .. 131072, D = 1024
    python benchmarks/loss.py --quick                  # a short run (B = 1024, 2048)

Implementations: "blockwise" = sail.train.losses.sigmoid_loss on float32 embeddings; "bf16" = the same on
bfloat16 embeddings (bf16 matmuls, fp32 element-wise work; see sail.train.losses); "plain" = the formula below;
"matmuls" = only the blockwise loss's three fp32 matmuls over the same blocks (no element-wise work): the
floor of blockwise/plain in fp32, printed as "matmuls alone / plain".
Accuracy (blockwise and bf16, --accuracy, on by default up to B = 16384): the same call on the float64
values of the float32 embeddings is the reference (so bf16's input rounding counts); reported are the
loss's relative error, the cosine between each embedding gradient and the reference's, and the t and b
gradients' relative errors. The embeddings are realistic pairs: y_i = normalise(0.6 x_i + 0.8 z_i), so
positives have cosine ~0.6 and negatives ~0.

Each (B, implementation) runs in a FRESH subprocess so its peak RSS (resource.getrusage ru_maxrss) is its
own. Reported per run: wall time of one forward + backward, achieved GFLOP/s counting the three matmuls
(logits, G @ Y, G^T @ X: 3 * 2 B^2 D flops), the same process's plain matmul GFLOP/s (a (4096, D) @
(D, 4096) product timed alone), the process baseline RSS after imports + inputs, its peak RSS and the
increase. The plain formula is
    z = 2 * eye(B) - 1;  logits = t * X @ Y.T + b;  loss = -logsigmoid(z * logits).sum() / B**2
with autograd, run only up to --plain-max (default 16384; above that it needs tens of GB). Prints a table,
then one JSON line. Timings on a shared machine are noisy.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

SIZES = (4096, 8192, 16384, 36864, 65536, 131072)


def rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def worker(impl, n, dim, block_size, threads, repeats, accuracy):
    """One configuration, in this (fresh) process; returns a dict of measurements."""
    import torch
    import torch.nn.functional as F

    from sail.train.losses import sigmoid_loss

    if threads:
        torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)

    def inputs(rows):
        # normalised in place so creating them leaves no (B, D) temporaries in the baseline
        x = torch.randn(rows, dim, generator=g)
        y = torch.randn(rows, dim, generator=g)
        x.div_(x.norm(dim=1, keepdim=True))
        y.mul_(0.8 / y.norm(dim=1, keepdim=True)).add_(x, alpha=0.6)  # positives at cosine ~0.6
        y.div_(y.norm(dim=1, keepdim=True))
        if impl == "bf16":
            return x.bfloat16().requires_grad_(), y.bfloat16().requires_grad_(), x, y
        return x.requires_grad_(), y.requires_grad_(), x, y

    log_t = torch.tensor(2.996, requires_grad=True)  # ln 20, SAIL's init
    b = torch.tensor(-10.0, requires_grad=True)

    def step(x, y):
        if impl == "matmuls":  # the floor: the blockwise loss's three matmuls alone, same blocks
            from sail.train.losses import BLOCK_BYTES

            m = x.shape[0]
            rows = block_size or max(1, min(m, BLOCK_BYTES // (m * 4)))
            xd, yd = x.detach(), y.detach()
            s, gx, gy = xd.new_empty((rows, m)), torch.empty_like(xd), torch.zeros_like(yd)
            for r0 in range(0, m, rows):
                blk = s[: min(rows, m - r0)]
                torch.mm(xd[r0:r0 + rows], yd.T, out=blk)
                torch.mm(blk, yd, out=gx[r0:r0 + rows])
                gy.addmm_(blk.T, xd[r0:r0 + rows])
            return float("nan")
        if impl == "plain":
            m = x.shape[0]
            z = 2 * torch.eye(m) - 1
            logits = log_t.exp() * x @ y.T + b
            loss = -F.logsigmoid(z * logits).sum() / m**2
        else:
            loss = sigmoid_loss(x, y, log_t.exp(), b, block_size=block_size)
        loss.backward()
        return loss.item()

    step(*inputs(512)[:2])  # warm up thread pools and BLAS on a small batch
    x, y, x32, y32 = inputs(n)
    if impl != "bf16":
        del x32, y32  # the same tensors as x, y
    base = rss_mb()
    times = []
    for _ in range(repeats):
        x.grad = y.grad = log_t.grad = b.grad = None
        t0 = time.perf_counter()
        value = step(x, y)
        times.append(time.perf_counter() - t0)
    peak = rss_mb()
    acc = {}
    if accuracy and impl not in ("plain", "matmuls"):
        got = [x.grad.double(), y.grad.double(), log_t.grad.double(), b.grad.double()]
        ref_x = (x32 if impl == "bf16" else x).detach().double().requires_grad_()
        ref_y = (y32 if impl == "bf16" else y).detach().double().requires_grad_()
        lt, bb = log_t.detach().double().requires_grad_(), b.detach().double().requires_grad_()
        ref = sigmoid_loss(ref_x, ref_y, lt.exp(), bb)
        ref.backward()
        cos = lambda a, r: F.cosine_similarity(a.flatten(), r.flatten(), dim=0).item()  # noqa: E731
        acc = {"loss_rel_err": abs(value - ref.item()) / abs(ref.item()),
               "grad_x_cos": cos(got[0], ref_x.grad), "grad_y_cos": cos(got[1], ref_y.grad),
               "grad_t_rel_err": abs((got[2] - lt.grad) / lt.grad).item(),
               "grad_b_rel_err": abs((got[3] - bb.grad) / bb.grad).item()}
    del x, y

    dtype = torch.bfloat16 if impl == "bf16" else torch.float32
    a, bm = torch.randn(4096, dim, dtype=dtype), torch.randn(4096, dim, dtype=dtype)
    mm = []
    for _ in range(3):
        t0 = time.perf_counter()
        torch.mm(a, bm.T)
        mm.append(time.perf_counter() - t0)
    sec = min(times)
    return {
        "impl": impl, "B": n, "D": dim, "threads": torch.get_num_threads(), "time_s": round(sec, 3),
        "gflops": round(3 * 2 * n * n * dim / sec / 1e9, 1),
        "matmul_gflops": round(2 * 4096 * 4096 * dim / min(mm) / 1e9, 1),
        "base_rss_mb": round(base), "peak_rss_mb": round(peak), "increase_mb": round(peak - base),
        "loss": value, **acc,
    }


def run_one(impl, n, args):
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", impl, "--sizes", str(n),
           "--dim", str(args.dim), "--repeats", str(args.repeats), "--threads", str(args.threads)]
    cmd += ["--accuracy" if args.accuracy and n <= args.accuracy_max else "--no-accuracy"]
    if args.block_size:
        cmd += ["--block-size", str(args.block_size)]
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"impl": impl, "B": n, "error": (proc.stderr.strip().splitlines() or ["killed"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default=",".join(map(str, SIZES)), help="comma-separated batch sizes")
    p.add_argument("--quick", action="store_true", help="short run: B = 1024, 2048")
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--block-size", type=int, default=0, help="rows per block (0: the library default)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per configuration (min is reported)")
    p.add_argument("--plain-max", type=int, default=16384, help="largest B to run the plain formula at")
    p.add_argument("--accuracy", action=argparse.BooleanOptionalAction, default=True,
                   help="compare blockwise and bf16 with float64 (default on, up to --accuracy-max)")
    p.add_argument("--accuracy-max", type=int, default=16384, help="largest B for the float64 comparison")
    p.add_argument("--worker", choices=["blockwise", "bf16", "plain", "matmuls"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    sizes = [1024, 2048] if args.quick else [int(s) for s in args.sizes.split(",")]

    if args.worker:
        print(json.dumps(worker(args.worker, sizes[0], args.dim, args.block_size or None, args.threads,
                                args.repeats, args.accuracy)))
        return

    rows = []
    print(f"{'B':>7} {'impl':>9} {'time s':>8} {'GFLOP/s':>8} {'mm GFLOP/s':>10} "
          f"{'base MB':>8} {'peak MB':>8} {'incr MB':>8}")
    for n in sizes:
        for impl in ("blockwise", "bf16", "plain", "matmuls") if n <= args.plain_max else ("blockwise", "bf16"):
            r = run_one(impl, n, args)
            rows.append(r)
            if "error" in r:
                print(f"{n:>7} {impl:>9}  failed: {r['error']}")
                continue
            acc = (f"  loss rel err {r['loss_rel_err']:.1e}, grad cos {min(r['grad_x_cos'], r['grad_y_cos']):.6f}, "
                   f"t/b grad rel err {r['grad_t_rel_err']:.1e}/{r['grad_b_rel_err']:.1e}") if "loss_rel_err" in r else ""
            print(f"{n:>7} {impl:>9} {r['time_s']:>8.2f} {r['gflops']:>8.1f} {r['matmul_gflops']:>10.1f} "
                  f"{r['base_rss_mb']:>8} {r['peak_rss_mb']:>8} {r['increase_mb']:>8}{acc}", flush=True)

    # blockwise / plain ratios where both ran
    ratios = {}
    for n in sizes:
        bw = next((r for r in rows if r["B"] == n and r["impl"] == "blockwise" and "error" not in r), None)
        pl = next((r for r in rows if r["B"] == n and r["impl"] == "plain" and "error" not in r), None)
        bf = next((r for r in rows if r["B"] == n and r["impl"] == "bf16" and "error" not in r), None)
        if bw and bf:
            ratios.setdefault(str(n), {})["bf16_over_fp32_time"] = round(bf["time_s"] / bw["time_s"], 3)
            print(f"B={n}: bf16/fp32 time {bf['time_s'] / bw['time_s']:.3f} (matmul alone: "
                  f"{bw['matmul_gflops'] / bf['matmul_gflops']:.3f})")
        if bw and pl:
            ratios.setdefault(str(n), {}).update({
                "time": round(bw["time_s"] / pl["time_s"], 3),
                "peak_rss": round(bw["peak_rss_mb"] / pl["peak_rss_mb"], 3),
                "increase": round(bw["increase_mb"] / max(pl["increase_mb"], 1), 3),
                "loss_abs_diff": abs(bw["loss"] - pl["loss"]),
            })
            print(f"B={n}: blockwise/plain time {ratios[str(n)]['time']:.3f}, peak RSS "
                  f"{ratios[str(n)]['peak_rss']:.3f}, RSS increase {ratios[str(n)]['increase']:.3f}")
        mm = next((r for r in rows if r["B"] == n and r["impl"] == "matmuls" and "error" not in r), None)
        if mm and pl and bw:
            ratios[str(n)]["matmuls_over_plain_time"] = round(mm["time_s"] / pl["time_s"], 3)
            ratios[str(n)]["blockwise_over_matmuls_time"] = round(bw["time_s"] / mm["time_s"], 3)
            print(f"B={n}: the three fp32 matmuls alone / plain time {mm['time_s'] / pl['time_s']:.3f} (the floor of "
                  f"blockwise/plain in fp32); blockwise / its matmuls {bw['time_s'] / mm['time_s']:.3f}")
    print(json.dumps({"benchmark": "sigmoid_loss_fwd_bwd", "device": "cpu", "dtypes": ["float32", "bfloat16"],
                      "dim": args.dim, "results": rows, "ratios": ratios}))


if __name__ == "__main__":
    main()
