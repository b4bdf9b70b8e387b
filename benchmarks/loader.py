"""Benchmark: pairs/s that sail.data.loader delivers at SAIL's batch, against the time of one align step.

    python benchmarks/loader.py                       # 200k pairs, image 2048 / text 1024 fp16, B = 36864
    python benchmarks/loader.py --quick               # 50k pairs, B = 8192
    python benchmarks/loader.py --step-seconds 80     # compare with a step measured by benchmarks/align_step.py
    python benchmarks/loader.py --cold                # also evict the store files from the page cache first

Setup: two synthetic stores written with sail.data.store.StoreWriter into a temporary directory (deleted at
the end): an image store (field "image", 2048-d) and a text store (field "caption", 1024-d), float16,
the text store's ids shuffled against the image store's so PairedFeatures must join by id. The first
two feature columns encode the pair number (n // 1000, n % 1000, exact in float16), so every delivered
batch is checked to pair each image with its own text.

Measured:
- memory:    PairedFeatures.load (one-time, reported separately) then MemoryBatches: pairs/s of
             gathering shuffled batches out of the in-memory tensors (one epoch).
- streaming: StreamingBatches as `sail align` runs it (reused batch tensors), two epochs through one
             object: time to the first batch of each epoch (the reader thread runs on across epochs, so
             epoch 1 should not wait for a buffer fill again), pairs/s over both epochs, reader threads
             started, and the time spent reading stores before the gather (sail.data.loader._read_source: ~0
             for stores in StoreWriter's layout, gathered straight from the file mapping). With the default buffer
             (4 x 65536 rows) 200k pairs are ONE buffer, so every read is dense; "streaming/small" (blocks of
             B rows, 2 per buffer) makes the text rows of each buffer scattered over the text store (its
             order differs), the worst case.
Target: streaming >= 250k pairs/s on this CPU with the stores in the page cache (issue 8). pairs/cpu-s
(pairs per CPU-second of this process, all threads) is the same work measured without the time other
processes take from it: on a shared machine it is the figure to compare.
The files were just written, so reads come from the page cache unless --cold evicts them first
(posix_fadvise DONTNEED; what a dataset larger than RAM sees).

Verdict: the trainer waits for data when a batch takes longer to deliver than a step takes to train.
The step time is --step-seconds (benchmarks/align_step.py's step_s at this batch), or else estimated
from one step measured here at min(B, 4096) with align_step's phases: heads forward + backward scale
with B, the loss with B^2. Target: delivery per batch well under one step (memory and streaming), and
the streaming first-batch wait a small fraction of an epoch's training time. Prints a table, then one
JSON line.
"""

import argparse
import json
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import sail.data.loader as loader_mod
from sail.data.loader import MemoryBatches, PairedFeatures, StreamingBatches
from sail.data.store import FeatureStore, StoreWriter


def cpu_s() -> float:
    """CPU seconds of this process (all threads): work done, whatever else shares the machine."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def write_store(path: Path, ids: list[str], numbers: np.ndarray, field: str, dim: int, seed: int) -> None:
    """A complete store whose rows carry their pair number in columns 0 and 1; the rest is noise."""
    block = 16384
    noise = np.random.default_rng(seed).standard_normal((block, dim), dtype=np.float32).astype(np.float16)
    w = StoreWriter(path, ids, {field: dim})
    for lo in range(0, len(ids), block):
        x = noise[: min(block, len(ids) - lo)].copy()
        x[:, 0] = numbers[lo:lo + len(x)] // 1000
        x[:, 1] = numbers[lo:lo + len(x)] % 1000
        w.write(lo, {field: x}, {field: np.ones(len(x), bool)})
    w.finish({"model_id": f"synthetic-{field}", "modality": "image" if field == "image" else "text"}, None, None, [])


def evict(*paths: Path) -> None:
    """Drop the files' clean pages from the page cache (no root needed)."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def check(image: torch.Tensor, texts: list[torch.Tensor]) -> None:
    if not torch.equal(image[:, :2], texts[0][:, :2]):
        raise AssertionError("a batch paired images with the wrong texts")


