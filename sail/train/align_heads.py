"""`sail align`: train image and text alignment heads on cached features, at 32k+ batch on one GPU.

    sail align --image features/cc3m/dinov2-l.h5 --text features/cc3m/gte-l.h5 \\
               --captions caption,long_caption --loss multi-positive --head glu --batch 36864 --out runs/cc3m

Writes to the run directory: `train_config.json` (the resolved settings), `metrics.jsonl` (one line per
logged step), `checkpoint-*/` + `LATEST` (resume with `--resume` after any crash), and at the end
`config.json` + `model.safetensors` (load with `sail.AlignmentHeads.from_pretrained(run_dir)`),
`curves.png` and `summary.json`.

Defaults follow the SAIL paper: Lion (lr 1e-5, wd 1e-7, betas 0.9/0.99), cosine schedule with warmup,
t = 20, b = -10, loss averaged over all B^2 pairs. Under torchrun each rank takes its slice of every
global batch and the loss gathers every rank's embeddings as negatives; sail.train.step averages the gradients.

Each step is sail.train.step.train_step: the heads run in chunks (--chunk-size, automatic from free memory), so
memory is O(B*D) whatever the head; precision follows sail.core.precision (--precision, bf16 on Ampere+ GPUs).
The step never waits for the device: statistics are read every --log-every steps, where a NaN/Inf loss
stops the run (so up to --log-every steps may run after it) naming the last good checkpoint; checkpoints
are only written after that check (and one of the weights).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from sail.core.artifacts import read_json, write_json
from sail.core.distributed import setup
from sail.core.errors import SailError
from sail.core.precision import Precision, resolve_precision
from sail.data.loader import MemoryBatches, PairedFeatures, StreamingBatches
from sail.data.store import FeatureStore
from sail.data.subset import restrict, subset_sha256
from sail.train.checkpoint import check_resume
from sail.train.engine import GracefulStop, Interrupted, Loop, StopRequest, restore, train_loop
from sail.train.heads import AlignmentHeads
from sail.train.optim import build_optimizer, cosine_with_warmup
from sail.train.runlog import MetricsLog, plot_curves
from sail.train.stability import GradientBalance
from sail.train.step import auto_chunk_size, broadcast_parameters, free_memory, train_step

LOSSES = ("sigmoid", "multi-positive", "info-nce")
ENCODER_KEYS = ("model_id", "model_revision", "modality", "pooling", "dim", "preprocessing", "max_length")


@dataclass
class AlignConfig:
    image: str
    text: str
    out: str
    captions: list[str] | None = None      # default: the text store's first field (all for multi-positive)
    loss: str = "sigmoid"
    average: str = "pairs"                 # "pairs": / B^2 (SAIL); "rows": / B (SigLIP)
    head: str = "glu"
    width: int = 4
    out_dim: int = 1024
    activation: str = "relu6"
    batch: int = 36864
    epochs: int = 10
    steps: int | None = None               # overrides epochs
    optimizer: str = "lion"
    lr: float = 1e-5
    weight_decay: float = 1e-7
    betas: tuple[float, float] = (0.9, 0.99)
    warmup: float = 0.1                    # fraction of steps (or a step count if >= 1)
    init_scale: float = 20.0
    init_bias: float = -10.0
    val_fraction: float = 0.02
    val_image: str | None = None
    val_text: str | None = None
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"                # auto | fp32 | bf16 | fp16 (see sail.core.precision)
    in_memory: str = "auto"                # auto | yes | no (stream from the stores); a resumed run keeps its mode
    stream_block_rows: int = 65536         # streaming: rows per contiguous block read
    stream_buffer_blocks: int = 4          # streaming: blocks shuffled together (the shuffle window)
    checkpoint_every: int = 500
    eval_every: int = 500
    log_every: int = 50                    # steps between reads of the device-side statistics
    block_size: int | None = None          # loss block rows (None: automatic)
    chunk_size: int | None = None          # rows per head chunk (None: automatic from free memory)
    loss_impl: str = "auto"                # sigmoid losses: auto | torch | triton (fused GPU kernel)
    progress: bool = True
    subset: str | None = None              # ids file (`sail curate`): train on those pairs only

    def resolved(self) -> dict:
        d = dataclasses.asdict(self)
        d["betas"] = list(d["betas"])
        d["subset_sha256"] = subset_sha256(self.subset)  # the subset's identity: resume refuses a changed one
        return d

    def validate(self) -> None:
        """Refuse values that would train something else than asked, naming the flag."""
        def need(ok: bool, flag: str, value, what: str):
            if not ok:
                raise SailError(f"--{flag} {value} is invalid: {what}")

        if self.loss not in LOSSES:
            raise SailError(f"unknown loss {self.loss!r}; use one of {', '.join(LOSSES)}")
        need(self.batch >= 2, "batch", self.batch, "a batch needs at least 2 pairs (SAIL uses 32768+)")
        need(self.steps is None or self.steps >= 1, "steps", self.steps, "give at least 1 step, or leave it out to use --epochs")
        need(self.epochs >= 1, "epochs", self.epochs, "give at least 1 epoch")
        need(self.width >= 1, "width", self.width, "--width-factor (hidden width = factor x input dim) must be at least 1")
        need(self.out_dim >= 1, "out-dim", self.out_dim, "the embedding dimension must be at least 1")
        need(self.lr > 0, "lr", self.lr, "the learning rate must be positive")
        need(self.weight_decay >= 0, "weight-decay", self.weight_decay, "must be 0 or more")
        need(all(0 <= x < 1 for x in self.betas), "beta1/--beta2", list(self.betas), "betas must be in [0, 1)")
        need(self.warmup >= 0, "warmup", self.warmup, "a fraction in [0, 1) of the steps, or a step count >= 1")
        need(self.init_scale > 0, "init-scale", self.init_scale, "the temperature t must be positive")
        need(0 <= self.val_fraction < 1, "val-fraction", self.val_fraction, "must be in [0, 1)")
        need(self.in_memory in ("auto", "yes", "no"), "in-memory", self.in_memory, "use auto, yes or no")
        for flag in ("checkpoint_every", "eval_every", "log_every", "stream_block_rows", "stream_buffer_blocks"):
            v = getattr(self, flag)
            need(v >= 1, flag.replace("_", "-"), v, "must be at least 1")
        need(self.block_size is None or self.block_size >= 1, "block-size", self.block_size, "must be at least 1")
        need(self.chunk_size is None or self.chunk_size >= 1, "chunk-size", self.chunk_size, "must be at least 1")
        need(self.seed >= 0, "seed", self.seed, "must be 0 or more")


# Settings that may differ between a run and its resumption. The stores and the run directory are
# compared by identity (see _store_identity), not by spelling; in_memory is replaced by the recorded mode.
_RESUME_FREE = {"progress", "device", "precision", "loss_impl", "chunk_size", "block_size", "in_memory", "eval_every", "log_every", "checkpoint_every",
                "out", "image", "text", "val_image", "val_text", "subset"}
_STORE_FLAGS = ("image", "text", "val_image", "val_text")


@dataclass
class AlignResult:
    run_dir: Path
    steps: int
    metrics: dict = field(default_factory=dict)

    def summary(self) -> str:
        rows = [(k, f"{v:.4g}" if isinstance(v, float) else str(v)) for k, v in self.metrics.items()]
        w = max(len(k) for k, _ in rows) if rows else 0
        return "\n".join([f"run {self.run_dir} ({self.steps} steps)"] + [f"  {k:<{w}}  {v}" for k, v in rows])


# Ctrl-C: where the run stopped and the step a resume starts from (sail.train.engine's, under align's old names)
AlignInterrupted = Interrupted
_GracefulStop = GracefulStop
_StopRequest = StopRequest


# ------------------------------------------------------------------------------------------ helpers


def _encoder_info(store: FeatureStore) -> dict:
    return {k: store.attrs.get(k) for k in ENCODER_KEYS}


def _check_same_encoder(a: FeatureStore, b: FeatureStore) -> None:
    ia, ib = _encoder_info(a), _encoder_info(b)
    diff = [k for k in ENCODER_KEYS if ia[k] != ib[k]]
    if diff:
        raise SailError(f"{a.path} and {b.path} come from different encoders ({', '.join(diff)} differ); "
                        "extract both with the same --model and settings")


def _loss(cfg: AlignConfig, x: torch.Tensor, ys: list[torch.Tensor], scale, bias) -> torch.Tensor:
    """The run's loss of images x (B, D) against the caption sets ys (K x (B, D)); scale is the temperature t."""
    from sail.train import losses

    if cfg.loss == "sigmoid":
        return losses.sigmoid_loss(x, ys[0], scale, bias, average=cfg.average, block_size=cfg.block_size,
                                   impl=cfg.loss_impl)
    if cfg.loss == "multi-positive":
        return losses.multi_positive_loss(x, ys, scale, bias, average=cfg.average, block_size=cfg.block_size,
                                          impl=cfg.loss_impl)
    return losses.info_nce_loss(x, ys[0], scale, block_size=cfg.block_size)


