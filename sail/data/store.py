"""The feature store: one self-describing HDF5 file of embeddings per (dataset, encoder).

Layout (see features/README.md; readable with plain h5py):

    /ids                    (N,) utf-8 strings, the sample ids (the join key between stores)
    /features/<field>       (N, D) float16, chunked by rows; rows of skipped samples are zeros
    /valid/<field>          (N,) bool, False where the sample was skipped for that field
    /patch_tokens/<field>   (N, P, D') float16, only with `sail extract --patch-tokens`
    /labels                 (N,) int64, -1 = unknown; attribute class_names (JSON) where known
    /skipped/{id,field,reason}  one entry per skipped (sample, field) with the reason
    attributes on /         format, model_id, model_revision, modality, pooling, dim, dtype,
                            preprocessing, max_length, source, source_hash, dataset, sail_version,
                            created, fields, complete, checksums (JSON: dataset name -> "sha256:<hex>"
                            of its raw bytes), nonfinite_rows (JSON: field -> rows with a NaN/inf)

Integrity: opening a store checks that its ids are non-empty and unique (a damaged id column would join
wrong pairs silently). `verify(path)` (`sail info --verify`) re-reads every dataset and compares it with
the checksums written at finish; stores from before checksums open fine and say "no checksum".

    store = FeatureStore("features/sample/dinov2-s.h5")
    store.ids, store.fields, store.attrs, store.labels
    x = store.read("image", rows=[0, 5, 7])        # (3, D) float16 numpy
    store.read_span_into("image", lo, hi, out)     # rows [lo, hi) into a reused array (plain preads)
    rows_a, rows_b = join(store_a, store_b)        # rows of the ids both hold, in the same order
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import mmap
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from sail.core.errors import SailError

FORMAT = "sail-features"
FORMAT_VERSION = 1
STRING = h5py.string_dtype("utf-8")


class FeatureStore:
    """Read-only view of a finished store. Rows are read lazily; nothing is loaded up front but ids.

    check_ids=False opens a store whose ids are empty or repeated (only `sail info` wants that, to report them).
    """

    def __init__(self, path: str | Path, check_ids: bool = True):
        self.path = Path(path)
        if not self.path.exists():
            raise SailError(f"feature store {self.path} not found; create it with `sail extract`")
        if self.path.is_dir():
            raise SailError(f"{self.path} is a directory, not a feature store (.h5 file)")
        try:
            self._h5 = h5py.File(self.path, "r")
        except OSError as e:  # h5py's message can span lines (errno dumps): keep the gist
            raise SailError(f"{self.path} is not a readable HDF5 feature store ({_first_line(e)})") from None
        attrs = dict(self._h5.attrs)
        if attrs.get("format") != FORMAT:
            self._h5.close()
            raise SailError(f"{self.path} is not a sail feature store (no format={FORMAT!r} attribute)")
        if not attrs.get("complete", False):
            self._h5.close()
            raise SailError(f"{self.path} is incomplete; rerun the `sail extract` command that made it")
        self.attrs = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in attrs.items()}
        try:
            self.ids = np.array(self._h5["ids"].asstr()[:], dtype=object)
        except UnicodeDecodeError as e:
            self._h5.close()
            raise SailError(f"{self.path} has ids that are not valid UTF-8 ({e.reason} at byte {e.start}); "
                            "the file is damaged: extract it again") from None
        self.fields = list(self._h5["features"].keys())
        self._row = None
        if check_ids:
            problem = id_problems(self.ids)
            if problem:
                self._h5.close()
                raise SailError(f"{self.path} has {problem}; the file is damaged or was written wrongly: "
                                "extract it again (`sail info` shows what else is wrong)")

    # ---------------------------------------------------------------- metadata
    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        return f"FeatureStore({str(self.path)!r}, n={len(self)}, fields={self.fields}, model={self.attrs.get('model_id')!r})"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        self._h5.close()

    @property
    def labels(self) -> np.ndarray | None:
        return self._h5["labels"][:] if "labels" in self._h5 else None

    @property
    def class_names(self) -> list[str] | None:
        if "labels" in self._h5 and "class_names" in self._h5["labels"].attrs:
            names = _attr_json(self._h5["labels"].attrs, "class_names", None)
            if not isinstance(names, list):
                raise SailError(f"{self.path}: the class names of its labels are damaged; extract the store again")
            return names
        return None

    @property
    def skipped(self) -> list[tuple[str, str, str]]:
        g = self._h5["skipped"]
        return list(zip(g["id"].asstr()[:], g["field"].asstr()[:], g["reason"].asstr()[:]))

    def dim(self, field: str) -> int:
        return self._dataset(field).shape[1]

    def valid(self, field: str) -> np.ndarray:
        self._dataset(field)
        return self._h5["valid"][field][:]

    def has_patch_tokens(self, field: str) -> bool:
        return "patch_tokens" in self._h5 and field in self._h5["patch_tokens"]

    def row_of(self, ids) -> np.ndarray:
        """Row index of each id; unknown ids -> SailError."""
        if self._row is None:
            self._row = {s: i for i, s in enumerate(self.ids)}
        try:
            return np.array([self._row[s] for s in ids], dtype=np.int64)
        except KeyError as e:
            raise SailError(f"id {e.args[0]!r} is not in {self.path}") from None

    # ---------------------------------------------------------------- data
    def _dataset(self, field: str, group: str = "features") -> h5py.Dataset:
        if group not in self._h5 or field not in self._h5[group]:
            have = self.fields if group == "features" else list(self._h5.get(group, {}).keys())
            raise SailError(f"{self.path} has no {group} field {field!r}; it has {', '.join(have) or 'none'}")
        return self._h5[group][field]

    def read(self, field: str, rows=None) -> np.ndarray:
        """Rows of one field as numpy (float16). rows: None (all), a slice, or indices in any order."""
        return _read_rows(self._dataset(field), rows)

    def read_patch_tokens(self, field: str, rows=None) -> np.ndarray:
        return _read_rows(self._dataset(field, "patch_tokens"), rows)

    def map_field(self, field: str) -> "MappedField | None":
        """The field mapped from the store file, for gathering rows straight from the page cache (the
        streamed loader), or None where the layout does not allow it (then use read_span_into / read_sorted_into)."""
        return _map_field(self, self._dataset(field))

    def read_span_into(self, field: str, lo: int, hi: int, out: np.ndarray) -> None:
        """Rows [lo, hi) of a field into out[:hi - lo] (float16, (hi - lo, D)), allocating nothing: plain
        preads at the chunk offsets HDF5 reports where the layout allows (`_chunk_offsets`), else h5py."""
        ds = self._dataset(field)
        layout = _chunk_offsets(self, ds)
        if layout is None:
            ds.read_direct(out, source_sel=np.s_[lo:hi], dest_sel=np.s_[0:hi - lo])
            return
        offsets, cr = layout
        starts = np.arange(lo // cr * cr, hi, cr)
        a, b = np.maximum(starts, lo), np.minimum(starts + cr, hi)
        _pread(self.path, out, offsets[starts // cr] + (a - starts) * ds.shape[1] * 2, a - lo, b - a)

    def read_sorted_into(self, field: str, rows: np.ndarray, out: np.ndarray) -> None:
        """Sorted unique rows of a field into out[:len(rows)]: one pread per run of consecutive rows (no
        whole chunks) where the layout allows, else the chunked h5py read of `read`."""
        ds = self._dataset(field)
        layout = _chunk_offsets(self, ds)
        if layout is None:
            out[:len(rows)] = _read_rows(ds, rows)
            return
        offsets, cr = layout
        first, at, length = _runs(rows, cr)
        _pread(self.path, out, offsets[first // cr] + (first % cr) * ds.shape[1] * 2, at, length)


_AHEAD = None  # one thread that asks the kernel to read the next buffer's pages (see MappedField.read_ahead)


@dataclass
class MappedField:
    """A field mapped from its store file. The field's row-chunks lie anywhere in the mapping (HDF5 puts
    metadata between them), so `rows` is a (L - D + 1, D) view with strides (1, 1) elements: row e of it is
    the D values starting at element e, and store row r is row `starts(r)` of it."""

    rows: np.ndarray
    mm: mmap.mmap
    skip: int                   # bytes from the start of the mapping to element 0
    start: int                  # file offset of the mapping
    file: object                # the open store file (for read_ahead's fadvise)
    chunk_elem: np.ndarray      # element offset of each row-chunk
    chunk_rows: int

    def starts(self, rows: np.ndarray) -> np.ndarray:
        return self.chunk_elem[rows // self.chunk_rows] + rows % self.chunk_rows * self.rows.shape[1]

    def _spans(self, rows: np.ndarray):
        """Byte ranges (from, to) of the file under store rows `rows`, one per run of nearby rows (gaps
        under 1 MiB), from page boundaries."""
        at = self.skip + 2 * np.sort(self.starts(np.asarray(rows)))  # byte offsets (np.unique: 50x slower)
        cut = np.flatnonzero(np.diff(at) > 2**20) + 1
        lo = at[np.concatenate([[0], cut])]
        hi = at[np.concatenate([cut - 1, [len(at) - 1]])] + 2 * self.rows.shape[1]
        return [(a - a % mmap.PAGESIZE, b) for a, b in zip(lo.tolist(), hi.tolist())]

    def read_ahead(self, rows: np.ndarray) -> None:
        """Start reading the pages under `rows` into the page cache (POSIX_FADV_WILLNEED) in a background
        thread: a store not in the page cache is then read in large requests while the previous buffer is
        gathered, not one page fault at a time. Costs some CPU even when the pages are cached."""
        global _AHEAD
        if len(rows) == 0 or not hasattr(os, "posix_fadvise"):
            return
        if _AHEAD is None:
            _AHEAD = ThreadPoolExecutor(1, thread_name_prefix="sail-readahead")
        fd, spans = self.file.fileno(), self._spans(rows)

        def work():
            with contextlib.suppress(OSError, ValueError):  # only a hint; a closed file is fine
                for a, b in spans:
                    os.posix_fadvise(fd, self.start + a, b - a, os.POSIX_FADV_WILLNEED)

        _AHEAD.submit(work)

    def release(self, rows: np.ndarray) -> None:
        """Unmap the pages under `rows` once gathered (MADV_DONTNEED; the page cache keeps them): the
        process's RSS stays near one buffer, not the whole store."""
        if len(rows) and hasattr(mmap, "MADV_DONTNEED"):
            for a, b in self._spans(rows):
                self.mm.madvise(mmap.MADV_DONTNEED, a, b - a)


