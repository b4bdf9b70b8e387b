"""ALIP (Yang et al. 2023): CLIP trained end to end on raw text AND a synthetic caption per image, with
per-sample consistency gates that down-weight noisy pairs.

    sail recipe alip --config alip-tiny                                    # CPU, a minute
    sail recipe alip --config alip-vit-b32 --data cc3m.parquet --out runs/alip
    torchrun --nproc_per_node 8 -m sail.recipes.alip --config alip-vit-b16
    sail recipe alip --config ... --gates false                              # the no-gates ablation

Model: CLIP ViT image tower + 12-layer width-512 CLIP text tower, CLIP projections to 512-d (sail.train.towers).
ONE text encoder embeds both the raw text (column `text_column`, default "caption") and the synthetic
caption (`caption_column`, default "long_caption"). With x, y_t, y_c the unit image / raw text / caption
embeddings and W_s, W_t, W_c the gates (sail.train.losses.ConsistencyGates, no gradient):

    L = info_nce(x, y_t, weights = W_s W_t) + info_nce(x, y_c, weights = W_s W_c)

info_nce is sail.train.losses.info_nce_loss (mean over samples of (CE_i2t + CE_t2i) / 2, negatives gathered
from every process). Paper settings: AdamW lr 1e-3, wd 0.2, betas (0.9, 0.98), eps 1e-6, OneCycleLR
pct_start 0.1, grad clip 1, logit scale (the temperature t) 1/0.07, learnable, clamped at 100.

The loop, checkpoints (`--resume` continues a run), logs and outputs are sail.recipes.runner.train_towers's.
"""

from __future__ import annotations

import sys

import torch

from sail.core.errors import SailError
from sail.data import open_dataset
from sail.recipes.config import load_config
from sail.recipes.runner import start_run, train_towers
from sail.train.losses import ConsistencyGates, info_nce_loss
from sail.train.optim import build_optimizer, one_cycle
from sail.train.towers import build_towers


def main(argv=None) -> dict:
    cfg = load_config(sys.argv[1:] if argv is None else argv)
    run = start_run(cfg, "alip")
    ds = open_dataset(str(cfg["data"]), columns=[cfg["text_column"], cfg["caption_column"]], encoding=cfg.get("encoding", "utf-8"))

    towers = build_towers("alip", cfg["vision"], cfg["text"], cfg["embed_dim"], cfg["image"],
                          projection=cfg["projection"], temperature="log_scale",
                          init_scale=1.0 / cfg["init_temperature"], max_scale=cfg["max_scale"]).to(run.device)
    if cfg["gradient_checkpointing"]:
        towers.enable_gradient_checkpointing()
    gates = ConsistencyGates(cfg["gate_momentum"], cfg["gamma_s"], cfg["gamma_p"], enabled=bool(cfg["gates"]))
    gates.to(run.device)

    opt = cfg["optim"]
    optimizer = build_optimizer("adamw", towers.param_groups(opt["weight_decay"]), lr=opt["lr"],
                                weight_decay=opt["weight_decay"], betas=opt["betas"], eps=opt["eps"])
    steps = int(cfg["steps"])
    pct_start = max(float(opt["pct_start"]), 2.0 / steps)  # OneCycleLR needs >= 2 warm-up steps
    if pct_start >= 1.0:
        raise SailError(f"ALIP's one-cycle schedule needs at least 3 steps, got steps={steps}")
    scheduler = one_cycle(optimizer, max_lr=opt["lr"], total_steps=steps, pct_start=pct_start)

    def loss_fn(x, y, scale):  # x (B, D) images; y (2B, D): raw texts, then synthetic captions; scale: t
        text, caption = y.chunk(2)  # (B, D) each
        w_t, w_c = gates((text * caption).sum(1), (x * text).sum(1), (x * caption).sum(1))  # no gradient
        loss_xt = info_nce_loss(x, text, scale, weights=w_t)
        loss_xc = info_nce_loss(x, caption, scale, weights=w_c)
        with torch.no_grad():  # the loss without gates, to watch learning (the gated one rises as H adapts)
            xd, sd = x.detach(), scale.detach()
            plain = info_nce_loss(xd, text.detach(), sd) + info_nce_loss(xd, caption.detach(), sd)
        return loss_xt + loss_xc, {"loss_xt": loss_xt, "loss_xc": loss_xc, "loss_ungated": plain,
                                   "w_t": w_t.mean(), "w_c": w_c.mean(), "frac_wc_gt_wt": (w_c > w_t).float().mean()}

    return train_towers(run, towers, optimizer, scheduler, ds, [cfg["text_column"], cfg["caption_column"]],
                        loss_fn, extra_modules={"gates": gates})


if __name__ == "__main__":
    from sail.recipes.runner import script

    script(main)
