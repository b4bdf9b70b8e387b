"""FeatureStore: reads in any row order, joins by id, refuses incomplete or foreign files."""

import json

import h5py
import numpy as np
import pytest

from sail.core.errors import SailError
from sail.data.store import FeatureStore, StoreWriter, join
from synthetic import write_store


def test_read_rows_in_any_order_matches_numpy(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5000, 8)).astype(np.float16)
    path = write_store(tmp_path / "s.h5", [f"i{k}" for k in range(5000)], {"image": x}, "image", "m")
    with FeatureStore(path) as s:
        for rows in (None, slice(10, 20), [3, 1, 3, 2], rng.choice(5000, 40, replace=False),
                     rng.choice(5000, 900, replace=False), np.arange(4000, 1000, -7), []):
            want = x if rows is None else x[rows] if isinstance(rows, slice) else x[np.asarray(rows, dtype=int)]
            assert np.array_equal(s.read("image", rows), want)


@pytest.mark.parametrize("direct", [True, False])
def test_direct_reads_match_h5py(tmp_path, monkeypatch, direct):
    # direct: plain preads at the chunk offsets HDF5 reports (1024-row chunks here); else h5py. Spans and
    # runs of rows that start, end and cross chunks anywhere, written into a larger reused array.
    import sail.data.store

    rng = np.random.default_rng(2)
    n = 3000
    x = rng.standard_normal((n, 6)).astype(np.float16)
    store = FeatureStore(write_store(tmp_path / "s.h5", [f"i{k}" for k in range(n)], {"image": x}, "image", "m"))
    with h5py.File(store.path) as f:
        reference = f["features/image"][:]  # plain h5py
    if direct:
        assert sail.data.store._chunk_offsets(store, store._dataset("image"))[1] == 1024
    else:
        monkeypatch.setattr(sail.data.store, "_chunk_offsets", lambda store, ds: None)
    out = np.full((n + 5, 6), np.nan, np.float16)
    for _ in range(400):
        lo = int(rng.integers(0, n))
        hi = int(rng.integers(lo + 1, n + 1))
        store.read_span_into("image", lo, hi, out)
        assert np.array_equal(out[:hi - lo], reference[lo:hi]) and np.isnan(out[hi - lo:]).all()
        out[:] = np.nan
        rows = np.unique(rng.integers(0, n, int(rng.integers(1, 600))) if rng.random() < 0.5
                         else np.arange(lo, hi)[rng.random(hi - lo) < 0.7])
        if len(rows):
            store.read_sorted_into("image", rows, out)
            assert np.array_equal(out[:len(rows)], reference[rows]) and np.isnan(out[len(rows):]).all()
            out[:] = np.nan


def test_join_by_id_not_row_order(tmp_path):
    ids = [f"id{k}" for k in range(50)]
    a = write_store(tmp_path / "a.h5", ids, {"image": np.arange(50, dtype=np.float16)[:, None].repeat(2, 1)}, "image", "m")
    order = np.random.default_rng(1).permutation(50)[:40]
    valid = np.ones(40, bool)
    valid[0] = False  # one caption skipped: that id must drop out of the join
    b = write_store(tmp_path / "b.h5", [ids[k] for k in order],
                    {"caption": order.astype(np.float16)[:, None].repeat(3, 1)}, "text", "t", valid={"caption": valid})
    with FeatureStore(a) as sa, FeatureStore(b) as sb:
        ra, rb = join(sa, sb, fields=[["image"], ["caption"]])
        assert len(ra) == 39
        assert np.array_equal(sa.read("image", ra)[:, 0], sb.read("caption", rb)[:, 0])
        assert list(sa.ids[ra]) == list(sb.ids[rb])


