"""Frozen encoders: the registry of aliases and Hub ids (registry.py), the ModelSpec they resolve to
(spec.py), custom `package.module:function` encoders (zoo.py), tiny test models, and extract
(data -> encoders -> feature store).
"""

from importlib import import_module
from importlib.util import find_spec


def __getattr__(name):  # sail.encoders was one module before 0.3; its names now live in sail.encoders.registry
    if not name.startswith("_") and find_spec(f"{__name__}.{name}") is not None:
        return import_module(f"{__name__}.{name}")
    value = getattr(import_module("sail.encoders.registry"), name, __getattr__)
    if value is __getattr__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return value
