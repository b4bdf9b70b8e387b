"""`sail extract`: run a frozen encoder once over a dataset and cache its embeddings in a feature store.

    sail extract --model dinov2-l --data cc3m.parquet            # -> features/cc3m/dinov2-l.h5
    sail extract --model gte-l --data cc3m.parquet --columns caption,long_caption

Crash safety and resume: the dataset is cut into fixed chunks of rows. Each finished chunk is written
to `<store>.parts/part-NNNNNN.npz` (temp file + atomic rename), so a kill -9 at any moment loses at
most the chunk in flight. Running the same command again skips the finished chunks; batches never
cross chunk boundaries, so every value equals an uninterrupted run's. When all chunks exist they are
merged into the store (itself written to a temp name and renamed), and the parts are removed.

Under torchrun, rank r extracts chunks r, r+W, r+2W, ...; after one barrier (every part written) rank 0
merges and the other ranks exit at once, so nobody waits on a collective while a ~100 GB store is merged.
The barrier waits for the slowest rank's extraction, so the process group gets `--dist-timeout` (default
12 h) instead of NCCL's 10 minutes.

GPU settings: the encoder is loaded in the precision policy's dtype (bf16 on Ampere+, `--precision`), runs
under torch.inference_mode, and gets uint8 crops from the workers (`--preprocess fast`: JPEG draft decode,
PIL resize + crop of just the crop box; normalised on the device) or the model's own processor
(`--preprocess hf`, the reference). With `--decode gpu` (auto: on CUDA where nvImageCodec is installed and its
self-check passes) the workers only read bytes and JPEGs are decoded, resized and cropped on the GPU
(sail.data.gpu_decode); other formats are still decoded in the workers, and the run says how many. Workers
default to the cores available per process; the batch to a size chosen from the model's parameter count.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

import sail
from sail.core.artifacts import Lock, read_json, write_atomic, write_json
from sail.core.distributed import barrier, init_distributed, local_device
from sail.data import DEFAULT_MAX_PIXELS, Dataset, ImageError, load_image, open_dataset
from sail.data.images import PREPROCESS_FAILED, preprocess_failure
from sail.encoders import zoo
from sail.encoders import (canonical_model_id, default_batch_size, load_encoder, model_identity, model_revision,
                           num_params, pick_device, resolve_model)
from sail.core.errors import SailError
from sail.core.precision import resolve_precision
from sail.data.store import StoreWriter


@dataclass
class ExtractConfig:
    model: str
    data: str
    columns: list[str] | None = None
    out: str | None = None
    pooling: str = "concat"
    patch_tokens: bool = False
    max_length: int | None = None
    modality: str | None = None
    batch_size: int | None = None       # None: chosen from the model's size (default_batch_size)
    chunk_size: int = 2048
    workers: int | None = None          # None: the cores this process may use, minus one
    device: str = "auto"
    features_root: str = "features"
    id_column: str = "id"
    image_column: str = "image"
    split: str = "test"                # CLIP_benchmark webdataset split
    allow_truncated: bool = False      # keep the complete samples of truncated shards (recorded as skipped)
    max_pixels: int | None = DEFAULT_MAX_PIXELS  # larger images are skipped as "too large" (0/None: no limit)
    encoding: str = "utf-8"            # text encoding of CSV/TSV/JSONL manifests
    trust_remote_code: bool | None = None
    progress: bool = True
    precision: str = "auto"             # sail.core.precision: weights loaded in this dtype (auto: bf16 on Ampere+)
    preprocess: str = "fast"            # fast (PIL + torch, checked against the processor) | hf (the processor)
    decode: str = "auto"                # JPEG decoding: cpu (workers, PIL) | gpu (nvImageCodec) | auto (gpu where it works)
    dist_timeout: float = 720.0         # minutes a rank may wait at the barrier under torchrun
    overwrite: bool = False             # replace an existing store at --out (only once the new one is complete)

    def validate(self) -> None:
        """Bad numbers are one clear error before anything is loaded or created."""
        for flag, value, low in (("--batch-size", self.batch_size, 1), ("--chunk-size", self.chunk_size, 1),
                                 ("--workers", self.workers, 0), ("--max-length", self.max_length, 1)):
            if value is not None and value < low:
                raise SailError(f"{flag} must be >= {low}, not {value}")
        if not self.dist_timeout > 0:
            raise SailError(f"--dist-timeout must be a positive number of minutes, not {self.dist_timeout}")
        if self.preprocess not in ("fast", "hf"):
            raise SailError(f"--preprocess must be fast or hf, not {self.preprocess!r}")
        if self.decode not in ("auto", "cpu", "gpu"):
            raise SailError(f"--decode must be auto, cpu or gpu, not {self.decode!r}")


class ExtractInterrupted(KeyboardInterrupt):
    """Ctrl-C during an extraction: the store it was making and how many of its chunks are kept."""

    def __init__(self, out: Path, kept: int, total: int):
        super().__init__(f"interrupted with {kept} of {total} chunks of {out} written")
        self.out, self.kept, self.total = out, kept, total


@dataclass
class ExtractResult:
    path: Path
    total: int
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count
    seconds: float = 0.0
    already_complete: bool = False

    def summary(self) -> str:
        if self.already_complete:
            return f"{self.path} is already complete ({self.total} samples); nothing to do"
        rate = self.total / self.seconds if self.seconds > 0 else float("nan")
        lines = [f"wrote {self.path}: {self.total} samples in {self.seconds:.1f} s ({rate:.1f}/s)"]
        if self.skipped:
            lines.append(f"skipped {sum(self.skipped.values())}: " +
                         "; ".join(f"{r} x{n}" for r, n in sorted(self.skipped.items())))
        else:
            lines.append("skipped 0")
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------- image loading


class _ImageItems(torch.utils.data.Dataset):
    """Decodes and preprocesses images in DataLoader workers; failures come back as reasons."""

    def __init__(self, refs: list, preprocess, max_pixels: int | None = DEFAULT_MAX_PIXELS, draft: int | None = None):
        self.refs, self.preprocess, self.max_pixels, self.draft = refs, preprocess, max_pixels, draft

    def __len__(self):
        return len(self.refs)

    def __getitem__(self, i):
        try:
            return i, self.preprocess(load_image(self.refs[i], self.max_pixels, self.draft)), ""
        except ImageError as e:
            return i, None, str(e)
        except Exception as e:  # a preprocessor failing on an odd image is a bad image, not a crash
            return i, None, preprocess_failure(e)


def _collate(items):
    rows = [i for i, _, _ in items]
    ok = [x is not None for _, x, _ in items]
    good = [x for _, x, _ in items if x is not None]
    if len({tuple(x.shape) for x in good}) > 1:  # preprocessing gave varying sizes: the main process says so
        pixels = good
    else:
        pixels = torch.stack(good) if good else None
    return rows, ok, pixels, [r for _, _, r in items]


def _check_pixels(pixels, rows, ok, ds: Dataset, encoder) -> None:
    """One size per batch: a list (from _collate) means the preprocessing returned varying sizes."""
    if not isinstance(pixels, list):
        return
    keys = [r for r, k in zip(rows, ok) if k]
    first = tuple(pixels[0].shape)
    j = next(i for i, x in enumerate(pixels) if tuple(x.shape) != first)
    raise SailError(f"encoder {encoder.spec.source}: preprocessing returned {first} for sample {ds.ids[keys[0]]!r} but "
                    f"{tuple(pixels[j].shape)} for sample {ds.ids[keys[j]]!r}; it must return one size for every "
                    "image (resize and crop to a fixed size)")


# Reasons a row's features are not stored (counted in the store's skipped list and the summary).
NON_FINITE = "encoder returned NaN or inf"
OVERFLOW = "float16 overflow (a value beyond 65504)"


def _screen(pooled: torch.Tensor) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Features as they enter the store: float16 rows, which rows are finite, and why the others are not.
    Checked after the cast, because a finite float32 value beyond 65504 becomes inf in the store."""
    pooled = pooled.float()
    finite32 = torch.isfinite(pooled).all(1)
    half = pooled.to(torch.float16)
    finite16 = torch.isfinite(half).all(1)
    half[~finite16] = 0
    ok = finite16.cpu().numpy()
    reasons = ["" if k else OVERFLOW if f else NON_FINITE for k, f in zip(ok, finite32.cpu().numpy())]
    return half.cpu().numpy(), ok, reasons


