"""Hugging Face Hub: load trained heads by id, and publish a run with a model card.

    heads = sail.AlignmentHeads.from_pretrained("org/name")                  # or a local run directory
    model = sail.SAILModel.from_pretrained("org/name", revision="v1", cache_dir="/data/hf")
    sail push runs/cc3m org/name              # config + weights + model card (+ curves, eval JSON)
    sail push runs/cc3m org/name --dry-run out/   # only prepare the folder, upload nothing

Loading goes through `huggingface_hub.snapshot_download`, so its cache (HF_HUB_CACHE / HF_HOME or
`cache_dir`), `revision` (branch, tag or commit) and offline mode (HF_HUB_OFFLINE=1, or
`local_files_only=True`: the cached snapshot is used, nothing is fetched) behave as in transformers.
Publishing is two steps: `prepare_repo` writes the folder (tested offline), and `upload`, a thin call to
`HfApi.create_repo` + `upload_folder`, sends it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from sail.errors import SailError

# Resolving a location (directory or Hub id) lives below the heads and the model, which both load by id.
from sail.locate import _REPO_ID, REPO_FILES, _offline, resolve_pretrained  # noqa: F401


# ------------------------------------------------------------------------------------------ publishing


def _table(rows: list[tuple], header: tuple) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _fmt(v) -> str:
    return f"{v:.2f}" if isinstance(v, float) else str(v)


def eval_rows(run: Path) -> list[tuple[str, str, str]]:
    """(task, metric, value) from RUN/eval/*.json (flat numbers only; predictions files are skipped)."""
    rows = []
    for path in sorted((run / "eval").glob("*.json")) if (run / "eval").is_dir() else []:
        if path.stem == "predictions":
            continue
        try:
            blob = json.loads(path.read_text())
        except json.JSONDecodeError:
            continue
        for k, v in blob.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                rows.append((path.stem, k, _fmt(v)))
    return rows


def model_card(run: Path, repo_id: str) -> str:
    """README.md for the Hub: front matter, encoders, training settings, evaluation, curves, usage."""
    from sail.model import read_run_config

    cfg = read_run_config(run)
    settings = json.loads((run / "train_config.json").read_text()) if (run / "train_config.json").exists() else {}
    summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").exists() else {}
    img, txt = cfg.get("image_encoder", {}), cfg.get("text_encoder", {})
    front = ["---", "library_name: sail", "pipeline_tag: zero-shot-image-classification",
             "tags:", "- sail", "- vision-language", "- clip", "- alignment-heads"]
    bases = [m for m in (img.get("model_id"), txt.get("model_id")) if m and _REPO_ID.match(str(m))]
    if bases:
        front += ["base_model:"] + [f"- {m}" for m in bases]
    front.append("---")
    enc_rows = [(side, f"`{e.get('model_id')}`", e.get("model_revision", "-"), e.get("pooling", "-"), e.get("dim", "-"))
                for side, e in (("image", img), ("text", txt))]
    keys = ("loss", "average", "head", "width", "out_dim", "activation", "batch", "epochs", "steps", "optimizer", "lr",
            "weight_decay", "warmup", "init_scale", "init_bias", "captions", "seed")
    set_rows = [(k, f"`{settings[k]}`") for k in keys if k in settings and settings[k] is not None]
    train = cfg.get("train", {})
    set_rows += [(f"{k} (resolved)", f"`{train[k]}`") for k in ("batch", "steps", "pairs", "val_pairs") if k in train]
    parts = ["\n".join(front), f"# {repo_id.split('/')[-1]}",
             f"Alignment heads trained with [sail](https://github.com/) on frozen encoders: a "
             f"{cfg.get('kind', '?')} head per modality ({cfg.get('image_dim')}-d image and {cfg.get('text_dim')}-d "
             f"text features -> {cfg.get('out_dim')}-d shared space), {cfg.get('loss', '?')} loss.",
             "## Encoders\n\n" + _table(enc_rows, ("modality", "model", "revision", "pooling", "feature dim")),
             "## Training settings\n\n" + _table(set_rows, ("setting", "value"))]
    final = [(k, _fmt(v)) for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if final:
        parts.append("## Final training metrics\n\n" + _table(final, ("metric", "value")))
    ev = eval_rows(run)
    parts.append("## Evaluation\n\n" + (_table(ev, ("task", "metric", "value")) if ev else
                                         "No evaluation yet (`sail eval TASK RUN` writes RUN/eval/TASK.json)."))
    if (run / "curves.png").exists():
        parts.append("## Training curves\n\n![training curves](curves.png)")
    parts.append("## Use\n\n```python\nimport sail\n\n"
                 f'model = sail.SAILModel.from_pretrained("{repo_id}")   # heads + both frozen encoders\n'
                 'model.similarity(["cat.jpg"], ["a photo of a cat", "a photo of a dog"])\n'
                 f'heads = sail.AlignmentHeads.from_pretrained("{repo_id}")  # heads only, on cached features\n```')
    return "\n\n".join(parts) + "\n"


def prepare_repo(run: str | Path, repo_id: str, folder: str | Path) -> Path:
    """Write what `sail push` uploads into `folder` (which must be new or empty)."""
    from sail.heads import AlignmentHeads

    run, folder = Path(run), Path(folder)
    if not _REPO_ID.match(repo_id):
        raise SailError(f"{repo_id!r} is not a Hub repository id; write org/name")
    AlignmentHeads.from_pretrained(run)  # refuse a run whose weights do not load
    if folder.exists() and any(folder.iterdir()):
        raise SailError(f"{folder} is not empty; choose a new folder for the upload")
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "model.safetensors", "train_config.json", "encoders.json", "curves.png", "summary.json"):
        if (run / name).exists():
            shutil.copy2(run / name, folder / name)
    if (run / "eval").is_dir():
        (folder / "eval").mkdir()
        for p in sorted((run / "eval").glob("*.json")):
            if p.stem != "predictions":
                shutil.copy2(p, folder / "eval" / p.name)
    (folder / "README.md").write_text(model_card(run, repo_id))
    return folder


def upload(folder: str | Path, repo_id: str, private: bool = False, token: str | None = None,
           message: str = "Upload sail alignment heads") -> str:
    """Create the repo if needed and upload the prepared folder; returns the commit URL. Needs network."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=message)
    except Exception as e:  # network, auth, permissions: one line, no traceback
        raise SailError(f"upload to {repo_id} failed ({str(e).splitlines()[0][:200]}); check `huggingface-cli login` "
                        "and your network") from None
    return str(getattr(info, "commit_url", info))


def push(run: str | Path, repo_id: str, private: bool = False, dry_run: str | None = None) -> str:
    """`sail push`: prepare the folder (in `dry_run` or a temporary directory), then upload unless dry."""
    import tempfile

    if dry_run:
        folder = prepare_repo(run, repo_id, dry_run)
        return str(folder)
    with tempfile.TemporaryDirectory(prefix="sail-push-") as tmp:
        folder = prepare_repo(run, repo_id, Path(tmp) / "repo")
        return upload(folder, repo_id, private)
