"""SAILModel: a trained run's heads plus the two frozen encoders, for embedding raw images and texts.

    model = sail.SAILModel.from_pretrained("runs/cc3m")            # encoders named in the run's config
    model = sail.SAILModel.from_pretrained("runs/demo", vision_model="/models/dinov2-l")  # local copies
    x = model.encode_image(["cat.jpg", pil_image])                 # (2, D) L2-normalised
    y = model.encode_text(["a photo of a cat"])                    # (1, D)
    p = model.similarity(["cat.jpg"], ["a cat", "a dog"])          # sigmoid(t x.y + b), (1, 2)
    model.logit_scale, model.scale()                               # log t (as CLIP / open_clip), t

The method names follow open_clip's (`encode_image`, `encode_text`), so CLIP evaluation code can
call a SAIL model through a thin adapter. Encoders load lazily: a text-only use never loads the
vision model. A run made by a full-model recipe (format "sail-towers") loads as `sail.train.towers.Towers`,
which offers the same three methods.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from sail.core.artifacts import read_json
from sail.core.errors import SailError
from sail.encoders import ImageEncoder, TextEncoder, load_encoder, pick_device, resolve_model
from sail.train.heads import AlignmentHeads


def read_run_config(run_dir: str | Path) -> dict:
    path = Path(run_dir) / "config.json"
    if not path.exists():
        raise SailError(f"{run_dir} is not a sail run (no config.json); train one with `sail align`")
    return read_json(path, what="run config", todo="restore it, or train the run again")


def _local_hint(encoder: dict) -> str | None:
    """A run trained on a local model directory names it "local:<name>"; on the machine that made it the
    directory is still where its feature store says (attribute model_path), so use it from there."""
    if not str(encoder.get("model_id", "")).startswith("local:"):
        return None
    hint = encoder.get("model_path")
    if not hint and encoder.get("store") and Path(encoder["store"]).is_file():
        from sail.data.store import FeatureStore

        try:
            with FeatureStore(encoder["store"]) as store:
                hint = store.attrs.get("model_path")
        except SailError:
            return None
    return str(hint) if hint and Path(str(hint)).is_dir() else None


class SAILModel(torch.nn.Module):
    def __init__(self, heads: AlignmentHeads, image_model: str, text_model: str, pooling: str = "concat",
                 max_length: int | None = None, device: str | torch.device = "auto", loss: str = "sigmoid"):
        super().__init__()
        self.loss = loss  # which loss trained the heads decides what `similarity` means
        self.device = pick_device(device) if isinstance(device, str) else device
        self.heads = heads.to(self.device).eval()
        self.image_model, self.text_model = image_model, text_model
        self.pooling, self.max_length = pooling, max_length
        self._vision: ImageEncoder | None = None
        self._text: TextEncoder | None = None

    @classmethod
    def from_pretrained(cls, run_dir: str | Path, vision_model: str | None = None, text_model: str | None = None,
                        device: str = "auto", revision: str | None = None, cache_dir: str | None = None):
        """A run directory or a Hugging Face id ("org/name", at `revision`, cached in `cache_dir`)."""
        if not Path(run_dir).is_dir() and str(run_dir).count("/") == 1:
            from sail.core.locate import resolve_pretrained

            run_dir = resolve_pretrained(run_dir, revision, cache_dir)
        cfg = read_run_config(run_dir)
        if cfg.get("format") == "sail-towers":
            from sail.train.towers import Towers

            return Towers.from_pretrained(run_dir, map_location=pick_device(device))
        heads = AlignmentHeads.from_pretrained(run_dir)
        img, txt = cfg.get("image_encoder", {}), cfg.get("text_encoder", {})
        if not (vision_model or img.get("model_id")) or not (text_model or txt.get("model_id")):
            raise SailError(f"{run_dir}/config.json does not name its encoders; pass vision_model= and text_model=")
        max_length = txt.get("max_length")
        vision_model, text_model = vision_model or _local_hint(img), text_model or _local_hint(txt)
        return cls(heads, vision_model or img["model_id"], text_model or txt["model_id"], img.get("pooling", "concat"),
                   None if max_length in (None, -1) else int(max_length), device, cfg.get("loss", "sigmoid"))

    # ------------------------------------------------------------------ encoders (lazy)
    @staticmethod
    def _spec(source: str, modality: str, option: str):
        try:
            return resolve_model(source, modality)
        except SailError as e:
            raise SailError(f"cannot find the run's {modality} encoder {source!r} ({e}); pass {option}= "
                            f"(--{option.replace('_', '-')}) pointing at a local copy") from None

    @property
    def vision(self) -> ImageEncoder:
        if self._vision is None:
            enc = load_encoder(self._spec(self.image_model, "image", "vision_model"), self.device, self.pooling)
            if enc.dim != self.heads.config["image_dim"]:
                raise SailError(f"vision model {self.image_model} gives {enc.dim}-d features but the run's image head "
                                f"expects {self.heads.config['image_dim']}; use the encoder the run was trained on")
            self._vision = enc
        return self._vision

    @property
    def text(self) -> TextEncoder:
        if self._text is None:
            enc = load_encoder(self._spec(self.text_model, "text", "text_model"), self.device, max_length=self.max_length)
            if enc.dim != self.heads.config["text_dim"]:
                raise SailError(f"text model {self.text_model} gives {enc.dim}-d features but the run's text head "
                                f"expects {self.heads.config['text_dim']}; use the encoder the run was trained on")
            self._text = enc
        return self._text

    @property
    def logit_scale(self) -> torch.Tensor:
        """log t, CLIP's convention: code that calls `.exp()` on it gets the temperature t."""
        return self.heads.logit_scale.detach()

    def scale(self) -> torch.Tensor:
        """The temperature t = exp(logit_scale), as `AlignmentHeads.scale()` and `Towers.scale()`."""
        return self.heads.scale().detach()

    # ------------------------------------------------------------------ embedding
    @torch.no_grad()
    def image_features(self, images: list, batch_size: int = 64) -> torch.Tensor:
        """Frozen-encoder features (before the head) of PIL images or paths."""
        from sail.data import ImageError, load_image

        out = []
        for i in range(0, len(images), batch_size):
            pixels = []
            for im in images[i:i + batch_size]:
                if isinstance(im, (str, Path)):
                    try:
                        im = load_image(str(im))
                    except ImageError as e:
                        raise SailError(f"cannot embed {im}: {e}") from None
                pixels.append(self.vision.preprocess(as_pil(im).convert("RGB")))
            pooled, _ = self.vision.encode_pixels(torch.stack(pixels))
            out.append(pooled)
        return torch.cat(out) if out else torch.zeros(0, self.heads.config["image_dim"])

    @torch.no_grad()
    def encode_image(self, images: list, batch_size: int = 64) -> torch.Tensor:
        """One image (PIL image or path) or a sequence of them (list, tuple, a Dataset's images column)."""
        images = image_list(images)
        return self.heads.encode_image(self.image_features(images, batch_size).to(self.device))

    @torch.no_grad()
    def encode_text(self, texts: list[str], batch_size: int = 256) -> torch.Tensor:
        texts = text_list(texts)
        feats = torch.from_numpy(self.text.encode_texts(list(texts), batch_size)) if texts else torch.zeros(0, self.heads.config["text_dim"])
        return self.heads.encode_text(feats.to(self.device))

    @torch.no_grad()
    def similarity(self, images: list, texts: list[str]) -> torch.Tensor:
        """Match probabilities (n_images, n_texts) in the sense the run's loss trained.

        sigmoid / multi-positive runs: sigmoid(t x.y + b), each pair on its own (b was trained).
        info-nce runs: softmax over the texts of t x.y, as CLIP's label probabilities (b never trained).
        """
        x, y = self.encode_image(images), self.encode_text(texts)
        logits = self.heads.scale() * x @ y.T  # (n_images, n_texts)
        if self.loss == "info-nce":
            return logits.softmax(dim=-1)
        return torch.sigmoid(logits + self.heads.logit_bias)


