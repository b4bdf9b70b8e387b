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
                            created, fields, complete

    store = FeatureStore("features/sample/dinov2-s.h5")
    store.ids, store.fields, store.attrs, store.labels
    x = store.read("image", rows=[0, 5, 7])        # (3, D) float16 numpy
    rows_a, rows_b = join(store_a, store_b)        # rows of the ids both hold, in the same order
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np

from sail.errors import SailError

FORMAT = "sail-features"
FORMAT_VERSION = 1
STRING = h5py.string_dtype("utf-8")


class FeatureStore:
    """Read-only view of a finished store. Rows are read lazily; nothing is loaded up front but ids."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.exists():
            raise SailError(f"feature store {self.path} not found; create it with `sail extract`")
        try:
            self._h5 = h5py.File(self.path, "r")
        except OSError as e:
            raise SailError(f"{self.path} is not a readable HDF5 feature store ({e})") from None
        attrs = dict(self._h5.attrs)
        if attrs.get("format") != FORMAT:
            self._h5.close()
            raise SailError(f"{self.path} is not a sail feature store (no format={FORMAT!r} attribute)")
        if not attrs.get("complete", False):
            self._h5.close()
            raise SailError(f"{self.path} is incomplete; rerun the `sail extract` command that made it")
        self.attrs = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in attrs.items()}
        self.ids = np.array(self._h5["ids"].asstr()[:], dtype=object)
        self.fields = list(self._h5["features"].keys())
        self._row = None

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
            return json.loads(self._h5["labels"].attrs["class_names"])
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
    leaves a file that looks complete.
    """

    def __init__(self, path: Path, ids: list[str], dims: dict[str, int],
                 patch_shapes: dict[str, tuple[int, int]] | None = None, chunk_rows: int = 1024):
        self.path = Path(path)
        self.tmp = self.path.with_name(self.path.name + ".partial")
        self.h5 = h5py.File(self.tmp, "w")
        n = len(ids)
        self.h5.create_dataset("ids", data=np.array(ids, dtype=object), dtype=STRING)
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
            self.h5["features"][name][start:start + len(x)] = x.astype(np.float16)
            self.h5["valid"][name][start:start + len(x)] = valid[name]
        for name, x in (patch_tokens or {}).items():
            self.h5["patch_tokens"][name][start:start + len(x)] = x.astype(np.float16)

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


def describe(path: str | Path) -> str:
    """Everything `sail info` prints: attributes, fields with shapes, labels, skipped counts."""
    s = FeatureStore(path)
    lines = [f"{s.path}", f"  {'samples':<18} {len(s)}"]
    for k in sorted(s.attrs):
        v = s.attrs[k]
        lines.append(f"  {k:<18} {v}")
    for f in s.fields:
        ds = s._dataset(f)
        n_valid = int(s.valid(f).sum())
        extra = f", patch tokens {s._dataset(f, 'patch_tokens').shape[1:]}" if s.has_patch_tokens(f) else ""
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
    s.close()
    return "\n".join(lines)
