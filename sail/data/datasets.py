"""Datasets that `sail extract` (and the recipes) read: manifests, WebDataset shards, image folders, `sample`.

Every source is opened into one `Dataset`: parallel columns (ids, image references, caption columns,
labels) plus a name and a content hash used to tie a feature store to the data it came from.

    ds = open_dataset("sample")                    # generated on first use, deterministic
    ds = open_dataset("data/cc3m.parquet", columns=["caption", "long_caption"])
    ds = open_dataset("shards/")                   # img2dataset output: 00000.tar, 00001.tar, ...
    ds = open_dataset("imagenet/val/")             # one sub-folder per class
    ds = open_dataset("wds_cars/", split="test")   # CLIP_benchmark webdataset: <root>/test/{0..N-1}.tar
    info = clip_benchmark_info("wds_cars/")        # its dataset type, class names, zero-shot templates
    image = load_image(ds.images[0])               # PIL image; raises ImageError with a short reason
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sail.core.errors import SailError

# The readers live in focused modules; their public names stay importable from sail.data as before.
from sail.data.benchmark_folders import ClipBenchmarkInfo, clip_benchmark_info, is_clip_benchmark, open_clip_benchmark  # noqa: F401
from sail.data.images import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, ImageError, load_image, tar_reference, to_rgb  # noqa: F401
from sail.data.manifests import CAPTION_COLUMNS, MANIFEST_EXTENSIONS, check_encoding, open_manifest, read_text  # noqa: F401
from sail.data.shards import ShardIndex, open_webdataset, shard_index  # noqa: F401
from sail.data.sources import Dataset, _hash_files  # noqa: F401


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


def open_dataset(spec: str, columns: list[str] | None = None, id_column: str = "id", image_column: str = "image",
                 split: str = "test", allow_truncated: bool = False, encoding: str = "utf-8") -> Dataset:
    """Open `sample`, a manifest file, a tar shard / folder of shards, a CLIP_benchmark webdataset root
    (`split` chooses its split), or a class-per-folder image tree.

    A truncated shard raises SailError unless `allow_truncated`, which keeps its complete samples and
    records the shard in `Dataset.skipped`. `encoding` is the text encoding of CSV/TSV/JSONL manifests.
    """
    if spec in ("sample", "sample-val"):
        from sail.data.sample import sample_dir

        ds = open_manifest(sample_dir(spec) / "manifest.csv", columns)
        ds.name = spec
        return ds
    path = Path(spec).expanduser()
    if not path.exists():
        raise SailError(f"data {spec!r} not found; give a manifest ({', '.join(MANIFEST_EXTENSIONS)}), "
                        "a folder of .tar shards, a CLIP_benchmark webdataset folder, an image folder, "
                        "or 'sample' / 'sample-val'")
    if path.is_file() and path.suffix.lower() in MANIFEST_EXTENSIONS:
        return open_manifest(path, columns, id_column, image_column, encoding=encoding)
    if path.is_file() and path.suffix == ".tar":
        return open_webdataset([path], columns, path.stem, allow_truncated)
    if path.is_dir():
        if is_clip_benchmark(path):
            return open_clip_benchmark(path, split, columns, allow_truncated)
        shards = sorted(path.glob("*.tar"))
        if shards:
            return open_webdataset(shards, columns, path.name, allow_truncated)
        return open_image_folder(path)
    raise SailError(f"cannot read {spec!r} as data; give a manifest ({', '.join(MANIFEST_EXTENSIONS)}), "
                    "a .tar shard, a folder of shards, a CLIP_benchmark webdataset folder, an image folder, "
                    "or 'sample' / 'sample-val'")
