"""Two-tower models trained end to end (the ALIP and ALIGN recipes): vision tower + text tower + heads + t.

    towers = build_towers("alip", vision={"type": "clip", "config": {...}},
                          text={"type": "clip", "config": {...}, "tokenizer": "char", "max_length": 77},
                          embed_dim=512)
    x, y, t = towers(pixels, input_ids, attention_mask)    # (B, D), (M, D) unit norm; t = temperature
    towers.save_pretrained("runs/alip")                    # config.json + model.safetensors + tokenizer/
    towers = Towers.from_pretrained("runs/alip")
    towers.encode_image([pil_or_path, ...])                # (N, D) unit norm, eval preprocessing
    towers.encode_text(["a photo of a cat."])              # (N, D) unit norm

Towers (transformers models, built from their configs; `pretrained` = a Hugging Face id or a local
directory to initialise from):
    vision  clip          CLIPVisionModel, pooled = post-LayerNorm [CLS]          (ALIP ViT-B/32, B/16)
            align         AlignVisionModel (EfficientNet), global average pooling (ALIGN B7 = its default)
            efficientnet  EfficientNetModel, global average pooling after the top 1x1 conv
    text    clip          CLIPTextModel, pooled = final-LayerNorm state at the first end-of-text token
            bert          BertModel without its pooler, pooled = [CLS] state      (ALIGN)
Each pooled output goes through a sail.train.heads.make_projection and is L2-normalised: CLIP's (Linear without
bias or LayerNorm; ALIP's default), ALIGN's (identity on the image side, a biased Linear "fc" on [CLS]), or a
sail head (linear | mlp | glu, LayerNorm first). `projection={"image": ..., "text": ...}` picks each side.

Temperature t (logits = t x.y). temperature="log_scale" learns log t (CLIP / ALIP: init 1/0.07, clamp
t <= 100); temperature="sigma" learns sigma = 1/t directly (ALIGN: logits x.y / sigma, init 1.0), which is
the parameterisation LAMB's per-tensor trust ratio can move (a log t that starts at 0 would stay near 0).
Either way `towers.scale()` is t and `towers.logit_scale` is log t.

Tokenizer "char" is a small character-level BertTokenizerFast built locally (tests, tiny configs, no
download); anything else is a tokenizer id or directory for AutoTokenizer (CLIP's BPE, BERT's WordPiece).
"""

from __future__ import annotations

import json
import math
import string
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from sail.core.artifacts import write_atomic
from sail.core.errors import SailError
from sail.core.precision import resolve_precision
from sail.data.augment import ImagePreprocessing
from sail.train.heads import _check_state, make_projection, read_saved_config

FORMAT = "sail-towers"
FORMAT_VERSION = 1
VISION_TYPES = ("clip", "align", "efficientnet")
TEXT_TYPES = ("clip", "bert")
TEMPERATURES = ("log_scale", "sigma")


# ----------------------------------------------------------------------------------------- building blocks


def char_tokenizer():
    """A character-level BERT WordPiece tokenizer (lower-case letters, digits, punctuation)."""
    from transformers import BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list(string.ascii_lowercase + string.digits)
    vocab += ["##" + c for c in string.ascii_lowercase + string.digits] + list(".,!?'-:;()/&\"")
    return BertTokenizerFast(vocab={token: i for i, token in enumerate(vocab)}, do_lower_case=True)


def load_tokenizer(spec: str):
    if spec == "char":
        return char_tokenizer()
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(spec)
    except Exception as e:  # OSError, ValueError, HTTP errors: all mean "cannot get this tokenizer"
        raise SailError(f"cannot load tokenizer {spec!r} ({str(e).splitlines()[0][:160]}); give a local "
                        "directory, a Hugging Face id reachable from here, or 'char'") from None


def _classes(kind: str, modality: str):
    import transformers as tf

    table = {("vision", "clip"): (tf.CLIPVisionConfig, tf.CLIPVisionModel),
             ("vision", "align"): (tf.AlignVisionConfig, tf.AlignVisionModel),
             ("vision", "efficientnet"): (tf.EfficientNetConfig, tf.EfficientNetModel),
             ("text", "clip"): (tf.CLIPTextConfig, tf.CLIPTextModel),
             ("text", "bert"): (tf.BertConfig, tf.BertModel)}
    if (modality, kind) not in table:
        known = VISION_TYPES if modality == "vision" else TEXT_TYPES
        raise SailError(f"unknown {modality} tower type {kind!r}; choose one of {', '.join(known)}")
    return table[(modality, kind)]


