"""sail.data: every image mode, shard and manifest read correctly, or refused in one line."""

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sail.core.errors import SailError
from sail.data import images, manifests, shards
from sail.data import clip_benchmark_info, is_clip_benchmark, load_image, open_dataset


def _png(colour, size=(4, 3)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def _npy(vector) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asarray(vector))
    return buf.getvalue()


def write_tar(path, members) -> None:
    """A tar of (name, bytes) members, written as webdataset's TarWriter does (end blocks, padded records)."""
    with tarfile.open(path, "w") as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))


def make_clip_benchmark(root, kind="classification", split="test", per_shard=(3, 2), templates=True):
    """A tiny CLIP_benchmark webdataset root: <root>/<split>/{0..N-1}.tar + nshards.txt + metadata files."""
    (root / split).mkdir(parents=True)
    classes = ["cat", "dog", "bird"]
    expected, n = [], 0
    for k, count in enumerate(per_shard):
        members = []
        for _ in range(count):
            key = f"s{n:07d}"
            colour = (10 * n, 255 - 10 * n, 7)
            ext = ("webp", "png", "jpg")[n % 3] if kind == "classification" else "png"
            buf = io.BytesIO()
            Image.new("RGB", (5, 4), colour).save(buf, format={"jpg": "JPEG", "webp": "WEBP"}.get(ext, ext.upper()),
                                                  **({"lossless": True} if ext == "webp" else {}))
            members.append((f"{key}.{ext}", buf.getvalue()))
            if kind == "classification":
                label = n % 3
                members.append((f"{key}.cls", str(label).encode()))
            elif kind == "multilabel":
                label = [int(b) for b in np.binary_repr(n % 8, 3)]
                members.append((f"{key}.npy", _npy(label)))
            else:
                label = [f"caption {n} number {j}" for j in range(1 + n % 3)]
                members.append((f"{key}.txt", "\n".join(label).encode()))
            expected.append((key, colour, ext, label))
            n += 1
        write_tar(root / split / f"{k}.tar", members)
    (root / split / "nshards.txt").write_text(f"{len(per_shard)}\n")
    (root / "classnames.txt").write_text("\n".join(classes) + "\n")
    if templates:
        (root / "zeroshot_classification_templates.txt").write_text("a photo of a {c}.\na drawing of a {c}.\n")
    if kind != "classification":
        (root / "dataset_type.txt").write_text(kind + "\n")
    return expected


# ----------------------------------------------------------------------------------------- CLIP_benchmark


def test_clip_benchmark_classification(tmp_path):
    root = tmp_path / "wds_toy"
    expected = make_clip_benchmark(root)
    assert is_clip_benchmark(root) and is_clip_benchmark(root / "test") and not is_clip_benchmark(tmp_path)
    info = clip_benchmark_info(root)
    assert info.dataset_type == "classification" and info.splits == ["test"]
    assert info.class_names == ["cat", "dog", "bird"]
    assert info.templates == ["a photo of a {c}.", "a drawing of a {c}."]
    for spec in (root, root / "test"):  # the root with --split, or the split folder itself
        ds = open_dataset(str(spec), split="test")
        assert ds.name == "wds_toy-test" and ds.ids == [k for k, *_ in expected]
        assert ds.labels.tolist() == [label for *_, label in expected]
        assert ds.class_names == ["cat", "dog", "bird"] and ds.captions == {}
        for ref, (_, colour, ext, _) in zip(ds.images, expected):
            pixels = np.asarray(load_image(ref)).astype(int)
            assert pixels.shape == (4, 5, 3)
            if ext != "jpg":  # lossless formats give back the exact colour
                assert (pixels == colour).all()
            else:
                assert np.abs(pixels - colour).max() <= 4


def test_clip_benchmark_retrieval_captions_become_columns(tmp_path):
    root = tmp_path / "wds_flickr"
    expected = make_clip_benchmark(root, kind="retrieval", templates=False)
    info = clip_benchmark_info(root)
    assert info.dataset_type == "retrieval" and info.templates is None
    ds = open_dataset(str(root))
    assert list(ds.captions) == ["caption_0", "caption_1", "caption_2"] and ds.labels is None
    for i, (*_, lines) in enumerate(expected):
        got = [ds.captions[c][i] for c in ds.captions]
        assert got == lines + [""] * (3 - len(lines))
    only = open_dataset(str(root), columns=["caption_1"])
    assert list(only.captions) == ["caption_1"]
    with pytest.raises(SailError, match="no caption column 'caption'"):
        open_dataset(str(root), columns=["caption"])


