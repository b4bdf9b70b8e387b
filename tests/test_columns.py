"""sail.data.columns.TextColumn: an Arrow-backed column reads exactly like the Python list it replaces."""

import os
import pickle
import random

import numpy as np
import pyarrow as pa
import pytest

from sail.data import columns
from sail.data.columns import TextColumn


def _chunked(values, rng):
    """`values` as a ChunkedArray cut at random places (CSV/Parquet reads give many chunks)."""
    cuts = sorted(rng.sample(range(1, len(values)), min(len(values) - 1, rng.randint(0, 5)))) if len(values) > 1 else []
    bounds = [0, *cuts, len(values)]
    return pa.chunked_array([pa.array(values[a:b], pa.string()) for a, b in zip(bounds, bounds[1:])], pa.string())


def test_text_column_reads_like_the_list_it_replaces(monkeypatch):
    """Property: over random contents, chunkings, indices and slices, a TextColumn gives what the list gives."""
    rng = random.Random(0)
    for trial in range(1500):
        monkeypatch.setattr(columns, "_SLICE_ROWS", rng.randint(1, 7))  # iteration crosses its slices
        n = rng.randint(0, 25)
        raw = [None if rng.random() < 0.2 else rng.choice(["", "a", "café ☕", "b c", "img/1.png", "/abs/x.jpg"])
               for _ in range(n)]
        arr = _chunked(raw, rng) if n else pa.chunked_array([], pa.string())
        missing = rng.choice([None, ""])
        folder = rng.choice([None, "/data/m"])
        if folder is None:
            want = [missing if v is None else v for v in raw]
        else:
            want = [missing if not v else v if v.startswith("/") else os.path.join(folder, v) for v in raw]
        col = TextColumn(arr, missing=missing, folder=folder)
        assert len(col) == n and list(col) == want and col == want and col.to_list() == want
        assert bool(col) == bool(want)
        for _ in range(10):
            if n:
                i = rng.randrange(-n, n)
                assert col[i] == want[i] and col[np.int64(i)] == want[i]
            a, b = rng.randint(-n - 2, n + 2), rng.randint(-n - 2, n + 2)
            step = rng.choice([None, 1, 2, 3, -1, -2])
            assert col[a:b:step] == want[a:b:step], (trial, a, b, step)
        for bad in (n, -n - 1, n + 5):
            with pytest.raises(IndexError):
                col[bad]
        probe = rng.choice(want) if want else "zzz"
        assert (probe in col) == (probe in want)
        if probe in want:
            assert col.index(probe) == want.index(probe) and col.count(probe) == want.count(probe)
        got = np.asarray(col)
        assert got.dtype == object and got.shape == (n,) and got.tolist() == want
        assert list(reversed(col)) == want[::-1]


def test_equality_and_what_it_is_not():
    col = TextColumn(pa.array(["a", "b"]))
    assert col == ["a", "b"] and ["a", "b"] == col and col == TextColumn(pa.array(["a", "b"]))
    assert col != ["a", "c"] and col != ["a"] and col != ("a", "b") and col != "ab"
    assert not isinstance(col, list) and not isinstance(col, str)
    with pytest.raises(TypeError):
        hash(col)
    with pytest.raises(TypeError, match="holds strings, not int64"):
        TextColumn(pa.array([1, 2]))
    assert "2 rows" in repr(col)


def test_nulls_column_costs_nothing_per_row():
    col = TextColumn.nulls(10_000_000)
    assert len(col) == 10_000_000 and col[123] is None and col[-1] is None and col.nbytes == 0
    assert col[:3] == [None, None, None]


def test_pickles_for_spawned_workers():
    col = TextColumn(pa.chunked_array([pa.array(["x", None]), pa.array(["rel/p.png"])]), missing=None, folder="/m")
    back = pickle.loads(pickle.dumps(col))
    assert back == col == ["/m/x", None, "/m/rel/p.png"]


def test_memory_is_the_text_bytes_not_python_strings(tmp_path):
    """A manifest's columns hold their UTF-8 bytes plus one 4-byte offset per row, not a str object each."""
    from sail.data import open_dataset

    n = 20_000
    ids = [f"{i:07d}" for i in range(n)]
    caps = [f"caption {i} of a photo" for i in range(n)]
    (tmp_path / "m.csv").write_text("id,image,caption\n" + "".join(f"{a},img/{a}.jpg,{c}\n" for a, c in zip(ids, caps)))
    ds = open_dataset(str(tmp_path / "m.csv"))
    for col, values in ((ds.ids, ids), (ds.captions["caption"], caps)):
        assert isinstance(col, TextColumn)
        text = sum(len(v.encode()) for v in values)
        per_chunk = 64 * col.arrow.num_chunks  # each chunk's offsets hold one extra entry, buffers are padded
        assert text <= col.nbytes <= text + 4 * (n + 1) + per_chunk
    # a list of the same ids: ~57 bytes per str object + 8 per slot, against 7 + 4 here
    assert ds.ids.nbytes < 0.25 * sum(len(v) + 49 + 8 for v in ids)
    assert ds.images[5] == str(tmp_path / "img" / f"{ids[5]}.jpg")
