"""The trainable part of SAIL: one small alignment head per modality plus the loss scalars (t, b).

Frozen encoders are run once and cached; only these heads learn. Each head is LayerNorm(in_dim) followed by

    linear  Linear(in, out)
    mlp     Linear(in, width*in) - GELU - Linear(width*in, out)
    glu     W_out( act(W_1 x) * (W_2 x) ),  hidden = width*in, act = ReLU6 (official "star" head) or SiLU;
            with clamp=c both branches are clipped to [-c, c] first (official star: c = 1e3; sail default: none)

with xavier_uniform weights and zero biases (official init). Embeddings are L2-normalised.

    heads = AlignmentHeads(image_dim=2048, text_dim=1024, kind="glu")
    x, y = heads(image_features, text_features)      # (N, 1024) each, unit norm
    logits = heads.scale() * x @ y.T + heads.logit_bias
    opt = torch.optim.AdamW(heads.param_groups(weight_decay=1e-4))
    ...; opt.step(); heads.clamp_()                   # keep log t in [0, ln 100]
    heads.save_pretrained("runs/demo")                # config.json + model.safetensors
    heads = AlignmentHeads.from_pretrained("runs/demo")
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from sail.core.artifacts import read_json, write_atomic
from sail.core.errors import SailError

FORMAT = "sail-heads"
FORMAT_VERSION = 1
KINDS = ("linear", "mlp", "glu")
ACTIVATIONS = {"relu6": nn.ReLU6, "silu": nn.SiLU, "gelu": nn.GELU}
MAX_LOG_SCALE = math.log(100.0)  # SigLIP / SAIL clamp t <= 100
CONFIG_KEYS = ("format", "format_version", "image_dim", "text_dim", "out_dim", "kind", "width", "activation", "clamp")


def _init_linear(layer: nn.Linear) -> nn.Linear:
    nn.init.xavier_uniform_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


class LinearHead(nn.Module):
    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(in_dim)
        self.proj = _init_linear(nn.Linear(in_dim, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.norm(x))


class MLPHead(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(in_dim)
        self.fc1 = _init_linear(nn.Linear(in_dim, width * in_dim))
        self.act = nn.GELU()
        self.fc2 = _init_linear(nn.Linear(width * in_dim, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(self.norm(x))))


class GLUHead(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, width: int, activation: str, clamp: float | None = None):
        super().__init__()
        hidden = width * in_dim
        self.clamp = clamp  # official star clips both branches to +-1e3 (sail.convert sets it for imported heads)
        self.norm = nn.LayerNorm(in_dim)
        self.w1 = _init_linear(nn.Linear(in_dim, hidden))  # gate branch, goes through act
        self.w2 = _init_linear(nn.Linear(in_dim, hidden))  # linear branch
        self.act = ACTIVATIONS[activation]()
        self.w_out = _init_linear(nn.Linear(hidden, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        a, b = self.w1(h), self.w2(h)
        if self.clamp is not None:
            a, b = a.clamp(-self.clamp, self.clamp), b.clamp(-self.clamp, self.clamp)
        return self.w_out(self.act(a) * b)  # (N, hidden) * (N, hidden) -> (N, out)


def make_head(kind: str, in_dim: int, out_dim: int, width: int = 4, activation: str = "relu6",
              clamp: float | None = None) -> nn.Module:
    """One alignment head. `activation` and `clamp` are used by `glu` only (mlp is GELU as in the official code)."""
    if kind not in KINDS:
        raise SailError(f"unknown head kind {kind!r}; choose one of {', '.join(KINDS)}")
    if activation not in ACTIVATIONS:
        raise SailError(f"unknown head activation {activation!r}; choose one of {', '.join(ACTIVATIONS)}")
    for name, value in (("in_dim", in_dim), ("out_dim", out_dim), ("width", width)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise SailError(f"head {name} must be a positive integer, got {value!r}")
    if clamp is not None and not (isinstance(clamp, (int, float)) and not isinstance(clamp, bool) and clamp > 0):
        raise SailError(f"head clamp must be a positive number or null, got {clamp!r}")
    if kind == "linear":
        return LinearHead(in_dim, out_dim)
    if kind == "mlp":
        return MLPHead(in_dim, out_dim, width)
    return GLUHead(in_dim, out_dim, width, activation, None if clamp is None else float(clamp))


# Projections of the end-to-end recipes (sail.train.towers): the paper's choice for each tower, no LayerNorm.
PROJECTIONS = KINDS + ("clip", "fc", "identity")


class CLIPProjection(nn.Module):
    """CLIP's projection: one Linear without bias and without LayerNorm (the layout of CLIPModel's
    visual_projection / text_projection, so those weights load as `proj.weight`). Init N(0, in_dim^-0.5)
    as in CLIP."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.proj = nn.Linear(in_dim, out_dim, bias=False)
        nn.init.normal_(self.proj.weight, std=in_dim ** -0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class FCProjection(nn.Module):
    """ALIGN's text side: one fully-connected layer with linear activation on [CLS] (Linear with bias, no norm)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.proj = _init_linear(nn.Linear(in_dim, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class IdentityProjection(nn.Module):
    """ALIGN's image side: the pooled tower feature is the embedding (EfficientNet-B7: 640-d), no parameters."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        if in_dim != out_dim:
            raise SailError(f"an identity projection keeps the tower's width {in_dim}; set embed_dim to {in_dim} "
                            f"or choose a projection that maps {in_dim} -> {out_dim}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def make_projection(kind: str, in_dim: int, out_dim: int, width: int = 4, activation: str = "relu6") -> nn.Module:
    """A sail head (linear | mlp | glu, LayerNorm first) or a recipe projection: clip (Linear, no bias, no
    LayerNorm), fc (Linear with bias, no LayerNorm), identity (no parameters; needs in_dim == out_dim)."""
    if kind not in PROJECTIONS:
        raise SailError(f"unknown projection {kind!r}; choose one of {', '.join(PROJECTIONS)}")
    if kind in KINDS:
        return make_head(kind, in_dim, out_dim, width, activation)
    return {"clip": CLIPProjection, "fc": FCProjection, "identity": IdentityProjection}[kind](in_dim, out_dim)


class AlignmentHeads(nn.Module):
    """Image head + text head + learnable log-temperature `logit_scale` (log t) and bias `logit_bias` (b)."""

    def __init__(self, image_dim: int, text_dim: int, out_dim: int = 1024, kind: str = "glu", width: int = 4,
                 activation: str = "relu6", init_scale: float = 20.0, init_bias: float = -10.0,
                 clamp: float | None = None):
        super().__init__()
        if not init_scale > 0:
            raise SailError(f"init_scale is the temperature t and must be > 0, got {init_scale}")
        self.image_dim, self.text_dim, self.out_dim = image_dim, text_dim, out_dim
        self.kind, self.width, self.activation, self.clamp = kind, width, activation, clamp
        self.image_head = make_head(kind, image_dim, out_dim, width, activation, clamp)
        self.text_head = make_head(kind, text_dim, out_dim, width, activation, clamp)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(init_scale)))
        self.logit_bias = nn.Parameter(torch.tensor(float(init_bias)))
        self.extra_config: dict = {}

    # ------------------------------------------------------------------ forward
    def _encode(self, head: nn.Module, features: torch.Tensor, in_dim: int, what: str) -> torch.Tensor:
        if features.shape[-1] != in_dim:
            raise SailError(f"{what} features have dim {features.shape[-1]} but the head expects {in_dim}; "
                            f"use features from the encoder these heads were trained on")
        dtype = head.norm.weight.dtype
        return F.normalize(head(features.to(dtype)), dim=-1)

    def encode_image(self, features: torch.Tensor) -> torch.Tensor:
        """(..., image_dim) frozen-encoder features -> (..., out_dim) unit-norm embeddings."""
        return self._encode(self.image_head, features, self.image_dim, "image")

    def encode_text(self, features: torch.Tensor) -> torch.Tensor:
        """(..., text_dim) frozen-encoder features -> (..., out_dim) unit-norm embeddings."""
        return self._encode(self.text_head, features, self.text_dim, "text")

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor):
        return self.encode_image(image_features), self.encode_text(text_features)

    def scale(self) -> torch.Tensor:
        """The temperature t = exp(logit_scale), differentiable."""
        return self.logit_scale.exp()

    @torch.no_grad()
    def clamp_(self) -> "AlignmentHeads":
        """Clamp log t to [0, ln 100] in place; call after every optimizer step."""
        self.logit_scale.clamp_(0.0, MAX_LOG_SCALE)
        return self

    # ------------------------------------------------------------------ training helpers
    def param_groups(self, weight_decay: float) -> list[dict]:
        """Two optimizer groups: Linear weights decay; LayerNorm, biases, logit_scale, logit_bias do not."""
        decay_ids = {id(m.weight) for m in self.modules() if isinstance(m, nn.Linear)}
        decay = [p for p in self.parameters() if id(p) in decay_ids]
        no_decay = [p for p in self.parameters() if id(p) not in decay_ids]
        return [{"params": decay, "weight_decay": weight_decay},
                {"params": no_decay, "weight_decay": 0.0}]

    def num_parameters(self) -> int:
        """Trainable parameters, including the two scalars."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    # ------------------------------------------------------------------ save / load
    @property
    def config(self) -> dict:
        config = {"format": FORMAT, "format_version": FORMAT_VERSION, "image_dim": self.image_dim,
                  "text_dim": self.text_dim, "out_dim": self.out_dim, "kind": self.kind, "width": self.width,
                  "activation": self.activation}
        if self.clamp is not None:  # written only when set: runs without it keep their config.json unchanged
            config["clamp"] = self.clamp
        return config

    def save_pretrained(self, directory: str | Path, extra_config: dict | None = None,
                        metadata: dict | None = None) -> Path:
        """Write `config.json` (config + extra_config, the authority) and `model.safetensors`."""
        directory = Path(directory)
        config = self.config
        for key, value in {**self.extra_config, **(extra_config or {})}.items():
            if key in config and config[key] != value:
                raise SailError(f"extra_config key {key!r}={value!r} contradicts the heads' {key}={config[key]!r}; "
                                f"drop it from extra_config")
            config[key] = value
        meta = {"format": FORMAT, "sail_version": _sail_version()}
        for key, value in (metadata or {}).items():
            if isinstance(value, (dict, list, tuple, set)):
                raise SailError(f"safetensors metadata is a flat str->str map; {key!r} holds a {type(value).__name__}")
            meta[str(key)] = str(value)
        try:
            text = json.dumps(config, indent=2, sort_keys=True)
        except TypeError as e:
            raise SailError(f"extra_config must be JSON-serialisable ({e})") from None
        directory.mkdir(parents=True, exist_ok=True)
        write_atomic(directory / "config.json", text + "\n")
        # .contiguous(): safetensors refuses views; clone so no two names share storage.
        tensors = {k: v.detach().contiguous().clone().cpu() for k, v in self.state_dict().items()}
        save_file(tensors, str(directory / "model.safetensors"), metadata=meta)
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path, map_location: str | torch.device = "cpu", revision: str | None = None,
                        cache_dir: str | Path | None = None) -> "AlignmentHeads":
        """Build heads from `config.json` and load `model.safetensors` strictly; returned in eval mode.
        `directory` may be a Hugging Face id ("org/name"; see sail.hub for revision, cache, offline)."""
        from sail.core.locate import resolve_pretrained

        directory = resolve_pretrained(directory, revision, cache_dir) if not Path(directory).is_dir() and \
            str(directory).count("/") == 1 else Path(directory)
        if not directory.is_dir():
            raise SailError(f"heads directory {directory} not found; train heads with `sail align` first")
        config, config_path, weights_path = read_saved_config(directory, FORMAT, FORMAT_VERSION)
        missing = [k for k in ("image_dim", "text_dim", "out_dim", "kind", "width", "activation") if k not in config]
        if missing:
            raise SailError(f"{config_path} lacks {', '.join(missing)}")
        heads = cls(config["image_dim"], config["text_dim"], config["out_dim"], config["kind"], config["width"],
                    config["activation"], clamp=config.get("clamp"))
        try:
            tensors = load_file(str(weights_path), device=str(map_location))
        except (SafetensorError, OSError) as e:
            raise SailError(f"{weights_path} is not a readable safetensors file ({e})") from None
        _check_state(heads.state_dict(), tensors, weights_path)
        dtypes = {t.dtype for t in tensors.values()}
        if len(dtypes) == 1:  # keep the saved precision (e.g. heads exported in fp16)
            heads.to(dtype=dtypes.pop())
        heads.to(map_location)
        heads.load_state_dict(tensors, strict=True)
        heads.extra_config = {k: v for k, v in config.items() if k not in CONFIG_KEYS}
        return heads.eval()


def read_saved_config(directory: Path, fmt: str, version: int, extra_files: tuple[str, ...] = ()):
    """(config, config path, weights path) of a saved directory; one clear error for anything off."""
    config_path, weights_path = directory / "config.json", directory / "model.safetensors"
    for path in (config_path, weights_path, *(directory / f for f in extra_files)):
        if not path.exists():
            raise SailError(f"{path} is missing; {directory} is not a saved {fmt} directory")
    config = read_json(config_path, what=f"{fmt} config", todo=f"restore it from a copy or save {directory} again")
    if config.get("format") != fmt:
        raise SailError(f"{config_path} is not a {fmt} config (no \"format\": \"{fmt}\")")
    if config.get("format_version", 0) > version:
        raise SailError(f"{config_path} has format_version {config['format_version']}; this sail reads "
                        f"up to {version}, upgrade sail")
    return config, config_path, weights_path


def _check_state(expected: dict, found: dict, path: Path) -> None:
    """Strict loading with one readable message instead of torch's multi-line RuntimeError."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    problems = []
    if missing:
        problems.append(f"missing keys {missing}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected}")
    shapes = [f"{k}: file {tuple(found[k].shape)} vs model {tuple(expected[k].shape)}"
              for k in sorted(set(expected) & set(found)) if found[k].shape != expected[k].shape]
    if shapes:
        problems.append("shape mismatch " + "; ".join(shapes))
    if problems:
        raise SailError(f"{path} does not match its config.json: {'; '.join(problems)}")


def _sail_version() -> str:
    import sail  # local import: sail/__init__ imports this module lazily

    return sail.__version__
