"""The one training loop of sail: `sail align` (heads on cached features) and every recipe (towers end to end)
run their steps through `train_loop`, with one set of guards and one save function.

    loop = Loop(run_dir, model, optimizer, scheduler, scaler=scaler, total=1000, start=0, log_every=50,
                checkpoint_every=500, world=world, hint="try a lower --lr")
    step = train_loop(loop, batches, step_fn, on_log, stop=StopRequest())

`batches` yields one item per attempted step, None where no usable batch could be made (every image of a
recipe batch failed to load); `step_fn(item, step)` runs the optimizer step and returns a device tensor whose
element 0 is the loss (nothing in a step waits for the device); `on_log(step, since, seconds, checkpoint)`
reads the device statistics at log points (every `log_every` steps, the last step, checkpoint steps and the
steps `must_log(step)` asks for).

Guards, the same for every caller:
- finite: a NaN/Inf loss is remembered on the device and stops the run at the next log point with one error
  naming the last good checkpoint; before a checkpoint the weights are checked too (a bad step is never saved);
- usable batches: `max_unusable` attempts in a row without a usable batch end the run with one error naming
  the likely cause (`unusable_cause`), instead of looping silently;
- graceful stop: a first Ctrl-C (StopRequest) asks the run to stop between steps; under torch.distributed the
  ranks agree on it through one all-reduce per step (on a gloo group, so it never waits for the device),
  so every rank stops after the same step, a checkpoint of that step is written (collectively) and
  `Interrupted` says where the run stands;
- checkpoints: `save` (sail.train.checkpoint.save_checkpoint, every rank taking part, each writing its RNG state)
  always carries the GradScaler's state, so a resumed fp16 run continues exactly; `restore` is its inverse.
"""

from __future__ import annotations

import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch

from sail.core.errors import SailError
from sail.train.checkpoint import load_checkpoint, save_checkpoint


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during training: where the run stopped and the step a resume starts from."""

    def __init__(self, run_dir: Path, step: int, checkpoint_step: int | None):
        super().__init__(f"interrupted at step {step}")
        self.run_dir, self.step, self.checkpoint_step = Path(run_dir), step, checkpoint_step


class GracefulStop(KeyboardInterrupt):
    """Raised by StopRequest.check when a stop was asked for; the loop turns it into a checkpoint + Interrupted."""


class StopRequest:
    """The first Ctrl-C asks the loop to stop after the step in flight (weights, optimizer and step count
    stay consistent, so a checkpoint can be written); a second one interrupts at once."""

    def __init__(self):
        self.requested, self._previous = False, None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nstopping after this step (Ctrl-C again to stop at once)", flush=True)

    def check(self) -> None:
        if self.requested:
            raise GracefulStop

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None


class _Agreement:
    """Whether any rank asked to stop: one MAX all-reduce of a CPU flag per step (a gloo group beside an
    NCCL one, so the check never waits for the GPU); the flag itself in one process."""

    def __init__(self, world: int):
        import torch.distributed as dist

        self.world, self.group = world, None
        if world > 1 and dist.get_backend() != "gloo":
            self.group = dist.new_group(backend="gloo")

    def any(self, flag: bool) -> bool:
        if self.world == 1:
            return flag
        import torch.distributed as dist

        t = torch.tensor([int(flag)], dtype=torch.int32)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return bool(t.item())


@dataclass
class Loop:
    """What the loop trains and how: the run directory, the trained modules and the cadences."""

    run_dir: Path
    model: torch.nn.Module
    optimizer: object
    scheduler: object
    total: int
    start: int = 0
    scaler: torch.amp.GradScaler | None = None
    extra_modules: dict = field(default_factory=dict)
    log_every: int = 1
    checkpoint_every: int = 500
    keep: int = 2  # checkpoints kept: two, so bit rot in the newest falls back to the one before (sail.train.checkpoint)
    world: int = 1
    hint: str = "try a lower learning rate"          # appended to the non-finite error
    max_unusable: int = 10                           # attempts in a row without a usable batch before giving up
    unusable_cause: Callable[[], str] = lambda: "every batch was unusable"
    state: Callable[[int], dict] = lambda step: {}   # JSON-able state stored with a checkpoint of `step`
    position: Callable[[], object] = lambda: None    # where the data resumes, stored with each checkpoint
    must_log: Callable[[int], bool] = lambda step: False
    bar: object = None                               # a tqdm bar to advance, or None


# ------------------------------------------------------------------------------------------ save / restore


def save(loop: Loop, step: int) -> Path:
    """The one checkpoint writer (every rank calls it): weights, optimizer, schedule, extra modules, the
    GradScaler's state when loss scaling is on, each rank's RNG state, the data position."""
    state = dict(loop.state(step))
    if loop.scaler is not None and loop.scaler.is_enabled():
        state["grad_scaler"] = loop.scaler.state_dict()
    return save_checkpoint(loop.run_dir, step, loop.model, loop.optimizer, loop.scheduler, state,
                           extra_modules=loop.extra_modules or None, keep=loop.keep, position=loop.position(),
                           collective=True)


def restore(ck, model, optimizer=None, scheduler=None, scaler=None, extra_modules=None) -> None:
    """Inverse of `save`: weights, optimizer, schedule, extra modules, GradScaler and this rank's RNG state."""
    ck.restore(model, optimizer, scheduler, extra_modules=extra_modules)
    if scaler is not None and scaler.is_enabled() and "grad_scaler" in ck.state:
        scaler.load_state_dict(ck.state["grad_scaler"])


