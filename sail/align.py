"""`sail align`: train image and text alignment heads on cached features, at 32k+ batch on one GPU.

    sail align --image features/cc3m/dinov2-l.h5 --text features/cc3m/gte-l.h5 \\
               --captions caption,long_caption --loss multi-positive --head glu --batch 36864 --out runs/cc3m

Writes to the run directory: `train_config.json` (the resolved settings), `metrics.jsonl` (one line per
logged step), `checkpoint-*/` + `LATEST` (resume with `--resume` after any crash), and at the end
`config.json` + `model.safetensors` (load with `sail.AlignmentHeads.from_pretrained(run_dir)`),
`curves.png` and `summary.json`.

Defaults follow the SAIL paper: Lion (lr 1e-5, wd 1e-7, betas 0.9/0.99), cosine schedule with warmup,
t = 20, b = -10, loss averaged over all B^2 pairs. Under torchrun each rank takes its slice of every
global batch and the loss gathers every rank's embeddings as negatives; sail.step averages the gradients.

Each step is sail.step.train_step: the heads run in chunks (--chunk-size, automatic from free memory), so
memory is O(B*D) whatever the head; precision follows sail.precision (--precision, bf16 on Ampere+ GPUs).
The step never waits for the device: statistics are read every --log-every steps, where a NaN/Inf loss
stops the run (so up to --log-every steps may run after it) naming the last good checkpoint; checkpoints
are only written after that check (and one of the weights).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from sail.checkpoint import load_checkpoint, save_checkpoint
from sail.distributed import init_distributed, local_device
from sail.encoders import pick_device
from sail.errors import SailError
from sail.heads import AlignmentHeads
from sail.loader import MemoryBatches, PairedFeatures, StreamingBatches
from sail.optim import build_optimizer, cosine_with_warmup
from sail.precision import Precision, resolve_precision
from sail.runlog import MetricsLog, plot_curves
from sail.step import broadcast_parameters, train_step
from sail.store import FeatureStore

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
    precision: str = "auto"                # auto | fp32 | bf16 | fp16 (see sail.precision)
    in_memory: str = "auto"                # auto | yes | no (stream from the stores)
    checkpoint_every: int = 500
    eval_every: int = 500
    log_every: int = 50                    # steps between reads of the device-side statistics
    block_size: int | None = None          # loss block rows (None: automatic)
    chunk_size: int | None = None          # rows per head chunk (None: automatic from free memory)
    progress: bool = True

    def resolved(self) -> dict:
        d = dataclasses.asdict(self)
        d["betas"] = list(d["betas"])
        return d


# Settings that may differ between a run and its resumption.
_RESUME_FREE = {"progress", "device", "precision", "chunk_size", "block_size", "in_memory", "eval_every", "log_every", "checkpoint_every"}


@dataclass
class AlignResult:
    run_dir: Path
    steps: int
    metrics: dict = field(default_factory=dict)

    def summary(self) -> str:
        rows = [(k, f"{v:.4g}" if isinstance(v, float) else str(v)) for k, v in self.metrics.items()]
        w = max(len(k) for k, _ in rows) if rows else 0
        return "\n".join([f"run {self.run_dir} ({self.steps} steps)"] + [f"  {k:<{w}}  {v}" for k, v in rows])


# ------------------------------------------------------------------------------------------ helpers


def _encoder_info(store: FeatureStore) -> dict:
    return {k: store.attrs.get(k) for k in ENCODER_KEYS}


def _check_same_encoder(a: FeatureStore, b: FeatureStore) -> None:
    ia, ib = _encoder_info(a), _encoder_info(b)
    diff = [k for k in ENCODER_KEYS if ia[k] != ib[k]]
    if diff:
        raise SailError(f"{a.path} and {b.path} come from different encoders ({', '.join(diff)} differ); "
                        "extract both with the same --model and settings")


def _loss(cfg: AlignConfig, x: torch.Tensor, ys: list[torch.Tensor], t, b) -> torch.Tensor:
    from sail import losses

    if cfg.loss == "sigmoid":
        return losses.sigmoid_loss(x, ys[0], t, b, average=cfg.average, block_size=cfg.block_size)
    if cfg.loss == "multi-positive":
        return losses.multi_positive_loss(x, ys, t, b, average=cfg.average, block_size=cfg.block_size)
    return losses.info_nce_loss(x, ys[0], t, block_size=cfg.block_size)


def _track_nonfinite(bad: torch.Tensor, loss: torch.Tensor, step: int) -> None:
    """Remember, on the device, the first step whose loss was not finite and that loss (no host sync)."""
    first = (bad[0] == 0) & ~torch.isfinite(loss)
    bad.copy_(torch.where(first, torch.stack([torch.full_like(bad[0], step), loss.to(bad.dtype)]), bad))


def _check_finite(bad: torch.Tensor, heads: AlignmentHeads, run: Path, weights: bool) -> None:
    """At a log point: stop on a non-finite loss (and, before a checkpoint, on non-finite weights), naming
    the last good checkpoint."""
    step, value = bad.tolist()
    what = f"loss became {value} at step {int(step)}" if step else None
    if what is None and weights:
        finite = torch.stack([torch.isfinite(p).all() for p in heads.parameters()]).all()
        what = None if bool(finite) else "the weights became non-finite"
    if what is None:
        return
    good = load_checkpoint(run)
    where = f"the last good checkpoint is {good.path} (step {good.step})" if good else "no checkpoint was written yet"
    raise SailError(f"{what}; {where}; try a lower --lr or a larger --batch/temperature")


@torch.no_grad()
def _validate(heads: AlignmentHeads, image: torch.Tensor, text: torch.Tensor, device, prec: Precision) -> dict:
    from sail.metrics import retrieval

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


def _prepare_run_dir(cfg: AlignConfig, resume: bool) -> Path:
    run = Path(cfg.out)
    saved = run / "train_config.json"
    if saved.exists():
        if not resume:
            raise SailError(f"{run} already holds a run; pass --resume to continue it or choose another --out")
        old = json.loads(saved.read_text())
        new = cfg.resolved()
        diff = [k for k in new if k not in _RESUME_FREE and old.get(k) != new[k]]
        if diff:
            raise SailError(f"cannot resume {run}: settings differ from the saved run ({', '.join(diff)}); "
                            "use the same settings or another --out")
    elif resume and run.exists() and any(run.iterdir()):
        raise SailError(f"{run} has no train_config.json to resume from")
    return run


PANELS = [(("loss",), "loss"), (("t", "b"), "t, b"), (("pos_logit", "neg_logit"), "logits"),
          (("val_i2t_R@1", "val_t2i_R@1"), "val R@1 (%)")]


# ------------------------------------------------------------------------------------------ training


def align(cfg: AlignConfig, resume: bool = False) -> AlignResult:
    if cfg.loss not in LOSSES:
        raise SailError(f"unknown loss {cfg.loss!r}; use one of {', '.join(LOSSES)}")
    for flag, value in (("--chunk-size", cfg.chunk_size), ("--log-every", cfg.log_every)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise SailError(f"{flag} must be a positive integer, got {value!r}")
    rank, world = init_distributed()
    device = local_device(pick_device(cfg.device), rank, world)
    prec = resolve_precision(cfg.precision, device)
    if cfg.batch % world:
        raise SailError(f"--batch {cfg.batch} must divide evenly over {world} processes")
    torch.manual_seed(cfg.seed)
    run = _prepare_run_dir(cfg, resume)

    # ---- data: join stores by id, hold out a validation split
    image_store, text_store = FeatureStore(cfg.image), FeatureStore(cfg.text)
    captions = cfg.captions or (text_store.fields if cfg.loss == "multi-positive" else text_store.fields[:1])
    encoders = {"image": _encoder_info(image_store), "text": _encoder_info(text_store)}
    saved_encoders = run / "encoders.json"
    if resume and saved_encoders.exists():
        before = json.loads(saved_encoders.read_text())
        if before != json.loads(json.dumps(encoders, default=str)):
            raise SailError(f"cannot resume {run}: the stores now come from other encoders than when the run started "
                            f"({before['image']['model_id']} / {before['text']['model_id']}); re-extract or use another --out")
    pairs = PairedFeatures.from_stores(image_store, text_store, captions)
    if cfg.val_image or cfg.val_text:
        if not (cfg.val_image and cfg.val_text):
            raise SailError("give both --val-image and --val-text, or neither")
        vi, vt = FeatureStore(cfg.val_image), FeatureStore(cfg.val_text)
        _check_same_encoder(image_store, vi)
        _check_same_encoder(text_store, vt)
        train, val = pairs, PairedFeatures.from_stores(vi, vt, captions[:1])
    else:
        train, val = pairs.split(cfg.val_fraction, cfg.seed)
    batch = min(cfg.batch, len(train) - len(train) % world)
    if batch < 2:
        raise SailError(f"only {len(train)} training pairs; need at least 2 (check the stores and --val-fraction)")
    local = batch // world
    on_device = cfg.in_memory == "yes" or (cfg.in_memory == "auto" and _fits(train.nbytes(), device))
    if on_device:
        image_all, texts_all = train.load(device)
        batches = MemoryBatches(image_all, texts_all, batch, cfg.seed)
    else:
        batches = StreamingBatches(train, batch, cfg.seed, device=device)
    steps_per_epoch = batches.steps_per_epoch
    total = cfg.steps or cfg.epochs * steps_per_epoch
    val_image, val_texts = val.load("cpu") if len(val) else (None, None)

    # ---- model, optimizer, schedule
    heads = AlignmentHeads(image_store.dim("image"), text_store.dim(captions[0]), cfg.out_dim, cfg.head, cfg.width,
                           cfg.activation, cfg.init_scale, cfg.init_bias).to(device)
    opt = build_optimizer(cfg.optimizer, heads.param_groups(cfg.weight_decay), cfg.lr, cfg.weight_decay, tuple(cfg.betas))
    warmup = int(cfg.warmup if cfg.warmup >= 1 else round(cfg.warmup * total))
    sched = cosine_with_warmup(opt, total, min(warmup, max(0, total - 1)))
    scaler = prec.grad_scaler()  # dynamic loss scaling for fp16, a pass-through otherwise

    start = 0
    ck = load_checkpoint(run) if resume else None
    if ck is not None:
        ck.restore(heads, opt, sched)
        start = ck.step
        if scaler.is_enabled() and "grad_scaler" in ck.state:
            scaler.load_state_dict(ck.state["grad_scaler"])
    broadcast_parameters(heads)  # every rank starts from rank 0's weights (as DDP did)
    if rank == 0:
        run.mkdir(parents=True, exist_ok=True)
        (run / "train_config.json").write_text(json.dumps(cfg.resolved(), indent=1))
        saved_encoders.write_text(json.dumps(encoders, indent=1, default=str))
    log = MetricsLog(run / "metrics.jsonl", resume_step=start if ck is not None else None, enabled=rank == 0)
    extra = {
        "loss": cfg.loss, "average": cfg.average, "captions": captions,
        "image_encoder": {**encoders["image"], "store": str(image_store.path)},
        "text_encoder": {**encoders["text"], "store": str(text_store.path)},
        "train": {"batch": batch, "steps": total, "optimizer": cfg.optimizer, "lr": cfg.lr, "pairs": len(train),
                  "val_pairs": len(val)},
    }
    if rank == 0:
        print(f"align: {len(train)} train / {len(val)} val pairs, batch {batch}, {total} steps, "
              f"{cfg.head} heads ({heads.num_parameters() / 1e6:.2f}M params), loss {cfg.loss}, "
              f"features {'on ' + device.type if on_device else 'streamed'}", flush=True)

    # ---- loop. Nothing in a step waits for the device: the step's statistics accumulate on the device and
    # are read every --log-every steps (and at validation and checkpoint steps), where a non-finite loss
    # also stops the run; so up to --log-every steps may pass after a NaN before the run stops.
    bar = tqdm(total=total, initial=start, disable=not cfg.progress or rank != 0, unit="step", dynamic_ncols=True)
    step, last = start, {}
    loss_fn = functools.partial(_loss, cfg)
    acc = torch.zeros(5, device=device)  # sums since the last log of [loss, t, b, pos cosine, neg cosine]
    bad = torch.zeros(2, dtype=torch.float64, device=device)  # [first step with a non-finite loss (0: none), loss]
    since, tick = 0, time.perf_counter()
    try:
        while step < total:
            epoch, offset = divmod(step, steps_per_epoch)
            for image, texts in batches.epoch(epoch, offset):
                if step >= total:
                    break
                image = image[rank * local:(rank + 1) * local]
                texts = [t[rank * local:(rank + 1) * local] for t in texts]
                opt.zero_grad(set_to_none=True)
                stats = train_step(heads, image, texts, loss_fn, precision=prec, chunk_size=cfg.chunk_size,
                                   scaler=scaler if scaler.is_enabled() else None)
                if scaler.is_enabled():
                    scaler.step(opt)  # unscales; skips the step when a gradient overflowed
                    scaler.update()
                else:
                    opt.step()
                sched.step()
                heads.clamp_()
                step += 1
                since += 1
                acc += stats
                _track_nonfinite(bad, stats[0], step)
                validate = rank == 0 and val_image is not None and (step % cfg.eval_every == 0 or step == total)
                checkpoint = step % cfg.checkpoint_every == 0 and step < total
                bar.update(1)
                if not (step % cfg.log_every == 0 or step == total or validate or checkpoint):
                    continue
                sums = acc.tolist()  # the host sync, once per log interval
                _check_finite(bad, heads, run, checkpoint)
                now = time.perf_counter()
                t_val, b_val = (float(v) for v in stats[1:3].tolist())
                bias = b_val if cfg.loss != "info-nce" else 0.0
                row = {"step": step, "loss": sums[0] / since, "t": t_val, "b": b_val, "lr": opt.param_groups[0]["lr"],
                       "pairs_per_s": batch * since / (now - tick),
                       "pos_logit": t_val * sums[3] / since + bias, "neg_logit": t_val * sums[4] / since + bias}
                acc.zero_()
                since, tick = 0, now
                if validate:
                    row.update(_validate(heads, val_image, val_texts[0], device, prec))
                last.update(row)
                log.log(row)
                bar.set_postfix(loss=f"{row['loss']:.4f}", t=f"{row['t']:.1f}", b=f"{row['b']:.2f}",
                                pairs_s=f"{row['pairs_per_s']:.0f}", refresh=False)
                if checkpoint and rank == 0:
                    state = {"epoch": epoch, **({"grad_scaler": scaler.state_dict()} if scaler.is_enabled() else {})}
                    save_checkpoint(run, step, heads, opt, sched, state)
                if world > 1 and checkpoint:
                    torch.distributed.barrier()
                tick = time.perf_counter()  # validation and checkpoints do not count against pairs/s
    finally:
        bar.close()

    if rank == 0:
        _check_finite(bad, heads, run, True)  # the last steps since the last log point, before saving
        heads.save_pretrained(run, extra_config=extra, metadata={
            "image_model": str(extra["image_encoder"]["model_id"]), "text_model": str(extra["text_encoder"]["model_id"]),
            "loss": cfg.loss})
        save_checkpoint(run, step, heads, opt, sched, {"epoch": step // max(1, steps_per_epoch)})
        plot_curves(run / "metrics.jsonl", run / "curves.png", PANELS)
        metrics = {k: v for k, v in last.items() if k not in ("step",)}
        (run / "summary.json").write_text(json.dumps({"steps": step, **metrics}, indent=1))
        return AlignResult(run, step, metrics)
    return AlignResult(run, step, {})


def _fits(nbytes: int, device: torch.device) -> bool:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return nbytes < 0.6 * free
    try:
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return True
    return nbytes < 0.5 * avail
