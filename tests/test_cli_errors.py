"""Every command, fed bad input: exit code 2, one `error:` line, no traceback, nothing the user named changed.

Each case is an argv (with {placeholders} for the fixture's paths) and the paths it names; the files and
folders there are fingerprinted before and after. Commands run in-process through `sail.cli.main`, which is
what the `sail` entry point calls; one case also runs as a subprocess to check the real entry point.
"""

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from sail.cli import main


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_vision, tiny_text):
    """Small real stores (24 sample images, tiny encoders), a run trained on them, its index, and bad files."""
    from sail.data import open_dataset

    root = tmp_path_factory.mktemp("cli-errors")
    ds = open_dataset("sample")
    rows = ["id,image,caption"] + [f"{ds.ids[i]},{ds.images[i]},{ds.captions['caption'][i]}" for i in range(24)]
    (root / "m.csv").write_text("\n".join(rows) + "\n")
    paths = {"root": root, "vision": tiny_vision, "text": tiny_text, "m": root / "m.csv",
             "img": root / "img.h5", "txt": root / "txt.h5", "run": root / "run", "idx": root / "idx"}
    for model, store in ((tiny_vision, paths["img"]), (tiny_text, paths["txt"])):
        assert main(["extract", "--model", str(model), "--data", str(paths["m"]), "--out", str(store),
                     "--workers", "0"]) == 0
    assert main(["align", "--image", str(paths["img"]), "--text", str(paths["txt"]), "--out", str(paths["run"]),
                 "--head", "linear", "--out-dim", "8", "--batch", "16", "--steps", "2", "--val-fraction", "0.2"]) == 0
    assert main(["index", str(paths["run"]), "--images", str(paths["img"]), "--out", str(paths["idx"])]) == 0
    (root / "latin1.csv").write_bytes("id,image,caption\na,x.png,caf\xe9 au lait\n".encode("latin-1"))
    (root / "notes.txt").write_text("the user's notes\n")
    (root / "folder").mkdir()
    (root / "folder" / "keep.txt").write_text("keep\n")
    (root / "empty-dir").mkdir()
    damaged = root / "damaged.h5"
    damaged.write_bytes(paths["img"].read_bytes())
    with h5py.File(damaged, "r+") as f:
        ids = f["ids"][:]
        ids[3:10] = b""
        f["ids"][:] = ids
    paths["damaged"] = damaged
    return paths


def fingerprint(path: Path):
    """What the user would notice changing: a file's bytes, a folder's files and their bytes, or absence."""
    if path.is_file():
        return hashlib.sha256(path.read_bytes()).hexdigest()
    if path.is_dir():
        return sorted((str(p.relative_to(path)), fingerprint(p) if p.is_file() else "dir") for p in path.rglob("*"))
    return None


