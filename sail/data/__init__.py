"""Data in: datasets (the entry point, open_dataset) over sources (the Dataset columns), manifests,
WebDataset shards, CLIP_benchmark folders and image folders; images (decoding, colour);
columns, sample, augment; the HDF5 feature store and the loader that batches it.
"""

from sail.core.moved import serve_old_names

__getattr__ = serve_old_names(__name__, "sail.data.datasets")  # sail.data was one module before 0.3
