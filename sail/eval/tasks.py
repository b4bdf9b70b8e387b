"""`sail eval TASK`: what an alignment is worth on the benchmarks the papers report.

Each task takes a run directory (or, for encoder-only tasks, feature stores), extracts and caches
what it needs through the same store code as `sail extract`, and returns a flat dict of numbers that
the CLI prints as a table and writes as JSON. File formats are read by `sail.eval.evalsets`; segmentation's
sliding-window protocol lives in `sail.eval.segmentation`.

    zeroshot(run, "imagenet/val", classnames="imagenet", templates="imagenet")
    retrieval(run, "coco/dataset_coco.json", images_root="coco/", split="test")
    winoground(run, "winoground/examples.jsonl")
    linear_probe("features/in1k-train/dinov2-l.h5", "features/in1k-val/dinov2-l.h5", device="cuda")
    knn(train_store, test_store, k=20)
    segmentation(run, "ADE/images/validation", "ADE/annotations/validation", "ade.txt", reduce_zero_label=True)
    alignment("features/coco/dinov2-l.h5", "features/coco/gte-l.h5")

Cached stores go to `<features_root>/<dataset>-<hash of its source>/<model>-<hash of the store's
identity>.h5`: the identity is everything that determines the embeddings (data and its content hash,
the exact texts, encoder and revision, pooling, max length, weights dtype), so a cache is reused only
when it holds exactly what is asked for, and two datasets with the same folder name never meet.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from sail.core import metrics
from sail.core.errors import SailError
from sail.data import Dataset, open_dataset
from sail.data.store import FeatureStore, join
from sail.encoders import canonical_model_id, model_identity, model_revision, pick_device, resolve_model
from sail.encoders.extract import ExtractConfig, extract
from sail.eval.evalsets import content_hash, read_retrieval_data, read_winoground
from sail.eval.segmentation import SegProtocol, evaluate_segmentation
from sail.train.model import SAILModel, project_store, read_run_config

TASKS = ("zeroshot", "retrieval", "winoground", "linear-probe", "knn", "segmentation", "alignment")


# --------------------------------------------------------------------------------------- shared steps


def load_model(run: str, vision_model: str | None = None, text_model: str | None = None, device: str = "auto"):
    return SAILModel.from_pretrained(run, vision_model=vision_model, text_model=text_model, device=device)


def check_store_matches_run(run: str, store: FeatureStore, modality: str) -> None:
    """A store made by another encoder than the run's would give meaningless numbers: refuse it."""
    enc = read_run_config(run).get(f"{modality}_encoder", {})
    theirs = {k: store.attrs.get(k) for k in ("model_id", "pooling", "dim")}
    ours = {k: enc.get(k) for k in ("model_id", "pooling", "dim")}
    theirs["model_id"], ours["model_id"] = (canonical_model_id(x["model_id"], modality) for x in (theirs, ours))
    diff = [k for k in ours if ours[k] is not None and theirs[k] != ours[k]]
    if diff:
        raise SailError(f"{store.path} was made with {theirs} but run {run} was trained on {ours} "
                        f"({', '.join(diff)} differ); extract with the run's encoder")


def cache_path(features_root: str, dataset: Dataset, spec, identity: dict) -> Path:
    """Where a cached store of `dataset` lives: distinct for distinct data and for distinct identities."""
    folder = f"{dataset.name}-{content_hash(dataset.source)[:8]}"
    return Path(features_root) / folder / f"{spec.name}-{content_hash(json.dumps(identity, sort_keys=True))[:10]}.h5"


def cached_store(model, dataset: Dataset, modality: str, features_root: str = "features",
                 progress: bool = True) -> FeatureStore:
    """Extract `dataset` with the run's encoder once; later calls with the same identity reuse the store."""
    from sail.core.precision import resolve_precision

    source = model.image_model if modality == "image" else model.text_model
    spec = resolve_model(source, modality)
    image = modality == "image"
    identity = {"model_id": model_identity(spec), "revision": model_revision(spec.source), "modality": modality,
                "pooling": model.pooling if image else "model", "max_length": None if image else model.max_length,
                "source": dataset.source, "source_hash": dataset.source_hash,
                "fields": sorted(dataset.captions) if not image else ["image"], "n": len(dataset),
                # bf16 weights on a GPU, fp32 on a CPU: other numbers, so another cache
                "weights_dtype": resolve_precision("auto", model.device).name}
    out = cache_path(features_root, dataset, spec, identity)
    cfg = ExtractConfig(model=source, data=dataset.source, out=str(out), modality=modality,
                        pooling=model.pooling, max_length=model.max_length,
                        device=str(model.device), progress=progress, features_root=features_root)
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
    return stream_image_embeddings(model, ds.images, progress=progress)


