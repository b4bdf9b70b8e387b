"""Benchmark: `sail curate` (dedup + balance) on synthetic web-like stores: rows/s per stage and peak RSS.

    python benchmarks/curate.py                   # 1M pairs, image 384 / text 384 fp16
    python benchmarks/curate.py --n 100000        # quicker
    python benchmarks/curate.py --dims 1024,768   # other encoder widths

Setup: two stores written with sail.data.store.StoreWriter into a temporary directory (deleted at the end), the
text store's ids in another order than the image store's (curation joins by id, like align). The pairs
are skewed the way web data is: 2000 concepts with Zipf(1.1) sizes (a few dominate), and --dup-fraction
of the rows near copies (noise 0.01) of earlier rows. Then `curate` runs dedup (T = 0.95, n/1000 clusters)
and balance (1000 concepts, at most n/2000 per concept) and the script prints, per stage, the seconds,
rows/s and counts, the whole run's rows/s and peak RSS (the process's maximum resident set, including
torch and faiss themselves, about 0.4 GiB), then one JSON line.

The stores were just written, so reads come from the page cache; on a shared machine the CPU seconds of
this process (`cpu_s`) are the figure to compare.
"""

import argparse
import json
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from sail.curate import CurateConfig, curate
from sail.data.store import StoreWriter


def write_stores(root: Path, n: int, dims: tuple[int, int], dup_fraction: float, seed: int = 0,
                 step: int = 65536) -> tuple[Path, Path]:
    """Skewed synthetic stores, written slab by slab (memory: one slab). Pair s is concept c(s) plus noise
    0.5 * (A[s % 4099] + B[s // 4099 % 4111]) from two fixed tables (so any row is computable alone, and no
    two of the first 16.8M pairs share both); a duplicate pair copies an earlier pair's vector plus 0.01 noise."""
    rng = np.random.default_rng(seed)
    concepts = 2000
    p = 1.0 / np.arange(1, concepts + 1) ** 1.1
    label = rng.choice(concepts, size=n, p=p / p.sum())
    source = np.arange(n)
    dup = np.flatnonzero(rng.random(n) < dup_fraction)
    source[dup] = (rng.random(len(dup)) * dup).astype(np.int64)
    tables = [(rng.standard_normal((concepts, d)), rng.standard_normal((4099, d)), rng.standard_normal((4111, d)))
              for d in dims]

    def vectors(k: int, pairs: np.ndarray) -> np.ndarray:
        c, a, b = tables[k]
        src = source[pairs]
        x = c[label[src]] + 0.5 * (a[src % 4099] + b[src // 4099 % 4111])
        jitter = np.random.default_rng([seed, k, int(pairs[0])]).standard_normal(x.shape)
        return (x + np.where((src != pairs)[:, None], 0.01, 0.0) * jitter).astype(np.float16)

    ids = np.array([f"s{i:08d}" for i in range(n)])
    order = rng.permutation(n)  # text store row r holds pair order[r]: the join must go by id
    attrs = {"model_revision": "bench", "pooling": "mean", "dtype": "float16", "preprocessing": "{}", "max_length": -1,
             "source": "synthetic", "source_hash": "0", "dataset": "bench", "sail_version": "bench"}
    for k, (path, field, rows, modality) in enumerate(((root / "img.h5", "image", np.arange(n), "image"),
                                                      (root / "txt.h5", "caption", order, "text"))):
        w = StoreWriter(path, list(ids[rows]), {field: dims[k]})
        for lo in range(0, n, step):
            hi = min(n, lo + step)
            w.write(lo, {field: vectors(k, rows[lo:hi])}, {field: np.ones(hi - lo, bool)})
        w.finish({**attrs, "model_id": f"bench-{modality}", "modality": modality, "dim": dims[k]}, None, None, [])
    return root / "img.h5", root / "txt.h5"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dims", default="384,384")
    ap.add_argument("--dup-fraction", type=float, default=0.2)
    ap.add_argument("--keep", help="write the stores here and keep them (default: a temporary directory)")
    args = ap.parse_args()
    dims = tuple(int(d) for d in args.dims.split(","))
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="sail-curate-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        img, txt = (root / "img.h5", root / "txt.h5") if (root / "txt.h5").exists() else \
            write_stores(root, args.n, dims, args.dup_fraction)
        written = time.perf_counter() - t0
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        report = curate(CurateConfig(image=str(img), text=str(txt), out=str(root / "kept.ids"), dedup=0.95,
                                     balance=1000, per_concept=max(1, args.n // 2000), progress=False))
        total = time.perf_counter() - t0
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        cpu = (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)
        rss_gib = r1.ru_maxrss / 2 ** 20
        print(f"stores: {args.n} pairs, dims {dims}, written in {written:.0f} s ({root})")
        print(f"{'stage':<8} {'in':>9} {'kept':>9} {'seconds':>8} {'rows/s':>9}")
        rows_in = report.pairs
        for s in report.stages:
            print(f"{s['stage']:<8} {rows_in:>9} {s['kept']:>9} {s['seconds']:>8.1f} {rows_in / s['seconds']:>9.0f}")
            rows_in = s["kept"]
        print(f"total: {report.pairs} pairs in {total:.1f} s = {report.pairs / total:.0f} rows/s "
              f"({cpu:.0f} cpu-s), peak RSS {rss_gib:.2f} GiB")
        print(json.dumps({"bench": "curate", "n": report.pairs, "dims": dims, "kept": report.kept, "seconds": round(total, 2),
                          "rows_per_s": round(report.pairs / total), "cpu_s": round(cpu, 1), "peak_rss_gib": round(rss_gib, 3),
                          "stages": {s["stage"]: {"kept": s["kept"], "seconds": s["seconds"]} for s in report.stages}}))
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
