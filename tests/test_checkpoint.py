"""sail.train.checkpoint: the one checkpoint module of align and the recipes: RNG (torch, numpy, Python), data
position, keep-last-N, atomic LATEST, checkpoints written by 0.1, and the resume rule."""

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from sail.core.errors import SailError
from sail.train.checkpoint import check_resume, load_checkpoint, save_checkpoint
from sail.train.runlog import read_metrics


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
    for f in [*path.glob("rng-rank0.*"), path / "checksums.json"]:  # 0.1 had neither
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


def test_json_settings_keep_their_floats(tmp_path):
    # train_config.json holds lr 1e-05; read as YAML 1.1 that is the string "1e-05" and every resume differs
    run = tmp_path / "run"
    save_checkpoint(run, 1, _model())
    (run / "train_config.json").write_text(json.dumps({"lr": 1e-5}))
    assert check_resume(run, "train_config.json", {"lr": 1e-5}, resume=True).settings == {"lr": 1e-5}


def test_settings_added_since_the_run_began_compare_as_their_defaults(tmp_path):
    run = tmp_path / "run"
    save_checkpoint(run, 2, _model())
    (run / "cfg.json").write_text(json.dumps({"lr": 0.1}))  # written before `average` existed
    assert check_resume(run, "cfg.json", {"lr": 0.1, "average": "pairs"}, True, defaults={"average": "pairs"}).step == 2
    with pytest.raises(SailError, match=r"settings differ from the saved run \(--average\)"):
        check_resume(run, "cfg.json", {"lr": 0.1, "average": "rows"}, True, defaults={"average": "pairs"})


def _align_runner(tmp_path):
    from sail.train.align_heads import AlignConfig, align
    from synthetic import paired_stores

    img, txt = paired_stores(tmp_path, n=200)

    def run(out, resume=False, other=False, steps=3):
        cfg = AlignConfig(image=str(img), text=str(txt), out=str(out), head="linear", out_dim=8, batch=64 if other else 32,
                          steps=steps, val_fraction=0.0, progress=False, log_every=1)
        return align(cfg, resume=resume).steps

    return run, "train_config.json", "--batch"


def _recipe_runner(tmp_path):
    from sail.recipes.alip import main

    def run(out, resume=False, other=False, steps=3):
        argv = ["--config", "alip-tiny", "--out", str(out), "--device", "cpu", "--workers", "0", "--progress",
                "false", "--eval_every", "0", "--batch_size", "8" if other else "16", "--steps", str(steps)]
        main(argv + (["--resume"] if resume else []))
        return max(r["step"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r)

    return run, "recipe-config.yaml", "--batch-size"


@pytest.mark.parametrize("runner", [_align_runner, _recipe_runner], ids=["align", "recipe"])
def test_align_and_recipes_follow_one_resume_rule(runner, tmp_path):
    run, settings_file, batch_flag = runner(tmp_path)
    out = tmp_path / "out"
    assert run(out) == 3
    with pytest.raises(SailError, match="already holds a run; pass --resume to continue it or choose another --out"):
        run(out)
    with pytest.raises(SailError, match=f"cannot resume .*settings differ from the saved run \\({batch_flag}\\)"):
        run(out, resume=True, other=True)
    assert run(out, resume=True) == 3  # the same settings: continues (here, a finished run: nothing left to do)
    # a failed start (settings, no checkpoint, no model) is reused as new, other settings and all
    for p in [*out.glob("checkpoint-*"), out / "LATEST", out / "model.safetensors"]:
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    assert (out / settings_file).is_file()
    assert run(out, other=True) == 3
    # --resume into a folder that holds something else
    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "notes.txt").write_text("x")
    with pytest.raises(SailError, match=f"has no {settings_file} to resume from"):
        run(stray, resume=True)
    assert (stray / "notes.txt").read_text() == "x" and sorted(p.name for p in stray.iterdir()) == ["notes.txt"]


def _weights(ck):
    m = _model()
    ck.restore(m, rng=False)
    return m[0].weight.detach().clone()


def test_bit_rot_in_the_latest_checkpoint_falls_back_to_the_newest_intact_one(tmp_path):
    model, said = _model(), []
    save_checkpoint(tmp_path, 1, model, keep=3)
    first = model[0].weight.detach().clone()
    with torch.no_grad():
        model[0].weight.add_(1.0)
    save_checkpoint(tmp_path, 2, model, keep=3)
    f = tmp_path / "checkpoint-00000002" / "model.safetensors"
    blob = bytearray(f.read_bytes())
    blob[-3] ^= 0x10  # one flipped bit in a weight: safetensors itself would load it without complaint
    f.write_bytes(bytes(blob))
    ck = load_checkpoint(tmp_path, say=said.append)
    assert ck.step == 1 and torch.equal(_weights(ck), first)
    assert "checkpoint-00000002" in said[0] and "model.safetensors" in said[0] and "step 1" in said[1]


def test_no_intact_checkpoint_is_one_error_line(tmp_path):
    save_checkpoint(tmp_path, 1, _model())
    (tmp_path / "checkpoint-00000001" / "checkpoint.json").write_text('{"step": 1, "sta')
    with pytest.raises(SailError, match=r"no intact checkpoint .*checkpoint metadata is damaged \(truncated\)"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize("crash_at", [1, 2, 3])  # the renames of a re-save: aside, into place, LATEST
def test_resaving_a_step_never_leaves_latest_dangling(tmp_path, monkeypatch, crash_at):
    import os

    import sail.core.artifacts
    import sail.train.checkpoint

    model = _model()
    save_checkpoint(tmp_path, 5, model)
    before = model[0].weight.detach().clone()
    with torch.no_grad():
        model[0].weight.mul_(2)
    calls, real = [], os.replace

    def crashing(a, b):
        calls.extend([b] if Path(b).parent == tmp_path else [])  # the run folder's renames, not files inside a checkpoint
        if len(calls) == crash_at and Path(b).parent == tmp_path:
            raise KeyboardInterrupt  # the process dies here
        return real(a, b)

    monkeypatch.setattr(sail.train.checkpoint.os, "replace", crashing)
    monkeypatch.setattr(sail.core.artifacts.os, "replace", crashing)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 5, model)
    monkeypatch.undo()
    ck = load_checkpoint(tmp_path, say=lambda _: None)
    assert ck.step == 5  # a complete step-5 checkpoint, old or new, is always found
    assert torch.equal(_weights(ck), before if crash_at < 3 else model[0].weight.detach())


def test_a_garbage_latest_falls_back_to_the_checkpoints_on_disk(tmp_path):
    save_checkpoint(tmp_path, 3, _model())
    (tmp_path / "LATEST").write_bytes(b"\x00\xff../../etc")
    said = []
    assert load_checkpoint(tmp_path, say=said.append).step == 3 and "names no checkpoint" in said[0]
