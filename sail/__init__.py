"""sail: vision-language alignment tuning on frozen unimodal encoders.

    import sail
    store = sail.FeatureStore("features/sample/dinov2-s.h5")
    heads = sail.AlignmentHeads.from_pretrained("runs/demo")
    model = sail.SAILModel.from_pretrained("runs/demo")
"""

from importlib import import_module
from importlib.util import find_spec

from sail.core import moved as _moved

__version__ = "0.1.0"

# Heavy modules (torch, transformers) are imported on first use so `sail --help` stays fast.
_LAZY = {
    "FeatureStore": "sail.data.store",
    "AlignmentHeads": "sail.train.heads",
    "SAILModel": "sail.train.model",
    "SailError": "sail.core.errors",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    # `import sail; sail.PACKAGE.MODULE.NAME`: any sub-module or sub-package (old names too) on first use
    if not name.startswith("_") and (f"sail.{name}" in _moved.MOVED or find_spec(f"sail.{name}") is not None):
        return import_module(f"sail.{name}")
    raise AttributeError(f"module 'sail' has no attribute {name!r}")


_moved.install()  # old module names import their new homes; see sail/core/moved.py
