"""Paired feature batches for `sail align`: joined by id, held in (GPU) memory or streamed from the stores.

    pairs = PairedFeatures.from_stores(image_store, text_store, captions=["caption"])
    train, val = pairs.split(val_fraction=0.02, seed=0)
    loader = MemoryBatches(*train.load("cuda"), batch=36864, seed=0)       # in memory: one gather per step
    loader = StreamingBatches(train, batch=36864, seed=0, device="cuda")   # streamed from the HDF5 files
    for image, texts in loader.epoch(3, start_step=0): ...   # (B, Di) fp16, [K x (B, Dt)] fp16

Both yield exactly `steps_per_epoch = len(pairs) // batch` full batches every epoch, in an order that is a
pure function of (seed, epoch), so a run resumed at any step sees the same batches. Under torchrun
(`rank`, `world`) each process gets only its rows of every global batch (rows [r*B/W, (r+1)*B/W) of it):
the global batch sequence is the single process's, and a streaming rank reads only its own rows.

Streaming plan (`StreamPlan`): the pairs are cut into blocks of `block_rows` consecutive rows; each epoch
visits the blocks in a seeded order, `buffer_blocks` at a time (a buffer: a few contiguous slabs of each
store), shuffles the rows of each buffer, and concatenates the buffers into the epoch's stream of all n
pairs. Batch s is stream[s*B:(s+1)*B]: a batch may straddle two buffers (the rows a buffer leaves over are
carried into the next), and only the last n % B rows of the stream are dropped, so every epoch has the same
length. A background thread gathers batches ahead of the trainer, across epochs, straight from the store
files mapped into memory (see StreamingBatches).
"""

from __future__ import annotations

import contextlib
import itertools
import queue
import threading
from dataclasses import dataclass

import numpy as np
import torch

from sail.core.errors import SailError
from sail.data.store import FeatureStore, MappedField, close_pools, join


@dataclass
class PairedFeatures:
    """Row indices into an image store and a text store for the ids both hold (valid in every field)."""

    image_store: FeatureStore
    text_store: FeatureStore
    captions: list[str]
    image_rows: np.ndarray
    text_rows: np.ndarray

    @classmethod
    def from_stores(cls, image_store: FeatureStore, text_store: FeatureStore, captions: list[str]) -> "PairedFeatures":
        if "image" not in image_store.fields:
            raise SailError(f"{image_store.path} has no image field (is it a text store?); pass an image store to --image")
        for c in captions:
            if c not in text_store.fields:
                raise SailError(f"{text_store.path} has no caption field {c!r}; it has {', '.join(text_store.fields)}")
        img_rows, txt_rows = join(image_store, text_store, fields=[["image"], captions])
        return cls(image_store, text_store, captions, img_rows, txt_rows)

    def __len__(self) -> int:
        return len(self.image_rows)

    @property
    def ids(self) -> np.ndarray:
        return self.image_store.ids[self.image_rows]

    def subset(self, index: np.ndarray) -> "PairedFeatures":
        return PairedFeatures(self.image_store, self.text_store, self.captions,
                              self.image_rows[index], self.text_rows[index])

    def split(self, val_fraction: float, seed: int = 0) -> tuple["PairedFeatures", "PairedFeatures"]:
        """A seeded random hold-out; sorted rows keep store reads contiguous."""
        if not 0 <= val_fraction < 1:
            raise SailError(f"--val-fraction must be in [0, 1), not {val_fraction}")
        n_val = int(round(len(self) * val_fraction))
        perm = np.random.default_rng(seed).permutation(len(self))
        return self.subset(np.sort(perm[n_val:])), self.subset(np.sort(perm[:n_val]))

    def nbytes(self) -> int:
        dims = self.image_store.dim("image") + sum(self.text_store.dim(c) for c in self.captions)
        return len(self) * dims * 2  # float16

    def load(self, device: torch.device | str = "cpu") -> tuple[torch.Tensor, list[torch.Tensor]]:
        """All rows as float16 tensors on `device`: (N, Di) and K x (N, Dt). Inside `shared_loads()` (sail
        sweep) the same rows are read once per process and the tensors shared, read-only, by every run."""
        key = (str(self.image_store.path), str(self.text_store.path), tuple(self.captions), str(device),
               self.image_rows.tobytes(), self.text_rows.tobytes())
        if _SHARED is not None and key in _SHARED:
            return _SHARED[key]
        image = _read_all(self.image_store, "image", self.image_rows, device)
        texts = [_read_all(self.text_store, c, self.text_rows, device) for c in self.captions]
        if _SHARED is not None:
            _SHARED[key] = (image, texts)
        return image, texts


