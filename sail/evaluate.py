"""`sail eval TASK`: what an alignment is worth on the benchmarks the papers report.

Each task takes a run directory (or, for encoder-only tasks, feature stores), extracts and caches
what it needs through the same store code as `sail extract` (under `features/<dataset>/`), and returns
a flat dict of numbers that the CLI prints as a table and writes as JSON.

    zeroshot(run, "imagenet/val", classnames="imagenet", templates="imagenet")
    retrieval(run, "coco/dataset_coco.json", images_root="coco/", split="test")
    winoground(run, "winoground/examples.jsonl")
    linear_probe("features/in1k-train/dinov2-l.h5", "features/in1k-val/dinov2-l.h5")
    knn(train_store, test_store, k=20)
    segmentation(run, "voc/images", "voc/masks", classnames="voc/classes.txt")
    alignment("features/coco/dinov2-l.h5", "features/coco/gte-l.h5")
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from sail import metrics
from sail.data import IMAGE_EXTENSIONS, Dataset, open_dataset
from sail.encoders import resolve_model
from sail.errors import SailError
from sail.extract import ExtractConfig, extract
from sail.model import SAILModel, project_store, read_run_config
from sail.store import FeatureStore, join

TASKS = ("zeroshot", "retrieval", "winoground", "linear-probe", "knn", "segmentation", "alignment")


# --------------------------------------------------------------------------------------- shared steps


def load_model(run: str, vision_model: str | None = None, text_model: str | None = None, device: str = "auto"):
    return SAILModel.from_pretrained(run, vision_model=vision_model, text_model=text_model, device=device)


def check_store_matches_run(run: str, store: FeatureStore, modality: str) -> None:
    """A store made by another encoder than the run's would give meaningless numbers: refuse it."""
    enc = read_run_config(run).get(f"{modality}_encoder", {})
    theirs = {k: store.attrs.get(k) for k in ("model_id", "pooling", "dim")}
    ours = {k: enc.get(k) for k in ("model_id", "pooling", "dim")}
    diff = [k for k in ours if ours[k] is not None and theirs[k] != ours[k]]
    if diff:
        raise SailError(f"{store.path} was made with {theirs} but run {run} was trained on {ours} "
                        f"({', '.join(diff)} differ); extract with the run's encoder")


def cached_store(model, dataset: Dataset, modality: str, features_root: str = "features",
                 patch_tokens: bool = False, progress: bool = True) -> FeatureStore:
    """Extract `dataset` with the run's encoder once; later calls reuse the store."""
    source = model.image_model if modality == "image" else model.text_model
    spec = resolve_model(source, modality)
    suffix = "-patches" if patch_tokens else ""
    out = Path(features_root) / dataset.name / f"{spec.name}{suffix}.h5"
    cfg = ExtractConfig(model=source, data=dataset.source, out=str(out), modality=modality,
                        pooling=getattr(model, "pooling", "concat"), patch_tokens=patch_tokens,
                        max_length=getattr(model, "max_length", None), device=str(model.device), progress=progress,
                        features_root=features_root)
    res = extract(cfg, dataset=dataset)
    return FeatureStore(res.path)


def _valid_embeddings(model, store: FeatureStore, field: str, modality: str):
    """Projected embeddings of the valid rows of one field, and those rows."""
    rows = np.flatnonzero(store.valid(field))
    emb = project_store(model.heads, store.read(field, rows), modality, device=model.device)
    return emb, rows


def _dataset_image_embeddings(model, ds: Dataset, features_root: str, progress: bool):
    """Embeddings of the readable images of a dataset, and their rows.

    A `sail align` run goes through a cached feature store; a full-model recipe's towers embed the
    images directly (their encoders are trained, so there is nothing frozen to cache).
    """
    if isinstance(model, SAILModel):
        store = cached_store(model, ds, "image", features_root, progress=progress)
        return _valid_embeddings(model, store, "image", "image")
    from sail.data import ImageError, load_image

    images, rows = [], []
    for i, ref in enumerate(ds.images):
        try:
            images.append(load_image(ref))
            rows.append(i)
        except ImageError:
            continue
    emb = model.encode_image(images) if images else torch.zeros(0, 1)
    return emb, np.array(rows, dtype=np.int64)


# --------------------------------------------------------------------------------------- zero-shot


