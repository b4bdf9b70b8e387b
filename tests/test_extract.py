"""`sail extract`: stored values equal the encoders run directly; bad input, resume, shards, torchrun."""

import csv
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sail.core.errors import SailError
from sail.data import open_dataset
from sail.data.store import FeatureStore
from sail.encoders.extract import ExtractConfig, extract


def _run(model, data, out, **kw):
    kw.setdefault("workers", 0)
    kw.setdefault("progress", False)
    return extract(ExtractConfig(model=str(model), data=str(data), out=str(out), **kw))


def _direct_image_features(model_dir, paths, pooling="concat"):
    """Reference: the model's own processor and forward, pooled by hand."""
    from transformers import AutoImageProcessor, AutoModel

    proc = AutoImageProcessor.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir).eval()
    pixels = proc(images=[Image.open(p).convert("RGB") for p in paths], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        h = model(pixel_values=pixels).last_hidden_state
    cls, patch_mean = h[:, 0], h[:, 1:].mean(1)
    return {"concat": torch.cat([cls, patch_mean], 1), "cls": cls, "mean": patch_mean}[pooling].numpy()


def _manifest(tmp_path, rows, name="m.csv"):
    path = tmp_path / name
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def test_sample_is_deterministic(tmp_path):
    from sail.data.sample import render_sample

    render_sample(tmp_path / "a", n=12)
    render_sample(tmp_path / "b", n=12)
    for name in ["manifest.csv"] + [f"images/s{i:04d}.png" for i in range(12)]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    ds = open_dataset("sample")
    assert len(ds) == 480 and len(ds.class_names) == 18 and set(ds.captions) == {"caption", "long_caption"}


@pytest.mark.parametrize("pooling", ["concat", "cls", "mean"])
def test_image_features_equal_direct_forward(tmp_path, tiny_vision, pooling):
    ds = open_dataset("sample")
    res = _run(tiny_vision, "sample", tmp_path / "img.h5", pooling=pooling, chunk_size=200, batch_size=32)
    with FeatureStore(res.path) as s:
        assert list(s.ids) == ds.ids
        assert s.attrs["pooling"] == pooling and s.attrs["modality"] == "image"
        rows = [0, 7, 250, 479]
        want = _direct_image_features(tiny_vision, [ds.images[r] for r in rows], pooling)
        got = s.read("image", rows).astype(np.float32)
        np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3)
        assert s.dim("image") == (64 if pooling == "concat" else 32)
        assert np.array_equal(s.labels, ds.labels) and s.class_names == ds.class_names
        for key in ("model_id", "model_revision", "dim", "dtype", "preprocessing", "source", "source_hash", "sail_version"):
            assert key in s.attrs


def test_patch_tokens_stored(tmp_path, tiny_vision):
    res = _run(tiny_vision, "sample", tmp_path / "p.h5", patch_tokens=True, chunk_size=240)
    with FeatureStore(res.path) as s:
        tokens = s.read_patch_tokens("image", [3])
        assert tokens.shape == (1, 16, 32)  # 56 px crop / 14 px patches = 4 x 4
        np.testing.assert_allclose(tokens[0].astype(np.float32).mean(0),
                                   s.read("image", [3])[0, 32:].astype(np.float32), atol=2e-3)


def test_text_features_equal_sentence_transformers(tmp_path, minilm):
    from sentence_transformers import SentenceTransformer

    ds = open_dataset("sample")
    res = _run("minilm-l6", "sample", tmp_path / "t.h5", chunk_size=256, batch_size=64)
    want = SentenceTransformer(minilm, device="cpu").encode(ds.captions["long_caption"][:50])
    with FeatureStore(res.path) as s:
        assert s.fields == ["caption", "long_caption"] and s.dim("caption") == 384
        np.testing.assert_allclose(s.read("long_caption", slice(0, 50)).astype(np.float32), want, atol=1e-3)
        assert s.attrs["max_length"] == 256 and s.attrs["pooling"] == "sentence-transformers:mean"


