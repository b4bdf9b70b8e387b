"""Zero-shot semantic segmentation, SAIL's official protocol (MaskCLIP-style sliding windows).

    sail eval segmentation runs/x --images ADE/images/validation --masks ADE/annotations/validation \
        --classnames ade20k.txt --reduce-zero-label

Per image: resize (keep ratio) so the short side is `short_side` (long side at most `max_long_side`),
slide `window` px windows with `stride`; in each window every patch token goes through the image head
(as [CLS ; patch_i] for concat pooling, since the head was trained on [CLS ; mean patch]) and is scored
against the class prompt embeddings; patch logits are upsampled (bilinear) to the window, windows are
summed and divided by how many cover each pixel, and the averaged logits are upsampled to the full mask
before the argmax. Defaults are those of lezhang7/SAIL evaluation/seg_eval.py and seg_configs
(mmseg Resize scale (2048, 448), slide_crop 448, slide_stride 224); ADE20K and VOC20 use
`reduce_zero_label` (label 0 ignored, others shift down by one); VOC with background lists
"background" as class 0 and ignores 255 (object boundaries).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from sail.core import metrics
from sail.core.errors import SailError


@dataclass
class SegProtocol:
    short_side: int = 448       # resize so the short side is this (0: keep the image size)
    max_long_side: int = 2048   # ... unless the long side would exceed this
    window: int = 448           # sliding window (px, square)
    stride: int = 224           # step between windows (px)
    reduce_zero_label: bool = False
    ignore_index: int = 255

    def check(self) -> None:
        if self.window < 1 or self.stride < 1 or self.stride > self.window:
            raise SailError(f"need 1 <= stride <= window, got window {self.window}, stride {self.stride}")
        if self.short_side < 0 or self.max_long_side < 1:
            raise SailError(f"short side must be >= 0 and long side >= 1, got {self.short_side}, {self.max_long_side}")


def window_boxes(h: int, w: int, window: int, stride: int) -> list[tuple[int, int, int, int]]:
    """Windows (y1, x1, y2, x2) covering an h x w image, mmseg "slide" style.

    Windows start every `stride` px; the last one in each direction is pushed back inside the image
    (so it overlaps its neighbour more); a dimension smaller than the window gets one window of its size.
    """
    def starts(n: int) -> list[tuple[int, int]]:
        count = max(n - window + stride - 1, 0) // stride + 1
        spans = []
        for i in range(count):
            end = min(i * stride + window, n)
            spans.append((max(end - window, 0), end))
        return spans

    return [(y1, x1, y2, x2) for y1, y2 in starts(h) for x1, x2 in starts(w)]


def resize_for_protocol(size: tuple[int, int], short_side: int, max_long_side: int) -> tuple[int, int]:
    """(w, h) -> (w', h'): mmseg Resize(scale=(max_long_side, short_side), keep_ratio=True)."""
    w, h = size
    if short_side == 0:
        return w, h
    scale = min(short_side / min(w, h), max_long_side / max(w, h))
    return max(1, int(w * scale + 0.5)), max(1, int(h * scale + 0.5))


def slide_logits(pixels: torch.Tensor, window: int, stride: int, patch: int, window_logits) -> torch.Tensor:
    """Average per-pixel logits (C, H, W) of a normalised image (3, H, W) over sliding windows.

    window_logits((B, 3, h, w) with h, w multiples of `patch`) -> (B, C, h, w). A window whose size is
    not a multiple of the patch is zero-padded around (pixels are already normalised, so zero is the
    mean colour) and its logits cut back.
    """
    _, h, w = pixels.shape
    total, count = None, torch.zeros(1, h, w, device=pixels.device)
    boxes = window_boxes(h, w, window, stride)
    # windows of one image share one size (except when the image is smaller than the window): batch them
    crops = torch.stack([pixels[:, y1:y2, x1:x2] for y1, x1, y2, x2 in boxes])  # (B, 3, wh, ww)
    ch, cw = crops.shape[-2:]
    pad_h, pad_w = (-ch) % patch, (-cw) % patch
    top, left = pad_h // 2, pad_w // 2
    if pad_h or pad_w:
        crops = F.pad(crops, (left, pad_w - left, top, pad_h - top))
    logits = window_logits(crops)[:, :, top:top + ch, left:left + cw]  # (B, C, wh, ww)
    for (y1, x1, y2, x2), lg in zip(boxes, logits):
        if total is None:
            total = torch.zeros(lg.shape[0], h, w, dtype=lg.dtype, device=lg.device)
        total[:, y1:y2, x1:x2] += lg
        count[:, y1:y2, x1:x2] += 1
    return total / count.to(total.device)


def _patch_logits_fn(model, class_emb: torch.Tensor, query_class: torch.Tensor, n_classes: int):
    """window pixels (B, 3, h, w) -> class logits (B, C, h, w) through the run's encoder and image head."""
    encoder = model.vision
    patch = encoder.model.config.patch_size

    def fn(crops: torch.Tensor) -> torch.Tensor:
        pooled, tokens = encoder.encode_pixels(crops, patch_tokens=True)  # (B, dim), (B, P, hidden)
        b, p, hidden = tokens.shape
        # SAIL's official code feeds [CLS ; patch_i] to a head trained on [CLS ; mean patch] features.
        inp = torch.cat([pooled[:, None, :hidden].expand(b, p, hidden), tokens], 2) if model.pooling == "concat" else tokens
        with torch.no_grad():  # (B*P, in) -> (B*P, D) on the model's device, in slices to bound memory
            emb = torch.cat([model.heads.encode_image(x) for x in inp.reshape(b * p, -1).to(model.device).split(8192)])
        q = emb.float() @ class_emb.T.to(emb.device)  # (B*P, Q) cosine per query prompt
        # a class scores the best of its synonyms: (B*P, Q) -> (B*P, C)
        logits = torch.full((b * p, n_classes), -torch.inf, device=q.device)
        logits = logits.scatter_reduce(1, query_class.to(q.device).expand_as(q), q, reduce="amax")
        gh, gw = crops.shape[2] // patch, crops.shape[3] // patch
        logits = logits.reshape(b, gh, gw, n_classes).permute(0, 3, 1, 2)  # (B, C, gh, gw) patch grid
        return F.interpolate(logits, size=crops.shape[-2:], mode="bilinear", align_corners=False)

    return fn, patch


