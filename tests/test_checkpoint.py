"""sail.checkpoint: the one checkpoint module of align and the recipes: RNG (torch, numpy, Python), data
position, keep-last-N, atomic LATEST, checkpoints written by 0.1, and the resume rule."""

import json
import random

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from sail.checkpoint import check_resume, load_checkpoint, save_checkpoint
from sail.errors import SailError


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))


def test_round_trip_with_rng_position_and_keep(tmp_path):
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(5, 3)).sum().backward()
    opt.step()
    for step in (1, 2, 3):
        torch.manual_seed(step), np.random.seed(step), random.seed(step)
        save_checkpoint(tmp_path, step, model, opt, state={"epoch": step}, position=[step, 7], keep=2)
    expected = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])  # draws after step 3's save
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-00000002", "checkpoint-00000003"]
    assert (tmp_path / "LATEST").read_text() == "checkpoint-00000003"

    ck = load_checkpoint(tmp_path)
    assert ck.step == 3 and ck.position == [3, 7] and ck.state == {"epoch": 3}
    fresh = _model()
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=0.1)
    torch.manual_seed(99), np.random.seed(99), random.seed(99)
    ck.restore(fresh, fresh_opt)
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1]) and [random.random() for _ in range(3)] == expected[2]
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values()):
        assert torch.equal(a, b)
    assert fresh_opt.state_dict()["state"][0]["step"] == opt.state_dict()["state"][0]["step"]


def test_a_half_written_checkpoint_is_never_latest(tmp_path):
    model = _model()
    save_checkpoint(tmp_path, 1, model)
    (tmp_path / "checkpoint-00000002.tmp").mkdir()  # killed while writing step 2
    assert load_checkpoint(tmp_path).step == 1
    save_checkpoint(tmp_path, 2, model)  # the next save replaces the leftover
    assert load_checkpoint(tmp_path).step == 2 and not (tmp_path / "checkpoint-00000002.tmp").exists()


def test_checkpoints_written_by_0_1_still_restore(tmp_path):
    model = _model()
    path = save_checkpoint(tmp_path, 1, model)
    for f in path.glob("rng-rank0.*"):
        f.unlink()
    torch.manual_seed(5)
    save_file({"rng.cpu": torch.get_rng_state()}, str(path / "rng.safetensors"))  # the 0.1 layout
    expected = torch.rand(2)
    torch.manual_seed(6)
    load_checkpoint(tmp_path).restore(_model())
    assert torch.equal(torch.rand(2), expected)


def test_the_resume_rule(tmp_path):
    run = tmp_path / "run"
    settings = {"batch_size": 8, "lr": 0.1}
    assert check_resume(run, "cfg.json", settings, resume=False) is None  # nothing there: fresh
    run.mkdir()
    (run / "cfg.json").write_text(json.dumps(settings))
    assert check_resume(run, "cfg.json", settings, resume=False) is None  # a failed start is reused as new
    save_checkpoint(run, 4, _model())
    with pytest.raises(SailError, match="already holds a run; pass --resume to continue it or choose another --out"):
        check_resume(run, "cfg.json", settings, resume=False)
    assert check_resume(run, "cfg.json", settings, resume=True).step == 4
    assert check_resume(run, "cfg.json", {**settings, "lr": 0.2}, resume=True, free=("lr",)).step == 4
    with pytest.raises(SailError, match=r"settings differ from the saved run \(--batch-size\)"):
        check_resume(run, "cfg.json", {**settings, "batch_size": 16}, resume=True)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("x")
    with pytest.raises(SailError, match="has no cfg.json to resume from"):
        check_resume(other, "cfg.json", settings, resume=True)
