"""Images: decoding one image (a file or a `tar://` member) fully, and turning any PIL mode into the RGB a
viewer would show (EXIF orientation, 16-bit and float greyscale, transparency, CMYK with or without an
ICC profile). Every reader of pixels (extract, eval, the recipes, the model) goes through `load_image`.

    image = load_image(ds.images[0])               # PIL image; raises ImageError with a short reason
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import threading
import warnings

import numpy as np
from PIL import Image, ImageOps


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


PREPROCESS_FAILED = "preprocessing failed"  # the reason stored for an image a preprocess function raised on


def error_line(e: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (at most `limit` characters), or its type's name if it has none."""
    return str(e).splitlines()[0][:limit] if str(e) else type(e).__name__


def preprocess_failure(e: BaseException) -> str:
    """The reason stored for an image a preprocess function raised on."""
    return f"{PREPROCESS_FAILED}: {error_line(e, 160)}"


class ImageError(Exception):
    """An image that cannot be used; the message is the short reason stored with the features."""


def tar_reference(shard: str, offset: int, size: int) -> str:
    return f"tar://{shard}::{offset}::{size}"


DEFAULT_MAX_PIXELS = 100_000_000  # larger images are skipped ("too large"), like PIL's bomb guard but named
BACKGROUND = (255, 255, 255)  # what transparent pixels are composited on


_PIL_LIFT = {"lock": threading.Lock(), "users": 0, "saved": None}


@contextlib.contextmanager
def _pil_limit_lifted():
    """PIL's MAX_IMAGE_PIXELS off while any load in this process needs it off (threads overlap: counted),
    restored by the last one out."""
    state = _PIL_LIFT
    with state["lock"]:
        if state["users"] == 0:
            state["saved"] = Image.MAX_IMAGE_PIXELS
            Image.MAX_IMAGE_PIXELS = None
        state["users"] += 1
    try:
        yield
    finally:
        with state["lock"]:
            state["users"] -= 1
            if state["users"] == 0:
                Image.MAX_IMAGE_PIXELS = state["saved"]


def load_image(ref: str | os.PathLike | None, max_pixels: int | None = DEFAULT_MAX_PIXELS,
               draft: int | None = None) -> Image.Image:
    """Decode one image fully (so truncated files fail here, not later) and return it as RGB.

    Raises ImageError with a short reason for a missing, unreadable or too large (> max_pixels; None
    or 0 = no limit) image. See `to_rgb` for how each PIL mode becomes RGB.
    draft: a JPEG may be decoded at 1/2, 1/4 or 1/8 scale (DCT scaling, several times faster) while its
    shorter side stays >= draft pixels.
    """
    return decode_image(read_image_bytes(ref), max_pixels, draft)


def read_image_bytes(ref: str | os.PathLike | None) -> bytes:
    """The encoded bytes of a file or a `tar://` member; ImageError("missing file" / "unreadable image: ...")."""
    if ref is None:
        raise ImageError("no image")
    ref = os.fspath(ref)  # a pathlib.Path works like its string
    try:
        if ref.startswith("tar://"):
            shard, offset, size = ref[len("tar://"):].rsplit("::", 2)
            with open(shard, "rb") as f:
                f.seek(int(offset))
                return f.read(int(size))
        if not os.path.exists(ref):
            raise ImageError("missing file")
        with open(ref, "rb") as f:  # read whole: PIL would keep the file open after a failed decode
            return f.read()
    except ImageError:
        raise
    except Exception as e:  # a directory, no permission, a bad tar reference
        raise ImageError(f"unreadable image: {error_line(e)}") from None


@contextlib.contextmanager
def _quiet_pil(max_pixels: int | None):
    """PIL's own bomb guard lifted where the caller allows more (it would refuse what max_pixels allows), and
    its warnings muted (DecompressionBombWarning, odd EXIF or TIFF tags: they would only break the progress
    bar; a usable image is used, a bad one fails)."""
    lift = Image.MAX_IMAGE_PIXELS and (not max_pixels or max_pixels >= 2 * Image.MAX_IMAGE_PIXELS)
    with _pil_limit_lifted() if lift else contextlib.nullcontext(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _unreadable(e: Exception) -> ImageError:
    if isinstance(e, Image.DecompressionBombError):
        return ImageError(f"too large: {str(e).splitlines()[0][:160]}")
    reason = str(e).splitlines()[0] if str(e) else type(e).__name__  # PIL raises many types for bad files
    # PIL names the in-memory file it was given ("cannot identify image file <_io.BytesIO object at 0x7f...>"):
    # an address would make the stored reason differ from run to run
    reason = re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "", reason)
    return ImageError(f"unreadable image: {reason[:200]}")


