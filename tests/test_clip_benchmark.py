"""CLIP_benchmark route: `sail.eval.clip_benchmark` registers model type "sail", and CLIP_benchmark's own
metric code run on our adapter gives `sail eval`'s numbers on the same data.

clip_benchmark is an optional extra; its metric modules need only torch, tqdm and scikit-learn, so
they run here even where its CLI's dependencies (open_clip, torchvision) are not installed.
"""

import sys
import types

import numpy as np
import pytest
import torch

from sail.core import metrics
from sail.core.errors import SailError
from sail.data import load_image, open_dataset
from sail.eval.tasks import retrieval, zeroshot
from sail.train.model import OpenCLIPAdapter, SAILModel

pytest.importorskip("clip_benchmark", reason="optional extra: pip install 'sail[clip-benchmark]'")
from clip_benchmark.metrics import zeroshot_classification as cb_zeroshot  # noqa: E402
from clip_benchmark.metrics import zeroshot_retrieval as cb_retrieval  # noqa: E402

from test_evaluate import trained  # noqa: E402,F401  (the module-scoped run fixture)


class _Images(torch.utils.data.Dataset):
    """What CLIP_benchmark's builders hand its metrics: (transformed image, label or captions)."""

    def __init__(self, refs, targets, transform, classes=None):
        self.refs, self.targets, self.transform, self.classes = refs, targets, transform, classes

    def __len__(self):
        return len(self.refs)

    def __getitem__(self, i):
        return self.transform(load_image(self.refs[i])), self.targets[i]


def _adapter(run):
    return OpenCLIPAdapter.create(SAILModel.from_pretrained(run, device="cpu"))


def test_clip_benchmark_zeroshot_equals_sail_eval(trained, tmp_path):
    from sail.eval.clip_benchmark import patch_metrics

    patch_metrics()  # as the launcher does: clip_benchmark 1.6.2's accuracy() fails under numpy 2
    ds = open_dataset("sample-val")
    templates = ["a photo of a {c}.", "a {c}."]
    (tmp_path / "t.txt").write_text("\n".join(templates) + "\n")
    ours = zeroshot(trained["run"], "sample-val", templates=str(tmp_path / "t.txt"), features_root=str(tmp_path / "f"),
                    device="cpu", progress=False)
    model, transform, tokenizer = _adapter(trained["run"])
    data = _Images(ds.images, ds.labels.tolist(), transform, ds.class_names)
    loader = torch.utils.data.DataLoader(data, batch_size=64, collate_fn=lambda b: (torch.stack([x for x, _ in b]), torch.tensor([y for _, y in b])))
    theirs = cb_zeroshot.evaluate(model, loader, tokenizer, ds.class_names, templates, "cpu", amp=False)
    # theirs: fractions; ours: percent. Ours embeds from the fp16 feature cache, theirs from pixels:
    # a near-tie may flip for one image of 240, no more.
    one = 100 / len(ds)
    assert 100 * theirs["acc1"] == pytest.approx(ours["top1"], abs=one + 1e-9)
    assert 100 * theirs["acc5"] == pytest.approx(ours["top5"], abs=one + 1e-9)
    assert 100 * theirs["mean_per_class_recall"] == pytest.approx(ours["mean_per_class_recall"], abs=24 * one / 10 + 1e-9)
    # with the same embeddings both codes agree exactly (no ties in float32 cosine here)
    x = torch.cat([model.encode_image(xb) for xb, _ in loader])
    classes = metrics.class_embeddings(lambda t: model.encode_text(tokenizer(t)), ds.class_names, templates)
    same = metrics.zeroshot(x, classes, torch.from_numpy(ds.labels))
    assert 100 * theirs["acc1"] == pytest.approx(same["top1"], abs=1e-9)
    assert 100 * theirs["acc5"] == pytest.approx(same["top5"], abs=1e-9)
    assert 100 * theirs["mean_per_class_recall"] == pytest.approx(same["mean_per_class_recall"], abs=1e-9)