IMAGE_INPUTS = ("a PIL image, a file path, an H x W x 3 (or H x W) uint8 numpy array, a 3 x H x W tensor "
                "(uint8, or float in [0, 1]), or a list of those / an N x ... batch of arrays")


def image_list(images) -> list:
    """What encode_image accepts, as a list of single images; anything else is one TypeError saying what it takes."""
    from PIL import Image

    if isinstance(images, (str, Path, Image.Image)):
        return [images]
    if isinstance(images, (np.ndarray, torch.Tensor)):
        if images.ndim == 4:  # a batch: N x H x W x 3 arrays or N x 3 x H x W tensors
            return list(images)
        return [images]
    if isinstance(images, Sequence) and not isinstance(images, (bytes, bytearray)):
        return list(images)
    raise TypeError(f"encode_image takes {IMAGE_INPUTS}; got {type(images).__name__}")


def as_pil(im):
    """One image as PIL: numpy arrays are H x W x C (uint8, or float in [0, 1]); tensors are C x H x W."""
    from PIL import Image

    if isinstance(im, Image.Image):
        return im
    if isinstance(im, torch.Tensor):
        if im.ndim == 3 and im.shape[0] in (1, 3):
            im = im.permute(1, 2, 0)  # C x H x W -> H x W x C
        elif im.ndim != 2:
            raise TypeError(f"encode_image takes {IMAGE_INPUTS}; got a tensor of shape {tuple(im.shape)}")
        im = im.detach().cpu().numpy()
    if not isinstance(im, np.ndarray):
        raise TypeError(f"encode_image takes {IMAGE_INPUTS}; got {type(im).__name__}")
    if im.ndim == 3 and im.shape[-1] == 1:
        im = im[..., 0]
    if not (im.ndim == 2 or (im.ndim == 3 and im.shape[-1] in (3, 4))):
        raise TypeError(f"encode_image takes {IMAGE_INPUTS}; got an array of shape {im.shape}")
    if im.dtype != np.uint8:
        if not np.issubdtype(im.dtype, np.floating) or im.size and not (0 <= np.nanmin(im) and np.nanmax(im) <= 1):
            raise TypeError(f"encode_image takes {IMAGE_INPUTS}; got {im.dtype} values outside [0, 1]")
        im = np.round(np.nan_to_num(im) * 255).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(im))


