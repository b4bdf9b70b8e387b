"""ALIGN (Jia et al. 2021): an EfficientNet image tower and a BERT text tower trained end to end with a
softmax contrastive loss on noisy alt-text.

    sail recipe align --config align-tiny                                    # CPU, a minute
    sail recipe align --config align-efficientnet-b7 --data alt.parquet --out runs/align
    torchrun --nproc_per_node 8 -m sail.recipes.align --config align-efficientnet-b7

Filter the data first with ALIGN's frequency rules (sail/recipes/filter.py, `filter_align`).

Model: EfficientNet (AlignVisionModel, global average pooling; the pooled feature is the image embedding)
+ BERT ([CLS] state through one Linear), L2-normalised (sail.train.towers). Loss, with logits x.y / sigma and sigma learnable
from 1.0 (towers.scale() = 1 / sigma):

    L = CE_i2t + CE_t2i = 2 * info_nce_loss(x, y, 1 / sigma, label_smoothing=0.1)

(both directions summed as in the paper; the library's info_nce_loss is their mean). Negatives are
gathered from every process. Paper settings: LAMB lr 1e-3, wd 1e-5, linear warm-up (10k steps) then
linear decay to 0, global batch 16384, embedding 640 for B7.

EfficientNet has BatchNorm: SyncBatchNorm under torchrun on GPUs (sail.core.distributed.sync_batchnorm); before each
zero-shot check and the final save its running statistics are recomputed on `bn_recalibration` fixed
training images (Towers.recalibrate_batchnorm; 0 = off).

The loop, checkpoints (`--resume` continues a run), logs and outputs are sail.recipes.runner.train_towers's.
"""

from __future__ import annotations

import sys

from sail.data import open_dataset
from sail.recipes.batches import split_indices
from sail.recipes.config import load_config
from sail.recipes.runner import start_run, train_towers
from sail.train.losses import info_nce_loss
from sail.train.optim import build_optimizer, linear_warmup_decay
from sail.train.towers import build_towers


def main(argv=None) -> dict:
    cfg = load_config(sys.argv[1:] if argv is None else argv)
    run = start_run(cfg, "align")
    ds = open_dataset(str(cfg["data"]), columns=[cfg["text_column"]], encoding=cfg.get("encoding", "utf-8"))

    towers = build_towers("align", cfg["vision"], cfg["text"], cfg["embed_dim"], cfg["image"],
                          projection=cfg["projection"], temperature="sigma", init_scale=1.0 / cfg["init_sigma"],
                          max_scale=cfg["max_scale"]).to(run.device)
    if cfg["gradient_checkpointing"]:
        unsupported = towers.enable_gradient_checkpointing()
        if unsupported and run.rank == 0:
            print(f"note: gradient checkpointing is not available for {', '.join(unsupported)}")

    opt = cfg["optim"]
    optimizer = build_optimizer("lamb", towers.param_groups(opt["weight_decay"]), lr=opt["lr"],
                                weight_decay=opt["weight_decay"], betas=opt["betas"], eps=opt["eps"])
    steps = int(cfg["steps"])
    scheduler = linear_warmup_decay(optimizer, total_steps=steps, warmup_steps=min(int(opt["warmup_steps"]), steps))

    def loss_fn(x, y, scale):  # CE_i2t + CE_t2i: the paper sums both directions; info_nce_loss is their mean
        return 2 * info_nce_loss(x, y, scale, label_smoothing=cfg["label_smoothing"]), {}

    train_rows, _ = split_indices(ds.ids, cfg["holdout"])
    calibration = [ds.images[i] for i in train_rows[:cfg["bn_recalibration"]]]  # fixed images for precise BN
    return train_towers(run, towers, optimizer, scheduler, ds, [cfg["text_column"]], loss_fn,
                        before_eval=lambda: towers.recalibrate_batchnorm(calibration))


if __name__ == "__main__":
    from sail.recipes.runner import script

    script(main)
