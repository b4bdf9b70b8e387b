"""`sail extract --decode gpu` (sail.data.gpu_decode), run on the CPU: the same code with nvImageCodec's CPU backend
(libjpeg-turbo, bit-identical to PIL's decode), so what is checked here is everything but nvJPEG itself: the
workers' routing, the resize and crop against PIL, the fallbacks, the extraction around it, and the choice of path.
benchmarks/gpu_extract.py compares the two paths' features on a GPU."""

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from sail.core.errors import SailError
from sail.data import gpu_decode as gd
from sail.data.images import decode_image
from sail.data.store import FeatureStore
from sail.encoders.extract import ExtractConfig, extract
from test_extract import _manifest, _photos, _processors


def _fast(kind="dinov2", **kw):
    from transformers import BitImageProcessor

    from sail.encoders import FastPreprocess

    if kw:
        return FastPreprocess(BitImageProcessor(**{"do_center_crop": True, **kw}))
    return FastPreprocess(_processors()[kind])


def _jpeg(image: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=90, **kw)
    return buf.getvalue()


def _photo() -> Image.Image:
    import matplotlib.cbook

    return Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).convert("RGB")


# ----------------------------------------------------------------------------------------- resizing


def test_the_pass_order_is_the_installed_pillows_over_many_sizes():
    """Property test, 600 random geometries on noise (where the two orders round differently): PIL's resize equals
    PIL's own two single-axis resizes in the order `vertical_first` names, and (where the orders differ) not in
    the other order. Pillow 13 picks the order by sizes; the probe found which rule this Pillow follows."""
    assert gd.pil_pass_order() in ("pillow13", "horizontal")
    rng = np.random.default_rng(2)
    differ = 0
    for _ in range(600):
        W, H, w, h = (int(v) for v in rng.integers(6, 90, 4))
        if w == W or h == H:
            continue
        src = Image.fromarray(rng.integers(0, 256, (H, W), np.uint8))
        direct = np.asarray(src.resize((w, h), Image.Resampling.BICUBIC))
        via_h = np.asarray(src.resize((w, H), Image.Resampling.BICUBIC).resize((w, h), Image.Resampling.BICUBIC))
        via_v = np.asarray(src.resize((W, h), Image.Resampling.BICUBIC).resize((w, h), Image.Resampling.BICUBIC))
        first, other = (via_v, via_h) if gd.vertical_first(W, H, w, h) else (via_h, via_v)
        assert np.array_equal(direct, first), (W, H, w, h)
        differ += not np.array_equal(direct, other)
    assert differ > 100  # the test can tell the orders apart


def test_pil_resize_matches_pil_over_many_sizes():
    """torch's antialiased filters, run PIL's way (a pass per axis in Pillow's order, each rounded half up),
    against Image.resize on a photo and on noise, 150 target sizes per filter and source: bicubic on the photo
    within 1 level, the rest within 2, on <= 2 % of the photo's values and <= 5 % of the noise's (PIL's 22-bit fixed-point weights against float32:
    values near .5 round apart). One interpolate call instead (no rounding between passes) is off by one on
    about 16 % of the values."""
    rng = np.random.default_rng(0)
    sources = {"photo": _photo().resize((257, 301)), "noise": Image.fromarray(rng.integers(0, 256, (190, 233, 3), np.uint8))}
    for filt, mode in ((Image.Resampling.BICUBIC, "bicubic"), (Image.Resampling.BILINEAR, "bilinear")):
        for name, src in sources.items():
            x = torch.from_numpy(np.asarray(src).copy()).permute(2, 0, 1)[None].float()
            for _ in range(150):
                w, h = int(rng.integers(8, 2 * src.width)), int(rng.integers(8, 2 * src.height))
                want = np.asarray(src.resize((w, h), resample=filt)).astype(int)
                got = gd.pil_resize(x.clone(), h, w, mode)[0].permute(1, 2, 0).numpy().astype(int)
                d = np.abs(got - want)
                assert d.max() <= (1 if filt == Image.Resampling.BICUBIC and name == "photo" else 2), (filt, name, w, h)
                assert (d > 0).mean() <= (0.02 if name == "photo" else 0.05), (filt, name, w, h, (d > 0).mean())
    one_call = torch.nn.functional.interpolate(x, size=(150, 120), mode="bicubic", antialias=True).round()
    want = np.asarray(sources["noise"].resize((120, 150), resample=Image.Resampling.BICUBIC)).astype(int)
    assert (np.abs(one_call[0].permute(1, 2, 0).numpy().astype(int) - want) > 0).mean() > 0.05