# ------------------------------------------------------------------------------------------ guards


def _track_nonfinite(bad: torch.Tensor, loss: torch.Tensor, step: int) -> None:
    """Remember, on the device, the first step whose loss was not finite and that loss (no host sync)."""
    first = (bad[0] == 0) & ~torch.isfinite(loss)
    bad.copy_(torch.where(first, torch.stack([torch.full_like(bad[0], step), loss.to(bad.dtype)]), bad))


def check_finite(loop: Loop, bad: torch.Tensor, weights: bool) -> None:
    """At a log point: stop on a non-finite loss (and, with `weights`, on non-finite weights), naming the
    last good checkpoint."""
    step, value = bad.tolist()
    what = f"loss became {value} at step {int(step)}" if step else None
    if what is None and weights:
        params = [p for m in (loop.model, *loop.extra_modules.values()) for p in m.parameters()]
        finite = torch.stack([torch.isfinite(p).all() for p in params]).all() if params else torch.tensor(True)
        what = None if bool(finite) else "the weights became non-finite"
    if what is None:
        return
    good = load_checkpoint(loop.run_dir)
    where = f"the last good checkpoint is {good.path} (step {good.step})" if good else "no checkpoint was written yet"
    raise SailError(f"{what}; {where}; {loop.hint}")


class _Usable:
    """Counts attempts in a row without a usable batch; past the limit, one error naming the likely cause."""

    def __init__(self, loop: Loop):
        self.loop, self.misses = loop, 0

    def __call__(self, usable: bool) -> None:
        self.misses = 0 if usable else self.misses + 1
        if self.misses >= self.loop.max_unusable:
            raise SailError(f"no usable batch in {self.misses} tries: {self.loop.unusable_cause()}")


# ------------------------------------------------------------------------------------------ the loop


# ~60 lines on purpose: one loop whose state (step, steps since the last log, stop, NaN tracker) every phase uses.
def train_loop(loop: Loop, batches: Iterable, step_fn: Callable, on_log: Callable,
               stop: StopRequest | None = None) -> int:
    """Run steps loop.start+1 .. loop.total (see the module doc); returns the last step. A checkpoint is written
    every loop.checkpoint_every steps and after the last one."""
    agreement, usable = _Agreement(loop.world), _Usable(loop)
    device = next(loop.model.parameters()).device
    bad = torch.zeros(2, dtype=torch.float64, device=device)  # [first step with a non-finite loss (0: none), loss]
    step, since, tick = loop.start, 0, time.perf_counter()
    items = iter(batches)
    try:
        while step < loop.total:
            item = next(items)  # the batch sources are endless: a run ends at loop.total
            _agree_stop(stop, agreement)
            usable(item is not None)
            if item is None:
                continue
            stats = step_fn(item, step)
            step, since = step + 1, since + 1
            _track_nonfinite(bad, stats[0], step)
            if loop.bar is not None:
                loop.bar.update(1)
            checkpoint = step % loop.checkpoint_every == 0 or step == loop.total
            if not (step % loop.log_every == 0 or step == loop.total or checkpoint or loop.must_log(step)):
                continue
            check_finite(loop, bad, weights=checkpoint)
            on_log(step, since, time.perf_counter() - tick, checkpoint)
            if checkpoint:
                save(loop, step)
            since, tick = 0, time.perf_counter()  # validation and checkpoints do not count against throughput
    except KeyboardInterrupt as e:
        raise _interrupted(loop, step, isinstance(e, GracefulStop), bad) from None
    return step


def _agree_stop(stop: StopRequest | None, agreement: _Agreement) -> None:
    """Raise GracefulStop on every rank when any rank's StopRequest holds a request."""
    local = False
    if stop is not None:
        try:
            stop.check()
        except GracefulStop:
            local = True
    if agreement.any(local):
        raise GracefulStop


def _interrupted(loop: Loop, step: int, graceful: bool, bad: torch.Tensor) -> Interrupted:
    """The Interrupted to raise after Ctrl-C; a graceful stop first checkpoints a step not yet saved (unless a
    NaN/Inf loss reached the weights). Every rank takes the same decision: the loss is global."""
    ck = load_checkpoint(loop.run_dir)
    if graceful and step > loop.start and not bad[0].item() and (ck is None or ck.step < step):
        save(loop, step)
        ck = load_checkpoint(loop.run_dir)
    return Interrupted(loop.run_dir, step, ck.step if ck else None)