def _check_loss_impl(cfg: AlignConfig, device: torch.device) -> None:
    """Fail before any data is read when --loss-impl cannot run (unknown, no triton, not CUDA)."""
    from sail.train import losses

    if cfg.loss == "info-nce" and cfg.loss_impl == "triton":
        raise SailError("--loss-impl triton is for the sigmoid and multi-positive losses; info-nce runs in torch")
    losses.check_impl(cfg.loss_impl, device)


@torch.no_grad()
def _validate(heads: AlignmentHeads, image: torch.Tensor, text: torch.Tensor, device, prec: Precision) -> dict:
    from sail.core.metrics import retrieval

    heads.eval()
    xs, ys = [], []
    for i in range(0, len(image), 8192):
        with prec.autocast():
            xs.append(heads.encode_image(image[i:i + 8192].to(device)).float())
            ys.append(heads.encode_text(text[i:i + 8192].to(device)).float())
    heads.train()
    r = retrieval(torch.cat(xs), torch.cat(ys), torch.arange(len(image)), ks=(1, 5))
    return {"val_i2t_R@1": r["image_to_text_R@1"], "val_t2i_R@1": r["text_to_image_R@1"],
            "val_i2t_R@5": r["image_to_text_R@5"], "val_t2i_R@5": r["text_to_image_R@5"]}