def test_resize_crop_matches_fast_preprocess_over_many_sources():
    """Property test: 150 random source sizes (20..900 px a side, noise) through four processor styles (shortest
    edge + crop, bicubic and bilinear; a crop larger than the resized image; a fixed-size squash): within 2 levels
    on <= 5 % of the values (noise; photos: the next test)."""
    fasts = [_fast("dinov2"), _fast("clip"), _fast(size={"shortest_edge": 100}, crop_size={"height": 160, "width": 120},
                                                    resample=3),
             _fast(size={"height": 64, "width": 80}, do_center_crop=False, resample=2)]
    rng = np.random.default_rng(0)
    for _ in range(150):
        W, H = (int(v) for v in rng.integers(20, 900, 2))
        src = Image.fromarray(rng.integers(0, 256, (H, W, 3), np.uint8))
        hwc = torch.from_numpy(np.asarray(src).copy())
        for fast in fasts:
            d = (gd.resize_crop(hwc, fast).int() - fast(src).int()).abs()
            assert d.max() <= 2 and (d > 0).float().mean() <= 0.05, ((W, H), fast.crop, d.max().item())


@pytest.mark.parametrize("kind", ["dinov2", "clip", "vit", "padded", "fixed-up"])
def test_gpu_path_crops_equal_the_cpu_path(tmp_path, kind):
    """Whole decode + resize_crop against FastPreprocess on the same decoded image, for each processor style
    (shortest edge + crop, bicubic and bilinear; fixed size; a crop larger than the resized image: padded), on
    real photos of several sizes, an EXIF-rotated JPEG and a greyscale one: within 1 level on <= 0.5 % of the
    values where the crop is downscaled; within 2 on <= 4 % where a fixed size squashes or upscales a side (bilinear)."""
    fast = {"padded": lambda: _fast(size={"shortest_edge": 100}, crop_size={"height": 160, "width": 120}, resample=3),
            "fixed-up": lambda: _fast(size={"height": 700, "width": 650}, do_center_crop=False, resample=2),
            }.get(kind, lambda: _fast(kind))()
    decoder = gd.GpuDecoder(fast, torch.device("cpu"))
    exif = Image.Exif()
    exif[0x0112] = 8
    datas = [p.read_bytes() for k, p in _photos(tmp_path).items() if k != "png"]
    datas += [_jpeg(_photo().resize((330, 260)), exif=exif.tobytes()), _jpeg(_photo().convert("L"))]
    payloads = [gd.JpegBytes(d, Image.open(io.BytesIO(d)).size) for d in datas]
    crops, failed = decoder.crops(payloads)
    assert not failed and decoder.cpu_fallbacks == 0
    for data, got in zip(datas, crops):
        want = fast(decode_image(data, None))
        assert got.dtype == torch.uint8 and got.shape == want.shape
        d = (got.int() - want.int()).abs()
        assert d.max() <= (2 if kind == "fixed-up" else 1) and \
            (d > 0).float().mean() <= (0.04 if kind in ("vit", "fixed-up") else 0.005), \
            (kind, d.max(), (d > 0).float().mean())


@pytest.mark.parametrize("kind", ["dinov2", "padded"])
def test_same_size_images_resized_together_equal_one_by_one(kind, monkeypatch):
    """crops() resizes same-size images in batches (one pass per axis for all): bit-identical to one at a time,
    in the payloads' order, also when a size's images span several calls (RESIZE_PIXELS)."""
    fast = _fast(kind) if kind != "padded" else _fast(size={"shortest_edge": 100}, crop_size={"height": 160, "width": 120},
                                                     resample=3)
    rng = np.random.default_rng(4)
    photo = _photo()
    sizes = [(300, 240), (300, 240), (211, 350), (300, 240), (211, 350), (300, 240), (300, 240)]
    datas = [_jpeg(photo.crop(tuple(int(v) for v in (*rng.integers(0, 100, 2), *(rng.integers(0, 100, 2) + 400))))
                   .resize(size)) for size in sizes]
    payloads = [gd.JpegBytes(d, s) for d, s in zip(datas, sizes)]
    monkeypatch.setattr(gd, "RESIZE_PIXELS", 3 * 300 * 240)  # the 300x240 ones in calls of 3, 2
    crops, failed = gd.GpuDecoder(fast, torch.device("cpu")).crops(payloads)
    assert not failed
    for data, got in zip(datas, crops):
        one = gd.resize_crop(torch.from_numpy(np.asarray(decode_image(data, None)).copy()), fast)
        assert torch.equal(got, one)