def _make_config(kind: str, modality: str, config):
    config_cls, _ = _classes(kind, modality)
    if isinstance(config, config_cls):
        return config
    try:
        return config_cls(**dict(config or {}))
    except (TypeError, ValueError) as e:
        raise SailError(f"bad {modality} tower config for type {kind!r}: {str(e).splitlines()[0][:200]}") from None


def _make_tower(kind: str, modality: str, config, pretrained: str | None = None):
    """A transformers model: random init from `config`, or weights from `pretrained` (id or directory)."""
    _, model_cls = _classes(kind, modality)
    extra = {"add_pooling_layer": False} if kind == "bert" else {}  # unused pooler would break DDP
    if pretrained:
        try:
            return model_cls.from_pretrained(pretrained, **extra)
        except Exception as e:
            raise SailError(f"cannot load {modality} tower {pretrained!r} ({str(e).splitlines()[0][:160]})") from None
    return model_cls(_make_config(kind, modality, config), **extra)


def tower_dim(kind: str, config) -> int:
    """Width of the pooled output of a tower of this type and config."""
    if kind in ("clip", "bert"):
        return int(config.hidden_size)
    from transformers.models.align.modeling_align import round_filters

    # ALIGN's EfficientNet ends at its last block; torchvision-style EfficientNet has a 1280-wide top conv.
    return round_filters(config, config.out_channels[-1] if kind == "align" else 1280)


# ----------------------------------------------------------------------------------------- the model