def stream_image_embeddings(model, refs: list, batch_size: int = 64, progress: bool = True):
    """Embeddings (n_readable, D) of image files decoded `batch_size` at a time, and their rows.

    Decoded images never pile up: each batch is embedded and dropped (ImageNet val would take ~28 GB
    held as PIL images). Unreadable images are skipped; their rows are absent from the result.
    """
    from sail.data import ImageError, load_image

    out, rows = [], []
    bar = tqdm(total=len(refs), desc="embed images", unit="img", disable=not progress, dynamic_ncols=True)
    for start in range(0, len(refs), batch_size):
        batch, batch_rows = [], []
        for i, ref in enumerate(refs[start:start + batch_size], start):
            try:
                batch.append(load_image(ref))
                batch_rows.append(i)
            except ImageError:
                continue
        if batch:
            out.append(model.encode_image(batch).float().cpu())
            rows += batch_rows
        bar.update(min(batch_size, len(refs) - start))
    bar.close()
    emb = torch.cat(out) if out else torch.zeros(0, 1)
    return emb, np.array(rows, dtype=np.int64)


# --------------------------------------------------------------------------------------- zero-shot


def zeroshot(run: str, data: str, classnames: str | None = None, templates: str | None = None,
             image_store: str | None = None, features_root: str = "features", device: str = "auto",
             vision_model: str | None = None, text_model: str | None = None, progress: bool = True,
             split: str = "test", encoding: str = "utf-8") -> dict:
    """Zero-shot top-1/top-5/mean per-class recall with a template ensemble.

    A CLIP_benchmark folder brings its own class names and templates (the defaults here), and `split`
    picks its split; otherwise the class names come from the data and the templates default to ImageNet's.
    """
    from sail.data import clip_benchmark_info, is_clip_benchmark
    from sail.eval.templates import load_classnames, load_templates

    bench = clip_benchmark_info(data) if not image_store and is_clip_benchmark(data) else None
    if bench is not None and bench.dataset_type != "classification":
        raise SailError(f"{data} is a CLIP_benchmark {bench.dataset_type} dataset; zero-shot here takes "
                        "classification ones" + (" (use `sail eval retrieval`)" if bench.dataset_type == "retrieval" else ""))

    model = load_model(run, vision_model, text_model, device)
    if image_store:
        if not isinstance(model, SAILModel):
            raise SailError("--image-store needs a run trained with `sail align` (heads over stored features)")
        store = FeatureStore(image_store)
        check_store_matches_run(run, store, "image")
        labels, store_names, where = store.labels, store.class_names, store.path
        image_emb, rows = _valid_embeddings(model, store, "image", "image")
    else:
        ds = open_dataset(data, split=split, encoding=encoding)
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
    prompts = load_templates(templates) if templates else (bench.templates if bench and bench.templates
                                                           else load_templates("imagenet"))
    keep = labels[rows] >= 0
    class_emb = metrics.class_embeddings(model.encode_text, names, prompts)
    result = metrics.zeroshot(image_emb[keep], class_emb.to(image_emb.device), torch.from_numpy(labels[rows][keep]))
    return {**result, "chance_top1": 100.0 / len(names), "classes": len(names), "images": int(keep.sum()),
            "templates": len(prompts)}


# --------------------------------------------------------------------------------------- retrieval


def retrieval(run: str, data: str, images_root: str | None = None, split: str = "test",
              columns: list[str] | None = None, features_root: str = "features", device: str = "auto",
              vision_model: str | None = None, text_model: str | None = None, progress: bool = True,
              encoding: str = "utf-8") -> dict:
    model = load_model(run, vision_model, text_model, device)
    ds, captions, owner = read_retrieval_data(data, images_root, split, columns, encoding)
    image_emb, rows = _dataset_image_embeddings(model, ds, features_root, progress)
    if len(rows) == 0:
        raise SailError(f"none of the {len(ds)} images of {data} could be read; check --images-root")
    new_index = -np.ones(len(ds), dtype=np.int64)
    new_index[rows] = np.arange(len(rows))
    keep = [j for j, o in enumerate(owner) if new_index[o] >= 0]
    texts = [captions[j] for j in keep]
    if isinstance(model, SAILModel):
        # The cache is named by the exact texts: other --columns (or another split) is another store.
        text_ds = Dataset(f"{ds.name}-captions", ds.source, content_hash(ds.source_hash, texts),
                          [f"{ds.ids[owner[j]]}#{j}" for j in keep], [None] * len(keep), {"caption": texts})
        text_store = cached_store(model, text_ds, "text", features_root, progress=progress)
        text_emb = project_store(model.heads, text_store.read("caption"), "text", device=model.device)
    else:
        text_emb = model.encode_text(texts)
    result = metrics.retrieval(image_emb, text_emb, torch.from_numpy(new_index[[owner[j] for j in keep]]))
    return {**result, "images": len(rows), "captions": len(keep), "chance_text_to_image_R@1": 100.0 / len(rows)}


# --------------------------------------------------------------------------------------- winoground