# name: (argv, paths the command names). {x} -> env["x"]; {new} -> a fresh path that must stay absent.
CASES = {
    # extract
    "extract non-UTF-8 manifest": (["extract", "--model", "{text}", "--data", "{root}/latin1.csv", "--out", "{new}"], []),
    "extract batch size 0": (["extract", "--model", "{vision}", "--data", "{m}", "--out", "{new}", "--batch-size", "0"], []),
    "extract batch size -1": (["extract", "--model", "{text}", "--data", "{m}", "--out", "{new}", "--batch-size", "-1"], []),
    "extract chunk size 0": (["extract", "--model", "{text}", "--data", "{m}", "--out", "{new}", "--chunk-size", "0"], []),
    "extract workers -1": (["extract", "--model", "{vision}", "--data", "{m}", "--out", "{new}", "--workers", "-1"], []),
    "extract max length 0": (["extract", "--model", "{text}", "--data", "{m}", "--out", "{new}", "--max-length", "0"], []),
    "extract dist timeout 0": (["extract", "--model", "{text}", "--data", "{m}", "--out", "{new}", "--dist-timeout", "0"], []),
    "extract out is a folder": (["extract", "--model", "{text}", "--data", "{m}", "--out", "{root}/folder"], ["{root}/folder"]),
    "extract out is another file": (["extract", "--model", "{text}", "--data", "{m}", "--out", "{root}/notes.txt"],
                                    ["{root}/notes.txt"]),
    "extract out is another model's store": (["extract", "--model", "{text}", "--data", "{m}", "--out", "{img}"], ["{img}"]),
    "extract out is a damaged store": (["extract", "--model", "{vision}", "--data", "{m}", "--out", "{damaged}"],
                                       ["{damaged}"]),
    "extract data missing": (["extract", "--model", "{text}", "--data", "{root}/nothing.csv", "--out", "{new}"], []),
    "extract unknown model": (["extract", "--model", "no-such-model", "--data", "{m}", "--out", "{new}"], []),
    "extract image model, no images": (["extract", "--model", "{vision}", "--data", "{m}", "--out", "{new}",
                                        "--image-column", "nope"], []),
    "extract bad pooling": (["extract", "--model", "{vision}", "--data", "{m}", "--out", "{new}", "--pooling", "max"], []),
    "extract bad preprocess": (["extract", "--model", "{vision}", "--data", "{m}", "--out", "{new}", "--preprocess", "x"], []),
    "extract bad precision": (["extract", "--model", "{vision}", "--data", "{m}", "--out", "{new}", "--precision", "fp8"], []),
    "extract unknown device": (["extract", "--model", "{vision}", "--data", "{m}", "--out", "{new}", "--device", "tpu"], []),
    "extract absent GPU": (["extract", "--model", "{vision}", "--data", "{m}", "--out", "{new}", "--device", "cuda:99"], []),
    "extract not a number": (["extract", "--model", "{vision}", "--data", "{m}", "--out", "{new}", "--batch-size", "x"], []),
    "extract missing option": (["extract", "--model", "{vision}"], []),
    # info
    "info missing": (["info", "{root}/nothing.h5"], []),
    "info folder": (["info", "{root}/folder"], ["{root}/folder"]),
    "info not HDF5": (["info", "{root}/notes.txt"], ["{root}/notes.txt"]),
    "info damaged ids": (["info", "{damaged}"], ["{damaged}"]),
    # align
    "align out is a file": (["align", "--image", "{img}", "--text", "{txt}", "--out", "{root}/notes.txt", "--steps", "1"],
                            ["{root}/notes.txt"]),
    "align out holds a run": (["align", "--image", "{img}", "--text", "{txt}", "--out", "{run}", "--steps", "1"], ["{run}"]),
    "align stores swapped": (["align", "--image", "{txt}", "--text", "{img}", "--out", "{new}", "--steps", "1"], []),
    "align same store twice": (["align", "--image", "{img}", "--text", "{img}", "--out", "{new}", "--steps", "1"], []),
    "align steps 0": (["align", "--image", "{img}", "--text", "{txt}", "--out", "{new}", "--steps", "0"], []),
    "align epochs -1": (["align", "--image", "{img}", "--text", "{txt}", "--out", "{new}", "--epochs", "-1"], []),
    "align checkpoint every 0": (["align", "--image", "{img}", "--text", "{txt}", "--out", "{new}", "--steps", "1",
                                  "--checkpoint-every", "0"], []),
    "align width 0": (["align", "--image", "{img}", "--text", "{txt}", "--out", "{new}", "--steps", "1", "--width", "0"], []),
    "align missing store": (["align", "--image", "{root}/nothing.h5", "--text", "{txt}", "--out", "{new}"], []),
    "align damaged store": (["align", "--image", "{damaged}", "--text", "{txt}", "--out", "{new}"], ["{damaged}"]),
    # eval
    "eval alignment out is a folder": (["eval", "alignment", "--image", "{img}", "--text", "{txt}", "--out",
                                        "{root}/folder"], ["{root}/folder"]),
    "eval alignment out exists": (["eval", "alignment", "--image", "{img}", "--text", "{txt}", "--out",
                                   "{root}/notes.txt"], ["{root}/notes.txt"]),
    "eval alignment k -1": (["eval", "alignment", "--image", "{img}", "--text", "{txt}", "--k", "-1", "--out", "{new}"], []),
    "eval alignment unknown option": (["eval", "alignment", "--image", "{img}", "--text", "{txt}", "-k", "0"], []),
    "eval knn k 0": (["eval", "knn", "--train", "{img}", "--test", "{img}", "--k", "0", "--out", "{new}"], []),
    "eval knn text store": (["eval", "knn", "--train", "{txt}", "--test", "{img}", "--out", "{new}"], []),
    "eval linear-probe missing": (["eval", "linear-probe", "--train", "{root}/nothing.h5", "--test", "{img}",
                                   "--out", "{new}"], []),
    "eval zeroshot no run": (["eval", "zeroshot", "{root}/nothing", "--data", "sample-val", "--out", "{new}"], []),
    "eval zeroshot store as run": (["eval", "zeroshot", "{img}", "--data", "sample-val", "--out", "{new}"], []),
    "eval retrieval missing": (["eval", "retrieval", "{run}", "--data", "{root}/nothing.json", "--out", "{new}"], []),
    "eval retrieval non-UTF-8": (["eval", "retrieval", "{run}", "--data", "{root}/latin1.csv", "--out", "{new}"], []),
    "eval winoground missing": (["eval", "winoground", "{run}", "--data", "{root}/nothing.jsonl", "--out", "{new}"], []),
    "eval segmentation missing": (["eval", "segmentation", "{run}", "--images", "{root}/none", "--masks",
                                   "{root}/none", "--classnames", "{root}/none.txt", "--out", "{new}"], []),
    # index and search
    "index out is a file": (["index", "{run}", "--images", "{img}", "--out", "{root}/notes.txt"], ["{root}/notes.txt"]),
    "index out holds an index": (["index", "{run}", "--images", "{img}", "--out", "{idx}"], ["{idx}"]),
    "index out is another folder": (["index", "{run}", "--images", "{img}", "--out", "{root}/folder", "--overwrite"],
                                    ["{root}/folder"]),
    "index text store": (["index", "{run}", "--images", "{txt}", "--out", "{new}"], []),
    "index no run": (["index", "{root}/nothing", "--images", "{img}", "--out", "{new}"], []),
    "search k 0": (["search", "{idx}", "a red circle", "-k", "0"], ["{idx}"]),
    "search k -1": (["search", "{idx}", "a red circle", "-k", "-1"], ["{idx}"]),
    "search k not a number": (["search", "{idx}", "a red circle", "-k", "many"], ["{idx}"]),
    "search no index": (["search", "{root}/nothing", "a red circle"], []),
    "search run is not an index": (["search", "{run}", "a red circle"], ["{run}"]),
    "search empty query": (["search", "{idx}", "   "], ["{idx}"]),
    # filter, recipes, demo, usage
    "filter non-UTF-8": (["filter", "align", "{root}/latin1.csv", "--out", "{new}.csv"], ["{root}/latin1.csv"]),
    "filter out is the input": (["filter", "align", "{m}", "--out", "{m}"], ["{m}"]),
    "filter missing manifest": (["filter", "align", "{root}/nothing.csv", "--out", "{new}.csv"], []),
    "filter vocab 0": (["filter", "align", "{m}", "--out", "{new}.csv", "--vocab-size", "0"], []),
    "recipe unknown": (["recipe", "nope"], []),
    "recipe config missing": (["recipe", "alip", "--config", "{root}/nothing.yaml"], []),
    "demo out is a file": (["demo", "--out", "{root}/notes.txt", "--features-root", "{new}"], ["{root}/notes.txt"]),
    "unknown command": (["nope"], []),
}


