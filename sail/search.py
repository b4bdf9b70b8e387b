"""Text-to-image search: a faiss index of a run's projected image embeddings, queried with free text.

    build_index("runs/demo", "features/sample/dinov2-s.h5", "indexes/sample")
    for hit in search("indexes/sample", "a red circle", k=5): print(hit)

The index directory holds `index.faiss` (inner product over L2-normalised embeddings = cosine),
`ids.json` (row -> sample id and image path where the store's source is a manifest/folder) and
`index.json` (the run and store it came from).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from sail.errors import SailError
from sail.heads import AlignmentHeads
from sail.model import project_store
from sail.store import FeatureStore


def _image_paths(store: FeatureStore) -> dict[str, str]:
    """Best effort: reopen the store's source to map ids to image paths (empty if it moved)."""
    from sail.data import open_dataset

    source = store.attrs.get("source", "")
    spec = store.attrs.get("dataset") if str(store.attrs.get("dataset", "")).startswith("sample") else source
    try:
        ds = open_dataset(spec, columns=[])
    except Exception:  # the source moved or is not openable: ids alone still work
        return {}
    return {i: p for i, p in zip(ds.ids, ds.images) if p}


def build_index(run: str, images: str, out: str) -> dict:
    import faiss

    from sail.evaluate import check_store_matches_run

    heads = AlignmentHeads.from_pretrained(run)
    store = FeatureStore(images)
    check_store_matches_run(run, store, "image")
    rows = np.flatnonzero(store.valid("image"))
    if len(rows) == 0:
        raise SailError(f"{images} has no valid image rows; nothing to index")
    emb = project_store(heads, store.read("image", rows), "image").numpy().astype(np.float32)
    index = faiss.IndexFlatIP(emb.shape[1])
    index.add(emb)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    faiss.write_index(index, str(out_dir / "index.faiss"))
    paths = _image_paths(store)
    ids = [str(store.ids[r]) for r in rows]
    (out_dir / "ids.json").write_text(json.dumps([{"id": i, "path": paths.get(i)} for i in ids]))
    meta = {"run": str(Path(run).resolve()), "store": str(store.path.resolve()), "size": len(ids), "dim": emb.shape[1]}
    (out_dir / "index.json").write_text(json.dumps(meta, indent=1))
    return meta


def search(index_dir: str, query: str | list[str], k: int = 10, model=None, device: str = "auto") -> list[dict]:
    """Best k images for a text query: [{rank, score, id, path}]."""
    import faiss

    from sail.model import SAILModel

    d = Path(index_dir)
    if not (d / "index.faiss").exists():
        raise SailError(f"{index_dir} is not a sail index; build one with `sail index RUN --images STORE --out DIR`")
    if isinstance(query, str):
        query = [query]
    if not query or not all(q.strip() for q in query):
        raise SailError("the search query is empty; give some text, e.g. \"a dog on a beach\"")
    meta = json.loads((d / "index.json").read_text())
    items = json.loads((d / "ids.json").read_text())
    model = model or SAILModel.from_pretrained(meta["run"], device=device)
    q = model.encode_text(query).float().cpu().numpy()
    index = faiss.read_index(str(d / "index.faiss"))
    scores, idx = index.search(q, min(k, index.ntotal))
    return [{"rank": r + 1, "score": float(s), **items[i]} for r, (s, i) in enumerate(zip(scores[0], idx[0])) if i >= 0]
