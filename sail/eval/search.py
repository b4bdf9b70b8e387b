"""Text-to-image search: a faiss index of a run's projected image embeddings, queried with free text.

    build_index("runs/demo", "features/sample/dinov2-s.h5", "indexes/sample")
    for hit in search("indexes/sample", "a red circle", k=5): print(hit)

The index directory holds `index.faiss` (inner product over L2-normalised embeddings = cosine),
`ids.json` (row -> sample id and image path where the store's source is a manifest/folder) and
`index.json` (the run and store it came from, and the sha256 of the other two files, verified before
every search so a damaged index is one error line, not a wrong answer). It is built in a temporary folder beside `out` and renamed
into place, so an interrupted build leaves no half-written index; an existing index is replaced only with
overwrite=True (`--overwrite`), and a folder that is not an index never.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sail.core.artifacts import DamagedArtifact, Lock, atomic_dir, checksums, read_json, verify_checksums, write_json
from sail.core.errors import SailError
from sail.data.store import FeatureStore
from sail.train.heads import AlignmentHeads
from sail.train.model import project_store


def _image_paths(store: FeatureStore) -> dict[str, str]:
    """Best effort: reopen the store's source to map ids to image paths (empty if it moved)."""
    from sail.data import open_dataset

    source = store.attrs.get("source", "")
    spec = store.attrs.get("dataset") if str(store.attrs.get("dataset", "")).startswith("sample") else source
    try:
        ds = open_dataset(spec, columns=[], encoding=store.attrs.get("encoding", "utf-8"))
    except Exception:  # the source moved or is not openable: ids alone still work
        return {}
    return {i: p for i, p in zip(ds.ids, ds.images) if p}


def _check_index_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise SailError(f"--out {out} is a file; an index is a directory: choose another path")
    if out.is_dir() and any(out.iterdir()):
        if not (out / "index.faiss").exists():
            raise SailError(f"--out {out} is a folder that is not a sail index and not empty; choose another path")
        if not overwrite:
            raise SailError(f"--out {out} already holds an index; pass --overwrite to replace it, or choose another path")


def build_index(run: str, images: str, out: str, overwrite: bool = False) -> dict:
    import faiss

    from sail.eval.tasks import check_store_matches_run

    out_dir = Path(out)
    _check_index_out(out_dir, overwrite)  # before the (long) projection
    heads = AlignmentHeads.from_pretrained(run)
    store = FeatureStore(images)
    check_store_matches_run(run, store, "image")
    rows = np.flatnonzero(store.valid("image"))
    if len(rows) == 0:
        raise SailError(f"{images} has no valid image rows; nothing to index")
    emb = project_store(heads, store.read("image", rows), "image").numpy().astype(np.float32)
    index = faiss.IndexFlatIP(emb.shape[1])
    index.add(emb)
    with Lock(out_dir.parent, what="index build", name=f".{out_dir.name}.lock"):
        return _write_index(index, store, rows, run, out_dir, overwrite, emb.shape[1])


def _write_index(index, store: FeatureStore, rows: np.ndarray, run: str, out_dir: Path, overwrite: bool, dim: int) -> dict:
    """Write the three files into a temporary folder beside `out_dir`, then swap it into place (artifacts.atomic_dir)."""
    import faiss

    with atomic_dir(out_dir, replace=True) as tmp:  # replace: _check_index_out allowed it (empty, or --overwrite)
        try:
            faiss.write_index(index, str(tmp / "index.faiss"))
        except RuntimeError as e:  # faiss reports a full disk as a RuntimeError
            raise SailError(f"cannot write {out_dir} ({str(e).splitlines()[-1][:120]}); free space and run it again") from None
        paths = _image_paths(store)
        ids = [str(store.ids[r]) for r in rows]
        write_json(tmp / "ids.json", [{"id": i, "path": paths.get(i)} for i in ids], indent=None)
        meta = {"run": str(Path(run).resolve()), "store": str(store.path.resolve()), "size": len(ids), "dim": dim,
                "sha256": checksums(tmp, ["index.faiss", "ids.json"])}
        write_json(tmp / "index.json", meta, indent=1)
        _check_index_out(out_dir, overwrite)  # still true after the build (another process may have written it)
    return meta


def search(index_dir: str, query: str | list[str], k: int = 10, model=None, device: str = "auto") -> list[dict]:
    """Best k images for a text query: [{rank, score, id, path}]."""
    from sail.train.model import SAILModel

    d = Path(index_dir)
    if not (d / "index.faiss").exists():
        raise SailError(f"{index_dir} is not a sail index; build one with `sail index RUN --images STORE --out DIR`")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise SailError(f"-k must be a positive number of results, not {k!r}")
    if isinstance(query, str):
        query = [query]
    if not query or not all(q.strip() for q in query):
        raise SailError("the search query is empty; give some text, e.g. \"a dog on a beach\"")
    meta, items, index = open_index(d)
    model = model or SAILModel.from_pretrained(meta["run"], device=device)
    q = model.encode_text(query).float().cpu().numpy()
    scores, idx = index.search(q, min(k, index.ntotal))
    return [{"rank": r + 1, "score": float(s), **items[i]} for r, (s, i) in enumerate(zip(scores[0], idx[0])) if i >= 0]


def open_index(d: Path):
    """(index.json, ids.json, faiss index) of an index folder, each checked: checksums (indexes built since
    they were recorded), types, and one id per indexed vector. A damaged index is one DamagedArtifact line."""
    import faiss

    todo = f"build it again with `sail index RUN --images STORE --out {d} --overwrite`"
    meta = read_json(d / "index.json", what="index record", required=("run", "size"), todo=todo)
    if isinstance(meta.get("sha256"), dict):
        bad = verify_checksums(d, meta["sha256"])
        if bad:
            raise DamagedArtifact(f"{d}: index is damaged ({', '.join(bad)} no longer match their checksums); {todo}")
    items = read_json(d / "ids.json", what="index ids", expect=list, todo=todo)
    try:
        index = faiss.read_index(str(d / "index.faiss"))
    except RuntimeError:
        raise DamagedArtifact(f"{d / 'index.faiss'}: faiss index is damaged (faiss cannot read it); {todo}") from None
    if len(items) != index.ntotal or not all(isinstance(i, dict) and "id" in i for i in items):
        raise DamagedArtifact(f"{d / 'ids.json'}: index ids are damaged ({len(items)} entries for "
                              f"{index.ntotal} vectors); {todo}")
    return meta, items, index
