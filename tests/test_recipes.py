"""The ALIP and ALIGN recipes end to end on tiny configs and the embedded sample (CPU): training lowers the
loss, outputs load with Towers.from_pretrained, a killed-and-resumed run ends with identical weights, two
gloo processes train like one, bad images are skipped, and the gates can be switched off."""

import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sail.core.errors import SailError
from sail.recipes.batches import epoch_batches, split_indices
from sail.recipes.config import config_names, load_config
from sail.recipes.runner import run_recipe
from sail.train.runlog import read_metrics
from sail.train.towers import Towers

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "sail" / "recipes" / "configs"
FAST = {"workers": 0, "progress": "false", "batch_size": 16, "eval_every": 0}


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny models on a shared 2-core machine: one intra-op thread avoids OpenMP barrier stalls (2-3x faster).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _argv(recipe: str, out: Path, **overrides) -> list[str]:
    argv = ["--config", f"{recipe}-tiny", "--out", str(out), "--device", "cpu"]
    for key, value in {**FAST, **overrides}.items():
        argv += [f"--{key}", str(value)]
    return argv


def _main(recipe: str):
    import importlib

    return importlib.import_module(f"sail.recipes.{recipe}").main


def _train_records(out: Path) -> list[dict]:
    return [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]


def _mean(values):
    return sum(values) / len(values)


# ---------------------------------------------------------------------------------------------- helpers


def test_load_config_overrides(tmp_path):
    cfg = load_config(["--config", "alip-tiny", "--steps", "7", "--optim.lr=1e-2", "--gates", "false",
                       "--batch-size", "8", "--vision.pretrained", "some/model", "--optim.betas", "[0.8,0.9]",
                       "--text.config.hidden_dropout_prob", "0.1"])
    assert cfg["steps"] == 7 and cfg["optim"]["lr"] == 0.01 and cfg["gates"] is False and cfg["batch_size"] == 8
    assert cfg["vision"]["pretrained"] == "some/model" and cfg["optim"]["betas"] == [0.8, 0.9]
    assert cfg["text"]["config"]["hidden_dropout_prob"] == 0.1  # the towers' config sections are open
    assert cfg["vision"]["type"] == "clip" and cfg["optim"]["weight_decay"] == 0.2  # the rest as in the file
    assert load_config(["--config", "alip-tiny", "--optim.lr", "1"])["optim"]["lr"] == 1.0  # a float stays float
    # the same file by path, from anywhere
    assert load_config(["--config", str(CONFIGS / "alip-tiny.yaml")])["steps"] == 40
    bad = {("--stepz", "7"): "unknown option --stepz; alip-tiny.yaml has keys",
           ("--vision.pretrianed", "x"): "unknown option --vision.pretrianed; the vision section has keys",
           ("--optim.lrr", "1"): "unknown option --optim.lrr; the optim section has keys",
           ("--nope.x", "1"): "unknown option --nope.x",
           ("--steps", "many"): "--steps needs a number",
           ("--optim.lr", "fast"): "--optim.lr needs a number",
           ("--vision", "3"): "--vision is a section"}
    for args, message in bad.items():
        with pytest.raises(SailError, match=message.replace(".", r"\.")):
            load_config(["--config", "alip-tiny", *args])
    with pytest.raises(SailError, match="exactly one --config"):
        load_config(["--steps", "3"])
    with pytest.raises(SailError, match="neither a file nor a shipped config; shipped: align-efficientnet-b7"):
        load_config(["--config", "alip-huge"])
    (tmp_path / "bad.yaml").write_text("steps: [1\n")
    with pytest.raises(SailError, match="not a valid config"):
        load_config(["--config", str(tmp_path / "bad.yaml")])


def test_bad_override_is_one_error_line_from_the_cli(capsys):
    from sail.cli import main

    assert main(["recipe", "alip", "--config", "alip-tiny", "--vision.pretrianed", "x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: unknown option --vision.pretrianed")


def test_every_config_starts_with_its_command():
    assert config_names() == sorted(p.stem for p in CONFIGS.glob("*.yaml")) and len(config_names()) == 5
    for path in sorted(CONFIGS.glob("*.yaml")):
        first = path.read_text().splitlines()[0]
        recipe = path.stem.split("-")[0]
        assert first == f"# sail recipe {recipe} --config {path.stem}", path.name
        load_config(["--config", path.stem])  # parses


def test_the_library_never_imports_a_recipe():
    import ast

    # a recipe is a script with configs (alip, align); the machinery they share may live beside them
    scripts = {f"sail.recipes.{p.stem.split('-')[0]}" for p in CONFIGS.glob("*.yaml")}
    assert scripts == {"sail.recipes.alip", "sail.recipes.align"}
    for path in sorted((ROOT / "sail").rglob("*.py")):
        if path.parent.name == "recipes" and f"sail.recipes.{path.stem}" in scripts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names] \
                if isinstance(node, ast.ImportFrom) else []
            assert not scripts & set(names), path


