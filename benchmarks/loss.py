"""Benchmark: blockwise sigmoid loss vs the plain B x B formula, forward + backward, on CPU.

    python benchmarks/loss.py                          # B in 4096 .. 131072, D = 1024, float32
    python benchmarks/loss.py --sizes 4096,16384,36864
    python benchmarks/loss.py --quick                  # a short run (B = 1024, 2048)

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


def worker(impl, n, dim, block_size, threads, repeats):
    """One configuration, in this (fresh) process; returns a dict of measurements."""
    import torch
    import torch.nn.functional as F

    from sail.losses import sigmoid_loss

    if threads:
        torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)

    def inputs(rows):
        # normalised in place so creating them leaves no (B, D) temporaries in the baseline
        x = torch.randn(rows, dim, generator=g)
        y = torch.randn(rows, dim, generator=g)
        x.div_(x.norm(dim=1, keepdim=True))
        y.div_(y.norm(dim=1, keepdim=True))
        return x.requires_grad_(), y.requires_grad_()

    log_t = torch.tensor(2.996, requires_grad=True)  # ln 20, SAIL's init
    b = torch.tensor(-10.0, requires_grad=True)

    def step(x, y):
        if impl == "plain":
            m = x.shape[0]
            z = 2 * torch.eye(m) - 1
            logits = log_t.exp() * x @ y.T + b
            loss = -F.logsigmoid(z * logits).sum() / m**2
        else:
            loss = sigmoid_loss(x, y, log_t.exp(), b, block_size=block_size)
        loss.backward()
        return loss.item()

    step(*inputs(512))  # warm up thread pools and BLAS on a small batch
    x, y = inputs(n)
    base = rss_mb()
    times = []
    for _ in range(repeats):
        x.grad = y.grad = log_t.grad = b.grad = None
        t0 = time.perf_counter()
        value = step(x, y)
        times.append(time.perf_counter() - t0)
    peak = rss_mb()
    del x, y

    a, bm = torch.randn(4096, dim), torch.randn(4096, dim)
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
        "loss": value,
    }


def run_one(impl, n, args):
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", impl, "--sizes", str(n),
           "--dim", str(args.dim), "--repeats", str(args.repeats), "--threads", str(args.threads)]
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
    p.add_argument("--worker", choices=["blockwise", "plain"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    sizes = [1024, 2048] if args.quick else [int(s) for s in args.sizes.split(",")]

    if args.worker:
        print(json.dumps(worker(args.worker, sizes[0], args.dim, args.block_size or None, args.threads,
                                args.repeats)))
        return

    rows = []
    print(f"{'B':>7} {'impl':>9} {'time s':>8} {'GFLOP/s':>8} {'mm GFLOP/s':>10} "
          f"{'base MB':>8} {'peak MB':>8} {'incr MB':>8}")
    for n in sizes:
        for impl in ("blockwise", "plain") if n <= args.plain_max else ("blockwise",):
            r = run_one(impl, n, args)
            rows.append(r)
            if "error" in r:
                print(f"{n:>7} {impl:>9}  failed: {r['error']}")
                continue
            print(f"{n:>7} {impl:>9} {r['time_s']:>8.2f} {r['gflops']:>8.1f} {r['matmul_gflops']:>10.1f} "
                  f"{r['base_rss_mb']:>8} {r['peak_rss_mb']:>8} {r['increase_mb']:>8}", flush=True)

    # blockwise / plain ratios where both ran
    ratios = {}
    for n in sizes:
        bw = next((r for r in rows if r["B"] == n and r["impl"] == "blockwise" and "error" not in r), None)
        pl = next((r for r in rows if r["B"] == n and r["impl"] == "plain" and "error" not in r), None)
        if bw and pl:
            ratios[str(n)] = {
                "time": round(bw["time_s"] / pl["time_s"], 3),
                "peak_rss": round(bw["peak_rss_mb"] / pl["peak_rss_mb"], 3),
                "increase": round(bw["increase_mb"] / max(pl["increase_mb"], 1), 3),
                "loss_abs_diff": abs(bw["loss"] - pl["loss"]),
            }
            print(f"B={n}: blockwise/plain time {ratios[str(n)]['time']:.3f}, peak RSS "
                  f"{ratios[str(n)]['peak_rss']:.3f}, RSS increase {ratios[str(n)]['increase']:.3f}")
    print(json.dumps({"benchmark": "sigmoid_loss_fwd_bwd", "device": "cpu", "dtype": "float32",
                      "dim": args.dim, "results": rows, "ratios": ratios}))


if __name__ == "__main__":
    main()
