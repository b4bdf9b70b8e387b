"""Data in: datasets (the entry point, open_dataset) over sources (the Dataset columns), manifests,
WebDataset shards, CLIP_benchmark folders and image folders; images (decoding, colour);
columns, sample, augment; the HDF5 feature store and the loader that batches it.
"""

from importlib import import_module
from importlib.util import find_spec


def __getattr__(name):  # sail.data was one module before 0.3; its names now live in sail.data.datasets
    if not name.startswith("_") and find_spec(f"{__name__}.{name}") is not None:
        return import_module(f"{__name__}.{name}")
    value = getattr(import_module("sail.data.datasets"), name, __getattr__)
    if value is __getattr__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return value