def test_unsupported_filters_and_paths_are_named():
    assert "nearest" in gd.unsupported(_fast(size={"shortest_edge": 64}, crop_size={"height": 56, "width": 56},
                                             resample=0))
    assert "--preprocess fast" in gd.unsupported(None)
    assert gd.unsupported(_fast("clip")) is None


# ----------------------------------------------------------------------------------------- workers and batches


def test_workers_send_gpu_jpegs_as_bytes_and_decode_the_rest(tmp_path):
    fast = _fast()
    photo = _photo().resize((300, 240))
    files = {"rgb.jpg": _jpeg(photo), "grey.jpg": _jpeg(photo.convert("L")), "cmyk.jpg": _jpeg(photo.convert("CMYK"))}
    png = io.BytesIO()
    photo.save(png, "PNG")
    files["p.png"] = png.getvalue()
    files["garbage.jpg"] = b"not an image"
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    refs = [str(tmp_path / n) for n in files] + [str(tmp_path / "missing.jpg")]
    items = gd.ImageBytes(refs, fast, max_pixels=10**8)
    got = {n: items[i][1:] for i, n in enumerate(list(files) + ["missing.jpg"])}
    assert isinstance(got["rgb.jpg"][0], gd.JpegBytes) and got["rgb.jpg"][0].size == (300, 240)
    assert isinstance(got["grey.jpg"][0], gd.JpegBytes)
    for name in ("cmyk.jpg", "p.png"):  # decoded in the worker as the CPU path does (CMYK by its formula)
        assert torch.equal(got[name][0], fast(decode_image(files[name], None))) and got[name][1] == ""
    assert got["garbage.jpg"][0] is None and got["garbage.jpg"][1].startswith("unreadable image")
    assert got["missing.jpg"] == (None, "missing file")
    small = gd.ImageBytes(refs[:1], fast, max_pixels=1000)
    assert small[0][1] is None and small[0][2].startswith("too large: 300x240")