def winoground(run: str, data: str, images: str | None = None, device: str = "auto",
               vision_model: str | None = None, text_model: str | None = None, encoding: str = "utf-8") -> dict:
    """Winoground from local files: examples.jsonl (id, image_0, image_1, caption_0, caption_1) + images/."""
    examples, refs, texts = read_winoground(data, images, encoding)
    model = load_model(run, vision_model, text_model, device)
    x = model.encode_image(refs).reshape(len(examples), 2, -1)
    y = model.encode_text(texts).reshape(len(examples), 2, -1)
    scores = torch.einsum("nid,njd->nij", x.float(), y.float())  # scores[n, i, j] = sim(image_i, caption_j)
    return {**metrics.winoground(scores), "examples": len(examples), "chance_group": 100 / 6}


# --------------------------------------------------------------------------------------- encoder-only tasks


def _labelled(store_path: str, run: str | None, device: torch.device, field: str = "image"):
    """Valid labelled rows of a store: features (N, D) float32 on `device` (through the run's image head if
    given) and labels (N,) int64 on the CPU."""
    store = FeatureStore(store_path)
    if store.labels is None:
        raise SailError(f"{store_path} has no labels; use a labelled dataset (label column or class folders)")
    ok = store.valid(field) & (store.labels >= 0)
    rows = np.flatnonzero(ok)
    if run:
        check_store_matches_run(run, store, "image")
        from sail.train.heads import AlignmentHeads

        x = project_store(AlignmentHeads.from_pretrained(run).to(device), store.read(field, rows), "image", device=device)
    else:
        x = torch.from_numpy(store.read(field, rows))
    # labels stay on the CPU: metrics moves them where it needs them (its seeded splits index on the CPU)
    return x.float().to(device), torch.from_numpy(store.labels[rows])


def linear_probe(train_store: str, test_store: str, run: str | None = None, seed: int = 0,
                 device: str = "auto", progress: bool = True) -> dict:
    """Logistic regression (L-BFGS, weight decay tuned on a validation split) on `device`."""
    dev = pick_device(device)
    xtr, ytr = _labelled(train_store, run, dev)
    xte, yte = _labelled(test_store, run, dev)
    return metrics.linear_probe(xtr, ytr, xte, yte, seed=seed, progress=progress)


def knn(train_store: str, test_store: str, k: int = 20, run: str | None = None, device: str = "auto",
        progress: bool = True) -> dict:
    """Weighted kNN (DINO protocol) with exact cosine neighbours computed on `device`."""
    dev = pick_device(device)
    xtr, ytr = _labelled(train_store, run, dev)
    xte, yte = _labelled(test_store, run, dev)
    norm = torch.nn.functional.normalize
    return metrics.knn_classify(norm(xtr, dim=1), ytr, norm(xte, dim=1), yte, k=k, progress=progress)


def alignment(image_store: str, text_store: str, k: int = 10, field: str | None = None, device: str = "auto") -> dict:
    """Mutual k-NN overlap of two frozen feature spaces on their shared ids (Huh et al.)."""
    a, b = FeatureStore(image_store), FeatureStore(text_store)
    fa, fb = a.fields[0], field or b.fields[0]
    if fb not in b.fields:
        raise SailError(f"{text_store} has no field {fb!r}; it has {', '.join(b.fields)}")
    ra, rb = join(a, b, fields=[[fa], [fb]])
    if len(ra) <= k:
        raise SailError(f"only {len(ra)} shared ids; mutual k-NN with k={k} needs more")
    dev = pick_device(device)
    score = metrics.mutual_knn_alignment(torch.from_numpy(a.read(fa, ra)).float().to(dev),
                                         torch.from_numpy(b.read(fb, rb)).float().to(dev), k=k)
    return {"mutual_knn": score, "k": k, "samples": len(ra), "chance": k / (len(ra) - 1)}


# --------------------------------------------------------------------------------------- segmentation


def segmentation(run: str, images: str, masks: str, classnames: str, templates: str = "imagenet",
                 protocol: SegProtocol | None = None, device: str = "auto", vision_model: str | None = None,
                 text_model: str | None = None, progress: bool = True, **protocol_fields) -> dict:
    """Zero-shot masks by sliding windows over patch tokens (see `sail.eval.segmentation`): mIoU + per-class IoU.

    images/ and masks/ hold files with the same stem (VOC / ADE20K layout); mask pixels are class
    indices into `classnames` (one class per line, "a, b" for synonyms; background included where the
    masks use it, or `reduce_zero_label=True` where label 0 means "ignore", as ADE20K).
    """
    from sail.eval.evalsets import segmentation_pairs

    protocol = protocol or SegProtocol(**protocol_fields)
    pairs = segmentation_pairs(images, masks)
    model = load_model(run, vision_model, text_model, device)
    if not isinstance(model, SAILModel):
        raise SailError(f"{run} is a full-model recipe run; segmentation needs a `sail align` run (patch tokens through a head)")
    return evaluate_segmentation(model, pairs, classnames, templates, protocol, progress)