def test_epoch_batches_split_each_global_batch_over_ranks():
    rows = list(range(100, 150))
    whole = epoch_batches(rows, 12, epoch=3, seed=5, rank=0, world=1)
    parts = [epoch_batches(rows, 12, epoch=3, seed=5, rank=r, world=3) for r in range(3)]
    assert len(whole) == 4 and all(len(b) == 12 for b in whole)  # 50 // 12, last partial batch dropped
    for b, batch in enumerate(whole):
        assert sum((p[b] for p in parts), []) == batch  # ranks' pieces, concatenated in rank order
    assert {k for batch in whole for k in batch} <= {(3, r) for r in rows}
    assert epoch_batches(rows, 12, 4, 5, 0, 1) != whole  # a new order each epoch


def test_split_indices_is_stable():
    ids = [f"id{i}" for i in range(2000)]
    train, held = split_indices(ids, 0.25)
    assert sorted(train + held) == list(range(2000))
    assert 0.2 < len(held) / 2000 < 0.3
    assert split_indices(list(reversed(ids)), 0.25)[1] == sorted(1999 - i for i in held)  # depends on ids only


# ---------------------------------------------------------------------------------------------- training


def test_alip_tiny_trains_and_saves(tmp_path):
    out = tmp_path / "alip"
    summary = _main("alip")(_argv("alip", out, steps=12, eval_every=12))
    records = _train_records(out)
    assert [r["step"] for r in records] == list(range(1, 13))
    ungated = [r["loss_ungated"] for r in records]
    assert _mean(ungated[-3:]) < _mean(ungated[:3]) - 0.2
    assert min(r["w_t"] for r in records) < 1.0  # the gates are on
    zs = [r for r in read_metrics(out / "metrics.jsonl") if "zeroshot_top1" in r]
    assert len(zs) == 1 and zs[0]["step"] == 12 and 0.0 <= zs[0]["zeroshot_top1"] <= 100.0
    for name in ("config.json", "model.safetensors", "tokenizer", "curves.png", "recipe-config.yaml"):
        assert (out / name).exists(), name

    # the saved directory reproduces the trained module
    trained, loaded = summary["towers"], Towers.from_pretrained(out)
    texts = ["a red circle", "a small green cross towards the top left of a plain light grey background"]
    from sail.data import open_dataset

    images = open_dataset("sample").images[:4]
    assert torch.allclose(loaded.encode_text(texts), trained.encode_text(texts), atol=1e-6)
    assert torch.allclose(loaded.encode_image(images), trained.encode_image(images), atol=1e-6)
    assert loaded.scale().item() == pytest.approx(records[-1]["t"], rel=1e-6)


def test_align_tiny_trains_and_saves(tmp_path):
    out = tmp_path / "align"
    _main("align")(_argv("align", out, steps=12, **{"optim.warmup_steps": 2}))
    records = _train_records(out)
    losses = [r["loss"] for r in records]
    assert _mean(losses[-3:]) < _mean(losses[:3]) - 0.1
    assert records[0]["t"] == pytest.approx(1.0, abs=0.02)  # logits x.y / sigma, sigma from 1.0
    assert records[0]["lr"] < records[1]["lr"] and records[-1]["lr"] < records[2]["lr"]  # warm-up, decay
    loaded = Towers.from_pretrained(out)
    assert loaded.recipe == "align" and loaded.temperature == "sigma"


def test_gates_off_through_run_recipe(tmp_path):
    out = tmp_path / "nogates"
    run_recipe("alip", _argv("alip", out, steps=3, gates="false"))
    for r in _train_records(out):
        assert r["w_t"] == 1.0 and r["w_c"] == 1.0
        assert r["loss"] == pytest.approx(r["loss_ungated"], rel=1e-6)
    with pytest.raises(SailError, match="no recipe 'nope'"):
        run_recipe("nope", [])


