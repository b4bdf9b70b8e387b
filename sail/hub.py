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

import shutil
from pathlib import Path

from sail.core.artifacts import atomic_dir, read_json, write_atomic, write_json
from sail.core.errors import SailError

# Resolving a location (directory or Hub id) lives below the heads and the model, which both load by id.
from sail.core.locate import _REPO_ID, REPO_FILES, _offline, resolve_pretrained  # noqa: F401


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
        blob = read_json(path, what="evaluation results", todo="delete it or run that `sail eval` again")
        for k, v in blob.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                rows.append((path.stem, k, _fmt(v)))
    return rows


def _optional(path: Path, what: str) -> dict:
    """A run file the card uses when present; a damaged one stops the push (it would be uploaded as is)."""
    return read_json(path, what=what) if path.exists() else {}


def model_card(run: Path, repo_id: str) -> str:
    """README.md for the Hub: front matter, encoders, training settings, evaluation, curves, usage."""
    from sail.train.model import read_run_config

    cfg = read_run_config(run)
    settings = _optional(run / "train_config.json", "run settings")
    summary = _optional(run / "summary.json", "run summary")
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
    """Write what `sail push` uploads into `folder` (which must be new or empty). Everything is checked
    first and written into a temporary sibling that is renamed into place, so a refusal or a full disk
    leaves no half-written folder that would block the rerun."""
    from sail.train.heads import AlignmentHeads

    run, folder = Path(run), Path(folder)
    if not _REPO_ID.match(repo_id):
        raise SailError(f"{repo_id!r} is not a Hub repository id; write org/name")
    _refuse_recipe_run(run)
    AlignmentHeads.from_pretrained(run)  # refuse a run whose weights do not load
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise SailError(f"{folder} is not empty; choose a new folder for the upload")
    card = model_card(run, repo_id)  # reads (and validates) every JSON file that goes up
    evals = [p for p in sorted((run / "eval").glob("*.json")) if p.stem != "predictions"] if (run / "eval").is_dir() else []
    folder.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_dir(folder) as tmp:  # an empty folder the user made is replaced too
            for name in ("config.json", "model.safetensors", "train_config.json", "encoders.json", "curves.png",
                         "summary.json"):
                if (run / name).exists():
                    shutil.copy2(run / name, tmp / name)
            for p in evals:
                (tmp / "eval").mkdir(exist_ok=True)
                shutil.copy2(p, tmp / "eval" / p.name)
            write_atomic(tmp / "README.md", card)
    except OSError as e:
        raise SailError(f"cannot write {folder} ({e.strerror or e}); free space or choose another folder") from None
    return folder


def _refuse_recipe_run(run: Path) -> None:
    """`sail push` publishes alignment heads; a recipe run (full towers) is another format."""
    config = read_json(run / "config.json", what="model config", todo="train the run again") \
        if (run / "config.json").is_file() else {}
    if (run / "recipe-config.yaml").exists() or config.get("format") == "sail-towers":
        raise SailError(f"{run} is a recipe run (full two-tower model); sail push publishes alignment-head runs "
                        "from `sail align` only. Share the run folder itself: "
                        "sail.train.towers.Towers.from_pretrained reads it")


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
