"""Crash-safe training checkpoints without pickle: tensors in safetensors, everything else in JSON.

    save_checkpoint(run_dir, step, model=heads, optimizer=opt, scheduler=sched, state={"epoch": 3})
    ck = load_checkpoint(run_dir)          # None if the run has none
    ck.restore(model=heads, optimizer=opt, scheduler=sched); ck.state["epoch"]

Each checkpoint is written to `checkpoint-<step>.tmp/`, renamed to `checkpoint-<step>/`, and only then
named in `LATEST` (itself replaced atomically); older checkpoints are removed afterwards. A kill -9 at
any moment leaves LATEST pointing at a complete checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from sail.errors import SailError


def flatten_optimizer(sd: dict, prefix: str = "state.") -> tuple[dict[str, torch.Tensor], dict]:
    """Optimizer state_dict -> (tensors, JSON-able rest). Works for Lion, AdamW, LAMB, SGD..."""
    tensors, plain = {}, {"param_groups": sd["param_groups"], "state": {}}
    for idx, st in sd["state"].items():
        plain["state"][str(idx)] = {}
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{prefix}{idx}.{k}"] = v.detach().cpu().contiguous()
            else:
                plain["state"][str(idx)][k] = v
    return tensors, plain


def unflatten_optimizer(tensors: dict[str, torch.Tensor], plain: dict, current_groups: list | None = None,
                        prefix: str = "state.") -> dict:
    """Inverse of flatten_optimizer. JSON turned tuples (betas) into lists: restore them from the live groups."""
    groups = plain["param_groups"]
    for group, current in zip(groups, current_groups or []):
        for key, value in current.items():
            if isinstance(value, tuple) and isinstance(group.get(key), list):
                group[key] = tuple(group[key])
    state: dict[int, dict] = {int(i): dict(v) for i, v in plain["state"].items()}
    for key, v in tensors.items():
        if not key.startswith(prefix):
            continue
        idx, name = key[len(prefix):].split(".", 1)
        state.setdefault(int(idx), {})[name] = v
    return {"state": state, "param_groups": groups}


def _rng_state() -> dict[str, torch.Tensor]:
    out = {"rng.cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"rng.cuda{i}"] = s
    return out


def _json_default(v):
    if isinstance(v, (set, tuple)):
        return list(v)
    if torch.is_tensor(v):
        return v.item()
    raise TypeError(f"cannot store {type(v).__name__} in a checkpoint")


def save_checkpoint(run_dir: str | Path, step: int, model: torch.nn.Module, optimizer=None, scheduler=None,
                    state: dict | None = None, extra_modules: dict[str, torch.nn.Module] | None = None,
                    keep: int = 1) -> Path:
    run_dir = Path(run_dir)
    final = run_dir / f"checkpoint-{step:08d}"
    tmp = run_dir / f"checkpoint-{step:08d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    modules = {"model": model, **(extra_modules or {})}
    for name, m in modules.items():
        save_file({k: v.detach().cpu().contiguous() for k, v in m.state_dict().items()}, str(tmp / f"{name}.safetensors"))
    meta: dict = {"step": step, "state": state or {}, "modules": list(modules)}
    if optimizer is not None:
        tensors, plain = flatten_optimizer(optimizer.state_dict())
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        meta["optimizer"] = plain
    if scheduler is not None:
        meta["scheduler"] = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
    save_file(_rng_state(), str(tmp / "rng.safetensors"))
    (tmp / "checkpoint.json").write_text(json.dumps(meta, default=_json_default))
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    latest_tmp = run_dir / "LATEST.tmp"
    latest_tmp.write_text(final.name)
    os.replace(latest_tmp, run_dir / "LATEST")
    old = sorted(p for p in run_dir.glob("checkpoint-*") if p.is_dir() and not p.name.endswith(".tmp"))
    for p in old[:-keep] if keep > 0 else []:
        if p != final:
            shutil.rmtree(p, ignore_errors=True)
    return final


@dataclass
class Checkpoint:
    path: Path
    step: int
    state: dict
    meta: dict

    def restore(self, model: torch.nn.Module, optimizer=None, scheduler=None,
                extra_modules: dict[str, torch.nn.Module] | None = None, rng: bool = True) -> None:
        for name, m in {"model": model, **(extra_modules or {})}.items():
            m.load_state_dict(load_file(str(self.path / f"{name}.safetensors")), strict=True)
        if optimizer is not None and "optimizer" in self.meta:
            optimizer.load_state_dict(unflatten_optimizer(load_file(str(self.path / "optimizer.safetensors")),
                                                          self.meta["optimizer"], optimizer.param_groups))
        if scheduler is not None and "scheduler" in self.meta:
            scheduler.load_state_dict({**scheduler.state_dict(), **self.meta["scheduler"]})
        if rng:
            r = load_file(str(self.path / "rng.safetensors"))
            torch.set_rng_state(r["rng.cpu"])
            cuda = [r[k] for k in sorted(r) if k.startswith("rng.cuda")]
            if cuda and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])


def load_checkpoint(run_dir: str | Path) -> Checkpoint | None:
    run_dir = Path(run_dir)
    latest = run_dir / "LATEST"
    if not latest.exists():
        return None
    path = run_dir / latest.read_text().strip()
    try:
        meta = json.loads((path / "checkpoint.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SailError(f"checkpoint {path} is unreadable ({e}); delete {latest} to start over") from None
    return Checkpoint(path, int(meta["step"]), meta["state"], meta)