def _check_size(w: int, h: int, max_pixels: int | None) -> None:
    if max_pixels and w * h > max_pixels:
        raise ImageError(f"too large: {w}x{h} = {w * h:,} pixels, over the limit of {max_pixels:,} (--max-pixels)")


def decode_image(data: bytes, max_pixels: int | None = DEFAULT_MAX_PIXELS, draft: int | None = None) -> Image.Image:
    """`load_image` on bytes already read (see there)."""
    try:
        with _quiet_pil(max_pixels):
            image = Image.open(io.BytesIO(data))
            w, h = image.size
            _check_size(w, h, max_pixels)
            if draft and image.format == "JPEG" and min(w, h) >= 2 * draft:
                image.draft("RGB", (-(-w * draft // min(w, h)), -(-h * draft // min(w, h))))  # sides stay >= asked
            image.load()
            return to_rgb(image)
    except ImageError:
        raise
    except Exception as e:
        raise _unreadable(e) from None


def image_header(data: bytes, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> tuple[str, str, int, int]:
    """(format, mode, width, height) from the header alone (nothing decoded); ImageError for an unreadable
    header or an image over max_pixels, as `decode_image` would say."""
    try:
        with _quiet_pil(max_pixels):
            image = Image.open(io.BytesIO(data))
            w, h = image.size
            _check_size(w, h, max_pixels)
            return image.format or "", image.mode, w, h
    except ImageError:
        raise
    except Exception as e:
        raise _unreadable(e) from None


def _scale_to_uint8(a: np.ndarray) -> np.ndarray:
    """Greyscale of any range (16-bit, int32, float) to 0..255 by the image's own finite min..max.

    (H, W) -> (H, W) uint8. A constant image is black (value <= 0) or white; NaN is black, -inf/+inf
    are black/white.
    """
    a = a.astype(np.float64)
    finite = np.isfinite(a)
    if not finite.any():
        return np.where(a == np.inf, 255, 0).astype(np.uint8)
    lo, hi = a[finite].min(), a[finite].max()
    if hi > lo:
        out = (a - lo) * 255.0 / (hi - lo)
    else:
        out = np.full(a.shape, 0.0 if lo <= 0 else 255.0)
    out = np.where(a == np.inf, 255.0, np.where(finite, out, 0.0))
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _composite(rgba: np.ndarray, background=BACKGROUND) -> np.ndarray:
    """(H, W, 4) uint8 straight alpha -> (H, W, 3) uint8 over `background`: rgb*a + bg*(1-a), rounded."""
    rgb, alpha = rgba[..., :3].astype(np.float64), rgba[..., 3:].astype(np.float64) / 255.0
    out = rgb * alpha + np.asarray(background, np.float64) * (1.0 - alpha)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def to_rgb(image: Image.Image, background=BACKGROUND) -> Image.Image:
    """Any PIL image as the RGB image a viewer would show.

    EXIF orientation is applied; 16-bit / 32-bit integer and float greyscale (I;16*, I, F) are scaled
    by their real range (`convert("RGB")` would saturate them: white images); transparency (alpha
    channels, palette or single-colour tRNS) is composited on `background`; CMYK uses
    R = (255 - C)(255 - K) / 255 (and likewise G, B) unless an ICC profile says otherwise.
    """
    if image.getexif().get(0x0112, 1) not in (1, None):  # Orientation tag; transposing otherwise only copies
        image = ImageOps.exif_transpose(image)
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I") or mode == "F":  # I;16, I;16B, I;16L, I;16N, I, F
        grey = _scale_to_uint8(np.asarray(image))
        return Image.fromarray(np.repeat(grey[..., None], 3, axis=2), "RGB")
    if mode == "CMYK":
        if image.info.get("icc_profile"):
            try:
                from PIL import ImageCms

                src = ImageCms.ImageCmsProfile(io.BytesIO(image.info["icc_profile"]))
                return ImageCms.profileToProfile(image, src, ImageCms.createProfile("sRGB"), outputMode="RGB")
            except Exception:  # a broken profile: fall back to the plain formula
                pass
        cmyk = np.asarray(image).astype(np.float64)
        rgb = (255.0 - cmyk[..., :3]) * (255.0 - cmyk[..., 3:]) / 255.0
        return Image.fromarray(np.clip(np.rint(rgb), 0, 255).astype(np.uint8), "RGB")
    if mode == "La":  # premultiplied grey + alpha: PIL converts it to nothing but LA
        image = image.convert("LA")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        return Image.fromarray(_composite(np.asarray(image.convert("RGBA")), background), "RGB")
    return image.convert("RGB")  # L, 1, P without transparency, YCbCr, HSV, ...