def _check_preprocessed_some(spec_source: str, reasons: list[str], n_encoded: int, seen: dict, where: str) -> None:
    """A preprocess that fails on every image is a broken plugin, not a chunk of bad images."""
    if n_encoded or seen["finite"] or not all(r.startswith(PREPROCESS_FAILED) for r in reasons):
        return
    raise SailError(f"encoder {spec_source}: preprocessing failed on every image ({where}), e.g. "
                    f"{reasons[0][len(PREPROCESS_FAILED):].lstrip(': ')}; fix the preprocess function")


def _check_some_finite(spec_source: str, n_encoded: int, n_finite: int, seen: dict, where: str) -> None:
    """All-non-finite is a broken encoder, not bad samples: refuse before writing anything of it."""
    if n_finite:
        seen["finite"] = True
    elif n_encoded and not seen["finite"]:
        raise SailError(f"encoder {spec_source} returned NaN or inf features for every one of the {n_encoded} "
                        f"samples it encoded ({where}); check the model's weights, precision (--precision fp32) "
                        "and preprocessing")


def _chunk_batches(chunks: list[int], chunk_size: int, n: int, batch_size: int) -> list[list[int]]:
    """Row batches that never cross a chunk boundary (so resumed runs batch identically)."""
    batches = []
    for c in chunks:
        rows = list(range(c * chunk_size, min(n, (c + 1) * chunk_size)))
        batches += [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]
    return batches


