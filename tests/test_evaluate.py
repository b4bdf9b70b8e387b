"""SAILModel, `sail eval` tasks and search, checked against the same numbers computed by hand."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from sail.core import metrics
from sail.core.errors import SailError
from sail.data import open_dataset
from sail.data.store import FeatureStore
from sail.encoders.extract import ExtractConfig, extract
from sail.eval.tasks import alignment, knn, linear_probe, retrieval, segmentation, winoground, zeroshot
from sail.train.align_heads import AlignConfig, align
from sail.train.model import SAILModel


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
    t, b = model.heads.logit_scale.exp().item(), model.heads.logit_bias.item()
    manual = torch.sigmoid(t * x[:1] @ y[:2].T + b)
    assert p.shape == (1, 2) and torch.allclose(p, manual, atol=1e-4)
    # logit_scale is log t everywhere (CLIP's convention); t is scale()
    assert model.logit_scale.item() == pytest.approx(model.heads.logit_scale.item())
    assert float(model.scale()) == pytest.approx(t) and float(model.logit_scale.exp()) == pytest.approx(t)
    # an info-nce run never trained b: CLIP's softmax over the texts, b unused
    nce = SAILModel(model.heads, model.image_model, model.text_model, model.pooling, model.max_length, "cpu", loss="info-nce")
    z = (t * x[:1] @ y[:2].T).double()
    want = z.exp() / z.exp().sum()
    assert torch.allclose(nce.similarity([ds.images[0]], ds.captions["caption"][:2]).double(), want, atol=1e-4)


def test_sailmodel_local_override_and_mismatch(trained, tiny_vision, tmp_path):
    copy = tmp_path / "dino-copy"
    shutil.copytree(tiny_vision, copy)
    model = SAILModel.from_pretrained(trained["run"], vision_model=str(copy))
    assert model.encode_image([open_dataset("sample").images[0]]).shape == (1, 16)
    from sail.encoders.tiny import make_text_model

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
    # cached under FEATURES_ROOT/<dataset>-<source hash>/<model>-<identity hash>.h5; a second call reuses it
    stores = list((tmp_path / "f").glob("sample-val-*/tiny-dino-*.h5"))
    assert len(stores) == 1
    again = zeroshot(trained["run"], "sample-val", templates=str(templates), features_root=str(tmp_path / "f"), progress=False)
    assert again == res and list((tmp_path / "f").glob("sample-val-*/tiny-dino-*.h5")) == stores
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


def test_retrieval_cache_is_keyed_by_the_captions(trained, tmp_path):
    # 0.1 reused the long captions' store for a later --columns caption run and reported its numbers
    shared = str(tmp_path / "f")
    long = retrieval(trained["run"], "sample-val", columns=["long_caption"], features_root=shared, progress=False)
    short = retrieval(trained["run"], "sample-val", columns=["caption"], features_root=shared, progress=False)
    fresh = retrieval(trained["run"], "sample-val", columns=["caption"], features_root=str(tmp_path / "g"), progress=False)
    assert short == fresh and short != long
    assert len(list((tmp_path / "f").glob("sample-val-captions-*/tiny-bert-*.h5"))) == 2


def test_two_datasets_named_val_do_not_collide(trained, tmp_path):
    ds = open_dataset("sample-val")
    for n, (a, b) in enumerate(((0, 48), (48, 96))):
        folder = tmp_path / f"set{n}" / "val"
        for i in range(a, b):
            (folder / ds.class_names[ds.labels[i]]).mkdir(parents=True, exist_ok=True)
            shutil.copy(ds.images[i], folder / ds.class_names[ds.labels[i]] / f"{i}.png")
    shared = str(tmp_path / "f")
    first = zeroshot(trained["run"], str(tmp_path / "set0" / "val"), features_root=shared, progress=False)
    second = zeroshot(trained["run"], str(tmp_path / "set1" / "val"), features_root=shared, progress=False)
    assert second == zeroshot(trained["run"], str(tmp_path / "set1" / "val"), features_root=str(tmp_path / "g"), progress=False)
    assert first["images"] == second["images"] == 48
    assert len(list((tmp_path / "f").glob("val-*/tiny-dino-*.h5"))) == 2


def test_extract_rerun_with_other_settings_refuses(tmp_path, tiny_vision, tiny_text):
    text = str(tmp_path / "text.h5")
    extract(ExtractConfig(model=str(tiny_text), data="sample-val", columns=["caption"], out=text, progress=False))
    again = extract(ExtractConfig(model=str(tiny_text), data="sample-val", columns=["caption"], out=text, progress=False))
    assert again.already_complete
    with pytest.raises(SailError, match="max_length: None there, 8 here"):
        extract(ExtractConfig(model=str(tiny_text), data="sample-val", columns=["caption"], out=text, max_length=8, progress=False))
    with pytest.raises(SailError, match="fields"):
        extract(ExtractConfig(model=str(tiny_text), data="sample-val", columns=["long_caption"], out=text, progress=False))
    image = str(tmp_path / "image.h5")
    extract(ExtractConfig(model=str(tiny_vision), data="sample-val", out=image, workers=0, progress=False))
    with pytest.raises(SailError, match="patch_tokens: False there, True here"):
        extract(ExtractConfig(model=str(tiny_vision), data="sample-val", out=image, patch_tokens=True, workers=0, progress=False))
    with pytest.raises(SailError, match="pooling"):
        extract(ExtractConfig(model=str(tiny_vision), data="sample-val", out=image, pooling="cls", workers=0, progress=False))
    # a local encoder whose weights changed (same sizes) is another encoder
    copy = tmp_path / "dino-copy"
    shutil.copytree(tiny_vision, copy)
    moved = str(tmp_path / "moved.h5")
    extract(ExtractConfig(model=str(copy), data="sample-val", out=moved, workers=0, progress=False))
    weights = next(copy.glob("*.safetensors"))
    blob = bytearray(weights.read_bytes())
    blob[-1] ^= 1
    weights.write_bytes(bytes(blob))
    with pytest.raises(SailError, match="model_revision"):
        extract(ExtractConfig(model=str(copy), data="sample-val", out=moved, workers=0, progress=False))


def test_model_revision_is_the_hub_commit_or_a_content_hash(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from sail.encoders import model_revision

    snap = tmp_path / "hub" / "models--org--enc" / "snapshots" / "0123abcd"
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    (tmp_path / "hub" / "models--org--enc" / "refs").mkdir()
    (tmp_path / "hub" / "models--org--enc" / "refs" / "main").write_text("0123abcd")  # as the hub cache keeps it
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert model_revision("org/enc") == "hub:0123abcd"
    assert model_revision("org/never-downloaded") == "hub:unknown"
    local = tmp_path / "local"
    local.mkdir()
    (local / "w.bin").write_bytes(b"ab")
    before = model_revision(str(local))
    (local / "w.bin").write_bytes(b"ba")
    assert before.startswith("local:") and model_revision(str(local)) != before


def test_streamed_image_embeddings_skip_unreadable(trained, tmp_path):
    from sail.eval.tasks import stream_image_embeddings

    model = SAILModel.from_pretrained(trained["run"], device="cpu")
    refs = open_dataset("sample-val").images[:5]
    (tmp_path / "bad.png").write_bytes(b"not an image")
    emb, rows = stream_image_embeddings(model, refs[:2] + [str(tmp_path / "bad.png")] + refs[2:], batch_size=2, progress=False)
    assert rows.tolist() == [0, 1, 3, 4, 5]
    assert torch.allclose(emb, model.encode_image(refs), atol=1e-6)


def write_clip_benchmark(root, split, samples, kind="classification"):
    """CLIP_benchmark's webdataset layout: ROOT/SPLIT/{0,1}.tar + nshards.txt; samples = (png path, .cls or .txt)."""
    import tarfile

    (root / split).mkdir(parents=True)
    half = (len(samples) + 1) // 2
    for k, part in enumerate((samples[:half], samples[half:])):
        with tarfile.open(root / split / f"{k}.tar", "w") as tar:
            for j, (png, target) in enumerate(part):
                key = f"s{k}{j:05d}"
                for ext, payload in (("png", open(png, "rb").read()), ("cls" if kind == "classification" else "txt",
                                                                         str(target).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, __import__("io").BytesIO(payload))
    (root / split / "nshards.txt").write_text("2\n")
    if kind != "classification":
        (root / "dataset_type.txt").write_text(kind + "\n")


def test_zeroshot_and_retrieval_read_clip_benchmark_folders(trained, tmp_path):
    ds = open_dataset("sample-val")
    root = tmp_path / "wds_shapes"
    write_clip_benchmark(root, "test", [(ds.images[i], ds.labels[i]) for i in range(60)])
    write_clip_benchmark(root, "train", [(ds.images[i], ds.labels[i]) for i in range(60, 100)])
    (root / "classnames.txt").write_text("\n".join(ds.class_names) + "\n")
    templates = ["a drawing of a {c}.", "a {c} shape."]
    (root / "zeroshot_classification_templates.txt").write_text("\n".join(templates) + "\n")
    res = zeroshot(trained["run"], str(root), features_root=str(tmp_path / "f"), progress=False)
    model = SAILModel.from_pretrained(trained["run"])
    x = model.encode_image(ds.images[:60])
    classes = metrics.class_embeddings(model.encode_text, ds.class_names, templates)  # the folder's own templates
    want = metrics.zeroshot(x, classes, torch.from_numpy(ds.labels[:60]))
    for k in ("top1", "top5"):
        assert res[k] == pytest.approx(want[k], abs=100 / 60 + 1e-6)  # fp16 storage may flip a near-tie
    assert res["images"] == 60 and res["templates"] == 2 and res["classes"] == 24
    assert zeroshot(trained["run"], str(root), split="train", features_root=str(tmp_path / "f"), progress=False)["images"] == 40
    # a retrieval folder (captions one per line in KEY.txt) scores as the same data given as a manifest
    ret = tmp_path / "wds_captions"
    pairs = [(ds.captions["caption"][i], ds.captions["long_caption"][i]) for i in range(50)]
    write_clip_benchmark(ret, "test", [(ds.images[i], "\n".join(pairs[i])) for i in range(50)], kind="retrieval")
    rows = "\n".join(f"{i},{ds.images[i]},{pairs[i][0]},{pairs[i][1]}" for i in range(50))
    (tmp_path / "m.csv").write_text("id,image,caption,long_caption\n" + rows + "\n")
    from_folder = retrieval(trained["run"], str(ret), features_root=str(tmp_path / "f"), progress=False)
    from_manifest = retrieval(trained["run"], str(tmp_path / "m.csv"), features_root=str(tmp_path / "f"), progress=False)
    assert from_folder == from_manifest and from_folder["captions"] == 100
    with pytest.raises(SailError, match="retrieval dataset"):
        zeroshot(trained["run"], str(ret), features_root=str(tmp_path / "f"), progress=False)
    with pytest.raises(SailError, match="dataset_type.txt says retrieval"):
        retrieval(trained["run"], str(root), features_root=str(tmp_path / "f"), progress=False)


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


def test_probes_and_alignment_on_stores(trained, tmp_path, tiny_vision, monkeypatch):
    val = extract(ExtractConfig(model=str(tiny_vision), data="sample-val", out=str(tmp_path / "val.h5"), workers=0,
                                progress=False))
    with FeatureStore(trained["image"]) as tr, FeatureStore(str(val.path)) as te:
        xtr, ytr = tr.read("image").astype(np.float64), tr.labels
        xte, yte = te.read("image").astype(np.float64), te.labels
    # the task hands exactly the stores' labelled rows to metrics.linear_probe (tested in test_metrics)
    seen = {}
    monkeypatch.setattr(metrics, "linear_probe", lambda *args, **kw: seen.update(args=args, kw=kw) or {"top1": 1.0})
    assert linear_probe(str(trained["image"]), str(val.path), seed=3, device="cpu") == {"top1": 1.0}
    got_xtr, got_ytr, got_xte, got_yte = seen["args"]
    assert torch.equal(got_xtr, torch.from_numpy(xtr).float()) and got_ytr.tolist() == ytr.tolist()
    assert torch.equal(got_xte, torch.from_numpy(xte).float()) and got_yte.tolist() == yte.tolist()
    assert seen["kw"] == {"seed": 3, "progress": True} and got_xtr.device.type == "cpu"
    monkeypatch.undo()
    assert knn(str(trained["image"]), str(val.path), k=5, device="cpu") == pytest.approx(hand_knn(xtr, ytr, xte, yte, 5), abs=1e-9)
    model = SAILModel.from_pretrained(trained["run"])
    ptr = model.heads.encode_image(torch.from_numpy(xtr).float()).detach().double().numpy()
    pte = model.heads.encode_image(torch.from_numpy(xte).float()).detach().double().numpy()
    projected = knn(str(trained["image"]), str(val.path), k=5, run=trained["run"], device="cpu")
    assert projected == pytest.approx(hand_knn(ptr, ytr, pte, yte, 5), abs=1e-9)
    same = alignment(str(trained["image"]), str(trained["image"]))
    assert same["mutual_knn"] == pytest.approx(1.0)
    cross = alignment(str(trained["image"]), str(trained["text"]))
    assert 0 <= cross["mutual_knn"] < 1 and cross["samples"] == 480


def hand_knn(xtr, ytr, xte, yte, k, temperature=0.07):
    """DINO's weighted kNN, one test row at a time in float64 (ties: the true class loses)."""
    xtr = xtr / np.linalg.norm(xtr, axis=1, keepdims=True)
    xte = xte / np.linalg.norm(xte, axis=1, keepdims=True)
    n_classes = int(max(ytr.max(), yte.max())) + 1
    top1 = top5 = 0
    for u, y in zip(xte, yte):
        sims = xtr @ u
        votes = np.zeros(n_classes)
        for j in np.argsort(-sims, kind="stable")[:k]:
            votes[ytr[j]] += np.exp(sims[j] / temperature)
        rank = int((votes >= votes[y]).sum()) - 1
        top1, top5 = top1 + (rank < 1), top5 + (rank < 5)
    return {"top1": 100.0 * top1 / len(yte), "top5": 100.0 * top5 / len(yte)}


def reference_segmentation(model, image_path, class_emb, short, window, stride):
    """SAIL's slide inference written out for a square image whose windows are patch multiples."""
    import torch.nn.functional as F

    image = Image.open(image_path).convert("RGB")
    w0, h0 = image.size
    proc = model.vision.processor
    x = np.asarray(image.resize((short, short), Image.BILINEAR), dtype=np.float32) / 255.0
    x = torch.from_numpy((x - np.array(proc.image_mean, np.float32)) / np.array(proc.image_std, np.float32)).permute(2, 0, 1)
    n_classes, patch = class_emb.shape[0], model.vision.model.config.patch_size
    total, count = torch.zeros(n_classes, short, short), torch.zeros(short, short)
    starts = list(range(0, short - window + 1, stride))
    for y1 in starts:
        for x1 in starts:
            hidden = model.vision.model(pixel_values=x[None, :, y1:y1 + window, x1:x1 + window]).last_hidden_state[0]
            cls, tokens = hidden[0], hidden[1:]                     # (H,), (P, H)
            emb = model.heads.encode_image(torch.cat([cls.expand_as(tokens), tokens], 1))
            g = window // patch
            logits = (emb @ class_emb.T).T.reshape(1, n_classes, g, g)
            total[:, y1:y1 + window, x1:x1 + window] += F.interpolate(logits, size=(window, window), mode="bilinear")[0]
            count[y1:y1 + window, x1:x1 + window] += 1
    full = F.interpolate((total / count)[None], size=(h0, w0), mode="bilinear")[0]
    return full.argmax(0).numpy()


def hand_iou(preds, masks, n_classes, ignore=255):
    inter, union = np.zeros(n_classes), np.zeros(n_classes)
    for pred, mask in zip(preds, masks):
        valid = mask != ignore
        for c in range(n_classes):
            inter[c] += ((pred == c) & (mask == c) & valid).sum()
            union[c] += (((pred == c) | (mask == c)) & valid).sum()
    iou = [100.0 * i / u if u else None for i, u in zip(inter, union)]
    return iou, float(np.mean([v for v in iou if v is not None]))


@pytest.mark.parametrize("reduce_zero_label", [False, True])
def test_segmentation_equals_hand_computation(trained, tmp_path, reduce_zero_label):
    from sail.eval.templates import load_templates

    ds = open_dataset("sample-val")
    (tmp_path / "img").mkdir()
    (tmp_path / "mask").mkdir()
    raw_masks = []
    for i in range(3):
        shutil.copy(ds.images[i], tmp_path / "img" / f"{i}.png")
        arr = np.array(Image.open(ds.images[i]).convert("RGB")).astype(int)
        mask = np.where(np.abs(arr - arr[0, 0]).sum(2) > 60, 1, 0).astype(np.uint8)  # shape 1, background 0
        mask[:, :20] = np.where(mask[:, :20] == 1, 2, mask[:, :20])                   # a third class on the left
        mask[:4] = 255                                                                 # a border never scored
        Image.fromarray(mask).save(tmp_path / "mask" / f"{i}.png")
        raw_masks.append(mask.astype(np.int64))
    names = ["shape", "left shape"] if reduce_zero_label else ["background", "shape", "left shape"]
    (tmp_path / "classes.txt").write_text("\n".join(names) + "\n")
    res = segmentation(trained["run"], str(tmp_path / "img"), str(tmp_path / "mask"), str(tmp_path / "classes.txt"),
                       templates="imagenet", short_side=56, window=28, stride=14, reduce_zero_label=reduce_zero_label,
                       progress=False, device="cpu")
    model = SAILModel.from_pretrained(trained["run"], device="cpu")
    class_emb = metrics.class_embeddings(model.encode_text, names, load_templates("imagenet")).float()
    with torch.no_grad():
        preds = [reference_segmentation(model, tmp_path / "img" / f"{i}.png", class_emb, 56, 28, 14) for i in range(3)]
    masks = [np.where((m == 0) | (m == 255), 255, m - 1) if reduce_zero_label else m for m in raw_masks]
    iou, miou = hand_iou(preds, masks, len(names))
    assert res["mIoU"] == pytest.approx(miou, abs=1e-6) and res["images"] == 3 and res["classes"] == len(names)
    assert list(res["per_class_iou"]) == names
    assert list(res["per_class_iou"].values()) == pytest.approx(iou, abs=1e-6)
    if not reduce_zero_label:  # masks with label 2 against two names: the hint names --reduce-zero-label
        (tmp_path / "two.txt").write_text("shape\nleft shape\n")
        with pytest.raises(SailError, match="reduce-zero-label"):
            segmentation(trained["run"], str(tmp_path / "img"), str(tmp_path / "mask"), str(tmp_path / "two.txt"), progress=False)
    with pytest.raises(SailError, match="no image"):
        segmentation(trained["run"], str(tmp_path / "img"), str(tmp_path / "img" / "nothing"), str(tmp_path / "classes.txt"))


def test_index_and_search(trained, tmp_path):
    from sail.eval.search import build_index, search

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
    from sail.train.model import OpenCLIPAdapter

    model = SAILModel.from_pretrained(trained["run"])
    adapter, preprocess, tokenizer = OpenCLIPAdapter.create(model)
    images = [Image.open(p).convert("RGB") for p in open_dataset("sample").images[:3]]
    x = adapter.encode_image(torch.stack([preprocess(im) for im in images]))
    assert torch.allclose(x, model.encode_image(images), atol=1e-6)
    y = adapter.encode_text(tokenizer(["a red circle", "a blue cross"]).to("cpu"))
    assert torch.allclose(y, model.encode_text(["a red circle", "a blue cross"]), atol=1e-6)
    assert adapter.logit_scale.exp().item() == pytest.approx(model.scale().item())  # log t, as open_clip


def test_eval_data_in_another_encoding(trained, tmp_path, capsys):
    """A latin-1 manifest / JSON / JSONL: one error line naming the file and line without --encoding, and
    with it exactly the result of the same data saved as UTF-8."""
    from sail.cli import main

    ds = open_dataset("sample-val")
    rows = [f"{i},{ds.images[i]},{ds.captions['caption'][i]}{' café' if i >= 2 else ''},{ds.class_names[ds.labels[i]]}"
            for i in range(40)]
    text = "id,image,caption,label\n" + "\n".join(rows) + "\n"  # the first é is on line 4
    (tmp_path / "u.csv").write_bytes(text.encode("utf-8"))
    (tmp_path / "l.csv").write_bytes(text.encode("latin-1"))
    f = str(tmp_path / "f")
    for task in (zeroshot, retrieval):
        with pytest.raises(SailError, match=r"l\.csv:4 is not utf-8 text .*--encoding"):
            task(trained["run"], str(tmp_path / "l.csv"), features_root=f, progress=False)
        assert (task(trained["run"], str(tmp_path / "l.csv"), features_root=f, progress=False, encoding="latin-1")
                == task(trained["run"], str(tmp_path / "u.csv"), features_root=f, progress=False))
    coco = json.dumps({"images": [{"id": i, "file_name": ds.images[i]} for i in range(6)],
                       "annotations": [{"image_id": i, "caption": f"{ds.captions['caption'][i]} café"} for i in range(6)]},
                      ensure_ascii=False, indent=1)
    (tmp_path / "u.json").write_bytes(coco.encode("utf-8"))
    (tmp_path / "l.json").write_bytes(coco.encode("latin-1"))
    line = coco[:coco.index("café")].count("\n") + 1
    with pytest.raises(SailError, match=rf"l\.json:{line} is not utf-8 text"):
        retrieval(trained["run"], str(tmp_path / "l.json"), images_root="/", features_root=f, progress=False)
    assert (retrieval(trained["run"], str(tmp_path / "l.json"), images_root="/", features_root=f, progress=False,
                      encoding="latin-1")
            == retrieval(trained["run"], str(tmp_path / "u.json"), images_root="/", features_root=f, progress=False))
    (tmp_path / "images").mkdir()
    examples = []
    for n in range(2):
        for k in range(2):
            shutil.copy(ds.images[2 * n + k], tmp_path / "images" / f"ex_{n}_img_{k}.png")
        examples.append(json.dumps({"id": n, "image_0": f"ex_{n}_img_0", "image_1": f"ex_{n}_img_1",
                                    "caption_0": f"{ds.captions['caption'][2 * n]} é",
                                    "caption_1": ds.captions["caption"][2 * n + 1]}, ensure_ascii=False))
    (tmp_path / "u.jsonl").write_bytes("\n".join(examples).encode("utf-8"))
    (tmp_path / "l.jsonl").write_bytes("\n".join(examples).encode("latin-1"))
    with pytest.raises(SailError, match=r"l\.jsonl:1 is not utf-8 text"):
        winoground(trained["run"], str(tmp_path / "l.jsonl"))
    assert winoground(trained["run"], str(tmp_path / "l.jsonl"), encoding="latin-1") == winoground(
        trained["run"], str(tmp_path / "u.jsonl"))
    # the CLI: the same line and exit code 2, then --encoding
    for argv in (["eval", "zeroshot", trained["run"], "--data", str(tmp_path / "l.csv"), "--features-root", f],
                 ["eval", "retrieval", trained["run"], "--data", str(tmp_path / "l.csv"), "--features-root", f],
                 ["eval", "winoground", trained["run"], "--data", str(tmp_path / "l.jsonl")]):
        capsys.readouterr()
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "is not utf-8 text" in err and "--encoding" in err
        assert len(err.splitlines()) == 1
        assert main(argv + ["--encoding", "latin-1"]) == 0


def test_index_finds_the_image_paths_of_a_store_from_a_latin1_manifest(trained, tmp_path, tiny_vision):
    """The store records --encoding, so `sail index` can reopen its manifest for the image paths."""
    from sail.eval.search import build_index

    ds = open_dataset("sample")
    rows = [f"{ds.ids[i]},{ds.images[i]},caf\u00e9 {i}" for i in range(12)]
    (tmp_path / "l.csv").write_bytes(("id,image,caption\n" + "\n".join(rows) + "\n").encode("latin-1"))
    res = extract(ExtractConfig(model=str(tiny_vision), data=str(tmp_path / "l.csv"), out=str(tmp_path / "i.h5"),
                                encoding="latin-1", workers=0, progress=False))
    with FeatureStore(res.path) as s:
        assert s.attrs["encoding"] == "latin-1"
    build_index(trained["run"], str(res.path), str(tmp_path / "idx"))
    items = json.loads((tmp_path / "idx" / "ids.json").read_text())
    assert {i["id"]: i["path"] for i in items} == {ds.ids[i]: ds.images[i] for i in range(12)}
