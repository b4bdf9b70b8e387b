"""Benchmark file formats read by `sail eval`: retrieval JSONs, Winoground, segmentation folders.

Parsing only: each reader turns files on disk into a `sail.data.Dataset` (plus captions or pairs)
and says in one line what is wrong with a file; the tasks in `sail.eval.tasks` do the measuring.

    ds, captions, owner = read_retrieval_data("coco/dataset_coco.json", images_root="coco/", split="test")
    examples, refs, texts = read_winoground("winoground/examples.jsonl")
    pairs = segmentation_pairs("voc/JPEGImages", "voc/SegmentationClass")
    mask = load_mask("voc/SegmentationClass/x.png", reduce_zero_label=False)
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from sail.core.errors import SailError
from sail.data import IMAGE_EXTENSIONS, Dataset, open_dataset, read_text


def content_hash(*parts) -> str:
    """A short hash of strings / lists of strings (the exact texts a store is made of)."""
    h = hashlib.blake2b(digest_size=16)
    for part in parts:
        for text in ([part] if isinstance(part, str) else part):
            h.update(text.encode("utf-8", errors="replace"))
            h.update(b"\0")  # so ["ab", "c"] and ["a", "bc"] differ
    return h.hexdigest()


# --------------------------------------------------------------------------------------- retrieval


def read_retrieval_data(data: str, images_root: str | None = None, split: str = "test",
                        columns: list[str] | None = None,
                        encoding: str = "utf-8") -> tuple[Dataset, list[str], list[int]]:
    """(image dataset, captions, caption -> image index) from a manifest, Karpathy JSON, COCO JSON or
    CLIP_benchmark retrieval folder (`split` picks the Karpathy or CLIP_benchmark split). `encoding`:
    of a CSV/TSV/JSONL manifest or a JSON file."""
    path = Path(data)
    if path.suffix == ".json":
        ds, captions, owner = _read_retrieval_json(path, images_root, split, encoding)
    else:  # a manifest or a CLIP_benchmark folder: several caption columns and/or several rows per image
        from sail.data import clip_benchmark_info, is_clip_benchmark

        if path.is_dir() and is_clip_benchmark(path) and clip_benchmark_info(path).dataset_type != "retrieval":
            raise SailError(f"{data} is a CLIP_benchmark {clip_benchmark_info(path).dataset_type} dataset; retrieval "
                            "needs one whose dataset_type.txt says retrieval (captions in KEY.txt)")
        base = open_dataset(data, columns, split=split, encoding=encoding)
        cols = list(base.captions)
        if not cols:
            raise SailError(f"{data} has no caption columns; name them with --columns")
        by_image: dict[str, int] = {}
        ids, refs, captions, owner = [], [], [], []
        for sid, ref, *texts in zip(base.ids, base.images, *(base.captions[c] for c in cols)):
            key = ref or sid
            if key not in by_image:
                by_image[key] = len(ids)
                ids.append(sid)
                refs.append(ref)
            for text in texts:
                text = text.strip()
                if text:
                    captions.append(text)
                    owner.append(by_image[key])
        ds = Dataset(base.name, base.source, base.source_hash, ids, refs, {})
    if not captions or not len(ds):
        raise SailError(f"{data} holds no images with captions{' in split ' + split if path.suffix == '.json' else ''}")
    return ds, captions, owner


def _load_json(path: Path, encoding: str):
    try:
        return json.loads(read_text(path, encoding))
    except json.JSONDecodeError as e:
        raise SailError(f"{path}:{e.lineno} is not valid JSON ({e.msg} at column {e.colno})") from None


def _read_retrieval_json(path: Path, images_root: str | None, split: str, encoding: str = "utf-8"):
    if not path.exists():
        raise SailError(f"{path} not found")
    blob = _load_json(path, encoding)
    root = Path(images_root) if images_root else path.parent
    images, captions, owner = [], [], []
    if "annotations" in blob:  # COCO captions: images + annotations(image_id, caption)
        index = {}
        for im in blob["images"]:
            index[im["id"]] = len(images)
            images.append((str(im["id"]), str(root / im["file_name"])))
        for ann in blob["annotations"]:
            if ann["image_id"] in index and str(ann.get("caption", "")).strip():
                captions.append(ann["caption"].strip())
                owner.append(index[ann["image_id"]])
    elif "images" in blob and blob["images"] and "sentences" in blob["images"][0]:  # Karpathy split
        for im in blob["images"]:
            if split and im.get("split") != split:
                continue
            rel = Path(im.get("filepath", "")) / im["filename"]
            images.append((str(im.get("cocoid", im.get("imgid", im["filename"]))), str(root / rel)))
            for s in im["sentences"]:
                captions.append(s["raw"].strip())
                owner.append(len(images) - 1)
    else:
        raise SailError(f"{path} is neither a COCO captions JSON (images + annotations) nor a Karpathy split JSON")
    name = path.stem if "annotations" in blob else f"{path.stem}-{split}"
    digest = hashlib.blake2b(path.read_bytes(), digest_size=16)
    digest.update(f"{split}\0{root.resolve()}".encode())  # the same JSON over other images is other data
    ds = Dataset(name, str(path.resolve()), digest.hexdigest(), [i for i, _ in images], [p for _, p in images], {})
    return ds, captions, owner


# --------------------------------------------------------------------------------------- winoground


def read_winoground(data: str, images: str | None = None,
                    encoding: str = "utf-8") -> tuple[list[dict], list[str], list[str]]:
    """Winoground's examples.jsonl (id, image_0, image_1, caption_0, caption_1) + its images/ folder.

    Returns the examples, and image paths and captions in (example, 0/1) order.
    """
    path = Path(data)
    if not path.exists():
        raise SailError(f"{data} not found; download Winoground's examples.jsonl and images/ folder")
    image_dir = Path(images) if images else path.parent / "images"
    examples = []
    for number, line in enumerate(read_text(path, encoding).splitlines(), 1):
        if line.strip():
            try:
                examples.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise SailError(f"{path}:{number} is not valid JSON ({e.msg}); fix or remove that line") from None
    for key in ("image_0", "image_1", "caption_0", "caption_1"):
        if examples and key not in examples[0]:
            raise SailError(f"{data} lacks the field {key!r}; expected Winoground's examples.jsonl")
    refs = [find_image(image_dir, ex[k]) for ex in examples for k in ("image_0", "image_1")]
    texts = [ex[k] for ex in examples for k in ("caption_0", "caption_1")]
    return examples, refs, texts


def find_image(directory: Path, name: str) -> str:
    """`directory/name`, or `directory/name.<ext>` for the first image extension that exists."""
    p = directory / name
    if p.suffix.lower() in IMAGE_EXTENSIONS and p.exists():
        return str(p)
    for ext in IMAGE_EXTENSIONS:
        if (directory / f"{name}{ext}").exists():
            return str(directory / f"{name}{ext}")
    raise SailError(f"image {name!r} not found in {directory}; pass --images DIR")


# --------------------------------------------------------------------------------------- segmentation


def segmentation_pairs(images: str, masks: str) -> list[tuple[Path, Path]]:
    """(image, mask) pairs of files with the same stem, VOC / ADE20K layout; masks are <stem>.png."""
    image_dir, mask_dir = Path(images), Path(masks)
    files = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS) if image_dir.is_dir() else []
    pairs = [(p, mask_dir / f"{p.stem}.png") for p in files if (mask_dir / f"{p.stem}.png").exists()]
    if not pairs:
        raise SailError(f"no image in {images} has a mask <stem>.png in {masks}")
    return pairs


def load_mask(path, reduce_zero_label: bool = False, ignore_index: int = 255) -> np.ndarray:
    """A label mask (H, W) int64 as a palette/grey PNG stores it.

    reduce_zero_label (ADE20K, VOC without background): label 0 ("other" / background) becomes
    ignore_index and every other label shifts down by one, as mmseg's LoadAnnotations does.
    """
    from PIL import Image

    mask = np.array(Image.open(path)).astype(np.int64)
    if mask.ndim != 2:
        raise SailError(f"{path} is not a label mask (shape {mask.shape}); save class indices as a grey or palette PNG")
    if reduce_zero_label:
        ignored = (mask == 0) | (mask == ignore_index)
        mask = np.where(ignored, ignore_index, mask - 1)
    return mask


def load_segmentation_classes(classnames: str) -> tuple[list[str], list[int]]:
    """Prompts and their class index from a class file; "car, auto" lines give synonyms of one class.

    Returns (queries, query_class) with query_class[q] = class index of query q; a class scores
    the best of its synonyms (as SAIL's official segmentation evaluation).
    """
    from sail.eval.templates import load_classnames

    queries, owner = [], []
    for c, line in enumerate(load_classnames(classnames)):
        for name in (n.strip() for n in line.split(",")):
            if name:
                queries.append(name)
                owner.append(c)
    return queries, owner