def run_memory(pairs: PairedFeatures, batch: int) -> dict:
    t0 = time.perf_counter()
    image, texts = pairs.load("cpu")
    load_s = time.perf_counter() - t0
    batches = MemoryBatches(image, texts, batch, seed=0)
    cpu0 = cpu_s()
    times, t = [], time.perf_counter()
    for img, txt in batches.epoch(0):
        times.append(time.perf_counter() - t)
        check(img, txt)
        t = time.perf_counter()
    n = len(times) * batch
    return {"cpu_s": cpu_s() - cpu0, "pairs_per_cpu_s": n / (cpu_s() - cpu0), "load_s": load_s, "load_pairs_s": len(pairs) / load_s, "batches": len(times),
            "first_batch_s": times[0], "epoch_s": sum(times), "pairs_s": n / sum(times),
            "per_batch_s": sum(times) / len(times)}


def run_streaming(pairs: PairedFeatures, batch: int, block_rows: int = 65536, buffer_blocks: int = 4,
                  epochs: int = 2) -> dict:
    reads = []  # (field, rows, seconds) of each store read in the reader thread
    original = loader_mod._read_source

    def timed_read(store, field, rows, scratch, key):
        t = time.perf_counter()
        out = original(store, field, rows, scratch, key)
        reads.append((field, len(rows), time.perf_counter() - t))
        return out

    loader_mod._read_source = timed_read
    try:
        batches = StreamingBatches(pairs, batch, seed=0, block_rows=block_rows, buffer_blocks=buffer_blocks, reuse=True)
        times, firsts = [], []
        cpu0 = cpu_s()
        for epoch in range(epochs):
            t = time.perf_counter()
            for k, (img, txt) in enumerate(batches.epoch(epoch)):
                times.append(time.perf_counter() - t)
                if k == 0:
                    firsts.append(times[-1])
                check(img, txt)
                t = time.perf_counter()
        batches.close()
        cpu = cpu_s() - cpu0
    finally:
        loader_mod._read_source = original
    n = len(times) * batch
    read = {f: sum(s for g, _, s in reads if g == f) for f in dict.fromkeys(g for g, _, _ in reads)}
    rows = {f: sum(r for g, r, _ in reads if g == f) for f in read}
    return {"cpu_s": cpu, "pairs_per_cpu_s": n / cpu, "batches": len(times), "epochs": epochs, "first_batch_s": firsts[0], "first_batch_s_per_epoch": firsts,
            "epoch_s": sum(times) / epochs, "pairs_s": n / sum(times), "per_batch_s": sum(times) / len(times),
            "reader_starts": batches.reader_starts, "block_rows": block_rows, "buffer_rows": block_rows * buffer_blocks,
            "read_s": read, "read_rows_s": {f: rows[f] / read[f] for f in read}}