def _map_field(store: FeatureStore, ds) -> MappedField | None:
    """The field mapped from the store file (uncompressed float16 row-chunks, see _chunk_offsets), or None
    (then it is read with preads or h5py).

    Gathering a batch straight from the mapping copies each byte once (page cache -> batch tensor) instead of
    twice (pread into a buffer, then the gather). The mapping is private (copy-on-write, never written) so
    the array is writable for torch.from_numpy; its pages are the page cache's own, nothing is copied.
    """
    layout = _chunk_offsets(store, ds)
    if layout is None or not hasattr(mmap.mmap, "madvise"):
        return None
    offsets, cr = layout
    n, d = ds.shape
    base = int(offsets.min())
    in_chunk = np.minimum(cr, n - np.arange(len(offsets)) * cr)  # rows held by each chunk
    end = int((offsets + in_chunk * d * 2).max())
    start = base - base % mmap.ALLOCATIONGRANULARITY
    if n == 0 or base % 2 or ((offsets - base) % 2).any():  # float16 elements must be aligned
        return None
    f = open(store.path, "rb")
    if f.seek(0, 2) < end:
        f.close()
        return None
    mm = mmap.mmap(f.fileno(), end - start, access=mmap.ACCESS_COPY, offset=start)
    flat = np.frombuffer(mm, dtype=np.float16, offset=base - start)
    rows = np.lib.stride_tricks.as_strided(flat, (len(flat) - d + 1, d), (2, 2))
    return MappedField(rows, mm, base - start, start, f, (offsets - base) // 2, cr)


def _first_line(e: BaseException) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0][:200]


