"""ALIP (Yang et al. 2023): CLIP trained end to end on raw text AND a synthetic caption per image, with
per-sample consistency gates that down-weight noisy pairs.

    sail recipe alip --config alip-tiny                                    # CPU, a minute
    sail recipe alip --config alip-vit-b32 --data cc3m.parquet --out runs/alip
    torchrun --nproc_per_node 8 -m sail.recipes.alip --config alip-vit-b16
    sail recipe alip --config ... --gates false                              # the no-gates ablation

Model: CLIP ViT image tower + 12-layer width-512 CLIP text tower, linear heads to 512-d (sail.towers).
ONE text encoder embeds both the raw text (column `text_column`, default "caption") and the synthetic
caption (`caption_column`, default "long_caption"). With x, t, c the unit image / raw text / caption
embeddings and W_s, W_t, W_c the gates (sail.losses.ConsistencyGates, no gradient):

    L = info_nce(x, t, weights = W_s W_t) + info_nce(x, c, weights = W_s W_c)

info_nce is sail.losses.info_nce_loss (mean over samples of (CE_i2t + CE_t2i) / 2, negatives gathered
from every process). Paper settings: AdamW lr 1e-3, wd 0.2, betas (0.9, 0.98), eps 1e-6, OneCycleLR
pct_start 0.1, grad clip 1, t = 1/0.07 learnable, clamped at 100.

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
from sail.errors import SailError
from sail.distributed import wrap_ddp
from sail.gradcache import contrastive_backward
from sail.losses import ConsistencyGates, info_nce_loss
from sail.optim import build_optimizer, one_cycle
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
    ds = open_dataset(str(cfg["data"]), columns=[cfg["text_column"], cfg["caption_column"]])
    train_rows, held_rows = split_indices(ds.ids, cfg["holdout"])

    # ---- model, gates, optimizer, schedule
    towers = build_towers("alip", cfg["vision"], cfg["text"], cfg["embed_dim"], cfg["image"], projection=cfg["projection"],
                          temperature="log_scale", init_scale=1.0 / cfg["init_temperature"],
                          max_scale=cfg["max_scale"]).to(device)
    if cfg["gradient_checkpointing"]:
        towers.enable_gradient_checkpointing()
    gates = ConsistencyGates(cfg["gate_momentum"], cfg["gamma_s"], cfg["gamma_p"], enabled=bool(cfg["gates"]))
    gates.to(device)
    optimizer = build_optimizer("adamw", towers.param_groups(cfg["optim"]["weight_decay"]), lr=cfg["optim"]["lr"],
                                weight_decay=cfg["optim"]["weight_decay"], betas=cfg["optim"]["betas"], eps=cfg["optim"]["eps"])
    steps = int(cfg["steps"])
    pct_start = max(float(cfg["optim"]["pct_start"]), 2.0 / steps)  # OneCycleLR needs >= 2 warm-up steps
    if pct_start >= 1.0:
        raise SailError(f"ALIP's one-cycle schedule needs at least 3 steps, got steps={steps}")
    scheduler = one_cycle(optimizer, max_lr=cfg["optim"]["lr"], total_steps=steps, pct_start=pct_start)

    # ---- resume from the newest checkpoint in OUT, if any
    step, position = 0, (0, 0)
    ckpt = latest_checkpoint(out)
    if ckpt is not None:
        state = load_checkpoint(ckpt, towers, optimizer, scheduler, {"gates": gates}, config=cfg)
        step, position = state["step"], tuple(state["position"])
    log = MetricsLog(out / "metrics.jsonl", resume_step=step if ckpt else None, enabled=rank == 0)
    if rank == 0:
        (out / "recipe-config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    model = wrap_ddp(towers, device)  # towers itself when there is one process

    templates = zeroshot_templates(cfg["zeroshot_templates"])
    data = PairData(ds.images, [ds.captions[cfg["text_column"]], ds.captions[cfg["caption_column"]]],
                    towers.preprocessing, seed=cfg["seed"])
    batches = iterate_batches(data, train_rows, cfg["batch_size"], cfg["seed"], position, workers=cfg["workers"],
                              pin_memory=device.type == "cuda")
    bar = tqdm(total=steps, initial=step, desc="alip", disable=rank != 0 or not cfg["progress"], dynamic_ncols=True)
    summary = {"out": str(out), "towers": towers, "first_loss": None, "last_loss": None}
    skipped, tick = 0, time.time()
    def loss_fn(x, y, t):  # x (B, D) images, y (2B, D): raw texts then synthetic captions
        t_emb, c_emb = y.chunk(2)
        w_t, w_c = gates((t_emb * c_emb).sum(1), (x * t_emb).sum(1), (x * c_emb).sum(1))  # no gradient
        loss_xt = info_nce_loss(x, t_emb, t, weights=w_t)
        loss_xc = info_nce_loss(x, c_emb, t, weights=w_c)
        with torch.no_grad():  # the loss without gates, to watch learning (the gated one rises as H adapts)
            xd, td = x.detach(), t.detach()
            plain = info_nce_loss(xd, t_emb.detach(), td) + info_nce_loss(xd, c_emb.detach(), td)
        return loss_xt + loss_xc, {"loss_xt": loss_xt.detach(), "loss_xc": loss_xc.detach(), "plain": plain,
                                   "w_t": w_t, "w_c": w_c}

    towers.train()
    while step < steps:
        epoch, next_batch, pixels, texts, n_bad = next(batches)
        skipped += n_bad
        if pixels is None:  # too few good images left in this batch
            continue
        b = pixels.shape[0]
        tokens = towers.tokenize(texts[0] + texts[1])  # one text encoder for raw text and caption: (2B, L)
        lr = optimizer.param_groups[0]["lr"]  # the rate this step uses
        optimizer.zero_grad(set_to_none=True)
        loss, logs = contrastive_backward(model, pixels.to(device, non_blocking=True),
                                          tokens["input_ids"].to(device), tokens["attention_mask"].to(device),
                                          loss_fn, cfg["accum_steps"], autocast=lambda: train_autocast(device))
        loss_xt, loss_xc, plain, w_t, w_c = (logs[k] for k in ("loss_xt", "loss_xc", "plain", "w_t", "w_c"))
        grad_norm = torch.nn.utils.clip_grad_norm_(towers.parameters(), cfg["optim"]["grad_clip"])
        optimizer.step()
        scheduler.step()
        towers.clamp_()
        step += 1
        position = (epoch, next_batch)

        now = time.time()
        record = {"step": step, "epoch": epoch, "loss": loss.item(), "loss_xt": loss_xt.item(),
                  "loss_xc": loss_xc.item(), "loss_ungated": plain.item(), "lr": lr, "t": towers.scale().item(),
                  "grad_norm": grad_norm.item(), "w_t": w_t.mean().item(), "w_c": w_c.mean().item(),
                  "frac_wc_gt_wt": (w_c > w_t).double().mean().item(), "skipped": skipped,
                  "world": world, "images_per_s": b * world / max(now - tick, 1e-9)}
        tick = now
        if summary["first_loss"] is None:
            summary["first_loss"] = record["loss"]
        summary["last_loss"] = record["loss"]
        log.log(record)
        bar.update(1)
        bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}", t=f"{record['t']:.1f}")

        if rank == 0 and cfg["eval_every"] and (step % cfg["eval_every"] == 0 or step == steps):
            zs = zeroshot_check(towers, ds, held_rows, templates)
            if zs:
                log.log({"step": step, **zs})
                summary.update(zs)
                bar.write(f"step {step}: zero-shot top-1 {zs['zeroshot_top1']:.1f}% on {len(held_rows)} held-out rows")
        if step % cfg["checkpoint_every"] == 0 or step == steps:
            save_checkpoint(out, step, towers, optimizer, scheduler, {"gates": gates}, list(position),
                            keep=cfg["keep_checkpoints"], config=cfg)
    bar.close()

    if rank == 0:
        towers.save_pretrained(out, metadata={"steps": steps, "data": ds.name})
        plot_curves(out / "metrics.jsonl", out / "curves.png")
        print(f"saved {out} (load with sail.towers.Towers.from_pretrained); curves in {out / 'curves.png'}")
    cleanup_distributed()
    return summary


if __name__ == "__main__":
    main()
