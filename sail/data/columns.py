"""Read-only text columns backed by Arrow: a 10M-row manifest costs about its bytes, not 10M Python strings.

`sail.data.open_manifest` returns its ids, image paths and captions as `TextColumn`s over the pyarrow
arrays it read. A row becomes a Python `str` only when it is read:

    col = TextColumn(table.column("caption"), missing="")
    col[3]              # one row, a str ("" where the cell is null)
    col[100:200]        # one batch, a list[str]
    for text in col:    # materialised a slice at a time
    np.asarray(col)     # (N,) object array, e.g. for h5py

A TextColumn is a `collections.abc.Sequence` (len, indexing, iteration, `in`, `.index`), and compares
equal to a list holding the same items, so code written for lists reads it unchanged; code that asks
"one item or many?" should test `isinstance(x, (str, PIL.Image.Image))`, not `isinstance(x, list)`.

Why not lists: a Python str costs ~49 bytes of header plus an 8-byte list slot, so short fields (ids,
paths) cost 5-10x their bytes; and DataLoader workers forked from a process holding millions of
Python objects copy their pages as soon as they touch a refcount, while Arrow buffers are never written.
"""

from __future__ import annotations

import operator
import os
from collections.abc import Sequence

import numpy as np

_SLICE_ROWS = 65536  # rows materialised at a time while iterating


class TextColumn(Sequence):
    """N strings in a pyarrow (Chunked)Array of string or null type.

    missing: what a null row reads as (None for optional image paths, "" for captions).
    folder: for a column of file paths: relative paths are joined to it when read, and "" reads as
    `missing` like a null.
    """

    def __init__(self, values, missing: str | None = None, folder: str | None = None):
        import pyarrow as pa

        if isinstance(values, pa.Array):
            values = pa.chunked_array([values], type=values.type)
        if not (pa.types.is_string(values.type) or pa.types.is_large_string(values.type) or pa.types.is_null(values.type)):
            raise TypeError(f"TextColumn holds strings, not {values.type}")
        self.arrow = values  # the raw values (paths unjoined); pyarrow.ChunkedArray
        self.missing, self.folder = missing, folder

    @classmethod
    def nulls(cls, n: int, missing: str | None = None) -> "TextColumn":
        """n rows that all read as `missing` (a manifest without an image column); no memory per row."""
        import pyarrow as pa

        return cls(pa.nulls(n), missing)

    def __len__(self) -> int:
        return len(self.arrow)

    def _convert(self, values: list) -> list:
        if self.folder is None:
            if self.missing is None or not self.arrow.null_count:
                return values
            return [self.missing if v is None else v for v in values]
        folder, missing = self.folder, self.missing
        return [missing if not v else v if v.startswith(os.sep) else os.path.join(folder, v) for v in values]

    def __getitem__(self, i):
        n = len(self)
        if isinstance(i, slice):
            start, stop, step = i.indices(n)
            if step == 1:
                return self._convert(self.arrow.slice(start, max(0, stop - start)).to_pylist())
            return self._convert([self.arrow[k].as_py() for k in range(start, stop, step)])
        k = operator.index(i)  # numpy integers too
        if k < 0:
            k += n
        if not 0 <= k < n:
            raise IndexError(f"row {i} is outside a column of {n} rows")
        return self._convert([self.arrow[k].as_py()])[0]

    def __iter__(self):
        for start in range(0, len(self), _SLICE_ROWS):
            yield from self[start:start + _SLICE_ROWS]

    def to_list(self) -> list:
        return self[:]

    def __array__(self, dtype=None, copy=None):
        out = np.empty(len(self), dtype=object)  # filled, not np.array(list): strings never become a char dtype
        for start in range(0, len(self), _SLICE_ROWS):
            chunk = self[start:start + _SLICE_ROWS]
            out[start:start + len(chunk)] = chunk
        return out if dtype is None or np.dtype(dtype) == object else out.astype(dtype)

    def __eq__(self, other):
        if not isinstance(other, (list, TextColumn)):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other))

    __hash__ = None  # mutable-sequence semantics, like list

    @property
    def nbytes(self) -> int:
        """Bytes held by the Arrow buffers (offsets, validity and text)."""
        return self.arrow.nbytes

    def __repr__(self) -> str:
        head = self[:3]
        return f"TextColumn({len(self)} rows: {', '.join(map(repr, head))}{', ...' if len(self) > 3 else ''})"
