"""Datasets that `sail extract` (and the recipes) read: manifests, WebDataset shards, image folders, `sample`.

Every source is opened into one `Dataset`: parallel columns (ids, image references, caption columns,
labels) plus a name and a content hash used to tie a feature store to the data it came from.

    ds = open_dataset("sample")                    # generated on first use, deterministic
    ds = open_dataset("data/cc3m.parquet", columns=["caption", "long_caption"])
    ds = open_dataset("shards/")                   # img2dataset output: 00000.tar, 00001.tar, ...
    ds = open_dataset("imagenet/val/")             # one sub-folder per class
    image = load_image(ds.images[0])               # PIL image; raises ImageError with a short reason
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from sail.errors import SailError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
MANIFEST_EXTENSIONS = (".csv", ".tsv", ".jsonl", ".parquet")


class ImageError(Exception):
    """An image that cannot be used; the message is the short reason stored with the features."""


@dataclass
class Dataset:
    """Columns of one data source. `images[i]` is a path, a `tar://` reference, or None (text only)."""

    name: str
    source: str
    source_hash: str
    ids: list[str]
    images: list[str | None]
    captions: dict[str, list[str]] = field(default_factory=dict)
    labels: np.ndarray | None = None  # (N,) int64, -1 where unknown
    class_names: list[str] | None = None

    def __len__(self) -> int:
        return len(self.ids)


# ----------------------------------------------------------------------------------------- images


def tar_reference(shard: str, offset: int, size: int) -> str:
    return f"tar://{shard}::{offset}::{size}"


def load_image(ref: str | None) -> Image.Image:
    """Decode one image fully (so truncated files fail here, not later) and return it as RGB."""
    if ref is None:
        raise ImageError("no image")
    try:
        if ref.startswith("tar://"):
            shard, offset, size = ref[len("tar://"):].rsplit("::", 2)
            with open(shard, "rb") as f:
                f.seek(int(offset))
                data = f.read(int(size))
            image = Image.open(io.BytesIO(data))
        else:
            if not os.path.exists(ref):
                raise ImageError("missing file")
            image = Image.open(ref)
        image.load()
        return image.convert("RGB")
    except ImageError:
        raise
    except Exception as e:  # PIL raises many types for bad files; all mean "unusable image"
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ImageError(f"unreadable image: {reason[:200]}") from None


# ----------------------------------------------------------------------------------------- hashing


def _hash_files(paths: list[Path], content: bool) -> str:
    """Content hash of small files (manifests); name+size hash of large ones (shards, image trees)."""
    h = hashlib.blake2b(digest_size=16)
    for p in paths:
        h.update(str(p.name if content else p).encode())
        if content:
            with open(p, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
        else:
            h.update(str(p.stat().st_size).encode())
    return h.hexdigest()


# ----------------------------------------------------------------------------------------- manifests


def _read_manifest_rows(path: Path) -> tuple[list[str], list[dict]]:
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
            rows = list(reader)
            return list(reader.fieldnames or []), rows
    if suffix == ".jsonl":
        rows = []
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise SailError(f"{path}:{n} is not valid JSON ({e.msg}); fix or remove that line") from None
        columns = list(dict.fromkeys(k for r in rows[:1000] for k in r))
        return columns, rows
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        return table.column_names, table.to_pylist()
    raise SailError(f"{path}: unknown manifest type {suffix!r}; use one of {', '.join(MANIFEST_EXTENSIONS)}")


def open_manifest(path: Path, columns: list[str] | None, id_column: str = "id",
                  image_column: str = "image", label_column: str = "label") -> Dataset:
    header, rows = _read_manifest_rows(path)
    if image_column and image_column not in header:
        image_column = ""  # a text-only manifest; image extraction then says which column is missing
    wanted = [id_column] + list(columns or [])
    missing = [c for c in wanted if c not in header]
    if missing:
        raise SailError(f"{path} has no column(s) {', '.join(missing)}; its columns are {', '.join(header)}"
                        " (choose with --columns / --id-column / --image-column)")
    if columns is None:
        columns = [c for c in ("caption", "long_caption", "short_caption", "text") if c in header]
    base = path.parent
    ids = [str(r[id_column]) for r in rows]
    _check_unique(ids, path)
    images = []
    for r in rows:
        v = r.get(image_column) if image_column else None
        images.append(str(base / str(v)) if v not in (None, "") else None)
    captions = {c: ["" if r.get(c) is None else str(r[c]) for r in rows] for c in columns}
    labels, class_names = None, None
    if label_column in header:
        labels, class_names = _encode_labels([r.get(label_column) for r in rows])
    return Dataset(path.stem, str(path.resolve()), _hash_files([path], content=True), ids, images,
                   captions, labels, class_names)


def _encode_labels(values: list) -> tuple[np.ndarray, list[str] | None]:
    """Integer labels stay as they are; string labels become indices into sorted class names."""
    if all(isinstance(v, (int, np.integer)) or (isinstance(v, str) and v.lstrip("-").isdigit()) for v in values):
        return np.array([int(v) for v in values], dtype=np.int64), None
    names = sorted({str(v) for v in values if v not in (None, "")})
    index = {n: i for i, n in enumerate(names)}
    return np.array([index.get(str(v), -1) for v in values], dtype=np.int64), names


def _check_unique(ids: list[str], where) -> None:
    if len(set(ids)) != len(ids):
        seen, dup = set(), None
        for i in ids:
            if i in seen:
                dup = i
                break
            seen.add(i)
        raise SailError(f"{where}: sample id {dup!r} appears more than once; ids must be unique")


# ----------------------------------------------------------------------------------------- webdataset


def open_webdataset(shards: list[Path], columns: list[str] | None, name: str) -> Dataset:
    """img2dataset layout: each sample is key.jpg plus key.txt (caption) and/or key.json."""
    columns = columns or ["caption"]
    ids, images, captions = [], [], {c: [] for c in columns}
    for shard in shards:
        samples: dict[str, dict] = {}
        try:
            with tarfile.open(shard) as tar:
                for m in tar:
                    if not m.isfile():
                        continue
                    base = os.path.basename(m.name)
                    key, _, ext = base.partition(".")
                    key = os.path.join(os.path.dirname(m.name), key)
                    s = samples.setdefault(key, {})
                    ext = "." + ext.lower()
                    if ext in IMAGE_EXTENSIONS:
                        s["image"] = tar_reference(str(shard.resolve()), m.offset_data, m.size)
                    elif ext in (".txt", ".json"):
                        s[ext] = tar.extractfile(m).read().decode("utf-8", errors="replace")
        except tarfile.TarError as e:
            raise SailError(f"{shard} is not a readable tar shard ({e}); remove it or re-download it") from None
        for key, s in samples.items():
            meta = {}
            if ".json" in s:
                try:
                    meta = json.loads(s[".json"])
                except json.JSONDecodeError:
                    meta = {}
            sid = str(meta.get("key", key)) if isinstance(meta, dict) else key
            ids.append(sid)
            images.append(s.get("image"))
            for c in columns:
                text = meta.get(c) if isinstance(meta, dict) else None
                if text is None and c in ("caption", "txt", "text"):
                    text = s.get(".txt", "")
                captions[c].append("" if text is None else str(text).strip())
    _check_unique(ids, shards[0].parent)
    return Dataset(name, str(shards[0].parent.resolve()), _hash_files(shards, content=False), ids, images, captions)


# ----------------------------------------------------------------------------------------- image folder


def open_image_folder(root: Path) -> Dataset:
    """ImageNet layout: root/<class>/<image>; the class folder names are the class names."""
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    ids, images, labels, files = [], [], [], []
    for label, cls in enumerate(classes):
        for p in sorted((root / cls).rglob("*")):
            if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file():
                ids.append(str(p.relative_to(root)))
                images.append(str(p.resolve()))
                labels.append(label)
                files.append(p)
    if not ids:
        raise SailError(f"{root} holds no images in class sub-folders; expected {root}/<class>/<image>.jpg")
    return Dataset(root.name, str(root.resolve()), _hash_files(files, content=False), ids, images, {},
                   np.array(labels, dtype=np.int64), classes)


# ----------------------------------------------------------------------------------------- entry point


def open_dataset(spec: str, columns: list[str] | None = None, id_column: str = "id",
                 image_column: str = "image") -> Dataset:
    """Open `sample`, a manifest file, a tar shard / folder of shards, or a class-per-folder image tree."""
    if spec in ("sample", "sample-val"):
        from sail.sample import sample_dir

        ds = open_manifest(sample_dir(spec) / "manifest.csv", columns)
        ds.name = spec
        return ds
    path = Path(spec).expanduser()
    if not path.exists():
        raise SailError(f"data {spec!r} not found; give a manifest ({', '.join(MANIFEST_EXTENSIONS)}), "
                        "a folder of .tar shards, an image folder, or 'sample' / 'sample-val'")
    if path.is_file() and path.suffix.lower() in MANIFEST_EXTENSIONS:
        return open_manifest(path, columns, id_column, image_column)
    if path.is_file() and path.suffix == ".tar":
        return open_webdataset([path], columns, path.stem)
    if path.is_dir():
        shards = sorted(path.glob("*.tar"))
        if shards:
            return open_webdataset(shards, columns, path.name)
        return open_image_folder(path)
    raise SailError(f"cannot read {spec!r} as data; give a manifest ({', '.join(MANIFEST_EXTENSIONS)}), "
                    "a .tar shard, a folder of shards, an image folder, or 'sample' / 'sample-val'")