def zeroshot(run: str, data: str, classnames: str | None = None, templates: str = "imagenet",
             image_store: str | None = None, features_root: str = "features", device: str = "auto",
             vision_model: str | None = None, text_model: str | None = None, progress: bool = True) -> dict:
    from sail.templates import load_classnames, load_templates

    model = load_model(run, vision_model, text_model, device)
    if image_store:
        if not isinstance(model, SAILModel):
            raise SailError("--image-store needs a run trained with `sail align` (heads over stored features)")
        store = FeatureStore(image_store)
        check_store_matches_run(run, store, "image")
        labels, store_names, where = store.labels, store.class_names, store.path
        image_emb, rows = _valid_embeddings(model, store, "image", "image")
    else:
        ds = open_dataset(data)
        labels, store_names, where = ds.labels, ds.class_names, data
    if labels is None or (labels < 0).all():
        raise SailError(f"{where} has no class labels; zero-shot needs a labelled dataset (label column or class folders)")
    if not image_store:
        image_emb, rows = _dataset_image_embeddings(model, ds, features_root, progress)
    names = load_classnames(classnames) if classnames else store_names
    if not names:
        raise SailError(f"{where} has integer labels without class names; pass --classnames FILE")
    if labels.max() >= len(names):
        raise SailError(f"labels go up to {labels.max()} but only {len(names)} class names were given")
    prompts = load_templates(templates)
    keep = labels[rows] >= 0
    class_emb = metrics.class_embeddings(model.encode_text, names, prompts)
    result = metrics.zeroshot(image_emb[keep], class_emb.to(image_emb.device), torch.from_numpy(labels[rows][keep]))
    return {**result, "chance_top1": 100.0 / len(names), "classes": len(names), "images": int(keep.sum()),
            "templates": len(prompts)}


# --------------------------------------------------------------------------------------- retrieval


def read_retrieval_data(data: str, images_root: str | None = None, split: str = "test",
                        columns: list[str] | None = None) -> tuple[Dataset, list[str], list[int]]:
    """(image dataset, captions, caption -> image index) from a manifest, Karpathy JSON or COCO JSON."""
    path = Path(data)
    if path.suffix == ".json":
        if not path.exists():
            raise SailError(f"{data} not found")
        blob = json.loads(path.read_text())
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
            raise SailError(f"{data} is neither a COCO captions JSON (images + annotations) nor a Karpathy split JSON")
        name = f"{path.stem}-{split}" if "annotations" not in blob else path.stem
        ds = Dataset(name, str(path.resolve()), _json_hash(path, split), [i for i, _ in images],
                     [p for _, p in images], {})
    else:  # a manifest: several caption columns and/or several rows per image
        base = open_dataset(data, columns)
        cols = list(base.captions)
        if not cols:
            raise SailError(f"{data} has no caption columns; name them with --columns")
        by_image: dict[str, int] = {}
        ids, refs, captions, owner = [], [], [], []
        for i, ref in enumerate(base.images):
            key = ref or base.ids[i]
            if key not in by_image:
                by_image[key] = len(ids)
                ids.append(base.ids[i])
                refs.append(ref)
            for c in cols:
                text = base.captions[c][i].strip()
                if text:
                    captions.append(text)
                    owner.append(by_image[key])
        ds = Dataset(base.name, base.source, base.source_hash, ids, refs, {})
    if not captions or not len(ds):
        raise SailError(f"{data} holds no images with captions{' in split ' + split if path.suffix == '.json' else ''}")
    return ds, captions, owner


def _json_hash(path: Path, split: str) -> str:
    import hashlib

    h = hashlib.blake2b(path.read_bytes(), digest_size=16)
    h.update(split.encode())
    return h.hexdigest()


def retrieval(run: str, data: str, images_root: str | None = None, split: str = "test",
              columns: list[str] | None = None, features_root: str = "features", device: str = "auto",
              vision_model: str | None = None, text_model: str | None = None, progress: bool = True) -> dict:
    model = load_model(run, vision_model, text_model, device)
    ds, captions, owner = read_retrieval_data(data, images_root, split, columns)
    image_emb, rows = _dataset_image_embeddings(model, ds, features_root, progress)
    if len(rows) == 0:
        raise SailError(f"none of the {len(ds)} images of {data} could be read; check --images-root")
    new_index = -np.ones(len(ds), dtype=np.int64)
    new_index[rows] = np.arange(len(rows))
    keep = [j for j, o in enumerate(owner) if new_index[o] >= 0]
    texts = [captions[j] for j in keep]
    if isinstance(model, SAILModel):
        text_ds = Dataset(f"{ds.name}-captions", ds.source, ds.source_hash + "-captions",
                          [f"{ds.ids[owner[j]]}#{j}" for j in keep], [None] * len(keep), {"caption": texts})
        text_store = cached_store(model, text_ds, "text", features_root, progress=progress)
        text_emb = project_store(model.heads, text_store.read("caption"), "text", device=model.device)
    else:
        text_emb = model.encode_text(texts)
    result = metrics.retrieval(image_emb, text_emb, torch.from_numpy(new_index[[owner[j] for j in keep]]))
    return {**result, "images": len(rows), "captions": len(keep), "chance_text_to_image_R@1": 100.0 / len(rows)}


