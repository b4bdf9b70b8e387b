"""FeatureStore: reads in any row order, joins by id, refuses incomplete or foreign files."""

import h5py
import numpy as np
import pytest

from sail.errors import SailError
from sail.store import FeatureStore, StoreWriter, join
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
