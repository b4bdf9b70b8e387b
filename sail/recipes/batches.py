"""Data of the end-to-end recipes: image-text rows -> seeded, augmented global batches split over ranks.

    train, held = split_indices(ds.ids, holdout=0.25)          # by id hash: stable under reordering
    data = PairData(ds.images, [ds.captions["caption"]], towers.preprocessing, seed=0)
    for epoch, next_batch, pixels, texts, skipped, reason in iterate_batches(data, train, batch_size=32, seed=0):
        ...                                                   # texts: one list per column

- batch_size is the GLOBAL batch (the papers' number); each of W processes takes batch_size / W rows
  of every global batch, so 1 and W processes train on the same samples in the same steps.
- Data order: epoch e is a permutation of the training rows drawn from (seed, e); the last incomplete
  global batch is dropped. Augmentation of row i in epoch e uses a generator seeded from (seed, e, i).
  A checkpoint stores (epoch, next batch), so a resumed run continues with exactly the same batches.
- Bad images are dropped from their batch; under torch.distributed every rank then cuts its batch to
  the smallest one (the loss needs equal local batches); batches with fewer than 2 pairs are skipped.
"""

from __future__ import annotations

import hashlib

import torch

from sail.core.distributed import current
from sail.core.errors import SailError


def split_indices(ids: list[str], holdout: float) -> tuple[list[int], list[int]]:
    """(train rows, held-out rows): a row is held out when the hash of its id falls below `holdout`."""
    if not 0.0 <= holdout < 1.0:
        raise SailError(f"holdout must be a fraction in [0, 1), got {holdout}")
    train, held = [], []
    for i, sid in enumerate(ids):
        u = int.from_bytes(hashlib.blake2b(str(sid).encode(), digest_size=8).digest(), "big") / 2.0**64
        (held if u < holdout else train).append(i)
    return train, held


def _mix(*values: int) -> int:
    """A 63-bit seed from several integers (order matters)."""
    h = hashlib.blake2b(digest_size=8)
    for v in values:
        h.update(int(v).to_bytes(8, "big", signed=True))
    return int.from_bytes(h.digest(), "big") >> 1


class PairData(torch.utils.data.Dataset):
    """Item (epoch, row) -> (augmented pixels or None, [text per column], reason). Seeded per item."""

    def __init__(self, images: list, columns: list[list[str]], preprocessing, seed: int):
        self.images, self.columns, self.preprocessing, self.seed = images, columns, preprocessing, seed

    def __len__(self):
        return len(self.images)

    def __getitem__(self, key):
        from sail.data import ImageError, load_image

        epoch, row = key
        texts = [col[row] for col in self.columns]
        try:
            image = load_image(self.images[row])
            g = torch.Generator().manual_seed(_mix(self.seed, epoch, row))
            return self.preprocessing.train(image, g), texts, ""
        except ImageError as e:
            return None, texts, str(e)
        except Exception as e:  # an odd image that breaks preprocessing is a bad image, not a crash
            return None, texts, f"preprocessing failed: {type(e).__name__}"


def _collate(items):
    kept = [(x, t) for x, t, _ in items if x is not None]
    pixels = torch.stack([x for x, _ in kept]) if kept else None
    texts = [list(col) for col in zip(*[t for _, t in kept])] if kept else []  # per column
    reason = next((why for x, _, why in items if x is None), "")  # the first failure: names a wrong image root
    return pixels, texts, len(items) - len(kept), reason


def epoch_batches(rows: list[int], batch_size: int, epoch: int, seed: int, rank: int, world: int) -> list:
    """This rank's part of every full global batch of `epoch`: lists of (epoch, row) keys."""
    g = torch.Generator().manual_seed(_mix(seed, epoch, -1))
    order = [rows[i] for i in torch.randperm(len(rows), generator=g).tolist()]
    local = batch_size // world
    return [[(epoch, r) for r in order[b + rank * local: b + (rank + 1) * local]]
            for b in range(0, len(order) - batch_size + 1, batch_size)]


def iterate_batches(data: PairData, rows: list[int], batch_size: int, seed: int, start: tuple[int, int] = (0, 0),
                    workers: int = 0, pin_memory: bool = False):
    """Endless (epoch, next_batch, pixels, texts, skipped, reason) from position `start` = (epoch, batch);
    pixels and texts are None where the batch kept fewer than 2 pairs, `reason` is its first image failure."""
    import torch.distributed as dist

    rank, world = current()
    if batch_size % world:
        raise SailError(f"batch_size {batch_size} must be divisible by the number of processes ({world})")
    if len(rows) < batch_size:
        raise SailError(f"only {len(rows)} training rows for a global batch of {batch_size}; lower batch_size")
    epoch, first = start
    while True:
        batches = epoch_batches(rows, batch_size, epoch, seed, rank, world)
        # Own generator: the loader must not draw from the global RNG (dropout), or a resumed run would differ.
        loader = torch.utils.data.DataLoader(
            data, batch_sampler=batches[first:], collate_fn=_collate, num_workers=workers,
            pin_memory=pin_memory, generator=torch.Generator().manual_seed(_mix(seed, epoch)),
            prefetch_factor=4 if workers else None)
        for b, (pixels, texts, skipped, reason) in enumerate(loader, start=first):
            n = 0 if pixels is None else pixels.shape[0]
            if world > 1:  # equal local batches on every rank
                smallest = torch.tensor([n], dtype=torch.int64, device=_comm_device())
                bad = torch.tensor([skipped], dtype=torch.int64, device=_comm_device())
                dist.all_reduce(smallest, op=dist.ReduceOp.MIN)
                dist.all_reduce(bad)
                n, skipped = int(smallest), int(bad)
            if n < 2:
                yield epoch, b + 1, None, None, skipped, reason
                continue
            yield epoch, b + 1, pixels[:n], [col[:n] for col in texts], skipped, reason
        epoch, first = epoch + 1, 0


def _comm_device() -> torch.device:
    import torch.distributed as dist

    backend = str(dist.get_backend())
    return torch.device("cuda", torch.cuda.current_device()) if "nccl" in backend else torch.device("cpu")


