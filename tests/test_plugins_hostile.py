"""Hostile encoder plugins, running out of room, odd API inputs and misleading messages (issue 20, classes 5-8).

Each case ends in one `error: ...` line naming what went wrong (no traceback), or in an honest recovery
(a store whose skipped list counts what the encoder could not give, a resume that equals an uninterrupted
run). The plugins decide per sample, not per call, so batching never changes what a test expects:
a sample image is a flat colour (R, G, 50) with R = 10 + 20 i; "poison" samples have G = 200, the
others G = 100, and the probe image sail builds (grey 128) is neither.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sail.cli import main
from sail.core.errors import SailError
from sail.data.store import FeatureStore
from sail.encoders.extract import NON_FINITE, OVERFLOW, ExtractConfig, ExtractInterrupted, _save_part, extract

ROOT = Path(__file__).resolve().parents[1]
N, POISON = 8, (2, 5)

MODULE = '''
import numpy as np
import torch
from sail.encoders.zoo import encoder


def poison(pixels):                                   # (B, 3, H, W) -> (B,) bool: the G = 200 samples
    return pixels[:, 1].mean((1, 2)) > 0.7


class Pre:
    def __init__(self, size=8, grow=False):
        self.size, self.grow = size, grow

    def __call__(self, image):
        a = np.asarray(image.convert("RGB"), dtype=np.float32) / 255
        size = self.size + (1 if self.grow and a[0, 0, 1] > 0.7 else 0)   # poison samples come out bigger
        return torch.from_numpy(a[:1, :1]).permute(2, 0, 1).expand(3, size, size).contiguous()


class Net(torch.nn.Module):
    """Features = R + 1 in every column (R in [0, 1]); `mode` decides what poison samples get."""

    def __init__(self, dim=4, mode="ok"):
        super().__init__()
        self.dim, self.mode = dim, mode

    def forward(self, pixels):
        x = pixels[:, 0, 0, :1].expand(-1, self.dim) + 1
        bad = poison(pixels)
        if self.mode == "raise" and bad.any():
            raise ValueError("weights file is corrupt")
        if self.mode == "interrupt" and bad.any():
            raise KeyboardInterrupt
        if self.mode == "nan_some":
            x = torch.where(bad[:, None], float("nan"), x)
        if self.mode == "nan_all":
            probe = (pixels[:, 1].mean((1, 2)) - 128 / 255).abs() < 1e-3    # sail's grey probe image
            x = torch.where(probe[:, None], x, float("nan"))
        if self.mode == "huge":
            x = torch.where(bad[:, None], 1e6, x)
        if self.mode == "vary_d" and bad.any():
            return torch.cat([x, x], 1)
        if self.mode == "int":
            return x.long()
        if self.mode == "rows" and bad.any():
            return x[:1]
        return x


@encoder("image")
def img(mode: str = "ok", dim: int = 4):
    return Net(dim, mode), Pre()


@encoder("image")
def growing():
    return Net(4), Pre(grow=True)


@encoder("image")
def fails_to_build(size: int = 8):
    raise RuntimeError("cannot find checkpoint /weights/net.pt")


class PickyPre(Pre):
    def __call__(self, image):
        if image.size != (32, 32):                                  # only sail's probe image passes
            raise ValueError("expects a 32 x 32 image")
        return super().__call__(image)


@encoder("image")
def picky():
    return Net(4), PickyPre()


class KillerPre(Pre):
    def __call__(self, image):
        import os, signal
        if np.asarray(image)[0, 0, 1] == 200 and torch.utils.data.get_worker_info() is not None:
            os.kill(os.getpid(), signal.SIGKILL)                    # the kernel's OOM killer, say
        return super().__call__(image)


@encoder("image")
def killer():
    return Net(4), KillerPre()


class Slow(Net):
    def forward(self, pixels):
        import time
        time.sleep(0.3)
        return super().forward(pixels)


@encoder("image")
def slow():
    return Slow(4), Pre()


def tokenize(texts):
    return torch.tensor([[float(len(t)), float("poison" in t)] for t in texts])


class TextNet(torch.nn.Module):
    def forward(self, t):
        return torch.where(t[:, 1:] > 0, float("nan"), t[:, :1].expand(-1, 3) / 10)


@encoder("text")
def txt():
    return TextNet(), tokenize
'''


@pytest.fixture(scope="module")
def plugin(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    (root / "hostile_encoders.py").write_text(MODULE)
    sys.path.insert(0, str(root))
    yield root
    sys.path.remove(str(root))
    sys.modules.pop("hostile_encoders", None)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """N flat-colour images and a manifest; samples in POISON have G = 200 and a caption saying poison."""
    root = tmp_path_factory.mktemp("hostile_data")
    lines = ["id,image,caption"]
    for i in range(N):
        Image.new("RGB", (6, 6), (10 + 20 * i, 200 if i in POISON else 100, 50)).save(root / f"im{i}.png")
        lines.append(f"k{i},im{i}.png,{'poison' if i in POISON else 'caption'} {i}")
    (root / "m.csv").write_text("\n".join(lines) + "\n")
    return root / "m.csv"


def want_image(i: int, dim: int = 4) -> np.ndarray:
    return np.full(dim, (10 + 20 * i) / 255 + 1, np.float32)


def cli(args: list[str], capsys) -> tuple[int, str]:
    rc = main(args)
    return rc, capsys.readouterr().err


def run_extract(model: str, data: Path, out: Path, capsys, *extra: str) -> tuple[int, str]:
    return cli(["extract", "--model", model, "--data", str(data), "--out", str(out), "--workers", "0",
                "--batch-size", "3", "--chunk-size", "4", *extra], capsys)


def one_error_line(err: str) -> str:
    """The last line of stderr (progress bars come before it) is the error, and there is no traceback."""
    assert "Traceback" not in err
    line = err.replace("\r", "\n").strip().splitlines()[-1]
    assert line.startswith("error: "), err
    return line


# ------------------------------------------------------------------------------- class 5: the plugin boundary


@pytest.mark.parametrize("model, says", [
    ('hostile_encoders:img(mode="raise")', "model(pixels) raised ValueError: weights file is corrupt"),
    ("hostile_encoders:fails_to_build", "building the encoder raised RuntimeError: cannot find checkpoint /weights/net.pt"),
    ('hostile_encoders:img(mdoe="raise")', "no keyword argument 'mdoe' (it takes mode, dim); did you mean mode?"),
    ('hostile_encoders:img(mode="vary_d")', "returned 8-d features for this batch but 4-d for the first"),
    ("hostile_encoders:growing", "preprocessing returned (3, 8, 8) for sample 'k0' but (3, 9, 9) for sample 'k2'"),
    ('hostile_encoders:img(mode="int")', "returned torch.int64 features; they must be floating point"),
    ('hostile_encoders:img(mode="rows")', "one row per input (B = 3); got Tensor (1, 4)"),
    ("hostile_encoders:picky", "preprocessing failed on every image (samples 'k0' to 'k3'), e.g. expects a 32 x 32"),
    ('hostile_encoders:img(mode="nan_all")', "returned NaN or inf features for every one of the 4 samples it encoded "
                                             "(samples 'k0' to 'k3')"),
])
def test_a_hostile_plugin_is_one_line_naming_the_spec_and_leaves_nothing(plugin, data, tmp_path, capsys, model, says):
    out = tmp_path / "x.h5"
    rc, err = run_extract(model, data, out, capsys)
    line = one_error_line(err)
    assert rc == 2 and says in line and model in line, line
    assert list(tmp_path.iterdir()) == []  # no store, no parts, no temp file


@pytest.mark.parametrize("spec", ['hostile_encoders:img(mode="ok"', 'hostile_encoders:img(mode=ok)',
                                  "hostile_encoders:img(**{'mode': 'ok'})", 'hostile_encoders:img("ok")',
                                  'hostile_encoders:img(mode="ok") extra'])
def test_a_malformed_spec_gets_the_spec_error_not_alias_advice(plugin, data, tmp_path, capsys, spec):
    rc, err = run_extract(spec, data, tmp_path / "x.h5", capsys)
    line = one_error_line(err)
    assert rc == 2 and ("package.module:function" in line or "key=value" in line), line
    assert "unknown model" not in line and "Hugging Face id" not in line


def test_sail_debug_prints_the_plugins_own_traceback(plugin, data, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SAIL_DEBUG", "1")
    rc, err = run_extract('hostile_encoders:img(mode="raise")', data, tmp_path / "x.h5", capsys)
    assert rc == 2 and "Traceback" in err and 'raise ValueError("weights file is corrupt")' in err
    assert err.strip().splitlines()[-1].startswith("error: encoder hostile_encoders:img")


def test_nan_rows_are_skipped_and_counted_not_stored_as_complete(plugin, data, tmp_path, capsys):
    rc = main(["extract", "--model", 'hostile_encoders:img(mode="nan_some")', "--data", str(data), "--out",
               str(tmp_path / "x.h5"), "--workers", "0", "--batch-size", "3", "--chunk-size", "4"])
    assert rc == 0
    assert f"skipped {len(POISON)}: {NON_FINITE} x{len(POISON)}" in capsys.readouterr().out
    with FeatureStore(tmp_path / "x.h5") as s:
        valid = s.valid("image")
        assert [i for i in range(N) if not valid[i]] == list(POISON)
        assert sorted(s.skipped) == [(f"k{i}", "image", NON_FINITE) for i in POISON]
        feats = s.read("image").astype(np.float32)
        assert np.isfinite(feats).all()  # a skipped row holds zeros, never NaN
        for i in range(N):
            if i not in POISON:
                np.testing.assert_allclose(feats[i], want_image(i), atol=1e-3)


def test_float16_overflow_is_counted_as_overflow(plugin, data, tmp_path):
    res = extract(ExtractConfig(model='hostile_encoders:img(mode="huge")', data=str(data), out=str(tmp_path / "x.h5"),
                                workers=0, batch_size=3, chunk_size=4, progress=False))
    assert res.skipped == {OVERFLOW.split(":")[0]: len(POISON)}
    with FeatureStore(res.path) as s:
        assert [i for i, v in enumerate(s.valid("image")) if not v] == list(POISON)
        assert np.isfinite(s.read("image").astype(np.float32)).all()


def test_text_encoder_nan_rows_are_skipped(plugin, data, tmp_path):
    res = extract(ExtractConfig(model="hostile_encoders:txt", data=str(data), out=str(tmp_path / "t.h5"),
                                batch_size=3, chunk_size=4, progress=False))
    assert res.skipped == {NON_FINITE: len(POISON)}
    with FeatureStore(res.path) as s:
        feats, valid = s.read("caption").astype(np.float32), s.valid("caption")
        for i in range(N):
            assert valid[i] == (i not in POISON)
            want = np.zeros(3) if i in POISON else np.full(3, len(f"caption {i}") / 10)
            np.testing.assert_allclose(feats[i], want, atol=1e-2)


# ------------------------------------------------------------------------------- class 6: running out of room


def _subprocess_env(plugin: Path) -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(plugin)])}


def test_file_size_limit_is_one_line_before_anything_is_written(plugin, data, tmp_path):
    """RLIMIT_FSIZE below the store's size: refused before extracting (HDF5 failing mid-write can crash)."""
    import resource

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (8192, 8192))

    out = tmp_path / "x.h5"
    cmd = [sys.executable, "-m", "sail.cli", "extract", "--model", "hostile_encoders:img(dim=64)", "--data", str(data),
           "--out", str(out), "--workers", "0", "--chunk-size", "4"]
    p = subprocess.run(cmd, preexec_fn=limit, env=_subprocess_env(plugin), capture_output=True, text=True, timeout=300)
    line = one_error_line(p.stderr)
    assert p.returncode == 2 and "may not write files over 8 KiB (ulimit -f)" in line, p.stderr
    assert list(tmp_path.iterdir()) == []
    p = subprocess.run(cmd, env=_subprocess_env(plugin), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    with FeatureStore(out) as s:
        np.testing.assert_allclose(s.read("image", [7]).astype(np.float32)[0], want_image(7, 64), atol=1e-3)


def _disk_full_for(name: str, monkeypatch, err=None):
    """os.write fills the disk (half a write, then ENOSPC) for files whose name contains `name`: parts are written
    through sail.core.artifacts.write_atomic, whose temporary file carries the part's name."""
    import errno
    import os

    real = os.write

    def write(fd, data):
        if name in os.readlink(f"/proc/self/fd/{fd}"):
            real(fd, bytes(data[: len(data) // 2]))
            raise OSError(*(err or (errno.ENOSPC, "No space left on device")))
        return real(fd, data)

    monkeypatch.setattr(os, "write", write)


def test_a_full_disk_while_writing_a_part_keeps_the_finished_ones(plugin, data, tmp_path, monkeypatch):
    _disk_full_for("part-000001", monkeypatch)
    out = tmp_path / "x.h5"
    cfg = ExtractConfig(model="hostile_encoders:img", data=str(data), out=str(out), workers=0, chunk_size=4,
                        progress=False)
    with pytest.raises(SailError, match=r"cannot write .*part-000001.npz \(no space left on the device\).*again") as e:
        extract(cfg)
    assert "\n" not in str(e.value)
    assert sorted(p.name for p in (tmp_path / "x.h5.parts").iterdir()) == ["meta.json", "part-000000.npz"]
    monkeypatch.undo()
    res = extract(cfg)  # resumes: only chunk 1 is extracted again
    with FeatureStore(res.path) as s:
        np.testing.assert_allclose(s.read("image").astype(np.float32), np.stack([want_image(i) for i in range(N)]),
                                   atol=1e-3)


def test_a_disk_that_fills_while_the_store_is_merged_keeps_the_parts(plugin, data, tmp_path, monkeypatch):
    """After the room check passed, another process fills the disk while the parts are merged into the store:
    one line, no half store, the parts kept, and the same command finishes the store."""
    import errno

    from sail.data.store import StoreWriter

    real = StoreWriter.write

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(StoreWriter, "write", full)
    out = tmp_path / "x.h5"
    cfg = ExtractConfig(model="hostile_encoders:img", data=str(data), out=str(out), workers=0, chunk_size=4,
                        progress=False)
    with pytest.raises(SailError, match=r"cannot write .*x.h5 \(No space left on device\).*chunks .* are kept") as e:
        extract(cfg)
    assert "\n" not in str(e.value)
    assert not out.exists() and not (tmp_path / "x.h5.partial").exists()
    assert len(list((tmp_path / "x.h5.parts").glob("part-*.npz"))) == -(-N // 4)
    monkeypatch.setattr(StoreWriter, "write", real)
    res = extract(cfg)
    with FeatureStore(res.path) as s:
        np.testing.assert_allclose(s.read("image").astype(np.float32), np.stack([want_image(i) for i in range(N)]),
                                   atol=1e-3)


def test_save_part_on_a_full_disk_leaves_no_tmp(tmp_path, monkeypatch):
    import errno

    _disk_full_for("part-000003", monkeypatch, (errno.EFBIG, "File too large"))
    with pytest.raises(SailError, match=r"cannot write .*part-000003.npz \(.*too large"):
        _save_part(tmp_path / "part-000003.npz", {"a": np.zeros(3)})
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []


def test_a_killed_decoding_worker_is_one_line_not_a_hang(plugin, data, tmp_path):
    cmd = [sys.executable, "-m", "sail.cli", "extract", "--model", "hostile_encoders:killer", "--data", str(data),
           "--out", str(tmp_path / "x.h5"), "--workers", "1", "--batch-size", "1", "--chunk-size", "2"]
    start = time.time()
    p = subprocess.run(cmd, env=_subprocess_env(plugin), capture_output=True, text=True, timeout=240)
    line = one_error_line(p.stderr)
    assert p.returncode == 2 and "an image decoding worker died" in line and "fewer --workers" in line
    assert time.time() - start < 200
    # nothing half-written: at most the finished parts (whether chunk 0 arrived before the death is a race)
    assert not (tmp_path / "x.h5").exists() and not list(tmp_path.rglob("*.tmp"))
    assert {x.name for x in tmp_path.rglob("*") if x.is_file()} <= {"meta.json", "part-000000.npz"}


# ------------------------------------------------------------------------------- Ctrl-C: what is kept, how to resume


def test_ctrl_c_prints_the_resume_command_and_the_resume_equals_a_clean_run(plugin, data, tmp_path, capsys):
    args = ["extract", "--model", 'hostile_encoders:img(mode="interrupt")', "--data", str(data), "--out",
            str(tmp_path / "x.h5"), "--workers", "0", "--batch-size", "2", "--chunk-size", "2"]
    rc, err = cli(args, capsys)  # the model raises KeyboardInterrupt at sample 2, as Ctrl-C would
    assert rc == 130
    assert "interrupted; 1 of 4 chunks of" in err and "Resume with:\n  sail extract --model" in err
    with pytest.raises(ExtractInterrupted):  # the Python API still sees a KeyboardInterrupt
        extract(ExtractConfig(model='hostile_encoders:img(mode="interrupt")', data=str(data),
                              out=str(tmp_path / "y.h5"), workers=0, batch_size=2, chunk_size=2, progress=False))


@pytest.mark.slow
def test_sigint_to_the_process_group_then_resume(plugin, data, tmp_path):
    """A real Ctrl-C (SIGINT to the whole group, DataLoader workers included), then the printed command."""
    out = tmp_path / "x.h5"
    cmd = [sys.executable, "-m", "sail.cli", "extract", "--model", "hostile_encoders:slow", "--data", str(data),
           "--out", str(out), "--workers", "1", "--batch-size", "1", "--chunk-size", "2"]
    p = subprocess.Popen(cmd, env=_subprocess_env(plugin), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    parts = tmp_path / "x.h5.parts"
    deadline = time.time() + 200
    while not (parts / "part-000000.npz").exists() and time.time() < deadline and p.poll() is None:
        time.sleep(0.05)
    os.killpg(p.pid, signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130 and "Resume with:" in err and "Traceback" not in err, err
    assert (parts / "part-000000.npz").exists() and not out.exists()
    p = subprocess.run(cmd, env=_subprocess_env(plugin), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    with FeatureStore(out) as s:
        np.testing.assert_allclose(s.read("image").astype(np.float32), np.stack([want_image(i) for i in range(N)]),
                                   atol=1e-3)


# ------------------------------------------------------------------------------- class 7: the Python API


@pytest.fixture(scope="module")
def model(plugin):
    from sail.train.heads import AlignmentHeads
    from sail.train.model import SAILModel

    torch.manual_seed(0)
    heads = AlignmentHeads(4, 3, out_dim=5, kind="linear")
    return SAILModel(heads, "hostile_encoders:img", "hostile_encoders:txt", device="cpu")


def test_encode_image_takes_numpy_and_tensors(model):
    rgb = np.zeros((6, 6, 3), np.uint8)
    rgb[...] = (70, 100, 50)
    want = model.encode_image(Image.fromarray(rgb))
    chw = torch.from_numpy(rgb).permute(2, 0, 1)
    for x in (rgb, chw, chw.float() / 255, np.stack([rgb, rgb]), [rgb, chw], (rgb,)):
        got = model.encode_image(x)
        assert torch.allclose(got, want.expand(len(got), -1), atol=1e-5), type(x)
    np.testing.assert_allclose(model.image_features([rgb])[0].numpy(), np.full(4, 70 / 255 + 1), atol=1e-6)


@pytest.mark.parametrize("bad", [None, 3, b"bytes", np.zeros((6, 6, 5), np.uint8), torch.zeros(2, 6, 6),
                                 np.full((6, 6, 3), 7.0), {"image": 1}])
def test_encode_image_refuses_others_in_one_type_error(model, bad):
    with pytest.raises(TypeError, match="encode_image takes a PIL image, a file path") as e:
        model.encode_image(bad)
    assert "\n" not in str(e.value)


def test_encode_text_refuses_none_and_non_strings(model):
    for bad in (None, 3, [None], ["a", 1], b"x"):
        with pytest.raises(TypeError, match="encode_text takes a string or a list of strings"):
            model.encode_text(bad)
    assert torch.allclose(model.encode_text("abc"), model.encode_text(["abc"]))
    assert model.encode_text([]).shape == (0, 5)


# ------------------------------------------------------------------------------- class 8: honest messages


def test_parquet_category_text_columns_are_text(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from sail.data import open_dataset

    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    table = pa.table({"id": pa.array(["x1", "x2", "x3"]).dictionary_encode(),
                      "caption": pa.array(["a cat", "a dog", "a cat"]).dictionary_encode(),
                      "image": pa.array(["a.png"] * 3).dictionary_encode()})
    pq.write_table(table, tmp_path / "m.parquet")
    ds = open_dataset(str(tmp_path / "m.parquet"))
    assert list(ds.ids) == ["x1", "x2", "x3"] and ds.captions["caption"][:] == ["a cat", "a dog", "a cat"]
    assert Path(ds.images[2]).resolve() == (tmp_path / "a.png").resolve()


def test_a_network_failure_is_not_reported_as_offline_mode(monkeypatch, tmp_path):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    from sail.hub import resolve_pretrained

    def unreachable(*args, **kwargs):
        try:
            raise ConnectionError("Failed to resolve 'huggingface.co'")
        except ConnectionError as e:
            raise LocalEntryNotFoundError("An error happened while trying to locate the files on the Hub") from e

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", unreachable)
    with pytest.raises(SailError) as e:
        resolve_pretrained("someone/run", cache_dir=tmp_path)
    msg = str(e.value)
    assert "offline mode" not in msg and "could not be reached (ConnectionError: Failed to resolve" in msg
    assert "check your network" in msg
    with pytest.raises(SailError, match="offline mode is on"):
        resolve_pretrained("someone/run", cache_dir=tmp_path, local_files_only=True)


def test_advice_names_the_command_that_has_the_option(tmp_path):
    from sail.data import open_dataset

    (tmp_path / "m.csv").write_text("key,text\na,b\n")
    with pytest.raises(SailError, match=r"has no column\(s\) id; .*sail extract chooses them with --columns"):
        open_dataset(str(tmp_path / "m.csv"))


def test_only_module_colon_names_are_read_as_specs():
    from sail.encoders import zoo

    for spec in ("pkg.mod:fn", "pkg.mod:fn(size=", "pkg:fn(a=1) b"):
        assert zoo.looks_like_spec(spec)
    for other in ("facebook/dinov2-large", "/tmp/x:y", "dinov2-l", "https://host/x:y", "./a:b", "org/name:rev"):
        assert not zoo.looks_like_spec(other)


def test_a_plugin_image_encoder_decodes_on_the_cpu_whatever_decode_says(plugin, data, tmp_path, monkeypatch, capfd):
    """A plugin's preprocess is arbitrary Python on PIL images, which the GPU path cannot reproduce: auto keeps it
    on the CPU without a note (even on CUDA), gpu is one line saying why."""
    from sail.data import gpu_decode
    from sail.encoders import extract as ex

    seen = []
    real = gpu_decode.open_decoder
    monkeypatch.setattr(gpu_decode, "open_decoder", lambda fast, device: seen.append(fast) or real(fast, device))
    res = extract(ExtractConfig(model="hostile_encoders:img", data=str(data), out=str(tmp_path / "a.h5"),
                                workers=0, progress=False, decode="auto"))
    with FeatureStore(res.path) as s:
        assert s.valid("image").all() and '"decode": "cpu"' in s.attrs["identity"]
    assert seen == [None] and "note:" not in capfd.readouterr().err
    monkeypatch.setattr(ex, "_SAID_DECODE", set())

    class PluginOnCuda:  # the same choice on a CUDA device: still quiet (nothing the user could install helps)
        modality, fast = "image", None

    assert ex._gpu_decoder(ExtractConfig(model="m", data="d"), PluginOnCuda(), torch.device("cuda"),
                           tmp_path / "x.parts", 0) is None
    assert "note:" not in capfd.readouterr().err
    with pytest.raises(SailError, match="--decode gpu cannot run here: it reproduces --preprocess fast only"):
        extract(ExtractConfig(model="hostile_encoders:img", data=str(data), out=str(tmp_path / "b.h5"), workers=0,
                              progress=False, decode="gpu"))