_SHARED: dict | None = None  # PairedFeatures.load results while shared_loads() is active


@contextlib.contextmanager
def shared_loads():
    """Within this block, PairedFeatures.load reads each (stores, rows, device) once and reuses the tensors."""
    global _SHARED
    outer, _SHARED = _SHARED, ({} if _SHARED is None else _SHARED)
    try:
        yield _SHARED
    finally:
        _SHARED = outer


def _read_all(store: FeatureStore, field: str, rows: np.ndarray, device: torch.device | str = "cpu",
              step: int = 65536) -> torch.Tensor:
    """Rows of a field as a (len(rows), D) float16 tensor on `device`, read in `step`-row slabs straight into
    it: the host holds the result (CPU) or one slab (a GPU; W ranks of one host loading at once would
    otherwise hold W whole copies in host RAM), never the whole field twice."""
    device = torch.device(device)
    out = torch.empty((len(rows), store.dim(field)), dtype=torch.float16, device=device)
    order = np.argsort(rows, kind="stable")  # sorted reads are contiguous
    sorted_rows = rows[order]
    for i in range(0, len(rows), step):
        slab = torch.from_numpy(store.read(field, sorted_rows[i:i + step]))
        out[torch.from_numpy(order[i:i + step]).to(device)] = slab.to(device)
    return out


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


def _check_batch(n: int, batch: int, world: int, rank: int) -> None:
    if batch < 2 or batch > n:
        raise SailError(f"batch {batch} must be between 2 and the number of training pairs ({n})")
    if batch % world or not 0 <= rank < world:
        raise SailError(f"batch {batch} must divide evenly over {world} processes")


class MemoryBatches:
    """Batches gathered from features already on the device; a seeded permutation per epoch.

    Every rank holds all rows but gathers only its B/W rows of each global batch. Why all: the global
    batch sequence is the single process's (a seeded permutation of ALL rows per epoch), so any row can fall
    into a rank's share of a later batch; holding only a fixed 1/W shard would need either the features of
    every batch exchanged between ranks each step, or a batch order that depends on W (a DDP run no longer
    equal to one process, nor resumable at another W). Streaming (StreamingBatches) is the DDP path that
    reads only the rank's rows; `sail align --in-memory auto` picks it when W copies do not fit.
    """

    def __init__(self, image: torch.Tensor, texts: list[torch.Tensor], batch: int, seed: int = 0,
                 rank: int = 0, world: int = 1):
        _check_batch(len(image), batch, world, rank)
        self.image, self.texts, self.batch, self.seed = image, texts, batch, seed
        self.rank, self.local = rank, batch // world
        self.steps_per_epoch = len(image) // batch

    def epoch(self, epoch: int, start_step: int = 0):
        perm = epoch_permutation(len(self.image), self.seed, epoch).to(self.image.device)
        lo = self.rank * self.local
        for s in range(start_step, self.steps_per_epoch):
            idx = perm[s * self.batch + lo:s * self.batch + lo + self.local]
            yield self.image[idx], [t[idx] for t in self.texts]

    def close(self) -> None:
        pass


