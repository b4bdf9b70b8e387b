"""CLIP_benchmark webdataset folders (<root>/<split>/{0..N-1}.tar with classnames.txt, templates, dataset
type): what the folder is (`clip_benchmark_info`) and its split read as a Dataset with labels or targets.

    ds = open_clip_benchmark("wds_cars/", split="test")
    info = clip_benchmark_info("wds_cars/")        # its dataset type, class names, zero-shot templates
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sail.core.errors import SailError
from sail.data.images import tar_reference
from sail.data.shards import _shard_samples, _text
from sail.data.sources import Dataset, _check_unique, _hash_files

CLIP_BENCHMARK_TYPES = ("classification", "multilabel", "retrieval")
CLIP_BENCHMARK_IMAGES = ("webp", "png", "jpg", "jpeg")  # CLIP_benchmark's order of preference


@dataclass
class ClipBenchmarkInfo:
    """What a CLIP_benchmark webdataset root says about itself (for zero-shot and retrieval defaults).

        info = clip_benchmark_info("wds_cars")        # the root, or one of its split folders
        info.dataset_type                               # "classification" | "multilabel" | "retrieval"
        info.class_names, info.templates                # lists (None when the file is absent)
        info.splits                                     # e.g. ["test", "train"]
    """

    root: Path
    dataset_type: str
    class_names: list[str] | None
    templates: list[str] | None  # each with the placeholder {c}
    splits: list[str]


def _clip_benchmark_root(path: Path) -> Path | None:
    """The root of a CLIP_benchmark layout given its root or one of its split folders; None otherwise."""
    path = Path(path)
    if not path.is_dir():
        return None
    if (path / "nshards.txt").is_file():
        return path.parent
    if any((d / "nshards.txt").is_file() for d in path.iterdir() if d.is_dir()):
        return path
    return None


def is_clip_benchmark(path) -> bool:
    """True for a CLIP_benchmark webdataset root (<root>/<split>/nshards.txt) or one of its split folders."""
    return _clip_benchmark_root(Path(path).expanduser()) is not None


def _read_lines(path: Path) -> list[str] | None:
    if not path.is_file():
        return None
    try:
        return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError as e:
        raise SailError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); re-save it as UTF-8") from None


def clip_benchmark_info(path) -> ClipBenchmarkInfo:
    """Read classnames.txt, zeroshot_classification_templates.txt and dataset_type.txt of a layout."""
    root = _clip_benchmark_root(Path(path).expanduser())
    if root is None:
        raise SailError(f"{path} is not a CLIP_benchmark webdataset folder (no <split>/nshards.txt in it)")
    kind = (_read_lines(root / "dataset_type.txt") or ["classification"])[0].lower()
    if kind not in CLIP_BENCHMARK_TYPES:
        raise SailError(f"{root / 'dataset_type.txt'} says {kind!r}; expected one of {', '.join(CLIP_BENCHMARK_TYPES)}")
    templates = _read_lines(root / "zeroshot_classification_templates.txt")
    for t in templates or []:
        if "{c}" not in t:
            raise SailError(f"{root / 'zeroshot_classification_templates.txt'}: template {t!r} has no {{c}} placeholder")
    splits = sorted(d.name for d in root.iterdir() if (d / "nshards.txt").is_file())
    return ClipBenchmarkInfo(root, kind, _read_lines(root / "classnames.txt"), templates, splits)


def _clip_benchmark_shards(root: Path, split: str, info: ClipBenchmarkInfo) -> list[Path]:
    folder = root / split
    if not (folder / "nshards.txt").is_file():
        raise SailError(f"{root} has no split {split!r} (no {folder / 'nshards.txt'}); its splits are "
                        f"{', '.join(info.splits)}; choose one with --split")
    text = (folder / "nshards.txt").read_text().strip()
    if not text.isdigit() or int(text) == 0:
        raise SailError(f"{folder / 'nshards.txt'} should hold the number of shards, not {text[:40]!r}")
    shards = [folder / f"{k}.tar" for k in range(int(text))]
    missing = [p for p in shards if not p.is_file()]
    if missing:
        raise SailError(f"{missing[0]} is missing ({len(missing)} of the {len(shards)} shards nshards.txt names); "
                        "download them again")
    return shards


def open_clip_benchmark(path, split: str = "test", columns: list[str] | None = None,
                        allow_truncated: bool = False) -> Dataset:
    """A CLIP_benchmark webdataset split as a Dataset.

    Classification: `labels` from KEY.cls, `class_names` from classnames.txt. Multilabel: `multilabels`
    (N, C) from KEY.npy. Retrieval: the caption lines of KEY.txt become columns caption_0, caption_1, ...
    ("" where an image has fewer captions). Ids are the sample keys. Giving a split folder selects it.
    """
    path = Path(path).expanduser()
    info = clip_benchmark_info(path)
    root = info.root
    if (path / "nshards.txt").is_file():
        split = path.name
    shards = _clip_benchmark_shards(root, split, info)
    per_shard, skipped = _shard_samples(shards, allow_truncated)
    keys, images, labels, multi, texts = [], [], [], [], []
    for shard, index, samples in per_shard:
        for key, s in samples.items():
            where = f"{shard} sample {key}"
            image = next((s[e] for e in CLIP_BENCHMARK_IMAGES if e in s), None)
            if image is None:
                raise SailError(f"{where} has no image (.webp/.png/.jpg); its members are {', '.join(sorted(s))}")
            keys.append((shard.stem, key))
            images.append(tar_reference(index.path, image[1], image[2]))
            if info.dataset_type == "retrieval":
                text = _text(index, s.get("txt"))
                if text is None:
                    raise SailError(f"{where} has no .txt captions, which a retrieval dataset needs")
                texts.append([t.strip() for t in text.splitlines() if t.strip()])
            elif info.dataset_type == "multilabel":
                value = index.meta.get(s["npy"][0]) if "npy" in s else None
                if not isinstance(value, list) or any(isinstance(v, list) for v in value):
                    raise SailError(f"{where} has no readable .npy label vector, which a multilabel dataset needs")
                multi.append(value)
            else:
                text = (_text(index, s.get("cls")) or "").strip()
                if not text.lstrip("-").isdigit():
                    raise SailError(f"{where} has {'no .cls label' if not text else f'label {text[:20]!r}'}; "
                                    "a classification dataset needs an integer KEY.cls")
                labels.append(int(text))
    ids = [k for _, k in keys]
    if len(set(ids)) != len(ids):  # keys repeat across shards: the shard names them
        ids = [f"{s}/{k}" for s, k in keys]
    _check_unique(ids, root / split)
    ds = Dataset(f"{root.name}-{split}", str((root / split).resolve()),
                 _hash_files(shards, content=False) + _hash_text(info), ids, images, skipped=skipped)
    _attach_targets(ds, info, root / split, columns, texts, multi, labels)
    return ds


def _attach_targets(ds: Dataset, info: ClipBenchmarkInfo, where: Path, columns, texts, multi, labels) -> None:
    """What a CLIP_benchmark split is scored against: caption columns (retrieval), a (N, C) label matrix
    (multilabel) or integer labels (classification), each checked against classnames.txt."""
    ids = ds.ids
    n_classes = len(info.class_names) if info.class_names else None
    if info.dataset_type == "retrieval":
        width = max((len(t) for t in texts), default=0)
        names = [f"caption_{j}" for j in range(width)]
        for c in columns or []:
            if c not in names:
                raise SailError(f"{where} has no caption column {c!r}; its columns are {', '.join(names)}")
        ds.captions = {c: [t[j] if j < len(t) else "" for t in texts]
                       for j, c in enumerate(names) if columns is None or c in columns}
    elif info.dataset_type == "multilabel":
        widths = {len(v) for v in multi}
        if len(widths) > 1 or (n_classes and widths != {n_classes}):
            raise SailError(f"{where}: .npy label vectors have lengths {sorted(widths)}, expected one length "
                            f"{'= ' + str(n_classes) + ' (classnames.txt)' if n_classes else ''}")
        ds.multilabels = np.array(multi, dtype=np.int8).reshape(len(multi), -1)
        ds.class_names = info.class_names
    else:
        ds.labels = np.array(labels, dtype=np.int64)
        ds.class_names = info.class_names
        if n_classes is not None and len(labels) and (ds.labels.min() < 0 or ds.labels.max() >= n_classes):
            bad = int(np.flatnonzero((ds.labels < 0) | (ds.labels >= n_classes))[0])
            raise SailError(f"{where} sample {ids[bad]} has label {labels[bad]}, outside the "
                            f"{n_classes} classes of classnames.txt")


def _hash_text(info: ClipBenchmarkInfo) -> str:
    h = hashlib.blake2b(digest_size=8)
    h.update(json.dumps([info.dataset_type, info.class_names, info.templates]).encode())
    return h.hexdigest()
