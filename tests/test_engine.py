"""sail.train.engine: the one loop equals a plain training loop, its guards end hopeless runs with one error, a
Ctrl-C under two gloo processes stops both ranks at the same step and resumes exactly, and every save path
carries the GradScaler's state."""

import json
import multiprocessing
import os
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from sail.core.errors import SailError
from sail.train.checkpoint import load_checkpoint
from sail.train.engine import GracefulStop, Interrupted, Loop, StopRequest, restore, train_loop


def _batch(step: int, rank: int = 0) -> torch.Tensor:
    return torch.randn(4, 3, generator=torch.Generator().manual_seed(1000 * step + rank))


def _endless(start: int, rank: int = 0):
    step = start
    while True:
        yield _batch(step, rank)
        step += 1


def _model_and_optimizer():
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    return model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)


def _loss(model, x):
    return ((model(x).squeeze(1) - x.sum(1)) ** 2).mean()


def _sgd_step(model, opt, x, scaler=None):
    opt.zero_grad()
    loss = _loss(model, x)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    else:
        loss.backward()
        opt.step()
    return loss.detach().reshape(1)


def test_the_loop_equals_a_plain_loop_and_logs_and_saves_on_its_cadence(tmp_path):
    ref, ref_opt = _model_and_optimizer()
    ref_losses = [_sgd_step(ref, ref_opt, _batch(s)).item() for s in range(7)]

    model, opt = _model_and_optimizer()
    logged = []
    loop = Loop(tmp_path, model, opt, None, total=7, log_every=3, checkpoint_every=4, keep=5)
    step = train_loop(loop, _endless(0), lambda x, s: _sgd_step(model, opt, x),
                      lambda step, since, seconds, ck: logged.append((step, since, ck)))
    assert step == 7
    assert all(torch.equal(a, b) for a, b in zip(ref.parameters(), model.parameters()))  # bit-exact
    assert logged == [(3, 3, False), (4, 1, True), (6, 2, False), (7, 1, True)]  # every 3, checkpoints, the last
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-00000004", "checkpoint-00000007"]
    assert ref_losses[0] > ref_losses[-1]


def test_no_usable_batch_ends_in_one_error_naming_the_cause(tmp_path):
    model, opt = _model_and_optimizer()
    loop = Loop(tmp_path, model, opt, None, total=4, max_unusable=5, unusable_cause=lambda: "the images are missing")
    tries = []

    def nothing():
        while True:
            tries.append(1)
            yield None

    with pytest.raises(SailError, match=r"^no usable batch in 5 tries: the images are missing$"):
        train_loop(loop, nothing(), lambda x, s: _sgd_step(model, opt, x), lambda *a: None)
    assert len(tries) == 5
    # an unusable batch now and then is skipped: the count is of tries in a row
    model, opt = _model_and_optimizer()
    mixed = (None if i % 2 else x for i, x in enumerate(_endless(0)))
    assert train_loop(Loop(tmp_path / "b", model, opt, None, total=4, max_unusable=2), mixed,
                      lambda x, s: _sgd_step(model, opt, x), lambda *a: None) == 4


def test_a_nonfinite_loss_stops_at_the_next_log_point_naming_the_last_good_checkpoint(tmp_path):
    model, opt = _model_and_optimizer()

    def step_fn(x, step):
        loss = _sgd_step(model, opt, x)
        return loss * float("nan") if step + 1 == 3 else loss

    loop = Loop(tmp_path, model, opt, None, total=10, log_every=4, checkpoint_every=2, hint="lower the rate")
    with pytest.raises(SailError, match=r"loss became nan at step 3; the last good checkpoint is .*"
                                        r"checkpoint-00000002 \(step 2\); lower the rate"):
        train_loop(loop, _endless(0), step_fn, lambda *a: None)
    assert load_checkpoint(tmp_path).step == 2  # the bad step 4 was never saved


class _StopBefore(StopRequest):
    """A Ctrl-C that arrives before step `at` + 1 (no signal handler)."""

    def __init__(self, at):
        self.at, self.calls, self._previous, self.requested = at, 0, None, False

    def check(self):
        self.calls += 1
        if self.calls > self.at:
            raise GracefulStop


