"""Benchmark: everything that needs a GPU, in one run of at most ~5 minutes.

    python benchmarks/gpu.py                     # all sections on cuda
    python benchmarks/gpu.py --only loss,step    # some sections
    python benchmarks/gpu.py --smoke             # every section at tiny sizes on CPU (checks the script)
    python benchmarks/gpu.py --section loss-kernel --sizes 36864 --repeats 5

Sections (one function each, registered in SECTIONS; add yours with `@section("name")`; each gets the
shared context and returns a dict of figures, printed as a table and put in the final JSON line):
- matmul: the bf16 peak (gpu_kernel.bf16_matmul_peak: the best bf16 torch.mm over a few large shapes, the one
  definition every share refers to) and the TF32 / fp32 rates at 8192^3, measured in this run.
- peers (benchmarks/gpu_peers.py): sail's loss (triton, torch) against siglip-kernel (its router and its best
  backend) and open_clip's SigLipLoss on the same bf16 inputs at B = 36864 .. 1M, D = 1024 and 768, and
  multi-positive K = 2 against SigLIP+; seconds, peak memory, share of peak; each against float64 first.
  `make peers` fetches their wheels; install them on the GPU machine with `pip install --no-deps`.
- loss: sail.train.losses.sigmoid_loss forward + backward at B = 65536, D = 1024 with bf16 and fp32
  embeddings (bf16 / fp32 time), and the bf16 loss's relative error and gradient cosine against float64.
- step: a full training step (sail.train.step.train_step, glu 2048/1024 -> 1024 width 4, bf16 autocast, Lion)
  at B = 36864: seconds, pairs/s, peak CUDA memory, share of the bf16 peak; then the largest B that fits:
  1,048,576 first, halving until a step fits.
- extraction: `sail extract` images/s for a dinov2-large-shaped random model, the forward per weights
  dtype and the whole pipeline (benchmarks/gpu_extract.py, which also runs alone and on CPU with --quick).
- loader: StreamingBatches pairs/s from synthetic stores in the page cache (2048 + 1024 fp16 per pair)
  against the step's pairs/s at B = 36864 (> 1: the GPU never waits for data).
- cli: `sail align` run as a user runs it (a subprocess per run) on synthetic stores: each loss, in memory
  and streamed, bf16 (auto), fp16 and fp32; then Ctrl-C after the first checkpoint and --resume to the end.
- loss-kernel (benchmarks/gpu_kernel.py; CUDA only): the fused Triton sigmoid loss (sail.train.triton_sigmoid,
  impl="triton") against the blockwise torch loss (impl="torch") on the same bf16 inputs, forward +
  backward, and against the bf16 matmul peak measured in the same run (the best of a few large torch.mm shapes). Reported: seconds per forward +
  backward, TFLOP/s counting the three matmuls (6 B^2 D flops), share of the measured peak (goal >= 70 %),
  peak memory; first triton and torch each against float64 at B = 4096. Goal at B = 1,048,576:
  <= 10 s on an H100-class GPU. The first triton call autotunes the tile configs; the timed calls follow.
  `--sizes` sets its batch sizes (default 36864,262144,1048576), `--repeats` its timed calls.
Without a CUDA device it prints why and exits with status 0 (nothing to measure), unless --smoke.
Prints the figures, then one JSON line, and (on CUDA, or with --record) writes the one record the README's GPU
table is generated from: benchmarks/results/gpu.json (`python benchmarks/gpu_table.py --readme README.md`).

Time. A lent GPU machine gives about 15 minutes in all and at most 10 per command, so the sections run in ORDER
(what the open goals need first: the peak, the losses against the peers, the loss kernel, the step, extraction,
then the loader, the CLI runs and the bf16-vs-fp32 loss), the record is rewritten after every section (a run
killed at its limit keeps what it measured), and `--budget` (default 480 s) skips the sections that would start
after it (recorded as skipped) and stops the peers section's rows once its share is spent. `--merge` keeps the
sections of an existing record that this run does not redo, so a second command can complete it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the sail next to this script
sys.path.insert(0, str(Path(__file__).resolve().parent))  # gpu_kernel.py, gpu_extract.py

SECTIONS: dict = {}
# the order sections run in (a subset with --only keeps this order): the open goals' figures first; loader needs
# step's figures, every share needs matmul's peak
ORDER = ("matmul", "peers", "loss-kernel", "step", "extraction", "loader", "cli", "loss")
PEERS_SHARE = 0.45  # of --budget: the peers section stops starting new rows after this much of the run


def section(name):
    def register(fn):
        SECTIONS[name] = fn
        return fn

    return register


class Context:
    """What every section may use: the device, the sizes (scaled down by --smoke), earlier results."""

    def __init__(self, device: torch.device, smoke: bool):
        self.device, self.smoke = device, smoke
        self.results: dict = {}
        self.dims = (64, 32, 32) if smoke else (2048, 1024, 1024)  # image, text, out
        self.kernel_sizes: tuple | None = None  # loss-kernel: --sizes
        self.repeats = 3  # loss-kernel: --repeats
        self.deadline = float("inf")  # perf_counter() after which a section starts no new long measurement

    def size(self, full: int, tiny: int) -> int:
        return tiny if self.smoke else full

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def timed(self, fn, repeats=2):
        """Best wall time of fn() over `repeats` runs after one warm-up, synchronised."""
        fn()
        best = float("inf")
        for _ in range(repeats):
            self.sync()
            t0 = time.perf_counter()
            fn()
            self.sync()
            best = min(best, time.perf_counter() - t0)
        return best

    def bf16_peak(self) -> float:
        return self.results.get("matmul", {}).get("bf16_tflops", float("nan"))


# ------------------------------------------------------------------------------------------ sections


@section("matmul")
def matmul_peak(ctx: Context) -> dict:
    """The run's bf16 peak (gpu_kernel.bf16_matmul_peak: the one definition every share refers to), and the
    TF32 and fp32 rates at 8192^3 for comparison."""
    from gpu_kernel import PEAK_SHAPES, bf16_matmul_peak

    shapes = tuple(tuple(ctx.size(v, 256) for v in shape) for shape in PEAK_SHAPES[: ctx.size(len(PEAK_SHAPES), 1)])
    peak, per_shape = bf16_matmul_peak(repeats=ctx.size(10, 2), shapes=shapes, device=ctx.device)
    out = {"bf16_tflops": peak, "bf16_per_shape": per_shape}
    n = ctx.size(8192, 256)
    for name, tf32 in (("tf32", True), ("fp32", False)):
        if ctx.device.type == "cpu" and name == "tf32":
            continue
        saved = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = tf32
        try:
            a = torch.randn(n, n, device=ctx.device)
            b = torch.randn(n, n, device=ctx.device)
            out[f"{name}_tflops"] = 2 * n**3 / ctx.timed(lambda: torch.mm(a, b), repeats=5) / 1e12
            del a, b
        finally:
            torch.backends.cuda.matmul.allow_tf32 = saved
    return out


@section("peers")
def peers_section(ctx: Context) -> dict:
    from gpu_peers import SIZES, peers

    sizes = ctx.kernel_sizes or (SIZES if not ctx.smoke else (256, 512))
    return peers(ctx.device, ctx.bf16_peak(), sizes=sizes, dims=ctx.size((1024, 768), (64, 48)),
                 repeats=ctx.repeats, check_n=ctx.size(2048, 128), deadline=ctx.deadline)


@section("loss")
def loss_bf16_vs_fp32(ctx: Context) -> dict:
    import torch.nn.functional as F

    from sail.train.losses import sigmoid_loss

    n, d = ctx.size(65536, 512), ctx.dims[2]
    g = torch.Generator(device=ctx.device).manual_seed(0)
    x = F.normalize(torch.randn(n, d, device=ctx.device, generator=g), dim=1)
    y = F.normalize(0.6 * x + 0.8 * F.normalize(torch.randn(n, d, device=ctx.device, generator=g), dim=1), dim=1)
    t, b = torch.tensor(20.0, device=ctx.device), torch.tensor(-10.0, device=ctx.device)
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 here (TF32 is what auto would give)
    out, grads = {}, {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp64", torch.float64)):
        xi, yi = x.detach().to(dtype).requires_grad_(), y.detach().to(dtype).requires_grad_()

        def run():
            xi.grad = yi.grad = None
            value = sigmoid_loss(xi, yi, t, b)
            value.backward()
            return value

        if name == "fp64":
            value = run()
        else:
            out[f"{name}_s"] = ctx.timed(run)
            value = run()
        grads[name] = (value.item(), xi.grad.double(), yi.grad.double())
        del xi, yi
    torch.backends.cuda.matmul.allow_tf32 = saved
    ref = grads["fp64"]
    for name in ("fp32", "bf16"):
        out[f"{name}_loss_rel_err"] = abs(grads[name][0] - ref[0]) / abs(ref[0])
        out[f"{name}_grad_cos"] = min(F.cosine_similarity(grads[name][i].flatten(), ref[i].flatten(), dim=0).item()
                                      for i in (1, 2))
    out["bf16_over_fp32_time"] = out["bf16_s"] / out["fp32_s"]
    out["bf16_share_of_peak"] = 3 * 2 * n * n * d / out["bf16_s"] / 1e12 / ctx.bf16_peak()
    out["B"] = n
    return out


def _heads_and_step(ctx: Context):
    from sail.core.precision import resolve_precision
    from sail.train.heads import AlignmentHeads
    from sail.train.losses import sigmoid_loss
    from sail.train.optim import build_optimizer
    from sail.train.step import train_step

    image_dim, text_dim, out_dim = ctx.dims
    heads = AlignmentHeads(image_dim, text_dim, out_dim, "glu", 4).to(ctx.device)
    opt = build_optimizer("lion", heads.param_groups(1e-7), lr=1e-5, weight_decay=1e-7)
    prec = resolve_precision("auto", ctx.device)

    def step(image, text):
        opt.zero_grad(set_to_none=True)
        stats = train_step(heads, image, [text], lambda x, ys, t, b: sigmoid_loss(x, ys[0], t, b), precision=prec)
        opt.step()
        heads.clamp_()
        return stats

    flops_per_pair = 4 * 2 * sum(m.weight.numel() for m in heads.modules() if isinstance(m, torch.nn.Linear))
    return heads, step, prec, flops_per_pair


def _inputs(ctx, n):
    image = torch.randn(n, ctx.dims[0], device=ctx.device, dtype=torch.float16)
    text = torch.randn(n, ctx.dims[1], device=ctx.device, dtype=torch.float16)
    return image, text


@section("step")
def full_step(ctx: Context) -> dict:
    heads, step, prec, per_pair = _heads_and_step(ctx)
    step(*_inputs(ctx, 512))  # optimizer state
    out = {"precision": str(prec)}

    def one(n):
        image, text = _inputs(ctx, n)
        if ctx.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(ctx.device)
        ctx.sync()
        t0 = time.perf_counter()
        step(image, text)[0].item()
        sec = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated(ctx.device) / 2**30 if ctx.device.type == "cuda" else float("nan")
        tflop = (per_pair * n + 3 * 2 * n * n * ctx.dims[2]) / 1e12
        return {"B": n, "step_s": sec, "pairs_s": n / sec, "peak_gib": peak, "share_of_bf16_peak": tflop / sec / ctx.bf16_peak()}

    base = ctx.size(36864, 256)
    one(base)  # warm-up at the size (allocator, cuBLAS heuristics)
    out["at_36864"] = one(base)
    # the largest B: 1,048,576 first, halving until a step fits (each new B autotunes the loss kernel once,
    # so trying few sizes keeps the section short; doubling from 36864 took 96 s on an H200)
    largest, n = out["at_36864"], ctx.size(1 << 20, 4096)
    while n > base:
        try:
            largest = one(n)
            break
        except torch.OutOfMemoryError:
            out.setdefault("not_fitting", []).append(n)
            if ctx.device.type == "cuda":
                torch.cuda.empty_cache()
            n //= 2
    out["largest"] = largest
    del heads
    if ctx.device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def _synthetic_stores(tmp: Path, n: int, dims, captions=("caption",)):
    """image.h5 and text.h5 under tmp: n random fp16 rows (ids p0000000...), image dim dims[0], text
    dims[1] per caption field; text rows are a noisy copy of the image's first dims[1] columns, so heads can
    learn something."""
    import numpy as np

    from sail.data.store import StoreWriter

    rng = np.random.default_rng(0)
    ids = [f"p{i:07d}" for i in range(n)]
    image_w = StoreWriter(tmp / "image.h5", ids, {"image": dims[0]})
    text_w = StoreWriter(tmp / "text.h5", ids, {c: dims[1] for c in captions})
    for lo in range(0, n, 16384):
        m = min(16384, n - lo)
        image = rng.standard_normal((m, dims[0]), dtype=np.float32)
        image_w.write(lo, {"image": image.astype(np.float16)}, {"image": np.ones(m, bool)})
        texts = {c: (image[:, : dims[1]] + rng.standard_normal((m, dims[1]), dtype=np.float32)).astype(np.float16)
                 for c in captions}
        text_w.write(lo, texts, {c: np.ones(m, bool) for c in captions})
    image_w.finish({"model_id": "synthetic-image", "modality": "image"}, None, None, [])
    text_w.finish({"model_id": "synthetic-text", "modality": "text"}, None, None, [])


@section("loader")
def loader_vs_step(ctx: Context) -> dict:
    from sail.data.loader import PairedFeatures, StreamingBatches
    from sail.data.store import FeatureStore

    batch = ctx.size(36864, 256)
    n = 4 * batch
    tmp = Path(tempfile.mkdtemp(prefix="sail-gpu-bench-"))
    try:
        _synthetic_stores(tmp, n, ctx.dims)
        pairs = PairedFeatures.from_stores(FeatureStore(tmp / "image.h5"), FeatureStore(tmp / "text.h5"), ["caption"])
        batches = StreamingBatches(pairs, batch, seed=0, device=ctx.device)
        for _ in batches.epoch(0):  # first pass: warms the page cache
            pass
        ctx.sync()
        t0, seen = time.perf_counter(), 0
        for image, texts in batches.epoch(1):
            seen += image.shape[0]
        ctx.sync()
        pairs_s = seen / (time.perf_counter() - t0)
    finally:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    step = ctx.results.get("step", {}).get("at_36864", {})
    out = {"pairs_s": pairs_s, "batch": batch}
    if step:
        out["step_pairs_s"] = step["pairs_s"]
        out["loader_over_step"] = pairs_s / step["pairs_s"]
    return out


# ------------------------------------------------------------------------------------------ main


@section("cli")
def cli_runs(ctx: Context) -> dict:
    """`sail align` as a user runs it on this device: each loss, in memory and streamed, bf16 (auto), fp16
    (GradScaler, CUDA only) and fp32; then a streamed run stopped with Ctrl-C after its first checkpoint and
    resumed with --resume to its last step. Each must exit 0 (130 for the interrupt) with finite losses."""
    import subprocess

    n, batch, steps = ctx.size(65536, 512), ctx.size(8192, 128), 30
    tmp = Path(tempfile.mkdtemp(prefix="sail-gpu-cli-"))
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    # each run is a fresh process (CUDA start, kernel self-check: ~15 s on an H200), so few, chosen to cover
    # each loss, both batchers and each precision the device allows (fp32 is what the CPU tests run)
    runs = [("sigmoid", "no", "auto"), ("multi-positive", "no", "auto"), ("info-nce", "yes", "auto")]
    if ctx.device.type != "cuda":
        runs.append(("sigmoid", "yes", "fp32"))
    if ctx.device.type == "cuda":  # fp16 (with GradScaler) is CUDA-only by the precision policy
        runs.append(("sigmoid", "yes", "fp16"))
    out: dict = {}
    try:
        _synthetic_stores(tmp, n, ctx.dims[:2], captions=("caption", "long_caption"))
        cli = [sys.executable, "-c", "import sys; from sail.cli import main; sys.argv[0] = 'sail'; sys.exit(main())",
               "align", "--image", str(tmp / "image.h5"), "--text", str(tmp / "text.h5"), "--batch", str(batch),
               "--device", str(ctx.device), "--out-dim", str(ctx.dims[2]), "--val-fraction", "0.02",
               "--log-every", "10", "--checkpoint-every", "20", "--eval-every", "20"]

        def record(run_dir, rcs, stderr, t0):
            lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
                     if line.strip()] if (run_dir / "metrics.jsonl").exists() else []
            losses = [r["loss"] for r in lines if "loss" in r]
            r = {"rc": rcs, "seconds": round(time.perf_counter() - t0, 1),
                 "last_step": max((r.get("step", 0) for r in lines), default=0),
                 "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
                 "weights": (run_dir / "model.safetensors").exists()}
            if any(rc not in (0, 130) for rc in rcs) or not losses or not all(map(math.isfinite, losses)):
                r["error"] = (stderr.strip().splitlines() or ["(no stderr)"])[-1][:300]
            return r

        for i, (loss, in_memory, precision) in enumerate(runs):
            run_dir, t0 = tmp / f"run{i}", time.perf_counter()
            proc = subprocess.run(cli + ["--out", str(run_dir), "--loss", loss, "--in-memory", in_memory,
                                         "--precision", precision, "--steps", str(steps)],
                                  env=env, capture_output=True, text=True)
            out[f"{loss}_{'mem' if in_memory == 'yes' else 'stream'}_{precision}"] = record(run_dir, [proc.returncode], proc.stderr, t0)
        # Ctrl-C once the first checkpoint exists, then --resume with the same command: must reach the end
        run_dir, t0, long = tmp / "interrupted", time.perf_counter(), 10 * steps
        args = cli + ["--out", str(run_dir), "--in-memory", "no", "--steps", str(long)]
        first = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        while first.poll() is None and not (run_dir / "LATEST").exists():
            time.sleep(0.05)
        first.send_signal(signal.SIGINT)
        _, said = first.communicate()
        second = subprocess.run(args + ["--resume"], env=env, capture_output=True, text=True)
        r = record(run_dir, [first.returncode, second.returncode], second.stderr, t0)
        r["resumed_to_end"] = r["last_step"] == long and r["weights"]
        r["interrupt_said"] = (said.strip().splitlines() or [""])[-1][:200]
        if not r["resumed_to_end"]:
            r.setdefault("error", f"stopped at step {r['last_step']} of {long}")
        out["interrupt_resume_stream"] = r
    finally:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    failed = [k for k, v in out.items() if "error" in v]
    if failed:
        out["error"] = f"failed: {', '.join(failed)}"
    return out


@section("loss-kernel")
def loss_kernel_section(ctx: Context) -> dict:
    if ctx.device.type != "cuda":
        return {"skipped": "the Triton kernel's timing needs CUDA (its CPU tests use TRITON_INTERPRET=1)"}
    from gpu_kernel import loss_kernel

    return loss_kernel(sizes=ctx.kernel_sizes or (36864, 262144, 1048576), repeats=ctx.repeats,
                       peak=ctx.bf16_peak() if math.isfinite(ctx.bf16_peak()) else None)


@section("extraction")
def extraction_section(ctx: Context) -> dict:
    from gpu_extract import bench_extract

    return bench_extract(str(ctx.device), images=51200, quick=ctx.smoke)


def _flat(d, prefix=""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _flat(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def _stack(device_name: str) -> dict:
    """What the figures ran on: device, torch, triton, CUDA, driver, date, and the sail commit."""
    import datetime
    import subprocess

    def run(*cmd):
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            return None

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"device": device_name, "torch": torch.__version__, "triton": triton_version, "cuda": torch.version.cuda,
            "driver": run("nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"),
            "python": sys.version.split()[0], "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
                timespec="seconds"), "sail_commit": run("git", "-C", str(Path(__file__).resolve().parents[1]),
                                                        "rev-parse", "--short", "HEAD")}


def build_record(results: dict, device_name: str, command: str, seconds: float) -> dict:
    """The one record the README's GPU table is generated from (benchmarks/gpu_table.py): the stack, the run's bf16
    peak (gpu_kernel.bf16_matmul_peak), a row per peer measurement, and every section's figures as measured."""
    peers = results.get("peers", {})
    return {"benchmark": "gpu", "command": command, "seconds": round(seconds, 1), "stack": _stack(device_name),
            "bf16_peak_tflops": results.get("matmul", {}).get("bf16_tflops"),
            "bf16_peak_definition": "best median bf16 torch.mm over gpu_kernel.PEAK_SHAPES in this run",
            "peers": peers.get("rows", []), "peers_accuracy": peers.get("accuracy", {}),
            "peers_missing": peers.get("missing", {}), "siglip_kernel_best_backend": peers.get("siglip_kernel_best_backend"),
            "step": results.get("step", {}), "loader": results.get("loader", {}),
            "extraction": results.get("extraction", {}),
            "sections": {k: v for k, v in results.items() if k not in ("peers", "step", "loader", "extraction")}}


