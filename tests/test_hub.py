"""Hub: loading heads by id from a local Hugging Face cache (offline, revisions), and `sail push`'s
folder and model card. Nothing here touches the network: the upload call is replaced by a recorder."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from sail import hub
from sail.cli import main
from sail.core.errors import SailError
from sail.train.align_heads import AlignConfig, align
from sail.train.heads import AlignmentHeads
from sail.train.model import SAILModel
from synthetic import paired_stores

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two tiny runs (different seeds) with an eval file and a predictions file."""
    tmp = tmp_path_factory.mktemp("hub")
    img, txt = paired_stores(tmp, n=300, latent=8, image_dim=24, text_dim=16)
    out = []
    for seed in (0, 1):
        run = tmp / f"run{seed}"
        align(AlignConfig(image=str(img), text=str(txt), out=str(run), head="linear", out_dim=8, batch=128, steps=4,
                          optimizer="adamw", lr=1e-3, val_fraction=0.2, eval_every=2, seed=seed, progress=False))
        (run / "eval").mkdir()
        (run / "eval" / "zeroshot.json").write_text(json.dumps({"top1": 61.25, "top5": 90.0, "classes": 10}))
        (run / "eval" / "predictions.json").write_text(json.dumps({"zeroshot": {}}))
        out.append(run)
    return out


def _cache_repo(cache: Path, repo: str, commit: str, folder: Path, refs=("main",)) -> None:
    """Place a prepared folder where huggingface_hub keeps a downloaded snapshot."""
    base = cache / f"models--{repo.replace('/', '--')}"
    shutil.copytree(folder, base / "snapshots" / commit)
    (base / "refs").mkdir(parents=True, exist_ok=True)
    for ref in refs:
        (base / "refs" / ref).write_text(commit)


def _same(a: AlignmentHeads, b: AlignmentHeads) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_model_card_and_folder(runs, tmp_path):
    folder = hub.prepare_repo(runs[0], "org/heads", tmp_path / "repo")
    names = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    assert names == ["README.md", "config.json", "curves.png", "encoders.json", "eval/zeroshot.json",
                     "model.safetensors", "summary.json", "train_config.json"]  # predictions stay private
    card = (folder / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["library_name"] == "sail" and "sail" in front["tags"]
    settings = json.loads((runs[0] / "train_config.json").read_text())
    summary = json.loads((runs[0] / "summary.json").read_text())
    assert "| zeroshot | top1 | 61.25 |" in card and "| zeroshot | classes | 10 |" in card
    assert f"| loss | `{settings['loss']}` |" in card and "| batch (resolved) | `128` |" in card
    assert f"| val_i2t_R@1 | {summary['val_i2t_R@1']:.2f} |" in card
    assert "`synthetic-vision`" in card and "`synthetic-text`" in card and "![training curves](curves.png)" in card
    assert 'SAILModel.from_pretrained("org/heads")' in card
    with pytest.raises(SailError, match="not empty"):
        hub.prepare_repo(runs[0], "org/heads", tmp_path / "repo")
    with pytest.raises(SailError, match="org/name"):
        hub.prepare_repo(runs[0], "no-slash", tmp_path / "other")


def test_load_by_id_offline_from_cache_with_revisions(runs, tmp_path, monkeypatch):
    cache = tmp_path / "hf"
    _cache_repo(cache, "org/heads", "a" * 40, hub.prepare_repo(runs[0], "org/heads", tmp_path / "r0"))
    _cache_repo(cache, "org/heads", "b" * 40, hub.prepare_repo(runs[1], "org/heads", tmp_path / "r1"), refs=("v1",))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    want0, want1 = AlignmentHeads.from_pretrained(runs[0]), AlignmentHeads.from_pretrained(runs[1])
    assert not _same(want0, want1)
    assert _same(AlignmentHeads.from_pretrained("org/heads", cache_dir=cache), want0)
    assert _same(AlignmentHeads.from_pretrained("org/heads", cache_dir=cache, revision="v1"), want1)
    assert _same(AlignmentHeads.from_pretrained("org/heads", cache_dir=cache, revision="b" * 40), want1)
    model = SAILModel.from_pretrained("org/heads", cache_dir=cache, device="cpu")
    assert _same(model.heads.cpu(), want0) and model.image_model == "synthetic-vision"
    with pytest.raises(SailError, match="offline mode is on"):
        AlignmentHeads.from_pretrained("org/missing", cache_dir=cache)
    with pytest.raises(SailError, match="offline mode is on"):
        AlignmentHeads.from_pretrained("org/heads", cache_dir=cache, revision="v2")
    assert _same(AlignmentHeads.from_pretrained(str(runs[1])), want1)  # a local path still works


def test_environment_cache_and_offline_in_a_fresh_process(runs, tmp_path):
    cache = tmp_path / "hf"
    _cache_repo(cache, "org/heads", "c" * 40, hub.prepare_repo(runs[1], "org/heads", tmp_path / "r"))
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    code = ("import sail, torch; h = sail.AlignmentHeads.from_pretrained('org/heads'); "
            "print(float(h.state_dict()['logit_bias']), h.config['out_dim'])")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    want = AlignmentHeads.from_pretrained(runs[1])
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(float(want.state_dict()["logit_bias"])), "8"]


def test_push_dry_run_and_upload_step(runs, tmp_path, monkeypatch, capsys):
    assert main(["push", str(runs[0]), "org/heads", "--dry-run", str(tmp_path / "dry")]) == 0
    assert (tmp_path / "dry" / "README.md").exists() and "prepared" in capsys.readouterr().out
    calls = []

    class FakeApi:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, private=False, exist_ok=False):
            calls.append(("create", repo_id, private, exist_ok))

        def upload_folder(self, repo_id, folder_path, commit_message):
            calls.append(("upload", repo_id, sorted(p.name for p in Path(folder_path).iterdir())))
            return type("Info", (), {"commit_url": f"https://huggingface.co/{repo_id}/commit/123"})()

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    assert hub.push(runs[0], "org/heads", private=True) == "https://huggingface.co/org/heads/commit/123"
    assert calls[0] == ("create", "org/heads", True, True)
    assert calls[1][0] == "upload" and {"README.md", "config.json", "model.safetensors"} <= set(calls[1][2])

    class Down(FakeApi):
        def create_repo(self, *a, **k):
            raise ConnectionError("no network")

    monkeypatch.setattr(huggingface_hub, "HfApi", Down)
    assert main(["push", str(runs[0]), "org/heads"]) == 2
    assert "upload to org/heads failed (no network)" in capsys.readouterr().err