# ----------------------------------------------------------------------------------------- parts


def _part_path(parts: Path, chunk: int) -> Path:
    return parts / f"part-{chunk:06d}.npz"


def _save_part(path: Path, arrays: dict[str, np.ndarray]) -> None:
    import io

    buf = io.BytesIO()  # one part is a few MB: built in memory, then written atomically
    np.savez(buf, **arrays)
    write_atomic(path, buf.getvalue())


# Everything that determines a store's numbers; two extractions agreeing on all of it are the same one.
# (Preprocessing comes with the model's files, so the revision covers it.)
STORE_IDENTITY = ("model_id", "modality", "pooling", "source", "source_hash", "fields", "patch_tokens", "max_length", "n",
                  "weights_dtype", "preprocess")


def _identity(cfg: ExtractConfig, spec, ds: Dataset, fields: list[str], weights_dtype: str) -> dict:
    """What makes two runs the same extraction; a mismatch with an existing store is an error."""
    image = spec.modality == "image"
    return {"model_id": model_identity(spec), "modality": spec.modality,
            "pooling": cfg.pooling if image and not zoo.is_spec(spec.source) else "model",
            "source": ds.source, "source_hash": ds.source_hash, "fields": fields,
            "patch_tokens": bool(cfg.patch_tokens) and image, "max_length": None if image else cfg.max_length,
            "chunk_size": cfg.chunk_size, "n": len(ds), "weights_dtype": weights_dtype,
            "preprocess": cfg.preprocess if image else None}


def _stored_identity(s, ours: dict) -> dict:
    """A store's identity: the "identity" attribute, or what a 0.1 store's attributes still tell."""
    a = s.attrs
    if "identity" in a:
        return json.loads(a["identity"])
    fields = json.loads(a.get("fields", "[]"))
    max_length = a.get("max_length")
    return {"model_id": a.get("model_id"), "modality": a.get("modality"), "source": ours["source"],
            "pooling": a.get("pooling") if a.get("modality") == "image" else "model",
            "source_hash": a.get("source_hash"), "fields": fields, "n": len(s),
            "patch_tokens": any(s.has_patch_tokens(f) for f in fields),
            # 0.1 stored the effective limit only: it can contradict an explicit --max-length, nothing else
            "max_length": None if ours["max_length"] is None or max_length in (None, -1) else int(max_length),
            "weights_dtype": ours["weights_dtype"], "preprocess": ours["preprocess"]}  # not recorded before


