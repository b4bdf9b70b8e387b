"""Crash-safe training checkpoints without pickle, for `sail align` and the recipes: tensors in safetensors,
everything else in JSON.

    save_checkpoint(run_dir, step, model=heads, optimizer=opt, scheduler=sched, state={"epoch": 3},
                    position=(epoch, next_batch), keep=2)
    ck = load_checkpoint(run_dir)          # None if the run has none
    ck.restore(model=heads, optimizer=opt, scheduler=sched); ck.state["epoch"]; ck.position

Layout of RUN/checkpoint-<step>/: model.safetensors (+ NAME.safetensors per extra module), optimizer.safetensors,
rng-rank<R>.safetensors + rng-rank<R>.json (torch CPU/CUDA, numpy and Python RNG of each process),
checkpoint.json (step, state, data position, optimizer and scheduler settings). RUN/LATEST names the newest.

Atomic: each checkpoint is written to `checkpoint-<step>.tmp/` (files fsynced, their sha256 in checksums.json),
renamed to `checkpoint-<step>/` (a checkpoint already there is first moved aside to `checkpoint-<step>.old/`,
never deleted before the new one is in place), the directory fsynced, and only then named in `LATEST`
(itself replaced atomically); all but the newest `keep` (default 2, so a damaged newest one has an
intact predecessor to fall back to) are removed afterwards. Loading verifies the
checksums; when LATEST's checkpoint is missing or damaged (a crash between the renames, bit rot) it falls
back to the newest intact checkpoint and says so. A kill -9 at any moment loses at most the step being saved.

Under torch.distributed, `collective=True` means every rank calls save_checkpoint (each writes its own RNG
state; rank 0 writes the rest); the default is the caller being the only writer (rank 0 or one process).

The resume rule (align and the recipes): a run directory that holds a run (its settings file and a
checkpoint or a final model) is continued only when asked (`--resume`), and only with the settings it
started with (`check_resume`); without --resume sail refuses and overwrites nothing. A directory left by a
failed start (settings, no checkpoint, no model) is reused as new.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from sail.core.artifacts import (DamagedArtifact, checksums, fsync_dir, fsync_tree, read_json, verify_checksums,
                                 write_atomic, write_json)
from sail.core.distributed import barrier, current
from sail.core.errors import SailError


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


def _rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    """This process's RNG states: (tensors for safetensors, JSON-able rest)."""
    tensors = {"rng.cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda{i}"] = s
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, py_state, py_gauss = random.getstate()
    plain = {"numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(gauss)],
             "python": [version, list(py_state), py_gauss]}
    return tensors, plain


