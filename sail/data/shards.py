"""WebDataset shards (img2dataset output: 00000.tar, ...): a cached index of each shard's members, and
the shards read as one Dataset whose images are `tar://shard::offset::size` references.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from sail.core.artifacts import write_json
from sail.core.errors import SailError
from sail.data.images import IMAGE_EXTENSIONS, tar_reference
from sail.data.sources import Dataset, _check_unique, _hash_files

SHARD_INDEX_VERSION = 1
META_EXTENSIONS = (".txt", ".json", ".cls", ".npy")  # small members read into the index (captions, labels)


@dataclass
class ShardIndex:
    """What one tar shard holds, without its image bytes; built once per shard and cached.

    `members` are (name, data offset, size) of every regular file; `meta` holds the decoded content of
    the small metadata members (text for .txt/.json/.cls, a list for .npy, None if unreadable).
    `truncated` is "" for a complete shard, else what is wrong with its end; `usable_bytes` is how
    much of the file the members read so far cover.
    """

    path: str
    size: int
    mtime_ns: int
    members: list[tuple[str, int, int]]
    meta: dict[str, object]
    truncated: str = ""
    usable_bytes: int = 0


def _index_cache_path(path: Path) -> Path:
    from sail.data.sample import cache_root

    key = hashlib.blake2b(str(path).encode(), digest_size=12).hexdigest()
    return cache_root() / "shard-index" / f"{key}.json"


def shard_index(shard: Path, cache: bool = True) -> ShardIndex:
    """The index of one shard, from the cache when its path, size and mtime are unchanged."""
    path = Path(shard).resolve()
    st = path.stat()
    cached = _index_cache_path(path) if cache else None
    if cached is not None and cached.exists():
        try:
            blob = json.loads(cached.read_text())
            if (blob.get("version") == SHARD_INDEX_VERSION and blob["path"] == str(path)
                    and blob["size"] == st.st_size and blob["mtime_ns"] == st.st_mtime_ns):
                return ShardIndex(blob["path"], blob["size"], blob["mtime_ns"],
                                  [tuple(m) for m in blob["members"]], blob["meta"], blob["truncated"],
                                  blob["usable_bytes"])
        except (OSError, ValueError, KeyError):
            pass  # an unreadable cache entry is rebuilt below
    index = _build_shard_index(path, st.st_size, st.st_mtime_ns)
    if cached is not None:
        try:
            write_json(cached, {"version": SHARD_INDEX_VERSION, **asdict(index)}, indent=None)
        except SailError:
            pass  # a read-only (or full) cache only costs re-indexing next time
    return index


def _read_meta(name: str, data: bytes):
    if name.lower().endswith(".npy"):
        try:
            return np.load(io.BytesIO(data), allow_pickle=False).tolist()
        except Exception:  # a damaged .npy is reported against its sample when labels are read
            return None
    return data.decode("utf-8", errors="replace")


def _build_shard_index(path: Path, size: int, mtime_ns: int) -> ShardIndex:
    """Walk the tar headers; a cut anywhere (inside a member, a header or the end blocks) is reported.

    tarfile stops silently at end of file or at a damaged header, so the end is checked here: the
    last member must lie inside the file and be followed by the two zero blocks that end a tar.
    """
    members, meta, truncated, end = [], {}, "", 0
    try:
        with tarfile.open(path, "r:") as tar:
            try:
                for m in tar:
                    if not m.isfile():
                        continue
                    if m.offset_data + m.size > size:
                        truncated = f"it ends inside member {m.name}"
                        break
                    members.append((m.name, m.offset_data, m.size))
                    end = m.offset_data + m.size
                    if os.path.splitext(m.name)[1].lower() in META_EXTENSIONS:
                        meta[m.name] = _read_meta(m.name, tar.extractfile(m).read())
                else:
                    tail_at = tar.offset
                    with open(path, "rb") as f:
                        f.seek(tail_at)
                        tail = f.read(2 * tarfile.BLOCKSIZE)
                    if tail != tarfile.NUL * (2 * tarfile.BLOCKSIZE):
                        truncated = ("it lacks its end-of-archive blocks" if not tail.strip(tarfile.NUL)
                                     else f"its header at byte {tail_at} is damaged or cut")
            except tarfile.ReadError as e:  # tarfile's "unexpected end of data" after a cut member
                truncated = f"it ends early ({e})"
    except tarfile.ReadError as e:  # raised before the first member: empty, cut header, or not a tar
        if size >= tarfile.BLOCKSIZE and "truncated" not in str(e) and "empty" not in str(e):
            raise SailError(f"{path} is not a readable tar shard ({e}); remove it or re-download it") from None
        truncated = f"it ends before its first member ({e})"
    return ShardIndex(str(path), size, mtime_ns, members, meta, truncated, end)


def _group_samples(index: ShardIndex) -> dict[str, dict[str, tuple[str, int, int]]]:
    """webdataset grouping: key = the member path up to the first dot of its file name."""
    samples: dict[str, dict] = {}
    for name, offset, size in index.members:
        folder, base = os.path.split(name)
        key, _, ext = base.partition(".")
        samples.setdefault(os.path.join(folder, key), {})[ext.lower()] = (name, offset, size)
    return samples


def _shard_samples(shards: list[Path], allow_truncated: bool):
    """(shard, index, samples) per shard; truncated shards raise, or lose their last sample when allowed."""
    out, bad, skipped = [], [], []
    for shard in shards:
        index = shard_index(shard)
        samples = _group_samples(index)
        if index.truncated:
            # the last sample seen may have lost members after the cut: it is dropped too
            if samples:
                samples.pop(next(reversed(samples)))
            what = (f"{shard}: {index.truncated}; {len(samples)} samples readable before the cut, "
                    f"{index.usable_bytes:,} of {index.size:,} bytes")
            bad.append(what)
            skipped.append((shard.name, "shard", f"truncated shard: {what}"))
        out.append((shard, index, samples))
    if bad and not allow_truncated:
        more = f" (and {len(bad) - 1} more truncated shard(s))" if len(bad) > 1 else ""
        raise SailError(f"truncated shard {bad[0]}{more}; re-download it (or, with sail extract, pass "
                        "--allow-truncated to record it and skip what is missing)")
    return out, skipped


def _text(index: ShardIndex, member) -> str | None:
    if member is None:
        return None
    value = index.meta.get(member[0])
    return value if isinstance(value, str) else None


# ----------------------------------------------------------------------------------------- webdataset


def open_webdataset(shards: list[Path], columns: list[str] | None, name: str,
                    allow_truncated: bool = False) -> Dataset:
    """img2dataset layout: each sample is key.jpg plus key.txt (caption) and/or key.json."""
    columns = columns or ["caption"]
    ids, images, captions = [], [], {c: [] for c in columns}
    per_shard, skipped = _shard_samples(shards, allow_truncated)
    for shard, index, samples in per_shard:
        for key, s in samples.items():
            meta = {}
            if "json" in s:
                try:
                    meta = json.loads(_text(index, s["json"]) or "{}")
                except json.JSONDecodeError:
                    meta = {}
            if not isinstance(meta, dict):
                meta = {}
            ids.append(str(meta.get("key", key)))
            image = next((s[e] for e in s if "." + e.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS), None)
            images.append(tar_reference(index.path, image[1], image[2]) if image else None)
            for c in columns:
                text = meta.get(c)
                if text is None and c in ("caption", "txt", "text"):
                    text = _text(index, s.get("txt")) or ""
                captions[c].append("" if text is None else str(text).strip())
    _check_unique(ids, shards[0].parent)
    return Dataset(name, str(shards[0].parent.resolve()), _hash_files(shards, content=False), ids, images,
                   captions, skipped=skipped)
