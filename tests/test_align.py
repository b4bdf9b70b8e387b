"""`sail align`: learns a known shared latent, saves/loads exactly, resumes after kill -9, rejects bad input."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from sail.cli import main
from sail.core.errors import SailError
from sail.data.store import FeatureStore
from sail.train.align_heads import AlignConfig, align
from sail.train.heads import AlignmentHeads
from synthetic import paired_stores, write_store


def _cfg(tmp_path, img, txt, **kw):
    base = dict(image=str(img), text=str(txt), out=str(tmp_path / "run"), head="linear", out_dim=32, batch=256,
                steps=120, lr=2e-3, optimizer="adamw", weight_decay=0.0, val_fraction=0.1, eval_every=60,
                checkpoint_every=1000, progress=False, init_scale=10.0, log_every=1)
    base.update(kw)
    return AlignConfig(**base)


def test_training_raises_heldout_recall_from_chance_to_near_ceiling(tmp_path):
    img, txt = paired_stores(tmp_path)
    result = align(_cfg(tmp_path, img, txt, head="glu", width=2))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 120 and rows[-1]["loss"] < 0.5 * rows[0]["loss"]
    # 200 held-out pairs: chance R@1 is 0.5 %; the latent is shared up to noise 0.3, so near-perfect is reachable.
    assert result.metrics["val_i2t_R@1"] > 80 and result.metrics["val_t2i_R@1"] > 80
    for name in ("config.json", "model.safetensors", "curves.png", "summary.json", "train_config.json"):
        assert (tmp_path / "run" / name).exists()


def test_round_trip_and_config_records_encoders(tmp_path):
    img, txt = paired_stores(tmp_path, n=600)
    align(_cfg(tmp_path, img, txt, steps=5))
    heads = AlignmentHeads.from_pretrained(tmp_path / "run")
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["image_encoder"]["model_id"] == "synthetic-vision" and cfg["text_encoder"]["model_id"] == "synthetic-text"
    assert cfg["loss"] == "sigmoid" and cfg["kind"] == "linear" and cfg["image_dim"] == 48
    x = torch.from_numpy(FeatureStore(img).read("image", slice(0, 10))).float()
    e1, e2 = heads.encode_image(x), AlignmentHeads.from_pretrained(tmp_path / "run").encode_image(x)
    assert torch.equal(e1, e2) and torch.allclose(e1.norm(dim=1), torch.ones(10), atol=1e-5)
    with pytest.raises(SailError, match="dim"):
        heads.encode_text(torch.zeros(2, 48))


@pytest.mark.parametrize("loss", ["multi-positive", "info-nce"])
def test_other_losses_train(tmp_path, loss):
    img, txt = paired_stores(tmp_path, n=800, captions=("caption", "long_caption"))
    result = align(_cfg(tmp_path, img, txt, loss=loss, steps=60, init_scale=10.0))
    assert result.metrics["val_i2t_R@1"] > 40
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["captions"] == (["caption", "long_caption"] if loss == "multi-positive" else ["caption"])


def test_streaming_matches_in_memory_statistics(tmp_path):
    img, txt = paired_stores(tmp_path, n=1200)
    a = align(_cfg(tmp_path, img, txt, steps=40, out=str(tmp_path / "mem"), in_memory="yes"))
    b = align(_cfg(tmp_path, img, txt, steps=40, out=str(tmp_path / "stream"), in_memory="no"))
    assert b.metrics["val_i2t_R@1"] > 60 and a.metrics["val_i2t_R@1"] > 60


@pytest.mark.parametrize("in_memory", ["yes", "no"])
def test_kill_and_resume_gives_identical_weights(tmp_path, in_memory, capsys):
    # "no": streamed, blocks of 200 rows 2 per buffer, batch 128 not dividing them: batches straddle buffers
    img, txt = paired_stores(tmp_path, n=1200)
    args = ["--image", str(img), "--text", str(txt), "--head", "mlp", "--width", "2", "--out-dim", "32", "--batch", "128",
            "--steps", "160", "--optimizer", "lion", "--lr", "1e-4", "--checkpoint-every", "10", "--eval-every", "50",
            "--val-fraction", "0.1", "--in-memory", in_memory, "--stream-block-rows", "200", "--stream-buffer-blocks", "2"]
    ref = tmp_path / "ref"
    subprocess.run([sys.executable, "-m", "sail.cli", "align", *args, "--out", str(ref)], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run = tmp_path / "killed"
    cmd = [sys.executable, "-m", "sail.cli", "align", *args, "--out", str(run)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not list(run.glob("checkpoint-000000[3-9]0")):
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run / "model.safetensors").exists(), "the kill should land mid-run"
    capsys.readouterr()  # the refusal needs no process of its own (the kill and the resume do)
    assert main(["align", *args, "--out", str(run)]) == 2 and "--resume" in capsys.readouterr().err
    subprocess.run(cmd + ["--resume"], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    from safetensors.torch import load_file

    a, b = load_file(str(ref / "model.safetensors")), load_file(str(run / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 160


def test_nan_loss_stops_with_clear_message_and_keeps_checkpoint(tmp_path):
    img, txt = paired_stores(tmp_path, n=600)
    with pytest.raises(SailError, match="loss became nan.*checkpoint"):
        align(_cfg(tmp_path, img, txt, steps=50, lr=1e30, optimizer="adamw", checkpoint_every=1))
    assert (tmp_path / "run" / "LATEST").exists() and not (tmp_path / "run" / "model.safetensors").exists()


def test_bad_inputs(tmp_path):
    img, txt = paired_stores(tmp_path, n=300)
    with pytest.raises(SailError, match="no caption field 'long'"):
        align(_cfg(tmp_path, img, txt, captions=["long"]))
    other = write_store(tmp_path / "other.h5", [f"x{i}" for i in range(300)],
                        {"caption": np.zeros((300, 32), np.float16)}, "text", "synthetic-text")
    with pytest.raises(SailError, match="share no valid sample ids"):
        align(_cfg(tmp_path, img, other))
    with pytest.raises(SailError, match="--image .*txt.h5 holds text features"):
        align(_cfg(tmp_path, txt, img))
    import shutil

    shutil.copy(img, tmp_path / "img2.h5")
    with pytest.raises(SailError, match="--text .*img2.h5 holds image features"):
        align(_cfg(tmp_path, img, tmp_path / "img2.h5"))
    vt = write_store(tmp_path / "vt.h5", [f"id{i:05d}" for i in range(50)],
                     {"caption": np.zeros((50, 32), np.float16)}, "text", "another-text-model")
    with pytest.raises(SailError, match="different encoders"):
        align(_cfg(tmp_path, img, txt, val_image=str(img), val_text=str(vt)))
    with pytest.raises(SailError, match="unknown loss"):
        align(_cfg(tmp_path, img, txt, loss="hinge"))
    align(_cfg(tmp_path, img, txt, steps=2))
    with pytest.raises(SailError, match="already holds a run"):
        align(_cfg(tmp_path, img, txt, steps=2))
    with pytest.raises(SailError, match="settings differ"):
        align(_cfg(tmp_path, img, txt, steps=2, lr=1.0), resume=True)
    # the same paths re-extracted with another encoder: resuming would mix feature spaces
    write_store(img, [f"id{i:05d}" for i in range(300)], {"image": np.zeros((300, 48), np.float16)}, "image",
                "another-vision-model")
    with pytest.raises(SailError, match="other encoders"):
        align(_cfg(tmp_path, img, txt, steps=2), resume=True)


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("in_memory", ["yes", "no"])
def test_torchrun_two_processes_match_one(tmp_path, in_memory):
    # "no": each rank streams only its half of every global batch from the stores
    img, txt = paired_stores(tmp_path, n=600)
    if in_memory == "no":  # two NaN rows, found by the ranks' shared check (each reads half the slabs)
        s = FeatureStore(img)
        x, ids = s.read("image"), list(s.ids)
        s.close()
        x[[7, 400]] = np.nan
        write_store(img, ids, {"image": x}, "image", "synthetic-vision")
    args = ["--image", str(img), "--text", str(txt), "--head", "glu", "--width", "2", "--out-dim", "16", "--batch", "128",
            "--steps", "6", "--optimizer", "adamw", "--lr", "1e-3", "--val-fraction", "0.1", "--eval-every", "6",
            "--in-memory", in_memory, "--stream-block-rows", "100", "--stream-buffer-blocks", "2"]
    assert main(["align", *args, "--out", str(tmp_path / "one")]) == 0  # in-process: only the pair needs torchrun
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        str(_free_port()), "-m", "sail.cli", "align", *args, "--out", str(tmp_path / "two")],
                       capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    from safetensors.torch import load_file

    a, b = load_file(str(tmp_path / "one" / "model.safetensors")), load_file(str(tmp_path / "two" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4), k
    used = [json.loads((tmp_path / d / "config.json").read_text())["train"] for d in ("one", "two")]
    assert used[0] == used[1] and used[0]["pairs"] + used[0]["val_pairs"] == (598 if in_memory == "no" else 600)


def _cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "sail.cli", "align", *map(str, args)], capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), **kw)


def test_streamed_epochs_never_run_short(tmp_path):
    # 611 pairs, batch 96, blocks of 256 rows, 2 per buffer, seed 1: the old streaming plan yielded 6 batches in
    # epoch 0 and 5 in epoch 1, so `while step < total` spun forever at step 11 of 12.
    img, txt = paired_stores(tmp_path, n=611)
    r = _cli("--image", img, "--text", txt, "--out", tmp_path / "run", "--head", "linear", "--out-dim", "8",
             "--batch", "96", "--epochs", "2", "--seed", "1", "--val-fraction", "0", "--in-memory", "no",
             "--stream-block-rows", "256", "--stream-buffer-blocks", "2", "--optimizer", "adamw", "--lr", "1e-3",
             "--log-every", "1", timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 13))


class _StopAt:
    """Stands in for align's Ctrl-C handler: asks the loop to stop before step `at` + 1."""

    def __init__(self, at):
        import sail.train.align_heads as A

        self.at, self.calls, self.base = at, 0, A._StopRequest

    def __call__(self):
        import sail.train.align_heads as A

        outer = self

        class Stop(self.base):
            def check(self):
                outer.calls += 1
                if outer.calls > outer.at:
                    raise A._GracefulStop

        return Stop()