def test_bad_images_and_empty_captions_are_skipped_without_shifting_rows(tmp_path, tiny_vision, tiny_text):
    good = Image.new("RGB", (60, 60), (200, 20, 20))
    good.save(tmp_path / "good.png")
    Image.new("RGB", (60, 60), (20, 200, 20)).save(tmp_path / "good2.png")
    data = (tmp_path / "good.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.jpg").write_bytes(b"not an image at all")
    rows = [
        {"id": "a", "image": "good.png", "caption": "a red square"},
        {"id": "b", "image": "truncated.png", "caption": "broken"},
        {"id": "c", "image": "missing.png", "caption": "   "},
        {"id": "d", "image": "garbage.jpg", "caption": "garbage"},
        {"id": "e", "image": "good2.png", "caption": "a green square"},
    ]
    manifest = _manifest(tmp_path, rows)
    res = _run(tiny_vision, manifest, tmp_path / "img.h5", batch_size=2, chunk_size=4)
    assert sum(res.skipped.values()) == 3 and "skipped 3" in res.summary()
    with FeatureStore(res.path) as s:
        assert s.valid("image").tolist() == [True, False, False, False, True]
        reasons = {i: r for i, _, r in s.skipped}
        assert reasons["c"] == "missing file" and reasons["b"].startswith("unreadable image")
        assert reasons["d"].startswith("unreadable image")
        want = _direct_image_features(tiny_vision, [tmp_path / "good.png", tmp_path / "good2.png"])
        np.testing.assert_allclose(s.read("image", [0, 4]).astype(np.float32), want, atol=2e-3)
    res = _run(tiny_text, manifest, tmp_path / "txt.h5")
    with FeatureStore(res.path) as s:
        assert s.valid("caption").tolist() == [True, True, False, True, True]
        assert s.skipped == [("c", "caption", "empty caption")]


def test_kill_and_resume_gives_identical_store(tmp_path, tiny_vision):
    ref = _run(tiny_vision, "sample", tmp_path / "ref.h5", chunk_size=16, batch_size=8)
    out = tmp_path / "killed.h5"
    cmd = [sys.executable, "-m", "sail.cli", "extract", "--model", str(tiny_vision), "--data", "sample",
           "--out", str(out), "--chunk-size", "16", "--batch-size", "8", "--workers", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parts = tmp_path / "killed.h5.parts"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(parts.glob("part-*.npz"))) < 3:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(list(parts.glob("part-*.npz")))
    assert 3 <= done < 30, "the kill should land mid-run"
    assert not out.exists()
    with pytest.raises(SailError, match="incomplete|not found"):
        FeatureStore(out)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert not parts.exists()
    with FeatureStore(ref.path) as a, FeatureStore(out) as b:
        assert list(a.ids) == list(b.ids) and len(set(b.ids)) == 480
        assert np.array_equal(a.read("image"), b.read("image"))


def test_interrupted_merge_leaves_no_complete_looking_file(tmp_path, tiny_text):
    out = tmp_path / "t.h5"
    (tmp_path / "t.h5.partial").write_bytes(b"half written")
    res = _run(tiny_text, "sample", out)
    assert res.path == out and not (tmp_path / "t.h5.partial").exists()
    assert len(FeatureStore(out)) == 480


def test_existing_store_from_another_model_is_not_overwritten(tmp_path, tiny_vision, tiny_text):
    out = tmp_path / "x.h5"
    _run(tiny_vision, "sample", out)
    before = out.read_bytes()
    with pytest.raises(SailError, match="different extraction"):
        _run(tiny_text, "sample", out)
    other = _manifest(tmp_path, [{"id": "a", "image": "none.png", "caption": "x"}])
    with pytest.raises(SailError, match="different extraction"):
        _run(tiny_vision, other, out)
    assert out.read_bytes() == before
    assert _run(tiny_vision, "sample", out).already_complete


def test_user_errors_are_one_line(tmp_path, tiny_text, tiny_vision):
    with pytest.raises(SailError, match="unknown model"):
        _run("not-a-model", "sample", tmp_path / "a.h5")
    with pytest.raises(SailError, match="no column"):
        _run(tiny_text, "sample", tmp_path / "b.h5", columns=["nope"])
    with pytest.raises(SailError, match="not found"):
        _run(tiny_text, tmp_path / "nothing.csv", tmp_path / "c.h5")
    dup = _manifest(tmp_path, [{"id": "a", "caption": "x"}, {"id": "a", "caption": "y"}])
    with pytest.raises(SailError, match="more than once"):
        _run(tiny_text, dup, tmp_path / "d.h5", image_column="")
    with pytest.raises(SailError, match="--image-column"):
        _run(tiny_vision, _manifest(tmp_path, [{"id": "a", "caption": "x"}], "t.csv"),
             tmp_path / "e.h5")
    for s in ("a.h5", "b.h5", "c.h5", "d.h5", "e.h5"):
        assert not (tmp_path / s).exists()


