"""`sail sweep`: grid parsing, one run per grid point equal to a plain `sail align`, shared feature
loads, skip/resume on rerun, the leaderboard and the CLI."""

import csv
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sail import sweep as sw
from sail.cli import main
from sail.core.errors import SailError
import sail.data.loader
from sail.train.align_heads import AlignConfig, align
from synthetic import paired_stores

FIXED = dict(head="linear", out_dim=16, batch=128, steps=20, optimizer="adamw", weight_decay=0.0, val_fraction=0.2,
             eval_every=10, checkpoint_every=10, init_scale=10.0)


@pytest.fixture
def stores(tmp_path):
    img, txt = paired_stores(tmp_path, n=400, latent=8, image_dim=24, text_dim=16)
    return str(img), str(txt)


def test_parse_grid_types_names_and_order():
    grid = sw.parse_grid(["lr=1e-3,1e-2", "head=linear,glu", "captions=caption,caption+long_caption",
                          "block-size=none,64", "betas=0.9+0.95"])
    assert grid == {"lr": [1e-3, 1e-2], "head": ["linear", "glu"], "captions": [["caption"], ["caption", "long_caption"]],
                    "block_size": [None, 64], "betas": [(0.9, 0.95)]}
    runs = sw.expand({"lr": [1, 2], "head": ["a", "b", "c"]})
    assert [tuple(r.values()) for r in runs] == [(1, "a"), (1, "b"), (1, "c"), (2, "a"), (2, "b"), (2, "c")]
    assert sw.run_name({"head": "glu", "lr": 0.001, "captions": ["a", "b"]}) == "head-glu_lr-0.001_captions-a+b"
    assert sw.parse_fixed(["--steps", "5", "--init-scale=10", "--image", "x.h5"]) == {"steps": 5, "init_scale": 10.0,
                                                                                   "image": "x.h5"}
    # `sail align --width-factor` (alias --width) is the field `width`, in a grid as in the fixed settings
    assert sw.parse_grid(["width-factor=2,4"]) == {"width": [2, 4]} == sw.parse_grid(["width=2,4"])
    assert sw.parse_fixed(["--width-factor", "8"]) == {"width": 8}
    for bad, msg in ((["nope=1,2"], "unknown sail align option"), (["lr"], "key=value"), (["lr=fast"], "not a valid"),
                     (["lr=1", "lr=2"], "twice"), (["out=a,b"], "unknown"), (["width=2", "width-factor=4"], "twice")):
        with pytest.raises(SailError, match=msg):
            sw.parse_grid(bad)