def test_a_jpeg_no_gpu_backend_takes_is_decoded_on_the_cpu(tmp_path):
    """nvImageCodec gives None for what it cannot decode: the CPU path decides (a picture, or its reason)."""
    fast = _fast()
    good = _jpeg(_photo().resize((280, 250)))
    truncated = good[: len(good) // 3]
    decoder = gd.GpuDecoder(fast, torch.device("cpu"))

    class Refusing:  # a decoder without the backend for these JPEGs
        def decode(self, streams, **kw):
            return [None] * len(streams)

    real = decoder.decoder
    crops, failed = decoder.crops([gd.JpegBytes(truncated, (280, 250)), gd.JpegBytes(good, (280, 250))])
    assert crops[0] is None and failed[0].startswith("unreadable image") and 1 not in failed
    assert decoder.cpu_fallbacks == 1  # the truncated one: libjpeg-turbo refused it, PIL gave the reason
    decoder.decoder = Refusing()
    crops2, failed2 = decoder.crops([gd.JpegBytes(good, (280, 250))])
    assert not failed2 and torch.equal(crops2[0], fast(decode_image(good, None))) and decoder.cpu_fallbacks == 2
    decoder.decoder = real
    assert (crops[1].int() - crops2[0].int()).abs().max() <= 1  # nvImageCodec + torch's resize against PIL's


def test_self_check_refuses_a_decoder_that_disagrees_or_has_no_gpu_backend():
    fast = _fast()
    decoder = gd.GpuDecoder(fast, torch.device("cpu"))
    assert decoder.self_check() is None
    real = decoder.decoder

    class Swapped:  # channels in the wrong order, as a misconfigured decoder would give
        def decode(self, streams, **kw):
            return [np.ascontiguousarray(np.asarray(im)[..., ::-1]) for im in real.decode(streams, **kw)]

    decoder._as_tensor = lambda image: torch.from_numpy(np.asarray(image))
    decoder.decoder = Swapped()
    assert "differ from the CPU path's" in decoder.self_check()

    class Nothing:
        def decode(self, streams, **kw):
            return [None] * len(streams)

    decoder.decoder = Nothing()
    assert "no GPU JPEG decoder" in decoder.self_check()


def test_open_decoder_says_why_not():
    assert gd.open_decoder(_fast(), "cpu") == (None, "it needs a CUDA device")
    nearest = _fast(size={"shortest_edge": 64}, crop_size={"height": 56, "width": 56}, resample=0)
    assert "nearest" in gd.open_decoder(nearest, "cuda")[1]


def test_open_decoder_without_the_package(monkeypatch):
    monkeypatch.setattr(gd, "_nvimgcodec", lambda: None)
    monkeypatch.setattr(gd.torch.cuda, "is_available", lambda: True)
    decoder, why = gd.open_decoder(_fast(), "cuda")
    assert decoder is None and "pip install 'sail[gpu-decode]'" in why


def test_a_broken_nvimagecodec_is_a_reason_not_a_crash(monkeypatch):
    def broken():
        raise OSError("libcudart.so.13: cannot open shared object file")

    monkeypatch.setattr(gd, "_nvimgcodec", broken)
    decoder, why = gd.open_decoder(_fast(), "cuda")
    assert decoder is None and why.startswith("nvImageCodec failed to load (OSError: libcudart.so.13")


def test_loading_nvimagecodec_prints_nothing():
    """Its C library prints a paragraph per codec library it lacks (nvJPEG on this machine) and a line per image
    it cannot decode: kept off the terminal (a fresh process, so the import is the first); sail reports failures."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    code = ("import torch; from sail.data import gpu_decode as gd; from test_gpu_decode import _fast; "
            "d = gd.GpuDecoder(_fast(), torch.device('cpu')); "
            "print(d.crops([gd.JpegBytes(b'\\xff\\xd8\\xff' + bytes(100), (10, 10))])[1])")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "unreadable image" in proc.stdout
    assert not any(w in proc.stderr for w in ("nvjpeg", "nvJPEG", "WARNING", "ERROR", "Failed to load")), proc.stderr


def test_groups_cover_every_index_in_order_within_the_pixel_budget(monkeypatch):
    """Property test over 2000 random size lists: groups partition the indices in order; a group goes over
    the budget only when it is a single image larger than the budget."""
    monkeypatch.setattr(gd, "DECODE_PIXELS", 1000)
    rng = np.random.default_rng(1)
    for _ in range(2000):
        n = int(rng.integers(0, 30))
        sizes = [(int(rng.integers(1, 60)), int(rng.integers(1, 60))) for _ in range(n)]
        idx = sorted(rng.choice(200, n, replace=False).tolist())
        groups = gd._groups(idx, sizes)
        assert [i for g in groups for i in g] == idx and all(groups)
        px = dict(zip(idx, (w * h for w, h in sizes)))
        for g in groups:
            assert sum(px[i] for i in g) <= 1000 or len(g) == 1
        for a, b in zip(groups, groups[1:]):  # greedy: the next image would not have fitted
            assert sum(px[i] for i in a) + px[b[0]] > 1000


def test_batches_decode_ahead_and_pass_errors_on():
    fast = _fast()
    decoder = gd.GpuDecoder(fast, torch.device("cpu"))
    good = _jpeg(_photo().resize((260, 240)))
    batches = [([0, 1], [True, False], [gd.JpegBytes(good, (260, 240)), None], ["", "missing file"]),
               ([2], [True], [gd.JpegBytes(good[:200], (260, 240))], [""])]
    out = list(decoder.batches(iter(batches)))
    assert out[0][0] == [0, 1] and out[0][1] == [True, False] and out[0][2].shape == (1, 3, 224, 224)
    assert out[1][1] == [False] and out[1][2] is None and out[1][3][0].startswith("unreadable image")

    def broken():
        yield batches[0]
        raise RuntimeError("the loader broke")

    with pytest.raises(RuntimeError, match="the loader broke"):
        list(decoder.batches(broken()))


# ----------------------------------------------------------------------------------------- the extraction


@pytest.fixture
def cpu_backend(monkeypatch):
    """--decode gpu on this machine: open_decoder hands out the CPU-backend decoder (all else is the GPU path)."""
    opened = []

    def open_cpu(fast, device):
        why = gd.unsupported(fast)
        if why:
            return None, why
        opened.append(gd.GpuDecoder(fast, torch.device("cpu")))
        return opened[-1], None

    monkeypatch.setattr(gd, "open_decoder", open_cpu)
    return opened


def _bad_files(tmp_path, paths):
    data = paths["500x375"].read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 3])
    (tmp_path / "garbage.jpg").write_bytes(b"not an image")
    return {**paths, "truncated": tmp_path / "truncated.jpg", "garbage": tmp_path / "garbage.jpg",
            "missing": tmp_path / "nope.jpg"}


@pytest.mark.parametrize("workers", [0, 1])
def test_extract_with_gpu_decoding_stores_the_cpu_paths_features(tmp_path, tiny_vision, cpu_backend, capfd, workers):
    """Same rows, same validity and reasons, same features where neither path draft-decodes (atol 2e-3, as fast
    vs hf), the same directions where the CPU path does (cos > 0.99); the store records which decoding made it,
    and the run says how many images the workers decoded instead."""
    paths = _bad_files(tmp_path, _photos(tmp_path))
    manifest = _manifest(tmp_path, [{"id": k, "image": str(p)} for k, p in paths.items()])
    kw = dict(model=str(tiny_vision), data=str(manifest), progress=False, batch_size=3, chunk_size=4, workers=workers)
    gpu = extract(ExtractConfig(out=str(tmp_path / "gpu.h5"), decode="gpu", **kw))
    assert len(cpu_backend) == 1 and cpu_backend[0].cpu_decoded == 1  # the PNG
    assert cpu_backend[0].cpu_fallbacks == 1  # the truncated JPEG: its header passed, nvImageCodec refused it
    assert ("note: 2 of 10 images were decoded on the CPU (1 not RGB or greyscale JPEGs, 1 JPEGs no GPU decoder took)"
            in capfd.readouterr().err)
    cpu = extract(ExtractConfig(out=str(tmp_path / "cpu.h5"), decode="cpu", **kw))
    assert len(cpu_backend) == 1 and gpu.skipped == cpu.skipped and sum(gpu.skipped.values()) == 3
    with FeatureStore(gpu.path) as a, FeatureStore(cpu.path) as b:
        assert json.loads(a.attrs["identity"])["decode"] == "gpu" and json.loads(b.attrs["identity"])["decode"] == "cpu"
        assert a.valid("image").tolist() == b.valid("image").tolist() and list(a.ids) == list(b.ids)
        assert np.array_equal(np.asarray(a.skipped), np.asarray(b.skipped))
        ok = a.valid("image")
        x, y = a.read("image").astype(np.float32)[ok], b.read("image").astype(np.float32)[ok]
        ids = [k for k, v in zip(list(a.ids), ok) if v]
        whole = [i for i, k in enumerate(ids) if k == "png" or min(Image.open(paths[k]).size) < 256]
        np.testing.assert_allclose(x[whole], y[whole], atol=2e-3, rtol=2e-3)
        x, y = x - y.mean(0), y - y.mean(0)
        assert ((x * y).sum(1) / np.linalg.norm(x, axis=1) / np.linalg.norm(y, axis=1)).min() > 0.99


def test_decode_choices_and_their_errors(tmp_path, tiny_vision, tiny_text, capfd):
    paths = _photos(tmp_path)
    manifest = _manifest(tmp_path, [{"id": k, "image": str(p), "caption": k} for k, p in list(paths.items())[:2]])
    kw = dict(model=str(tiny_vision), data=str(manifest), progress=False, workers=0)
    res = extract(ExtractConfig(out=str(tmp_path / "auto.h5"), decode="auto", **kw))  # CPU device: CPU path, quietly
    with FeatureStore(res.path) as s:
        assert json.loads(s.attrs["identity"])["decode"] == "cpu"
    assert "note:" not in capfd.readouterr().err
    with pytest.raises(SailError, match=r"--decode gpu cannot run here: it needs a CUDA device; use --decode cpu"):
        extract(ExtractConfig(out=str(tmp_path / "g.h5"), decode="gpu", **kw))
    with pytest.raises(SailError, match=r"--decode gpu cannot run here: it reproduces --preprocess fast only"):
        extract(ExtractConfig(out=str(tmp_path / "g.h5"), decode="gpu", preprocess="hf", **kw))
    with pytest.raises(SailError, match="--decode must be auto, cpu or gpu, not 'nvjpeg'"):
        extract(ExtractConfig(out=str(tmp_path / "g.h5"), decode="nvjpeg", **kw))
    assert not (tmp_path / "g.h5").exists() and not (tmp_path / "g.h5.parts").exists()
    text = extract(ExtractConfig(model=str(tiny_text), data=str(manifest), out=str(tmp_path / "t.h5"), progress=False,
                                 decode="gpu"))  # a text model: nothing to decode, the flag is moot
    with FeatureStore(text.path) as s:
        assert "decode" not in json.loads(s.attrs["identity"])


def test_auto_on_cuda_says_once_why_it_stays_on_the_cpu(tmp_path, tiny_vision, monkeypatch, capfd):
    from sail.encoders import extract as ex

    monkeypatch.setattr(gd, "open_decoder", lambda fast, device: (None, "nvImageCodec is not installed (pip ...)"))
    monkeypatch.setattr(ex, "_SAID_DECODE", set())

    class Enc:
        modality, fast = "image", object()

    cfg = ExtractConfig(model="m", data="d")
    for _ in range(3):
        assert ex._gpu_decoder(cfg, Enc(), torch.device("cuda"), tmp_path / "x.parts", 0) is None
    err = capfd.readouterr().err
    assert err.count("note: JPEGs are decoded on the CPU: nvImageCodec is not installed") == 1


def test_an_interrupted_extraction_resumes_with_the_decoding_it_started_with(tmp_path, tiny_vision, cpu_backend,
                                                                               monkeypatch):
    from sail.encoders import extract as ex

    paths = _photos(tmp_path)
    manifest = _manifest(tmp_path, [{"id": k, "image": str(p)} for k, p in paths.items()])
    kw = dict(model=str(tiny_vision), data=str(manifest), out=str(tmp_path / "s.h5"), progress=False, workers=0,
              batch_size=2, chunk_size=2)
    save, calls = ex._save_part, []

    def stop_after_one(path, arrays):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt
        save(path, arrays)

    monkeypatch.setattr(ex, "_save_part", stop_after_one)
    with pytest.raises(ex.ExtractInterrupted):
        extract(ExtractConfig(decode="cpu", **kw))
    monkeypatch.setattr(ex, "_save_part", save)
    with pytest.raises(SailError, match=r"decoded on the CPU; rerun with --decode cpu \(or auto\)"):
        extract(ExtractConfig(decode="gpu", **kw))
    opened = len(cpu_backend)
    res = extract(ExtractConfig(decode="auto", **kw))  # auto follows the unfinished extraction: CPU
    with FeatureStore(res.path) as s:
        assert json.loads(s.attrs["identity"])["decode"] == "cpu" and s.valid("image").all()
    assert len(cpu_backend) == opened  # auto kept to the CPU without opening a decoder


def test_reasons_name_no_memory_address(tmp_path):
    """PIL's "cannot identify image file <_io.BytesIO object at 0x7f...>" was stored as is: two extractions of the
    same files recorded different reasons."""
    from sail.data import load_image
    from sail.data.images import ImageError

    (tmp_path / "g.jpg").write_bytes(b"not an image")
    with pytest.raises(ImageError) as e:
        load_image(tmp_path / "g.jpg")
    assert str(e.value) == "unreadable image: cannot identify image file"


def test_parts_from_before_decode_existed_resume_as_cpu(tmp_path):
    from sail.encoders.extract import _parts_record

    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "meta.json").write_text(json.dumps({"modality": "image", "n": 3}))
    assert _parts_record(tmp_path / "p") == {"modality": "image", "n": 3, "decode": "cpu"}
    (tmp_path / "p" / "meta.json").write_text(json.dumps({"modality": "text", "n": 3}))
    assert "decode" not in _parts_record(tmp_path / "p")
