"""The CLI layer: commands reach the library, print tables, save JSON, and turn mistakes into one line."""

import json

import pytest
from PIL import Image

from sail.cli import main
from synthetic import paired_stores


def test_models_and_help(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "dinov2-l" in out and "2048 (concat)" in out and "Alibaba-NLP/gte-large-en-v1.5" in out
    assert main(["--help"]) == 0
    assert "extract" in capsys.readouterr().out


def test_align_info_eval_and_errors(tmp_path, capsys):
    img, txt = paired_stores(tmp_path, n=400)
    assert main(["info", str(img)]) == 0
    out = capsys.readouterr().out
    assert "synthetic-vision" in out and "field image" in out and "400 x 48" in out
    run = tmp_path / "run"
    assert main(["align", "--image", str(img), "--text", str(txt), "--out", str(run), "--head", "linear", "--out-dim", "16",
                 "--batch", "128", "--steps", "3", "--val-fraction", "0.1"]) == 0
    out = capsys.readouterr().out
    assert "val_i2t_R@1" in out and (run / "model.safetensors").exists()
    assert main(["eval", "alignment", "--image", str(img), "--text", str(txt), "--out", str(tmp_path / "a.json")]) == 0
    saved = json.loads((tmp_path / "a.json").read_text())
    assert 0 <= saved["mutual_knn"] <= 1 and "mutual_knn" in capsys.readouterr().out
    assert main(["align", "--image", str(tmp_path / "missing.h5"), "--text", str(txt), "--out", str(tmp_path / "r2")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "not found" in err and len(err.splitlines()) == 1
    assert main(["info", str(txt.parent / "nothing.h5")]) == 2


def test_filter_align_command(tmp_path, capsys):
    for name, size in (("big.png", (300, 300)), ("small.png", (100, 100))):
        Image.new("RGB", size).save(tmp_path / name)
    rows = ["id,image,caption", "a,big.png,a red square on grey", "b,small.png,a red square on grey",
            "c,big.png,short"]
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    assert main(["filter", "align", str(tmp_path / "m.csv"), "--out", str(tmp_path / "f.csv")]) == 0
    out = capsys.readouterr().out
    kept = (tmp_path / "f.csv").read_text().splitlines()
    assert kept[0].startswith("id") and [r.split(",")[0] for r in kept[1:]] == ["a"]
    assert "short_side" in out


@pytest.mark.parametrize("argv", [["extract", "--model", "dinov2-l"], ["eval", "zeroshot"]])
def test_usage_errors_exit_nonzero(argv, capsys):
    assert main(argv) != 0


def _commands(group, path=()):
    """(path, click command) for every command and group under `group`, the root included."""
    yield path, group
    for name, sub in getattr(group, "commands", {}).items():
        yield from _commands(sub, (*path, name))


def test_every_help_shows_an_example_that_parses(capsys):
    # Each command's --help has an "Example: sail <command> ..." line, and that example parses as arguments of
    # the command (a renamed or removed flag in an example fails here, as would a missing required option).
    import re
    import shlex

    import typer

    from sail.cli import app

    root = typer.main.get_command(app)
    seen = []
    for path, command in _commands(root):
        assert main([*path, "--help"]) == 0
        shown = " ".join(capsys.readouterr().out.split())  # rich wraps long lines
        want = " ".join(("sail", *path))
        assert f"Example: {want}" in shown, f"`{want} --help` shows no example"
        example = re.search(r"Example: (sail[^\n]*)", command.help).group(1)
        if getattr(command, "commands", None):
            continue  # a group's example names a sub-command, checked there
        args = shlex.split(example)[1 + len(path):]
        command.make_context(want, args)  # raises click's usage error on an unknown flag or a missing argument
        seen.append(want)
    assert {"sail align", "sail eval zeroshot", "sail filter align", "sail recipe", "sail demo"} <= set(seen)
    assert len(seen) == 20  # models extract align info, 7 eval tasks, push report index search, filter align, curate, recipe sweep demo


def test_width_factor_is_the_hidden_width_multiplier_and_width_its_alias(tmp_path, capsys):
    from safetensors.torch import load_file

    img, txt = paired_stores(tmp_path, n=200)  # image 48-d, text 32-d
    for flag, factor in (("--width-factor", 3), ("--width", 2)):
        run = tmp_path / flag.strip("-")
        assert main(["align", "--image", str(img), "--text", str(txt), "--out", str(run), "--head", "mlp", flag,
                     str(factor), "--out-dim", "8", "--batch", "64", "--steps", "1", "--val-fraction", "0"]) == 0
        weights = load_file(str(run / "model.safetensors"))
        hidden = {k: v.shape[0] for k, v in weights.items() if k.endswith("fc1.weight")}
        assert hidden == {"image_head.fc1.weight": factor * 48, "text_head.fc1.weight": factor * 32}
        assert json.loads((run / "config.json").read_text())["width"] == factor
    capsys.readouterr()
    assert main(["align", "--image", str(img), "--text", str(txt), "--out", str(tmp_path / "z"), "--width-factor", "0"]) == 2
    assert "--width-factor (hidden width = factor x input dim) must be at least 1" in capsys.readouterr().err
