"""`sail align`: train image and text alignment heads on cached features, at 32k+ batch on one GPU.

    sail align --image features/cc3m/dinov2-l.h5 --text features/cc3m/gte-l.h5 \\
               --captions caption,long_caption --loss multi-positive --head glu --batch 36864 --out runs/cc3m

Writes to the run directory: `train_config.json` (the resolved settings), `metrics.jsonl` (one line per
logged step), `checkpoint-*/` + `LATEST` (resume with `--resume` after any crash), and at the end
`config.json` + `model.safetensors` (load with `sail.AlignmentHeads.from_pretrained(run_dir)`),
`curves.png` and `summary.json`.

Defaults follow the SAIL paper: Lion (lr 1e-5, wd 1e-7, betas 0.9/0.99), cosine schedule with warmup,
t = 20, b = -10, loss averaged over all B^2 pairs. Under torchrun each rank takes its slice of every
global batch and the loss gathers every rank's embeddings as negatives (DDP averages the gradients).
"""

from __future__ import annotations

import dataclasses
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
from sail.stability import GradientBalance
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
    log_every: int = 1
    block_size: int | None = None
    progress: bool = True

    def resolved(self) -> dict:
        d = dataclasses.asdict(self)
        d["betas"] = list(d["betas"])
        return d


# Settings that may differ between a run and its resumption.
_RESUME_FREE = {"progress", "device", "precision", "in_memory", "eval_every", "log_every", "checkpoint_every"}


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


@torch.no_grad()
def _logit_stats(x: torch.Tensor, y: torch.Tensor, t: float, b: float) -> tuple[float, float]:
    """Mean positive and negative logit in O(B*D): sum of all logits from the column sums."""
    n = len(x)
    pos = (x * y).sum(1)                              # (B,) diagonal of X Y^T
    total = x.sum(0) @ y.sum(0)                       # sum over all B^2 entries
    neg = (total - pos.sum()) / max(1, n * n - n)
    return float(t * pos.mean() + b), float(t * neg + b)


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
    model = heads
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(heads, device_ids=[device.index] if device.type == "cuda" else None)

    start = 0
    ck = load_checkpoint(run) if resume else None
    if ck is not None:
        ck.restore(heads, opt, sched)
        start = ck.step
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

    # ---- loop
    bar = tqdm(total=total, initial=start, disable=not cfg.progress or rank != 0, unit="step", dynamic_ncols=True)
    balance = GradientBalance(batch, cfg.loss, every=cfg.log_every)  # warns once if negatives swamp positives
    step, last = start, {}
    try:
        while step < total:
            epoch, offset = divmod(step, steps_per_epoch)
            for image, texts in batches.epoch(epoch, offset):
                if step >= total:
                    break
                tick = time.perf_counter()
                image = image[rank * local:(rank + 1) * local]
                texts = [t[rank * local:(rank + 1) * local] for t in texts]
                with prec.autocast():
                    x, y0 = model(image, texts[0])
                    ys = [y0] + [heads.encode_text(t) for t in texts[1:]]
                t, b = heads.scale(), heads.logit_bias
                loss = _loss(cfg, x.float(), [y.float() for y in ys], t, b)
                t_val, b_val = t.item(), b.item()
                if not torch.isfinite(loss):
                    good = load_checkpoint(run)
                    where = f"the last good checkpoint is {good.path} (step {good.step})" if good else "no checkpoint was written yet"
                    raise SailError(f"loss became {loss.item()} at step {step + 1}; {where}; "
                                    "try a lower --lr or a larger --batch/temperature")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                heads.clamp_()
                step += 1
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                dt = time.perf_counter() - tick
                row = {"step": step, "loss": loss.item(), "t": t_val, "b": b_val,
                       "lr": opt.param_groups[0]["lr"], "pairs_per_s": batch / dt}
                row["pos_logit"], row["neg_logit"] = _logit_stats(x.float(), ys[0].float(), row["t"], row["b"])
                row.update(balance(x.float(), ys[0].float(), t_val, b_val, step) if rank == 0 else {})
                if rank == 0 and val_image is not None and (step % cfg.eval_every == 0 or step == total):
                    row.update(_validate(heads, val_image, val_texts[0], device, prec))
                last.update(row)
                if step % cfg.log_every == 0 or step == total or "val_i2t_R@1" in row:
                    log.log(row)
                bar.set_postfix(loss=f"{row['loss']:.4f}", t=f"{row['t']:.1f}", b=f"{row['b']:.2f}",
                                pairs_s=f"{row['pairs_per_s']:.0f}", refresh=False)
                bar.update(1)
                if step % cfg.checkpoint_every == 0 and step < total and rank == 0:
                    save_checkpoint(run, step, heads, opt, sched, {"epoch": epoch})
                if world > 1 and step % cfg.checkpoint_every == 0:
                    torch.distributed.barrier()
    finally:
        bar.close()

    if rank == 0:
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
