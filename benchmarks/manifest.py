"""Benchmark: opening a large manifest (sail.data.open_manifest) against reading it as rows of dicts.

    python benchmarks/manifest.py                        # 100k and 1M rows, CSV and Parquet (~2 GB peak)
    python benchmarks/manifest.py --rows 10000000        # the 10M-row case (the old path needs ~15 GB)
    flock /tmp/sail-heavy.lock python benchmarks/manifest.py   # on a shared machine

Writes a manifest with columns id, image, caption, long_caption, label (captions of ~60 and ~200
characters, ~300 bytes per row as CSV), then opens it in a fresh process per measurement, so each peak
RSS is its own:
  new: sail.data.open_manifest (pyarrow typed columns kept as Arrow-backed TextColumns);
  old: what sail 0.1 did (csv.DictReader / Table.to_pylist() rows of dicts, then Python lists).
Per (rows, format, path): seconds and rows/s to open; peak RSS growth over the imports and RSS still
held once open, both in bytes per row next to the file's own bytes per row; for new, the cost of
reading one random caption (us). Prints a table, then one JSON line.
"""

import argparse
import gc
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
        return pa.array([" ".join(r) for r in words[idx]])
    table = pa.table({"id": [f"{i:09d}" for i in range(rows)], "image": [f"images/{i:09d}.jpg" for i in range(rows)],
                      "caption": captions(12), "long_caption": captions(40),
                      "label": rng.integers(0, 1000, rows)})
    paths = {"csv": folder / "m.csv", "parquet": folder / "m.parquet"}
    pcsv.write_csv(table, paths["csv"])
    pq.write_table(table, paths["parquet"])
    return paths


def measure(which: str, path: str) -> None:
    """Runs in its own process: open the manifest one way, print its figures as JSON."""
    import csv
    import random

    import pyarrow.compute  # noqa: F401  imported before the baseline, as sail imports them lazily
    import pyarrow.csv  # noqa: F401
    import pyarrow.parquet as pq

    from sail.data import open_manifest

    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:  # Linux: reset the peak (VmHWM) to the current RSS
        f.write("5")
    base_rss = _status_mb("VmRSS")
    start = time.perf_counter()
    if which == "new":
        ds = open_manifest(Path(path), ["caption", "long_caption"])
        n, caps = len(ds), ds.captions["caption"]
    else:
        if path.endswith(".csv"):
            with open(path, newline="", encoding="utf-8") as f:
                rows = list(csv.DictReader(f))
        else:
            rows = pq.read_table(path).to_pylist()
        base = Path(path).parent
        ids = [str(r["id"]) for r in rows]
        images = [str(base / str(r["image"])) for r in rows]
        captions = {c: [str(r[c]) for r in rows] for c in ("caption", "long_caption")}
        del rows  # 0.1 kept only the lists
        n, caps = len(ids) + 0 * len(images), captions["caption"]
    seconds = time.perf_counter() - start
    gc.collect()
    held, peak = _status_mb("VmRSS") - base_rss, _status_mb("VmHWM") - base_rss
    picks = [random.Random(0).randrange(n) for _ in range(100_000)]
    t = time.perf_counter()
    for i in picks:
        caps[i]
    get_us = (time.perf_counter() - t) / len(picks) * 1e6
    print(json.dumps({"rows": n, "seconds": seconds, "peak_rss_mb": peak, "held_rss_mb": held, "get_us": get_us}))


def _status_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":")) / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--one", nargs=2, metavar=("WHICH", "PATH"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        return measure(*args.one)
    results, summary = [], {}
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    print(f"{'rows':>9} {'format':<8} {'path':<4} {'seconds':>8} {'rows/s':>10} {'peak +MB':>9} {'peak B/row':>10} "
          f"{'held B/row':>10} {'file B/row':>10} {'get us':>7}")
    for rows in args.rows:
        with tempfile.TemporaryDirectory() as tmp:
            paths = write_manifests(Path(tmp), rows)
            for fmt, path in paths.items():
                file_bpr = path.stat().st_size / rows
                for which in ("new", "old"):
                    out = subprocess.run([sys.executable, __file__, "--one", which, str(path)], env=env,
                                         capture_output=True, text=True, check=True).stdout
                    r = json.loads(out.strip().splitlines()[-1])
                    rec = {"rows": rows, "format": fmt, "path": which, "seconds": round(r["seconds"], 3),
                           "rows_per_s": round(rows / r["seconds"]), "peak_mb": round(r["peak_rss_mb"]),
                           "peak_bytes_per_row": round(r["peak_rss_mb"] * 2**20 / rows),
                           "held_bytes_per_row": round(r["held_rss_mb"] * 2**20 / rows),
                           "file_bytes_per_row": round(file_bpr), "get_us": round(r["get_us"], 2)}
                    results.append(rec)
                    print(f"{rows:>9} {fmt:<8} {which:<4} {rec['seconds']:>8.2f} {rec['rows_per_s']:>10,} "
                          f"{rec['peak_mb']:>9} {rec['peak_bytes_per_row']:>10} {rec['held_bytes_per_row']:>10} "
                          f"{rec['file_bytes_per_row']:>10} {rec['get_us']:>7.2f}")
                new, old = results[-2], results[-1]
                summary[f"{fmt}_{rows}_speedup"] = round(old["seconds"] / new["seconds"], 2)
                summary[f"{fmt}_{rows}_peak_ratio"] = round(old["peak_bytes_per_row"] / max(1, new["peak_bytes_per_row"]), 2)
                summary[f"{fmt}_{rows}_held_ratio"] = round(old["held_bytes_per_row"] / max(1, new["held_bytes_per_row"]), 2)
    print(json.dumps({"benchmark": "manifest", **summary, "results": results}))


if __name__ == "__main__":
    main()
