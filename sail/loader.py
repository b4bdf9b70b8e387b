"""Paired feature batches for `sail align`: joined by id, held in (GPU) memory or streamed from the stores.

    pairs = PairedFeatures.from_stores(image_store, text_store, captions=["caption"])
    train, val = pairs.split(val_fraction=0.02, seed=0)
    loader = train.batches(batch=36864, epoch=3, device="cuda")   # in memory: one slice per step
    for image, texts in loader: ...                                # (B, Di) fp16, [K x (B, Dt)] fp16

When the features do not fit (`in_memory=False`), `StreamingBatches` reads large contiguous row blocks
from the HDF5 files in a background thread, shuffles them in a buffer of several blocks, and yields
batches; the order is a pure function of (seed, epoch), so a resumed run sees the same batches.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from dataclasses import dataclass

import numpy as np
import torch

from sail.errors import SailError
from sail.store import FeatureStore, join


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
        image = torch.from_numpy(_read_all(self.image_store, "image", self.image_rows)).to(device)
        texts = [torch.from_numpy(_read_all(self.text_store, c, self.text_rows)).to(device) for c in self.captions]
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


def _read_all(store: FeatureStore, field: str, rows: np.ndarray) -> np.ndarray:
    """Rows of a field, reading in 64k-row slabs so the peak is the result, not the whole field."""
    out = np.empty((len(rows), store.dim(field)), dtype=np.float16)
    order = np.argsort(rows, kind="stable")
    sorted_rows = rows[order]
    step = 65536
    for i in range(0, len(rows), step):
        out[order[i:i + step]] = store.read(field, sorted_rows[i:i + step])
    return out


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


class MemoryBatches:
    """Batches sliced from features already on the device; a seeded permutation per epoch."""

    def __init__(self, image: torch.Tensor, texts: list[torch.Tensor], batch: int, seed: int = 0):
        self.image, self.texts, self.batch, self.seed = image, texts, batch, seed
        self.steps_per_epoch = len(image) // batch

    def epoch(self, epoch: int, start_step: int = 0):
        perm = epoch_permutation(len(self.image), self.seed, epoch).to(self.image.device)
        for s in range(start_step, self.steps_per_epoch):
            idx = perm[s * self.batch:(s + 1) * self.batch]
            yield self.image[idx], [t[idx] for t in self.texts]


class StreamingBatches:
    """Batches read from the stores in contiguous blocks with a shuffle buffer, prefetched in a thread.

    Each epoch visits the blocks in a seeded order; `buffer_blocks` blocks are read (contiguous slabs),
    shuffled together and cut into batches. The few rows left over in a buffer are dropped that epoch
    (they differ from epoch to epoch), so every batch is full and the batch plan is known up front.
    """

    def __init__(self, pairs: PairedFeatures, batch: int, seed: int = 0, block_rows: int = 65536,
                 buffer_blocks: int = 4, device: torch.device | str = "cpu"):
        self.pairs, self.batch, self.seed, self.device = pairs, batch, seed, torch.device(device)
        self.block_rows = max(block_rows, batch)
        self.buffer_blocks = buffer_blocks
        self.steps_per_epoch = sum(len(rows) // batch for rows in self._plan(0))

    def _plan(self, epoch: int) -> list[np.ndarray]:
        """Pair indices of each buffer, in the seeded block order of this epoch."""
        n = len(self.pairs)
        starts = np.arange(0, n, self.block_rows)
        order = np.random.default_rng([self.seed, epoch]).permutation(len(starts))
        return [np.concatenate([np.arange(starts[b], min(n, starts[b] + self.block_rows)) for b in order[g:g + self.buffer_blocks]])
                for g in range(0, len(order), self.buffer_blocks)]

    def epoch(self, epoch: int, start_step: int = 0):
        q: queue.Queue = queue.Queue(maxsize=3)

        def produce():
            try:
                step = 0
                for k, rows in enumerate(self._plan(epoch)):
                    n_batches = len(rows) // self.batch
                    if step + n_batches <= start_step:  # resuming: skip whole buffers without reading
                        step += n_batches
                        continue
                    sub = self.pairs.subset(rows)
                    image = _read_all(sub.image_store, "image", sub.image_rows)
                    texts = [_read_all(sub.text_store, c, sub.text_rows) for c in sub.captions]
                    shuffle = np.random.default_rng([self.seed, epoch, k]).permutation(len(rows))
                    for i in range(n_batches):
                        if step >= start_step:
                            sel = shuffle[i * self.batch:(i + 1) * self.batch]
                            batch = (torch.from_numpy(image[sel]), [torch.from_numpy(t[sel]) for t in texts])
                            if self.device.type == "cuda":
                                batch = (batch[0].pin_memory(), [t.pin_memory() for t in batch[1]])
                            q.put(batch)
                        step += 1
            except BaseException as e:  # surface reader errors in the training loop
                q.put(e)
            q.put(None)

        threading.Thread(target=produce, daemon=True).start()
        while (item := q.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            image, texts = item
            yield image.to(self.device, non_blocking=True), [t.to(self.device, non_blocking=True) for t in texts]