def test_cli_prints_one_line_error(tmp_path, capsys):
    # in-process (main is what the entry point calls); the kill and torchrun tests run extract as a real process
    from sail.cli import main

    assert main(["extract", "--model", "nope", "--data", "sample", "--out", str(tmp_path / "x.h5")]) == 2
    err = capsys.readouterr().err
    assert err.strip().startswith("error: unknown model") and len(err.strip().splitlines()) == 1


def _write_shard(path, samples):
    with tarfile.open(path, "w") as tar:
        for name, payload in samples:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))


def test_webdataset_shards(tmp_path, tiny_vision, tiny_text):
    shards = tmp_path / "shards"
    shards.mkdir()
    ds = open_dataset("sample")
    for k in range(2):
        samples = []
        for i in range(k * 5, k * 5 + 5):
            key = f"{i:09d}"
            samples.append((f"{key}.png", Path(ds.images[i]).read_bytes()))
            samples.append((f"{key}.txt", ds.captions["caption"][i].encode()))
            samples.append((f"{key}.json", json.dumps({"key": key, "long_caption": ds.captions["long_caption"][i]}).encode()))
        _write_shard(shards / f"{k:05d}.tar", samples)
    res = _run(tiny_vision, shards, tmp_path / "img.h5", chunk_size=4)
    with FeatureStore(res.path) as s:
        assert list(s.ids) == [f"{i:09d}" for i in range(10)] and s.valid("image").all()
        want = _direct_image_features(tiny_vision, ds.images[:10])
        np.testing.assert_allclose(s.read("image").astype(np.float32), want, atol=2e-3)
    res = _run(tiny_text, shards, tmp_path / "txt.h5", columns=["caption", "long_caption"])
    with FeatureStore(res.path) as s:
        assert s.fields == ["caption", "long_caption"] and s.valid("long_caption").all()


def test_image_folder_stores_labels(tmp_path, tiny_vision):
    root = tmp_path / "folder"
    for cls, colour in (("cat", (10, 10, 10)), ("dog", (250, 250, 250))):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (40, 50), colour).save(root / cls / f"{i}.jpg")
    res = _run(tiny_vision, root, tmp_path / "f.h5")
    with FeatureStore(res.path) as s:
        assert s.class_names == ["cat", "dog"] and s.labels.tolist() == [0, 0, 0, 1, 1, 1]
        assert s.ids[0] == "cat/0.jpg"


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_processes_match_one(tmp_path, tiny_vision):
    single = _run(tiny_vision, "sample", tmp_path / "one.h5", chunk_size=64, batch_size=32)
    out = tmp_path / "two.h5"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_port", str(_free_port()),
                        "-m", "sail.cli", "extract", "--model", str(tiny_vision), "--data", "sample", "--out", str(out),
                        "--chunk-size", "64", "--batch-size", "32", "--workers", "0"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    with FeatureStore(single.path) as a, FeatureStore(out) as b:
        assert list(a.ids) == list(b.ids)
        np.testing.assert_allclose(a.read("image").astype(np.float32), b.read("image").astype(np.float32), atol=2e-3)


@pytest.mark.parametrize("fmt", ["tsv", "jsonl", "parquet"])
def test_manifest_formats(tmp_path, tiny_text, fmt):
    rows = [{"id": f"r{i}", "caption": f"caption number {i}", "label": "a" if i % 2 else "b"} for i in range(6)]
    path = tmp_path / f"m.{fmt}"
    if fmt == "tsv":
        path.write_text("id\tcaption\tlabel\n" + "".join(f"{r['id']}\t{r['caption']}\t{r['label']}\n" for r in rows))
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    res = _run(tiny_text, path, tmp_path / "t.h5")  # no image column: a text-only manifest
    with FeatureStore(res.path) as s:
        assert list(s.ids) == [r["id"] for r in rows] and s.class_names == ["a", "b"]
        assert s.labels.tolist() == [1, 0, 1, 0, 1, 0] and s.valid("caption").all()