def _store_identity(store: FeatureStore) -> dict:
    """Where a store is and what it holds: resume accepts a store found at the same resolved path or one
    with the same content (a moved or copied file), whatever the spelling of the path."""
    import hashlib

    digest = hashlib.sha1("\n".join(store.ids.tolist()).encode()).hexdigest()
    return {"path": str(store.path.resolve()), "rows": len(store), "ids_sha1": digest,
            "fields": {f: store.dim(f) for f in store.fields}}


def _check_same_stores(run: Path, saved: dict, stores: dict[str, FeatureStore]) -> None:
    for flag, store in stores.items():
        before = saved.get(flag)
        if before is None:
            continue
        now = _store_identity(store)
        if now["path"] != before["path"] and now["ids_sha1"] != before["ids_sha1"]:
            raise SailError(f"cannot resume {run}: --{flag.replace('_', '-')} {store.path} is another store than the "
                            f"run used ({before['path']}, {before['rows']} rows); pass that store or a copy of it")
        if {k: now[k] for k in ("rows", "ids_sha1", "fields")} != {k: before[k] for k in ("rows", "ids_sha1", "fields")}:
            raise SailError(f"cannot resume {run}: --{flag.replace('_', '-')} {store.path} changed since the run started "
                            f"({now['rows']} rows now, {before['rows']} then); restore it or use another --out")


def _batching_mode(cfg: AlignConfig, saved: dict | None, nbytes: int, device: torch.device, world: int) -> str:
    """"memory" or "stream": a resumed run keeps the mode it started with (the two differ in batch order)."""
    before = (saved or {}).get("batching", {}).get("mode")
    asked = {"yes": "memory", "no": "stream"}.get(cfg.in_memory)
    if before is not None:
        if asked is not None and asked != before:
            raise SailError(f"cannot resume with --in-memory {cfg.in_memory}: the run started with its features "
                            f"{'in memory' if before == 'memory' else 'streamed'} and the batch order would change; "
                            "drop --in-memory (or pass the run's own)")
        return before
    if asked is not None:
        return asked
    # every process holds the whole set in memory mode: on one host, W copies share the RAM
    return "memory" if _fits(nbytes * (world if device.type != "cuda" else 1), device) else "stream"


