"""sail.train.towers: tiny CLIP / EfficientNet / BERT towers built from configs (no download): pooling, heads,
temperature parameterisations, save/load round trip with strict loading."""

import json

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file

from sail.core.errors import SailError
from sail.train.towers import Towers, build_towers, char_tokenizer, tower_dim

CLIP_VISION = {"type": "clip", "config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                          "num_attention_heads": 2, "image_size": 32, "patch_size": 8}}
CLIP_TEXT = {"type": "clip", "tokenizer": "char", "max_length": 40,
             "config": {"hidden_size": 24, "intermediate_size": 48, "num_hidden_layers": 2,
                        "num_attention_heads": 2, "max_position_embeddings": 40}}
ALIGN_VISION = {"type": "align", "config": {"width_coefficient": 0.25, "depth_coefficient": 0.25, "image_size": 32}}
BERT_TEXT = {"type": "bert", "tokenizer": "char", "max_length": 32,
             "config": {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                        "num_attention_heads": 2, "max_position_embeddings": 32}}
TEXTS = ["a red circle", "a small blue square towards the top left", "x"]


def _images(n=3):
    g = torch.Generator().manual_seed(0)
    return [Image.fromarray((torch.rand(40, 48, 3, generator=g) * 255).byte().numpy()) for _ in range(n)]


@pytest.fixture(scope="module")
def alip():
    torch.manual_seed(0)
    return build_towers("alip", CLIP_VISION, CLIP_TEXT, embed_dim=12)


@pytest.fixture(scope="module")
def align():
    torch.manual_seed(0)
    return build_towers("align", ALIGN_VISION, BERT_TEXT, embed_dim=10, temperature="sigma", init_scale=1.0)


def test_char_tokenizer_knows_letters_digits_and_punctuation():
    tok = char_tokenizer()
    ids = tok("A medium-sized cube, 3 of them!")["input_ids"]
    assert tok.unk_token_id not in ids
    assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id


def test_forward_shapes_and_unit_norm(alip, align):
    for towers, n in ((alip, 12), (align, 10)):
        tokens = towers.tokenize(TEXTS)
        x, y, t = towers(torch.randn(2, 3, 32, 32), tokens["input_ids"], tokens["attention_mask"])
        assert x.shape == (2, n) and y.shape == (3, n) and x.dtype == torch.float32
        assert torch.allclose(x.norm(dim=-1), torch.ones(2), atol=1e-5)
        assert torch.allclose(y.norm(dim=-1), torch.ones(3), atol=1e-5)
        assert t.requires_grad


def test_pooled_width_matches_tower_dim(alip, align):
    for towers in (alip, align):
        pooled = towers.vision(pixel_values=torch.randn(2, 3, 32, 32)).pooler_output
        assert pooled.shape == (2, towers.image_dim)
    from transformers import EfficientNetConfig, EfficientNetModel

    cfg = EfficientNetConfig(width_coefficient=0.25, depth_coefficient=0.25, image_size=32, hidden_dim=320)
    pooled = EfficientNetModel(cfg).eval()(pixel_values=torch.randn(1, 3, 32, 32)).pooler_output
    assert pooled.shape[-1] == tower_dim("efficientnet", cfg)


def test_clip_text_pools_at_the_end_token(alip):
    # the CLIP tower's eos id comes from the tokenizer, so pooling picks the [SEP] position
    assert alip.text.config.eos_token_id == alip.tokenizer.sep_token_id
    tokens = alip.tokenize(TEXTS)
    with torch.no_grad():
        out = alip.text(**tokens)
    ends = (tokens["input_ids"] == alip.tokenizer.sep_token_id).int().argmax(1)
    expected = out.last_hidden_state[torch.arange(3), ends]  # last_hidden_state is after the final LayerNorm
    assert torch.allclose(out.pooler_output, expected)


def test_bert_uses_cls_and_the_head(align):
    align.eval()  # no dropout
    tokens = align.tokenize(TEXTS)
    with torch.no_grad():
        cls = align.text(**tokens).last_hidden_state[:, 0]
        expected = F.normalize(align.text_head(cls), dim=-1)
        assert torch.allclose(align.embed_tokens(tokens["input_ids"], tokens["attention_mask"]), expected, atol=1e-6)
    assert align.text.pooler is None  # unused parameters would break DDP


def test_temperatures(alip, align):
    assert alip.scale().item() == pytest.approx(1 / 0.07, rel=1e-5)
    assert alip.logit_scale.exp().item() == pytest.approx(1 / 0.07, rel=1e-5)
    assert align.scale().item() == pytest.approx(1.0) and align.sigma.item() == pytest.approx(1.0)
    with torch.no_grad():
        alip.log_scale.fill_(10.0)
        align.sigma.fill_(1e-4)
    alip.clamp_()
    align.clamp_()
    assert alip.scale().item() == pytest.approx(100.0, rel=1e-5)
    assert align.scale().item() == pytest.approx(100.0, rel=1e-5)
    assert align.logit_scale.item() == pytest.approx(torch.log(torch.tensor(100.0)).item(), rel=1e-5)
    with torch.no_grad():
        alip.log_scale.fill_(torch.log(torch.tensor(1 / 0.07)).item())
        align.sigma.fill_(1.0)


def test_param_groups_split_matrices_from_vectors(align):
    decay, no_decay = align.param_groups(0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim < 2 for p in no_decay["params"])
    assert any(p is align.sigma for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(align.parameters()))


def test_encode_accepts_pil_and_paths_and_restores_mode(alip, tmp_path):
    images = _images()
    paths = []
    for i, im in enumerate(images):
        paths.append(str(tmp_path / f"{i}.png"))
        im.save(paths[-1])
    alip.train()
    a = alip.encode_image(images)
    b = alip.encode_image(paths, batch_size=2)
    assert alip.training  # restored
    assert a.shape == (3, 12) and torch.allclose(a, b, atol=1e-6)
    assert torch.allclose(a.norm(dim=-1), torch.ones(3), atol=1e-5)
    # encode_image uses the eval preprocessing: the same as calling the tower on eval tensors
    pixels = torch.stack([alip.preprocessing.eval(im) for im in images])
    alip.eval()
    with torch.no_grad():
        assert torch.allclose(alip.embed_images(pixels), a, atol=1e-6)
    with pytest.raises(SailError, match="cannot encode image"):
        alip.encode_image([str(tmp_path / "missing.png")])
    with pytest.raises(SailError, match="list of strings"):
        alip.encode_text("one string")


@pytest.mark.parametrize("which", ["alip", "align"])
def test_save_and_load_give_the_same_embeddings(which, alip, align, tmp_path):
    towers = alip if which == "alip" else align
    towers.eval()
    towers.save_pretrained(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["format"] == "sail-towers" and config["format_version"] == 1 and config["recipe"] == which
    assert {"vision", "text", "heads", "image", "temperature", "embed_dim"} <= set(config)
    assert (tmp_path / "m" / "tokenizer").is_dir()
    loaded = Towers.from_pretrained(tmp_path / "m")
    assert not loaded.training
    assert torch.equal(loaded.encode_text(TEXTS), towers.encode_text(TEXTS))
    assert torch.equal(loaded.encode_image(_images()), towers.encode_image(_images()))
    assert loaded.scale().item() == towers.scale().item()
    assert loaded.preprocessing == towers.preprocessing


def test_strict_loading(alip, tmp_path):
    alip.save_pretrained(tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    tensors = load_file(str(weights))
    tensors.pop("image_head.proj.bias")
    tensors["surprise"] = torch.zeros(1)
    save_file(tensors, str(weights))
    with pytest.raises(SailError, match="missing keys.*image_head.proj.bias.*unexpected keys.*surprise"):
        Towers.from_pretrained(tmp_path / "m")
    with pytest.raises(SailError, match="not a saved sail-towers"):
        Towers.from_pretrained(tmp_path / "nowhere")


def test_config_mistakes_are_sail_errors():
    with pytest.raises(SailError, match="unknown vision tower type"):
        build_towers("x", {"type": "resnet"}, CLIP_TEXT, 8)
    small_vocab = {**CLIP_TEXT, "config": {**CLIP_TEXT["config"], "vocab_size": 10}}
    with pytest.raises(SailError, match="vocab_size"):
        build_towers("x", CLIP_VISION, small_vocab, 8)
    with pytest.raises(SailError, match="max_length"):
        build_towers("x", CLIP_VISION, {**CLIP_TEXT, "max_length": 100}, 8)


def test_gradient_checkpointing(align):
    towers = build_towers("alip", CLIP_VISION, CLIP_TEXT, embed_dim=12)
    tokens = towers.tokenize(TEXTS[:2])
    pixels = torch.randn(2, 3, 32, 32)

    def grads():
        towers.zero_grad()
        x, y, t = towers(pixels, tokens["input_ids"], tokens["attention_mask"])
        (t * (x * y).sum()).backward()
        return [p.grad.clone() for p in towers.parameters()]

    towers.train()
    before = grads()
    assert towers.enable_gradient_checkpointing() == []
    for tower in (towers.vision, towers.text):
        flag = getattr(tower, "is_activation_checkpointing", None)
        assert flag if flag is not None else tower.is_gradient_checkpointing
    after = grads()
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(before, after))
    assert align.enable_gradient_checkpointing() == ["vision (AlignVisionModel)"]


def test_recalibrate_batchnorm_is_a_plain_average(align, alip):
    images = _images(16)
    first = align.vision.embeddings.batchnorm
    seen = []
    handle = first.register_forward_hook(lambda m, inp, out: seen.append(inp[0].detach().clone()))
    momentum = first.momentum
    align.train()
    with torch.no_grad():
        first.running_mean.fill_(5.0)
    assert align.recalibrate_batchnorm(images, batch_size=8) == 21  # BatchNorm layers of this EfficientNet
    handle.remove()
    assert len(seen) == 2 and align.training and first.momentum == momentum
    # reference: the average over the two batches of each batch's per-channel mean and unbiased variance
    means = torch.stack([x.mean(dim=(0, 2, 3)) for x in seen])
    variances = torch.stack([x.transpose(0, 1).reshape(x.shape[1], -1).var(dim=1) for x in seen])
    assert torch.allclose(first.running_mean, means.mean(0), atol=1e-5)
    assert torch.allclose(first.running_var, variances.mean(0), atol=1e-5)
    assert alip.recalibrate_batchnorm(images) == 0  # a ViT has none


# ---------------------------------------------------------------------------------------------- projections


def test_paper_projections_clip_and_identity_and_fc(tmp_path):
    torch.manual_seed(0)
    alip = build_towers("alip", CLIP_VISION, CLIP_TEXT, embed_dim=12, projection={"image": "clip", "text": "clip"})
    names = {k for k in alip.state_dict() if "_head." in k}
    assert names == {"image_head.proj.weight", "text_head.proj.weight"}  # no bias, no LayerNorm: CLIP's layout
    pixels = torch.randn(2, 3, 32, 32)
    pooled = alip.vision(pixel_values=pixels).pooler_output
    torch.testing.assert_close(alip.embed_images(pixels), F.normalize(pooled @ alip.image_head.proj.weight.T, dim=-1))
    # CLIP's init N(0, in_dim^-0.5): the sample std over 32 x 12 weights is near 32^-0.5 = 0.177
    assert abs(alip.image_head.proj.weight.std().item() - 32 ** -0.5) < 0.03

    align = build_towers("align", ALIGN_VISION, BERT_TEXT, embed_dim=tower_dim("align", _align_config()),
                         temperature="sigma", init_scale=1.0, projection={"image": "identity", "text": "fc"})
    assert not [k for k in align.state_dict() if k.startswith("image_head.")]  # the pooled feature is the embedding
    assert {k for k in align.state_dict() if k.startswith("text_head.")} == {"text_head.proj.weight",
                                                                              "text_head.proj.bias"}
    align.eval()
    pooled = align.vision(pixel_values=pixels).pooler_output
    torch.testing.assert_close(align.embed_images(pixels), F.normalize(pooled, dim=-1))
    tokens = align.tokenize(TEXTS)
    cls = align.text(**tokens).last_hidden_state[:, 0]
    torch.testing.assert_close(align.embed_tokens(tokens["input_ids"], tokens["attention_mask"]),
                               F.normalize(cls @ align.text_head.proj.weight.T + align.text_head.proj.bias, dim=-1))

    # mixed projections survive save / load
    align.save_pretrained(tmp_path / "m")
    heads = json.loads((tmp_path / "m" / "config.json").read_text())["heads"]
    assert heads["image"] == "identity" and heads["text"] == "fc"
    loaded = Towers.from_pretrained(tmp_path / "m")
    assert torch.equal(loaded.encode_image(_images()), align.encode_image(_images()))
    assert torch.equal(loaded.encode_text(TEXTS), align.encode_text(TEXTS))

    with pytest.raises(SailError, match="identity projection keeps the tower's width 80; set embed_dim to 80"):
        build_towers("align", ALIGN_VISION, BERT_TEXT, embed_dim=10, projection={"image": "identity"})
    with pytest.raises(SailError, match="unknown projection 'conv'"):
        build_towers("align", ALIGN_VISION, BERT_TEXT, embed_dim=10, projection={"text": "conv"})


def test_towers_saved_before_per_side_projections_still_load(alip, tmp_path):
    alip.save_pretrained(tmp_path / "m")
    path = tmp_path / "m" / "config.json"
    config = json.loads(path.read_text())
    config["heads"] = {"kind": "linear", "width": 4, "activation": "relu6"}  # the 0.1 layout
    path.write_text(json.dumps(config))
    loaded = Towers.from_pretrained(tmp_path / "m")
    assert loaded.head_spec["image"] == loaded.head_spec["text"] == "linear"
    assert torch.equal(loaded.encode_text(TEXTS), alip.eval().encode_text(TEXTS))


def _align_config():
    from transformers import AlignVisionConfig

    return AlignVisionConfig(**ALIGN_VISION["config"])


def test_clip_projections_load_from_a_pretrained_clip_checkpoint(tmp_path):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(3)
    tok = char_tokenizer()
    clip = CLIPModel(CLIPConfig(projection_dim=12, vision_config=CLIP_VISION["config"],
                                text_config={**CLIP_TEXT["config"], "vocab_size": len(tok),
                                             "eos_token_id": tok.sep_token_id}))
    clip.save_pretrained(tmp_path / "clip")
    vision = {"type": "clip", "pretrained": str(tmp_path / "clip")}
    text = {"type": "clip", "pretrained": str(tmp_path / "clip"), "tokenizer": "char", "max_length": 40}
    towers = build_towers("alip", vision, text, embed_dim=12, projection={"image": "clip", "text": "clip"})
    assert torch.equal(towers.image_head.proj.weight, clip.visual_projection.weight)
    assert torch.equal(towers.text_head.proj.weight, clip.text_projection.weight)
    # the towers then embed exactly as CLIPModel does (before normalisation)
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = clip.visual_projection(clip.vision_model(pixel_values=pixels).pooler_output)
        torch.testing.assert_close(towers.embed_images(pixels), F.normalize(expected, dim=-1))
    with pytest.raises(SailError, match=r"visual_projection.weight is \(12, 32\).*set embed_dim to 12"):
        build_towers("alip", vision, text, embed_dim=8, projection={"image": "clip", "text": "clip"})


def test_a_clip_projection_that_cannot_load_is_an_error_unless_random_is_asked(tmp_path, capsys):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    CLIPVisionModel(CLIPVisionConfig(**CLIP_VISION["config"])).save_pretrained(tmp_path / "bare")  # no projection
    vision = {"type": "clip", "pretrained": str(tmp_path / "bare")}
    text = {**CLIP_TEXT, "tokenizer": "char"}
    with pytest.raises(SailError, match=r"cannot load visual_projection.weight from .*bare: its model.safetensors "
                                        r"has no such tensor; .*projection.init: random"):
        build_towers("alip", vision, text, embed_dim=12, projection={"image": "clip", "text": "clip"})
    towers = build_towers("alip", vision, text, embed_dim=12, projection={"image": "clip", "text": "clip",
                                                                         "init": "random"})
    assert towers.image_head.proj.weight.shape == (12, 32)
    assert "note: the image projection starts random (projection.init: random)" in capsys.readouterr().out
    with pytest.raises(SailError, match="projection.init 'zeros' is invalid"):
        build_towers("alip", vision, text, embed_dim=12, projection={"image": "clip", "init": "zeros"})