@pytest.mark.parametrize("recipe", ["alip", "align"])
def test_resume_after_a_kill_gives_identical_weights(recipe, tmp_path):
    # batch 96 of 364 training rows: 3 batches per epoch, so the run resumes mid-epoch and crosses an epoch.
    args = dict(steps=4, batch_size=96, checkpoint_every=2, workers=1)
    if recipe == "align":
        args["optim.warmup_steps"] = 2
    main = _main(recipe)
    full = tmp_path / "full"
    main(_argv(recipe, full, **args))
    assert sorted(p.name for p in full.glob("checkpoint-*")) == ["checkpoint-00000002", "checkpoint-00000004"]
    assert (full / "LATEST").read_text() == "checkpoint-00000004"  # sail.train.checkpoint's layout, as `sail align`
    # "kill" after step 2: a fresh output folder holding the step-2 checkpoint, the config and the log so far
    resumed = tmp_path / "resumed"
    shutil.copytree(full / "checkpoint-00000002", resumed / "checkpoint-00000002")
    (resumed / "LATEST").write_text("checkpoint-00000002")
    shutil.copy(full / "recipe-config.yaml", resumed / "recipe-config.yaml")
    lines = (full / "metrics.jsonl").read_text().splitlines()
    (resumed / "metrics.jsonl").write_text("\n".join(lines[:3]) + "\n")  # steps 1, 2 and a line of step 3
    with pytest.raises(SailError, match="already holds a run; pass --resume"):  # the rule `sail align` follows
        main(_argv(recipe, resumed, **args))
    main([*_argv(recipe, resumed, **args), "--resume"])
    a, b = load_file(str(full / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["step"] for r in _train_records(resumed)] == [1, 2, 3, 4]
    assert [r["loss"] for r in _train_records(resumed)] == [r["loss"] for r in _train_records(full)]
    with pytest.raises(SailError, match="settings differ from the saved run \\(--batch-size\\)"):
        main([*_argv(recipe, resumed, **{**args, "batch_size": 48}), "--resume"])


def test_bad_images_are_skipped(tmp_path):
    from sail.data import open_dataset

    ds = open_dataset("sample", columns=["caption", "long_caption"])
    rows = [{"id": ds.ids[i], "image": ds.images[i], "caption": ds.captions["caption"][i],
             "long_caption": ds.captions["long_caption"][i]} for i in range(36)]
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    rows[3]["image"] = str(tmp_path / "missing.png")
    rows[20]["image"] = str(tmp_path / "broken.png")
    manifest = tmp_path / "data.csv"
    with open(manifest, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    out = tmp_path / "run"
    _main("alip")(_argv("alip", out, steps=4, data=manifest, holdout=0.0))
    records = _train_records(out)
    assert len(records) == 4 and records[-1]["skipped"] >= 2
    assert all(r["loss"] == r["loss"] for r in records)  # finite, not NaN


def _torchrun_two(recipe, out, args):
    """Run `recipe` with 2 gloo processes under torchrun into `out`; returns `out`."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", f"sail.recipes.{recipe}", *_argv(recipe, out, **args)]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_two_gloo_processes_train_like_one(tmp_path):
    args = dict(steps=3, batch_size=16)
    single = tmp_path / "single"
    _main("alip")(_argv("alip", single, **args))
    two = _torchrun_two("alip", tmp_path / "two", args)
    assert (two / "model.safetensors").is_file()
    # global negatives + the same global batches: the two-process losses are the one-process losses
    one, both = _train_records(single), _train_records(two)
    assert [r["step"] for r in both] == [1, 2, 3] and all(r["world"] == 2 for r in both)
    assert all(r["world"] == 1 for r in one)
    for r1, r2 in zip(one, both):
        assert r2["loss"] == pytest.approx(r1["loss"], rel=1e-4)
        assert r2["loss_ungated"] == pytest.approx(r1["loss_ungated"], rel=1e-4)
    a, b = load_file(str(single / "model.safetensors")), load_file(str(two / "model.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-3
    assert json.loads((two / "config.json").read_text())["recipe"] == "alip"


@pytest.mark.slow  # ~3 min on 2 shared cores
def test_align_two_gloo_processes_train_like_one_with_two_micro_batches(tmp_path):
    """ALIGN under DDP (2 gloo processes, batch 16) = one process with accum_steps 2: the same global negatives,
    and on CPU each rank's BatchNorm sees its 8 rows as each micro-batch does (torch's SyncBatchNorm is
    GPU-only). Dropout off so both runs draw no random masks."""
    args = {"steps": 3, "batch_size": 16, "bn_recalibration": 32, "vision.config.drop_connect_rate": 0,
            "text.config.hidden_dropout_prob": 0, "text.config.attention_probs_dropout_prob": 0,
            "optim.warmup_steps": 1}
    single = tmp_path / "single"
    _main("align")(_argv("align", single, accum_steps=2, **args))
    two = _torchrun_two("align", tmp_path / "two", args)
    one, both = _train_records(single), _train_records(two)
    assert [r["world"] for r in both] == [2, 2, 2] and [r["world"] for r in one] == [1, 1, 1]
    for r1, r2 in zip(one, both):
        assert r2["loss"] == pytest.approx(r1["loss"], rel=1e-4)
    a, b = load_file(str(single / "model.safetensors")), load_file(str(two / "model.safetensors"))
    assert a.keys() == b.keys()
    # Compare what the models compute, not each weight: LAMB turns a near-zero gradient into a step of +-lr
    # (m / sqrt(v) ~ sign), so an element whose gradient differs in the last bit between the two reductions can
    # move 2 lr apart without changing the embeddings measurably.
    from sail.data import open_dataset

    images, texts = open_dataset("sample").images[:8], ["a red circle", "a small blue square", "a green cross"]
    m1, m2 = Towers.from_pretrained(single), Towers.from_pretrained(two)  # BatchNorm recalibrated in both
    torch.testing.assert_close(m2.encode_image(images), m1.encode_image(images), rtol=0, atol=2e-3)
    torch.testing.assert_close(m2.encode_text(texts), m1.encode_text(texts), rtol=0, atol=2e-3)
    assert m2.scale().item() == pytest.approx(m1.scale().item(), rel=1e-4)


def test_recipe_output_evaluates_through_sail_eval(tmp_path):
    """A recipe run loads as SAILModel.from_pretrained and `sail eval` works on it unchanged."""
    from sail.eval.tasks import retrieval, zeroshot
    from sail.recipes.runner import run_recipe
    from sail.train.model import SAILModel

    out = tmp_path / "alip"
    run_recipe("alip", ["--config", "alip-tiny", "--steps", "3", "--out", str(out), "--device", "cpu"])
    model = SAILModel.from_pretrained(out)
    assert type(model).__name__ == "Towers"
    zs = zeroshot(str(out), "sample-val", templates="imagenet", features_root=str(tmp_path / "f"), progress=False)
    rt = retrieval(str(out), "sample-val", columns=["long_caption"], features_root=str(tmp_path / "f"), progress=False)
    # the same numbers by hand: all images embedded at once (eval streams them in batches of 64)
    from sail.core import metrics
    from sail.data import open_dataset
    from sail.eval.templates import load_templates

    ds = open_dataset("sample-val")
    x = model.encode_image(ds.images)
    classes = metrics.class_embeddings(model.encode_text, ds.class_names, load_templates("imagenet"))
    want_zs = metrics.zeroshot(x, classes, torch.from_numpy(ds.labels))
    want_rt = metrics.retrieval(x, model.encode_text(ds.captions["long_caption"]), torch.arange(240))
    one = 100 / 240  # batch size may move a float by an ulp and flip a near-tie, no more
    assert zs["classes"] == 24 and zs["images"] == 240 and rt["images"] == 240
    assert {k: zs[k] for k in want_zs} == pytest.approx(want_zs, abs=one + 1e-9)
    assert {k: rt[k] for k in want_rt} == pytest.approx(want_rt, abs=one + 1e-9)


@pytest.mark.slow  # builds and installs a wheel, then trains: ~30 s on 2 cores
def test_recipe_runs_from_an_installed_wheel(tmp_path):
    """`sail recipe alip --config alip-tiny` from a wheel install, in a directory with no source checkout."""
    src = tmp_path / "src"
    shutil.copytree(ROOT / "sail", src / "sail", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    pip = [sys.executable, "-m", "pip"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-q", str(src), "-w", str(tmp_path / "wheel")],
                   check=True, capture_output=True)
    wheel = next((tmp_path / "wheel").glob("sail-*.whl"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", "--system-site-packages", str(venv)], check=True)
    # --system-site-packages reaches the base interpreter's packages, not this venv's: point at them (torch etc.)
    # with a path line; the editable sail of this venv is not loaded that way, so the wheel's sail is the one used.
    site = next(venv.glob("lib/python*/site-packages"))
    shared = [p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir()]
    (site / "shared.pth").write_text("\n".join(shared) + "\n")
    subprocess.run([*pip, "--python", str(venv / "bin" / "python"), "install", "-q", "--no-deps", str(wheel)],
                   check=True, capture_output=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run([str(venv / "bin" / "sail"), "recipe", "alip", "--config", "alip-tiny", "--steps", "3",
                          "--batch-size", "16", "--workers", "0", "--eval-every", "0", "--progress", "false",
                          "--device", "cpu", "--out", "run"], cwd=elsewhere, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert [r["step"] for r in _train_records(elsewhere / "run")] == [1, 2, 3]
    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import sail.recipes; print(sail.recipes.__file__)"],
                           cwd=elsewhere, env=env, capture_output=True, text=True, check=True).stdout
    assert str(site) in where  # the installed copy ran, not the checkout
    # a config by path works from there too
    (elsewhere / "mine.yaml").write_text((ROOT / "sail" / "recipes" / "configs" / "alip-tiny.yaml").read_text())
    run = subprocess.run([str(venv / "bin" / "sail"), "recipe", "alip", "--config", "mine.yaml", "--stepz", "3"],
                         cwd=elsewhere, env=env, capture_output=True, text=True)
    assert run.returncode == 2 and run.stderr.strip().splitlines() == [
        run.stderr.strip().splitlines()[0]] and "unknown option --stepz" in run.stderr


def test_a_manifest_in_another_encoding(tmp_path, capsys):
    """--encoding reaches the recipe's manifest: without it one error line naming file and line; with it
    the run trains exactly as on the same manifest saved as UTF-8."""
    from sail.cli import main
    from sail.data import open_dataset

    ds = open_dataset("sample", columns=["caption", "long_caption"])
    lines = ["id,image,caption,long_caption"] + [
        f"{ds.ids[i]},{ds.images[i]},{ds.captions['caption'][i]}{' café' if i == 5 else ''},{ds.captions['long_caption'][i]}"
        for i in range(36)]
    text = "\n".join(lines) + "\n"
    (tmp_path / "u.csv").write_bytes(text.encode("utf-8"))
    (tmp_path / "l.csv").write_bytes(text.encode("latin-1"))
    capsys.readouterr()
    assert main(["recipe", "alip", *_argv("alip", tmp_path / "bad", steps=3, data=tmp_path / "l.csv")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "l.csv:7 is not utf-8 text" in err and "--encoding" in err
    assert len(err.splitlines()) == 1
    _main("alip")(_argv("alip", tmp_path / "u", steps=3, data=tmp_path / "u.csv"))
    _main("alip")(_argv("alip", tmp_path / "l", steps=3, data=tmp_path / "l.csv", encoding="latin-1"))
    assert [r["loss"] for r in _train_records(tmp_path / "l")] == [r["loss"] for r in _train_records(tmp_path / "u")]


# ---------------------------------------------------------------------------------------------- hopeless runs end


def test_a_batch_that_can_never_be_usable_is_one_error_line_at_once(tmp_path, capsys):
    from sail.cli import main

    start = time.time()
    rc = main(["recipe", "alip", *_argv("alip", tmp_path / "run", batch_size=1, steps=4)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err == ["error: --batch-size 1 is too small: a contrastive batch needs at least 2 pairs per "
                               "process (2 for 1 process)"]
    assert time.time() - start < 30 and not (tmp_path / "run" / "model.safetensors").exists()


def test_a_wrong_image_root_ends_in_one_error_naming_the_images(tmp_path):
    from sail.data import open_dataset

    ds = open_dataset("sample", columns=["caption", "long_caption"])
    manifest = tmp_path / "data.csv"
    with open(manifest, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "image", "caption", "long_caption"])
        for i in range(64):  # the images exist, but not under the root the manifest names
            writer.writerow([ds.ids[i], str(tmp_path / "elsewhere" / f"{i}.png"), ds.captions["caption"][i],
                             ds.captions["long_caption"][i]])
    start = time.time()
    with pytest.raises(SailError, match=r"^no usable batch in 10 tries: the images of whole batches failed to load "
                                        r"\(last: missing file\); check the image paths"):
        _main("alip")(_argv("alip", tmp_path / "run", steps=4, data=manifest, holdout=0.0, batch_size=8))
    assert time.time() - start < 60


@pytest.mark.parametrize("value, expected", [("5.7", None), ("6.0", 6), ("7", 7)])
def test_step_counts_refuse_fractions(value, expected):
    if expected is None:
        with pytest.raises(SailError, match=r"--steps needs a whole number, got '5.7'"):
            load_config(["--config", "alip-tiny", "--steps", value])
    else:
        steps = load_config(["--config", "alip-tiny", "--steps", value])["steps"]
        assert steps == expected and isinstance(steps, int)


def test_ctrl_c_checkpoints_the_step_and_prints_the_command_that_resumes(tmp_path, capsys, monkeypatch):
    from sail.cli import main
    from sail.train.checkpoint import load_checkpoint
    import sail.train.engine as E

    class StopBeforeStep3(E.StopRequest):
        calls = 0

        def check(self):
            StopBeforeStep3.calls += 1
            if StopBeforeStep3.calls > 2:
                raise E.GracefulStop

    monkeypatch.setattr(E, "StopRequest", StopBeforeStep3)
    out = tmp_path / "run"
    rc = main(["recipe", "alip", *_argv("alip", out, steps=6, checkpoint_every=100)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 130 and err[0].startswith(f"interrupted at step 2 of {out}; the last checkpoint is step 2")
    assert err[-1].strip().startswith("sail recipe alip --config alip-tiny") and err[-1].endswith("--resume")
    assert load_checkpoint(out).step == 2 and not (out / "model.safetensors").exists()


def test_a_recipe_run_equals_a_plain_training_loop(tmp_path, monkeypatch):
    """The engine changes nothing in what a recipe computes: ALIP's towers, optimizer, schedule and loss, taken
    from the recipe, trained by a plain loop written here give bit-identical weights to `train_towers`."""
    import sail.recipes.alip as alip
    from sail.recipes.batches import PairData, iterate_batches
    from sail.train.step import contrastive_backward

    args = dict(steps=3, batch_size=16, holdout=0.25)
    alip.main(_argv("alip", tmp_path / "engine", **args))
    parts = {}
    monkeypatch.setattr(alip, "train_towers", lambda run, *a, **k: parts.update(run=run, args=a, kw=k))
    alip.main(_argv("alip", tmp_path / "plain", **args))
    towers, optimizer, scheduler, ds, columns, loss_fn = parts["args"]
    cfg = parts["run"].cfg
    train_rows, _ = split_indices(ds.ids, cfg["holdout"])
    data = PairData(ds.images, [ds.captions[c] for c in columns], towers.preprocessing, seed=cfg["seed"])
    batches = iterate_batches(data, train_rows, cfg["batch_size"], cfg["seed"])
    towers.train()
    for _ in range(3):
        _, _, pixels, texts, _, _ = next(batches)
        tokens = towers.tokenize([t for column in texts for t in column])
        optimizer.zero_grad(set_to_none=True)
        contrastive_backward(towers, pixels, tokens["input_ids"], tokens["attention_mask"], loss_fn, 1)
        torch.nn.utils.clip_grad_norm_(towers.parameters(), cfg["optim"]["grad_clip"])
        optimizer.step()
        scheduler.step()
        towers.clamp_()
    saved = load_file(str(tmp_path / "engine" / "model.safetensors"))
    live = {k: v for k, v in towers.state_dict().items() if k in saved}
    assert live.keys() == saved.keys() and all(torch.equal(live[k], saved[k]) for k in saved)


@pytest.mark.parametrize("recipe", ["alip", "align"])
def test_recipe_module_run_with_a_mistake_is_one_error_line(recipe, tmp_path):
    """`python -m sail.recipes.NAME` as the README shows it: a bad command line is one `error:` line, exit 2."""
    p = subprocess.run([sys.executable, "-m", f"sail.recipes.{recipe}", "--config", str(tmp_path / "missing.yaml")],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr
    assert p.stderr.startswith("error: ") and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert "Traceback" not in p.stderr