def test_clip_benchmark_retrieval_equals_sail_eval(trained, tmp_path):
    # The sample repeats captions ("a red circle"): tied scores, which sail counts against the model and
    # CLIP_benchmark's topk breaks arbitrarily. Numbered captions make every score distinct.
    import csv

    ds = open_dataset("sample-val")
    n = 120
    captions = [[f"{ds.captions['caption'][i]} number {i}", f"{ds.captions['long_caption'][i]}, picture {i}"] for i in range(n)]
    with open(tmp_path / "m.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "image", "caption", "long_caption"])
        w.writerows([i, ds.images[i], *captions[i]] for i in range(n))
    ours = retrieval(trained["run"], str(tmp_path / "m.csv"), columns=["caption", "long_caption"],
                     features_root=str(tmp_path / "f"), device="cpu", progress=False)
    model, transform, tokenizer = _adapter(trained["run"])
    loader = torch.utils.data.DataLoader(_Images(ds.images[:n], captions, transform), batch_size=64,
                                         collate_fn=lambda b: (torch.stack([x for x, _ in b]), [c for _, c in b]))
    theirs = cb_retrieval.evaluate(model, loader, tokenizer, "cpu", amp=False, recall_k_list=[1, 5, 10])
    # the same embeddings through sail's metric: identical numbers
    x = torch.cat([model.encode_image(xb) for xb, _ in loader])
    y = model.encode_text(tokenizer([c for pair in captions for c in pair]))
    same = metrics.retrieval(x, y, torch.arange(n).repeat_interleave(2))
    for k in (1, 5, 10):  # their image_retrieval = text -> image; text_retrieval = image -> text
        assert 100 * theirs[f"image_retrieval_recall@{k}"] == pytest.approx(same[f"text_to_image_R@{k}"], abs=1e-4)
        assert 100 * theirs[f"text_retrieval_recall@{k}"] == pytest.approx(same[f"image_to_text_R@{k}"], abs=1e-4)
        # `sail eval` embeds from the fp16 feature cache: at most one near-tie flips per direction
        assert ours[f"text_to_image_R@{k}"] == pytest.approx(same[f"text_to_image_R@{k}"], abs=100 / (2 * n) + 1e-9)
        assert ours[f"image_to_text_R@{k}"] == pytest.approx(same[f"image_to_text_R@{k}"], abs=100 / n + 1e-9)


@pytest.fixture
def fake_open_clip(monkeypatch):
    """clip_benchmark.models imports open_clip at import time; a stub stands in where it is not installed."""
    for name in [m for m in sys.modules if m == "clip_benchmark.models" or m.startswith("clip_benchmark.models.")]:
        monkeypatch.delitem(sys.modules, name)
    try:
        import open_clip  # noqa: F401
    except ImportError:
        monkeypatch.setitem(sys.modules, "open_clip", types.ModuleType("open_clip"))


def test_launcher_registers_model_type_and_hands_over(trained, fake_open_clip, monkeypatch):
    from sail.eval import clip_benchmark as launcher

    launcher.register()
    import clip_benchmark.models as cb_models

    assert "sail" in cb_models.MODEL_TYPES and cb_models.TYPE2FUNC["sail"] is launcher.load_sail
    model, transform, tokenizer = cb_models.load_clip("sail", trained["run"], "run", None, "cpu")
    assert isinstance(model, OpenCLIPAdapter)
    want = SAILModel.from_pretrained(trained["run"], device="cpu").encode_text(["a red circle"])
    assert torch.allclose(model.encode_text(tokenizer(["a red circle"]).to("cpu")), want, atol=1e-6)
    assert model.logit_scale.item() == pytest.approx(model.model.heads.logit_scale.item())  # log t, as open_clip

    seen = {}
    fake_cli = types.ModuleType("clip_benchmark.cli")
    fake_cli.main = lambda: seen.setdefault("argv", list(sys.argv))
    monkeypatch.setitem(sys.modules, "clip_benchmark.cli", fake_cli)
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    assert launcher.main(["eval", "--model", trained["run"], "--dataset", "cifar10"]) == 0
    assert seen["argv"] == ["clip_benchmark", "eval", "--model", trained["run"], "--dataset", "cifar10",
                            "--model_type", "sail", "--pretrained", "run"]
    assert launcher.parse_pretrained("vision=/a,text=/b") == {"vision_model": "/a", "text_model": "/b"}
    with pytest.raises(SailError, match="vision=DIR"):
        launcher.parse_pretrained("laion400m_e32")