def write_record(path: Path, record: dict) -> None:
    """Write the record atomically (NaN becomes null: the file is strict JSON)."""
    from sail.core.artifacts import write_atomic

    write_atomic(path, json.dumps(json.loads(json.dumps(record, default=str).replace("NaN", "null")), indent=1) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default=None, help=f"comma-separated sections (default: all of {', '.join(SECTIONS)})")
    p.add_argument("--section", action="append", help="run only this section (repeatable; same as --only)")
    p.add_argument("--sizes", help="loss-kernel: comma-separated batch sizes (default 36864,262144,1048576)")
    p.add_argument("--repeats", type=int, default=3, help="loss-kernel: timed calls per configuration (median)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes on CPU: checks that every section runs")
    p.add_argument("--record", type=Path, default=None,
                   help="write the run's record here (default on CUDA: benchmarks/results/gpu.json; "
                        "regenerate the README table with benchmarks/gpu_table.py)")
    p.add_argument("--budget", type=float, default=480.0,
                   help="seconds: sections that would start later are skipped (default 480: a lent GPU allows 600 "
                        "per command)")
    p.add_argument("--merge", action="store_true",
                   help="keep the sections of the existing --record that this run does not redo")
    args = p.parse_args(argv)
    if args.record is None and not args.smoke:
        args.record = Path(__file__).resolve().parent / "results" / "gpu.json"
    if not args.smoke and not torch.cuda.is_available():
        print("benchmarks/gpu.py: no CUDA device here, nothing to measure (run it on a GPU machine; "
              "--smoke checks the script on CPU)")
        print(json.dumps({"benchmark": "gpu", "skipped": "no CUDA device"}))
        return 0
    device = torch.device("cpu" if args.smoke else "cuda")
    names = [n.strip() for n in args.only.split(",")] if args.only else list(ORDER)
    if args.section:
        names = args.section
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        print(f"error: unknown section(s) {', '.join(unknown)}; choose from {', '.join(ORDER)}", file=sys.stderr)
        return 2
    if not args.budget > 0:
        print(f"error: --budget must be a positive number of seconds, not {args.budget}", file=sys.stderr)
        return 2
    names = sorted(names, key=ORDER.index)
    earlier = _earlier_sections(args.record, args.merge)
    if isinstance(earlier, str):
        print(f"error: {earlier}", file=sys.stderr)
        return 2
    ctx = Context(device, args.smoke)
    ctx.kernel_sizes = tuple(int(s) for s in args.sizes.split(",")) if args.sizes else None
    ctx.repeats = args.repeats
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (smoke)"
    print(f"device: {name}, torch {torch.__version__}")
    start = time.perf_counter()
    ctx.deadline = start + PEERS_SHARE * args.budget
    command = ("python benchmarks/gpu.py " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    ctx.results.update({k: v for k, v in earlier.items() if k not in names})
    for n in names:
        t0 = time.perf_counter()
        if t0 - start > args.budget:
            ctx.results[n] = {"skipped": f"time budget: {args.budget:.0f} s spent before it started (--budget, --merge)"}
        else:
            try:
                ctx.results[n] = SECTIONS[n](ctx)
            except Exception as e:  # one failing section must not hide the others' figures
                ctx.results[n] = {"error": f"{type(e).__name__}: {e}"[:300]}
        print(f"[{n}] ({time.perf_counter() - t0:.0f} s)")
        for k, v in _flat(ctx.results[n]):
            if isinstance(v, list) and k.endswith("rows"):
                continue  # printed as a table by the section itself
            print(f"  {k:<32} {v:.4g}" if isinstance(v, float) and math.isfinite(v) else f"  {k:<32} {v}")
        if args.record is not None:  # after every section: a run killed at its time limit keeps what it measured
            record = build_record(ctx.results, name, command, time.perf_counter() - start)
            record["complete"] = n == names[-1]
            write_record(args.record, record)
    print(f"total {time.perf_counter() - start:.0f} s")
    clean = json.loads(json.dumps(ctx.results, default=str).replace("NaN", "null"))
    print(json.dumps({"benchmark": "gpu", "device": name, **clean}))
    if args.record is not None:
        print(f"record: {args.record}")
    return 1 if any("error" in r for r in ctx.results.values()) else 0


def _earlier_sections(path: Path | None, merge: bool) -> dict | str:
    """The sections of the record at `path` (for --merge), or {}; a string says why it cannot be merged."""
    if not merge:
        return {}
    if path is None or not path.exists():
        return f"--merge needs an existing --record to add to ({path} does not exist)"
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        return f"--merge: {path} is not a readable record ({e})"
    if not isinstance(old, dict) or old.get("benchmark") != "gpu":
        return f"--merge: {path} is not a benchmarks/gpu.py record"
    sections = dict(old.get("sections", {}))
    sections.update({k: old[k] for k in ("step", "loader", "extraction") if old.get(k)})
    if old.get("peers"):
        sections["peers"] = {"rows": old["peers"], "accuracy": old.get("peers_accuracy", {}),
                             "missing": old.get("peers_missing", {}),
                             "siglip_kernel_best_backend": old.get("siglip_kernel_best_backend")}
    return sections


if __name__ == "__main__":
    sys.exit(main())