@dataclass(frozen=True)
class StreamPlan:
    """The streamed batch order as a pure function of (n, batch, block_rows, buffer_blocks, seed, epoch).

    Everything here is index arithmetic (no I/O), so it is cheap to test exhaustively.
    """

    n: int
    batch: int
    block_rows: int = 65536
    buffer_blocks: int = 4
    seed: int = 0

    @property
    def steps_per_epoch(self) -> int:
        return self.n // self.batch

    def buffers(self, epoch: int):
        """Pair indices of each buffer (ascending: contiguous store reads), in this epoch's read order; lazily,
        so a 23M-pair epoch never holds more than one buffer's indices."""
        starts = np.arange(0, self.n, self.block_rows)
        order = np.random.default_rng([self.seed, epoch]).permutation(len(starts))
        for g in range(0, len(order), self.buffer_blocks):
            yield np.sort(np.concatenate([np.arange(starts[b], min(self.n, starts[b] + self.block_rows))
                                          for b in order[g:g + self.buffer_blocks]]))

    def shuffle(self, epoch: int, k: int, size: int) -> np.ndarray:
        """The order in which buffer k's rows enter the stream."""
        return np.random.default_rng([self.seed, epoch, k]).permutation(size)

    def order(self, epoch: int) -> np.ndarray:
        """The whole epoch's stream of pair indices (n,): a reference for tests, O(n) memory."""
        return np.concatenate([rows[self.shuffle(epoch, k, len(rows))] for k, rows in enumerate(self.buffers(epoch))])

    def pieces(self, epoch: int, start_step: int = 0, rank: int = 0, world: int = 1):
        """(k, rows, n_done) per buffer: the pair indices this rank takes from buffer k, in stream order.

        Buffers wholly before `start_step` are skipped without shuffling. n_done counts the rank's rows
        handed out before this piece; cutting the concatenated pieces every B/W rows gives the rank's
        share of batches start_step, start_step + 1, ..., steps_per_epoch - 1.
        """
        B, local = self.batch, self.batch // world
        q0, q_end = start_step * B, self.steps_per_epoch * B   # stream positions [q0, q_end) are used
        lo, done = 0, 0
        for k, rows in enumerate(self.buffers(epoch)):
            hi = lo + len(rows)
            if lo >= q_end:
                break
            if hi > q0:
                q = np.arange(max(lo, q0), min(hi, q_end))
                mine = q[(q % B) // local == rank]            # this rank's columns of each global batch
                if len(mine):
                    yield k, rows[self.shuffle(epoch, k, len(rows))[mine - lo]], done
                    done += len(mine)
            lo = hi


class _Scratch:
    """A reusable float16 array per field, grown on demand, so reading a buffer allocates nothing; and the
    fields mapped from their files (`FeatureStore.map_field`), kept for the reader thread's life."""

    def __init__(self):
        self.arrays: dict[str, np.ndarray] = {}
        self.maps: dict[str, MappedField | None] = {}  # by the key of _read_source

    def close(self) -> None:
        """Close the mapped store files (and the mappings, unless an array still views them: then the
        mapping goes with that array)."""
        for m in self.maps.values():
            if m is not None:
                m.file.close()
                m.rows = None
                with contextlib.suppress(BufferError):
                    m.mm.close()
        self.maps.clear()

    def get(self, key: str, rows: int, dim: int) -> np.ndarray:
        a = self.arrays.get(key)
        if a is None or a.shape[0] < rows or a.shape[1] != dim:
            a = self.arrays[key] = np.empty((max(rows, 1), dim), dtype=np.float16)
        return a


def _read_source(store: FeatureStore, field: str, rows: np.ndarray, scratch: _Scratch, key: str) -> tuple[np.ndarray, np.ndarray]:
    """Read store rows `rows` (any order) into a reused array; returns (src, pos), src[pos[i]] = row rows[i].

    A field mapped from its file (`FeatureStore.map_field`) is not read at all: src is the mapping and pos the rows
    (after asking the kernel to read them ahead).

    Runs of nearby rows (gaps under one HDF5 chunk, at least half of the span wanted) are read straight
    into the scratch array (HDF5 copies the page-cache pages once, no intermediate array); what is left
    (rows scattered over the store, e.g. a text store in another order) goes through the store's chunked
    read. src holds at most 2 * len(unique rows) rows.
    """
    ds = store._dataset(field)
    if key not in scratch.maps:
        scratch.maps[key] = store.map_field(field)
    mapped = scratch.maps[key]
    if mapped is not None:
        return mapped.rows, mapped.starts(np.asarray(rows, dtype=np.int64))
    uniq, inverse = np.unique(rows, return_inverse=True)
    gap = ds.chunks[0] if ds.chunks else 1024
    segments = np.split(np.arange(len(uniq)), np.flatnonzero(np.diff(uniq) > gap) + 1)
    dense = [len(seg) >= 64 and uniq[seg[-1]] + 1 - uniq[seg[0]] <= 2 * len(seg) for seg in segments]
    size = sum(int(uniq[seg[-1]] + 1 - uniq[seg[0]]) if d else len(seg) for seg, d in zip(segments, dense))
    src = scratch.get(key, size, ds.shape[1])
    pos_u = np.empty(len(uniq), dtype=np.int64)
    o, rest = 0, []
    for seg, d in zip(segments, dense):
        if d:
            lo, hi = int(uniq[seg[0]]), int(uniq[seg[-1]]) + 1
            store.read_span_into(field, lo, hi, src[o:o + hi - lo])
            pos_u[seg] = o + uniq[seg] - lo
            o += hi - lo
        else:
            rest.append(seg)
    if rest:
        rest = np.concatenate(rest)
        store.read_sorted_into(field, uniq[rest], src[o:o + len(rest)])
        pos_u[rest] = o + np.arange(len(rest))
    return src, pos_u[inverse]


class StreamingBatches:
    """Batches streamed from the stores by a `StreamPlan`, prefetched by one thread that runs across epochs.

    Stores in StoreWriter's layout (uncompressed float16 row-chunks) are mapped from their files: per batch
    the reader gathers the rank's B/W rows straight from the page cache into a (pinned, on CUDA) batch
    tensor that goes to the device as is, one copy per byte; a background thread asks the kernel to read
    the next buffer ahead, and a gathered buffer's pages are unmapped. Other layouts are read per buffer
    into a reused scratch array (preads, or h5py), then gathered.

    reuse: recycle prefetch + 2 batch tensors instead of allocating each batch (fresh 100+ MB tensors cost
    page faults that take longer than the gather). On CUDA this is always safe (the trainer gets device
    copies; a slot waits for its copy's event); on CPU the trainer gets the recycled tensors themselves, so a
    batch is valid only until the next one is requested (how `sail align` uses them). Default: CUDA only.
    """

    def __init__(self, pairs: PairedFeatures, batch: int, seed: int = 0, block_rows: int = 65536,
                 buffer_blocks: int = 4, device: torch.device | str = "cpu", rank: int = 0, world: int = 1,
                 prefetch: int = 2, reuse: bool | None = None):
        _check_batch(len(pairs), batch, world, rank)
        if block_rows < 1 or buffer_blocks < 1:
            raise SailError(f"block_rows ({block_rows}) and buffer_blocks ({buffer_blocks}) must be positive")
        self.pairs, self.device, self.rank, self.world = pairs, torch.device(device), rank, world
        self.plan = StreamPlan(len(pairs), batch, block_rows, buffer_blocks, seed)
        self.batch, self.seed, self.local = batch, seed, batch // world
        self.block_rows, self.buffer_blocks = block_rows, buffer_blocks
        self.steps_per_epoch = self.plan.steps_per_epoch
        self.prefetch = prefetch
        self.reuse = self.device.type == "cuda" if reuse is None else reuse
        self._worker: tuple[threading.Thread, queue.Queue, threading.Event] | None = None
        self._next: tuple[int, int] | None = None  # (epoch, step) the running worker delivers next
        self.reader_starts = 0                    # how many times a reader thread was started
        self._events: dict[int, object] = {}      # slot -> CUDA event of its last host-to-device copy

    # ---- the producer: runs in the worker thread
    def _batches(self, epoch: int, start_step: int, scratch: _Scratch, new_out):
        p, fields = self.pairs, [("image", self.pairs.image_store, "image")] + \
            [(f"text:{c}", self.pairs.text_store, c) for c in self.pairs.captions]
        store_rows = {"image": p.image_rows, **{f"text:{c}": p.text_rows for c in p.captions}}
        out, fill = None, 0
        pieces = self.plan.pieces(epoch, start_step, self.rank, self.world)
        piece, first = next(pieces, None), True
        while piece is not None:
            take = piece[1]
            srcs = []
            for key, store, field in fields:
                src, pos = _read_source(store, field, store_rows[key][take], scratch, key)
                srcs.append((torch.from_numpy(src), torch.from_numpy(pos)))
            piece = next(pieces, None)
            for key, _, _ in fields:  # mapped stores: the kernel reads this (first) and the next buffer ahead
                if scratch.maps.get(key) is not None:
                    for ahead in ([take] if first else []) + ([] if piece is None else [piece[1]]):
                        scratch.maps[key].read_ahead(store_rows[key][ahead])
            first = False
            i = 0
            while i < len(take):
                if out is None:
                    slot, out = new_out([src.shape[1] for src, _ in srcs])
                    fill = 0
                m = min(self.local - fill, len(take) - i)
                for (src, pos), dst in zip(srcs, out):   # (m, D) rows gathered straight into the batch
                    torch.index_select(src, 0, pos[i:i + m], out=dst[fill:fill + m])
                fill, i = fill + m, i + m
                if fill == self.local:
                    yield slot, (out[0], out[1:])
                    out = None
            for key, _, _ in fields:  # the piece is gathered: unmap its pages
                if scratch.maps.get(key) is not None:
                    scratch.maps[key].release(store_rows[key][take])

    def _produce(self, q: queue.Queue, stop: threading.Event, epoch: int, start_step: int) -> None:
        def put(item) -> bool:
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        scratch = _Scratch()  # one per reader thread, reused by every buffer of every epoch
        pin = self.device.type == "cuda"
        slots: list[list[torch.Tensor]] = []
        turn = itertools.count()

        def new_out(dims: list[int]) -> tuple[int, list[torch.Tensor]]:
            if not self.reuse:
                return -1, [torch.empty((self.local, d), dtype=torch.float16, pin_memory=pin) for d in dims]
            k = next(turn) % (self.prefetch + 2)  # the trainer holds 1 batch, the queue `prefetch`
            if k == len(slots):
                slots.append([torch.empty((self.local, d), dtype=torch.float16, pin_memory=pin) for d in dims])
            event = self._events.pop(k, None)
            if event is not None:
                event.synchronize()  # the slot's last host-to-device copy has finished
            return k, slots[k]

        try:
            for ep in itertools.count(epoch):
                first = start_step if ep == epoch else 0
                for s, batch in enumerate(self._batches(ep, first, scratch, new_out), start=first):
                    if not put((ep, s, batch)):
                        return
        except BaseException as e:  # surface reader errors in the training loop
            put((None, None, e))
        finally:
            scratch.close()

    # ---- the consumer
    def epoch(self, epoch: int, start_step: int = 0):
        """Batches start_step .. steps_per_epoch - 1 of `epoch`, each (B/W, Di) and K x (B/W, Dt) float16."""
        if self._worker is None or self._next != (epoch, start_step):
            self._stop_reader()
            q, stop = queue.Queue(maxsize=self.prefetch), threading.Event()
            t = threading.Thread(target=self._produce, args=(q, stop, epoch, start_step), daemon=True,
                                 name="sail-stream")
            t.start()
            self._worker, self.reader_starts = (t, q, stop), self.reader_starts + 1
            self._events = {}
        _, q, _ = self._worker
        self._next = (epoch, start_step)
        for s in range(start_step, self.steps_per_epoch):
            ep, got, item = q.get()
            if isinstance(item, BaseException):
                self.close()
                raise item
            if (ep, got) != (epoch, s):
                raise RuntimeError(f"stream out of step: expected batch {s} of epoch {epoch}, got {got} of {ep}")
            self._next = (epoch, s + 1) if s + 1 < self.steps_per_epoch else (epoch + 1, 0)
            slot, (image, texts) = item
            image, texts = image.to(self.device, non_blocking=True), [t.to(self.device, non_blocking=True) for t in texts]
            if slot >= 0 and self.device.type == "cuda":
                event = torch.cuda.Event()
                event.record()
                self._events[slot] = event
            yield image, texts

    def close(self) -> None:
        """Stop the reader thread and its pools (they also stop by themselves when the process exits)."""
        self._stop_reader()
        close_pools()

    def _stop_reader(self) -> None:
        if self._worker is not None:
            t, q, stop = self._worker
            stop.set()
            while t.is_alive():
                try:
                    q.get(timeout=0.05)
                except queue.Empty:
                    pass
            self._worker, self._next = None, None