def _set_rng_state(tensors: dict[str, torch.Tensor], plain: dict | None) -> None:
    torch.set_rng_state(tensors["rng.cpu"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    if plain:  # absent in checkpoints written before numpy / Python states were kept
        kind, keys, pos, has_gauss, gauss = plain["numpy"]
        np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
        version, py_state, py_gauss = plain["python"]
        random.setstate((version, tuple(py_state), py_gauss))


def _json_default(v):
    if isinstance(v, (set, tuple)):
        return list(v)
    if torch.is_tensor(v):
        return v.item()
    raise TypeError(f"cannot store {type(v).__name__} in a checkpoint")


def save_checkpoint(run_dir: str | Path, step: int, model: torch.nn.Module, optimizer=None, scheduler=None,
                    state: dict | None = None, extra_modules: dict[str, torch.nn.Module] | None = None,
                    keep: int = 2, position=None, collective: bool = False) -> Path:
    """Write RUN/checkpoint-<step>/ atomically and point LATEST at it (see the module doc).
    `position`: where the data stream resumes (the recipes: [epoch, next batch]); JSON-able."""
    run_dir = Path(run_dir)
    rank = current()[0] if collective else 0
    sync = barrier if collective else (lambda: None)
    final = run_dir / f"checkpoint-{step:08d}"
    tmp = run_dir / f"checkpoint-{step:08d}.tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    sync()
    rng_tensors, rng_plain = _rng_state()  # every rank its own
    save_file({k: v.contiguous() for k, v in rng_tensors.items()}, str(tmp / f"rng-rank{rank}.safetensors"))
    write_json(tmp / f"rng-rank{rank}.json", rng_plain, indent=None)
    if rank == 0:
        _write_state(tmp, step, model, optimizer, scheduler, state, extra_modules, position)
    sync()
    if rank == 0:
        _publish(run_dir, tmp, final, keep)
    sync()
    return final


def _publish(run_dir: Path, tmp: Path, final: Path, keep: int) -> None:
    """checksums, rename into place, LATEST, prune: in an order where a crash at any point leaves a
    complete checkpoint on disk that load_checkpoint finds (the module doc)."""
    write_json(tmp / CHECKSUMS, checksums(tmp, [f.name for f in tmp.iterdir() if f.name != CHECKSUMS]))
    fsync_tree(tmp)
    aside = final.with_name(final.name + ".old")
    if final.exists():  # re-saving a step: keep the old one (perhaps LATEST's target) until the new one is in place
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(final, aside)
    os.replace(tmp, final)
    fsync_dir(run_dir)
    write_atomic(run_dir / "LATEST", final.name)
    shutil.rmtree(aside, ignore_errors=True)
    for _, p in _on_disk(run_dir)[keep:] if keep > 0 else []:
        if p != final:
            shutil.rmtree(p, ignore_errors=True)


CHECKSUMS = "checksums.json"
_NAME = re.compile(r"checkpoint-(\d+)(\.old)?$")


def _on_disk(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every published checkpoint (not the .tmp being written), newest first."""
    found = [(int(m.group(1)), not m.group(2), p) for p in run_dir.glob("checkpoint-*")
             if p.is_dir() and (m := _NAME.match(p.name))]
    return [(step, p) for step, _, p in sorted(found, reverse=True)]


def _write_state(tmp: Path, step: int, model, optimizer, scheduler, state, extra_modules, position) -> None:
    modules = {"model": model, **(extra_modules or {})}
    for name, m in modules.items():
        # clone on CPU: safetensors refuses tensors that share storage (tied weights, views)
        save_file({k: v.detach().to("cpu", copy=True).contiguous() for k, v in m.state_dict().items()},
                  str(tmp / f"{name}.safetensors"))
    meta: dict = {"step": step, "state": state or {}, "modules": list(modules), "position": position}
    if optimizer is not None:
        tensors, plain = flatten_optimizer(optimizer.state_dict())
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        meta["optimizer"] = plain
    if scheduler is not None:
        meta["scheduler"] = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
    write_json(tmp / "checkpoint.json", meta, indent=None, default=_json_default)


@dataclass
class Checkpoint:
    path: Path
    step: int
    state: dict
    meta: dict
    settings: dict | None = None  # the run's saved settings, when found by check_resume

    @property
    def position(self):
        """The data position saved with the checkpoint (None if none was given)."""
        return self.meta.get("position")

    def restore(self, model: torch.nn.Module, optimizer=None, scheduler=None,
                extra_modules: dict[str, torch.nn.Module] | None = None, rng: bool = True) -> None:
        for name, m in {"model": model, **(extra_modules or {})}.items():
            m.load_state_dict(self._tensors(f"{name}.safetensors"), strict=True)
        if optimizer is not None and "optimizer" in self.meta:
            optimizer.load_state_dict(unflatten_optimizer(self._tensors("optimizer.safetensors"),
                                                          self.meta["optimizer"], optimizer.param_groups))
        if scheduler is not None and "scheduler" in self.meta:
            scheduler.load_state_dict({**scheduler.state_dict(), **self.meta["scheduler"]})
        if rng:
            rank = current()[0]
            mine, legacy = self.path / f"rng-rank{rank}.safetensors", self.path / "rng.safetensors"
            if mine.is_file():
                plain = self.path / f"rng-rank{rank}.json"
                rng_plain = read_json(plain, what="checkpoint RNG state", todo=_TODO) if plain.is_file() else None
                _set_rng_state(self._tensors(mine.name), rng_plain)
            elif legacy.is_file():  # written by sail 0.1
                _set_rng_state(self._tensors(legacy.name), None)
            # else: more processes than when it was saved; the new ranks keep their fresh RNG

    def _tensors(self, name: str) -> dict[str, torch.Tensor]:
        """One safetensors file; a damaged one (a checkpoint from before checksums) is one error line."""
        try:
            return load_file(str(self.path / name))
        except Exception as e:  # SafetensorError, OSError: the file is truncated or foreign
            raise DamagedArtifact(f"{self.path / name}: checkpoint file is damaged ({str(e).splitlines()[0][:120]}); "
                                  f"{_TODO}") from None


_TODO = "delete that checkpoint folder to resume from an older one, or start over with another --out"


def load_checkpoint(run_dir: str | Path, say=print) -> Checkpoint | None:
    """The checkpoint LATEST names, or, when that one is missing or damaged, the newest intact one
    (`say` tells which was skipped and why). None when the run has none; SailError when none is intact."""
    run_dir = Path(run_dir)
    latest = run_dir / "LATEST"
    on_disk = _on_disk(run_dir)
    if not latest.exists() and not on_disk:
        return None
    name = latest.read_bytes().decode("utf-8", "replace").strip() if latest.is_file() else ""
    named = run_dir / name if _NAME.match(name) else None
    candidates = ([named] if named is not None else []) + [p for _, p in on_disk if p != named]
    problems = [] if named is not None or not latest.exists() else [f"{latest} names no checkpoint ({name[:40]!r})"]
    for path in candidates:
        try:
            ck = _open(path)
        except DamagedArtifact as e:
            problems.append(str(e))
            continue
        for problem in problems:
            say(f"skipping a damaged checkpoint: {problem}")
        if problems:
            say(f"resuming from {path.name} (step {ck.step}), the newest intact checkpoint")
        return ck
    first = problems[0].split("; ")[0] if problems else f"{latest} names nothing"
    raise SailError(f"no intact checkpoint in {run_dir} ({first}); start over with another --out")


def _open(path: Path) -> Checkpoint:
    """Read one checkpoint folder's metadata and verify its files against checksums.json."""
    if not path.is_dir():
        raise DamagedArtifact(f"{path}: checkpoint is missing")
    meta = read_json(path / "checkpoint.json", what="checkpoint metadata", required=("step", "state"), todo=_TODO)
    if (path / CHECKSUMS).exists():  # checkpoints from before sail 0.3 have none and are trusted
        sums = read_json(path / CHECKSUMS, what="checkpoint checksums", todo=_TODO)
        bad = verify_checksums(path, sums)
        if bad:
            raise DamagedArtifact(f"{path}: checkpoint is damaged ({', '.join(bad)} no longer match their checksums)")
    if not isinstance(meta["step"], int) or not isinstance(meta["state"], dict):
        raise DamagedArtifact(f"{path / 'checkpoint.json'}: checkpoint metadata is damaged (step or state of the wrong type)")
    return Checkpoint(path, meta["step"], meta["state"], meta)


def check_resume(run_dir: str | Path, settings_file: str, settings: dict, resume: bool,
                 free: tuple[str, ...] | set[str] = (), defaults: dict | None = None) -> Checkpoint | None:
    """The resume rule (module doc) for a run whose settings live in RUN/`settings_file` (JSON or YAML):
    the checkpoint to continue from (its `settings` holding the saved ones), or None for a fresh start.
    Raises SailError when RUN holds a run and `resume` is false, or when `settings` differ from the saved
    ones, naming each differing flag. Keys in `free` may differ; a key the saved file lacks (a setting
    added since the run began) compares against `defaults[key]`, and is not compared without one."""
    import yaml

    run = Path(run_dir)
    if run.exists() and not run.is_dir():
        raise SailError(f"--out {run} is a file; a run is a directory: choose another --out")
    saved = run / settings_file
    holds_run = saved.is_file() and ((run / "LATEST").exists() or (run / "model.safetensors").exists())
    if not holds_run:
        if resume and run.exists() and any(run.iterdir()) and not saved.is_file():
            raise SailError(f"{run} has no {settings_file} to resume from")
        return None  # nothing there, or a failed start: reused as new
    if not resume:
        raise SailError(f"{run} already holds a run; pass --resume to continue it or choose another --out")
    # json for .json: PyYAML (YAML 1.1) reads JSON's 1e-05 as a string
    if saved.suffix == ".json":
        old = read_json(saved, what="the run's saved settings", todo="restore it, or start over with another --out")
    else:
        try:
            old = yaml.safe_load(saved.read_text()) or {}
        except yaml.YAMLError:
            old = None
        if not isinstance(old, dict):
            raise SailError(f"{saved}: the run's saved settings are damaged (not a YAML mapping); "
                            "restore it, or start over with another --out")
    defaults = defaults or {}

    def before(k):
        return old[k] if k in old else defaults.get(k, settings[k])

    diff = [k for k in settings if k not in free and before(k) != settings[k]]
    if diff:
        raise SailError(f"cannot resume {run}: settings differ from the saved run "
                        f"({', '.join('--' + k.replace('_', '-') for k in diff)}); use the same settings or another --out")
    ck = load_checkpoint(run)
    if ck is None:
        raise SailError(f"{run} holds a finished run without checkpoints; choose another --out")
    ck.settings = old
    return ck