class Towers(nn.Module):
    """Vision tower + text tower + projection heads + temperature. See the module docstring."""

    def __init__(self, vision: nn.Module, text: nn.Module, tokenizer, *, recipe: str, vision_type: str,
                 text_type: str, embed_dim: int, preprocessing: ImagePreprocessing, max_length: int = 77,
                 head: str = "linear", head_width: int = 4, head_activation: str = "relu6",
                 image_projection: str | None = None, text_projection: str | None = None,
                 temperature: str = "log_scale", init_scale: float = 1 / 0.07, max_scale: float = 100.0):
        super().__init__()
        if temperature not in TEMPERATURES:
            raise SailError(f"temperature must be one of {', '.join(TEMPERATURES)}, got {temperature!r}")
        if not 0 < init_scale <= max_scale:
            raise SailError(f"need 0 < init_scale <= max_scale, got {init_scale} and {max_scale}")
        positions = getattr(text.config, "max_position_embeddings", max_length)
        if max_length > positions:
            raise SailError(f"text max_length {max_length} exceeds the text tower's {positions} positions")
        if len(tokenizer) > text.config.vocab_size:
            raise SailError(f"the tokenizer has {len(tokenizer)} tokens but the text tower's vocab_size is "
                            f"{text.config.vocab_size}; raise vocab_size or use the matching tokenizer")
        self.vision, self.text, self.tokenizer = vision, text, tokenizer
        self.recipe, self.vision_type, self.text_type = recipe, vision_type, text_type
        self.embed_dim, self.max_length, self.preprocessing = embed_dim, max_length, preprocessing
        # `head` is both sides' projection unless image_projection / text_projection say otherwise
        image_kind, text_kind = image_projection or head, text_projection or head
        self.head_spec = {"image": image_kind, "text": text_kind, "width": head_width, "activation": head_activation}
        self.temperature, self.init_scale, self.max_scale = temperature, float(init_scale), float(max_scale)
        self.image_dim, self.text_dim = tower_dim(vision_type, vision.config), tower_dim(text_type, text.config)
        self.image_head = make_projection(image_kind, self.image_dim, embed_dim, head_width, head_activation)
        self.text_head = make_projection(text_kind, self.text_dim, embed_dim, head_width, head_activation)
        if temperature == "log_scale":
            self.log_scale = nn.Parameter(torch.tensor(math.log(init_scale)))
        else:
            self.sigma = nn.Parameter(torch.tensor(1.0 / init_scale))

    # ------------------------------------------------------------------ temperature
    def scale(self) -> torch.Tensor:
        """The temperature t (logits = t x.y), differentiable."""
        return self.log_scale.exp() if self.temperature == "log_scale" else 1.0 / self.sigma

    @property
    def logit_scale(self) -> torch.Tensor:
        """log t, for code that expects CLIP's convention (t = logit_scale.exp())."""
        return self.log_scale if self.temperature == "log_scale" else -self.sigma.log()

    @torch.no_grad()
    def clamp_(self) -> "Towers":
        """Keep t in [1, max_scale] (log_scale) or t <= max_scale (sigma); call after every optimizer step."""
        if self.temperature == "log_scale":
            self.log_scale.clamp_(0.0, math.log(self.max_scale))
        else:
            self.sigma.clamp_(min=1.0 / self.max_scale)
        return self

    # ------------------------------------------------------------------ forward
    def _pool_text(self, input_ids, attention_mask) -> torch.Tensor:
        out = self.text(input_ids=input_ids, attention_mask=attention_mask)
        return out.pooler_output if self.text_type == "clip" else out.last_hidden_state[:, 0]  # (M, width)

    def embed_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised pixels -> (B, D) unit-norm float32 embeddings."""
        pooled = self.vision(pixel_values=pixels).pooler_output  # (B, width)
        return F.normalize(self.image_head(pooled).float(), dim=-1)

    def embed_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(M, L) token ids and mask -> (M, D) unit-norm float32 embeddings."""
        return F.normalize(self.text_head(self._pool_text(input_ids, attention_mask)).float(), dim=-1)

    def forward(self, pixels, input_ids, attention_mask):
        """One call for DDP: (B, D) image and (M, D) text embeddings and t (M may be k*B captions)."""
        return self.embed_images(pixels), self.embed_tokens(input_ids, attention_mask), self.scale()

    def tokenize(self, texts: list[str]) -> dict:
        """Pad to the longest text (truncating at max_length): {"input_ids", "attention_mask"} (M, L)."""
        enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    # ------------------------------------------------------------------ inference helpers
    def _device(self) -> torch.device:
        return next(self.parameters()).device

    @torch.no_grad()
    def encode_image(self, images, batch_size: int = 64) -> torch.Tensor:
        """Images (PIL or paths/refs for sail.data.load_image) -> (N, D) unit-norm float32 on CPU."""
        from sail.data import ImageError, load_image

        was_training, device = self.training, self._device()
        self.eval()  # BatchNorm (EfficientNet) must use its running statistics here
        out = []
        try:
            for a in range(0, len(images), batch_size):
                batch = []
                for item in images[a:a + batch_size]:
                    try:
                        image = item if hasattr(item, "convert") else load_image(str(item))
                    except ImageError as e:
                        raise SailError(f"cannot encode image {item!r}: {e}") from None
                    batch.append(self.preprocessing.eval(image))
                with resolve_precision("auto", device).autocast():
                    out.append(self.embed_images(torch.stack(batch).to(device)).cpu())
        finally:
            self.train(was_training)
        return torch.cat(out) if out else torch.zeros(0, self.embed_dim)

    @torch.no_grad()
    def encode_text(self, texts, batch_size: int = 256) -> torch.Tensor:
        """Strings -> (N, D) unit-norm float32 on CPU."""

        if isinstance(texts, str):
            raise SailError("encode_text takes a list of strings, not one string")
        was_training, device = self.training, self._device()
        self.eval()
        out = []
        try:
            for a in range(0, len(texts), batch_size):
                enc = self.tokenize(texts[a:a + batch_size])
                with resolve_precision("auto", device).autocast():
                    out.append(self.embed_tokens(enc["input_ids"].to(device), enc["attention_mask"].to(device)).cpu())
        finally:
            self.train(was_training)
        return torch.cat(out) if out else torch.zeros(0, self.embed_dim)

    @torch.no_grad()
    def recalibrate_batchnorm(self, images, batch_size: int = 64) -> int:
        """Recompute the vision tower's BatchNorm running statistics as plain averages over `images` (PIL or
        refs, eval preprocessing; unreadable refs are skipped); returns the number of BatchNorm layers.

        Why: some of EfficientNet's BatchNorm layers keep a slow moving average (torch momentum 0.1) that lags
        behind weights that move every step, so after a short run the eval-mode embeddings can collapse.
        Running statistics never change training-mode outputs, so this does not alter training itself.
        """
        from sail.data import ImageError, load_image

        def decoded(refs):
            for x in refs:
                try:
                    yield x if hasattr(x, "convert") else load_image(str(x))
                except ImageError:
                    continue

        norms = [m for m in self.vision.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if not norms or not images:
            return len(norms)
        was_training, device = self.training, self._device()
        momenta = [m.momentum for m in norms]
        self.eval()  # dropout and drop-connect off ...
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # ... and a cumulative average over the batches below
            m.train()
        try:
            for a in range(0, len(images), batch_size):
                pixels = [self.preprocessing.eval(x) for x in decoded(images[a:a + batch_size])]
                if len(pixels) > 1:  # BatchNorm needs two values per channel
                    with resolve_precision("auto", device).autocast():
                        self.vision(pixel_values=torch.stack(pixels).to(device))
        finally:
            for m, momentum in zip(norms, momenta):
                m.momentum = momentum
            self.train(was_training)
        return len(norms)

    # ------------------------------------------------------------------ training helpers
    def param_groups(self, weight_decay: float) -> list[dict]:
        """Matrices and conv kernels decay; biases, norms, embeddings' 1-d params and t do not (CLIP rule)."""
        decay = [p for p in self.parameters() if p.ndim >= 2]
        no_decay = [p for p in self.parameters() if p.ndim < 2]
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

    def enable_gradient_checkpointing(self) -> list[str]:
        """Recompute tower activations in backward; returns the towers that cannot (e.g. AlignVision)."""
        unsupported = []
        for name, tower in (("vision", self.vision), ("text", self.text)):
            if not getattr(tower, "supports_gradient_checkpointing", False):
                unsupported.append(f"{name} ({type(tower).__name__})")
            elif hasattr(tower, "activation_checkpointing_enable"):  # transformers >= 5
                tower.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                tower.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return unsupported

    # ------------------------------------------------------------------ save / load
    @property
    def config(self) -> dict:
        return {"format": FORMAT, "format_version": FORMAT_VERSION, "recipe": self.recipe,
                "vision": {"type": self.vision_type, "config": self.vision.config.to_dict()},
                "text": {"type": self.text_type, "config": self.text.config.to_dict(), "max_length": self.max_length},
                "embed_dim": self.embed_dim, "heads": dict(self.head_spec),
                "temperature": {"param": self.temperature, "init_scale": self.init_scale, "max_scale": self.max_scale},
                "image": self.preprocessing.to_dict()}

    def save_pretrained(self, directory: str | Path, metadata: dict | None = None) -> Path:
        """Write config.json (the authority), model.safetensors and tokenizer/."""
        import sail

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        write_atomic(directory / "config.json", json.dumps(self.config, indent=2, sort_keys=True) + "\n")
        meta = {"format": FORMAT, "recipe": self.recipe, "sail_version": sail.__version__}
        meta.update({str(k): str(v) for k, v in (metadata or {}).items()})
        # clone(): safetensors refuses tensors that share storage (e.g. tied or viewed weights)
        tensors = {k: v.detach().contiguous().clone().cpu() for k, v in self.state_dict().items()}
        save_file(tensors, str(directory / "model.safetensors"), metadata=meta)
        self.tokenizer.save_pretrained(str(directory / "tokenizer"))
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path, map_location: str | torch.device = "cpu") -> "Towers":
        """Rebuild from config.json, load model.safetensors strictly; returned in eval mode."""
        directory = Path(directory)
        config, config_path, weights_path = read_saved_config(directory, FORMAT, FORMAT_VERSION, ("tokenizer",))
        vision_type, text_type = config["vision"]["type"], config["text"]["type"]
        vision_cfg = _classes(vision_type, "vision")[0].from_dict(config["vision"]["config"])
        text_cfg = _classes(text_type, "text")[0].from_dict(config["text"]["config"])
        temp, heads = config["temperature"], config["heads"]  # heads: {"image", "text"} kinds, or "kind" (older)
        towers = cls(_make_tower(vision_type, "vision", vision_cfg), _make_tower(text_type, "text", text_cfg),
                     load_tokenizer(str(directory / "tokenizer")), recipe=config["recipe"],
                     vision_type=vision_type, text_type=text_type, embed_dim=config["embed_dim"],
                     preprocessing=ImagePreprocessing.from_dict(config["image"]),
                     max_length=config["text"]["max_length"], head=heads.get("kind", "linear"),
                     image_projection=heads.get("image"), text_projection=heads.get("text"),
                     head_width=heads["width"], head_activation=heads["activation"],
                     temperature=temp["param"], init_scale=temp["init_scale"], max_scale=temp["max_scale"])
        try:
            tensors = load_file(str(weights_path), device=str(map_location))
        except (SafetensorError, OSError) as e:
            raise SailError(f"{weights_path} is not a readable safetensors file ({e})") from None
        _check_state(towers.state_dict(), tensors, weights_path)
        towers.to(map_location)
        towers.load_state_dict(tensors, strict=True)
        return towers.eval()