def _check_existing(out: Path, ident: dict, revision: str, overwrite: bool = False) -> bool:
    """True if `out` is already this extraction, complete. Raises if it is something else (unless overwrite)."""
    if out.is_dir():
        raise SailError(f"--out {out} is a directory; give a file path such as {out / 'features.h5'}")
    if not out.exists() or overwrite:
        return False
    from sail.data.store import FeatureStore

    try:
        s = FeatureStore(out)
    except SailError as e:
        raise SailError(f"{out} exists but is not a usable feature store ({e}); pass --overwrite to replace it, "
                        "or choose another --out") from None
    with s:
        try:
            stored = _stored_identity(s, ident)
        except (ValueError, TypeError):  # an identity attribute that is not JSON
            raise SailError(f"{out} exists but its identity attribute is damaged; pass --overwrite to replace it, "
                            "or choose another --out") from None
        their_revision = str(s.attrs.get("model_revision", "hub:unknown"))
    if stored.get("model_id") != ident["model_id"]:  # a 0.2 store named its encoder by path: compare identities
        stored["model_id"] = canonical_model_id(stored.get("model_id"), ident["modality"])
    diff = [f"{k}: {stored.get(k)!r} there, {ident[k]!r} here" for k in STORE_IDENTITY
            if k != "source" and stored.get(k) != ident[k]]
    if "hub:unknown" not in (revision, their_revision) and revision != their_revision:
        diff.append(f"model_revision: {their_revision!r} there, {revision!r} here")
    if diff:
        raise SailError(f"{out} already exists from a different extraction ({'; '.join(diff)}); "
                        "pass --overwrite to replace it, or choose another --out (or --features-root)")
    return True


def _open_parts(parts: Path, ident: dict, rank: int, overwrite: bool = False) -> bool:
    """Create (rank 0) or reopen the parts folder; True if this call created it."""
    meta = parts / "meta.json"
    if meta.exists():
        theirs = _parts_record(parts, overwrite)
        if theirs != ident and overwrite and rank == 0:  # --overwrite: an unfinished other extraction goes too
            shutil.rmtree(parts)
            return _open_parts(parts, ident, rank)
        if theirs != ident:
            diff = ", ".join(k for k in ident if theirs.get(k) != ident[k])
            if diff == "decode":
                raise SailError(f"{parts} holds an unfinished extraction whose JPEGs were decoded on the "
                                f"{theirs['decode'].upper()}; rerun with --decode {theirs['decode']} (or auto) to finish it, "
                                "or pass --overwrite to start over")
            raise SailError(f"{parts} holds an unfinished extraction with different settings ({diff}); "
                            "rerun that command to finish it, pass --overwrite, or delete the folder")
        return False
    if rank == 0:
        parts.mkdir(parents=True, exist_ok=True)
        write_json(meta, ident, indent=1)
        return True
    return False


# ----------------------------------------------------------------------------------------- the run


def _parts_record(parts: Path, overwrite: bool = False) -> dict:
    """The identity an unfinished extraction was started with ({} if none, or damaged and overwrite)."""
    meta = parts / "meta.json"
    if not meta.exists():
        return {}
    try:
        theirs = read_json(meta, what="unfinished extraction record",
                           todo="pass --overwrite to start the extraction over, or delete the folder")
    except SailError:
        if not overwrite:
            raise
        return {}  # damaged: --overwrite starts over
    if theirs.get("modality") == "image":
        theirs.setdefault("decode", "cpu")  # started before --decode existed: decoded on the CPU
    return theirs


_SAID_DECODE: set = set()  # why JPEGs stay on the CPU, said once per process


def _decoding(cfg: ExtractConfig, encoder, device, parts: Path, rank: int, ident: dict):
    """(the GpuDecoder or None, the identity with the decoding an image store is made with)."""
    if ident["modality"] != "image":
        return None, ident
    decoder = _gpu_decoder(cfg, encoder, device, parts, rank)
    return decoder, {**ident, "decode": "gpu" if decoder is not None else "cpu"}


def _gpu_decoder(cfg: ExtractConfig, encoder, device, parts: Path, rank: int):
    """For an image encoder: the GpuDecoder `--decode` asks for (auto: where it works), or None for the CPU path. An unfinished
    extraction continues with the decoding it started with under auto; --decode gpu that cannot run is an
    error; auto on CUDA says once why it stays on the CPU."""
    from sail.data import gpu_decode

    if cfg.decode == "cpu":
        return None
    started = None if cfg.overwrite else _parts_record(parts).get("decode")
    if cfg.decode == "auto" and started == "cpu":
        return None
    fast = getattr(encoder, "fast", None)
    decoder, why = gpu_decode.open_decoder(fast, device)
    if decoder is not None:
        return decoder
    if cfg.decode == "gpu":
        raise SailError(f"--decode gpu cannot run here: {why}; use --decode cpu")
    if started == "gpu":
        raise SailError(f"{parts} holds an unfinished extraction decoded on the GPU, which cannot run here ({why}); "
                        "rerun the command where it can, or pass --overwrite to start over with CPU decoding")
    if device.type == "cuda" and fast is not None and why not in _SAID_DECODE and rank == 0:
        _SAID_DECODE.add(why)
        print(f"note: JPEGs are decoded on the CPU: {why}", file=sys.stderr)
    return None