def _finite_rows(store: FeatureStore, field: str, rows: np.ndarray, progress: bool, rank: int = 0,
                 world: int = 1) -> np.ndarray:
    """(len(rows),) bool: False where a feature row holds NaN or Inf (float16: exponent bits all ones).
    Under torchrun each rank checks every W-th slab; the caller combines the ranks' answers."""
    ok = np.ones(len(rows), dtype=bool)
    order = np.argsort(rows, kind="stable")
    step = 65536
    for i in tqdm(range(rank * step, len(rows), world * step), desc=f"check {store.path.name}:{field}", unit="slab",
                  disable=not progress or len(rows) <= 4 * step, leave=False):
        x = store.read(field, rows[order[i:i + step]]).view(np.uint16)
        ok[order[i:i + step]] = ~((x & 0x7C00) == 0x7C00).any(1)
    return ok


def _drop_nonfinite(pairs: PairedFeatures, what: str, progress: bool, say, rank: int = 0, world: int = 1,
                    device: torch.device | None = None) -> PairedFeatures:
    """Skip pairs whose image or text row holds NaN/Inf, printing how many and the first ids."""
    ok = _finite_rows(pairs.image_store, "image", pairs.image_rows, progress, rank, world)
    for c in pairs.captions:
        ok &= _finite_rows(pairs.text_store, c, pairs.text_rows, progress, rank, world)
    if world > 1:  # every rank must drop the same pairs: AND over the ranks' slabs
        flags = torch.from_numpy(ok.astype(np.uint8)).to(device)
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MIN)
        ok = flags.cpu().numpy().astype(bool)
    if not ok.all():
        bad = pairs.ids[~ok]
        say(f"align: skipping {len(bad)} {what} pairs with NaN/Inf features (ids {', '.join(map(str, bad[:5]))}"
            f"{', ...' if len(bad) > 5 else ''})")
        pairs = pairs.subset(np.flatnonzero(ok))
    return pairs


def _check_modality(store: FeatureStore, flag: str, want: str) -> None:
    have = store.attrs.get("modality")
    if have is not None and have != want:
        raise SailError(f"--{flag} {store.path} holds {have} features (modality={have}); "
                        f"pass {'an image' if want == 'image' else 'a text'} store to --{flag}")


def _joined(image_store: FeatureStore, text_store: FeatureStore, captions: list[str], say) -> PairedFeatures:
    pairs = PairedFeatures.from_stores(image_store, text_store, captions)
    di, dt = len(image_store) - len(pairs), len(text_store) - len(pairs)
    if di or dt:
        say(f"align: join by id kept {len(pairs)} pairs; dropped {di} of {len(image_store)} rows of {image_store.path} "
            f"and {dt} of {len(text_store)} rows of {text_store.path} (id missing from the other store, or not valid)")
    return pairs


@dataclass
class _Data:
    image_store: FeatureStore
    text_store: FeatureStore
    captions: list[str]
    encoders: dict            # image / text: the stores' encoder attributes (ENCODER_KEYS)
    identities: dict          # flag -> _store_identity, recorded for resume
    train: PairedFeatures
    val: PairedFeatures