def build_towers(recipe: str, vision: dict, text: dict, embed_dim: int, image: dict | None = None,
                 head: str = "linear", temperature: str = "log_scale", init_scale: float = 1 / 0.07,
                 max_scale: float = 100.0, projection: dict | None = None) -> Towers:
    """Towers from recipe-config sections.

    projection: {"image": kind, "text": kind} (sail.train.heads.PROJECTIONS; ALIP: clip/clip, ALIGN: identity/fc);
                a side left out uses `head`. A `clip` side whose tower is `pretrained` from a CLIPModel
                checkpoint starts from that checkpoint's visual_projection / text_projection.
    vision: {"type", "config": {...transformers config kwargs}, "pretrained": id/dir or null}
    text:   {"type", "config", "pretrained", "tokenizer": "char" | id/dir (default: pretrained),
             "max_length"}. Token ids the tower needs (vocab_size, pad/bos/eos) are filled in from the
             tokenizer when the config leaves them out.
    image:  ImagePreprocessing fields (size defaults to the vision config's image_size).
    """
    for name, section in (("vision", vision), ("text", text)):
        if not isinstance(section, dict) or "type" not in section:
            raise SailError(f"the {name} section of the config needs a 'type' key")
    tok_spec = text.get("tokenizer") or text.get("pretrained")
    if not tok_spec:
        raise SailError("the text section needs a tokenizer ('char', or an id / directory) or a pretrained model")
    tokenizer = load_tokenizer(str(tok_spec))
    text_cfg = dict(text.get("config") or {})
    if not text.get("pretrained"):
        text_cfg.setdefault("vocab_size", len(tokenizer))
        text_cfg.setdefault("pad_token_id", tokenizer.pad_token_id)
        if text["type"] == "clip":  # CLIP pools at the first end-of-text token; take its id from the tokenizer
            text_cfg.setdefault("bos_token_id", tokenizer.cls_token_id if tokenizer.bos_token_id is None
                                else tokenizer.bos_token_id)
            text_cfg.setdefault("eos_token_id", tokenizer.sep_token_id if tokenizer.eos_token_id is None
                                else tokenizer.eos_token_id)
    vision_tower = _make_tower(vision["type"], "vision", vision.get("config"), vision.get("pretrained"))
    text_tower = _make_tower(text["type"], "text", text_cfg, text.get("pretrained"))
    image = dict(image or {})
    size = getattr(vision_tower.config, "image_size", 224)
    image.setdefault("size", int(size if isinstance(size, int) else size[0]))
    towers = Towers(vision_tower, text_tower, tokenizer, recipe=recipe, vision_type=vision["type"],
                    text_type=text["type"], embed_dim=int(embed_dim), preprocessing=ImagePreprocessing.from_dict(image),
                    max_length=int(text.get("max_length", 77)), head=head, temperature=temperature,
                    image_projection=(projection or {}).get("image"), text_projection=(projection or {}).get("text"),
                    init_scale=init_scale, max_scale=max_scale)
    init = (projection or {}).get("init", "pretrained")
    if init not in ("pretrained", "random"):
        raise SailError(f"projection.init {init!r} is invalid; use pretrained (copy a CLIP checkpoint's projection) "
                        "or random")
    for side, section, key in (("image", vision, "visual_projection.weight"), ("text", text, "text_projection.weight")):
        if towers.head_spec[side] == "clip" and section.get("pretrained"):
            if init == "random":
                print(f"note: the {side} projection starts random (projection.init: random), not from "
                      f"{section['pretrained']}'s {key}")
                continue
            _load_clip_projection(getattr(towers, f"{side}_head"), str(section["pretrained"]), key)
    return towers


