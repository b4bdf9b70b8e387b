"""Image augmentation and preprocessing for end-to-end recipes, on PIL images, without torchvision.

    pre = ImagePreprocessing(size=224, scale=(0.9, 1.0), flip=False)     # CLIP / ALIP defaults
    g = torch.Generator().manual_seed(1234)
    x = pre.train(image, g)        # random resized crop (+ flip) -> (3, 224, 224) normalised float32
    x = pre.eval(image)            # resize short side + centre crop -> (3, 224, 224), no randomness

Randomness comes only from the torch.Generator passed in, so the same generator state gives the same
crop and flip in any process or DataLoader worker (the recipes seed one generator per sample from
(seed, epoch, index), which makes resumed runs see exactly the same augmentations).

The random resized crop follows the usual Inception-style recipe: up to 10 tries at a box whose area is a
uniform fraction in `scale` of the image and whose aspect ratio is log-uniform in `ratio`; if none fits,
the largest centred box with an aspect ratio inside `ratio`. The box is then resized to size x size.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
from PIL import Image

from sail.core.errors import SailError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTERPOLATIONS = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR,
                  "nearest": Image.Resampling.NEAREST}


def _uniform(low: float, high: float, g: torch.Generator) -> float:
    return low + (high - low) * torch.rand((), generator=g, dtype=torch.float64).item()


def _randint(low: int, high: int, g: torch.Generator) -> int:
    """Uniform integer in [low, high] (both inclusive)."""
    return int(torch.randint(low, high + 1, (), generator=g).item())


def crop_box(width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float],
             g: torch.Generator) -> tuple[int, int, int, int]:
    """(left, top, w, h) of a random crop covering a `scale` fraction of the area, aspect w/h in `ratio`."""
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * _uniform(scale[0], scale[1], g)
        aspect = math.exp(_uniform(log_lo, log_hi, g))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return _randint(0, width - w, g), _randint(0, height - h, g), w, h
    # Fallback: the whole image, trimmed to the nearest allowed aspect ratio, centred.
    aspect = width / height
    if aspect < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif aspect > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def random_resized_crop(image: Image.Image, size: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                        g: torch.Generator | None = None, interpolation: str = "bicubic") -> Image.Image:
    """A random box (see crop_box) resized to size x size."""
    g = g if g is not None else torch.Generator().manual_seed(0)
    left, top, w, h = crop_box(image.width, image.height, scale, ratio, g)
    return image.resize((size, size), INTERPOLATIONS[interpolation], box=(left, top, left + w, top + h))


def hflip(image: Image.Image) -> Image.Image:
    """Mirror left-right: pixel (x, y) moves to (W - 1 - x, y)."""
    return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)


def resize_center_crop(image: Image.Image, size: int, resize: int | None = None,
                       interpolation: str = "bicubic") -> Image.Image:
    """Resize so the shorter side is `resize` (default `size`), then cut the centred size x size square."""
    resize = resize or size
    w, h = image.size
    s = resize / min(w, h)
    nw, nh = max(size, int(round(w * s))), max(size, int(round(h * s)))
    image = image.resize((nw, nh), INTERPOLATIONS[interpolation])
    left, top = (nw - size) // 2, (nh - size) // 2
    return image.crop((left, top, left + size, top + size))


def to_tensor(image: Image.Image, mean=None, std=None) -> torch.Tensor:
    """RGB PIL image -> (3, H, W) float32 in [0, 1], then (x - mean) / std per channel when given."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0  # (H, W, 3)
    x = torch.from_numpy(array.copy()).permute(2, 0, 1)  # (H, W, 3) -> (3, H, W)
    if mean is not None:
        m = torch.tensor(mean, dtype=torch.float32)[:, None, None]  # (3,) -> (3, 1, 1) broadcasts over H, W
        s = torch.tensor(std, dtype=torch.float32)[:, None, None]
        x = (x - m) / s
    return x.contiguous()


@dataclass
class ImagePreprocessing:
    """Train and eval image pipelines of one model; saved in the model's config.json (to_dict)."""

    size: int = 224                                  # output side, square
    resize: int | None = None                        # eval: short side before the centre crop (default size)
    mean: tuple = CLIP_MEAN
    std: tuple = CLIP_STD
    interpolation: str = "bicubic"
    scale: tuple = (0.9, 1.0)                        # train: crop area fraction (open_clip's default)
    ratio: tuple = (3 / 4, 4 / 3)                    # train: crop aspect ratio range
    flip: bool = False                               # train: random horizontal flip with p = 0.5

    def __post_init__(self):
        self.mean, self.std = tuple(float(v) for v in self.mean), tuple(float(v) for v in self.std)
        self.scale, self.ratio = tuple(float(v) for v in self.scale), tuple(float(v) for v in self.ratio)
        if not (isinstance(self.size, int) and self.size > 0):
            raise SailError(f"image size must be a positive integer, got {self.size!r}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise SailError("image mean and std need three values each, std > 0")
        if len(self.scale) != 2 or not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise SailError(f"crop scale must be two numbers 0 < lo <= hi <= 1, got {self.scale}")
        if len(self.ratio) != 2 or not 0 < self.ratio[0] <= self.ratio[1]:
            raise SailError(f"crop ratio must be two numbers 0 < lo <= hi, got {self.ratio}")
        if self.interpolation not in INTERPOLATIONS:
            raise SailError(f"unknown interpolation {self.interpolation!r}; choose one of {', '.join(INTERPOLATIONS)}")

    def train(self, image: Image.Image, g: torch.Generator) -> torch.Tensor:
        """Random resized crop, optional flip, normalise: (3, size, size)."""
        image = random_resized_crop(image, self.size, self.scale, self.ratio, g, self.interpolation)
        if self.flip and torch.rand((), generator=g).item() < 0.5:
            image = hflip(image)
        return to_tensor(image, self.mean, self.std)

    def eval(self, image: Image.Image) -> torch.Tensor:
        """Resize + centre crop, normalise: (3, size, size). Deterministic."""
        return to_tensor(resize_center_crop(image, self.size, self.resize, self.interpolation), self.mean, self.std)

    def to_dict(self) -> dict:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict) -> "ImagePreprocessing":
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise SailError(f"unknown image preprocessing key(s) {', '.join(unknown)}; known: {', '.join(names)}")
        return cls(**d)
