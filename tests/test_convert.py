"""sail convert: official SAIL checkpoints <-> sail runs, checked against our own re-statement of the official
AlignmentLayer (parameter names as in lezhang7/SAIL; the code below is ours) in float64."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from sail.cli import main
from sail.convert import convert, heads_to_official, load_official, official_to_heads
from sail.core.errors import SailError
from sail.train.heads import AlignmentHeads


# ------------------------------------------------------------------ the official layout, restated


class Star(nn.Module):  # f1, f2, g: g(ReLU6(clip f1 x) * clip f2 x), clip = +-1e3
    def __init__(self, d_in, d_out, width):
        super().__init__()
        self.f1, self.f2 = nn.Linear(d_in, width * d_in), nn.Linear(d_in, width * d_in)
        self.g = nn.Linear(width * d_in, d_out)

    def forward(self, x):
        a, b = self.f1(x).clamp(-1e3, 1e3), self.f2(x).clamp(-1e3, 1e3)
        return self.g(nn.functional.relu6(a) * b)


class Mlp(nn.Module):  # proj = Linear(4x) - GELU - Linear
    def __init__(self, d_in, d_out):
        super().__init__()
        self.proj = nn.Sequential(nn.Linear(d_in, 4 * d_in), nn.GELU(), nn.Linear(4 * d_in, d_out))

    def forward(self, x):
        return self.proj(x)


class OfficialLayer(nn.Module):
    def __init__(self, v_dim, t_dim, out, linear_type, width=8):
        super().__init__()
        make = {"star": lambda i: Star(i, out, width), "mlp": lambda i: Mlp(i, out),
                "linear": lambda i: nn.Linear(i, out)}[linear_type]
        self.vision_mapping_network, self.vision_layer_norm = make(v_dim), nn.LayerNorm(v_dim)
        self.text_mapping_network, self.text_layer_norm = make(t_dim), nn.LayerNorm(t_dim)
        self.logit_scale = nn.Parameter(torch.tensor([math.log(20.0)]))
        self.logit_bias = nn.Parameter(torch.tensor([-10.0]))
        with torch.no_grad():  # non-trivial LayerNorm and biases, so a swapped name would show
            for p in self.parameters():
                p.add_(torch.randn_like(p) * 0.1)

    def embed(self, image=None, text=None):
        img = self.vision_mapping_network(self.vision_layer_norm(image))
        txt = self.text_mapping_network(self.text_layer_norm(text))
        return img, txt


KINDS = [("star", 8), ("star", 2), ("mlp", 4), ("linear", 1)]


def _official(kind, width, v=12, t=6, out=5, seed=0):
    torch.manual_seed(seed)
    return OfficialLayer(v, t, out, kind, width).double()


def _save(layer, path, form):
    sd = {k: v.float() for k, v in layer.state_dict().items()}
    if form == "ddp":
        sd = {"module." + k: v for k, v in sd.items()}
    if form == "bare":
        torch.save(sd, path)
    else:  # the trainer's dict, optimizer state included
        opt = torch.optim.AdamW(layer.parameters())
        torch.save({"epoch": 64, "name": "sail_l_nv2", "state_dict": sd, "optimizer": opt.state_dict()}, path)


def _feats(v=12, t=6, n=7):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, v, generator=g, dtype=torch.float64) * 3, torch.randn(n, t, generator=g, dtype=torch.float64)


# ------------------------------------------------------------------ official -> sail


@pytest.mark.parametrize("form", ["trainer", "ddp", "bare"])
@pytest.mark.parametrize("kind,width", KINDS)
def test_import_gives_the_official_embeddings(tmp_path, kind, width, form):
    layer = _official(kind, width)
    _save(layer, tmp_path / "ckpt.pt", form)
    res = convert(tmp_path / "ckpt.pt", tmp_path / "run")
    heads = AlignmentHeads.from_pretrained(tmp_path / "run").double()
    assert (heads.kind, heads.width) == ({"star": "glu", "mlp": "mlp", "linear": "linear"}[kind],
                                         width if kind != "linear" else 4)
    assert res["layout"]["image_dim"] == 12 and res["layout"]["text_dim"] == 6 and res["layout"]["out_dim"] == 5
    x, y = _feats()
    layer32 = _official(kind, width)  # the float32 values actually saved, in float64
    layer32.load_state_dict({k: v.float().double() for k, v in layer.state_dict().items()})
    want_img, want_txt = layer32.embed(x, y)
    with torch.no_grad():
        got_img, got_txt = heads.encode_image(x), heads.encode_text(y)
        want_img, want_txt = nn.functional.normalize(want_img, dim=-1), nn.functional.normalize(want_txt, dim=-1)
    assert torch.allclose(got_img, want_img, atol=1e-6) and torch.allclose(got_txt, want_txt, atol=1e-6)
    assert math.isclose(float(heads.scale().detach()), float(layer32.logit_scale.detach().exp()), rel_tol=1e-6)
    assert math.isclose(float(heads.logit_bias.detach()), float(layer32.logit_bias.detach()), rel_tol=1e-6)
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["converted_from"]["linear_type"] == kind
    if form != "bare":
        assert cfg["converted_from"]["epoch"] == 64 and cfg["converted_from"]["name"] == "sail_l_nv2"


def test_star_clamp_is_reproduced(tmp_path):
    """Inputs that push a branch past 1e3: without the official clip the embeddings would differ."""
    layer = _official("star", 2)
    with torch.no_grad():
        layer.vision_mapping_network.f2.weight.mul_(1e4)
    heads, _ = official_to_heads({k: v for k, v in layer.state_dict().items()})
    heads = heads.double()
    x, y = _feats()
    want = nn.functional.normalize(layer.embed(x, y)[0], dim=-1)
    with torch.no_grad():
        assert torch.allclose(heads.encode_image(x), want, atol=1e-6)
        unclamped = AlignmentHeads(12, 6, 5, "glu", 2).double()
        unclamped.load_state_dict(heads.state_dict())
        assert not torch.allclose(unclamped.encode_image(x), want, atol=1e-3)


# ------------------------------------------------------------------ sail -> official, and the round trip


@pytest.mark.parametrize("kind,width", [("glu", 8), ("glu", 3), ("mlp", 4), ("linear", 4)])
def test_export_loads_strictly_in_the_official_layer(tmp_path, kind, width):
    torch.manual_seed(2)
    heads = AlignmentHeads(12, 6, 5, kind, width, init_scale=13.0, init_bias=-7.0)
    with torch.no_grad():
        for p in heads.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    heads.save_pretrained(tmp_path / "run")
    res = convert(tmp_path / "run", tmp_path / "out.pt", to="official")
    official_kind = {"glu": "star", "mlp": "mlp", "linear": "linear"}[kind]
    assert res["flags"]["linear_type"] == official_kind
    ckpt = torch.load(tmp_path / "out.pt", weights_only=True)
    layer = OfficialLayer(12, 6, 5, official_kind, res["flags"].get("width_factor", 8))
    layer.load_state_dict(ckpt["state_dict"], strict=True)
    assert layer.logit_scale.shape == (1,) and layer.logit_bias.shape == (1,)
    x, y = _feats()
    layer, heads = layer.double(), heads.double()
    with torch.no_grad():
        img, txt = (nn.functional.normalize(e, dim=-1) for e in layer.embed(x, y))
        assert torch.allclose(heads.encode_image(x), img, atol=1e-6)
        assert torch.allclose(heads.encode_text(y), txt, atol=1e-6)


@pytest.mark.parametrize("kind,width", KINDS)
def test_round_trip_is_exact(tmp_path, kind, width):
    layer = _official(kind, width).float()
    _save(layer, tmp_path / "a.pt", "trainer")
    convert(tmp_path / "a.pt", tmp_path / "run")
    convert(tmp_path / "run", tmp_path / "b.pt")  # direction from SRC: a directory goes to official
    before, after = layer.state_dict(), torch.load(tmp_path / "b.pt", weights_only=True)["state_dict"]
    assert set(before) == set(after)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_export_refuses_heads_without_an_official_twin(tmp_path):
    AlignmentHeads(12, 6, 5, "glu", 2, activation="silu").save_pretrained(tmp_path / "silu")
    with pytest.raises(SailError, match="ReLU6"):
        convert(tmp_path / "silu", tmp_path / "x.pt")
    AlignmentHeads(12, 6, 5, "mlp", 2).save_pretrained(tmp_path / "mlp2")
    with pytest.raises(SailError, match="4x wide"):
        heads_to_official(AlignmentHeads.from_pretrained(tmp_path / "mlp2"))


# ------------------------------------------------------------------ encoders named, and bad input


def test_named_encoders_make_a_loadable_sail_model(tmp_path):
    from sail.train.model import SAILModel

    layer = _official("star", 2, v=2048, t=1024, out=4)
    _save(layer, tmp_path / "c.pt", "trainer")
    convert(tmp_path / "c.pt", tmp_path / "run", image_model="dinov2-l", text_model="gte-l")
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["image_encoder"]["model_id"] == "facebook/dinov2-large" and cfg["image_encoder"]["pooling"] == "concat"
    assert cfg["text_encoder"]["model_id"] == "Alibaba-NLP/gte-large-en-v1.5"
    model = SAILModel.from_pretrained(tmp_path / "run", device="cpu")  # encoders load lazily: nothing downloaded
    assert (model.image_model, model.text_model, model.pooling) == ("facebook/dinov2-large",
                                                                    "Alibaba-NLP/gte-large-en-v1.5", "concat")
    with pytest.raises(SailError, match="expects 1024"):
        convert(tmp_path / "c.pt", tmp_path / "run2", image_model="dinov2-l", text_model="nv-embed-v2")


def test_pickled_code_is_never_run(tmp_path, capsys):
    class Evil:
        def __reduce__(self):
            return (print, ("PWNED",))

    torch.save({"state_dict": {"x": torch.zeros(1)}, "hook": Evil()}, tmp_path / "evil.pt")
    capsys.readouterr()
    assert main(["convert", str(tmp_path / "evil.pt"), "--out", str(tmp_path / "run")]) == 2
    out = capsys.readouterr()
    assert "PWNED" not in out.out + out.err
    lines = [ln for ln in out.err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "weights_only" in lines[0]
    assert not (tmp_path / "run").exists()


def test_unknown_layouts_are_named(tmp_path):
    sharelock = {"text_layer_norm.weight": torch.ones(6), "text_layer_norm.bias": torch.zeros(6),
                 "text_mapping_network.layers.0.weight": torch.zeros(8, 6), "logit_scale": torch.zeros(()),
                 "logit_bias": torch.zeros(())}
    torch.save(sharelock, tmp_path / "sl.pt")
    with pytest.raises(SailError, match="ShareLock"):
        convert(tmp_path / "sl.pt", tmp_path / "r1")
    swiglu = _official("linear", 1).state_dict()
    for side, d in (("vision", 12), ("text", 6)):
        del swiglu[f"{side}_mapping_network.weight"], swiglu[f"{side}_mapping_network.bias"]
        swiglu[f"{side}_mapping_network.linear1.weight"] = torch.zeros(5, d)
    torch.save(swiglu, tmp_path / "sw.pt")
    with pytest.raises(SailError, match=r"unknown linear type \(parameters \['linear1.weight'\]\)"):
        convert(tmp_path / "sw.pt", tmp_path / "r2")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(SailError, match="cannot be read as plain tensors"):
        load_official(tmp_path / "junk.pt")


def test_cli_convert_both_ways(tmp_path, capsys):
    _save(_official("star", 2), tmp_path / "s.pt", "ddp")
    assert main(["convert", str(tmp_path / "s.pt"), "--out", str(tmp_path / "run")]) == 0
    assert "star -> sail glu width 2" in capsys.readouterr().out
    assert main(["convert", str(tmp_path / "s.pt"), "--out", str(tmp_path / "run")]) == 2  # not over a run
    assert "--overwrite" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "run"), "--to", "official", "--out", str(tmp_path / "o.pt")]) == 0
    assert "--linear_type star --target_dimension 5 --width_factor 2" in capsys.readouterr().out


# ------------------------------------------------------------------ feature parity with the official encode.py


def test_dinov2_concat_is_the_official_pooling(tiny_vision):
    """Official ImageEmbedding (agg_mode concat): [last_hidden_state[:, 0] ; last_hidden_state[:, 1:].mean(1)]."""
    from transformers import AutoImageProcessor, Dinov2Model

    from sail.data import open_dataset
    from sail.encoders import load_encoder, resolve_model

    images = [open_dataset("sample").images[i] for i in (0, 5)]
    pixels = AutoImageProcessor.from_pretrained(tiny_vision)(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        hidden = Dinov2Model.from_pretrained(tiny_vision).eval()(pixel_values=pixels).last_hidden_state
    want = torch.cat([hidden[:, 0], hidden[:, 1:].mean(dim=1)], dim=1)
    enc = load_encoder(resolve_model(str(tiny_vision)), "cpu", "concat", preprocess="hf")
    got, _ = enc.encode_pixels(torch.stack([enc.preprocess(im) for im in images]))
    assert torch.allclose(got, want, atol=1e-5)


def test_gte_alias_gives_the_official_cls_features(tiny_text):
    """gte-l: official bos_pooling (first token, not normalised), texts cut at 1024 tokens; checked on a tiny
    BERT of the same class standing in for gte-large-en-v1.5 (whose own sentence-transformers pooling differs)."""
    import numpy as np
    from transformers import AutoTokenizer, BertModel

    from sail.encoders import ModelSpec, TextEncoder

    texts = ["a dog on the grass", "two cats", "a red car parked by a tall building at night"]
    tok = AutoTokenizer.from_pretrained(tiny_text / "_bert")
    with torch.no_grad():
        inputs = tok(texts, padding=True, truncation=True, max_length=1024, return_tensors="pt")
        want = BertModel.from_pretrained(tiny_text / "_bert").eval()(**inputs).last_hidden_state[:, 0].numpy()
    enc = TextEncoder(ModelSpec("gte-l", str(tiny_text), "text"), torch.device("cpu"))
    assert enc.max_length == 1024 and enc.pooling == "official-sail:cls"
    np.testing.assert_allclose(enc.encode_texts(texts, batch_size=2), want, atol=1e-5)
    plain = TextEncoder(ModelSpec("tiny-bert", str(tiny_text), "text"), torch.device("cpu"))
    assert not np.allclose(plain.encode_texts(texts), want, atol=1e-2)  # sentence-transformers' mean pooling


def test_nv_embed_alias_calls_the_models_own_encode_like_official():
    """NV-Embed-v2 is custom code: a stand-in with its interface checks the call the official encode.py makes
    (model.encode(texts, instruction="", max_length=1024), outputs kept unnormalised, order kept)."""
    import numpy as np

    from sail.encoders import OFFICIAL_TEXT, TextEncoder

    calls = []

    class StandIn:
        def encode(self, prompts, instruction="", max_length=4096):
            calls.append((list(prompts), instruction, max_length))
            return torch.tensor([[float(len(p)), 3.0] for p in prompts], dtype=torch.float16)

    enc = TextEncoder.__new__(TextEncoder)
    enc.model = [type("Wrapper", (), {"auto_model": StandIn()})()]
    enc.official, enc.max_length, enc.dim, enc.device = OFFICIAL_TEXT["nv-embed-v2"], 1024, 2, torch.device("cpu")
    out = enc.encode_texts(["a", "bbb", "cc"], batch_size=2)
    assert calls == [(["a", "bbb"], "", 1024), (["cc"], "", 1024)]
    np.testing.assert_array_equal(out, np.array([[1, 3], [3, 3], [2, 3]], np.float32))


# ------------------------------------------------------------------ portable encoder identity


def test_encoders_are_named_by_identity_not_path(tmp_path, tiny_vision):
    from sail.encoders import ModelSpec, model_identity, resolve_model

    assert model_identity(resolve_model("dinov2-l")) == "facebook/dinov2-large"
    assert model_identity(resolve_model("minilm-l6")) == "sentence-transformers/all-MiniLM-L6-v2"
    assert resolve_model("sentence-transformers/all-MiniLM-L6-v2", "text").source == resolve_model("minilm-l6").source
    assert resolve_model("Alibaba-NLP/gte-large-en-v1.5", "text").name == "gte-l"
    snap = tmp_path / "hub" / "models--facebook--dinov2-small" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    assert model_identity(ModelSpec("abc123", str(snap), "image")) == "facebook/dinov2-small"
    assert model_identity(resolve_model(str(tiny_vision))) == "local:tiny-dino"
    with pytest.raises(SailError, match="local model directory on the machine"):
        resolve_model("local:tiny-dino")


def test_store_and_run_from_a_local_encoder_record_no_path(tmp_path, tiny_vision):
    from sail.data.store import FeatureStore
    from sail.encoders.extract import ExtractConfig, extract
    from sail.train.model import SAILModel

    res = extract(ExtractConfig(model=str(tiny_vision), data="sample", out=str(tmp_path / "img.h5"), workers=0,
                                progress=False, batch_size=64))
    with FeatureStore(res.path) as s:
        assert s.attrs["model_id"] == "local:tiny-dino" and s.attrs["model_revision"].startswith("local:")
        assert s.attrs["model_path"] == str(tiny_vision.resolve())
    heads = AlignmentHeads(64, 4, 3, "linear")
    heads.save_pretrained(tmp_path / "run", extra_config={
        "image_encoder": {"model_id": "local:tiny-dino", "pooling": "concat", "dim": 64, "store": str(res.path)},
        "text_encoder": {"model_id": "sentence-transformers/all-MiniLM-L6-v2", "dim": 4}})
    model = SAILModel.from_pretrained(tmp_path / "run", device="cpu")  # same machine: the store says where
    assert model.image_model == str(tiny_vision.resolve()) and model.text_model.endswith("all-MiniLM-L6-v2")
    (tmp_path / "img.h5").unlink()  # "another machine": no store, no directory -> told what to pass
    model = SAILModel.from_pretrained(tmp_path / "run", device="cpu")
    with pytest.raises(SailError, match="pass vision_model="):
        model.vision


def test_a_store_that_named_its_encoder_by_path_is_still_the_same_extraction(tmp_path, tiny_vision):
    import h5py

    from sail.encoders.extract import ExtractConfig, extract

    cfg = ExtractConfig(model=str(tiny_vision), data="sample", out=str(tmp_path / "img.h5"), workers=0,
                        progress=False, batch_size=64)
    extract(cfg)
    with h5py.File(tmp_path / "img.h5", "r+") as f:  # what 0.2 wrote: the absolute path
        ident = json.loads(f.attrs["identity"])
        ident["model_id"] = str(tiny_vision.resolve())
        f.attrs["identity"] = json.dumps(ident)
    assert extract(cfg).path == tmp_path / "img.h5"  # recognised as complete, not "a different extraction"
