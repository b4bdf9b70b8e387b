"""JPEG decoding on the GPU for `sail extract --decode gpu` (nvImageCodec: `pip install 'sail[gpu-decode]'`).

    decoder, why = open_decoder(fast, device)    # (GpuDecoder, None), or (None, why it cannot run here)
    loader = DataLoader(ImageBytes(refs, fast, max_pixels), collate_fn=collate, ...)
    for rows, ok, pixels, reasons in decoder.batches(loader): ...   # pixels: (B, 3, H, W) uint8 on the device

Who does what. DataLoader workers only read each image's bytes and parse its header (PIL, nothing decoded): a
JPEG in RGB or greyscale goes on as bytes; anything else (PNG, WebP, CMYK JPEGs, ...) is decoded and
preprocessed in the worker exactly as on the CPU path. In the main process a background thread hands a batch's
JPEGs to nvImageCodec (one call per DECODE_PIXELS decoded pixels; nvJPEG's hardware decoder where the GPU has
one, else its CUDA and hybrid decoders), then resizes and centre-crops each image on the GPU with
FastPreprocess's geometry, while the encoder runs the previous batch. A JPEG nvImageCodec cannot decode (a
damaged file, a variant no GPU backend takes) is decoded on the CPU in that thread, so it fails, if at all,
with the CPU path's reason.

The same pixels as the CPU path, to a measured tolerance. Resizing is torch's antialiased bilinear / bicubic
(PIL's filters: support widened with the downscale factor, a = -0.5 for bicubic), run as PIL runs it: one
pass per axis in the installed Pillow's order (`pil_pass_order`), each rounded half up to uint8. Against PIL on the same decoded
image (tests/test_gpu_decode.py): downscaling differs by at most 1 level on under 0.2 % of the values,
upscaling (images smaller than the crop) by at most 2. Decoding is nvJPEG's with fancy chroma upsampling
(libjpeg-turbo's default); nvImageCodec's CPU backend, which the tests run, is bit-identical to PIL. Two
differences remain by design: the CPU path decodes large JPEGs at a reduced DCT scale (`draft`, for a short
side >= 4x the resize target), the GPU path always decodes fully; and nvJPEG's IDCT may round differently from
libjpeg-turbo's. `GpuDecoder.self_check` compares both paths on two JPEGs made at start-up and refuses the GPU
path past MAX_MEAN_DIFF; benchmarks/gpu_extract.py measures the feature cosine between them on a GPU.

Memory: decoded images stay on the GPU only until resized (at most DECODE_PIXELS x 3 bytes at once, plus one
float32 copy of the image being resized); the crops are uint8.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from sail.data.images import (DEFAULT_MAX_PIXELS, ImageError, decode_image, error_line, image_header,
                              preprocess_failure, read_image_bytes)

RESIZE_PIXELS = 1 << 24  # same-size images resized in one call, up to this many source pixels (x 12 bytes of float32)
DECODE_PIXELS = 1 << 28  # decoded pixels per nvImageCodec call (x 3 bytes: 768 MiB of uint8 RGB on the GPU)
GPU_MODES = ("RGB", "L")  # JPEG colour modes nvJPEG turns into the same RGB as PIL (CMYK / YCCK stay on the CPU)
RESIZE_MODES = {Image.Resampling.BILINEAR: "bilinear", Image.Resampling.BICUBIC: "bicubic"}  # antialiased in torch
MAX_MEAN_DIFF = 1.5  # self_check: mean |GPU path - CPU path| over a crop, in uint8 levels, above which we refuse
INSTALL = "pip install 'sail[gpu-decode]'"


@dataclass
class JpegBytes:
    """A JPEG for the GPU, as a worker read it: its bytes and (width, height) from the header."""

    data: bytes
    size: tuple[int, int]


class ImageBytes(torch.utils.data.Dataset):
    """DataLoader items for the GPU path: (row, JpegBytes | (3, H, W) uint8 decoded here | None, reason)."""

    def __init__(self, refs: list, fast, max_pixels: int | None = DEFAULT_MAX_PIXELS):
        self.refs, self.fast, self.max_pixels = refs, fast, max_pixels

    def __len__(self):
        return len(self.refs)

    def __getitem__(self, i):
        try:
            data = read_image_bytes(self.refs[i])
            fmt, mode, w, h = image_header(data, self.max_pixels)
            if fmt == "JPEG" and mode in GPU_MODES:
                return i, JpegBytes(data, (w, h)), ""
            return i, self.fast(decode_image(data, self.max_pixels)), ""
        except ImageError as e:
            return i, None, str(e)
        except Exception as e:  # as the CPU path: a preprocess failing on an odd image is a bad image
            return i, None, preprocess_failure(e)


def collate(items):
    """(rows, ok, payloads, reasons): payloads as the workers made them, for GpuDecoder."""
    return [i for i, _, _ in items], [x is not None for _, x, _ in items], [x for _, x, _ in items], \
        [r for _, _, r in items]


# ----------------------------------------------------------------------------------------- resizing


def _pass(x: torch.Tensor, height: int, width: int, mode: str) -> torch.Tensor:
    """One antialiased pass (only one of height / width differs from x's), rounded half up and clipped as PIL's
    8-bit passes store their result."""
    x = F.interpolate(x, size=(height, width), mode=mode, antialias=True, align_corners=False)
    return x.add_(0.5).floor_().clamp_(0, 255)


def _pillow13_vertical_first(in_w: int, in_h: int, out_w: int, out_h: int) -> bool:
    """Pillow 13's choice (libImaging/Resample.c): the vertical pass first when the height shrinks by more than
    twice what the width does, in pixels of the whole source image against the output (a box resize too)."""
    return in_h - out_h > 0 and in_h - out_h > (in_w - out_w) * 2


@functools.cache
def pil_pass_order() -> str:
    """Which pass the installed Pillow runs first, since the order changes the rounding between them:
    "pillow13" (`_pillow13_vertical_first`) or "horizontal" (always; Pillow 12 and earlier, and any order
    this does not recognise). Found once by resizing three small noise images, each both ways."""
    rng = np.random.default_rng(0)
    seen = []
    for (w, h), out in (((16, 40), (24, 10)), ((40, 100), (30, 20)), ((60, 40), (20, 30))):
        src = Image.fromarray(rng.integers(0, 256, (h, w), np.uint8))
        direct = np.asarray(src.resize(out, Image.Resampling.BICUBIC))
        via_height = src.resize((w, out[1]), Image.Resampling.BICUBIC).resize(out, Image.Resampling.BICUBIC)
        seen.append(bool(np.array_equal(direct, np.asarray(via_height))))
    return "pillow13" if seen == [True, True, False] else "horizontal"


def vertical_first(in_w: int, in_h: int, out_w: int, out_h: int) -> bool:
    """Whether the installed Pillow resizes (in_w, in_h) to (out_w, out_h) vertical pass first."""
    return pil_pass_order() == "pillow13" and _pillow13_vertical_first(in_w, in_h, out_w, out_h)


def pil_resize(x: torch.Tensor, height: int, width: int, mode: str, crop: tuple[int, int, int, int] | None = None,
               vertical: bool | None = None) -> torch.Tensor:
    """(N, C, H, W) float holding uint8 values -> (N, C, height, width), as PIL's Image.resize computes it:
    antialiased filter, one pass per axis, each rounded half up and clipped to 0..255, vertical first if
    `vertical` (default: `vertical_first` of this resize). crop = (top, left, h, w) cuts the result; it is
    applied after each pass (the other axis's pass treats rows / columns independently)."""
    top, left, ch, cw = crop if crop else (0, 0, height, width)
    h, w = x.shape[-2:]
    if vertical if vertical is not None else vertical_first(w, h, width, height):
        if height != h:
            x = _pass(x, height, w, mode)
        x = x[..., top:top + ch, :]
        if width != w:
            x = _pass(x, ch, width, mode)
        return x[..., left:left + cw]
    if width != w:
        x = _pass(x, h, width, mode)
    x = x[..., left:left + cw]
    if height != h:
        x = _pass(x, height, cw, mode)
    return x[..., top:top + ch, :]


def resize_crop(hwc: torch.Tensor, fast) -> torch.Tensor:
    """Decoded images (H, W, 3) or (N, H, W, 3) uint8 of one size, on any device -> FastPreprocess's crops
    (3, h, w) or (N, 3, h, w) uint8 on the same device (one batched pass per axis for N images)."""
    one = hwc.dim() == 3
    x = (hwc.unsqueeze(0) if one else hwc).permute(0, 3, 1, 2).float()
    h, w = x.shape[-2:]
    rw, rh = fast.resize_to(w, h)
    ch, cw = fast.crop if fast.crop else (rh, rw)
    mode = RESIZE_MODES[fast.resample]
    left, top = (rw - cw) // 2, (rh - ch) // 2
    if left >= 0 and top >= 0:
        # FastPreprocess resizes the crop box only: Pillow orders the passes by the source and the crop's sizes
        out = pil_resize(x, rh, rw, mode, (top, left, ch, cw), vertical_first(w, h, cw, ch)).to(torch.uint8)
        return out[0] if one else out
    # the crop is larger than the resized image: the whole image centred on black, as FastPreprocess pads
    x = pil_resize(x, rh, rw, mode).to(torch.uint8)
    canvas = torch.zeros((x.shape[0], 3, ch, cw), dtype=torch.uint8, device=hwc.device)
    top, left = (ch - rh) // 2, (cw - rw) // 2  # where the image goes on the canvas (FastPreprocess._padded)
    ys, xs = max(0, -top), max(0, -left)
    sub = x[..., ys:ys + ch, xs:xs + cw]
    canvas[..., max(0, top):max(0, top) + sub.shape[-2], max(0, left):max(0, left) + sub.shape[-1]] = sub
    return canvas[0] if one else canvas


def unsupported(fast) -> str | None:
    """Why the GPU path cannot reproduce this preprocessing, or None."""
    if fast is None:
        return "it reproduces --preprocess fast only"
    if fast.resample not in RESIZE_MODES:
        return (f"the model's processor resizes with {Image.Resampling(fast.resample).name.lower()}; the GPU path "
                "reproduces bilinear and bicubic")
    return None


# ----------------------------------------------------------------------------------------- nvImageCodec


@contextlib.contextmanager
def _stderr_to_file():
    """File descriptor 2 into a temporary file: nvImageCodec's C library prints a paragraph for each codec
    library it does not find while it loads. Yields a list that receives the text."""
    said: list[str] = []
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as f:
        os.dup2(f.fileno(), 2)
        try:
            yield said
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            f.seek(0)
            said.append(f.read().decode(errors="replace"))


def _nvimgcodec():
    """The nvidia.nvimgcodec module (its per-image log lines off: failures are reported by sail), or None."""
    os.environ.setdefault("PYNVIMGCODEC_VERBOSITY", "0")
    with _stderr_to_file():
        try:
            import nvidia.nvimgcodec as nvimgcodec
        except ImportError:
            return None
    return nvimgcodec


class GpuDecoder:
    """Decodes workers' JpegBytes with nvImageCodec on `device` and makes FastPreprocess's crops there.

    On a CUDA device only nvImageCodec's GPU backends are allowed (hardware, CUDA, hybrid); on the CPU (the
    tests) its CPU backend runs the same code. Use `open_decoder`, which also runs `self_check`.
    """

    def __init__(self, fast, device: torch.device, nvimgcodec=None):
        nv = nvimgcodec or _nvimgcodec()
        if nv is None:
            raise RuntimeError(f"nvImageCodec is not installed ({INSTALL})")
        self.fast, self.device, self.nv = fast, torch.device(device), nv
        cuda = self.device.type == "cuda"
        with _stderr_to_file():
            if cuda:
                index = self.device.index if self.device.index is not None else torch.cuda.current_device()
                self.decoder = nv.Decoder(device_id=index, options=":fancy_upsampling=1", backends=[
                    nv.Backend(nv.HW_GPU_ONLY), nv.Backend(nv.GPU_ONLY), nv.Backend(nv.HYBRID_CPU_GPU)])
            else:
                self.decoder = nv.Decoder(device_id=nv.NVIMGCODEC_DEVICE_CPU_ONLY, backends=[nv.Backend(nv.CPU_ONLY)])
        self.params = nv.DecodeParams(apply_exif_orientation=True, color_spec=nv.SRGB, sample_format=nv.I_RGB)
        self.stream = torch.cuda.Stream(self.device) if cuda else None
        self.cpu_fallbacks = 0  # JPEGs the GPU backends gave back, decoded on the CPU instead
        self.cpu_decoded = 0  # images the workers decoded (other formats, CMYK JPEGs)

    def _as_tensor(self, image) -> torch.Tensor:
        if self.device.type == "cuda":
            return torch.as_tensor(image, device=self.device)  # __cuda_array_interface__: no copy
        return torch.from_numpy(np.asarray(image))

    def crops(self, payloads: list) -> tuple[list, dict[int, str]]:
        """Per payload (JpegBytes, a worker's (3, H, W) uint8 tensor, or None) its crop on the device (None where
        it failed), and {index: reason} for those that failed here. Runs on self.stream; returns once the
        crops are computed."""
        out: list = [None] * len(payloads)
        failed: dict[int, str] = {}
        jpegs = [i for i, p in enumerate(payloads) if isinstance(p, JpegBytes)]
        stream = torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()
        with stream:
            for group in _groups(jpegs, [payloads[i].size for i in jpegs]):
                images = self.decoder.decode([self.nv.CodeStream(payloads[i].data) for i in group], params=self.params,
                                             cuda_stream=self.stream.cuda_stream if self.stream is not None else 0)
                same_size: dict = {}  # (H, W) -> indices: resized together, one batched pass per axis
                for i, image in zip(group, images):
                    if image is None:  # no GPU backend took it: the CPU path decides
                        self.cpu_fallbacks += 1
                        try:
                            out[i] = self.fast(decode_image(payloads[i].data, None)).to(self.device)
                        except ImageError as e:
                            failed[i] = str(e)
                        except Exception as e:
                            failed[i] = f"unreadable image: {error_line(e, 160)}"
                    else:
                        out[i] = self._as_tensor(image)
                        same_size.setdefault(tuple(out[i].shape[:2]), []).append(i)
                for (h, w), members in same_size.items():
                    per_call = max(1, RESIZE_PIXELS // (h * w))
                    for lo in range(0, len(members), per_call):
                        chunk = members[lo:lo + per_call]
                        batch = out[chunk[0]].unsqueeze(0) if len(chunk) == 1 else torch.stack([out[i] for i in chunk])
                        for i, crop in zip(chunk, resize_crop(batch, self.fast)):
                            out[i] = crop
                if self.stream is not None:  # nvImageCodec frees its images when they go: crops done first
                    self.stream.synchronize()
                del images
            for i, p in enumerate(payloads):
                if isinstance(p, torch.Tensor):  # decoded by a worker: not a JPEG the GPU takes
                    self.cpu_decoded += 1
                    out[i] = p.to(self.device, non_blocking=True)
            if self.stream is not None:
                self.stream.synchronize()
        return out, failed

    def _batch(self, batch):
        rows, ok, payloads, reasons = batch
        crops, failed = self.crops(payloads)
        ok, reasons = list(ok), list(reasons)
        for i, why in failed.items():
            ok[i], reasons[i] = False, why
        good = [c for c, k in zip(crops, ok) if k]
        if good and len({tuple(c.shape) for c in good}) > 1:
            return rows, ok, [c for c in good], reasons  # a list: sail.encoders.extract says which sizes differ
        if not good:
            return rows, ok, None, reasons
        # stacked on self.stream, where the crops were made (their memory returns to that stream's pool when
        # they go), and finished before the batch is handed over
        with torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext():
            pixels = torch.stack(good)
        if self.stream is not None:
            self.stream.synchronize()
        return rows, ok, pixels, reasons

    def batches(self, loader):
        """(rows, ok, pixels, reasons) per batch of an ImageBytes loader (collate_fn=collate), pixels (B, 3, H,
        W) uint8 on the device; the next batch is decoded in a background thread while the caller encodes
        this one."""
        with ThreadPoolExecutor(1, thread_name_prefix="sail-gpu-decode") as pool:
            pending = None
            for batch in loader:
                following = pool.submit(self._batch, batch)
                if pending is not None:
                    yield self._hand_over(pending.result())
                pending = following
            if pending is not None:
                yield self._hand_over(pending.result())

    def _hand_over(self, batch):
        pixels = batch[2]
        if self.stream is not None and isinstance(pixels, torch.Tensor):
            pixels.record_stream(torch.cuda.current_stream(self.device))  # made on self.stream, used on this one
        return batch

    def self_check(self) -> str | None:
        """Decode and crop two JPEGs made here (4:2:0 colour with EXIF rotation, greyscale) on this path and
        on the CPU path; None when they agree (mean difference <= MAX_MEAN_DIFF levels), else why not."""
        worst = 0.0
        for data in _probe_jpegs():
            try:
                crops, failed = self.crops([JpegBytes(data, (0, 0))])
            except Exception as e:  # a driver or library failure is a reason to stay on the CPU, not a crash
                return f"nvImageCodec failed to run ({_described(e)})"
            if self.cpu_fallbacks:
                self.cpu_fallbacks = 0
                return "nvImageCodec found no GPU JPEG decoder here (nvJPEG missing? " + INSTALL + ")"
            if failed:
                return f"nvImageCodec could not decode a plain JPEG ({failed[0]})"
            want = self.fast(decode_image(data, None))
            got = crops[0].cpu()
            if got.shape != want.shape:
                return f"the GPU path made a {tuple(got.shape)} crop where the CPU path makes {tuple(want.shape)}"
            worst = max(worst, (got.float() - want.float()).abs().mean().item())
        if not worst <= MAX_MEAN_DIFF:
            return f"the GPU path's pixels differ from the CPU path's by {worst:.2f} levels on average (> {MAX_MEAN_DIFF})"
        return None


def _described(e: BaseException) -> str:
    """"Type: first line" of an exception nvImageCodec or CUDA raised (the type says more than a bare message)."""
    return f"{type(e).__name__}: {error_line(e, 160) if str(e) else ''}"


def _groups(indices: list[int], sizes: list[tuple[int, int]]) -> list[list[int]]:
    """indices cut into runs of at most DECODE_PIXELS decoded pixels (an image larger than that alone)."""
    groups, current, pixels = [], [], 0
    for i, (w, h) in zip(indices, sizes):
        if current and pixels + w * h > DECODE_PIXELS:
            groups.append(current)
            current, pixels = [], 0
        current.append(i)
        pixels += w * h
    return groups + ([current] if current else [])


def _probe_jpegs() -> list[bytes]:
    """Two small JPEGs: smooth colour with texture, 4:2:0, EXIF orientation 6 (rotate); and a greyscale one."""
    import io

    yy, xx = np.mgrid[0:181, 0:263].astype(np.float32)
    rng = np.random.default_rng(0)
    rgb = np.stack([128 + 100 * np.sin(xx / 17), 128 + 100 * np.cos(yy / 11), (xx + yy) % 256], -1)
    rgb = np.clip(rgb + rng.normal(0, 12, rgb.shape), 0, 255).astype(np.uint8)
    colour, grey = io.BytesIO(), io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(rgb).save(colour, "JPEG", quality=90, subsampling=2, exif=exif.tobytes())
    Image.fromarray(rgb[..., 1]).save(grey, "JPEG", quality=90)
    return [colour.getvalue(), grey.getvalue()]


_OPENED: dict = {}  # (device, preprocessing) -> why not, for open_decoder: the self-check runs once per process


def open_decoder(fast, device) -> tuple[GpuDecoder | None, str | None]:
    """(a checked GpuDecoder, None), or (None, why the GPU path cannot run here: no CUDA device, nvImageCodec
    missing, a resize filter it does not reproduce, a failed self-check)."""
    device = torch.device(device)
    why = unsupported(fast)
    if why is None and device.type != "cuda":
        why = "it needs a CUDA device"
    if why is None:
        try:
            if _nvimgcodec() is None:
                why = f"nvImageCodec is not installed ({INSTALL})"
        except Exception as e:  # installed but broken (a missing CUDA library): the CPU path, and why
            why = f"nvImageCodec failed to load ({_described(e)})"
    if why is not None:
        return None, why
    key = (str(device), fast.resample, fast.short, fast.fixed, fast.crop)
    if key in _OPENED and _OPENED[key] is not None:
        return None, _OPENED[key]
    try:
        decoder = GpuDecoder(fast, device)
    except Exception as e:
        _OPENED[key] = f"nvImageCodec failed to start ({_described(e)})"
        return None, _OPENED[key]
    if key not in _OPENED:
        _OPENED[key] = decoder.self_check()
    return (decoder, None) if _OPENED[key] is None else (None, _OPENED[key])