def normalise(image, processor) -> torch.Tensor:
    """PIL image -> (3, H, W) float32 with the encoder's rescale factor and mean/std, no resize or crop."""
    x = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32)).permute(2, 0, 1)
    x = x * float(getattr(processor, "rescale_factor", 1 / 255))
    mean = torch.tensor(processor.image_mean, dtype=torch.float32)[:, None, None]
    std = torch.tensor(processor.image_std, dtype=torch.float32)[:, None, None]
    return (x - mean) / std


def predict_mask(model, image, class_emb, query_class, n_classes: int, protocol: SegProtocol) -> torch.Tensor:
    """Predicted class indices (H0, W0) at the image's original size."""
    from PIL import Image

    fn, patch = _patch_logits_fn(model, class_emb, query_class, n_classes)
    w0, h0 = image.size
    resized = image.resize(resize_for_protocol(image.size, protocol.short_side, protocol.max_long_side), Image.BILINEAR)
    pixels = normalise(resized, model.vision.processor).to(model.device)
    logits = slide_logits(pixels, protocol.window, protocol.stride, patch, fn)  # (C, H, W)
    logits = F.interpolate(logits[None], size=(h0, w0), mode="bilinear", align_corners=False)[0]
    return logits.argmax(0).cpu()


def evaluate_segmentation(model, pairs, classnames: str, templates: str, protocol: SegProtocol,
                          progress: bool = True) -> dict:
    """mIoU, pixel accuracy and a per-class IoU table over (image, mask) file pairs."""
    from sail.data import ImageError, load_image
    from sail.eval.evalsets import load_mask, load_segmentation_classes
    from sail.eval.templates import load_templates

    protocol.check()
    queries, owner = load_segmentation_classes(classnames)
    n_classes = max(owner) + 1
    names = [queries[owner.index(c)] for c in range(n_classes)]
    class_emb = metrics.class_embeddings(model.encode_text, queries, load_templates(templates)).float().to(model.device)
    query_class = torch.tensor(owner)[None, :]
    cm = metrics.ConfusionMatrix(n_classes, protocol.ignore_index)
    used, skipped = 0, []
    for image_path, mask_path in tqdm(pairs, desc="segmentation", unit="img", disable=not progress, dynamic_ncols=True):
        try:
            image = load_image(str(image_path))
        except ImageError as e:
            skipped.append(f"{image_path.name}: {e}")
            continue
        mask = load_mask(mask_path, protocol.reduce_zero_label, protocol.ignore_index)
        if mask.shape != (image.size[1], image.size[0]):
            raise SailError(f"{mask_path} is {mask.shape[1]}x{mask.shape[0]} but its image is "
                            f"{image.size[0]}x{image.size[1]}; masks must match their images")
        high = mask[mask != protocol.ignore_index]
        if high.size and high.max() >= n_classes:
            hint = " (ADE20K / VOC20 masks need --reduce-zero-label)" if high.max() == n_classes else ""
            raise SailError(f"{mask_path} has label {int(high.max())} but {classnames} names {n_classes} classes{hint}")
        cm.update(predict_mask(model, image, class_emb, query_class, n_classes, protocol), torch.from_numpy(mask))
        used += 1
    if not used:
        raise SailError(f"none of the {len(pairs)} images could be read (first: {skipped[0] if skipped else '?'})")
    result = cm.compute()
    return {"mIoU": result["mIoU"], "pixel_accuracy": result["pixel_accuracy"], "images": used,
            "skipped_images": len(skipped), "classes": n_classes,
            "per_class_iou": dict(zip(names, result["per_class_iou"]))}