# --------------------------------------------------------------------------------------- winoground


def winoground(run: str, data: str, images: str | None = None, device: str = "auto",
               vision_model: str | None = None, text_model: str | None = None) -> dict:
    """Winoground from local files: examples.jsonl (id, image_0, image_1, caption_0, caption_1) + images/."""
    path = Path(data)
    if not path.exists():
        raise SailError(f"{data} not found; download Winoground's examples.jsonl and images/ folder")
    image_dir = Path(images) if images else path.parent / "images"
    examples = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for key in ("image_0", "image_1", "caption_0", "caption_1"):
        if examples and key not in examples[0]:
            raise SailError(f"{data} lacks the field {key!r}; expected Winoground's examples.jsonl")
    model = load_model(run, vision_model, text_model, device)
    refs = [_find_image(image_dir, ex[k]) for ex in examples for k in ("image_0", "image_1")]
    texts = [ex[k] for ex in examples for k in ("caption_0", "caption_1")]
    x = model.encode_image(refs).reshape(len(examples), 2, -1)
    y = model.encode_text(texts).reshape(len(examples), 2, -1)
    scores = torch.einsum("nid,njd->nij", x.float(), y.float())  # scores[n, i, j] = sim(image_i, caption_j)
    return {**metrics.winoground(scores), "examples": len(examples), "chance_group": 100 / 6}


def _find_image(directory: Path, name: str) -> str:
    p = directory / name
    if p.suffix.lower() in IMAGE_EXTENSIONS and p.exists():
        return str(p)
    for ext in IMAGE_EXTENSIONS:
        if (directory / f"{name}{ext}").exists():
            return str(directory / f"{name}{ext}")
    raise SailError(f"image {name!r} not found in {directory}; pass --images DIR")


# --------------------------------------------------------------------------------------- encoder-only tasks


def _labelled(store_path: str, run: str | None, field: str = "image"):
    store = FeatureStore(store_path)
    if store.labels is None:
        raise SailError(f"{store_path} has no labels; use a labelled dataset (label column or class folders)")
    ok = store.valid(field) & (store.labels >= 0)
    rows = np.flatnonzero(ok)
    x = torch.from_numpy(store.read(field, rows)).float()
    if run:
        check_store_matches_run(run, store, "image")
        from sail.heads import AlignmentHeads

        x = project_store(AlignmentHeads.from_pretrained(run), x.numpy(), "image")
    return x, torch.from_numpy(store.labels[rows])


def linear_probe(train_store: str, test_store: str, run: str | None = None, seed: int = 0) -> dict:
    xtr, ytr = _labelled(train_store, run)
    xte, yte = _labelled(test_store, run)
    return metrics.linear_probe(xtr, ytr, xte, yte, seed=seed)


def knn(train_store: str, test_store: str, k: int = 20, run: str | None = None) -> dict:
    xtr, ytr = _labelled(train_store, run)
    xte, yte = _labelled(test_store, run)
    norm = torch.nn.functional.normalize
    return metrics.knn_classify(norm(xtr, dim=1), ytr, norm(xte, dim=1), yte, k=k)


def alignment(image_store: str, text_store: str, k: int = 10, field: str | None = None) -> dict:
    """Mutual k-NN overlap of two frozen feature spaces on their shared ids (Huh et al.)."""
    a, b = FeatureStore(image_store), FeatureStore(text_store)
    fa, fb = a.fields[0], field or b.fields[0]
    if fb not in b.fields:
        raise SailError(f"{text_store} has no field {fb!r}; it has {', '.join(b.fields)}")
    ra, rb = join(a, b, fields=[[fa], [fb]])
    if len(ra) <= k:
        raise SailError(f"only {len(ra)} shared ids; mutual k-NN with k={k} needs more")
    score = metrics.mutual_knn_alignment(torch.from_numpy(a.read(fa, ra)).float(), torch.from_numpy(b.read(fb, rb)).float(), k=k)
    return {"mutual_knn": score, "k": k, "samples": len(ra), "chance": k / (len(ra) - 1)}