def step_seconds(batch: int) -> tuple[float, str]:
    """One align step at min(batch, 4096), extrapolated to `batch` (heads ~ B, loss ~ B^2)."""
    import align_step  # benchmarks/align_step.py, next to this file

    small = min(batch, 4096)
    r = align_step.measure(small, device="cpu")
    ph, k = r["phases_s"], batch / small
    est = (ph["heads_fwd"] + ph["backward"]) * k + ph["loss"] * k * k + ph["optimizer"]
    return est, f"estimated from a step at B = {small} ({r['step_s']:.2f} s) on cpu"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="short run: 50k pairs, B = 8192")
    p.add_argument("--pairs", type=int, default=200_000)
    p.add_argument("--batch", type=int, default=36864)
    p.add_argument("--image-dim", type=int, default=2048)
    p.add_argument("--text-dim", type=int, default=1024)
    p.add_argument("--step-seconds", type=float, default=0.0, help="align step time at --batch (0: estimate)")
    p.add_argument("--cold", action="store_true", help="also measure with the stores evicted from the page cache")
    p.add_argument("--dir", default=None, help="where to write the temporary stores (default: the temp dir)")
    args = p.parse_args(argv)
    if args.quick:
        args.pairs, args.batch = 50_000, 8192

    tmp = Path(tempfile.mkdtemp(prefix="sail-bench-loader-", dir=args.dir))
    try:
        n = args.pairs
        numbers = np.arange(n)
        order = np.random.default_rng(0).permutation(n)  # the text store holds the same ids, shuffled
        t0 = time.perf_counter()
        write_store(tmp / "image.h5", [f"p{i:07d}" for i in numbers], numbers, "image", args.image_dim, 1)
        write_store(tmp / "text.h5", [f"p{i:07d}" for i in order], order, "caption", args.text_dim, 2)
        write_s = time.perf_counter() - t0
        gb = n * (args.image_dim + args.text_dim) * 2 / 1e9
        print(f"{n} pairs, image {args.image_dim} / text {args.text_dim} float16 ({gb:.2f} GB), batch {args.batch}; "
              f"stores written in {write_s:.1f} s", flush=True)

        image_store, text_store = FeatureStore(tmp / "image.h5"), FeatureStore(tmp / "text.h5")
        t0 = time.perf_counter()
        pairs = PairedFeatures.from_stores(image_store, text_store, ["caption"])
        join_s = time.perf_counter() - t0
        small = dict(block_rows=args.batch, buffer_blocks=2)  # several buffers: scattered text rows
        runs = [("memory", lambda: run_memory(pairs, args.batch)),
                ("streaming", lambda: run_streaming(pairs, args.batch)),
                ("streaming/small", lambda: run_streaming(pairs, args.batch, **small))]
        results = {}
        for temp in ["warm"] + (["cold"] if args.cold else []):
            for name, fn in runs:
                if temp == "cold":
                    evict(tmp / "image.h5", tmp / "text.h5")
                results[f"{name}/{temp}"] = fn()
                print(f"{name}/{temp}: {results[f'{name}/{temp}']['pairs_s']:.0f} pairs/s", flush=True)
        image_store.close()
        text_store.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    peak_rss = rss_mb()  # before the step estimate below, which needs memory of its own
    if args.step_seconds > 0:
        step_s, source = args.step_seconds, "given (--step-seconds)"
    else:
        step_s, source = step_seconds(args.batch)

    print(f"\njoin by id: {join_s:.2f} s; align step at B = {args.batch}: {step_s:.1f} s ({source})")
    print(f"{'mode':<26} {'load s':>7} {'first s':>8} {'s/batch':>8} {'pairs/s':>10} {'pairs/cpu-s':>11} "
          f"{'batch/step':>10} {'read s img/txt':>15} {'wait/epoch':>10}")
    for name, r in results.items():
        r["batch_over_step"] = r["per_batch_s"] / step_s
        # the trainer waits for the first batch of every epoch, then only if a batch outlasts a step
        epoch_train_s = r["batches"] * step_s
        late = max(0.0, r["per_batch_s"] - step_s) * (r["batches"] - 1)
        r["epoch_wait_fraction"] = (r["first_batch_s"] + late) / epoch_train_s  # epoch 0: the worst
        load = f"{r['load_s']:.2f}" if "load_s" in r else "-"
        reads = "/".join(f"{v:.2f}" for v in r["read_s"].values()) if "read_s" in r else "-"
        print(f"{name:<26} {load:>7} {r['first_batch_s']:>8.3f} {r['per_batch_s']:>8.3f} {r['pairs_s']:>10.0f} "
              f"{r['pairs_per_cpu_s']:>11.0f} {r['batch_over_step']:>10.4f} {reads:>15} {r['epoch_wait_fraction']:>10.4f}")
    waits = {k: r["batch_over_step"] > 1 for k, r in results.items()}
    print("trainer waits for data (steady state): " +
          ", ".join(f"{k} {'YES' if v else 'no'}" for k, v in waits.items()))
    print("shortest step each keeps up with (s per batch delivered, epoch average): " +
          ", ".join(f"{k} {r['per_batch_s']:.3f}" for k, r in results.items()))
    print(f"peak RSS of the loader runs {peak_rss:.0f} MB")
    st = results["streaming/warm"]
    target = st["pairs_s"] >= 250_000
    print(f"streaming (page cache): {st['pairs_s']:.0f} pairs/s, {st['pairs_per_cpu_s']:.0f} pairs per CPU-second; "
          f"target 250k pairs/s: {'MET' if target else 'NOT MET'} "
          f"(load average {os.getloadavg()[0]:.1f}: on a busy machine compare with memory, "
          f"{st['pairs_s'] / results['memory/warm']['pairs_s']:.2f}x of it); first batch per epoch "
          + ", ".join(f"{x:.3f} s" for x in st["first_batch_s_per_epoch"]) + f"; reader threads started: {st['reader_starts']}")

    def rounded(v):
        if isinstance(v, dict):
            return {k: rounded(x) for k, x in v.items()}
        return float(f"{v:.4g}") if isinstance(v, float) else v

    print(json.dumps({"benchmark": "loader", "device": "cpu", "loadavg": round(os.getloadavg()[0], 2),
                      "pairs": n, "batch": args.batch,
                      "image_dim": args.image_dim, "text_dim": args.text_dim, "write_s": rounded(write_s),
                      "join_s": rounded(join_s), "step_s": rounded(step_s), "step_source": source,
                      "trainer_waits": waits, "target_250k_met": target, "peak_rss_mb": round(peak_rss), "results": rounded(results)}))


if __name__ == "__main__":
    main()