def test_clip_benchmark_multilabel(tmp_path):
    root = tmp_path / "wds_voc"
    expected = make_clip_benchmark(root, kind="multilabel")
    ds = open_dataset(str(root))
    assert ds.multilabels.dtype == np.int8 and ds.multilabels.tolist() == [label for *_, label in expected]
    assert ds.class_names == ["cat", "dog", "bird"] and ds.labels is None


def test_clip_benchmark_split_and_mistakes(tmp_path):
    root = tmp_path / "wds_toy"
    make_clip_benchmark(root)
    make_clip_benchmark(tmp_path / "other", split="train")
    (tmp_path / "other" / "train").rename(root / "train")
    assert clip_benchmark_info(root).splits == ["test", "train"]
    assert open_dataset(str(root), split="train").name == "wds_toy-train"
    with pytest.raises(SailError, match="no split 'val'.*test, train"):
        open_dataset(str(root), split="val")
    (root / "test" / "1.tar").unlink()
    with pytest.raises(SailError, match=r"1\.tar is missing"):
        open_dataset(str(root))
    (root / "dataset_type.txt").write_text("detection\n")
    with pytest.raises(SailError, match="detection"):
        clip_benchmark_info(root)


def test_clip_benchmark_label_outside_classnames(tmp_path):
    root = tmp_path / "wds_toy"
    make_clip_benchmark(root)
    (root / "classnames.txt").write_text("cat\ndog\n")
    with pytest.raises(SailError, match="label 2, outside the 2 classes"):
        open_dataset(str(root))


