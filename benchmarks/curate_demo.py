"""Shown, not claimed: raw vs curated training on a web-skewed set, with the demo's real encoders (issue 22).

    python benchmarks/curate_demo.py                      # features in features/, runs in runs/curate-demo
    python benchmarks/curate_demo.py --steps 300 --seed 1

1. The demo's stores (`sail demo`: EfficientNet-Lite0 + all-MiniLM-L6-v2 over `sample`, 480 renders of 18
   colour x shape classes, and `sample-val`, 240 held-out renders of 24 classes) are extracted (or reused).
2. A training set skewed the way web data is: 3 head classes (seeded) with every pair there 20 times (the
   original and 19 near copies: its image and text features plus 1 % Gaussian noise, as re-encoded or resized
   reposts are), and each other class cut to 4 pairs. Written as two new stores (same encoders' attributes).
3. `sail curate` on it: --dedup 0.95 --dedup-on both, then --balance 18 --per-concept 8.
4. Two `sail align` runs with the demo's settings (linear heads, multi-positive over long and short captions),
   the same number of steps and batch: one on the raw skewed set, one with --subset (the curated ids).
5. Both evaluated on sample-val exactly as `sail demo` does (zero-shot over all 24 classes, seen and unseen,
   and retrieval R@1), next to chance. Prints a table and one JSON line.
"""

import argparse
import json
import shutil
from pathlib import Path

import numpy as np

from sail.curate import CurateConfig, curate
from sail.data.store import FeatureStore, StoreWriter
from sail.demo import TEXT, VISION, _check_packages, demo_config, evaluate_demo
from sail.encoders.extract import ExtractConfig, extract
from sail.train.align_heads import align

HEADS, COPIES, TAIL = 3, 20, 4


def demo_stores(features_root: str) -> dict:
    stores = {}
    for data in ("sample", "sample-val"):
        for modality, model in (("image", VISION), ("text", TEXT)):
            res = extract(ExtractConfig(model=model, data=data, features_root=features_root, progress=False,
                                        columns=["caption", "long_caption"] if modality == "text" else None))
            stores[data, modality] = str(res.path)
    return stores


def skewed(image_store: str, text_store: str, out: Path, seed: int) -> tuple[str, str, dict]:
    """The skewed raw set of the module doc, as two stores in `out`; returns their paths and its make-up."""
    rng = np.random.default_rng(seed)
    si, st = FeatureStore(image_store), FeatureStore(text_store)
    labels = si.labels
    classes = np.unique(labels[labels >= 0])
    heads = rng.choice(classes, size=HEADS, replace=False)
    rows, copy = [], []
    for c in classes:
        members = np.flatnonzero(labels == c)
        if c in heads:
            rows += [r for r in members for _ in range(COPIES)]
            copy += [k for _ in members for k in range(COPIES)]
        else:
            rows += list(np.sort(rng.choice(members, size=min(TAIL, len(members)), replace=False)))
            copy += [0] * min(TAIL, len(members))
    rows, copy = np.array(rows), np.array(copy)
    ids = [f"{si.ids[r]}#{k}" for r, k in zip(rows, copy)]
    trows = st.row_of(si.ids[rows])

    def noisy(x):  # copy 0 is the original; the others carry 1 % noise (relative to each row's norm)
        x = x.astype(np.float32)
        scale = 0.01 * np.linalg.norm(x, axis=1, keepdims=True) / np.sqrt(x.shape[1])
        return (x + (copy > 0)[:, None] * scale * rng.standard_normal(x.shape)).astype(np.float16)

    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for store, name, rws, fields in ((si, "image.h5", rows, ["image"]), (st, "text.h5", trows, st.fields)):
        path = out / name
        path.unlink(missing_ok=True)
        w = StoreWriter(path, ids, {f: store.dim(f) for f in fields})
        w.write(0, {f: noisy(store.read(f, rws)) for f in fields}, {f: np.ones(len(ids), bool) for f in fields})
        attrs = {k: v for k, v in store.attrs.items() if k not in ("complete", "checksums", "nonfinite_rows", "fields", "created")}
        w.finish(attrs, labels[rows], si.class_names, [])
        paths.append(str(path))
    makeup = {"pairs": len(ids), "head_classes": [si.class_names[int(c)] for c in heads], "copies_per_head_pair": COPIES,
              "tail_pairs_per_class": TAIL}
    return paths[0], paths[1], makeup


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--features-root", default="features")
    ap.add_argument("--out", default="runs/curate-demo")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    _check_packages()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    stores = demo_stores(args.features_root)
    img, txt, makeup = skewed(stores["sample", "image"], stores["sample", "text"], out / "stores", args.seed)
    report = curate(CurateConfig(image=img, text=txt, out=str(out / "curated.ids"), dedup=0.95, dedup_on="both",
                                 balance=18, per_concept=8, seed=args.seed, progress=False))
    print(f"skewed training set: {makeup}")
    print(report.table())
    results = {}
    for name, subset in (("raw", None), ("curated", str(out / "curated.ids"))):
        cfg = demo_config({("sample", "image"): img, ("sample", "text"): txt, **{k: v for k, v in stores.items()
                                                                               if k[0] == "sample-val"}}, str(out / name))
        cfg.steps, cfg.batch, cfg.seed, cfg.subset, cfg.progress = args.steps, args.batch, args.seed, subset, False
        cfg.eval_every = cfg.checkpoint_every = args.steps
        align(cfg)
        results[name], _ = evaluate_demo(out / name, stores["sample-val", "image"], stores["sample-val", "text"])
    rows = [("zeroshot_seen_top1", "chance_top1"), ("zeroshot_unseen_top1", "chance_top1"),
            ("zeroshot_seen_top5", "chance_top5"), ("zeroshot_unseen_top5", "chance_top5"),
            ("text_to_image_R@1", "chance_R@1"), ("image_to_text_R@1", "chance_R@1")]
    print(f"\nheld-out sample-val, {args.steps} steps of batch {args.batch} each "
          f"(raw: {makeup['pairs']} pairs, curated: {report.kept})")
    print(f"  {'metric':<24}{'raw':>8}{'curated':>9}{'chance':>8}")
    for key, chance in rows:
        print(f"  {key:<24}{results['raw'][key]:>7.1f}%{results['curated'][key]:>8.1f}%{results['raw'][chance]:>7.1f}%")
    print(json.dumps({"bench": "curate_demo", "seed": args.seed, "steps": args.steps, "batch": args.batch,
                      "raw_pairs": makeup["pairs"], "curated_pairs": report.kept, "makeup": makeup,
                      **{f"{name}_{k}": round(v, 2) for name in results for k, v in results[name].items()
                         if isinstance(v, float)}}))


if __name__ == "__main__":
    main()