def text_list(texts) -> list[str]:
    """A string or a sequence of strings; None, bytes or non-string items are one TypeError."""
    if isinstance(texts, str):
        return [texts]
    if texts is None or isinstance(texts, (bytes, bytearray)) or not isinstance(texts, (Sequence, np.ndarray)):
        raise TypeError(f"encode_text takes a string or a list of strings; got {type(texts).__name__}")
    texts = list(texts)
    bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
    if bad is not None:
        raise TypeError(f"encode_text takes a string or a list of strings; item {bad} is {type(texts[bad]).__name__}")
    return texts


def project_store(heads: AlignmentHeads, features: np.ndarray, modality: str, batch: int = 8192,
                  device: str | torch.device = "cpu") -> torch.Tensor:
    """Stored features (N, D) -> normalised embeddings (N, out) through the image or text head."""
    encode = heads.encode_image if modality == "image" else heads.encode_text
    out = []
    with torch.no_grad():
        for i in range(0, len(features), batch):
            out.append(encode(torch.from_numpy(np.asarray(features[i:i + batch])).float().to(device)).cpu())
    return torch.cat(out) if out else torch.zeros(0, heads.config["out_dim"])


class _TextBatch(list):
    """Raw strings standing in for a token tensor: CLIP evaluation code calls `.to(device)` on it."""

    def to(self, *args, **kwargs):
        return self


class OpenCLIPAdapter(torch.nn.Module):
    """open_clip's (model, preprocess, tokenizer) triple over a SAILModel, for CLIP evaluation tools.

        model, preprocess, tokenizer = OpenCLIPAdapter.create(sail.SAILModel.from_pretrained(run))
        image_emb = model.encode_image(torch.stack([preprocess(im) for im in images]))
        text_emb = model.encode_text(tokenizer(["a photo of a cat"]).to(device))

    Tokenisation happens inside the text encoder (each model keeps its own tokenizer), so the
    "tokens" are the strings themselves.
    """

    def __init__(self, model: SAILModel):
        super().__init__()
        self.model = model
        self.logit_scale = torch.nn.Parameter(model.heads.logit_scale.detach().clone(), requires_grad=False)

    @classmethod
    def create(cls, model: SAILModel):
        adapter = cls(model)
        return adapter, model.vision.preprocess, lambda texts: _TextBatch([texts] if isinstance(texts, str) else texts)

    @torch.no_grad()
    def encode_image(self, pixels: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        pooled, _ = self.model.vision.encode_pixels(pixels)
        return self.model.heads.encode_image(pooled.to(self.model.device))  # already L2-normalised

    @torch.no_grad()
    def encode_text(self, texts, normalize: bool = True) -> torch.Tensor:
        return self.model.encode_text(list(texts))