def id_problems(ids: np.ndarray) -> str:
    """'' when ids are non-empty and unique, else what is wrong with examples: '247 empty ids (rows 3, 9, ...)'."""
    out = []
    empty = np.flatnonzero(ids == "")
    if len(empty):
        out.append(f"{len(empty)} empty id{'s' if len(empty) > 1 else ''} (rows {_examples(empty.tolist())})")
    if len(set(ids.tolist())) != len(ids):  # a set is O(N); np.unique on objects sorts in Python
        seen: dict[str, int] = {}
        for s in ids.tolist():
            seen[s] = seen.get(s, 0) + 1
        dups = [(s, n) for s, n in seen.items() if n > 1 and s != ""]
        if dups:
            extra = sum(n - 1 for _, n in dups)
            out.append(f"{extra} duplicate id row{'s' if extra > 1 else ''} "
                       f"({_examples([f'{s!r} x{n}' for s, n in dups])})")
    return " and ".join(out)


def _examples(items: list, k: int = 5) -> str:
    return ", ".join(str(x) for x in items[:k]) + (", ..." if len(items) > k else "")


def _read_rows(ds: h5py.Dataset, rows) -> np.ndarray:
    if rows is None:
        return ds[:]
    if isinstance(rows, slice):
        return ds[rows]
    rows = np.asarray(rows, dtype=np.int64)
    if rows.size == 0:
        return np.zeros((0,) + ds.shape[1:], dtype=ds.dtype)
    # h5py fancy indexing wants strictly increasing indices: read the unique sorted rows, then reorder.
    uniq, inverse = np.unique(rows, return_inverse=True)
    if uniq[-1] - uniq[0] + 1 <= 2 * len(uniq):  # dense enough: one contiguous read is faster
        block = ds[uniq[0]:uniq[-1] + 1]
        return block[rows - uniq[0]]
    if len(uniq) <= 256:  # a few rows: h5py's point selection is fine
        return ds[uniq][inverse]
    # Scattered rows: h5py fancy indexing is ~10x slower than reading the touched chunks whole and
    # picking rows in numpy (benchmarks/loader.py, streaming with small buffers).
    step = ds.chunks[0] if ds.chunks else 1024
    out = np.empty((len(uniq),) + ds.shape[1:], dtype=ds.dtype)
    starts = uniq // step * step
    for sel in np.split(np.arange(len(uniq)), np.flatnonzero(np.diff(starts)) + 1):
        lo = int(starts[sel[0]])
        out[sel] = ds[lo:min(lo + step, ds.shape[0])][uniq[sel] - lo]
    return out[inverse]