def test_extract_cli_reads_clip_benchmark_split(tmp_path, tiny_vision, tiny_text, capsys):
    from sail.cli import main
    from sail.data.store import FeatureStore

    root = tmp_path / "wds_toy"
    expected = make_clip_benchmark(root, split="train")
    out = tmp_path / "img.h5"
    assert main(["extract", "--model", str(tiny_vision), "--data", str(root), "--split", "train",
                 "--out", str(out), "--workers", "0"]) == 0
    with FeatureStore(out) as s:
        assert list(s.ids) == [k for k, *_ in expected] and s.valid("image").all()
        assert s.labels.tolist() == [label for *_, label in expected] and s.class_names == ["cat", "dog", "bird"]
    capsys.readouterr()
    assert main(["extract", "--model", str(tiny_vision), "--data", str(root), "--out", str(tmp_path / "x.h5")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "no split 'test'" in err and len(err.splitlines()) == 1


# ----------------------------------------------------------------------------------------- truncated shards


def _img2dataset_members(n):
    """n samples of key.png + key.txt; one key long enough to need an extended (pax) header."""
    members, want = [], []
    for i in range(n):
        key = f"{i:04d}" if i != 2 else "k" * 120
        image = _png((i * 30, 5, 200), size=(2, 1))
        members += [(f"{key}.png", image), (f"{key}.txt", f"caption {i}".encode())]
        want.append((key, image, f"caption {i}"))
    return members, want


def _read_back(ds):
    out = []
    for sid, ref, caption in zip(ds.ids, ds.images, ds.captions["caption"]):
        shard, offset, size = ref[len("tar://"):].rsplit("::", 2)
        with open(shard, "rb") as f:
            f.seek(int(offset))
            out.append((sid, f.read(int(size)), caption))
    return out


def test_shard_cut_at_a_member_boundary_is_an_error_naming_it(tmp_path):
    members, want = _img2dataset_members(8)
    whole = tmp_path / "whole.tar"
    write_tar(whole, members)
    index = shards.shard_index(whole)
    # cut right after sample 5's caption: what an interrupted download leaves
    name, offset, size = index.members[2 * 5 - 1]
    shard = tmp_path / "shards" / "00000.tar"
    shard.parent.mkdir()
    shard.write_bytes(whole.read_bytes()[:offset + size + (-size) % 512])
    with pytest.raises(SailError, match=r"truncated shard .*00000\.tar: it lacks its end-of-archive blocks; 4 samples readable") as e:
        open_dataset(str(shard.parent))
    assert "--allow-truncated" in str(e.value) and "\n" not in str(e.value)
    ds = open_dataset(str(shard.parent), allow_truncated=True)
    assert _read_back(ds) == want[:4]  # the last sample before a cut may be incomplete: dropped too
    assert [(i, f) for i, f, _ in ds.skipped] == [("00000.tar", "shard")]
    assert ds.skipped[0][2].startswith("truncated shard: ")


def _check_every_cut(tmp_path, monkeypatch, every_offset: bool):
    """Property: a shard cut at a byte offset is either reported truncated or read completely and
    correctly; with --allow-truncated what is kept is an exact prefix missing at most one complete sample."""
    import functools
    import os
    import shutil
    import tempfile

    # thousands of cuts: index without the on-disk cache, and cut in memory-backed files where there are some
    monkeypatch.setattr(shards, "shard_index", functools.partial(shards.shard_index, cache=False))
    if os.access("/dev/shm", os.W_OK):
        tmp_path = Path(tempfile.mkdtemp(dir="/dev/shm"))
    members, want = _img2dataset_members(4)
    whole = tmp_path / "whole.tar"
    write_tar(whole, members)
    blob = whole.read_bytes()
    index = shards.shard_index(whole)
    last = index.members[-1]
    end_blocks = last[1] + last[2] + (-last[2]) % 512 + 1024  # the archive is complete from here on
    sample_end = [index.members[2 * i + 1][1] + index.members[2 * i + 1][2] for i in range(len(want))]
    shard = tmp_path / "cut" / "0.tar"
    shard.parent.mkdir()
    if every_offset:
        cuts = list(range(0, end_blocks + 1))
    else:  # every offset within 3 bytes of a block boundary or a member's end, and every 7th one between
        edges = [b for b in range(0, end_blocks + 1, 512)] + [o + n for _, o, n in index.members]
        cuts = sorted({c for e in edges for c in range(e - 3, e + 4) if 0 <= c <= end_blocks}
                      | set(range(0, end_blocks, 7)))
    cuts += list(range(end_blocks + 1, len(blob) + 1, 97)) + [len(blob)]
    detected = 0
    try:
        for cut in cuts:
            shard.write_bytes(blob[:cut])
            if cut >= end_blocks:
                assert _read_back(open_dataset(str(shard))) == want, cut
                continue
            with pytest.raises(SailError, match="truncated shard"):
                open_dataset(str(shard))
            kept = _read_back(open_dataset(str(shard), allow_truncated=True))
            complete = sum(e <= cut for e in sample_end)
            assert kept == want[:len(kept)] and complete - 1 <= len(kept) <= complete, cut
            detected += 1
    finally:
        shutil.rmtree(tmp_path, ignore_errors=True)
    return detected, end_blocks


def test_cuts_of_a_shard_are_detected_or_read_whole(tmp_path, monkeypatch):
    detected, end_blocks = _check_every_cut(tmp_path, monkeypatch, every_offset=False)
    assert detected > 1000


@pytest.mark.slow
def test_every_cut_of_a_shard_is_detected_or_read_whole(tmp_path, monkeypatch):
    detected, end_blocks = _check_every_cut(tmp_path, monkeypatch, every_offset=True)
    assert detected == end_blocks


def test_shard_index_is_cached_on_path_size_and_mtime(tmp_path, monkeypatch):
    members, want = _img2dataset_members(3)
    shard = tmp_path / "s" / "0.tar"
    shard.parent.mkdir()
    write_tar(shard, members)
    calls = []
    build = shards._build_shard_index
    monkeypatch.setattr(shards, "_build_shard_index", lambda *a: calls.append(a) or build(*a))
    for _ in range(3):
        assert _read_back(open_dataset(str(shard.parent))) == want
    assert len(calls) == 1
    import os

    st = shard.stat()
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched: indexed again
    open_dataset(str(shard.parent))
    assert len(calls) == 2


# ----------------------------------------------------------------------------------------- image modes


def _save(image, path, **kw):
    image.save(path, **kw)
    return str(path)


def _grey_rgb(values):
    """Expected RGB of a greyscale image whose expected grey levels are `values` (H, W)."""
    return np.repeat(np.asarray(values, dtype=np.uint8)[..., None], 3, axis=2)


@pytest.fixture(autouse=False)
def no_warnings():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


def test_16bit_png_is_scaled_by_its_range_not_saturated(tmp_path, no_warnings):
    values = np.array([[0, 1000], [4000, 2000]], dtype=np.uint16)
    path = _save(Image.fromarray(values), tmp_path / "g16.png")
    with Image.open(path) as im:
        assert im.mode.startswith("I")  # what 16-bit greyscale PNGs decode to
    got = np.asarray(load_image(path))
    want = _grey_rgb([[0, round(1000 / 4000 * 255)], [255, round(2000 / 4000 * 255)]])
    np.testing.assert_array_equal(got, want)


def test_16bit_big_endian_and_int32_greyscale():
    be = Image.frombytes("I;16B", (3, 1), np.array([[100, 300, 200]], dtype=">u2").tobytes())
    np.testing.assert_array_equal(np.asarray(images.to_rgb(be)), _grey_rgb([[0, 255, round(100 / 200 * 255)]]))
    i32 = Image.fromarray(np.array([[-5, 0], [5, 10]], dtype=np.int32), "I")
    want = [[0, round(5 / 15 * 255)], [round(10 / 15 * 255), 255]]
    np.testing.assert_array_equal(np.asarray(images.to_rgb(i32)), _grey_rgb(want))
    flat = Image.fromarray(np.full((1, 2), 7, dtype=np.uint16))  # constant: no range to scale by
    np.testing.assert_array_equal(np.asarray(images.to_rgb(flat)), _grey_rgb([[255, 255]]))


def test_float_greyscale_with_nan_and_inf(tmp_path, no_warnings):
    values = np.array([[0.25, -1.0], [np.nan, np.inf], [3.0, -np.inf]], dtype=np.float32)
    path = _save(Image.fromarray(values, "F"), tmp_path / "f.tif")
    got = np.asarray(load_image(path))
    # finite range -1 .. 3; NaN and -inf black, +inf white
    want = [[round((0.25 + 1) / 4 * 255), 0], [0, 255], [255, 0]]
    np.testing.assert_array_equal(got, _grey_rgb(want))


def test_palette_with_transparency_is_composited_on_white(tmp_path, no_warnings):
    image = Image.new("P", (3, 1))
    image.putpalette([200, 10, 10, 10, 20, 240, 0, 0, 0] + [0] * (256 * 3 - 9))
    image.putdata([0, 1, 2])
    image.info["transparency"] = bytes([255, 128, 0])  # index 0 opaque, 1 half, 2 fully transparent
    path = _save(image, tmp_path / "p.png", transparency=bytes([255, 128, 0]))
    with Image.open(path) as im:
        assert im.mode == "P" and "transparency" in im.info
    got = np.asarray(load_image(path)).astype(int)
    half = [round(c * 128 / 255 + 255 * 127 / 255) for c in (10, 20, 240)]
    np.testing.assert_array_equal(got, [[[200, 10, 10], half, [255, 255, 255]]])


def test_alpha_modes_and_grey_trns_composite_by_hand(tmp_path, no_warnings):
    la = Image.fromarray(np.array([[[100, 64], [30, 255]]], dtype=np.uint8), "LA")
    want = [round(100 * 64 / 255 + 255 * 191 / 255), 30]
    np.testing.assert_array_equal(np.asarray(load_image(_save(la, tmp_path / "la.png"))), _grey_rgb([want]))
    rgba = np.array([[[255, 0, 0, 0], [0, 0, 255, 200], [10, 20, 30, 255]]], dtype=np.uint8)
    got = np.asarray(load_image(_save(Image.fromarray(rgba, "RGBA"), tmp_path / "rgba.png")))
    mid = [round(c * 200 / 255 + 255 * 55 / 255) for c in (0, 0, 255)]
    np.testing.assert_array_equal(got, [[[255, 255, 255], mid, [10, 20, 30]]])
    grey = Image.fromarray(np.array([[0, 90]], dtype=np.uint8), "L")
    path = _save(grey, tmp_path / "trns.png", transparency=0)  # tRNS: grey level 0 is transparent
    np.testing.assert_array_equal(np.asarray(load_image(path)), _grey_rgb([[255, 90]]))


def test_premultiplied_alpha_modes_composite_on_white():
    """RGBa / La hold colour * alpha: over white that is premultiplied + 255 (1 - alpha), by hand."""
    from sail.data import to_rgb

    rgba = Image.frombytes("RGBa", (2, 1), bytes([100, 50, 20, 128, 9, 9, 9, 255]))
    np.testing.assert_allclose(np.asarray(to_rgb(rgba)), [[[227, 177, 147], [9, 9, 9]]], atol=1)
    la = Image.frombytes("La", (2, 1), bytes([100, 128, 50, 255]))
    np.testing.assert_allclose(np.asarray(to_rgb(la)), _grey_rgb([[227, 50]]), atol=1)


def test_cmyk_by_the_formula(tmp_path, no_warnings):
    cmyk = np.array([[[0, 0, 0, 0], [255, 0, 0, 0], [0, 128, 64, 100]]], dtype=np.uint8)
    path = _save(Image.frombytes("CMYK", (3, 1), cmyk.tobytes()), tmp_path / "c.tif")
    with Image.open(path) as im:
        assert im.mode == "CMYK"
    want = [[[255, 255, 255], [0, 255, 255],
             [round(255 * 155 / 255), round(127 * 155 / 255), round(191 * 155 / 255)]]]
    np.testing.assert_array_equal(np.asarray(load_image(path)), want)


def _s15(x) -> bytes:
    import struct

    return struct.pack(">i", round(x * 65536))


def cmyk_lab_profile(nodes) -> bytes:
    """A minimal ICC v2 CMYK printer profile: a lut8 A2B0 over a 2-point grid, (c, m, y, k) bits -> Lab.

    Nodes not given get L = 25 per set ink, a = b = 0. Pixels at the grid nodes (each ink 0 or 255)
    convert to exactly their node's Lab, so their sRGB values can be worked out by hand.
    """
    import struct

    clut = bytearray()
    for c in (0, 1):  # the first input channel varies slowest
        for m in (0, 1):
            for y in (0, 1):
                for k in (0, 1):
                    L, a, b = nodes.get((c, m, y, k), (25 * (c + m + y + k), 0, 0))
                    clut += bytes([round(L * 255 / 100), round(a + 128), round(b + 128)])  # v2 Lab encoding
    ident = bytes(range(256))
    lut = (b"mft1" + bytes(4) + bytes([4, 3, 2, 0]) + b"".join(_s15(v) for v in (1, 0, 0, 0, 1, 0, 0, 0, 1))
           + ident * 4 + bytes(clut) + ident * 3)
    text = b"sail test CMYK\x00"
    desc = b"desc" + bytes(4) + struct.pack(">I", len(text)) + text + bytes(8) + bytes(3) + bytes(67)
    d50 = _s15(0.9642) + _s15(1.0) + _s15(0.8249)
    tags = [(b"desc", desc), (b"wtpt", b"XYZ " + bytes(4) + d50), (b"A2B0", lut)]
    offset = 128 + 4 + 12 * len(tags)
    table, body = b"", b""
    for sig, blob in tags:
        blob += bytes(-len(blob) % 4)
        table += sig + struct.pack(">II", offset + len(body), len(blob))
        body += blob
    header = (struct.pack(">I", offset + len(body)) + bytes(4) + bytes([2, 0x10, 0, 0]) + b"prtr" + b"CMYK"
              + b"Lab " + bytes(12) + b"acsp" + bytes(28) + d50 + bytes(48))
    return header + struct.pack(">I", len(tags)) + table + body


def _srgb_grey(L) -> float:
    """sRGB level of the neutral grey with CIE lightness L (by hand: L* -> Y -> sRGB transfer curve)."""
    y = ((L + 16) / 116) ** 3 if L > 8 else L / 903.3
    v = 12.92 * y if y <= 0.0031308 else 1.055 * y ** (1 / 2.4) - 0.055
    return 255 * v


@pytest.mark.parametrize("draft", [None, 4])
def test_cmyk_jpeg_with_an_icc_profile_is_converted_by_the_profile(tmp_path, draft, no_warnings):
    """Inks 0/255 in 16-px blocks: the profile maps them to black, white, L=50 grey and sRGB red, all
    unlike what the plain formula gives (white, black, black, cyan)."""
    from PIL import ImageCms

    red = (54.29, 80.81, 69.89)  # sRGB (255, 0, 0) in D50 Lab
    profile = cmyk_lab_profile({(0, 0, 0, 0): (0, 0, 0), (1, 1, 1, 1): (100, 0, 0), (0, 0, 0, 1): (50, 0, 0),
                                (1, 0, 0, 0): red})
    inks = np.zeros((32, 64, 4), np.uint8)
    inks[:, 16:32] = 255
    inks[:, 32:48, 3] = 255
    inks[:, 48:, 0] = 255
    path = tmp_path / "cmyk.jpg"
    Image.fromarray(inks, "CMYK").save(path, quality=100, icc_profile=profile)
    with Image.open(path) as im:
        assert im.mode == "CMYK" and im.info["icc_profile"] == profile
        np.testing.assert_array_equal(np.asarray(im)[8, 8::16], inks[8, 8::16])  # the JPEG kept the inks
        reference = ImageCms.profileToProfile(im, ImageCms.ImageCmsProfile(io.BytesIO(profile)),
                                              ImageCms.createProfile("sRGB"), outputMode="RGB")
    got = load_image(path, draft=draft)
    scale = 1 if draft is None else 8  # draft 4: the 32-px side is decoded at 1/8
    assert got.mode == "RGB" and got.size == (64 // scale, 32 // scale)
    centres = np.asarray(got)[8 // scale, (8 // scale)::(16 // scale)].astype(int)
    grey = _srgb_grey(50)  # 118.9
    want = [[0, 0, 0], [255, 255, 255], [grey] * 3, [255, 0, 0]]
    np.testing.assert_allclose(centres, want, atol=3)
    if draft is None:
        np.testing.assert_array_equal(np.asarray(got), np.asarray(reference))
        np.testing.assert_array_equal(np.asarray(load_image(str(path))), np.asarray(got))  # a Path or its str


def test_cmyk_with_a_broken_icc_profile_falls_back_to_the_formula(tmp_path, no_warnings):
    inks = np.array([[[0, 0, 0, 0], [255, 0, 0, 0], [0, 128, 64, 100]]], dtype=np.uint8)
    path = tmp_path / "c.tif"
    Image.frombytes("CMYK", (3, 1), inks.tobytes()).save(path, icc_profile=b"not an ICC profile")
    with Image.open(path) as im:
        assert im.info.get("icc_profile") == b"not an ICC profile"
    want = [[[255, 255, 255], [0, 255, 255],
             [round(255 * 155 / 255), round(127 * 155 / 255), round(191 * 155 / 255)]]]
    np.testing.assert_array_equal(np.asarray(load_image(path)), want)


@pytest.mark.parametrize("orientation,turn", [(3, lambda a: np.rot90(a, 2)), (6, lambda a: np.rot90(a, -1)),
                                              (8, lambda a: np.rot90(a, 1)), (2, lambda a: a[:, ::-1])])
def test_exif_orientation_is_applied(tmp_path, orientation, turn):
    pixels = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3) * 10
    image = Image.fromarray(pixels, "RGB")
    exif = image.getexif()
    exif[0x0112] = orientation
    path = _save(image, tmp_path / "o.png", exif=exif)
    np.testing.assert_array_equal(np.asarray(load_image(path)), turn(pixels))


def test_pixel_limit_skips_with_a_reason_and_no_warning(tmp_path, monkeypatch, no_warnings):
    path = _save(Image.new("RGB", (20, 10), (1, 2, 3)), tmp_path / "big.png")
    with pytest.raises(images.ImageError, match=r"too large: 20x10 = 200 pixels, over the limit of 199"):
        load_image(path, max_pixels=199)
    assert load_image(path, max_pixels=200).size == (20, 10)
    # PIL's own guard: a warning above its limit, an error above twice it; our limit decides instead
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 90)
    assert load_image(path, max_pixels=1000).size == (20, 10)
    assert Image.MAX_IMAGE_PIXELS == 90  # lifted for that load only: PIL's setting is the process's, not ours
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 150)
    assert load_image(path, max_pixels=None).size == (20, 10)
    assert Image.MAX_IMAGE_PIXELS == 150


def test_extract_cli_truncated_shard_and_pixel_limit(tmp_path, tiny_vision, capsys):
    from sail.cli import main
    from sail.data.store import FeatureStore

    root = tmp_path / "wds_toy"
    expected = make_clip_benchmark(root)  # shards of 3 and 2 samples, images 5x4
    shard = root / "test" / "1.tar"
    index = shards.shard_index(shard)
    _, offset, size = index.members[1]  # cut after the first sample's two members
    shard.write_bytes(shard.read_bytes()[:offset + size])
    out = tmp_path / "img.h5"
    argv = ["extract", "--model", str(tiny_vision), "--data", str(root), "--out", str(out), "--workers", "0"]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: truncated shard ") and "1.tar" in err and len(err.splitlines()) == 1
    assert not out.exists()
    assert main(argv + ["--allow-truncated", "--max-pixels", "19"]) == 0
    assert "skipped 4: too large x3; truncated shard x1" in capsys.readouterr().out
    with FeatureStore(out) as s:
        assert list(s.ids) == [k for k, *_ in expected[:3]] and not s.valid("image").any()
        reasons = [(i, f, r.split(":")[0]) for i, f, r in s.skipped]
        assert sorted(reasons) == sorted([(k, "image", "too large") for k, *_ in expected[:3]]
                                         + [("1.tar", "shard", "truncated shard")])


# ----------------------------------------------------------------------------------------- manifests


def test_csv_read_as_text_matches_the_csv_module(tmp_path):
    import csv
    import random

    rng = random.Random(0)
    rows = [["id", "image", "caption", "label"]]
    for i in range(300):
        caption = rng.choice(["a cat", 'say "hi", then leave', "two\nlines", "comma, inside", "", "café ☕", " 12 "])
        rows.append([f"{i:05d}", f"img/{i}.png" if i % 7 else "", caption, rng.choice(["cat", "dog"])])
    path = tmp_path / "m.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(rows)
    ds = open_dataset(str(path))
    want = rows[1:]
    assert ds.ids == [r[0] for r in want]  # "00042" stays text
    assert ds.captions == {"caption": [r[2] for r in want]}
    assert ds.images == [str(tmp_path / r[1]) if r[1] else None for r in want]
    assert ds.class_names == ["cat", "dog"] and ds.labels.tolist() == [["cat", "dog"].index(r[3]) for r in want]
    tsv = tmp_path / "m.tsv"
    with open(tsv, "w", newline="", encoding="utf-8") as f:
        csv.writer(f, delimiter="\t").writerows(rows)
    assert open_dataset(str(tsv)).captions == ds.captions


def test_encoding_error_names_the_line_and_encoding_flag_reads_it(tmp_path):
    path = tmp_path / "latin.csv"
    path.write_bytes("id,caption\na,plain\nb,caf\u00e9 au lait\n".encode("latin-1"))
    with pytest.raises(SailError, match=r"latin\.csv:3 is not utf-8 text .*--encoding") as e:
        open_dataset(str(path))
    assert "\n" not in str(e.value)
    assert open_dataset(str(path), encoding="latin-1").captions["caption"] == ["plain", "caf\u00e9 au lait"]
    wide = tmp_path / "wide.tsv"
    wide.write_bytes("id\tcaption\nx\t\u00fcber\n".encode("utf-16"))
    assert open_dataset(str(wide), encoding="utf-16").captions["caption"] == ["\u00fcber"]
    jl = tmp_path / "m.jsonl"
    jl.write_bytes(b'{"id": "a", "caption": "ok"}\n{"id": "b", "caption": "caf\xe9"}\n')
    with pytest.raises(SailError, match=r"m\.jsonl:2 is not utf-8 text"):
        open_dataset(str(jl))
    assert open_dataset(str(jl), encoding="cp1252").captions["caption"] == ["ok", "caf\u00e9"]
    with pytest.raises(SailError, match="unknown --encoding 'klingon'"):
        open_dataset(str(jl), encoding="klingon")


def test_encoding_check_names_the_right_line_at_any_block_size(tmp_path, monkeypatch):
    """Property: over random files, bad-byte positions and block sizes, the line named is the bad one."""
    import random

    rng = random.Random(1)
    path = tmp_path / "x.csv"
    for trial in range(400):
        lines = ["".join(rng.choice("ab\u00e9,") for _ in range(rng.randint(0, 12))) for _ in range(rng.randint(1, 30))]
        bad = rng.randrange(len(lines))
        blob = [ln.encode("utf-8") for ln in lines]
        at = rng.randint(0, len(blob[bad]))
        blob[bad] = blob[bad][:at] + rng.choice([b"\xff", b"\xe9", b"\xc3"]) + blob[bad][at:]
        path.write_bytes(b"\n".join(blob) + (b"\n" if rng.random() < 0.5 else b""))
        monkeypatch.setattr(manifests, "_ENCODING_BLOCK", rng.randint(1, 64))
        with pytest.raises(SailError) as e:
            manifests.check_encoding(path)
        assert f"x.csv:{bad + 1} is not utf-8" in str(e.value), (trial, bad, str(e.value))


def _parquet(path, columns):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), path)
    return str(path)


