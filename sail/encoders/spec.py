"""ModelSpec: what an encoder is (name, source, modality). sail.encoders resolves aliases, Hub ids and
directories to one; sail.encoders.zoo resolves custom `package.module:function` encoders to one. Both import it
from here, so the registry and the zoo do not import each other at load time.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ModelSpec:
    """What to load: a name for stores and runs, where from, which modality."""

    name: str          # short name used in default paths (alias or last path component)
    source: str        # HF id or local directory
    modality: str      # "image" | "text"
    trust_remote_code: bool = False
