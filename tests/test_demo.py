"""The demo: the held-out colour x shape split of the sample, the seen/unseen evaluation checked against
a plain loop, and (slow) the real `sail demo` end to end."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sail.data import open_dataset
from sail.data.sample import CLASS_NAMES, COLOURS, SHAPES, UNSEEN
from sail.demo import evaluate_demo, results_table
from sail.encoders.extract import ExtractConfig, extract
from sail.train.align_heads import AlignConfig, align
from sail.train.model import SAILModel

ROOT = Path(__file__).resolve().parents[1]


def test_unseen_combinations_never_appear_in_training():
    assert len(UNSEEN) == 6 and {u.split()[0] for u in UNSEEN} == set(COLOURS) and {u.split()[1] for u in UNSEEN} == set(SHAPES)
    train, val = open_dataset("sample"), open_dataset("sample-val")
    assert len(train) == 480 and set(train.class_names) == set(CLASS_NAMES) - set(UNSEEN)
    for field in ("caption", "long_caption"):
        assert not any(u in text for text in train.captions[field] for u in UNSEEN)
    # every seen colour and every shape is still captioned, so unseen pairs are compositions of known words
    words = " ".join(train.captions["caption"])
    assert all(c in words for c in COLOURS) and all(s in words for s in SHAPES)
    assert len(val) == 240 and val.class_names == sorted(CLASS_NAMES)
    counts = np.bincount(val.labels, minlength=24)
    assert (counts == 10).all()
    assert not set(train.ids) & set(val.ids)


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory, tiny_vision, tiny_text):
    root = tmp_path_factory.mktemp("demo")
    stores = {}
    for data in ("sample", "sample-val"):
        for name, model in (("image", tiny_vision), ("text", tiny_text)):
            res = extract(ExtractConfig(model=str(model), data=data, out=str(root / f"{data}-{name}.h5"), workers=0,
                                        progress=False))
            stores[data, name] = str(res.path)
    run = root / "run"
    align(AlignConfig(image=stores["sample", "image"], text=stores["sample", "text"], out=str(run), head="linear",
                      out_dim=16, batch=240, steps=5, lr=1e-3, optimizer="adamw", captions=["long_caption", "caption"],
                      loss="multi-positive", val_fraction=0.1, progress=False))
    return run, stores


def test_seen_unseen_evaluation_matches_a_plain_loop(tiny_demo):
    run, stores = tiny_demo
    results, predictions = evaluate_demo(run, stores["sample-val", "image"], stores["sample-val", "text"])
    from sail.data.store import FeatureStore
    from sail.demo import DEMO_TEMPLATES

    model = SAILModel.from_pretrained(run, device="cpu")
    ds = open_dataset("sample-val")
    with FeatureStore(stores["sample-val", "image"]) as s:
        x = model.heads.encode_image(torch.from_numpy(s.read("image")).float()).double()
    with FeatureStore(stores["sample-val", "text"]) as s:
        y = model.heads.encode_text(torch.from_numpy(s.read("long_caption")).float()).double()
    classes = []
    for name in ds.class_names:  # mean of normalised template embeddings, renormalised
        e = torch.nn.functional.normalize(model.encode_text([t.format(name) for t in DEMO_TEMPLATES]).double(), dim=1)
        classes.append(torch.nn.functional.normalize(e.mean(0), dim=0))
    scores = x @ torch.stack(classes).T
    hits = {"seen": [], "unseen": []}
    for i, label in enumerate(ds.labels):
        part = "unseen" if ds.class_names[label] in UNSEEN else "seen"
        order = sorted(range(24), key=lambda c: -scores[i, c].item())
        hits[part].append((order[0] == label, label in order[:5]))
    for part, h in hits.items():
        assert results[f"{part}_images"] == len(h) == (60 if part == "unseen" else 180)
        assert results[f"zeroshot_{part}_top1"] == pytest.approx(100 * np.mean([a for a, _ in h]), abs=100 / len(h) + 1e-9)
        assert results[f"zeroshot_{part}_top5"] == pytest.approx(100 * np.mean([b for _, b in h]), abs=100 / len(h) + 1e-9)
    t2i = np.mean([int((y[i] @ x.T).argmax()) == i for i in range(240)]) * 100
    assert results["text_to_image_R@1"] == pytest.approx(t2i, abs=100 / 240 + 1e-9)
    assert results["chance_top1"] == pytest.approx(100 / 24) and results["chance_R@1"] == pytest.approx(100 / 240)
    assert predictions["zeroshot"]["labels"] == ds.labels.tolist() and len(predictions["zeroshot"]["top5"][0]) == 5
    assert predictions["retrieval"]["top5"][0][0] == int((y[0] @ x.T).argmax()) or \
        (y[0] @ x.T).topk(2).values.diff().abs().item() < 1e-4
    table = results_table(results)
    assert "unseen classes (60 img)" in table and f"{results['zeroshot_unseen_top1']:.1f}%" in table


@pytest.mark.slow
def test_make_demo_command_end_to_end(tmp_path):
    """`sail demo` on the real encoders from a clean directory: the table, the files, better than chance."""
    env = {**os.environ, "SAIL_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "sail.cli", "demo"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=1800)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "zero-shot top-1, unseen classes (60 img)" in out.stdout
    r = json.loads((tmp_path / "runs" / "demo" / "eval" / "demo.json").read_text())
    assert r["zeroshot_seen_top1"] > 3 * r["chance_top1"] and r["zeroshot_unseen_top1"] > 2 * r["chance_top1"]
    assert r["text_to_image_R@1"] > 5 * r["chance_R@1"]
    with open(tmp_path / "features" / "sample" / "efficientnet-lite0-128.h5", "rb"):
        pass
    from sail.data.store import FeatureStore

    with FeatureStore(tmp_path / "features" / "sample" / "efficientnet-lite0-128.h5") as s:
        assert s.attrs["model_id"] == "sail.encoders.zoo:efficientnet_lite0(image_size=128)" and s.dim("image") == 1280