def test_non_text_captions_and_ids_are_refused_naming_the_row(tmp_path):
    lists = _parquet(tmp_path / "l.parquet", {"id": ["a", "b"], "caption": [None, [1, 2]]})
    with pytest.raises(SailError, match=r"caption column 'caption' holds list<.*> values \(row 2: \[1, 2\]\)"):
        open_dataset(lists)
    floats = _parquet(tmp_path / "f.parquet", {"id": ["a", "b"], "caption": [0.5, 1.5]})
    with pytest.raises(SailError, match=r"holds double values \(row 1: 0\.5\); captions must be text"):
        open_dataset(floats)
    fid = _parquet(tmp_path / "fid.parquet", {"id": [1.5, 2.0], "caption": ["x", "y"]})
    with pytest.raises(SailError, match=r"id column 'id' holds double values \(row 1: 1\.5\)"):
        open_dataset(fid)
    ok = _parquet(tmp_path / "ok.parquet", {"id": [7, 8], "caption": ["x", None], "label": [1, 0]})
    ds = open_dataset(ok)
    assert ds.ids == ["7", "8"] and ds.captions["caption"] == ["x", ""] and ds.labels.tolist() == [1, 0]
    jl = tmp_path / "m.jsonl"
    jl.write_text('{"id": "a", "caption": "fine"}\n\n{"id": "b", "caption": ["a", "list"]}\n')
    with pytest.raises(SailError, match=r"m\.jsonl:3: column 'caption' holds a list \(\[\"a\", \"list\"\]\) but a string on line 1"):
        open_dataset(str(jl))
    jl.write_text('{"id": "a", "caption": 1.5}\n{"id": "b", "caption": 2}\n')
    with pytest.raises(SailError, match=r"caption column 'caption' holds double values \(row 1: 1\.5\)"):
        open_dataset(str(jl))
    jl.write_text('{"id": "a", "caption": "x"}\n{"id": oops}\n')
    with pytest.raises(SailError, match=r"m\.jsonl:2 is not valid JSON"):
        open_dataset(str(jl))