def test_incomplete_and_foreign_files_are_refused(tmp_path):
    w = StoreWriter(tmp_path / "x.h5", ["a"], {"image": 2})
    w.write(0, {"image": np.zeros((1, 2))}, {"image": np.ones(1, bool)})
    w.h5.close()  # simulate a crash before finish(): only the .partial file exists
    with pytest.raises(SailError, match="not found"):
        FeatureStore(tmp_path / "x.h5")
    with h5py.File(tmp_path / "y.h5", "w") as f:
        f["data"] = np.zeros(3)
    with pytest.raises(SailError, match="not a sail feature store"):
        FeatureStore(tmp_path / "y.h5")
    path = write_store(tmp_path / "z.h5", ["a"], {"image": np.zeros((1, 2), np.float16)}, "image", "m")
    with FeatureStore(path) as s, pytest.raises(SailError, match="no features field 'caption'"):
        s.read("caption")


# ------------------------------------------------------------------------------------- integrity


def _damage_ids(path, rows, value=b""):
    with h5py.File(path, "r+") as f:
        ids = f["ids"][:]
        ids[rows] = value
        f["ids"][:] = ids


def test_store_with_empty_or_repeated_ids_does_not_open(tmp_path, capsys):
    from sail.cli import main

    path = write_store(tmp_path / "s.h5", [f"i{k}" for k in range(1000)],
                       {"image": np.ones((1000, 4), np.float16)}, "image", "m")
    _damage_ids(path, slice(3, 250))  # the reported corruption: 247 ids became ""
    with pytest.raises(SailError, match=r"247 empty ids \(rows 3, 4, 5, 6, 7, \.\.\.\)"):
        FeatureStore(path)
    assert main(["info", str(path)]) == 2
    out, err = capsys.readouterr()
    assert "PROBLEM: 247 empty ids" in out
    assert err.startswith("error:") and len(err.strip().splitlines()) == 1 and "247 empty ids" in err

    dup = write_store(tmp_path / "d.h5", ["a", "b", "c", "d"], {"image": np.ones((4, 2), np.float16)}, "image", "m")
    _damage_ids(dup, [2, 3], b"a")
    with pytest.raises(SailError, match=r"2 duplicate id rows \('a' x3\)"):
        FeatureStore(dup)
    with FeatureStore(dup, check_ids=False) as s:  # `sail info` still reads it to say what is wrong
        assert list(s.ids) == ["a", "b", "a", "a"]


def test_id_problems_against_a_plain_count():
    from sail.data.store import id_problems

    rng = np.random.default_rng(0)
    for _ in range(2000):
        n = int(rng.integers(1, 12))
        ids = np.array([str(x) if x else "" for x in rng.integers(0, 8, n)], dtype=object)
        empty = int((ids == "").sum())
        extra = sum(c - 1 for s, c in zip(*np.unique(ids[ids != ""], return_counts=True)) if c > 1)
        got = id_problems(ids)
        assert (got == "") == (empty == 0 and extra == 0)
        assert (f"{empty} empty id" in got) == (empty > 0)
        assert (f"{extra} duplicate id row" in got) == (extra > 0)


def test_checksums_are_sha256_of_raw_bytes_and_catch_changes(tmp_path, capsys):
    import hashlib

    from sail.cli import main
    from sail.data.store import verify

    rng = np.random.default_rng(1)
    x = rng.standard_normal((300, 6)).astype(np.float16)
    valid = rng.random(300) > 0.1
    path = write_store(tmp_path / "s.h5", [f"i{k}" for k in range(300)], {"image": x}, "image", "m",
                       valid={"image": valid})
    with FeatureStore(path) as s:
        sums = json.loads(s.attrs["checksums"])
    assert sums["features/image"] == "sha256:" + hashlib.sha256(x.tobytes()).hexdigest()
    assert sums["valid/image"] == "sha256:" + hashlib.sha256(valid.tobytes()).hexdigest()
    assert set(sums) == {"ids", "features/image", "valid/image"}
    assert verify(path, progress=False)["checksums"] == {k: "ok" for k in sums}
    assert main(["info", str(path), "--verify"]) == 0
    assert "3 ok" in capsys.readouterr().out

    with h5py.File(path, "r+") as f:  # one flipped value the id checks cannot see
        f["features/image"][123, 4] = -f["features/image"][123, 4]
    assert verify(path, progress=False)["checksums"]["features/image"] == "MISMATCH"
    assert main(["info", str(path)]) == 0  # without --verify nothing is re-read
    capsys.readouterr()
    assert main(["info", str(path), "--verify"]) == 2
    out, err = capsys.readouterr()
    assert "MISMATCH in features/image" in out
    assert [line for line in err.splitlines() if line.startswith("error:")] == [
        f"error: {path} is damaged: checksum mismatch in features/image; extract it again"]


