"""Dataset: the parallel columns of one data source (ids, image references, captions, labels), with the
name and content hash that tie a feature store to the data it came from; shared by every reader
(manifests, shards, CLIP_benchmark folders, image folders).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sail.core.errors import SailError


@dataclass
class Dataset:
    """Columns of one data source. `images[i]` is a path, a `tar://` reference, or None (text only).

    ids, images and each caption column are sequences: lists, or (manifests) Arrow-backed `TextColumn`s
    that index, slice (-> list), iterate and compare like lists.
    """

    name: str
    source: str
    source_hash: str
    ids: Sequence[str]
    images: Sequence[str | None]
    captions: dict[str, Sequence[str]] = field(default_factory=dict)
    labels: np.ndarray | None = None  # (N,) int64, -1 where unknown
    class_names: list[str] | None = None
    multilabels: np.ndarray | None = None  # (N, C) int8 multi-hot targets (CLIP_benchmark multilabel)
    skipped: list[tuple[str, str, str]] = field(default_factory=list)  # (id, field, reason) lost while reading
    encoding: str = "utf-8"  # of a text manifest: what reopening `source` needs (a store's "encoding" attribute)

    def __len__(self) -> int:
        return len(self.ids)


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


def _check_unique(ids: list[str], where) -> None:
    if len(set(ids)) != len(ids):
        seen, dup = set(), None
        for i in ids:
            if i in seen:
                dup = i
                break
            seen.add(i)
        raise SailError(f"{where}: sample id {dup!r} appears more than once; ids must be unique")