# --------------------------------------------------------------------------------------- segmentation


def segmentation(run: str, images: str, masks: str, classnames: str, templates: str = "imagenet",
                 ignore_index: int = 255, features_root: str = "features", device: str = "auto",
                 vision_model: str | None = None, text_model: str | None = None, progress: bool = True) -> dict:
    """Zero-shot masks (MaskCLIP-style): each patch token through the image head against class prompts.

    images/ and masks/ hold files with the same stem (VOC / ADE20K layout); mask pixels are class
    indices into `classnames` (a file, one name per line, background included where the masks use it).
    """
    from PIL import Image

    from sail.templates import load_classnames, load_templates

    names = load_classnames(classnames)
    image_dir, mask_dir = Path(images), Path(masks)
    files = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS) if image_dir.is_dir() else []
    pairs = [(p, mask_dir / f"{p.stem}.png") for p in files if (mask_dir / f"{p.stem}.png").exists()]
    if not pairs:
        raise SailError(f"no image in {images} has a mask <stem>.png in {masks}")
    model = load_model(run, vision_model, text_model, device)
    if not isinstance(model, SAILModel):
        raise SailError(f"{run} is a full-model recipe run; segmentation needs a `sail align` run (patch tokens through a head)")
    ds = Dataset(f"seg-{image_dir.parent.name}-{image_dir.name}", str(image_dir.resolve()),
                 _paths_hash([p for p, _ in pairs]), [p.stem for p, _ in pairs], [str(p) for p, _ in pairs], {})
    store = cached_store(model, ds, "image", features_root, patch_tokens=True, progress=progress)
    class_emb = metrics.class_embeddings(model.encode_text, names, load_templates(templates)).float()
    proc = model.vision.processor
    crop = proc.crop_size if getattr(proc, "do_center_crop", False) else {"height": proc.size.get("height"), "width": proc.size.get("width")}
    ch, cw = crop["height"], crop["width"]
    short = proc.size.get("shortest_edge", min(ch, cw))
    cm = metrics.ConfusionMatrix(len(names), ignore_index)
    valid = store.valid("image")
    for row, (_, mask_path) in enumerate(pairs):
        if not valid[row]:
            continue
        tokens = torch.from_numpy(store.read_patch_tokens("image", [row])[0]).float()  # (P, H)
        pooled = torch.from_numpy(store.read("image", [row])[0]).float()
        hidden = tokens.shape[1]
        # SAIL's official code feeds [CLS ; patch_i] to a head trained on [CLS ; mean patch] features.
        inp = torch.cat([pooled[:hidden].expand_as(tokens), tokens], 1) if model.pooling == "concat" else tokens
        emb = project_store(model.heads, inp.numpy(), "image", device=model.device).float()
        logits = emb @ class_emb.T.to(emb.device)                       # (P, C)
        g = int(round(len(tokens) ** 0.5))
        logits = logits.T.reshape(1, len(names), g, g)                  # (1, C, g, g) patch grid
        pred = torch.nn.functional.interpolate(logits, size=(ch, cw), mode="bilinear", align_corners=False)[0].argmax(0)
        cm.update(pred.cpu(), torch.from_numpy(_mask_like_processor(Image.open(mask_path), short, ch, cw)))
    result = cm.compute()
    return {"mIoU": result["mIoU"], "pixel_accuracy": result["pixel_accuracy"], "images": int(valid.sum()),
            "classes": len(names)}


def _paths_hash(paths: list[Path]) -> str:
    import hashlib

    h = hashlib.blake2b(digest_size=16)
    for p in paths:
        h.update(str(p).encode())
        h.update(str(p.stat().st_size).encode())
    return h.hexdigest()


def _mask_like_processor(mask, short: int, ch: int, cw: int) -> np.ndarray:
    """Resize (nearest, shortest side) and centre-crop a label mask the way the processor treats images."""
    from PIL import Image

    w, h = mask.size
    scale = short / min(w, h)
    mask = mask.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.NEAREST)
    w, h = mask.size
    left, top = (w - cw) // 2, (h - ch) // 2
    arr = np.array(mask.crop((left, top, left + cw, top + ch)))
    return arr.astype(np.int64)
