"""Shared parts of the end-to-end recipes (sail/recipes/alip.py, align.py): running, data, checkpoints, logs.

    cfg = load_config(["--config", "alip-tiny", "--steps", "20"])            # sail.recipe_config
    rank, world, device = setup_distributed(cfg["device"])
    data = PairData(ds.images, [ds.captions["caption"]], towers.preprocessing, seed=cfg["seed"])
    for epoch, next_batch, pixels, texts, skipped in iterate_batches(data, train_rows, cfg["batch_size"], seed):
        ...
    save_checkpoint(out, step, towers, optimizer, scheduler, {"gates": gates}, [epoch, next_batch])
    load_checkpoint(latest_checkpoint(out), towers, optimizer, scheduler, {"gates": gates})
    run_recipe("alip", ["--config", "alip-tiny"])     # what `sail recipe` calls

Conventions
- Config: sail.recipe_config (a shipped config name or a YAML path, nested `--a.b value` overrides).
- batch_size is the GLOBAL batch (the papers' number); each of W processes takes batch_size / W rows
  of every global batch, so 1 and W processes train on the same samples in the same steps.
- Data order: epoch e is a permutation of the training rows drawn from (seed, e); the last incomplete
  global batch is dropped. Augmentation of row i in epoch e uses a generator seeded from (seed, e, i).
  A checkpoint stores (epoch, next batch), so a resumed run continues with exactly the same batches.
- Bad images are dropped from their batch; under torch.distributed every rank then cuts its batch to
  the smallest one (the loss needs equal local batches); batches with fewer than 2 pairs are skipped.
- Checkpoints: OUT/checkpoints/step-NNNNNNNN/{model,state}.safetensors + state.json + rng-rankR.json
  (tensors in safetensors, everything else JSON, no pickle), written to a temp folder and renamed, the
  last `keep` kept. Rerunning the same command resumes from the newest one.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from sail import runlog
from sail.checkpoint import flatten_optimizer, unflatten_optimizer
from sail.distributed import barrier, current
from sail.errors import SailError

RESUME_KEYS = ("data", "batch_size", "steps", "seed", "vision", "text", "embed_dim", "projection", "image")


# ----------------------------------------------------------------------------------------- running


def recipe_names() -> list[str]:
    """The recipes that ship with the package: sail/recipes/NAME.py."""
    from importlib import resources

    return sorted(p.name[:-3] for p in resources.files("sail.recipes").iterdir()
                  if p.name.endswith(".py") and not p.name.startswith("_"))


def run_recipe(name: str, argv: list[str] | None = None):
    """Run sail.recipes.NAME's main(argv). Imported by name here only: the rest of sail never imports a recipe."""
    import importlib

    names = recipe_names()
    if name not in names:
        raise SailError(f"no recipe {name!r}; available: {', '.join(names) or 'none'}")
    return importlib.import_module(f"sail.recipes.{name}").main(argv)


# ----------------------------------------------------------------------------------------- distributed


def setup_distributed(device: str = "auto") -> tuple[int, int, torch.device]:
    """(rank, world, device). Under torchrun: the process group (sail.distributed) and cuda:LOCAL_RANK."""
    from sail.distributed import init_distributed, local_device
    from sail.encoders import pick_device

    rank, world = init_distributed()
    return rank, world, local_device(pick_device(device), rank, world)


def train_autocast(device: torch.device):
    """bf16 autocast on GPUs that have bf16; otherwise full precision (fp16 would need loss scaling)."""
    use = device.type == "cuda" and torch.cuda.is_bf16_supported()
    return torch.autocast("cuda" if device.type == "cuda" else "cpu", dtype=torch.bfloat16, enabled=use)


def cleanup_distributed() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------- data


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
    return pixels, texts, len(items) - len(kept)


def epoch_batches(rows: list[int], batch_size: int, epoch: int, seed: int, rank: int, world: int) -> list:
    """This rank's part of every full global batch of `epoch`: lists of (epoch, row) keys."""
    g = torch.Generator().manual_seed(_mix(seed, epoch, -1))
    order = [rows[i] for i in torch.randperm(len(rows), generator=g).tolist()]
    local = batch_size // world
    return [[(epoch, r) for r in order[b + rank * local: b + (rank + 1) * local]]
            for b in range(0, len(order) - batch_size + 1, batch_size)]


def iterate_batches(data: PairData, rows: list[int], batch_size: int, seed: int, start: tuple[int, int] = (0, 0),
                    workers: int = 0, pin_memory: bool = False):
    """Endless (epoch, next_batch, pixels, texts, skipped) from position `start` = (epoch, batch)."""
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
        for b, (pixels, texts, skipped) in enumerate(loader, start=first):
            n = 0 if pixels is None else pixels.shape[0]
            if world > 1:  # equal local batches on every rank
                smallest = torch.tensor([n], dtype=torch.int64, device=_comm_device())
                bad = torch.tensor([skipped], dtype=torch.int64, device=_comm_device())
                dist.all_reduce(smallest, op=dist.ReduceOp.MIN)
                dist.all_reduce(bad)
                n, skipped = int(smallest), int(bad)
            if n < 2:
                yield epoch, b + 1, None, None, skipped
                continue
            yield epoch, b + 1, pixels[:n], [col[:n] for col in texts], skipped
        epoch, first = epoch + 1, 0


def _comm_device() -> torch.device:
    import torch.distributed as dist

    backend = str(dist.get_backend())
    return torch.device("cuda", torch.cuda.current_device()) if "nccl" in backend else torch.device("cpu")


