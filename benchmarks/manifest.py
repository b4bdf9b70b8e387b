"""Benchmark: opening a large manifest (sail.data.open_manifest) against reading it as rows of dicts.

    python benchmarks/manifest.py                 # 1,000,000 rows, CSV and Parquet
    python benchmarks/manifest.py --rows 10000000 # the 10M-row case (needs ~10 GB for the old path)

Writes a manifest with columns id, image, caption, long_caption, label (captions of ~60 and ~200
characters), then opens it in a fresh process per measurement, so each peak RSS is its own:
  new: sail.data.open_manifest (pyarrow typed columns -> the Dataset's lists);
  old: what sail did before (csv.DictReader / Table.to_pylist() rows of dicts, then the same lists).
Reported per format: seconds and peak RSS growth over the imports (MB), and the old/new ratios. Prints a table, then one JSON line.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def write_manifests(folder: Path, rows: int) -> dict:
    import numpy as np
    import pyarrow as pa
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    words = np.array("a red blue green cat dog sits on the grass near small large house tree car".split())
    def captions(n_words):
        idx = rng.integers(0, len(words), size=(rows, n_words))
        return [" ".join(r) for r in words[idx]]
    table = pa.table({"id": [f"{i:09d}" for i in range(rows)], "image": [f"images/{i:09d}.jpg" for i in range(rows)],
                      "caption": captions(12), "long_caption": captions(40),
                      "label": rng.integers(0, 1000, rows)})
    paths = {"csv": folder / "m.csv", "parquet": folder / "m.parquet"}
    pcsv.write_csv(table, paths["csv"])
    pq.write_table(table, paths["parquet"])
    return paths


def measure(which: str, path: str) -> None:
    """Runs in its own process: open the manifest one way, print seconds and peak RSS above the imports."""
    import csv

    import pyarrow.parquet as pq

    from sail.data import open_manifest

    with open("/proc/self/clear_refs", "w") as f:  # Linux: reset the peak (VmHWM) to the current RSS
        f.write("5")
    base_rss = _status_mb("VmRSS")
    start = time.perf_counter()
    if which == "new":
        ds = open_manifest(Path(path), ["caption", "long_caption"])
        n = len(ds)
    else:
        if path.endswith(".csv"):
            with open(path, newline="", encoding="utf-8") as f:
                rows = list(csv.DictReader(f))
        else:
            rows = pq.read_table(path).to_pylist()
        base = Path(path).parent
        ids = [str(r["id"]) for r in rows]
        images = [str(base / str(r["image"])) for r in rows]
        caps = {c: [str(r[c]) for r in rows] for c in ("caption", "long_caption")}
        n = len(ids) + 0 * len(images) + 0 * len(caps)
    seconds = time.perf_counter() - start
    print(json.dumps({"rows": n, "seconds": seconds, "peak_rss_mb": _status_mb("VmHWM") - base_rss}))


def _status_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":")) / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--one", nargs=2, metavar=("WHICH", "PATH"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        return measure(*args.one)
    results = {"rows": args.rows}
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_manifests(Path(tmp), args.rows)
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        print(f"{'format':<8} {'path':<4} {'seconds':>8} {'peak +MB':>8}")
        for fmt, path in paths.items():
            for which in ("new", "old"):
                out = subprocess.run([sys.executable, __file__, "--one", which, str(path)], env=env,
                                     capture_output=True, text=True, check=True).stdout
                r = json.loads(out.strip().splitlines()[-1])
                results[f"{fmt}_{which}_s"] = round(r["seconds"], 2)
                results[f"{fmt}_{which}_peak_mb"] = round(r["peak_rss_mb"])
                print(f"{fmt:<8} {which:<4} {r['seconds']:>8.2f} {r['peak_rss_mb']:>8.0f}")
            results[f"{fmt}_speedup"] = round(results[f"{fmt}_old_s"] / results[f"{fmt}_new_s"], 2)
            results[f"{fmt}_memory_ratio"] = round(results[f"{fmt}_old_peak_mb"] / results[f"{fmt}_new_peak_mb"], 2)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
