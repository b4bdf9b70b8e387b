"""Where a trained run is: a local directory as it is, or a Hugging Face id ("org/name") -> its downloaded
(or cached) snapshot folder. sail.train.heads and sail.train.model load by id through it; sail.hub publishes.
Cache (HF_HUB_CACHE / HF_HOME or `cache_dir`), `revision` and offline mode behave as in transformers.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from sail.core.errors import SailError

REPO_FILES = ["config.json", "model.safetensors", "README.md", "train_config.json", "encoders.json", "curves.png",
              "summary.json", "eval/*.json", "tokenizer/*"]
_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def resolve_pretrained(name_or_path: str | Path, revision: str | None = None, cache_dir: str | Path | None = None,
                       local_files_only: bool | None = None) -> Path:
    """A local directory as it is, or a Hub id ("org/name") -> its downloaded (or cached) snapshot folder."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    name = str(name_or_path)
    if not _REPO_ID.match(name) or name.startswith((".", "/")):
        raise SailError(f"{name} is neither a local run directory nor a Hugging Face id like org/name")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    offline = _offline() if local_files_only is None else local_files_only
    local = f"{name}{'@' + revision if revision else ''} is not a local directory, and as a Hugging Face id "
    try:
        folder = snapshot_download(name, revision=revision, cache_dir=cache_dir, local_files_only=offline,
                                   allow_patterns=REPO_FILES, library_name="sail")
    except (RepositoryNotFoundError, RevisionNotFoundError) as e:
        raise SailError(local + f"it is not on the Hugging Face Hub "
                        f"({type(e).__name__}); check the path, the id and revision, or log in for a private repo") from None
    except LocalEntryNotFoundError as e:
        where = f"cache {cache_dir}" if cache_dir else "the Hugging Face cache"
        if offline or type(e.__cause__).__name__ == "OfflineModeIsEnabled":
            raise SailError(local + f"it is not in {where} and offline mode is on "
                            "(HF_HUB_OFFLINE=1); check the path, or download it once online") from None
        # not offline: the Hub could not be reached (no network, a proxy, Hub downtime), and no cached copy
        cause = e.__cause__ or e
        raise SailError(local + f"the Hub could not be reached ({type(cause).__name__}: "
                        f"{str(cause).splitlines()[0][:160]}) and it is not in {where}; check your network "
                        "or proxy, or pass a local directory") from None
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise SailError(local + f"it cannot be fetched ({str(e).splitlines()[0][:160]}); check the path or your network") from None
    return Path(folder)
