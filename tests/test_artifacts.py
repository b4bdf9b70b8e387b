"""What a disk, a user and a second terminal do to every file sail writes, and what sail must answer.

Damage (truncated, garbage, wrong JSON type, missing key, flipped bits, a deleted field), two writers
at once, a full disk or file-size limit, and Ctrl-C: each must end in one `error:` line naming the file
(or an honest, announced recovery), never a traceback, a hang, lost data or a silently wrong result.
Commands run in-process through `sail.cli.main`; the lock and file-size cases use subprocesses.
"""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from sail.cli import main
from sail.core.artifacts import DamagedArtifact, Lock, read_json, write_atomic, write_json
from sail.core.errors import SailError
from synthetic import paired_stores, write_store

SMALL = ["--head", "linear", "--out-dim", "8", "--batch", "64", "--steps", "4", "--optimizer", "adamw",
         "--val-fraction", "0.2", "--eval-every", "2", "--checkpoint-every", "2"]
ROOT = Path(__file__).resolve().parents[1]


def _one_error_line(capsys, *needles) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1 and err.startswith("error: "), err
    for n in needles:
        assert str(n) in err, (n, err)
    return err


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Two small paired stores and one finished run with an eval file and predictions."""
    root = tmp_path_factory.mktemp("hostile")
    img, txt = paired_stores(root, n=200, latent=4, image_dim=12, text_dim=8)
    run = root / "run"
    assert main(["align", "--image", str(img), "--text", str(txt), "--out", str(run), *SMALL]) == 0
    write_json(run / "eval" / "retrieval.json", {"image_to_text_R@1": 50.0})
    write_json(run / "eval" / "predictions.json", {"zeroshot": {"class_names": ["a", "b"], "labels": [0, 1],
                                                                "top5": [[0, 1], [1, 0]]}})
    return {"root": root, "img": img, "txt": txt, "run": run}


def _damage(path: Path, how: str) -> None:
    text = path.read_text()
    path.write_text({"truncated": text[: len(text) // 2], "garbage": "<html>not json</html>",
                     "wrong type": "[1, 2, 3]", "empty": ""}[how])


# ------------------------------------------------------------------------------------------ the helpers


@pytest.mark.parametrize("how", ["truncated", "garbage", "wrong type", "empty"])
def test_read_json_names_the_file_and_the_damage(tmp_path, how):
    f = tmp_path / "summary.json"
    write_json(f, {"steps": 3})
    _damage(f, how)
    with pytest.raises(DamagedArtifact) as e:
        read_json(f, what="run summary", required=("steps",))
    msg = str(e.value)
    assert msg.startswith(f"{f}: run summary is damaged (") and "\n" not in msg
    assert {"truncated": "(truncated)", "garbage": "not JSON", "wrong type": "holds a list instead of a JSON object",
            "empty": "(empty)"}[how] in msg


def test_read_json_missing_key_and_bytes(tmp_path):
    f = tmp_path / "x.json"
    write_json(f, {"other": 1})
    with pytest.raises(DamagedArtifact, match=r"missing 'steps'"):
        read_json(f, what="run summary", required=("steps",))
    f.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(DamagedArtifact, match="not text"):
        read_json(f, what="run summary")


def test_a_full_disk_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    f = tmp_path / "leaderboard.json"
    write_json(f, {"old": True})

    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(SailError, match=r"cannot write .*leaderboard.json \(no space left on the device\)"):
        write_json(f, {"new": True})
    monkeypatch.undo()
    assert json.loads(f.read_text()) == {"old": True} and os.listdir(tmp_path) == ["leaderboard.json"]


def test_a_file_size_limit_is_one_line_and_no_temporary(tmp_path):
    """A real RLIMIT_FSIZE in a subprocess: the kernel refuses the write (Python ignores SIGXFSZ)."""
    f = tmp_path / "summary.json"
    write_atomic(f, "old")
    code = ("import resource, sys\nresource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))\n"
            "from sail.cli import main\nfrom sail.core.artifacts import write_atomic\nfrom sail.core.errors import SailError\n"
            f"try:\n    write_atomic({str(f)!r}, 'x' * 5000)\nexcept SailError as e:\n    print('error:', e)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert "file too large" in r.stdout and "Traceback" not in r.stderr, (r.stdout, r.stderr)
    assert f.read_text() == "old" and os.listdir(tmp_path) == ["summary.json"]


# ------------------------------------------------------------------------------------------ two writers


def _hold(directory: Path, name: str = ".sail.lock") -> subprocess.Popen:
    """Another process holding the lock (a running sail align, say) until killed."""
    code = (f"from sail.core.artifacts import Lock\nimport time\nwith Lock({str(directory)!r}, name={name!r}):\n"
            "    print('held', flush=True)\n    time.sleep(120)\n")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert p.stdout.readline().strip() == "held"
    return p


def test_second_align_on_one_out_is_refused_naming_the_pid_and_a_dead_holder_is_taken_over(world, tmp_path, capsys):
    out = tmp_path / "run"
    holder = _hold(out)
    try:
        args = ["align", "--image", str(world["img"]), "--text", str(world["txt"]), "--out", str(out), *SMALL]
        assert main(args) == 2
        _one_error_line(capsys, f"{out} is in use by another sail align run (pid {holder.pid} on")
        assert sorted(os.listdir(out)) == [".sail.lock"]  # nothing of a run was written
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert main(args) == 0  # the holder is gone: its lock is taken over
    assert len([ln for ln in (out / "metrics.jsonl").read_text().splitlines() if '"step": 4' in ln]) == 1
    assert not (out / ".sail.lock").exists()


def test_two_identical_sweeps_one_is_refused(world, tmp_path, capsys):
    out = tmp_path / "sw"
    holder = _hold(out)
    try:
        assert main(["sweep", "--out", str(out), "--grid", "lr=1e-3", "--image", str(world["img"]),
                     "--text", str(world["txt"]), *SMALL]) == 2
        _one_error_line(capsys, "in use by another sail sweep", f"pid {holder.pid}")
    finally:
        holder.kill()
        holder.wait()


def test_lock_reentry_in_one_process_and_release(tmp_path):
    with Lock(tmp_path / "d"):
        with Lock(tmp_path / "d"):
            pass
        assert (tmp_path / "d" / ".sail.lock").exists()
    assert not (tmp_path / "d").exists()  # created for the lock, left empty: removed


# ------------------------------------------------------------------------------------------ run files


RUN_FILES = {"config.json": ("report", "push"), "summary.json": ("report", "push"),
             "train_config.json": ("report", "push"), "eval/retrieval.json": ("report", "push"),
             "eval/predictions.json": ("report",)}


@pytest.mark.parametrize("how", ["truncated", "garbage", "wrong type"])
@pytest.mark.parametrize("name", list(RUN_FILES))
def test_damaged_run_files_are_one_line_for_report_and_push(world, tmp_path, capsys, name, how):
    run = tmp_path / "run"
    shutil.copytree(world["run"], run)
    _damage(run / name, how)
    for command in RUN_FILES[name]:
        folder = tmp_path / "up"
        args = ["report", str(run)] if command == "report" else ["push", str(run), "org/name", "--dry-run", str(folder)]
        assert main(args) == 2, command
        _one_error_line(capsys, run / name if name != "config.json" or command == "report" else "config.json")
        assert not folder.exists() and not (run / "report.html").exists()
        assert not list(tmp_path.glob(".*tmp*"))


def test_push_dry_run_on_a_full_disk_leaves_nothing_and_reruns(world, tmp_path, capsys, monkeypatch):
    folder = tmp_path / "up"

    def full(src, dst, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shutil, "copy2", full)
    assert main(["push", str(world["run"]), "org/name", "--dry-run", str(folder)]) == 2
    _one_error_line(capsys, f"cannot write {folder}")
    assert not folder.exists() and os.listdir(tmp_path) == []
    monkeypatch.undo()
    assert main(["push", str(world["run"]), "org/name", "--dry-run", str(folder)]) == 0  # the rerun is not blocked
    assert (folder / "README.md").exists() and (folder / "model.safetensors").exists()


def test_push_refuses_a_recipe_run(tmp_path, capsys):
    run = tmp_path / "alip"
    write_json(run / "config.json", {"format": "sail-towers", "recipe": "alip"})
    (run / "recipe-config.yaml").write_text("recipe: alip\n")
    assert main(["push", str(run), "org/name", "--dry-run", str(tmp_path / "up")]) == 2
    _one_error_line(capsys, "is a recipe run", "sail push publishes alignment-head runs")


def test_resume_with_flipped_bits_in_the_latest_checkpoint_falls_back(world, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(world["run"], run)
    for f in ("model.safetensors", "config.json", "summary.json"):
        (run / f).unlink()  # as if killed before the end
    latest = run / (run / "LATEST").read_text().strip()
    blob = bytearray((latest / "model.safetensors").read_bytes())
    blob[-2] ^= 0x01
    (latest / "model.safetensors").write_bytes(bytes(blob))
    assert main(["align", "--image", str(world["img"]), "--text", str(world["txt"]), "--out", str(run), *SMALL,
                 "--resume"]) == 0
    out = capsys.readouterr().out
    assert f"skipping a damaged checkpoint: {latest}" in out and "newest intact checkpoint" in out


# ------------------------------------------------------------------------------------------ sweeps


def _sweep(out, world, *extra):
    return main(["sweep", "--out", str(out), "--image", str(world["img"]), "--text", str(world["txt"]), *SMALL, *extra])


def test_sweep_folder_keeps_every_grid_and_retrains_damaged_runs(world, tmp_path, capsys):
    out = tmp_path / "sw"
    assert _sweep(out, world, "--grid", "lr=1e-3") == 0
    assert _sweep(out, world, "--grid", "init-scale=5") == 0  # a second grid into the same folder
    board = json.loads((out / "leaderboard.json").read_text())
    assert {r["run"] for r in board} == {"lr-0.001", "init-scale-5"}
    assert len(json.loads((out / "sweep.json").read_text())["sweeps"]) == 2
    _damage(out / "lr-0.001" / "summary.json", "truncated")
    capsys.readouterr()
    assert _sweep(out, world, "--grid", "lr=1e-3") == 0
    said = capsys.readouterr().out
    assert "summary.json: run summary is damaged (truncated): training it again" in said
    assert read_json(out / "lr-0.001" / "summary.json", what="s")["steps"] == 4


def test_sweep_retrains_a_run_whose_store_changed(world, tmp_path, capsys):
    img, txt = paired_stores(tmp_path, n=200, latent=4, image_dim=12, text_dim=8)
    out = tmp_path / "sw"
    args = ["sweep", "--out", str(out), "--image", str(img), "--text", str(txt), *SMALL, "--grid", "lr=1e-3"]
    assert main(args) == 0
    ids = [f"x{i}" for i in range(150)]
    write_store(img, ids, {"image": np.ones((150, 12), np.float16)}, "image", "synthetic-vision")
    capsys.readouterr()
    main(args)
    assert "changed since the run started" in capsys.readouterr().out and (out / "lr-0.001.stale").is_dir()


def test_refused_sweeps_write_nothing(world, tmp_path, capsys):
    out = tmp_path / "sw"
    assert _sweep(out, world, "--grid", "lr=1e-3") == 0
    before = (out / "sweep.json").read_bytes()
    capsys.readouterr()
    assert _sweep(out, world, "--grid", "lr=1e-3", "--init-scale", "7") == 2  # same names, other settings
    _one_error_line(capsys, "was trained with other settings")
    grid = tmp_path / "g.yaml"
    grid.write_text("grid:\n  lr: [0.001]\nfixed:\n  steps: 1.5\n")
    assert main(["sweep", "--out", str(out), "--config", str(grid)]) == 2
    _one_error_line(capsys, "--steps: 1.5 is not a valid int")
    assert _sweep(out, world, "--grid", "lr=1e-3,-1") == 2  # a bad value in the grid, before any run starts
    _one_error_line(capsys, "grid point lr--1")
    assert (out / "sweep.json").read_bytes() == before and not (out / "lr--1").exists()


def test_a_sweep_whose_every_run_failed_exits_2(world, tmp_path, capsys):
    assert _sweep(tmp_path / "sw", world, "--grid", "lr=1e30") == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: every run of the sweep failed") and "loss became nan" in err


def test_long_run_names_fit_a_file_name_and_stay_distinct():
    from sail.sweep import MAX_NAME, run_name

    names = {run_name({"captions": ["c" * 90 + str(i)], "lr": 1e-3}) for i in range(20)}
    assert len(names) == 20 and all(len(n.encode()) <= MAX_NAME for n in names)


def test_ctrl_c_in_a_sweep_prints_the_command_that_continues(world, tmp_path, capsys, monkeypatch):
    import sail.sweep

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(sail.sweep, "align", interrupted)
    args = ["sweep", "--out", str(tmp_path / "sw"), "--grid", "lr=1e-3", "--image", str(world["img"]),
            "--text", str(world["txt"]), "--steps", "4"]
    assert main(args) == 130
    err = capsys.readouterr().err
    assert "Continue with:\n  sail sweep --out" in err and "Traceback" not in err
    assert not (tmp_path / "sw" / ".sail.lock").exists()  # the lock went with the process's exit path


# ------------------------------------------------------------------------------------------ stores and indexes


@pytest.fixture
def labelled(tmp_path):
    ids = [f"i{k}" for k in range(30)]
    rng = np.random.default_rng(0)
    path = write_store(tmp_path / "s.h5", ids, {"image": rng.standard_normal((30, 6)).astype(np.float16),
                                                "extra": rng.standard_normal((30, 4)).astype(np.float16)},
                       "image", "m", labels=np.arange(30) % 3, class_names=["cat", "dog", "eel"])
    return path


@pytest.mark.parametrize("damage", ["deleted field", "labels changed", "class names changed", "checksums garbage"])
def test_info_verify_catches_every_dataset(labelled, capsys, damage):
    with h5py.File(labelled, "r+") as f:
        if damage == "deleted field":
            del f["features/extra"]
        elif damage == "labels changed":
            f["labels"][0] = 2
        elif damage == "class names changed":
            f["labels"].attrs["class_names"] = json.dumps(["cat", "dog", "fish"])
        else:
            f.attrs["checksums"] = '{"ids": "sha'
    assert main(["info", str(labelled), "--verify"]) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    err = err.splitlines()[-1].split("\r")[-1]  # after the progress bar's last redraw
    assert err.startswith(f"error: {labelled} is damaged")
    assert {"deleted field": "features/extra missing", "labels changed": "mismatch in labels",
            "class names changed": "mismatch in labels.class_names", "checksums garbage": "mismatch in checksums"}[damage] in err


def test_an_intact_store_verifies(labelled, capsys):
    assert main(["info", str(labelled), "--verify"]) == 0
    assert "ok" in capsys.readouterr().out


@pytest.mark.parametrize("damage", ["ids truncated", "ids wrong count", "index flipped", "record garbage"])
def test_a_damaged_index_is_one_line(world, tmp_path, capsys, damage):
    idx = tmp_path / "idx"
    assert main(["index", str(world["run"]), "--images", str(world["img"]), "--out", str(idx)]) == 0
    capsys.readouterr()
    if damage == "ids truncated":
        _damage(idx / "ids.json", "truncated")
    elif damage == "ids wrong count":
        write_json(idx / "ids.json", [{"id": "a"}])
        meta = read_json(idx / "index.json", what="x")
        del meta["sha256"]  # an index from before checksums: the count check still catches it
        write_json(idx / "index.json", meta)
    elif damage == "index flipped":
        blob = bytearray((idx / "index.faiss").read_bytes())
        blob[-1] ^= 0x40
        (idx / "index.faiss").write_bytes(bytes(blob))
    else:
        _damage(idx / "index.json", "garbage")
    assert main(["search", str(idx), "a query"]) == 2
    _one_error_line(capsys, idx, "damaged", "sail index")


def test_killed_writer_leaves_no_lock_behind(tmp_path):
    holder = _hold(tmp_path / "d")
    holder.kill()
    holder.wait()
    start = time.time()
    with Lock(tmp_path / "d"):  # no wait, no error: the OS released the dead process's lock
        pass
    assert time.time() - start < 5


def test_second_extraction_of_one_store_is_refused(tmp_path, tiny_text, capsys):
    out = tmp_path / "feats" / "txt.h5"
    holder = _hold(out.parent, name=".txt.h5.lock")
    try:
        assert main(["extract", "--model", str(tiny_text), "--data", "sample", "--out", str(out), "--workers", "0"]) == 2
        _one_error_line(capsys, "in use by another sail extraction of txt.h5", f"pid {holder.pid}")
        assert sorted(os.listdir(out.parent)) == [".txt.h5.lock"]
    finally:
        holder.kill()
        holder.wait()


def test_a_metrics_line_cut_short_by_a_crash_is_skipped(tmp_path):
    from sail.train.runlog import MetricsLog, read_metrics

    f = tmp_path / "metrics.jsonl"
    f.write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.4}\n{"step": 3, "lo')
    assert read_metrics(f) == [{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.4}]
    MetricsLog(f, resume_step=1)  # resuming at step 1 keeps step 1 only, and the file is whole again
    assert f.read_text() == '{"step": 1, "loss": 0.5}\n'


# ----------------------------------------------------------------------------------------- whole files and folders


def test_atomic_path_renames_on_success_and_leaves_the_old_file_on_failure(tmp_path):
    from sail.core.artifacts import atomic_path

    out = tmp_path / "sub" / "w.pt"
    with atomic_path(out) as tmp:
        assert tmp.parent == out.parent and tmp != out
        tmp.write_bytes(b"first")
    assert out.read_bytes() == b"first"
    for error in (RuntimeError("disk"), KeyboardInterrupt()):
        with pytest.raises(type(error)):
            with atomic_path(out) as tmp:
                tmp.write_bytes(b"half")
                raise error
        assert out.read_bytes() == b"first" and sorted(p.name for p in out.parent.iterdir()) == ["w.pt"]


def test_atomic_dir_swaps_a_whole_folder_in_and_never_a_half_one(tmp_path):
    from sail.core.artifacts import atomic_dir

    final = tmp_path / "index"
    with atomic_dir(final) as tmp:
        (tmp / "deep").mkdir()
        (tmp / "deep" / "a.txt").write_text("a")
        assert not final.exists()  # nothing under the final name while it is being filled
    assert (final / "deep" / "a.txt").read_text() == "a"
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C while filling: the old folder stays, no temporary
        with atomic_dir(final, replace=True) as tmp:
            (tmp / "b.txt").write_text("b")
            raise KeyboardInterrupt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index"] and (final / "deep" / "a.txt").exists()
    with pytest.raises(FileExistsError):  # not empty and no replace: kept as it was
        with atomic_dir(final) as tmp:
            (tmp / "c.txt").write_text("c")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index"] and not (final / "c.txt").exists()
    with atomic_dir(final, replace=True) as tmp:
        (tmp / "d.txt").write_text("d")
    assert [p.name for p in final.iterdir()] == ["d.txt"] and sorted(p.name for p in tmp_path.iterdir()) == ["index"]
    empty = tmp_path / "empty"
    empty.mkdir()
    with atomic_dir(empty) as tmp:  # a folder the user made for it, still empty: taken
        (tmp / "e.txt").write_text("e")
    assert (empty / "e.txt").read_text() == "e"


def test_fsync_tree_reaches_every_file_and_folder(tmp_path, monkeypatch):
    from sail.core import artifacts

    (tmp_path / "x" / "y").mkdir(parents=True)
    for name in ("f", "x/g", "x/y/h"):
        (tmp_path / name).write_text(name)
    synced, real = [], os.fsync
    opened = {}
    real_open = os.open

    def track_open(path, flags, *a):
        fd = real_open(path, flags, *a)
        opened[fd] = Path(path).relative_to(tmp_path).as_posix() or "."
        return fd

    monkeypatch.setattr(artifacts.os, "open", track_open)
    monkeypatch.setattr(artifacts.os, "fsync", lambda fd: (synced.append(opened.get(fd)), real(fd)))
    artifacts.fsync_tree(tmp_path)
    assert set(synced) == {"f", "x/g", "x/y/h", "x/y", "x", "."}
    assert synced.index("x/y") < synced.index("x") < synced.index(".")  # a folder after the entries in it