def _fill(arg: str, env: dict, new: Path) -> str:
    return arg.format(**{k: str(v) for k, v in env.items()}, new=str(new))


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_error_line_and_changes_nothing(name, env, tmp_path, capsys):
    argv, named = CASES[name]
    new = tmp_path / "new-output"
    argv = [_fill(a, env, new) for a in argv]
    watched = [Path(_fill(p, env, new)) for p in named] + [new, Path(str(new) + ".csv")]
    before = {p: fingerprint(p) for p in watched}
    root_before = sorted(p.name for p in env["root"].iterdir())
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip()]
    assert "Traceback" not in err
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, lines
    assert "\n" not in errors[0] and len(errors[0]) > len("error: ") + 10
    assert {p: fingerprint(p) for p in watched} == before
    # no temp, partial or parts folder left beside the user's files
    assert sorted(p.name for p in env["root"].iterdir()) == root_before
    assert not [p for p in tmp_path.iterdir() if p.name != "new-output"]


def test_entry_point_prints_one_line(env, tmp_path):
    """The real `python -m sail.cli`: an --out naming an existing file used to be a FileExistsError traceback."""
    r = subprocess.run([sys.executable, "-m", "sail.cli", "index", str(env["run"]), "--images", str(env["img"]),
                        "--out", str(env["root"] / "notes.txt")], capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1])))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [f"error: --out {env['root'] / 'notes.txt'} is a file; an index is a "
                                             "directory: choose another path"]