def test_stop_checkpoints_and_streamed_resume_keeps_its_mode_and_is_exact(tmp_path, monkeypatch):
    import sail.train.align_heads as A
    from safetensors.torch import load_file

    img, txt = paired_stores(tmp_path, n=700)
    kw = dict(steps=12, head="glu", width=2, batch=96, stream_block_rows=128, stream_buffer_blocks=2,
              checkpoint_every=1000, eval_every=1000, optimizer="lion", lr=1e-3)
    align(_cfg(tmp_path, img, txt, out=str(tmp_path / "ref"), in_memory="no", **kw))
    monkeypatch.setattr(A, "_StopRequest", _StopAt(5))
    with pytest.raises(A.AlignInterrupted) as e:
        align(_cfg(tmp_path, img, txt, in_memory="no", **kw))
    assert e.value.step == 5 and e.value.checkpoint_step == 5  # a checkpoint was written although none was due
    monkeypatch.undo()
    # resuming with --in-memory auto where the features would fit: the run keeps streaming (same batch order)
    monkeypatch.setattr(A, "_fits", lambda nbytes, device: True)
    with pytest.raises(SailError, match="--in-memory yes.*streamed"):
        align(_cfg(tmp_path, img, txt, in_memory="yes", **kw), resume=True)
    align(_cfg(tmp_path, img, txt, in_memory="auto", **kw), resume=True)
    assert json.loads((tmp_path / "run" / "train_config.json").read_text())["batching"]["mode"] == "stream"
    a, b = load_file(str(tmp_path / "ref" / "model.safetensors")), load_file(str(tmp_path / "run" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_memory_run_resumes_in_memory_even_when_auto_would_stream(tmp_path, monkeypatch):
    import sail.train.align_heads as A

    img, txt = paired_stores(tmp_path, n=400)
    monkeypatch.setattr(A, "_StopRequest", _StopAt(3))
    with pytest.raises(A.AlignInterrupted):
        align(_cfg(tmp_path, img, txt, steps=6, batch=64, in_memory="auto"))
    monkeypatch.undo()
    monkeypatch.setattr(A, "_fits", lambda nbytes, device: False)
    align(_cfg(tmp_path, img, txt, steps=6, batch=64, in_memory="auto"), resume=True)
    assert json.loads((tmp_path / "run" / "train_config.json").read_text())["batching"]["mode"] == "memory"
    fresh = align(_cfg(tmp_path, img, txt, steps=1, batch=64, in_memory="auto", out=str(tmp_path / "fresh")))
    assert json.loads((fresh.run_dir / "train_config.json").read_text())["batching"]["mode"] == "stream"


def test_resume_recognises_moved_runs_and_stores_not_spellings(tmp_path, monkeypatch):
    import shutil

    import sail.train.align_heads as A

    img, txt = paired_stores(tmp_path, n=400)
    monkeypatch.chdir(tmp_path)
    kw = dict(steps=6, batch=64, checkpoint_every=1000)
    monkeypatch.setattr(A, "_StopRequest", _StopAt(2))
    with pytest.raises(A.AlignInterrupted):
        align(_cfg(tmp_path, "img.h5", "txt.h5", out="runs/x", **kw))
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    # another spelling of the same run directory and stores
    monkeypatch.setattr(A, "_StopRequest", _StopAt(1))
    with pytest.raises(A.AlignInterrupted) as e:
        align(_cfg(tmp_path, str(img), "./txt.h5", out="./runs/../runs/x", **kw), resume=True)
    assert e.value.step == 3
    monkeypatch.undo()
    # the run directory moved and the image store copied elsewhere: still the same run
    shutil.move(tmp_path / "runs" / "x", tmp_path / "moved")
    (tmp_path / "copies").mkdir()
    shutil.copy(img, tmp_path / "copies" / "img.h5")
    (tmp_path / "others").mkdir()
    other, _ = paired_stores(tmp_path / "others", n=300, seed=1)
    with pytest.raises(SailError, match="--image .* is another store"):
        align(_cfg(tmp_path, other, txt, out=str(tmp_path / "moved"), **kw), resume=True)
    r = align(_cfg(tmp_path, tmp_path / "copies" / "img.h5", txt, out=str(tmp_path / "moved"), **kw), resume=True)
    assert r.steps == 6
    steps = [json.loads(line)["step"] for line in (tmp_path / "moved" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_failed_start_leaves_a_reusable_directory(tmp_path, monkeypatch):
    import sail.train.align_heads as A

    img, txt = paired_stores(tmp_path, n=300)

    def boom(*a, **k):
        raise RuntimeError("crash in the first step")

    monkeypatch.setattr(A, "_loss", boom)
    with pytest.raises(RuntimeError):
        align(_cfg(tmp_path, img, txt, steps=3))
    assert (tmp_path / "run" / "train_config.json").exists()
    monkeypatch.undo()
    assert align(_cfg(tmp_path, img, txt, steps=3, lr=1e-3)).steps == 3  # no --resume needed, other settings fine
    with pytest.raises(SailError, match="already holds a run"):
        align(_cfg(tmp_path, img, txt, steps=3))


def test_sigint_checkpoints_and_prints_the_command_that_resumes(tmp_path):
    img, txt = paired_stores(tmp_path, n=1200)
    run = tmp_path / "run"
    args = ["--image", str(img), "--text", str(txt), "--out", str(run), "--head", "mlp", "--out-dim", "16", "--batch", "64",
            "--steps", "100000", "--checkpoint-every", "100000", "--in-memory", "no", "--stream-block-rows", "256",
            "--log-every", "1"]
    proc = subprocess.Popen([sys.executable, "-m", "sail.cli", "align", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    deadline = time.time() + 240
    while time.time() < deadline and (not (run / "metrics.jsonl").exists()
                                      or len((run / "metrics.jsonl").read_text().splitlines()) < 3):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 130, err[-2000:]
    command = err.strip().splitlines()[-1].strip()
    assert command.startswith("sail align ") and command.endswith("--resume") and f"--out {run}" in command
    step = int(err.split("interrupted at step ")[1].split()[0])
    assert step >= 3 and f"the last checkpoint is step {step}" in err
    from sail.train.checkpoint import load_checkpoint

    assert load_checkpoint(run).step == step


def test_checks_before_training_name_the_flag(tmp_path, capsys):
    from sail.cli import main

    img, txt = paired_stores(tmp_path, n=300)
    base = ["align", "--image", str(img), "--text", str(txt), "--out", str(tmp_path / "run")]
    for flags, needle in [(["--steps", "0"], "--steps 0"), (["--batch", "1"], "--batch 1"), (["--batch", "0"], "--batch 0"),
                          (["--batch", "-5"], "--batch -5"), (["--epochs", "0"], "--epochs 0"),
                          (["--val-fraction", "1.5"], "--val-fraction 1.5"), (["--lr", "-1"], "--lr -1.0"),
                          (["--width", "0"], "--width 0"), (["--checkpoint-every", "0"], "--checkpoint-every 0"),
                          (["--in-memory", "maybe"], "--in-memory maybe"), (["--warmup", "-0.1"], "--warmup -0.1")]:
        assert main(base + flags) == 2, flags
        err = capsys.readouterr().err
        assert err.startswith("error: ") and needle in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists()  # nothing written for a refused run


def test_nonfinite_rows_are_skipped_and_join_drops_are_reported(tmp_path, capsys):
    rng = np.random.default_rng(0)
    ids = [f"id{i:04d}" for i in range(400)]
    image = rng.standard_normal((400, 24)).astype(np.float16)
    text = rng.standard_normal((400, 16)).astype(np.float16)
    image[[3, 10], 5] = np.nan
    text[7, 0] = np.inf
    img = write_store(tmp_path / "img.h5", ids, {"image": image}, "image", "synthetic-vision")
    # the text store lacks the first 30 ids and holds 20 ids the image store does not
    txt = write_store(tmp_path / "txt.h5", ids[30:] + [f"extra{i}" for i in range(20)],
                      {"caption": np.concatenate([text[30:], text[:20]])}, "text", "synthetic-text")
    text_bad = write_store(tmp_path / "txt2.h5", ids, {"caption": text}, "text", "synthetic-text")
    align(_cfg(tmp_path, img, txt, steps=1, val_fraction=0, batch=64))
    out = capsys.readouterr().out
    assert "kept 370 pairs; dropped 30 of 400 rows" in out and "20 of 390 rows" in out
    assert "skipping" not in out  # the NaN rows 3 and 10 are among the 30 ids the join dropped
    align(_cfg(tmp_path, img, text_bad, steps=1, val_fraction=0, batch=64, out=str(tmp_path / "r2")))
    out = capsys.readouterr().out
    assert "skipping 3 training pairs with NaN/Inf features (ids id0003, id0007, id0010)" in out
    cfg = json.loads((tmp_path / "r2" / "config.json").read_text())
    assert cfg["train"]["pairs"] == 397


def test_stores_with_repeated_or_empty_ids_are_refused(tmp_path):
    # the join would silently keep one row of a repeated id; sail.data.store refuses such stores on open
    img, txt = paired_stores(tmp_path, n=300)
    x = np.zeros((300, 32), np.float16)
    for ids, needle in [([f"id{i:05d}" for i in range(299)] + ["id00005"], "id00005"),
                        ([f"id{i:05d}" for i in range(299)] + [""], "empty id")]:
        bad = write_store(tmp_path / "bad.h5", ids, {"caption": x}, "text", "synthetic-text")
        with pytest.raises(SailError, match=f"bad.h5.*{needle}|{needle}.*bad.h5"):
            align(_cfg(tmp_path, img, bad, steps=1))
        assert not (tmp_path / "run").exists()


def test_a_streamed_run_leaves_no_file_open(tmp_path):
    """-W error::ResourceWarning: the stream's mapped store files are closed with it (they were left to the
    garbage collector, which warned from the reader thread)."""
    img, txt = paired_stores(tmp_path, n=300)
    r = subprocess.run([sys.executable, "-X", "dev", "-W", "error::ResourceWarning", "-m", "sail.cli", "align",
                        "--image", str(img), "--text", str(txt), "--out", str(tmp_path / "run"), "--head", "linear",
                        "--out-dim", "8", "--batch", "64", "--steps", "6", "--in-memory", "no", "--stream-block-rows",
                        "64", "--val-fraction", "0.1", "--eval-every", "3"], capture_output=True, text=True,
                       env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "ResourceWarning" not in r.stderr and "Exception ignored" not in r.stderr, r.stderr[-2000:]