def test_grid_points_equal_plain_align_runs_and_load_features_once(tmp_path, stores, monkeypatch):
    img, txt = stores
    reads = []
    real = sail.data.loader._read_all
    monkeypatch.setattr(sail.data.loader, "_read_all", lambda *a: reads.append(a[1]) or real(*a))
    cfg = sw.SweepConfig(out=str(tmp_path / "sw"), grid={"head": ["linear", "mlp"], "lr": [1e-3, 3e-2]},
                         fixed={**{k: v for k, v in FIXED.items() if k != "head"}, "image": img, "text": txt},
                         progress=False)
    rows = sw.sweep(cfg)
    # 4 runs, but the train and val splits are each read once: (image + text) x (train + val)
    assert len(reads) == 4
    assert len(rows) == 4 and {r["run"] for r in rows} == {"head-linear_lr-0.001", "head-linear_lr-0.03",
                                                           "head-mlp_lr-0.001", "head-mlp_lr-0.03"}
    means = [(r["val_i2t_R@1"] + r["val_t2i_R@1"]) / 2 for r in rows]
    assert means == sorted(means, reverse=True)
    for r in rows:
        summary = json.loads((tmp_path / "sw" / r["run"] / "summary.json").read_text())
        assert r["loss"] == summary["loss"] and r["val_t2i_R@1"] == summary["val_t2i_R@1"] and r["steps"] == 20
        assert r["status"] == "done" and r["seconds"] > 0
    with open(tmp_path / "sw" / "leaderboard.csv") as f:
        table = list(csv.DictReader(f))
    assert [t["run"] for t in table] == [r["run"] for r in rows] and float(table[0]["loss"]) == rows[0]["loss"]
    assert json.loads((tmp_path / "sw" / "leaderboard.json").read_text()) == rows
    assert (tmp_path / "sw" / "comparison.png").stat().st_size > 1000
    # one grid point, trained alone without the shared features: the same weights
    alone = align(AlignConfig(**{**FIXED, "head": "mlp", "lr": 3e-2, "image": img, "text": txt,
                                 "out": str(tmp_path / "alone"), "progress": False}))
    a = load_file(tmp_path / "sw" / "head-mlp_lr-0.03" / "model.safetensors")
    b = load_file(alone.run_dir / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_rerun_skips_finished_and_resumes_interrupted(tmp_path, stores, monkeypatch):
    img, txt = stores
    cfg = sw.SweepConfig(out=str(tmp_path / "sw"), grid={"lr": [1e-3, 1e-2]},
                         fixed={**FIXED, "image": img, "text": txt}, progress=False)
    # interrupt the first run after its last training step (checkpointed), before its weights are saved
    from sail.train.heads import AlignmentHeads

    real_save = AlignmentHeads.save_pretrained

    def killed(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(AlignmentHeads, "save_pretrained", killed)
    with pytest.raises(KeyboardInterrupt):
        sw.sweep(cfg)
    monkeypatch.setattr(AlignmentHeads, "save_pretrained", real_save)
    first = tmp_path / "sw" / "lr-0.001"
    assert (first / "LATEST").read_text().strip().endswith("20") and not (first / "summary.json").exists()
    calls = []
    real_align = sw.align
    monkeypatch.setattr(sw, "align", lambda c, resume=False: calls.append((Path(c.out).name, resume)) or real_align(c, resume))
    sw.sweep(cfg)
    assert calls == [("lr-0.001", True), ("lr-0.01", False)]
    assert "val_i2t_R@1" in json.loads((first / "summary.json").read_text())  # measured although nothing was left to train
    alone = align(AlignConfig(**{**FIXED, "lr": 1e-3, "image": img, "text": txt, "out": str(tmp_path / "alone"),
                                 "progress": False}))
    a, b = load_file(first / "model.safetensors"), load_file(alone.run_dir / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)  # exact resume
    calls.clear()
    rows = sw.sweep(cfg)
    assert calls == [] and len(rows) == 2  # everything finished: nothing trains, leaderboard rebuilt
    # the same directory with another fixed setting is refused, not silently mixed
    with pytest.raises(SailError, match="other settings.*steps"):
        sw.sweep(sw.SweepConfig(out=cfg.out, grid=cfg.grid, fixed={**cfg.fixed, "steps": 30}, progress=False))


def test_failed_run_is_recorded_and_sweep_goes_on(tmp_path, stores):
    img, txt = stores
    rows = sw.sweep(sw.SweepConfig(out=str(tmp_path / "sw"), grid={"lr": [1e30, 1e-3]},
                                   fixed={**FIXED, "image": img, "text": txt}, progress=False))
    assert [r["run"] for r in rows] == ["lr-0.001", "lr-1e+30"]
    assert rows[0]["status"] == "done" and rows[1]["status"].startswith("failed: loss became nan")


def test_cli_grid_and_yaml(tmp_path, stores, capsys):
    img, txt = stores
    args = ["--image", img, "--text", txt, "--head", "linear", "--out-dim", "8", "--batch", "128", "--steps", "4",
            "--optimizer", "adamw", "--val-fraction", "0.2", "--eval-every", "2"]
    assert main(["sweep", "--out", str(tmp_path / "a"), "--grid", "init-scale=5,10", *args]) == 0
    out = capsys.readouterr().out
    assert "init-scale-5" in out and (tmp_path / "a" / "init-scale-10" / "model.safetensors").exists()
    grid = tmp_path / "g.yaml"
    grid.write_text(f"grid:\n  width: [1, 2]\n  head: [mlp]\nfixed:\n  image: {img}\n  text: {txt}\n  steps: 3\n"
                    "  batch: 128\n  out_dim: 8\n  val_fraction: 0.2\n")
    assert main(["sweep", "--out", str(tmp_path / "b"), "--config", str(grid)]) == 0
    board = json.loads((tmp_path / "b" / "leaderboard.json").read_text())
    assert {r["run"] for r in board} == {"width-1_head-mlp", "width-2_head-mlp"}
    capsys.readouterr()
    assert main(["sweep", "--out", str(tmp_path / "c"), "--grid", "lr=1e-3", "--bogus", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown sail align option '--bogus'") and not (tmp_path / "c").exists()
    assert main(["sweep", "--out", str(tmp_path / "c"), "--grid", "lr=1e-3"]) == 2
    assert "needs --image" in capsys.readouterr().err