def test_overwrite_replaces_index_and_results(env, tmp_path, capsys):
    """--overwrite is the way to replace an output; the replaced index is whole (never half-written)."""
    idx = tmp_path / "idx"
    assert main(["index", str(env["run"]), "--images", str(env["img"]), "--out", str(idx)]) == 0
    (idx / "index.json").write_text('{"stale": true}')
    assert main(["index", str(env["run"]), "--images", str(env["img"]), "--out", str(idx), "--overwrite"]) == 0
    assert sorted(p.name for p in idx.iterdir()) == ["ids.json", "index.faiss", "index.json"]
    assert "stale" not in (idx / "index.json").read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["idx"]  # no .tmp / .old folders beside it

    out = tmp_path / "a.json"
    out.write_text("old")
    argv = ["eval", "alignment", "--image", str(env["img"]), "--text", str(env["txt"]), "--k", "3", "--out", str(out)]
    assert main(argv) == 2 and out.read_text() == "old"
    assert main(argv + ["--overwrite"]) == 0 and '"mutual_knn"' in out.read_text()
    capsys.readouterr()


def test_extract_overwrite_replaces_a_store_only_when_complete(env, tmp_path):
    out = tmp_path / "s.h5"
    out.write_bytes(env["txt"].read_bytes())  # a store from the text model
    argv = ["extract", "--model", str(env["vision"]), "--data", str(env["m"]), "--out", str(out), "--workers", "0"]
    assert main(argv) == 2
    assert main(argv + ["--overwrite"]) == 0
    from sail.data.store import FeatureStore

    with FeatureStore(out) as s:
        assert s.attrs["modality"] == "image" and len(s) == 24
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.h5"]


def test_failed_extract_leaves_no_parts_folder(env, tmp_path, monkeypatch):
    """An error after the parts folder is made (here: inside the forward) removes it when nothing was saved."""
    import sail.encoders

    def broken(self, pixels, patch_tokens=False):
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(sail.encoders.ImageEncoder, "encode_pixels", broken)
    with pytest.raises(RuntimeError, match="simulated"):
        main(["extract", "--model", str(env["vision"]), "--data", str(env["m"]), "--out", str(tmp_path / "s.h5"),
              "--workers", "0"])
    assert list(tmp_path.iterdir()) == []


def test_damaged_store_cannot_be_trained_on_but_info_reads_it(env, capsys):
    assert main(["info", str(env["damaged"])]) == 2
    out, err = capsys.readouterr()
    assert "PROBLEM: 7 empty ids (rows 3, 4, 5, 6, 7, ...)" in out
    assert err.strip() == f"error: {env['damaged']} is damaged: 7 empty ids (rows 3, 4, 5, 6, 7, ...); extract it again"
    assert np.array_equal(h5py.File(env["damaged"])["features/image"][:], h5py.File(env["img"])["features/image"][:])
