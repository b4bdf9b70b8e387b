"""ALIGN (Jia et al. 2021): an EfficientNet image tower and a BERT text tower trained end to end with a
softmax contrastive loss on noisy alt-text.

    sail recipe align --config align-tiny                                    # CPU, a minute
    sail recipe align --config align-efficientnet-b7 --data alt.parquet --out runs/align
    torchrun --nproc_per_node 8 -m sail.recipes.align --config align-efficientnet-b7

Filter the data first with ALIGN's frequency rules (sail/filter.py, `filter_align`).

Model: EfficientNet (AlignVisionModel, global average pooling) + BERT ([CLS] state), each through a linear
sail.heads projection and L2-normalised (sail.towers). Loss, with logits x.y / sigma and sigma learnable
from 1.0 (towers.scale() = 1 / sigma):

    L = CE_i2t + CE_t2i = 2 * info_nce_loss(x, y, 1 / sigma, label_smoothing=0.1)

(both directions summed as in the paper; the library's info_nce_loss is their mean). Negatives are
gathered from every process. Paper settings: LAMB lr 1e-3, wd 1e-5, linear warm-up (10k steps) then
linear decay to 0, global batch 16384, embedding 640 for B7.

EfficientNet has BatchNorm: before each zero-shot check and the final save, its running statistics are
recomputed on `bn_recalibration` fixed training images (Towers.recalibrate_batchnorm; 0 = off).

Outputs in OUT: config.json + model.safetensors + tokenizer/ (sail.towers.Towers.from_pretrained, `sail
eval`), metrics.jsonl, curves.png, recipe-config.yaml, checkpoints/. Rerun the same command to resume.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import yaml
from tqdm.auto import tqdm

from sail.data import open_dataset
from sail.distributed import wrap_ddp
from sail.gradcache import contrastive_backward
from sail.losses import info_nce_loss
from sail.optim import build_optimizer, linear_warmup_decay
from sail.recipe import (PairData, cleanup_distributed, iterate_batches, latest_checkpoint,
                         load_checkpoint, plot_curves, save_checkpoint, setup_distributed,
                         split_indices, train_autocast, zeroshot_check,
                         zeroshot_templates)
from sail.recipe_config import load_config
from sail.runlog import MetricsLog
from sail.towers import build_towers


def main(argv=None) -> dict:
    cfg = load_config(sys.argv[1:] if argv is None else argv)
    rank, world, device = setup_distributed(str(cfg["device"]))
    out = Path(cfg["out"])
    torch.manual_seed(cfg["seed"])  # same initial weights on every rank

    # ---- data: training rows and a held-out part for the zero-shot check
    ds = open_dataset(str(cfg["data"]), columns=[cfg["text_column"]])
    train_rows, held_rows = split_indices(ds.ids, cfg["holdout"])

    # ---- model, optimizer, schedule
    towers = build_towers("align", cfg["vision"], cfg["text"], cfg["embed_dim"], cfg["image"], projection=cfg["projection"],
                          temperature="sigma", init_scale=1.0 / cfg["init_sigma"],
                          max_scale=cfg["max_scale"]).to(device)
    if cfg["gradient_checkpointing"]:
        unsupported = towers.enable_gradient_checkpointing()
        if unsupported and rank == 0:
            print(f"note: gradient checkpointing is not available for {', '.join(unsupported)}")
    optimizer = build_optimizer("lamb", towers.param_groups(cfg["optim"]["weight_decay"]), lr=cfg["optim"]["lr"],
                                weight_decay=cfg["optim"]["weight_decay"], betas=cfg["optim"]["betas"], eps=cfg["optim"]["eps"])
    steps = int(cfg["steps"])
    scheduler = linear_warmup_decay(optimizer, total_steps=steps, warmup_steps=min(int(cfg["optim"]["warmup_steps"]), steps))

    # ---- resume from the newest checkpoint in OUT, if any
    step, position = 0, (0, 0)
    ckpt = latest_checkpoint(out)
    if ckpt is not None:
        state = load_checkpoint(ckpt, towers, optimizer, scheduler, {}, config=cfg)
        step, position = state["step"], tuple(state["position"])
    log = MetricsLog(out / "metrics.jsonl", resume_step=step if ckpt else None, enabled=rank == 0)
    if rank == 0:
        (out / "recipe-config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    model = wrap_ddp(towers, device)  # towers itself when there is one process

    templates = zeroshot_templates(cfg["zeroshot_templates"])
    calibration = [ds.images[i] for i in train_rows[:cfg["bn_recalibration"]]]  # fixed images for precise BN
    data = PairData(ds.images, [ds.captions[cfg["text_column"]]], towers.preprocessing, seed=cfg["seed"])
    batches = iterate_batches(data, train_rows, cfg["batch_size"], cfg["seed"], position, workers=cfg["workers"],
                              pin_memory=device.type == "cuda")
    bar = tqdm(total=steps, initial=step, desc="align", disable=rank != 0 or not cfg["progress"], dynamic_ncols=True)
    summary = {"out": str(out), "towers": towers, "first_loss": None, "last_loss": None}
    skipped, tick = 0, time.time()
    def loss_fn(x, y, t):  # CE_i2t + CE_t2i: the paper sums both directions; info_nce_loss is their mean
        return 2 * info_nce_loss(x, y, t, label_smoothing=cfg["label_smoothing"]), {}

    towers.train()
    while step < steps:
        epoch, next_batch, pixels, texts, n_bad = next(batches)
        skipped += n_bad
        if pixels is None:  # too few good images left in this batch
            continue
        tokens = towers.tokenize(texts[0])
        lr = optimizer.param_groups[0]["lr"]  # the rate this step uses
        optimizer.zero_grad(set_to_none=True)
        loss, _ = contrastive_backward(model, pixels.to(device, non_blocking=True), tokens["input_ids"].to(device),
                                       tokens["attention_mask"].to(device), loss_fn, cfg["accum_steps"],
                                       autocast=lambda: train_autocast(device))
        clip = cfg["optim"]["grad_clip"]
        grad_norm = torch.nn.utils.clip_grad_norm_(towers.parameters(), clip if clip else float("inf"))
        optimizer.step()
        scheduler.step()
        towers.clamp_()
        step += 1
        position = (epoch, next_batch)

        now = time.time()
        record = {"step": step, "epoch": epoch, "loss": loss.item(), "lr": lr, "t": towers.scale().item(),
                  "grad_norm": grad_norm.item(), "skipped": skipped,
                  "world": world, "images_per_s": pixels.shape[0] * world / max(now - tick, 1e-9)}
        tick = now
        if summary["first_loss"] is None:
            summary["first_loss"] = record["loss"]
        summary["last_loss"] = record["loss"]
        log.log(record)
        bar.update(1)
        bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}", t=f"{record['t']:.2f}")

        if cfg["eval_every"] and (step % cfg["eval_every"] == 0 or step == steps):
            towers.recalibrate_batchnorm(calibration)  # every rank: SyncBatchNorm layers talk to each other
            zs = zeroshot_check(towers, ds, held_rows, templates) if rank == 0 else {}
            if zs:
                log.log({"step": step, **zs})
                summary.update(zs)
                bar.write(f"step {step}: zero-shot top-1 {zs['zeroshot_top1']:.1f}% on {len(held_rows)} held-out rows")
        if step % cfg["checkpoint_every"] == 0 or step == steps:
            save_checkpoint(out, step, towers, optimizer, scheduler, {}, list(position), keep=cfg["keep_checkpoints"],
                            config=cfg)
    bar.close()

    towers.recalibrate_batchnorm(calibration)
    if rank == 0:
        towers.save_pretrained(out, metadata={"steps": steps, "data": ds.name})
        plot_curves(out / "metrics.jsonl", out / "curves.png")
        print(f"saved {out} (load with sail.towers.Towers.from_pretrained); curves in {out / 'curves.png'}")
    cleanup_distributed()
    return summary


if __name__ == "__main__":
    main()