def _load_clip_projection(head: nn.Module, pretrained: str, key: str) -> None:
    """Copy a CLIPModel checkpoint's projection (`visual_projection.weight` / `text_projection.weight`,
    (embed_dim, width), no bias) into a `clip` projection. A projection that cannot be loaded (no
    safetensors weights reachable, or a bare CLIPVisionModel / CLIPTextModel without one) is an error: a
    silently random projection would throw the checkpoint's alignment away; `projection.init: random` asks
    for that explicitly."""
    from safetensors import safe_open

    fix = "use a CLIPModel checkpoint with safetensors weights, or set projection.init: random"
    path = Path(pretrained) / "model.safetensors"
    if not path.is_file():
        try:
            from huggingface_hub import hf_hub_download

            path = Path(hf_hub_download(pretrained, "model.safetensors"))
        except Exception as e:  # OSError, HTTP and hub errors: all mean "no weights reachable"
            raise SailError(f"cannot load {key} from {pretrained}: no model.safetensors there "
                            f"({type(e).__name__}); {fix}") from None
    with safe_open(str(path), framework="pt") as f:
        if key not in f.keys():
            raise SailError(f"cannot load {key} from {pretrained}: its model.safetensors has no such tensor; {fix}")
        weight = f.get_tensor(key)
    if weight.shape != head.proj.weight.shape:
        raise SailError(f"{pretrained}'s {key} is {tuple(weight.shape)} but the projection is "
                        f"{tuple(head.proj.weight.shape)}; set embed_dim to {weight.shape[0]}")
    with torch.no_grad():
        head.proj.weight.copy_(weight)