def test_checksum_does_not_depend_on_write_order(tmp_path):
    """Blocks written in any order (re-read at finish) give the checksum of rows written in order."""
    rng = np.random.default_rng(2)
    for trial in range(20):
        n = int(rng.integers(1, 60))
        x = rng.standard_normal((n, 3)).astype(np.float16)
        x[rng.random(n) < 0.1, 1] = np.inf
        cuts = np.unique(np.r_[0, np.sort(rng.integers(0, n, int(rng.integers(0, 5)))), n])
        blocks = list(zip(cuts[:-1], cuts[1:]))
        if trial % 2:
            rng.shuffle(blocks)
        w = StoreWriter(tmp_path / f"s{trial}.h5", [f"i{k}" for k in range(n)], {"f": 3}, chunk_rows=7)
        for lo, hi in blocks:
            w.write(int(lo), {"f": x[lo:hi]}, {"f": np.ones(hi - lo, bool)})
        w.finish({}, None, None, [])
        ref = write_store(tmp_path / f"r{trial}.h5", [f"i{k}" for k in range(n)], {"f": x}, "image", "m")
        with FeatureStore(w.path) as a, FeatureStore(ref) as b:
            assert a.attrs["checksums"] == b.attrs["checksums"]
            assert json.loads(a.attrs["nonfinite_rows"]) == {"f": int(np.isinf(x).any(1).sum())}


def test_non_finite_rows_are_counted_and_reported(tmp_path, capsys):
    from sail.cli import main

    x = np.ones((50, 4), np.float16)
    x[[3, 9], 0] = np.nan
    x[9, 2] = np.inf
    x[40, 1] = -np.inf
    path = write_store(tmp_path / "s.h5", [f"i{k}" for k in range(50)], {"image": x}, "image", "m",
                       valid={"image": np.arange(50) % 10 != 0})
    assert main(["info", str(path)]) == 0
    assert "field image        50 x 4 float16, 45 valid, 5 invalid, 3 non-finite" in capsys.readouterr().out


def test_store_written_before_checksums_still_opens(tmp_path, capsys):
    from sail.cli import main
    from sail.data.store import verify

    path = write_store(tmp_path / "old.h5", ["a", "b"], {"image": np.ones((2, 2), np.float16)}, "image", "m")
    with h5py.File(path, "r+") as f:
        del f.attrs["checksums"], f.attrs["nonfinite_rows"]
    with FeatureStore(path) as s:
        assert len(s) == 2
    assert set(verify(path, progress=False)["checksums"].values()) == {"no checksum"}
    assert main(["info", str(path), "--verify"]) == 0
    out = capsys.readouterr().out
    assert "no checksum" in out and "0 non-finite" in out
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "no checksum" in out and "non-finite not recorded" in out


def test_directory_or_garbage_path_is_one_line(tmp_path):
    with pytest.raises(SailError, match="is a directory") as e:
        FeatureStore(tmp_path)
    (tmp_path / "g.h5").write_bytes(b"not hdf5")
    with pytest.raises(SailError, match="not a readable HDF5") as e:
        FeatureStore(tmp_path / "g.h5")
    assert "\n" not in str(e.value)
    with pytest.raises(SailError, match="is a directory"):
        StoreWriter(tmp_path, ["a"], {"image": 2})