# ---------------------------------------------------------------- direct reads (the streamed loader's path)

_CHUNKS: dict[tuple, tuple[np.ndarray, int] | None] = {}  # (path, dataset, inode, size, mtime) -> layout
_POOL = None


def close_pools() -> None:
    """Shut down the read and read-ahead threads (started again on the next read): the end of a stream."""
    global _POOL, _AHEAD
    for pool in (_POOL, _AHEAD):
        if pool is not None:
            pool.shutdown(wait=True)
    _POOL = _AHEAD = None


def _chunk_offsets(store: FeatureStore, ds) -> tuple[np.ndarray, int] | None:
    """File byte offset of each row-chunk of an uncompressed, fully written, row-chunked float16 field
    (and the rows per chunk); None for any other layout (then h5py reads)."""
    st = store.path.stat()  # a store rewritten in place gets new offsets
    key = (str(store.path.resolve()), ds.name, st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _CHUNKS:
        found = None
        try:
            plist = ds.id.get_create_plist()
            n, d = ds.shape
            if (plist.get_layout() == h5py.h5d.CHUNKED and plist.get_nfilters() == 0 and ds.dtype == np.float16
                    and ds.chunks[1] == d and store._h5.driver == "sec2"):
                cr = ds.chunks[0]
                offsets = np.full(-(-n // cr), -1, dtype=np.int64)

                def visit(info):
                    offsets[info.chunk_offset[0] // cr] = info.byte_offset

                ds.id.chunk_iter(visit)
                found = (offsets, cr) if (offsets >= 0).all() else None
        except (AttributeError, TypeError, ValueError):  # older h5py/HDF5 without chunk_iter
            found = None
        _CHUNKS[key] = found
    return _CHUNKS[key]


def _pread(path, dest: np.ndarray, file_off: np.ndarray, dest_row: np.ndarray, rows: np.ndarray) -> None:
    """Copy runs of rows from the file into dest: run i is rows[i] rows at byte file_off[i], written at row
    dest_row[i]. Plain preads split over a few threads (pread releases the GIL): one kernel copy from the
    page cache per byte, no HDF5 overhead; both cores copy, since reading is most of a streamed batch's cost."""
    global _POOL
    from concurrent.futures import ThreadPoolExecutor

    parts = max(1, min(4, os.cpu_count() or 1))
    if _POOL is None:
        _POOL = ThreadPoolExecutor(parts, thread_name_prefix="sail-read")
    buf = memoryview(dest.reshape(-1).view(np.uint8))
    row_bytes = dest.shape[1] * dest.itemsize
    jobs = list(zip(file_off.tolist(), (dest_row * row_bytes).tolist(), (rows * row_bytes).tolist()))
    with open(path, "rb", buffering=0) as f:
        fd = f.fileno()

        def work(part):
            for off, at, size in part:
                while size:  # pread may return short counts
                    got = os.preadv(fd, [buf[at:at + size]], off)
                    if got <= 0:
                        raise OSError(f"{path}: short read at byte {off}")
                    off, at, size = off + got, at + got, size - got

        step = -(-len(jobs) // parts)
        list(_POOL.map(work, [jobs[i:i + step] for i in range(0, len(jobs), step)]))


def _runs(rows: np.ndarray, cr: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sorted unique rows -> runs of consecutive rows within one chunk: (first row, index of it in rows, length)."""
    cut = np.flatnonzero((np.diff(rows) != 1) | (rows[1:] // cr != rows[:-1] // cr)) + 1
    first = np.concatenate([[0], cut])
    return rows[first], first, np.diff(np.concatenate([first, [len(rows)]]))


def join(*stores: FeatureStore, fields: list[list[str]] | None = None) -> list[np.ndarray]:
    """Rows of the ids present (and valid in the given fields) in every store, in the first store's order.

    Stores are joined by sample id, never by row order. Returns one row-index array per store.
    """
    keep = None
    for k, s in enumerate(stores):
        ok = np.ones(len(s), dtype=bool)
        for f in (fields[k] if fields else []):
            ok &= s.valid(f)
        ids = set(s.ids[ok])
        keep = ids if keep is None else keep & ids
    if not keep:
        raise SailError("the stores share no valid sample ids: " + ", ".join(str(s.path) for s in stores)
                        + "; they must be extracted from the same data")
    first = stores[0]
    common = [i for i in first.ids if i in keep]
    return [s.row_of(common) for s in stores]


# ------------------------------------------------------------------------------------- writing


class StoreWriter:
    """Builds a store row block by row block in `<path>.partial`; `finish()` renames it into place.

    Nothing at `path` exists until every row is written and fsynced, so an interrupted write never
    leaves a file that looks complete. Blocks written in row order are hashed as they come (sha256 of the
    raw float16/bool bytes); any dataset written out of order is hashed by re-reading it at finish.
    """

    def __init__(self, path: Path, ids: list[str], dims: dict[str, int],
                 patch_shapes: dict[str, tuple[int, int]] | None = None, chunk_rows: int = 1024):
        self.path = Path(path)
        if self.path.is_dir():
            raise SailError(f"{self.path} is a directory; give a file path for the store (e.g. {self.path / 'features.h5'})")
        self.tmp = self.path.with_name(self.path.name + ".partial")
        try:
            self.h5 = h5py.File(self.tmp, "w")
        except OSError as e:
            raise SailError(f"cannot write {self.tmp} ({_first_line(e)}); check the folder exists and is writable") from None
        n = len(ids)
        self.h5.create_dataset("ids", data=np.array(ids, dtype=object), dtype=STRING)
        self._hash = {"ids": _hash_ids(np.asarray(ids, dtype=object))}
        self._next: dict[str, int] = {}  # dataset -> next row expected for streaming hashes
        self._nonfinite: dict[str, int] = {name: 0 for name in dims}
        rows = max(1, min(chunk_rows, n))
        for name, d in dims.items():
            self.h5.create_dataset(f"features/{name}", shape=(n, d), dtype=np.float16, chunks=(rows, d))
            self.h5.create_dataset(f"valid/{name}", shape=(n,), dtype=bool)
        for name, (p, d) in (patch_shapes or {}).items():
            self.h5.create_dataset(f"patch_tokens/{name}", shape=(n, p, d), dtype=np.float16,
                                   chunks=(max(1, min(64, n)), p, d))
        self.fields = list(dims)

    def write(self, start: int, features: dict[str, np.ndarray], valid: dict[str, np.ndarray],
              patch_tokens: dict[str, np.ndarray] | None = None) -> None:
        for name, x in features.items():
            x = x.astype(np.float16)
            self._put(f"features/{name}", start, x)
            self._put(f"valid/{name}", start, np.asarray(valid[name], dtype=bool))
            self._nonfinite[name] += int((~np.isfinite(x.reshape(len(x), -1))).any(1).sum())
        for name, x in (patch_tokens or {}).items():
            self._put(f"patch_tokens/{name}", start, x.astype(np.float16))

    def _put(self, key: str, start: int, x: np.ndarray) -> None:
        self.h5[key][start:start + len(x)] = x
        stream = self._hash.setdefault(key, _Stream())
        if stream is not None and self._next.get(key, 0) == start:
            stream.update(x)
            self._next[key] = start + len(x)
        else:
            self._hash[key] = None  # written out of order: hashed by re-reading at finish

    def finish(self, attrs: dict, labels: np.ndarray | None, class_names: list[str] | None,
               skipped: list[tuple[str, str, str]]) -> None:
        import os

        h5 = self.h5
        if labels is not None:
            d = h5.create_dataset("labels", data=np.asarray(labels, dtype=np.int64))
            if class_names is not None:
                d.attrs["class_names"] = json.dumps(class_names)
        for k, col in enumerate(("id", "field", "reason")):
            h5.create_dataset(f"skipped/{col}", data=np.array([s[k] for s in skipped], dtype=object), dtype=STRING)
        for k, v in attrs.items():
            h5.attrs[k] = v
        sums = {}
        for key in _checked(h5):
            stream = self._hash.get(key)
            streamed = stream is not None and key in h5 and self._next.get(key) == h5[key].shape[0]
            if streamed:
                sums[key] = stream.hexdigest()
            else:
                sums[key], bad = _digest(h5, key)
                if key.startswith("features/"):  # rows may have been rewritten: count them again
                    self._nonfinite[key[len("features/"):]] = bad
        h5.attrs["checksums"] = json.dumps(sums)
        h5.attrs["nonfinite_rows"] = json.dumps(self._nonfinite)
        h5.attrs["format"] = FORMAT
        h5.attrs["format_version"] = FORMAT_VERSION
        h5.attrs["fields"] = json.dumps(self.fields)
        h5.attrs["complete"] = True
        h5.close()
        with open(self.tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        self.h5.close()
        self.tmp.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------- integrity


class _Stream:
    """sha256 over consecutive row blocks of one dataset, as they are written."""

    def __init__(self):
        self.h = hashlib.sha256()

    def update(self, x: np.ndarray) -> None:
        self.h.update(np.ascontiguousarray(x).view(np.uint8).reshape(-1).data)

    def hexdigest(self) -> str:
        return "sha256:" + self.h.hexdigest()


def _hash_ids(ids: np.ndarray) -> str:
    """sha256 over (length, utf-8 bytes) of every id, so "ab","c" and "a","bc" differ."""
    h = hashlib.sha256()
    for s in ids.tolist():
        b = s.encode("utf-8", "surrogatepass")
        h.update(len(b).to_bytes(4, "little"))
        h.update(b)
    return "sha256:" + h.hexdigest()


CLASS_NAMES = "labels.class_names"  # checksum key of the class names (an attribute, not a dataset)


def _checked(h5: h5py.File) -> list[str]:
    """What a checksum covers: ids, per field its features, valid flags and patch tokens, the labels and
    their class names."""
    keys = ["ids"]
    for group in ("features", "valid", "patch_tokens"):
        if group in h5:
            keys += [f"{group}/{name}" for name in h5[group]]
    if "labels" in h5:
        keys.append("labels")
        if "class_names" in h5["labels"].attrs:
            keys.append(CLASS_NAMES)
    return keys


def _digest(h5: h5py.File, key: str, bar=None) -> tuple[str, int]:
    """_scan for a dataset key, or the sha256 of the class-names attribute."""
    if key == CLASS_NAMES:
        text = h5["labels"].attrs["class_names"]
        return "sha256:" + hashlib.sha256(text.encode() if isinstance(text, str) else bytes(text)).hexdigest(), 0
    return _scan(h5[key], bar)


def _attr_json(attrs, name: str, default):
    """A JSON attribute sail wrote; None when it is not JSON (the caller reports the damage)."""
    try:
        return json.loads(attrs.get(name, default))
    except (TypeError, ValueError):
        return None


def _block_rows(ds: h5py.Dataset) -> int:
    """Rows per read when scanning a dataset: whole chunks, about 64 MB at a time."""
    chunk = ds.chunks[0] if ds.chunks else 1024
    row_bytes = max(1, int(np.prod(ds.shape[1:], dtype=np.int64)) * ds.dtype.itemsize)
    return chunk * max(1, (64 << 20) // (chunk * row_bytes))


def _scan(ds: h5py.Dataset, bar=None) -> tuple[str, int]:
    """(checksum, rows holding a NaN or inf) of one dataset, read a block at a time."""
    if ds.name == "/ids":
        return _hash_ids(np.array(ds.asstr()[:], dtype=object)), 0
    h, step, bad = _Stream(), _block_rows(ds), 0
    for lo in range(0, ds.shape[0], step):
        block = ds[lo:lo + step]
        h.update(block)
        if block.dtype.kind == "f":
            bad += int((~np.isfinite(block.reshape(len(block), -1))).any(1).sum())
        if bar is not None:
            bar.update(block.nbytes)
    return h.hexdigest(), bad


def verify(path: str | Path, progress: bool = True) -> dict:
    """Re-read every dataset, recompute its checksum and non-finite rows, and compare with what finish wrote.

    Returns {"checksums": {key: "ok" | "MISMATCH" | "no checksum" | "MISSING"}, "nonfinite_rows": {field: n}}:
    every dataset (ids, features, valid flags, patch tokens, labels, class names) is compared, and a key the
    checksums or the `fields` attribute list that is no longer in the file is MISSING. A `checksums`
    attribute that is not JSON makes every key a MISMATCH of "checksums" itself.
    """
    from tqdm.auto import tqdm

    s = FeatureStore(path, check_ids=False)
    try:
        stored = _attr_json(s.attrs, "checksums", "{}")
        listed = _attr_json(s.attrs, "fields", "[]")
        keys = _checked(s._h5)
        total = sum(s._h5[k].size * s._h5[k].dtype.itemsize for k in keys if k not in ("ids", CLASS_NAMES))
        result: dict = {"checksums": {}, "nonfinite_rows": {}}
        if not isinstance(stored, dict):
            result["checksums"]["checksums"] = "MISMATCH"  # the attribute itself is damaged
            stored = {}
        for key in [*stored, *(f"features/{f}" for f in (listed if isinstance(listed, list) else []))]:
            if key not in keys:
                result["checksums"][key] = "MISSING"
        with tqdm(total=total, unit="B", unit_scale=True, desc="verify", disable=not progress,
                  dynamic_ncols=True, leave=False) as bar:
            for key in keys:
                got, bad = _digest(s._h5, key, bar)
                want = stored.get(key)
                result["checksums"][key] = "no checksum" if want is None else "ok" if got == want else "MISMATCH"
                if key.startswith("features/"):
                    result["nonfinite_rows"][key[len("features/"):]] = bad
    finally:
        s.close()
    return result


def describe(path: str | Path, check: dict | None = None) -> tuple[str, list[str]]:
    """What `sail info` prints (attributes, fields, labels, skipped, integrity), and the store's problems.

    check: the result of `verify(path)` to include (`sail info --verify`). A problem is a damaged store
    (empty or repeated ids, a checksum mismatch); non-finite rows are reported but are not a problem here.
    """
    with FeatureStore(path, check_ids=False) as s:
        lines = [f"{s.path}", f"  {'samples':<18} {len(s)}"]
        lines += [f"  {k:<18} {s.attrs[k]}" for k in sorted(s.attrs) if k not in ("checksums", "nonfinite_rows")]
        nonfinite = check["nonfinite_rows"] if check else _attr_json(s.attrs, "nonfinite_rows", "{}")
        nonfinite = nonfinite if isinstance(nonfinite, dict) else {}
        for f in s.fields:
            ds = s._dataset(f)
            n_valid = int(s.valid(f).sum())
            extra = f", patch tokens {s._dataset(f, 'patch_tokens').shape[1:]}" if s.has_patch_tokens(f) else ""
            bad = nonfinite.get(f)
            extra += f", {ds.shape[0] - n_valid} invalid, " + (f"{bad} non-finite" if bad is not None
                                                               else "non-finite not recorded (--verify counts)")
            lines.append(f"  field {f:<12} {ds.shape[0]} x {ds.shape[1]} {ds.dtype}, {n_valid} valid{extra}")
        if s.labels is not None:
            names = s.class_names
            lines.append(f"  {'labels':<18} {len(set(s.labels.tolist()) - {-1})} classes" + (f" ({', '.join(names[:5])}{', ...' if len(names) > 5 else ''})" if names else ""))
        skipped = s.skipped
        if skipped:
            reasons: dict[str, int] = {}
            for _, _, r in skipped:
                reasons[r] = reasons.get(r, 0) + 1
            lines.append(f"  {'skipped':<18} {len(skipped)}: " + "; ".join(f"{r} x{n}" for r, n in sorted(reasons.items())))
        problems = []
        ids = id_problems(s.ids)
        lines.append(f"  {'ids':<18} " + (f"PROBLEM: {ids}" if ids else "non-empty and unique"))
        if ids:
            problems.append(ids)
        if "checksums" not in s.attrs:
            lines.append(f"  {'checksums':<18} no checksum (written before sail stored them)")
        elif check is None:
            sums = _attr_json(s.attrs, "checksums", "{}")
            lines.append(f"  {'checksums':<18} " + (f"sha256 of {len(sums)} datasets; --verify compares them"
                                                  if isinstance(sums, dict) else "PROBLEM: the attribute is damaged"))
            if not isinstance(sums, dict):
                problems.append("its checksums attribute is damaged")
        else:
            states = check["checksums"]
            gone = [k for k, v in states.items() if v == "MISSING"]
            if gone:
                lines.append(f"  {'missing':<18} {', '.join(gone)} (listed by the store, not in the file)")
                problems.append(f"{', '.join(gone)} missing")
            wrong = [k for k, v in states.items() if v == "MISMATCH"]
            missing = sum(v == "no checksum" for v in states.values())
            lines.append(f"  {'checksums':<18} " + (f"MISMATCH in {', '.join(wrong)}" if wrong else
                                                  f"{sum(v == 'ok' for v in states.values())} ok"
                                                  + (f", {missing} without checksum" if missing else "")))
            if wrong:
                problems.append(f"checksum mismatch in {', '.join(wrong)}")
    return "\n".join(lines), problems