@pytest.mark.parametrize("kind", ["csv", "jsonl", "parquet"])
def test_empty_ids_are_refused_naming_the_row(tmp_path, kind):
    path = tmp_path / f"m.{kind}"
    if kind == "csv":
        path.write_text("id,caption\na,x\n,y\n")
    elif kind == "jsonl":
        path.write_text('{"id": "a", "caption": "x"}\n{"caption": "y"}\n')
    else:
        _parquet(path, {"id": ["a", None], "caption": ["x", "y"]})
    with pytest.raises(SailError, match=r"row 2 has an empty id \(column 'id'\)"):
        open_dataset(str(path))


@pytest.mark.parametrize("kind,content", [("csv", ""), ("csv", "\n  \n"), ("tsv", ""), ("jsonl", ""), ("jsonl", "\n\n")])
def test_an_empty_manifest_says_it_is_empty(tmp_path, kind, content):
    path = tmp_path / f"m.{kind}"
    path.write_text(content)
    with pytest.raises(SailError, match=r"m\.\w+ is empty; a manifest needs a header"):
        open_dataset(str(path))
    path.write_text("id,caption\n" if kind == "csv" else ("id\tcaption\n" if kind == "tsv" else content))
    if kind != "jsonl":
        with pytest.raises(SailError, match=r"has a header \(id, caption\) but no rows"):
            open_dataset(str(path))


