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