# ----------------------------------------------------------------------------------------- GPU-ready extraction


def _photos(tmp_path):
    """Real photographs at real sizes: matplotlib's grace_hopper.jpg (512x600), crops and rescales of it."""
    import matplotlib.cbook

    src = Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).convert("RGB")
    variants = {"orig": src, "500x375": src.crop((0, 100, 512, 484)).resize((500, 375), Image.Resampling.LANCZOS),
                "375x500": src.resize((375, 500), Image.Resampling.LANCZOS), "small": src.resize((200, 160)),
                "2000x2344": src.resize((2000, 2344), Image.Resampling.LANCZOS),
                "3000x1200": src.crop((0, 200, 512, 405)).resize((3000, 1200), Image.Resampling.LANCZOS)}
    paths = {}
    for name, im in variants.items():
        paths[name] = tmp_path / f"{name}.jpg"
        im.save(paths[name], quality=90)
    paths["png"] = tmp_path / "png.png"
    src.save(paths["png"])
    return paths


def _processors():
    from transformers import BitImageProcessor, CLIPImageProcessor, ViTImageProcessor

    return {"dinov2": BitImageProcessor(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224},
                                        do_center_crop=True, resample=3, image_mean=[0.485, 0.456, 0.406],
                                        image_std=[0.229, 0.224, 0.225]),
            "clip": CLIPImageProcessor(), "vit": ViTImageProcessor()}


@pytest.mark.parametrize("kind", ["dinov2", "clip", "vit"])
def test_fast_preprocess_matches_the_model_processor_on_photos(tmp_path, kind):
    """Tolerance, in normalised units (one grey level is ~0.017): images decoded whole match the processor to a
    grey level; JPEGs large enough to be decoded at a reduced DCT scale (short side >= 4x the resize target)
    stay within 0.03 on average and 0.6 at the worst pixel (sharp edges)."""
    from sail.data import load_image
    from sail.encoders import FastPreprocess

    proc = _processors()[kind]
    fast = FastPreprocess(proc)
    for name, path in _photos(tmp_path).items():
        want = proc(images=[load_image(str(path))], return_tensors="pt")["pixel_values"][0]
        image = load_image(str(path), draft=fast.draft_short_side())
        got = fast(image)
        assert got.dtype == torch.uint8 and got.shape == want.shape
        diff = (fast.normalize(got[None], torch.float32)[0] - want).abs()
        if image.size == Image.open(path).size:  # decoded whole: the same pixels, up to rounding
            assert float(diff.max()) < 0.02, (name, float(diff.max()))
        else:
            assert name in ("2000x2344", "3000x1200"), f"{name} should not be draft-decoded"
            assert min(image.size) >= fast.draft_short_side()
            assert float(diff.mean()) < 0.03 and float(diff.max()) < 0.6, (name, float(diff.mean()), float(diff.max()))


def test_fast_preprocess_refuses_what_it_cannot_reproduce():
    from transformers import BitImageProcessor

    from sail.encoders import FastPreprocess

    proc = BitImageProcessor(size={"longest_edge": 300})
    assert "resize to" in FastPreprocess.unsupported(proc)
    with pytest.raises(SailError, match="--preprocess hf"):
        FastPreprocess(proc)


def test_fast_and_hf_paths_store_the_same_features(tmp_path, tiny_vision):
    paths = _photos(tmp_path)
    manifest = _manifest(tmp_path, [{"id": k, "image": str(p)} for k, p in paths.items()])
    fast = _run(tiny_vision, manifest, tmp_path / "fast.h5", preprocess="fast")
    hf = _run(tiny_vision, manifest, tmp_path / "hf.h5", preprocess="hf")
    with FeatureStore(fast.path) as a, FeatureStore(hf.path) as b:
        assert a.valid("image").all()
        assert json.loads(a.attrs["preprocessing"])["sail_preprocess"] == "fast"
        assert json.loads(b.attrs["preprocessing"])["sail_preprocess"] == "hf"
        x, y = a.read("image").astype(np.float32), b.read("image").astype(np.float32)
        # the tiny model resizes to 64 px: JPEGs with a short side >= 256 are draft-decoded, the rest are not
        whole = [i for i, k in enumerate(a.ids) if k == "png" or min(Image.open(paths[k]).size) < 256]
        assert len(whole) == 2
        np.testing.assert_allclose(x[whole], y[whole], atol=2e-3, rtol=2e-3)
        # draft-decoded: compare directions about the mean (raw features of a random model all point alike;
        # centred, two different photos here are at most 0.6 alike)
        x, y = x - y.mean(0), y - y.mean(0)
        cos = (x * y).sum(1) / np.linalg.norm(x, axis=1) / np.linalg.norm(y, axis=1)
        assert cos.min() > 0.99