def _prepare_data(cfg: AlignConfig, run: Path, saved: dict | None, say, rank: int, world: int,
                  device: torch.device) -> _Data:
    """Check the stores (modality, encoders, and on resume that they are the run's own), join them by id, hold
    out the validation pairs, and drop pairs with NaN/Inf features."""
    image_store, text_store = FeatureStore(cfg.image), FeatureStore(cfg.text)
    _check_modality(image_store, "image", "image")
    _check_modality(text_store, "text", "text")
    captions = cfg.captions or (text_store.fields if cfg.loss == "multi-positive" else text_store.fields[:1])
    encoders = {"image": _encoder_info(image_store), "text": _encoder_info(text_store)}
    saved_encoders = run / "encoders.json"
    if saved is not None and saved_encoders.exists():
        before = read_json(saved_encoders, what="the run's encoder record", required=("image", "text"))
        if before != json.loads(json.dumps(encoders, default=str)):
            raise SailError(f"cannot resume {run}: the stores now come from other encoders than when the run started "
                            f"({before['image']['model_id']} / {before['text']['model_id']}); re-extract or use another --out")
    stores = {"image": image_store, "text": text_store}
    pairs = _joined(image_store, text_store, captions, say)
    if cfg.subset:
        pairs = restrict(pairs, cfg.subset)
        say(f"align: --subset {cfg.subset} keeps {len(pairs)} pairs")
    if cfg.val_image or cfg.val_text:
        if not (cfg.val_image and cfg.val_text):
            raise SailError("give both --val-image and --val-text, or neither")
        vi, vt = FeatureStore(cfg.val_image), FeatureStore(cfg.val_text)
        _check_modality(vi, "val-image", "image")
        _check_modality(vt, "val-text", "text")
        _check_same_encoder(image_store, vi)
        _check_same_encoder(text_store, vt)
        stores.update(val_image=vi, val_text=vt)
        train, val = pairs, _joined(vi, vt, captions[:1], say)
    else:
        train, val = pairs.split(cfg.val_fraction, cfg.seed)
    if saved is not None:
        _check_same_stores(run, saved.get("stores", {}), stores)
    train = _drop_nonfinite(train, "training", cfg.progress and rank == 0, say, rank, world, device)
    if len(val):
        val = _drop_nonfinite(val, "validation", cfg.progress and rank == 0, say, rank, world, device)
    return _Data(image_store, text_store, captions, encoders, {k: _store_identity(v) for k, v in stores.items()},
                 train, val)


# ------------------------------------------------------------------------------------------ training


