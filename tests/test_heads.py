"""Tests for sail/train/heads.py: paper parameter counts, the GLU formula, normalisation, save/load, errors."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import sail
from sail.core.errors import SailError
from sail.train.heads import AlignmentHeads, make_head


def head_params(heads):
    return sum(p.numel() for p in heads.image_head.parameters()) + sum(p.numel() for p in heads.text_head.parameters())


@pytest.mark.parametrize("kind,paper_millions", [("linear", 3.15), ("mlp", 33.57), ("glu", 54.6)])
def test_parameter_counts_match_paper_table1(kind, paper_millions):
    # Paper Table 1: vision in 2048 (DINOv2-L concat), text in 1024 (GTE-L), out 1024, hidden 4 x in.
    with torch.device("meta"):  # counts only; no 200 MB of weights to initialise
        heads = AlignmentHeads(2048, 1024, out_dim=1024, kind=kind, width=4)
    assert abs(head_params(heads) / 1e6 - paper_millions) < 0.05
    assert heads.num_parameters() == head_params(heads) + 2  # + logit_scale, logit_bias


def test_layer_structure_and_official_init():
    head = make_head("mlp", 8, 6, width=3)
    assert isinstance(head.norm, torch.nn.LayerNorm) and head.norm.normalized_shape == (8,)
    assert head.fc1.weight.shape == (24, 8) and head.fc2.weight.shape == (6, 24)
    assert isinstance(head.act, torch.nn.GELU)
    for layer in (head.fc1, head.fc2):
        assert torch.all(layer.bias == 0)
        bound = math.sqrt(6.0 / (layer.in_features + layer.out_features))  # xavier_uniform
        assert layer.weight.abs().max() <= bound and layer.weight.abs().max() > 0.5 * bound
    lin = make_head("linear", 8, 6)
    assert lin.proj.weight.shape == (6, 8) and torch.all(lin.proj.bias == 0)


@pytest.mark.parametrize("activation,fn", [("relu6", lambda z: z.clamp(0, 6)),
                                           ("silu", lambda z: z * torch.sigmoid(z))])
def test_glu_matches_hand_written_formula(activation, fn):
    torch.manual_seed(0)
    head = make_head("glu", 5, 3, width=2, activation=activation).double()
    with torch.no_grad():  # non-trivial LayerNorm and bias values so every term matters
        for p in head.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    x = torch.randn(7, 5, dtype=torch.float64) * 3
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    h = (x - mu) / torch.sqrt(var + 1e-5) * head.norm.weight + head.norm.bias
    a = h @ head.w1.weight.T + head.w1.bias
    b = h @ head.w2.weight.T + head.w2.bias
    expected = (fn(a) * b) @ head.w_out.weight.T + head.w_out.bias
    assert head.w1.weight.shape == (10, 5)
    torch.testing.assert_close(head(x), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["linear", "mlp", "glu"])
def test_outputs_are_unit_norm_and_forward_is_both_encoders(kind):
    torch.manual_seed(0)
    heads = AlignmentHeads(12, 10, out_dim=6, kind=kind, width=2)
    img, txt = torch.randn(4, 12), torch.randn(5, 10)
    x, y = heads(img, txt)
    assert x.shape == (4, 6) and y.shape == (5, 6)
    torch.testing.assert_close(x.norm(dim=-1), torch.ones(4))
    torch.testing.assert_close(y.norm(dim=-1), torch.ones(5))
    torch.testing.assert_close(x, F.normalize(heads.image_head(img), dim=-1))
    torch.testing.assert_close(y, heads.encode_text(txt))
    # patch tokens: (N, P, D) works too; input dtype is cast to the head's
    patches = heads.encode_image(torch.randn(2, 3, 12, dtype=torch.float16))
    assert patches.shape == (2, 3, 6) and patches.dtype == torch.float32


def test_scalars_init_scale_and_clamp():
    heads = AlignmentHeads(4, 4, out_dim=4, kind="linear")
    assert heads.scale().item() == pytest.approx(20.0)
    assert heads.logit_bias.item() == -10.0
    assert heads.logit_scale.item() == pytest.approx(math.log(20.0))
    with torch.no_grad():
        heads.logit_scale.fill_(7.0)
    heads.clamp_()
    assert heads.scale().item() == pytest.approx(100.0)
    with torch.no_grad():
        heads.logit_scale.fill_(-1.0)
    heads.clamp_()
    assert heads.logit_scale.item() == 0.0
    with torch.no_grad():
        heads.logit_scale.fill_(2.0)
    heads.clamp_()
    assert heads.logit_scale.item() == 2.0  # inside the range: untouched


def test_param_groups_split_decay_from_no_decay():
    heads = AlignmentHeads(6, 5, out_dim=4, kind="glu", width=2)
    decay, no_decay = heads.param_groups(weight_decay=0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    linear_weights = {id(m.weight) for m in heads.modules() if isinstance(m, torch.nn.Linear)}
    assert {id(p) for p in decay["params"]} == linear_weights and len(linear_weights) == 6
    nd = {id(p) for p in no_decay["params"]}
    assert id(heads.logit_scale) in nd and id(heads.logit_bias) in nd
    assert id(heads.image_head.norm.weight) in nd and id(heads.text_head.w1.bias) in nd
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(heads.parameters()))


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    heads = AlignmentHeads(12, 10, out_dim=6, kind="glu", width=2, activation="silu")
    with torch.no_grad():
        heads.logit_scale.fill_(3.3)
        heads.logit_bias.fill_(-7.5)
    heads.save_pretrained(tmp_path / "run", extra_config={"loss": "sigmoid", "image_encoder": "dinov2-s"},
                          metadata={"image_encoder": "facebook/dinov2-small", "steps": 12})
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config == {**heads.config, "loss": "sigmoid", "image_encoder": "dinov2-s"}
    assert config["format"] == "sail-heads" and config["format_version"] == 1
    with safe_open(str(tmp_path / "run" / "model.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta == {"format": "sail-heads", "sail_version": sail.__version__,
                    "image_encoder": "facebook/dinov2-small", "steps": "12"}

    loaded = AlignmentHeads.from_pretrained(tmp_path / "run")
    assert not loaded.training
    assert loaded.config == heads.config
    assert loaded.extra_config == {"loss": "sigmoid", "image_encoder": "dinov2-s"}
    img, txt = torch.randn(3, 12), torch.randn(3, 10)
    heads.eval()
    for a, b in zip(heads(img, txt), loaded(img, txt)):
        assert torch.equal(a, b)
    assert loaded.logit_scale.item() == pytest.approx(3.3) and loaded.logit_bias.item() == -7.5
    # re-saving keeps the extras; a contradicting extra key is refused
    loaded.save_pretrained(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "config.json").read_text()) == config
    with pytest.raises(SailError, match="contradicts"):
        heads.save_pretrained(tmp_path / "bad", extra_config={"out_dim": 7})


def test_fp16_weights_load_in_fp16(tmp_path):
    heads = AlignmentHeads(8, 6, out_dim=4, kind="mlp", width=2).half()
    heads.save_pretrained(tmp_path)
    loaded = AlignmentHeads.from_pretrained(tmp_path)
    assert loaded.image_head.fc1.weight.dtype == torch.float16
    assert loaded.encode_text(torch.randn(2, 6)).dtype == torch.float16


def test_strict_loading_errors(tmp_path):
    heads = AlignmentHeads(8, 6, out_dim=4, kind="linear")
    heads.save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    tensors = load_file(str(path))

    tampered = dict(tensors)
    del tampered["text_head.proj.bias"]
    tampered["extra.weight"] = torch.zeros(2)
    save_file(tampered, str(path))
    with pytest.raises(SailError, match=r"missing keys \['text_head.proj.bias'\].*unexpected keys \['extra.weight'\]"):
        AlignmentHeads.from_pretrained(tmp_path)

    tampered = dict(tensors)
    tampered["image_head.proj.weight"] = torch.zeros(4, 9)
    save_file(tampered, str(path))
    with pytest.raises(SailError, match=r"image_head.proj.weight: file \(4, 9\) vs model \(4, 8\)"):
        AlignmentHeads.from_pretrained(tmp_path)

    path.unlink()
    with pytest.raises(SailError, match="model.safetensors is missing"):
        AlignmentHeads.from_pretrained(tmp_path)
    with pytest.raises(SailError, match="not found"):
        AlignmentHeads.from_pretrained(tmp_path / "nope")
    (tmp_path / "config.json").write_text('{"format": "something-else"}')
    save_file(tensors, str(path))
    with pytest.raises(SailError, match="not a sail-heads config"):
        AlignmentHeads.from_pretrained(tmp_path)


def test_dim_mismatch_message():
    heads = AlignmentHeads(8, 6, out_dim=4, kind="linear")
    with pytest.raises(SailError, match="image features have dim 6 but the head expects 8"):
        heads.encode_image(torch.randn(2, 6))
    with pytest.raises(SailError, match="text features have dim 8 but the head expects 6"):
        heads(torch.randn(2, 8), torch.randn(2, 8))


def test_unknown_kind_and_activation_list_choices():
    with pytest.raises(SailError, match="linear, mlp, glu"):
        make_head("transformer", 4, 4)
    with pytest.raises(SailError, match="relu6, silu"):
        AlignmentHeads(4, 4, kind="glu", activation="tanh")
    with pytest.raises(SailError, match="positive integer"):
        make_head("mlp", 4, 4, width=0)
