"""Old module names that still import. When modules move into sub-packages (tools/relayout.py; README "What
moved"), `import sail.heads` must keep giving the module now at sail/train/heads.py. One finder on sys.meta_path
maps each old name in MOVED to its new module, which is imported once under its own name and registered under
the old one too: `sail.heads.AlignmentHeads`, `monkeypatch.setattr("sail.step.train_step", ...)`, entry points
written as `sail.zoo:efficientnet_lite0` and `python -m sail.clip_benchmark` keep working, and `sail.heads is
sail.train.heads`, so patching either name patches the one module.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

MOVED: dict[str, str] = {
    "sail.align": "sail.train.align_heads",
    "sail.artifacts": "sail.core.artifacts",
    "sail.augment": "sail.data.augment",
    "sail.benchmark_folders": "sail.data.benchmark_folders",
    "sail.checkpoint": "sail.train.checkpoint",
    "sail.clip_benchmark": "sail.eval.clip_benchmark",
    "sail.columns": "sail.data.columns",
    "sail.distributed": "sail.core.distributed",
    "sail.engine": "sail.train.engine",
    "sail.errors": "sail.core.errors",
    "sail.evalsets": "sail.eval.evalsets",
    "sail.evaluate": "sail.eval.tasks",
    "sail.extract": "sail.encoders.extract",
    "sail.filter": "sail.recipes.filter",
    "sail.gradcache": "sail.train.step",
    "sail.heads": "sail.train.heads",
    "sail.images": "sail.data.images",
    "sail.loader": "sail.data.loader",
    "sail.locate": "sail.core.locate",
    "sail.loss_blocks": "sail.train.loss_blocks",
    "sail.losses": "sail.train.losses",
    "sail.manifests": "sail.data.manifests",
    "sail.metrics": "sail.core.metrics",
    "sail.model": "sail.train.model",
    "sail.moved": "sail.core.moved",
    "sail.optim": "sail.train.optim",
    "sail.precision": "sail.core.precision",
    "sail.recipe": "sail.recipes.runner",
    "sail.recipe_config": "sail.recipes.config",
    "sail.recipe_data": "sail.recipes.batches",
    "sail.runlog": "sail.train.runlog",
    "sail.sample": "sail.data.sample",
    "sail.search": "sail.eval.search",
    "sail.segmentation": "sail.eval.segmentation",
    "sail.shards": "sail.data.shards",
    "sail.sources": "sail.data.sources",
    "sail.spec": "sail.encoders.spec",
    "sail.stability": "sail.train.stability",
    "sail.step": "sail.train.step",
    "sail.store": "sail.data.store",
    "sail.subset": "sail.data.subset",
    "sail.templates": "sail.eval.templates",
    "sail.tiny": "sail.encoders.tiny",
    "sail.towers": "sail.train.towers",
    "sail.triton_sigmoid": "sail.train.triton_sigmoid",
    "sail.zoo": "sail.encoders.zoo",
}  # old module name -> new module name; tools/relayout.py writes this table


class _AliasLoader(importlib.abc.Loader):
    """Loads an old name as the already-importable new module (the same object, not a copy)."""

    def __init__(self, new: str):
        self.new = new
        self.spec = None

    def create_module(self, spec):
        module = importlib.import_module(self.new)
        self.spec = module.__spec__
        return module

    def exec_module(self, module):
        module.__spec__ = self.spec  # importlib set the alias's spec; the module keeps its own (pickle, reload)

    def get_code(self, fullname):  # what `python -m OLD_NAME` (runpy) runs: the new module's code
        return importlib.util.find_spec(self.new).loader.get_code(self.new)


class _MovedFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        new = MOVED.get(fullname)
        if new is None:
            return None
        try:
            real = importlib.util.find_spec(new)
        except ModuleNotFoundError:  # its package is missing too
            real = None
        if real is None:  # a table line for a module this checkout does not have: no such module
            return None
        return importlib.util.spec_from_loader(fullname, _AliasLoader(new), origin=real.origin)


def serve_old_names(package: str, home: str):
    """A package's module `__getattr__` for a package that took an old module's name (`sail.data`, `sail.encoders`):
    its sub-modules by name, else the names of `home`, the module the old one became, loaded on first use."""

    def __getattr__(name):
        if not name.startswith("_") and importlib.util.find_spec(f"{package}.{name}") is not None:
            return importlib.import_module(f"{package}.{name}")
        value = getattr(importlib.import_module(home), name, __getattr__)
        if value is __getattr__:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return value

    return __getattr__


def install() -> None:
    """Put the finder first on sys.meta_path, once: an old name is moved by definition, and a stale copy of
    the flat layout (an editable install of an older checkout) must not answer for it."""
    if not any(isinstance(f, _MovedFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _MovedFinder())
