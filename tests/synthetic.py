"""Synthetic paired feature stores with a known shared latent, for the align / eval tests."""

from pathlib import Path

import numpy as np

from sail.data.store import StoreWriter


def write_store(path: Path, ids, features: dict, modality: str, model_id: str, labels=None, class_names=None,
                valid: dict | None = None) -> Path:
    dims = {f: x.shape[1] for f, x in features.items()}
    w = StoreWriter(path, list(ids), dims)
    w.write(0, features, valid or {f: np.ones(len(ids), bool) for f in features})
    attrs = {"model_id": model_id, "model_revision": "test", "modality": modality, "pooling": "concat" if modality == "image" else "mean",
             "dim": next(iter(dims.values())), "dtype": "float16", "preprocessing": "{}", "max_length": -1,
             "source": "synthetic", "source_hash": "0", "dataset": "synthetic", "sail_version": "test"}
    w.finish(attrs, labels, class_names, [])
    return path


def paired_stores(tmp: Path, n=2000, latent=16, image_dim=48, text_dim=32, noise=0.3, seed=0, shuffle_text=True,
                  captions=("caption",)):
    """Image and text features that are two noisy linear views of one latent; text rows in another order."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, latent))
    a, b = rng.standard_normal((latent, image_dim)), rng.standard_normal((latent, text_dim))
    ids = np.array([f"id{i:05d}" for i in range(n)])
    image = z @ a + noise * rng.standard_normal((n, image_dim))
    texts = {c: z @ b + noise * rng.standard_normal((n, text_dim)) for c in captions}
    order = rng.permutation(n) if shuffle_text else np.arange(n)
    write_store(tmp / "img.h5", ids, {"image": image.astype(np.float16)}, "image", "synthetic-vision")
    write_store(tmp / "txt.h5", ids[order], {c: t[order].astype(np.float16) for c, t in texts.items()}, "text",
                "synthetic-text")
    return tmp / "img.h5", tmp / "txt.h5"
