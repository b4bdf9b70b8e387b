"""sail.data.loader: the streamed batch plan (property test, no I/O), streamed and in-memory batches from real stores."""

import numpy as np
import pytest
import torch

from sail.core.errors import SailError
from sail.data.loader import MemoryBatches, PairedFeatures, StreamingBatches, StreamPlan, epoch_permutation
from sail.data.store import FeatureStore
from synthetic import paired_stores


def _local_batches(plan: StreamPlan, epoch: int, start: int, rank: int, world: int) -> list[np.ndarray]:
    """What a rank receives: its pieces concatenated and cut every B/W rows."""
    pieces = list(plan.pieces(epoch, start, rank, world))
    got = np.concatenate([take for _, take, _ in pieces]) if pieces else np.zeros(0, np.int64)
    done = [d for _, _, d in pieces]
    assert done == list(np.cumsum([0] + [len(t) for _, t, _ in pieces])[:-1])
    local = plan.batch // world
    assert len(got) % local == 0
    return [got[i:i + local] for i in range(0, len(got), local)]


def test_plan_properties_over_thousands_of_shapes():
    rng = np.random.default_rng(0)
    checked = 0
    for _ in range(2000):
        n = int(rng.integers(2, 700))
        world = int(rng.choice([1, 1, 2, 3, 4]))
        batch = world * int(rng.integers(1, max(2, n // world) + 1))
        if batch < 2 or batch > n:
            continue
        block, buffers = int(rng.integers(max(1, n // 30), 300)), int(rng.integers(1, 6))  # <= 30 blocks: fast
        seed, epoch = int(rng.integers(0, 1000)), int(rng.integers(0, 50))
        plan = StreamPlan(n, batch, block, buffers, seed)
        S = plan.steps_per_epoch
        assert S == n // batch
        order = plan.order(epoch)
        # the epoch's stream is a permutation of all pairs, the same for a fresh plan (pure function)
        assert np.array_equal(np.sort(order), np.arange(n))
        assert np.array_equal(order, StreamPlan(n, batch, block, buffers, seed).order(epoch))
        # each buffer is the union of at most `buffers` whole blocks (contiguous store reads)
        for rows in plan.buffers(epoch):
            assert len(set((rows // block).tolist())) <= buffers
        # every rank, resumed at any step, gets exactly its columns of the remaining global batches
        start = int(rng.integers(0, S + 1))
        for rank in range(world):
            got = _local_batches(plan, epoch, start, rank, world)
            assert len(got) == S - start
            lo = rank * (batch // world)
            want = order[:S * batch].reshape(S, batch)[start:, lo:lo + batch // world]  # (S - start, B/W)
            assert np.array_equal(np.array(got).reshape(want.shape), want)
        checked += 1
    assert checked > 1300


def test_every_epoch_has_the_same_length_where_the_old_plan_hung():
    # 336,200 pairs, batch 12288, seed 1: the old plan gave 27 batches in epoch 0 but 26 in epoch 2
    # (the short last block landing in another buffer), and `sail align` spun forever at step 80 of 81.
    plan = StreamPlan(336_200, 12288, 65536, 4, seed=1)
    for epoch in range(10):
        pieces = list(plan.pieces(epoch))
        assert sum(len(t) for _, t, _ in pieces) == 27 * 12288 == plan.steps_per_epoch * 12288


def test_orders_differ_between_epochs_and_seeds():
    plan = StreamPlan(5000, 100, 256, 2, seed=0)
    assert not np.array_equal(plan.order(0), plan.order(1))
    assert not np.array_equal(plan.order(0), StreamPlan(5000, 100, 256, 2, seed=1).order(0))


@pytest.fixture
def pairs(tmp_path):
    img, txt = paired_stores(tmp_path, n=611)  # text rows stored in another order than the image rows
    return PairedFeatures.from_stores(FeatureStore(img), FeatureStore(txt), ["caption"])


def _rows_of(pairs):
    """Pair index of every image row, and the full feature tables (the reference)."""
    image_all, texts_all = pairs.load()
    lookup = {tuple(r.tolist()): k for k, r in enumerate(image_all)}
    return lookup, image_all, texts_all[0]


def test_streamed_batches_follow_the_plan_for_every_epoch(pairs):
    # n = 611, B = 96, blocks of 256, 2 per buffer, seed 1: the old loader yielded 6 batches in epoch 0
    # and 5 in epoch 1.
    stream = StreamingBatches(pairs, batch=96, seed=1, block_rows=256, buffer_blocks=2)
    lookup, image_all, text_all = _rows_of(pairs)
    for epoch in range(4):
        batches = list(stream.epoch(epoch))
        assert len(batches) == stream.steps_per_epoch == 6
        order = stream.plan.order(epoch)
        for s, (x, (y,)) in enumerate(batches):
            idx = torch.from_numpy(order[s * 96:(s + 1) * 96])
            assert torch.equal(x, image_all[idx]) and torch.equal(y, text_all[idx])  # joined by id
    assert stream.reader_starts == 1  # one reader thread ran through all four epochs
    stream.close()


def test_streamed_resume_and_ranks(pairs):
    stream = StreamingBatches(pairs, batch=96, seed=1, block_rows=100, buffer_blocks=3)
    full = list(stream.epoch(2))
    for start in (0, 1, 3, 5):
        resumed = list(StreamingBatches(pairs, batch=96, seed=1, block_rows=100, buffer_blocks=3).epoch(2, start))
        assert len(resumed) == 6 - start
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1][0], b[1][0]) for a, b in zip(full[start:], resumed))
    # two ranks: each holds half of every global batch; together they are the single process's batches
    ranks = [list(StreamingBatches(pairs, batch=96, seed=1, block_rows=100, buffer_blocks=3, rank=r, world=2).epoch(2, 1))
             for r in range(2)]
    for s, (a, b) in enumerate(zip(*ranks), start=1):
        assert a[0].shape == (48, 48)
        assert torch.equal(torch.cat([a[0], b[0]]), full[s][0]) and torch.equal(torch.cat([a[1][0], b[1][0]]), full[s][1][0])


def test_stream_restarts_only_when_asked_for_another_position(pairs):
    stream = StreamingBatches(pairs, batch=96, seed=1, block_rows=256, buffer_blocks=2)
    it = stream.epoch(0)
    first = [next(it) for _ in range(2)]
    it.close()  # the trainer stopped after two batches
    rest = list(stream.epoch(0, 2)) + list(stream.epoch(1))
    assert stream.reader_starts == 1
    again = list(stream.epoch(0, 1))  # a jump back restarts the reader at the asked position
    assert stream.reader_starts == 2 and torch.equal(again[0][0], first[1][0]) and len(rest) == 10
    stream.close()


def test_memory_batches_ranks_share_the_global_sequence():
    image, text = torch.randn(203, 4), torch.randn(203, 3)
    one = list(MemoryBatches(image, [text], 40, seed=5).epoch(3, 1))
    perm = epoch_permutation(203, 5, 3)
    assert len(one) == 4 and torch.equal(one[0][0], image[perm[40:80]])
    two = [list(MemoryBatches(image, [text], 40, seed=5, rank=r, world=2).epoch(3, 1)) for r in range(2)]
    for (a, b), full in zip(zip(*two), one):
        assert torch.equal(torch.cat([a[0], b[0]]), full[0]) and torch.equal(torch.cat([a[1][0], b[1][0]]), full[1][0])


def test_reader_errors_reach_the_trainer(pairs, monkeypatch):
    import sail.data.loader as loader

    def broken(*a, **k):
        raise OSError("disk gone")

    monkeypatch.setattr(loader, "_read_source", broken)
    with pytest.raises(OSError, match="disk gone"):
        list(StreamingBatches(pairs, batch=96).epoch(0))


def test_bad_batch_sizes(pairs):
    for batch, world in [(1, 1), (0, 1), (700, 1), (97, 2)]:
        with pytest.raises(SailError, match="batch"):
            StreamingBatches(pairs, batch=batch, world=world)


def test_reused_batch_tensors_hold_the_same_batches(pairs):
    # reuse=True recycles prefetch + 2 tensors: each batch is valid until the next one is requested
    fresh = list(StreamingBatches(pairs, batch=64, seed=2, block_rows=100, buffer_blocks=2).epoch(0))
    stream = StreamingBatches(pairs, batch=64, seed=2, block_rows=100, buffer_blocks=2, reuse=True, prefetch=1)
    held = []
    for x, (y,) in stream.epoch(0):
        held.append(x)
        assert torch.equal(x, fresh[len(held) - 1][0]) and torch.equal(y, fresh[len(held) - 1][1][0])
    assert len({t.data_ptr() for t in held}) == 3  # prefetch + 2 tensors served all 9 batches
    stream.close()


@pytest.mark.parametrize("captions", [("caption",), ("a", "b")])
def test_mapped_and_read_streams_agree(tmp_path, monkeypatch, captions):
    # the same batches, every epoch, whether the rows are gathered from the file mappings or read with
    # preads into a buffer first; the mapped pages are released after each buffer and re-mapped later
    img, txt = paired_stores(tmp_path, n=2300, image_dim=40, text_dim=24, captions=captions)
    pairs = PairedFeatures.from_stores(FeatureStore(img), FeatureStore(txt), list(captions))
    stream = StreamingBatches(pairs, batch=128, seed=4, block_rows=300, buffer_blocks=2)
    mapped = [list(stream.epoch(e)) for e in range(3)]
    maps = []
    original = FeatureStore.map_field
    monkeypatch.setattr(FeatureStore, "map_field", lambda s, field: maps.append(original(s, field)) or None)
    read = [list(StreamingBatches(pairs, batch=128, seed=4, block_rows=300, buffer_blocks=2).epoch(e))
            for e in range(3)]
    assert len(maps) == 3 * (1 + len(captions)) and all(m is not None for m in maps)  # a reader per object
    image_all, texts_all = pairs.load()
    for e in range(3):
        order = stream.plan.order(e)
        assert len(mapped[e]) == len(read[e]) == 17
        for s, ((x, ys), (x2, ys2)) in enumerate(zip(mapped[e], read[e])):
            idx = torch.from_numpy(order[s * 128:(s + 1) * 128])
            assert torch.equal(x, image_all[idx]) and torch.equal(x, x2)
            for y, y2, t in zip(ys, ys2, texts_all):
                assert torch.equal(y, t[idx]) and torch.equal(y, y2)
    stream.close()


@pytest.mark.parametrize("path", ["mapped", "pread", "h5py"])
def test_store_reads_match_h5py(tmp_path, monkeypatch, path):
    # mapped: StoreWriter's layout gathered from the file mapping (chunks anywhere in the file: HDF5 puts
    # metadata between them); pread: the mapping off, plain preads at the chunk offsets into a buffer first;
    # h5py: no usable chunk layout (compressed or odd layouts)
    import sail.data.loader as loader
    import sail.data.store
    from synthetic import write_store

    rng = np.random.default_rng(2)
    x = rng.standard_normal((3100, 24)).astype(np.float16)
    store = FeatureStore(write_store(tmp_path / "s.h5", [f"i{k}" for k in range(3100)], {"image": x}, "image", "m"))
    m = store.map_field("image")
    assert m is not None and m.chunk_rows == 1024
    if path != "mapped":
        monkeypatch.setattr(FeatureStore, "map_field", lambda store, field: None)
    if path == "h5py":
        monkeypatch.setattr(sail.data.store, "_chunk_offsets", lambda store, ds: None)
    for k in range(60):
        n = int(rng.integers(1, 3100))
        rows = [rng.choice(3100, n, replace=False), rng.integers(0, 3100, n),   # scattered, repeated
                rng.permutation(np.arange(k * 50, min(3100, k * 50 + n)))][k % 3]  # one dense span
        src, pos = loader._read_source(store, "image", rows, loader._Scratch(), "image")
        assert np.array_equal(src[pos], x[rows])
        if path == "mapped":
            m.read_ahead(rows)  # hints only: the rows read the same afterwards
            m.release(rows)
            assert np.array_equal(m.rows[m.starts(rows)], x[rows])


def test_load_reads_slabs_straight_into_the_result(pairs):
    # any slab size gives the rows in the asked order (slabs are read sorted, scattered into place)
    import sail.data.loader as loader

    ref = pairs.image_store.read("image")
    rows = np.random.default_rng(3).permutation(pairs.image_rows)[:500]
    for step in (1, 7, 64, 499, 500, 65536):
        got = loader._read_all(pairs.image_store, "image", rows, "cpu", step=step)
        assert got.dtype == torch.float16 and torch.equal(got, torch.from_numpy(ref[rows]))


def test_auto_counts_one_copy_per_rank_on_a_shared_host(monkeypatch):
    # in memory every rank holds all rows: on CPU the W ranks of one host share its RAM, so auto streams
    # once W copies exceed the bound; each GPU has its own memory, so there one copy is what counts
    import sail.train.align_heads as A

    cfg = A.AlignConfig(image="i.h5", text="t.h5", out="o")
    seen = []
    monkeypatch.setattr(A, "_fits", lambda nbytes, device: seen.append(nbytes) or nbytes < 1000)
    assert A._batching_mode(cfg, None, 600, torch.device("cpu"), 1) == "memory"
    assert A._batching_mode(cfg, None, 600, torch.device("cpu"), 2) == "stream"
    assert A._batching_mode(cfg, None, 600, torch.device("cuda", 0), 4) == "memory"
    assert seen == [600, 1200, 600]
