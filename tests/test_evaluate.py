"""SAILModel, `sail eval` tasks and search, checked against the same numbers computed by hand."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from sail import metrics
from sail.align import AlignConfig, align
from sail.data import open_dataset
from sail.errors import SailError
from sail.evaluate import alignment, knn, linear_probe, retrieval, segmentation, winoground, zeroshot
from sail.extract import ExtractConfig, extract
from sail.model import SAILModel
from sail.store import FeatureStore


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_vision, tiny_text):
    """A run trained for a few steps on the sample with the tiny encoders, plus its stores."""
    root = tmp_path_factory.mktemp("eval")
    stores = {}
    for name, model in (("image", tiny_vision), ("text", tiny_text)):
        res = extract(ExtractConfig(model=str(model), data="sample", out=str(root / f"{name}.h5"), workers=0, progress=False))
        stores[name] = res.path
    run = root / "run"
    align(AlignConfig(image=str(stores["image"]), text=str(stores["text"]), out=str(run), head="mlp", width=2,
                      out_dim=16, batch=256, steps=30, lr=1e-3, optimizer="adamw", val_fraction=0.1,
                      eval_every=30, progress=False))
    return {"run": str(run), "root": root, **stores}


def test_sailmodel_matches_heads_on_stored_features(trained):
    model = SAILModel.from_pretrained(trained["run"])
    ds = open_dataset("sample")
    with FeatureStore(trained["image"]) as s_img, FeatureStore(trained["text"]) as s_txt:
        want_x = model.heads.encode_image(torch.from_numpy(s_img.read("image", [0, 1, 2])).float())
        want_y = model.heads.encode_text(torch.from_numpy(s_txt.read("caption", [0, 1, 2])).float())
    x = model.encode_image(ds.images[:3])
    y = model.encode_text(ds.captions["caption"][:3])
    assert x.shape == (3, 16) and torch.allclose(x.norm(dim=1), torch.ones(3), atol=1e-5)
    assert torch.allclose(x, want_x, atol=5e-3) and torch.allclose(y, want_y, atol=5e-3)
    p = model.similarity([Image.open(ds.images[0])], ds.captions["caption"][:2])
    manual = torch.sigmoid(model.heads.scale() * x[:1] @ y[:2].T + model.heads.logit_bias)
    assert p.shape == (1, 2) and torch.allclose(p, manual, atol=1e-4)


def test_sailmodel_local_override_and_mismatch(trained, tiny_vision, tmp_path):
    copy = tmp_path / "dino-copy"
    shutil.copytree(tiny_vision, copy)
    model = SAILModel.from_pretrained(trained["run"], vision_model=str(copy))
    assert model.encode_image([open_dataset("sample").images[0]]).shape == (1, 16)
    from sail.tiny import make_text_model

    other = make_text_model(tmp_path / "wide-bert", hidden=48)
    with pytest.raises(SailError, match="expects 32"):
        SAILModel.from_pretrained(trained["run"], text_model=str(other)).encode_text(["x"])
    with pytest.raises(SailError, match="not a sail run"):
        SAILModel.from_pretrained(tmp_path)


def test_zeroshot_equals_manual_pipeline(trained, tmp_path):
    templates = tmp_path / "t.txt"
    templates.write_text("a {}.\na photo of a {}.\n")
    res = zeroshot(trained["run"], "sample-val", templates=str(templates), features_root=str(tmp_path / "f"), progress=False)
    model = SAILModel.from_pretrained(trained["run"])
    ds = open_dataset("sample-val")
    x = model.encode_image(ds.images)
    classes = metrics.class_embeddings(model.encode_text, ds.class_names, ["a {}.", "a photo of a {}."])
    want = metrics.zeroshot(x, classes, torch.from_numpy(ds.labels))
    for k in ("top1", "top5", "mean_per_class_recall"):
        assert res[k] == pytest.approx(want[k], abs=100 / 240 + 1e-6)  # fp16 storage may flip a near-tie
    assert res["classes"] == 24 and res["images"] == 240 and res["chance_top1"] == pytest.approx(100 / 24)
    # cached: a second call reuses the store
    assert (tmp_path / "f" / "sample-val" / "tiny-dino.h5").exists()
    bad = tmp_path / "bad.txt"
    bad.write_text("a photo of a cat\n")
    with pytest.raises(SailError, match="placeholder|\\{\\}"):
        zeroshot(trained["run"], "sample-val", templates=str(bad), features_root=str(tmp_path / "f"), progress=False)


def test_zeroshot_refuses_unlabelled_data_and_foreign_stores(trained, tmp_path):
    rows = "id,image,caption\na,%s,x\n" % open_dataset("sample").images[0]
    (tmp_path / "m.csv").write_text(rows)
    with pytest.raises(SailError, match="no class labels"):
        zeroshot(trained["run"], str(tmp_path / "m.csv"), features_root=str(tmp_path / "f"), progress=False)
    with pytest.raises(SailError, match="differ"):
        zeroshot(trained["run"], "sample", image_store=trained["text"])


def test_retrieval_equals_manual_with_several_captions(trained, tmp_path):
    res = retrieval(trained["run"], "sample-val", columns=["caption", "long_caption"],
                    features_root=str(tmp_path / "f"), progress=False)
    model = SAILModel.from_pretrained(trained["run"])
    ds = open_dataset("sample-val")
    x = model.encode_image(ds.images)
    texts = [t for pair in zip(ds.captions["caption"], ds.captions["long_caption"]) for t in pair]
    y = model.encode_text(texts)
    want = metrics.retrieval(x, y, torch.arange(240).repeat_interleave(2))
    for k, v in want.items():
        assert res[k] == pytest.approx(v, abs=1.0)
    assert res["images"] == 240 and res["captions"] == 480


def test_retrieval_reads_coco_and_karpathy_json(trained, tmp_path):
    ds = open_dataset("sample-val")
    coco = {"images": [{"id": i, "file_name": ds.images[i]} for i in range(6)],
            "annotations": [{"image_id": i % 6, "caption": ds.captions["long_caption"][i % 6] + f" v{i}"} for i in range(12)]}
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    r = retrieval(trained["run"], str(tmp_path / "coco.json"), images_root="/", features_root=str(tmp_path / "f"), progress=False)
    assert r["images"] == 6 and r["captions"] == 12
    karpathy = {"images": [{"filename": ds.images[i], "filepath": "", "split": "test" if i < 4 else "train", "imgid": i,
                            "sentences": [{"raw": ds.captions["caption"][i]}, {"raw": ds.captions["long_caption"][i]}]}
                           for i in range(8)]}
    (tmp_path / "k.json").write_text(json.dumps(karpathy))
    r = retrieval(trained["run"], str(tmp_path / "k.json"), images_root="/", features_root=str(tmp_path / "f"), progress=False)
    assert r["images"] == 4 and r["captions"] == 8
    (tmp_path / "empty.json").write_text(json.dumps({"images": [], "annotations": []}))
    with pytest.raises(SailError, match="no images"):
        retrieval(trained["run"], str(tmp_path / "empty.json"), features_root=str(tmp_path / "f"), progress=False)


def test_winoground_equals_manual(trained, tmp_path):
    ds = open_dataset("sample-val")
    (tmp_path / "images").mkdir()
    examples = []
    for n in range(4):
        for k in range(2):
            shutil.copy(ds.images[2 * n + k], tmp_path / "images" / f"ex_{n}_img_{k}.png")
        examples.append({"id": n, "image_0": f"ex_{n}_img_0", "image_1": f"ex_{n}_img_1",
                         "caption_0": ds.captions["caption"][2 * n], "caption_1": ds.captions["caption"][2 * n + 1]})
    (tmp_path / "examples.jsonl").write_text("\n".join(json.dumps(e) for e in examples))
    res = winoground(trained["run"], str(tmp_path / "examples.jsonl"))
    model = SAILModel.from_pretrained(trained["run"])
    scores = torch.zeros(4, 2, 2)
    for n in range(4):
        x = model.encode_image([ds.images[2 * n], ds.images[2 * n + 1]])
        y = model.encode_text([ds.captions["caption"][2 * n], ds.captions["caption"][2 * n + 1]])
        scores[n] = x @ y.T
    want = metrics.winoground(scores)
    assert {k: res[k] for k in want} == pytest.approx(want) and res["examples"] == 4


def test_probes_and_alignment_on_stores(trained, tmp_path, tiny_vision):
    val = extract(ExtractConfig(model=str(tiny_vision), data="sample-val", out=str(tmp_path / "val.h5"), workers=0,
                                progress=False))
    lp = linear_probe(str(trained["image"]), str(val.path))
    assert 100 / 24 < lp["top1"] <= 100 and "best_weight_decay" in lp
    k = knn(str(trained["image"]), str(val.path), k=5)
    assert 0 <= k["top1"] <= 100
    projected = knn(str(trained["image"]), str(val.path), k=5, run=trained["run"])
    assert 0 <= projected["top1"] <= 100
    same = alignment(str(trained["image"]), str(trained["image"]))
    assert same["mutual_knn"] == pytest.approx(1.0)
    cross = alignment(str(trained["image"]), str(trained["text"]))
    assert 0 <= cross["mutual_knn"] < 1 and cross["samples"] == 480


def test_segmentation_on_rendered_masks(trained, tmp_path):
    ds = open_dataset("sample-val")
    (tmp_path / "img").mkdir()
    (tmp_path / "mask").mkdir()
    for i in range(4):
        im = Image.open(ds.images[i]).convert("RGB")
        shutil.copy(ds.images[i], tmp_path / "img" / f"{i}.png")
        arr = np.array(im).astype(int)
        mask = (np.abs(arr - arr[0, 0]).sum(2) > 60).astype(np.uint8)  # shape pixels = 1, background = 0
        Image.fromarray(mask).save(tmp_path / "mask" / f"{i}.png")
    (tmp_path / "classes.txt").write_text("background\nshape\n")
    res = segmentation(trained["run"], str(tmp_path / "img"), str(tmp_path / "mask"), str(tmp_path / "classes.txt"),
                       features_root=str(tmp_path / "f"), progress=False)
    assert 0 <= res["mIoU"] <= 100 and 0 <= res["pixel_accuracy"] <= 100 and res["images"] == 4
    with pytest.raises(SailError, match="no image"):
        segmentation(trained["run"], str(tmp_path / "img"), str(tmp_path / "img" / "nothing"), str(tmp_path / "classes.txt"))


def test_mask_transform_follows_processor():
    from sail.evaluate import _mask_like_processor

    mask = np.zeros((80, 120), np.uint8)
    mask[:, 60:] = 3                           # right half is class 3
    out = _mask_like_processor(Image.fromarray(mask), short=64, ch=56, cw=56)
    assert out.shape == (56, 56)
    # 80x120 -> 64x96, centre crop 56 keeps columns 20..75 of 96: the split at 48 lands at column 28
    assert (out[:, :28] == 0).all() and (out[:, 28:] == 3).all()


def test_index_and_search(trained, tmp_path):
    from sail.search import build_index, search

    meta = build_index(trained["run"], str(trained["image"]), str(tmp_path / "idx"))
    assert meta["size"] == 480
    hits = search(str(tmp_path / "idx"), "a red circle", k=5)
    assert [h["rank"] for h in hits] == [1, 2, 3, 4, 5]
    assert all(hits[i]["score"] >= hits[i + 1]["score"] for i in range(4))
    assert hits[0]["path"] and hits[0]["path"].endswith(".png")
    model = SAILModel.from_pretrained(trained["run"])
    with FeatureStore(trained["image"]) as s:
        row = s.row_of([hits[0]["id"]])
        x = model.heads.encode_image(torch.from_numpy(s.read("image", row)).float())
    assert float(x[0] @ model.encode_text(["a red circle"])[0]) == pytest.approx(hits[0]["score"], abs=1e-4)
    with pytest.raises(SailError, match="empty"):
        search(str(tmp_path / "idx"), "  ")
    with pytest.raises(SailError, match="not a sail index"):
        search(str(tmp_path), "x")


def test_missing_encoder_names_the_override(trained, tmp_path):
    import json as _json

    run = tmp_path / "moved"
    shutil.copytree(trained["run"], run)
    cfg = _json.loads((run / "config.json").read_text())
    cfg["image_encoder"]["model_id"] = "/nowhere/on/this/machine/dino"
    (run / "config.json").write_text(_json.dumps(cfg))
    with pytest.raises(SailError, match="vision_model="):
        SAILModel.from_pretrained(run).encode_image([open_dataset("sample").images[0]])


def test_open_clip_adapter_matches_sailmodel(trained):
    from sail.model import OpenCLIPAdapter

    model = SAILModel.from_pretrained(trained["run"])
    adapter, preprocess, tokenizer = OpenCLIPAdapter.create(model)
    images = [Image.open(p).convert("RGB") for p in open_dataset("sample").images[:3]]
    x = adapter.encode_image(torch.stack([preprocess(im) for im in images]))
    assert torch.allclose(x, model.encode_image(images), atol=1e-6)
    y = adapter.encode_text(tokenizer(["a red circle", "a blue cross"]).to("cpu"))
    assert torch.allclose(y, model.encode_text(["a red circle", "a blue cross"]), atol=1e-6)
    assert float(adapter.logit_scale.exp()) == pytest.approx(float(model.logit_scale))