def test_every_save_path_carries_the_grad_scaler_and_a_resumed_scaled_run_is_exact(tmp_path):
    def scaler():
        return torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2)  # the scale changes every 2 steps

    def run(out, total, stop=None, resume=False):
        model, opt = _model_and_optimizer()
        sc = scaler()
        start = 0
        if resume:
            ck = load_checkpoint(out)
            restore(ck, model, opt, scaler=sc)
            start = ck.step
        loop = Loop(out, model, opt, None, total=total, start=start, scaler=sc, checkpoint_every=100)
        train_loop(loop, _endless(start), lambda x, s: _sgd_step(model, opt, x, sc), lambda *a: None, stop)
        return model, sc

    full, full_scaler = run(tmp_path / "full", 9)
    assert "grad_scaler" in load_checkpoint(tmp_path / "full").state  # the final save
    with pytest.raises(Interrupted) as e:
        run(tmp_path / "cut", 9, stop=_StopBefore(5))
    assert (e.value.step, e.value.checkpoint_step) == (5, 5)
    saved = load_checkpoint(tmp_path / "cut").state["grad_scaler"]  # the graceful-stop save
    assert saved["scale"] == 2.0**12 and saved["_growth_tracker"] == 1
    resumed, resumed_scaler = run(tmp_path / "cut", 9, resume=True)
    assert resumed_scaler.state_dict() == full_scaler.state_dict()
    assert all(torch.equal(a, b) for a, b in zip(full.parameters(), resumed.parameters()))


# ------------------------------------------------------------------------------------------ two gloo processes


def _rank(rank: int, world: int, init: str, out: str, total: int, mode: str) -> None:
    """One rank of a 2-process gloo run of the engine: 'full', 'stop' (slow steps, waits for SIGINT), 'resume'."""
    import torch.distributed as dist

    from sail.train.step import all_reduce_gradients

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    model, opt = _model_and_optimizer()
    start = 0
    if mode == "resume":
        ck = load_checkpoint(out)
        restore(ck, model, opt)
        start = ck.step

    def step_fn(x, step):
        opt.zero_grad()
        loss = _loss(model, x)
        loss.backward()
        all_reduce_gradients(model)
        opt.step()
        Path(out, f"progress-{rank}").write_text(str(step + 1))
        if mode == "stop":
            time.sleep(0.05)
        return loss.detach().reshape(1)

    loop = Loop(Path(out), model, opt, None, total=total, start=start, world=world, checkpoint_every=1000)
    try:
        result = {"step": train_loop(loop, _endless(start, rank), step_fn, lambda *a: None, StopRequest())}
    except Interrupted as e:
        result = {"step": e.step, "checkpoint": e.checkpoint_step, "interrupted": True}
    Path(out, f"result-{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def _launch(tmp_path, out, total, mode, interrupt_rank1_at=None):
    ctx = multiprocessing.get_context("spawn")
    init = tmp_path / f"init-{mode}"
    Path(out).mkdir(parents=True, exist_ok=True)
    procs = [ctx.Process(target=_rank, args=(r, 2, str(init), str(out), total, mode)) for r in range(2)]
    for p in procs:
        p.start()
    if interrupt_rank1_at is not None:
        progress = Path(out, "progress-1")
        deadline = time.time() + 120
        while time.time() < deadline and not (progress.exists() and progress.read_text()
                                               and int(progress.read_text()) >= interrupt_rank1_at):
            time.sleep(0.01)
        os.kill(procs[1].pid, signal.SIGINT)  # one rank only, as when one process of a job gets the signal
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    return [json.loads(Path(out, f"result-{r}.json").read_text()) for r in range(2)]


@pytest.mark.slow  # 3 launches of 2 processes: ~20 s idle, 85 s on the shared 2-core machine
def test_ctrl_c_on_one_of_two_gloo_ranks_stops_both_at_the_same_step_and_resumes_exactly(tmp_path):
    total = 200
    stopped = _launch(tmp_path, tmp_path / "cut", total, "stop", interrupt_rank1_at=3)
    assert stopped[0]["interrupted"] and stopped[1]["interrupted"]
    assert stopped[0]["step"] == stopped[1]["step"] and 3 <= stopped[0]["step"] < total
    assert stopped[0]["checkpoint"] == stopped[0]["step"]  # the stop step was checkpointed, by both ranks
    ck = load_checkpoint(tmp_path / "cut")
    assert sorted(p.name for p in ck.path.glob("rng-rank*.safetensors")) == ["rng-rank0.safetensors",
                                                                            "rng-rank1.safetensors"]
    _launch(tmp_path, tmp_path / "cut", total, "resume")
    _launch(tmp_path, tmp_path / "full", total, "full")
    a = load_file(str(load_checkpoint(tmp_path / "full").path / "model.safetensors"))
    b = load_file(str(load_checkpoint(tmp_path / "cut").path / "model.safetensors"))
    assert load_checkpoint(tmp_path / "cut").step == total
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_process_group_backend_follows_the_device_asked_for():
    from sail.core.distributed import backend_for

    assert backend_for("cpu") == "gloo" and backend_for(torch.device("cuda", 1)) == "nccl"
    assert backend_for("cuda") == "nccl"  # even where this machine has no GPU: the choice is the device's
    assert backend_for(None) == ("nccl" if torch.cuda.is_available() else "gloo")