# ----------------------------------------------------------------------------------------- checkpoints


def _rng_state() -> tuple[dict, dict]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, py_state, py_gauss = random.getstate()
    plain = {"numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(gauss)],
             "python": [version, list(py_state), py_gauss]}
    return tensors, plain


def _set_rng_state(tensors: dict, plain: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[f"cuda.{i}"] for i in range(torch.cuda.device_count()) if f"cuda.{i}" in tensors]
    if cuda and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    kind, keys, pos, has_gauss, gauss = plain["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, py_state, py_gauss = plain["python"]
    random.setstate((version, tuple(py_state), py_gauss))


def save_checkpoint(out: str | Path, step: int, model, optimizer, scheduler, modules: dict, position: list,
                    keep: int = 2, config: dict | None = None) -> Path:
    """Write OUT/checkpoints/step-N on every rank's call (rank 0 writes the shared parts). `config`: the
    run's config; its RESUME_KEYS are stored so a resume with different settings is refused."""
    rank, _ = current()
    root = Path(out) / "checkpoints"
    final, tmp = root / f"step-{step:08d}", root / f".step-{step:08d}.tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    rng_tensors, rng_plain = _rng_state()
    save_file({k: v.contiguous() for k, v in rng_tensors.items()}, str(tmp / f"rng-rank{rank}.safetensors"))
    (tmp / f"rng-rank{rank}.json").write_text(json.dumps(rng_plain))
    if rank == 0:
        save_file({k: v.detach().contiguous().clone().cpu() for k, v in model.state_dict().items()},
                  str(tmp / "model.safetensors"))
        opt = optimizer.state_dict()
        tensors, plain_opt = flatten_optimizer(opt, prefix="optimizer.")
        for name, module in modules.items():
            for key, value in module.state_dict().items():
                tensors[f"module.{name}.{key}"] = value.detach().contiguous().clone().cpu()
        save_file(tensors, str(tmp / "state.safetensors"))
        meta = {"step": step, "position": position, "scheduler": scheduler.state_dict(),
                "config": {k: (config or {})[k] for k in RESUME_KEYS if k in (config or {})},
                "optimizer": plain_opt}
        (tmp / "state.json").write_text(json.dumps(meta, indent=1))
    barrier()
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in sorted(root.glob("step-*"))[:-max(1, keep)]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def latest_checkpoint(out: str | Path) -> Path | None:
    found = sorted(p for p in (Path(out) / "checkpoints").glob("step-*") if (p / "state.json").is_file())
    return found[-1] if found else None


def load_checkpoint(path: Path, model, optimizer, scheduler, modules: dict, config: dict | None = None) -> dict:
    """Restore everything save_checkpoint wrote; returns {"step", "position"}."""
    rank, _ = current()
    meta = json.loads((path / "state.json").read_text())
    saved = meta.get("config", {})
    changed = [k for k in saved if config is not None and k in config and config[k] != saved[k]]
    if changed:
        raise SailError(f"{path.parent.parent} holds a run with different {', '.join(changed)}; resume with the "
                        "same settings or choose another --out")
    device = next(model.parameters()).device
    model.load_state_dict(load_file(str(path / "model.safetensors"), device=str(device)), strict=True)
    tensors = load_file(str(path / "state.safetensors"))
    optimizer.load_state_dict(unflatten_optimizer(tensors, meta["optimizer"], optimizer.param_groups, prefix="optimizer."))
    scheduler.load_state_dict(meta["scheduler"])
    for name, module in modules.items():
        prefix = f"module.{name}."
        module.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}, strict=True)
    rng = path / f"rng-rank{rank}.safetensors"
    if rng.is_file():  # absent when resuming with more processes than before: fresh RNG for the new ranks
        _set_rng_state(load_file(str(rng)), json.loads((path / f"rng-rank{rank}.json").read_text()))
    return {"step": meta["step"], "position": meta["position"]}


# ----------------------------------------------------------------------------------------- logs

RECIPE_PANELS = [(("loss", "loss_ungated"), "training loss"), (("lr",), "learning rate"), (("t",), "temperature t"),
                 (("zeroshot_top1",), "zero-shot top-1 (%)")]


def plot_curves(metrics_path: str | Path, png_path: str | Path) -> Path:
    """OUT/curves.png: training loss, learning rate, temperature and zero-shot top-1 against step."""
    return runlog.plot_curves(metrics_path, png_path, RECIPE_PANELS)


def zeroshot_templates(spec) -> list[str]:
    """A list of templates as given, or a built-in set name / file for sail.templates.load_templates."""
    from sail.templates import load_templates

    return load_templates(spec) if isinstance(spec, str) else [str(t) for t in spec]


def zeroshot_check(towers, ds, rows: list[int], templates: list[str]) -> dict:
    """sail.metrics.zeroshot of `towers` on rows of a labelled dataset, class names from the dataset."""
    from sail.data import ImageError, load_image
    from sail.metrics import class_embeddings, zeroshot

    images, labels = [], []
    for i in rows:
        if ds.labels is None or ds.labels[i] < 0:
            continue
        try:
            images.append(load_image(ds.images[i]))
        except ImageError:
            continue
        labels.append(int(ds.labels[i]))
    if not images:
        return {}
    names = ds.class_names or [str(c) for c in range(int(max(labels)) + 1)]
    classes = class_embeddings(towers.encode_text, names, templates)
    result = zeroshot(towers.encode_image(images), classes, torch.tensor(labels))
    return {f"zeroshot_{k}": v for k, v in result.items()}