def test_encoders_load_weights_in_the_asked_dtype(tiny_vision, tiny_text):
    """bf16 weights from the start (no fp32 copy, no autocast re-cast); outputs stay close to fp32."""
    from sail.encoders import ImageEncoder, TextEncoder, resolve_model

    spec = resolve_model(str(tiny_vision))
    ref = ImageEncoder(spec, torch.device("cpu"), preprocess="fast")
    low = ImageEncoder(spec, torch.device("cpu"), dtype=torch.bfloat16, preprocess="fast")
    assert {p.dtype for p in low.model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in ref.model.parameters()} == {torch.float32}
    pixels = torch.stack([ref.preprocess(Image.new("RGB", (90, 70), (30 * i, 200 - 20 * i, 90))) for i in range(4)])
    a, _ = ref.encode_pixels(pixels)
    b, _ = low.encode_pixels(pixels)
    assert a.dtype == b.dtype == torch.float32
    cos = torch.nn.functional.cosine_similarity(a, b)
    assert float(cos.min()) > 0.99
    text = TextEncoder(resolve_model(str(tiny_text)), torch.device("cpu"), dtype=torch.bfloat16)
    assert {p.dtype for p in text.model.parameters()} == {torch.bfloat16}
    assert text.encode_texts(["a red square"]).dtype == np.float32


def test_default_workers_and_batch(monkeypatch):
    from sail.encoders import default_batch_size
    from sail.encoders.extract import default_workers

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert default_workers() == 63  # not capped at 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert default_workers(8) == 7
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    assert default_workers(8) == 1
    gpu, cpu = torch.device("cuda"), torch.device("cpu")
    assert [default_batch_size(n, gpu) for n in (22e6, 86e6, 304e6, 1.1e9, 7.8e9)] == [1024, 1024, 512, 128, 32]
    assert default_batch_size(304e6, cpu) == 32


def test_dist_timeout_reaches_the_process_group(monkeypatch):
    import datetime

    import torch.distributed as dist

    from sail.core.distributed import init_distributed

    seen = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: seen.update(kw, backend=backend))
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    assert init_distributed(datetime.timedelta(minutes=720)) == (1, 2)
    assert seen == {"timeout": datetime.timedelta(hours=12), "backend": "gloo"}


def test_other_ranks_do_not_wait_for_the_merge(tmp_path, tiny_vision, monkeypatch):
    """Two ranks as threads with a real barrier: rank 1 returns while rank 0 is still merging, and the store
    equals a one-process run. A second barrier after the merge would break the (timed) barrier."""
    import threading

    import sail.encoders.extract as ex

    single = _run(tiny_vision, "sample", tmp_path / "one.h5", chunk_size=64, batch_size=32)
    gate = threading.Barrier(2, timeout=120)
    monkeypatch.setattr(ex, "init_distributed", lambda timeout=None: (threading.current_thread().rank, 2))
    monkeypatch.setattr(ex, "barrier", lambda world=None: gate.wait())
    times, merge = {}, ex._merge

    def slow_merge(*a, **k):
        time.sleep(1.0)  # a merge that takes a while
        result = merge(*a, **k)
        times["merged"] = time.monotonic()
        return result

    monkeypatch.setattr(ex, "_merge", slow_merge)
    results, errors = {}, []

    def rank(r):
        threading.current_thread().rank = r
        try:
            results[r] = _run(tiny_vision, "sample", tmp_path / "two.h5", chunk_size=64, batch_size=32)
            times[r] = time.monotonic()
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    assert times[1] < times["merged"] <= times[0]
    assert results[0].skipped == {} and results[0].seconds > 0
    with FeatureStore(single.path) as a, FeatureStore(tmp_path / "two.h5") as b:
        assert list(a.ids) == list(b.ids)
        assert np.array_equal(a.read("image"), b.read("image"))
    assert not (tmp_path / "two.h5.parts").exists()
