"""Ids files: the subset of pairs a run trains on (`sail align --subset FILE.ids`, written by `sail curate`).

One id per line; the subset's identity is the sha256 of its sorted set (`subset_digest`), recorded in a run's
settings so that `--resume` refuses a changed subset whatever the file's order.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from sail.core.artifacts import write_atomic
from sail.core.errors import SailError
from sail.data.loader import PairedFeatures


def subset_digest(ids) -> str:
    """sha256 of the set of ids (sorted, one per line): the subset's identity, whatever the file's order."""
    h = hashlib.sha256()
    for i in sorted(set(str(x) for x in ids)):
        h.update(i.encode() + b"\n")
    return "sha256:" + h.hexdigest()


def read_subset(path: str | Path) -> list[str]:
    """The ids of an ids file (one per line; blank lines ignored)."""
    path = Path(path)
    if not path.is_file():
        raise SailError(f"--subset {path} not found (or not a file); write it with `sail curate --out {path}`")
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except UnicodeDecodeError as e:
        raise SailError(f"--subset {path} is not UTF-8 text (byte {e.start}); give an ids file, one id per line") from None
    ids = [line.rstrip("\r") for line in lines if line.strip()]
    if not ids:
        raise SailError(f"--subset {path} holds no ids; curate again or drop --subset")
    return ids


def subset_sha256(path: str | Path | None) -> str | None:
    return None if path is None else subset_digest(read_subset(path))


def restrict(pairs: PairedFeatures, path: str | Path) -> PairedFeatures:
    """The pairs whose ids the ids file lists (in the pairs' order); an id that is not among them -> SailError."""
    want = set(read_subset(path))
    ids = pairs.ids
    hit = np.fromiter((i in want for i in ids), dtype=bool, count=len(ids))
    unknown = len(want) - int(hit.sum())
    if unknown:
        have = set(ids[hit])
        first = sorted(i for i in want if i not in have)[:3]
        raise SailError(f"--subset {path}: {unknown} of its {len(want)} ids are not among the valid pairs of "
                        f"{pairs.image_store.path} and {pairs.text_store.path} (e.g. {', '.join(map(repr, first))}); "
                        "curate from these stores, or pass the stores the ids file was made from")
    return pairs.subset(np.flatnonzero(hit))


def write_ids(path: str | Path, ids) -> None:
    """An ids file (one id per line), written atomically."""
    write_atomic(path, "".join(f"{i}\n" for i in ids))
