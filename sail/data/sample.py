"""The embedded `sample` dataset: rendered coloured shapes with captions, built deterministically.

Nothing is downloaded: `sample_dir()` renders 64x64 PNG images of one shape (circle, square, triangle,
cross) in one colour (6 colours) at a random size and position, and writes `manifest.csv` with columns
id, image, caption ("a red circle"), long_caption (size, position and background too) and label (the
class "red circle"). The same seed always gives the same bytes, so the demo and the tests see identical
data everywhere.

Six of the 24 colour x shape combinations (`UNSEEN`, one per colour, every shape at least once) never
appear in `sample` (480 training images over the other 18 classes), so zero-shot on them is true
zero-shot: the model has seen "red" and "cross" captioned, never "red cross". `sample-val` is a second,
disjoint render of all 24 classes (240 images, 10 each) for evaluation.

    python -m sail.data.sample            # prints where the sample lives
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from sail.core.artifacts import atomic_dir

SAMPLE_VERSION = 2  # 2: the training split leaves out the UNSEEN combinations
SAMPLE_SIZE = 480  # 26-27 images for each of the 18 seen classes

COLOURS = {
    "red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220),
    "yellow": (235, 215, 20), "purple": (140, 40, 170), "orange": (245, 130, 10),
}
SHAPES = ("circle", "square", "triangle", "cross")
CLASS_NAMES = [f"{c} {s}" for c in COLOURS for s in SHAPES]
UNSEEN = ("red cross", "green triangle", "blue square", "yellow circle", "purple triangle", "orange square")
SEEN = [c for c in CLASS_NAMES if c not in UNSEEN]


def cache_root() -> Path:
    return Path(os.environ.get("SAIL_CACHE", Path.home() / ".cache" / "sail"))


def _draw(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    else:  # cross: two bars a third of the box wide
        w = (x1 - x0) / 3
        draw.rectangle((x0 + w, y0, x1 - w, y1), fill=fill)
        draw.rectangle((x0, y0 + w, x1, y1 - w), fill=fill)


def render_sample(out: Path, n: int = SAMPLE_SIZE, seed: int = 0, size: int = 64,
                  classes: list[str] | tuple[str, ...] = tuple(CLASS_NAMES)) -> None:
    """Render n images (cycling through `classes`) and their manifest into `out` (new or empty)."""
    rng = np.random.default_rng(seed)
    (out / "images").mkdir(parents=True)
    rows = []
    for i in range(n):
        name = classes[i % len(classes)]
        colour, shape = name.split()
        grey = int(rng.integers(200, 256))
        image = Image.new("RGB", (size, size), (grey, grey, grey))
        side = int(rng.integers(size // 3, size - 8))
        x0, y0 = (int(v) for v in rng.integers(2, size - side - 1, size=2))
        rgb = tuple(int(np.clip(c + rng.integers(-20, 21), 0, 255)) for c in COLOURS[colour])
        _draw(ImageDraw.Draw(image), shape, (x0, y0, x0 + side, y0 + side), rgb)
        sid = f"{'s' if seed == 0 else f'v{seed}-'}{i:04d}"
        image.save(out / "images" / f"{sid}.png")
        bigness = "large" if side > size * 0.6 else "small" if side < size * 0.45 else "medium-sized"
        where = ("top" if y0 + side / 2 < size / 2 else "bottom") + " " + ("left" if x0 + side / 2 < size / 2 else "right")
        rows.append({
            "id": sid,
            "image": f"images/{sid}.png",
            "caption": f"a {colour} {shape}",
            "long_caption": f"a {bigness} {colour} {shape} towards the {where} of a plain light grey background",
            "label": name,
        })
    with open(out / "manifest.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


# name: (images, seed, classes); val is a disjoint render of every class, seen and unseen
SPLITS = {"sample": (SAMPLE_SIZE, 0, SEEN), "sample-val": (240, 1, CLASS_NAMES)}


def sample_dir(split: str = "sample") -> Path:
    """The rendered sample, made on first use; concurrent first uses are safe (atomic rename)."""
    n, seed, classes = SPLITS[split]
    final = cache_root() / f"{split}-v{SAMPLE_VERSION}"
    if (final / "manifest.csv").exists():
        return final
    try:
        with atomic_dir(final) as tmp:
            render_sample(tmp, n=n, seed=seed, classes=classes)
    except OSError:
        if not (final / "manifest.csv").exists():  # lost a race only if the winner finished
            raise
    return final


if __name__ == "__main__":
    print(sample_dir())