def test_extract_cli_manifest_mistakes_are_one_line(tmp_path, tiny_text, capsys):
    from sail.cli import main

    path = tmp_path / "latin.csv"
    path.write_bytes("id,caption\na,caf\u00e9\n".encode("latin-1"))
    argv = ["extract", "--model", str(tiny_text), "--data", str(path), "--out", str(tmp_path / "t.h5")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "latin.csv:2 is not utf-8 text" in err and len(err.splitlines()) == 1
    assert main(argv + ["--encoding", "latin-1", "--workers", "0"]) == 0
    (tmp_path / "empty.csv").write_text("")
    capsys.readouterr()
    assert main(["extract", "--model", str(tiny_text), "--data", str(tmp_path / "empty.csv")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "empty.csv is empty" in err and len(err.splitlines()) == 1


def test_load_image_lets_no_pil_warning_through(tmp_path, monkeypatch, no_warnings):
    import warnings

    path = _save(Image.new("RGB", (3, 2), (9, 8, 7)), tmp_path / "w.png")
    real = images.to_rgb

    def noisy(image, background=images.BACKGROUND):  # as PIL does for odd EXIF / TIFF tags
        warnings.warn("Corrupt EXIF data", UserWarning)
        return real(image, background)

    monkeypatch.setattr(images, "to_rgb", noisy)
    assert np.asarray(load_image(path)).tolist() == [[[9, 8, 7]] * 3] * 2


@pytest.mark.parametrize("kind", ["csv", "parquet"])
def test_a_repeated_column_name_is_refused_naming_it(tmp_path, kind):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / f"m.{kind}"
    if kind == "csv":
        path.write_text("id,caption,caption\na,x,y\n")
    else:
        pq.write_table(pa.Table.from_arrays([pa.array(["a"]), pa.array(["x"]), pa.array(["y"])],
                                            names=["id", "caption", "caption"]), path)
    with pytest.raises(SailError, match=r"m\.\w+: column name\(s\) 'caption' appear more than once in the header"):
        open_dataset(str(path))
    assert open_dataset(str(path), columns=[]).ids == ["a"]  # a repeat among unread columns does no harm
    if kind == "csv":  # nor do the empty names of trailing commas (spreadsheet exports)
        path.write_text("id,caption,,\na,x,,\n")
        assert open_dataset(str(path)).captions == {"caption": ["x"]}


def test_only_the_needed_columns_are_read(tmp_path, monkeypatch):
    """A wide manifest: columns that are not the id, image, label or a caption are never decoded."""
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    wide = {"id": ["a", "b"], "image": ["1.jpg", ""], "caption": ["x", "y"], "label": [3, 4],
            "embedding": [[0.5] * 4, [1.5] * 4], "notes": ["n1", "n2"]}
    path = _parquet(tmp_path / "w.parquet", wide)
    seen = []
    real_pq, real_csv = pq.read_table, pcsv.read_csv
    monkeypatch.setattr(pq, "read_table", lambda p, columns=None, **k: seen.append(columns) or real_pq(p, columns=columns, **k))
    monkeypatch.setattr(pcsv, "read_csv", lambda p, convert_options=None, **k: seen.append(
        convert_options.include_columns) or real_csv(p, convert_options=convert_options, **k))
    ds = open_dataset(path)
    assert seen == [["id", "image", "label", "caption"]]
    assert ds.captions == {"caption": ["x", "y"]} and ds.images == [str(tmp_path / "1.jpg"), None]
    (tmp_path / "w.csv").write_text("id,notes,caption,long_caption\na,n,x,xx\n")
    ds = open_dataset(str(tmp_path / "w.csv"), columns=["long_caption"])
    assert seen[1] == ["id", "long_caption"] and ds.captions == {"long_caption": ["xx"]} and ds.images == [None]