def _fields(cfg: ExtractConfig, modality: str, ds: Dataset) -> list[str]:
    """The store's fields: ["image"] for an image model, the caption columns for a text model."""
    if len(ds) == 0:
        raise SailError(f"{cfg.data} holds no samples")
    if modality == "image":
        if all(r is None for r in ds.images):
            raise SailError(f"{cfg.data} has no images (no column {cfg.image_column!r}?), but {cfg.model} is an "
                            "image model; name the image-path column with --image-column")
        return ["image"]
    if not ds.captions:
        raise SailError(f"{cfg.data} has no caption columns, but {cfg.model} is a text model; name them with --columns")
    return list(ds.captions)


def extract(cfg: ExtractConfig, dataset: Dataset | None = None) -> ExtractResult:
    """Extract (or finish extracting) one store; returns where it is and what was skipped.

    `dataset` replaces `cfg.data` for callers that build one in code (the eval tasks do). Under torchrun
    only rank 0's result has the skipped counts; the other ranks return once their parts are written.
    """
    cfg.validate()
    start = time.time()
    rank, world = init_distributed(timeout=datetime.timedelta(minutes=cfg.dist_timeout))
    spec = resolve_model(cfg.model, cfg.modality, cfg.trust_remote_code)
    ds = dataset if dataset is not None else open_dataset(cfg.data, cfg.columns, cfg.id_column, cfg.image_column,
                                                              split=cfg.split, allow_truncated=cfg.allow_truncated,
                                                              encoding=cfg.encoding)
    fields = _fields(cfg, spec.modality, ds)
    out = Path(cfg.out) if cfg.out else Path(cfg.features_root) / ds.name / f"{spec.name}.h5"
    device = local_device(pick_device(cfg.device), rank, world)
    precision = resolve_precision(cfg.precision, device)
    ident = _identity(cfg, spec, ds, fields, precision.name)
    parts = out.with_name(out.name + ".parts")
    if _check_existing(out, ident, model_revision(spec.source), cfg.overwrite):
        if rank == 0 and parts.exists():
            shutil.rmtree(parts, ignore_errors=True)  # left over from a run killed after its final rename
        return ExtractResult(out, len(ds), already_complete=True)
    # Everything that can fail on a user's input is checked before the first file is created.
    encoder = load_encoder(spec, device, cfg.pooling, cfg.max_length, precision.dtype, cfg.preprocess)
    decoder, ident = _decoding(cfg, encoder, device, parts, rank, ident)
    cfg = replace(cfg, batch_size=cfg.batch_size or default_batch_size(num_params(encoder.model), device))
    if rank == 0:
        out.parent.mkdir(parents=True, exist_ok=True)
    # one extraction per store: a second one (another terminal) stops here naming this one's pid; rank 0 locks
    with Lock(out.parent, what="extraction of " + out.name, name=f".{out.name}.lock") if rank == 0 else nullcontext():
        barrier(world)
        created = _open_parts(parts, ident, rank, cfg.overwrite)
        barrier(world)

        n_chunks = -(-len(ds) // cfg.chunk_size)
        todo = [c for c in range(n_chunks) if c % world == rank and not _part_path(parts, c).exists()]
        todo_rows = sum(min(len(ds), (c + 1) * cfg.chunk_size) - c * cfg.chunk_size for c in todo)
        try:
            _check_room(out, _store_bytes(ds, fields, encoder, cfg.patch_tokens), todo_rows / len(ds))
            if todo:
                if spec.modality == "image":
                    _extract_images(cfg, ds, encoder, todo, parts, rank, world, decoder)
                else:
                    _extract_texts(cfg, ds, encoder, fields, todo, parts, rank)
        except BaseException as e:
            if created and not any(parts.glob("part-*.npz")):  # nothing to resume from: leave nothing behind
                shutil.rmtree(parts, ignore_errors=True)
            if isinstance(e, KeyboardInterrupt):
                kept = len(list(parts.glob("part-*.npz"))) if parts.exists() else 0
                raise ExtractInterrupted(out, kept, n_chunks) from None
            raise
        # The one collective wait: every rank's parts are written. It can last as long as the slowest rank's
        # extraction, hence the long --dist-timeout. After it only rank 0 works (the merge, minutes to hours
        # for a ~100 GB store) and the other ranks exit now instead of idling in a second barrier.
        barrier(world)
        if rank != 0:
            return ExtractResult(out, len(ds), {}, time.time() - start)
        skipped = _merge(out, parts, ds, fields, n_chunks, cfg, spec, encoder)
        return ExtractResult(out, len(ds), skipped, time.time() - start)


def _progress(total: int, unit: str, cfg: ExtractConfig, rank: int):
    return tqdm(total=total, unit=unit, disable=not cfg.progress or rank != 0, dynamic_ncols=True,
                desc="extract", smoothing=0.1)


def default_workers(world: int = 1) -> int:
    """Decoding workers per process: the cores this process may use, shared among the ranks on the node."""
    try:
        cores = len(os.sched_getaffinity(0))  # respects taskset / cgroup cpusets, unlike os.cpu_count()
    except AttributeError:
        cores = os.cpu_count() or 2
    per_rank = cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", world)))
    return max(1, per_rank - 1)  # one core for the main process (collate, pinning, the GPU launches)


def _extract_images(cfg, ds: Dataset, encoder, todo: list[int], parts: Path, rank: int, world: int = 1,
                    decoder=None) -> None:
    workers = cfg.workers if cfg.workers is not None else default_workers(world)
    batches = _chunk_batches(todo, cfg.chunk_size, len(ds), cfg.batch_size)
    if decoder is None:  # workers decode (PIL) and preprocess
        items = _ImageItems(ds.images, encoder.preprocess, cfg.max_pixels,
                            getattr(encoder, "draft_short_side", lambda: None)())
        collate, pin = _collate, encoder.device.type == "cuda"
    else:  # workers read bytes; JPEGs are decoded on the GPU (sail.data.gpu_decode)
        from sail.data import gpu_decode

        items, collate, pin = gpu_decode.ImageBytes(ds.images, encoder.fast, cfg.max_pixels), gpu_decode.collate, False
    loader = torch.utils.data.DataLoader(
        items, batch_sampler=batches, collate_fn=collate, num_workers=workers, pin_memory=pin,
        prefetch_factor=4 if workers else None, persistent_workers=False, timeout=WORKER_TIMEOUT if workers else 0)
    pending: dict[int, dict] = {}  # chunk -> rows filled so far
    seen = {"finite": len(todo) < -(-len(ds) // cfg.chunk_size)}  # a resumed run already has finite parts
    with _progress(sum(len(b) for b in batches), "img", cfg, rank) as bar, _worker_deaths(workers):
        for rows, ok, pixels, reasons in (loader if decoder is None else decoder.batches(loader)):
            _check_pixels(pixels, rows, ok, ds, encoder)
            _image_batch(cfg, ds, encoder, pending, seen, parts, rows, ok, pixels, reasons)
            bar.update(len(rows))
    if decoder is not None and rank == 0 and (decoder.cpu_decoded or decoder.cpu_fallbacks):
        print(f"note: {decoder.cpu_decoded + decoder.cpu_fallbacks} of {sum(len(b) for b in batches)} images were "
              f"decoded on the CPU ({decoder.cpu_decoded} not RGB or greyscale JPEGs, {decoder.cpu_fallbacks} JPEGs "
              "no GPU decoder took)", file=sys.stderr)


def _image_batch(cfg, ds: Dataset, encoder, pending: dict, seen: dict, parts: Path, rows, ok, pixels, reasons) -> None:
    """A batch's features into its chunk's buffer; a complete chunk is written as a part."""
    chunk = rows[0] // cfg.chunk_size
    lo = chunk * cfg.chunk_size
    size = min(len(ds), lo + cfg.chunk_size) - lo
    buf = pending.setdefault(chunk, {"feat": np.zeros((size, encoder.dim), np.float16),
                                     "valid": np.zeros(size, bool), "reason": [""] * size,
                                     "done": 0, "patch": None, "encoded": 0, "finite": 0})
    if pixels is not None:
        pooled, patches = encoder.encode_pixels(pixels, cfg.patch_tokens)
        sel = np.array([r - lo for r, k in zip(rows, ok) if k])
        feat, finite, why_not = _screen(pooled)  # cast on the device: half the copy
        buf["feat"][sel], buf["valid"][sel] = feat, finite
        buf["encoded"], buf["finite"] = buf["encoded"] + len(sel), buf["finite"] + int(finite.sum())
        for r, why in zip(sel, why_not):
            if why:
                buf["reason"][r] = why
        if patches is not None:
            if buf["patch"] is None:
                buf["patch"] = np.zeros((size,) + tuple(patches.shape[1:]), np.float16)
            buf["patch"][sel] = patches.to(torch.float16).cpu().numpy()
    for r, k, why in zip(rows, ok, reasons):
        if not k:
            buf["reason"][r - lo] = why
    buf["done"] += len(rows)
    if buf["done"] == size:
        where = f"samples {ds.ids[lo]!r} to {ds.ids[lo + size - 1]!r}"
        _check_preprocessed_some(encoder.spec.source, buf["reason"], buf["encoded"], seen, where)
        _check_some_finite(encoder.spec.source, buf["encoded"], buf["finite"], seen, where)
        arrays = {"feat/image": buf["feat"], "valid/image": buf["valid"], "reason/image": np.array(buf["reason"])}
        if cfg.patch_tokens:
            if buf["patch"] is None:  # every image of the chunk failed: keep the shape known
                n_patch = _num_patches(encoder)
                buf["patch"] = np.zeros((size, n_patch, encoder.hidden), np.float16)
            arrays["patch/image"] = buf["patch"]
        _save_part(_part_path(parts, chunk), arrays)
        del pending[chunk]


WORKER_TIMEOUT = 1800  # seconds without a batch from the workers: a stuck worker, not a slow one

@contextlib.contextmanager
def _worker_deaths(workers: int):
    """A decoding worker killed (out of memory, a crashing decoder) is one line, not a traceback or a hang:
    the DataLoader notices the dead worker and raises; the chunks written so far are kept."""
    try:
        yield
    except RuntimeError as e:
        if not workers or not ("DataLoader worker" in str(e) or "DataLoader timed out" in str(e)):
            raise
        raise SailError(f"an image decoding worker died ({str(e).splitlines()[0][:160]}); often out of memory: "
                        "rerun the same command with fewer --workers (finished chunks are kept)") from None


def _num_patches(encoder) -> int:
    crop = encoder.processor.crop_size if getattr(encoder.processor, "do_center_crop", False) else encoder.processor.size
    h = crop.get("height") or crop.get("shortest_edge")
    return (h // encoder.model.config.patch_size) ** 2


def _extract_texts(cfg, ds: Dataset, encoder, fields: list[str], todo: list[int], parts: Path, rank: int) -> None:
    total = sum(min(len(ds), (c + 1) * cfg.chunk_size) - c * cfg.chunk_size for c in todo) * len(fields)
    seen = {"finite": len(todo) < -(-len(ds) // cfg.chunk_size)}  # a resumed run already has finite parts
    with _progress(total, "text", cfg, rank) as bar:
        for chunk in todo:
            lo, hi = chunk * cfg.chunk_size, min(len(ds), (chunk + 1) * cfg.chunk_size)
            arrays = {}
            for f in fields:
                texts = ds.captions[f][lo:hi]
                valid = np.array([bool(t.strip()) for t in texts])
                feat = np.zeros((hi - lo, encoder.dim), np.float16)
                reason = np.array(["" if v else "empty caption" for v in valid], dtype=object)
                if valid.any():
                    encoded = encoder.encode_texts([t for t, v in zip(texts, valid) if v], cfg.batch_size)
                    half, finite, why_not = _screen(torch.from_numpy(np.asarray(encoded)))
                    _check_some_finite(encoder.spec.source, len(half), int(finite.sum()), seen,
                                       f"field {f}, samples {ds.ids[lo]!r} to {ds.ids[hi - 1]!r}")
                    feat[valid], reason[valid] = half, why_not
                    valid[valid] = finite
                arrays[f"feat/{f}"] = feat
                arrays[f"valid/{f}"] = valid
                arrays[f"reason/{f}"] = reason.astype(str)
                bar.update(hi - lo)
            _save_part(_part_path(parts, chunk), arrays)


def _store_bytes(ds: Dataset, fields: list[str], encoder, patch_tokens: bool) -> int:
    """About what the store will take: float16 features, validity, ids (and patch tokens), plus HDF5's overhead."""
    n = len(ds)
    per_row = len(fields) * (2 * encoder.dim + 1) + 64  # 64: an id and a skipped entry, heap entries included
    if patch_tokens and encoder.modality == "image":
        try:
            per_row += 2 * _num_patches(encoder) * encoder.hidden
        except (AttributeError, TypeError):
            pass
    return int(n * per_row * 1.02) + 32 * 1024


def _check_room(out: Path, store_bytes: int, parts_share: float) -> None:
    """Refuse up front what the disk or the file-size limit cannot hold: HDF5 failing mid-write leaves
    errors it cannot recover from (and can crash the process), so the store is never started without room.
    Needed: the store, plus the parts still to write (`parts_share` of the store's size)."""
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    if soft != resource.RLIM_INFINITY and store_bytes > soft:
        raise SailError(f"{out} will need about {_mb(store_bytes)} but this process may not write files over "
                        f"{_mb(soft)} (ulimit -f); raise the limit and rerun the same command (finished chunks are kept)")
    need = store_bytes + int(parts_share * store_bytes)
    free = shutil.disk_usage(out.parent if out.parent.exists() else Path.cwd()).free
    if need > free:
        raise SailError(f"{out} needs about {_mb(need)} free but {out.parent} has {_mb(free)}; free space (or "
                        "choose another --out) and rerun the same command (finished chunks are kept)")


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 1024:.0f} KiB"


def _merge(out: Path, parts: Path, ds: Dataset, fields: list[str], n_chunks: int, cfg, spec, encoder) -> dict:
    missing = [c for c in range(n_chunks) if not _part_path(parts, c).exists()]
    if missing:
        raise SailError(f"{len(missing)} chunk(s) of {out} are missing (first: {missing[0]}); rerun the same command")
    patch_shapes = None
    if cfg.patch_tokens and spec.modality == "image":
        with np.load(_part_path(parts, 0)) as z:
            patch_shapes = {"image": tuple(z["patch/image"].shape[1:])}
    _check_room(out, _store_bytes(ds, fields, encoder, cfg.patch_tokens), 0.0)  # the disk may have filled since
    writer = StoreWriter(out, ds.ids, {f: encoder.dim for f in fields}, patch_shapes)
    skipped: list[tuple[str, str, str]] = list(ds.skipped)  # what reading the source lost (truncated shards)
    try:
        for c in range(n_chunks):
            lo = c * cfg.chunk_size
            with np.load(_part_path(parts, c)) as z:
                feats = {f: z[f"feat/{f}"] for f in fields}
                valid = {f: z[f"valid/{f}"] for f in fields}
                patches = {"image": z["patch/image"]} if patch_shapes else None
                for f in fields:
                    for k in np.flatnonzero(~valid[f]):
                        skipped.append((ds.ids[lo + k], f, str(z[f"reason/{f}"][k])))
            writer.write(lo, feats, valid, patches)
        attrs = {
            "model_id": model_identity(spec), "model_name": spec.name, "model_revision": model_revision(spec.source),
            **({"model_path": spec.source} if Path(spec.source).is_dir() else {}),  # a hint; model_id is the identity
            "modality": spec.modality, "pooling": encoder.pooling,  # ImageEncoder.pooling is cfg.pooling
            "dim": encoder.dim, "dtype": "float16", "preprocessing": json.dumps(encoder.preprocessing, default=str),
            "max_length": getattr(encoder, "max_length", None) or -1, "source": ds.source,
            "source_hash": ds.source_hash, "dataset": ds.name, "encoding": ds.encoding, "sail_version": sail.__version__,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "trust_remote_code": bool(spec.trust_remote_code),
            "identity": (parts / "meta.json").read_text(),  # the identity the parts were made under
        }
        writer.finish(attrs, ds.labels, ds.class_names, skipped)
    except OSError as e:  # the disk filled (or a file-size limit) after the room check: the parts stay
        writer.abort()
        raise SailError(f"cannot write {out} ({e.strerror or str(e).splitlines()[0]}); free space (or raise the "
                        f"file-size limit) and rerun the same command: the extracted chunks in {parts} are kept") from None
    except BaseException:
        writer.abort()
        raise
    shutil.rmtree(parts, ignore_errors=True)
    counts: dict[str, int] = {}
    for _, _, reason in skipped:
        key = reason.split(":")[0]
        counts[key] = counts.get(key, 0) + 1
    return counts