# ~120 lines on purpose: one loop whose state (step, device sums since the last log, stop request) every phase uses.
def align(cfg: AlignConfig, resume: bool = False) -> AlignResult:
    """Train heads on the stores in `cfg` into cfg.out (the module doc); `resume` continues a run there."""
    cfg.validate()
    rank, world, device = setup(cfg.device)  # the process group's backend follows the device asked for
    prec = resolve_precision(cfg.precision, device)
    _check_loss_impl(cfg, device)
    if cfg.batch % world:
        raise SailError(f"--batch {cfg.batch} must divide evenly over {world} processes")
    torch.manual_seed(cfg.seed)
    run = Path(cfg.out)
    # the resume rule of sail.train.checkpoint, as the recipes; settings added since a run began compare as defaults
    ck = check_resume(run, "train_config.json", cfg.resolved(), resume, _RESUME_FREE,
                      {f.name: f.default for f in dataclasses.fields(AlignConfig) if f.default is not dataclasses.MISSING})
    saved = ck.settings if ck is not None else None  # None: a fresh start (a failed start's directory is reused)

    def say(msg: str) -> None:
        if rank == 0:
            print(msg, flush=True)

    data = _prepare_data(cfg, run, saved, say, rank, world, device)
    train, val, captions, encoders = data.train, data.val, data.captions, data.encoders
    batches, batch, mode = _make_batches(cfg, train, saved, device, rank, world, say)
    steps_per_epoch = batches.steps_per_epoch
    total = cfg.steps or cfg.epochs * steps_per_epoch
    val_image, val_texts = val.load("cpu") if len(val) else (None, None)
    heads, opt, sched, scaler, start = _build_heads(cfg, data, total, device, prec, ck)
    broadcast_parameters(heads)  # every rank starts from rank 0's weights (as DDP did)
    if rank == 0:
        _write_settings(run, cfg, data, mode)
    log = MetricsLog(run / "metrics.jsonl", resume_step=start if ck is not None else None, enabled=rank == 0)
    extra = {
        "loss": cfg.loss, "average": cfg.average, "captions": captions,
        "image_encoder": {**encoders["image"], "store": str(data.image_store.path)},
        "text_encoder": {**encoders["text"], "store": str(data.text_store.path)},
        "train": {"batch": batch, "steps": total, "optimizer": cfg.optimizer, "lr": cfg.lr, "pairs": len(train),
                  "val_pairs": len(val)},
    }
    say(f"align: {len(train)} train / {len(val)} val pairs, batch {batch}, {total} steps, "
        f"{cfg.head} heads ({heads.num_parameters() / 1e6:.2f}M params), loss {cfg.loss}, "
        f"features {'on ' + device.type if mode == 'memory' else 'streamed'}")

    # ---- the loop is sail.train.engine's (guards, log points, agreed Ctrl-C, checkpoints). Nothing in a step waits
    # for the device: its statistics accumulate on the device and are read at log points, where a non-finite
    # loss also stops the run; so up to --log-every steps may pass after a NaN before the run stops.
    bar = tqdm(total=total, initial=start, disable=not cfg.progress or rank != 0, unit="step", dynamic_ncols=True)
    balance = GradientBalance(batch, cfg.loss)  # warns once if negatives swamp positives; probed at log points
    last, probed, latest = {}, {}, []
    stop = _StopRequest()
    loss_fn = functools.partial(_loss, cfg)
    # chunk size fixed once per run: querying free memory inside the step could wait for the device
    chunk = cfg.chunk_size or auto_chunk_size(heads, batch // world, device)
    acc = torch.zeros(5, device=device)  # sums since the last log of [loss, t, b, pos cosine, neg cosine]

    def step_fn(item, step: int) -> torch.Tensor:
        image, texts = item
        probed.clear()
        probe = None
        if rank == 0 and balance.enabled and ((step + 1) % cfg.log_every == 0 or step + 1 == total):
            def probe(x, y, scale, bias, at=step + 1):  # positives' share of the gradient, at log points
                probed.update(balance(x, y, float(scale), float(bias), at))
        opt.zero_grad(set_to_none=True)
        stats = train_step(heads, image, texts, loss_fn, precision=prec, chunk_size=chunk,
                           scaler=scaler if scaler.is_enabled() else None, probe=probe)
        if scaler.is_enabled():
            scaler.step(opt)  # unscales; skips the step when a gradient overflowed
            scaler.update()
        else:
            opt.step()
        sched.step()
        heads.clamp_()
        acc.add_(stats)
        latest[:] = [stats]
        return stats

    def on_log(step: int, since: int, seconds: float, checkpoint: bool) -> None:
        sums = acc.tolist()  # the host sync, once per log interval
        row = _log_row(step, sums, since, latest[0], cfg.loss, opt.param_groups[0]["lr"], batch * since / seconds)
        row.update(probed)
        acc.zero_()
        if rank == 0 and val_image is not None and (step % cfg.eval_every == 0 or step == total):
            row.update(_validate(heads, val_image, val_texts[0], device, prec))
        last.update(row)
        log.log(row)
        bar.set_postfix(loss=f"{row['loss']:.4f}", t=f"{row['t']:.1f}", b=f"{row['b']:.2f}",
                        pairs_s=f"{row['pairs_per_s']:.0f}", refresh=False)

    loop = Loop(run, heads, opt, sched, total, start, scaler=scaler, log_every=cfg.log_every,
                checkpoint_every=cfg.checkpoint_every, world=world, bar=bar,
                hint="try a lower --lr or a larger --batch/temperature",
                state=lambda step: {"epoch": step // steps_per_epoch},
                must_log=lambda step: val_image is not None and step % cfg.eval_every == 0)
    try:
        with prec.scope():  # TF32 as the precision wants, for this run only
            step = train_loop(loop, _endless(batches, start, steps_per_epoch), step_fn, on_log, stop)
    finally:
        stop.restore()
        bar.close()
        batches.close()
    if rank == 0 and not last and val_image is not None:  # resumed after its last step: nothing trained, still measured
        last.update(_validate(heads, val_image, val_texts[0], device, prec))
    if rank == 0:
        return _finish(run, step, heads, extra, cfg.loss, last)
    return AlignResult(run, step, {})


def _endless(batches: MemoryBatches | StreamingBatches, start: int, steps_per_epoch: int):
    """(image, texts) batches from step `start` on, epoch after epoch (an epoch may yield fewer than
    steps_per_epoch batches: the next one then starts where the step count says)."""
    step = start
    while True:
        epoch, offset = divmod(step, steps_per_epoch)
        for item in batches.epoch(epoch, offset):
            step += 1
            yield item


def _write_settings(run: Path, cfg: AlignConfig, data: _Data, mode: str) -> None:
    """train_config.json (the settings a resume must match, the stores' identities, the batching mode) and
    encoders.json."""
    run.mkdir(parents=True, exist_ok=True)
    record = {**cfg.resolved(), "stores": data.identities,
              "batching": {"mode": mode, "block_rows": cfg.stream_block_rows, "buffer_blocks": cfg.stream_buffer_blocks}}
    write_json(run / "train_config.json", record, indent=1)
    write_json(run / "encoders.json", data.encoders, indent=1, default=str)


def _make_batches(cfg: AlignConfig, train: PairedFeatures, saved: dict | None, device: torch.device, rank: int,
                  world: int, say) -> tuple[MemoryBatches | StreamingBatches, int, str]:
    """(batches, global batch size, "memory" | "stream"): the pairs on the device when they fit (or as the
    resumed run had them), else streamed from the stores."""
    batch = min(cfg.batch, len(train) - len(train) % world)
    if batch < 2:
        raise SailError(f"only {len(train)} training pairs; need at least 2 (check the stores and --val-fraction)")
    if batch < cfg.batch:
        say(f"align: --batch {cfg.batch} is more than the {len(train)} training pairs; using batch {batch}")
    mode = _batching_mode(cfg, saved, train.nbytes(), device, world)
    if mode == "memory":
        image_all, texts_all = train.load(device)
        return MemoryBatches(image_all, texts_all, batch, cfg.seed, rank, world), batch, mode
    # reuse: the loop is done with a batch when it asks for the next one
    return StreamingBatches(train, batch, cfg.seed, cfg.stream_block_rows, cfg.stream_buffer_blocks,
                            device=device, rank=rank, world=world, reuse=True), batch, mode


def _build_heads(cfg: AlignConfig, data: _Data, total: int, device: torch.device, prec: Precision, ck):
    """(heads, optimizer, schedule, grad scaler, first step), restored from the checkpoint `ck` if any."""
    heads = AlignmentHeads(data.image_store.dim("image"), data.text_store.dim(data.captions[0]), cfg.out_dim, cfg.head,
                           cfg.width, cfg.activation, cfg.init_scale, cfg.init_bias).to(device)
    opt = build_optimizer(cfg.optimizer, heads.param_groups(cfg.weight_decay), cfg.lr, cfg.weight_decay, tuple(cfg.betas))
    warmup = int(cfg.warmup if cfg.warmup >= 1 else round(cfg.warmup * total))
    sched = cosine_with_warmup(opt, total, min(warmup, max(0, total - 1)))
    scaler = prec.grad_scaler()  # dynamic loss scaling for fp16, a pass-through otherwise
    if ck is None:
        return heads, opt, sched, scaler, 0
    restore(ck, heads, opt, sched, scaler)
    return heads, opt, sched, scaler, ck.step


def _log_row(step: int, sums: list[float], since: int, stats: torch.Tensor, loss: str, lr: float,
             pairs_per_s: float) -> dict:
    """One metrics.jsonl row from the device sums of [loss, t, b, pos cosine, neg cosine] over `since` steps."""
    scale, b = (float(v) for v in stats[1:3].tolist())  # the last step's temperature t and bias b
    bias = b if loss != "info-nce" else 0.0  # info-nce never uses b
    return {"step": step, "loss": sums[0] / since, "t": scale, "b": b, "lr": lr, "pairs_per_s": pairs_per_s,
            "pos_logit": scale * sums[3] / since + bias, "neg_logit": scale * sums[4] / since + bias}


def _finish(run: Path, step: int, heads, extra: dict, loss: str, last: dict) -> AlignResult:
    """Rank 0 after the last step (its checkpoint is written): the model, curves and summary.json."""
    heads.save_pretrained(run, extra_config=extra, metadata={
        "image_model": str(extra["image_encoder"]["model_id"]), "text_model": str(extra["text_encoder"]["model_id"]),
        "loss": loss})
    plot_curves(run / "metrics.jsonl", run / "curves.png")
    metrics = {k: v for k, v in last.items() if k not in ("step",)}
    write_json(run / "summary.json", {"steps": step, **metrics}, indent=1)
    return AlignResult(run, step, metrics)


def _fits(nbytes: int, device: torch.device) -> bool:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return nbytes < 0.6 * free
    return nbytes < 0.5 * free_memory(device)  # MemAvailable, as the chunk size reads it
