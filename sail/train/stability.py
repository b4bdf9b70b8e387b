"""Gradient balance of the sigmoid loss: how much of the gradient comes from positives vs negatives.

For logits l_ij = t x_i.y_j + b the sigmoid loss has |dL/dl_ii| = sigmoid(-l_ii) on the B positives and
|dL/dl_ij| = sigmoid(l_ij) on the B(B-1) negatives (the same normaliser divides both). So

    ratio = (sum over negatives) / (sum over positives) = (B - 1) * mean_neg sigmoid(l_ij) / mean_pos sigmoid(-l_ii)

At SigLIP's start (t = 10, b = -10, cosines near 0) each negative weighs sigmoid(-10) = 4.5e-5 and each
positive about 1, so the ratio is about (B - 1) * 4.5e-5: balanced near B = 22k, and 45 at B = 1M. The
SAIL paper finds sigmoid training collapses above ~32k unless t grows with B; this module estimates the
ratio from a random subset of rows (exact when all rows are used; O(rows * B * D)) and, when negatives
swamp the positives, names the t that would bring the ratio back to 1 (or lowers it most), and the b.

    monitor = GradientBalance(batch=36864)                         # once, before the loop
    row.update(monitor(x, y, t, b, step))                          # each logged step: {"pos_grad_share": ...}
"""

from __future__ import annotations

import math
import sys

import torch

SCALES = torch.logspace(0, 2, 200, dtype=torch.float64)  # t from 1 to 100 (the heads clamp t <= 100)


@torch.no_grad()
def sampled_cosines(x: torch.Tensor, y: torch.Tensor, rows: int = 256, seed: int = 0):
    """Positive cosines x_i.y_i (B,) and negative cosines x_i.y_j, i != j, for `rows` random rows (as float64)."""
    n = len(x)
    # float32 matmul (float64 is slow on most GPUs); the sigmoid sums below run in float64
    pos = (x.float() * y.float()).sum(1).double()                               # (B,)
    pick = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:min(rows, n)].to(x.device)
    block = (x[pick].float() @ y.float().T).double()                            # (rows, B)
    off = torch.ones_like(block, dtype=torch.bool)
    off[torch.arange(len(pick), device=x.device), pick] = False                 # drop each row's positive
    return pos, block[off]


def balance_ratio(pos: torch.Tensor, neg: torch.Tensor, t, b, batch: int) -> torch.Tensor:
    """(B - 1) * mean sigmoid(t neg + b) / mean sigmoid(-(t pos + b)); t may be a 1-d tensor of candidates."""
    t = torch.as_tensor(t, dtype=torch.float64, device=pos.device).reshape(-1, 1)  # (T, 1)
    neg_w = torch.sigmoid(t * neg.reshape(1, -1) + b).mean(1)                   # (T,)
    pos_w = torch.sigmoid(-(t * pos.reshape(1, -1) + b)).mean(1)                # (T,)
    return (batch - 1) * neg_w / pos_w.clamp_min(1e-300)


def gradient_balance(x: torch.Tensor, y: torch.Tensor, t: float, b: float, batch: int | None = None,
                     rows: int = 256, seed: int = 0) -> dict:
    """Share of the sigmoid loss's gradient (sum of |dL/dl|) that the positives carry, estimated on `rows` rows.

    x, y: (B, D) L2-normalised embeddings of one batch (the local slice under DDP: pass the global `batch`).
    """
    batch = batch or len(x)
    pos, neg = sampled_cosines(x, y, rows, seed)
    ratio = float(balance_ratio(pos, neg, t, b, batch)[0])
    return {"pos_grad_share": 1.0 / (1.0 + ratio), "neg_pos_grad_ratio": ratio}


def suggest(pos: torch.Tensor, neg: torch.Tensor, t: float, b: float, batch: int) -> tuple[float | None, float]:
    """The t to try: the smallest t >= the current one that brings the ratio to <= 1, else the t <= 100
    with the lowest ratio if that at least halves it, else None (a larger t cannot help: the cosines do
    not separate positives from negatives yet). And the b that balances at the current t (negatives sit
    in sigmoid's exp tail, so moving b by -log ratio divides their weight by the ratio)."""
    ratios = balance_ratio(pos, neg, SCALES, b, batch)
    ratio_now = float(balance_ratio(pos, neg, t, b, batch)[0])
    above = SCALES >= t
    ok = above & (ratios <= 1)
    if ok.any():
        t_new = float(SCALES[ok][0])
    elif above.any() and float(ratios[above].min()) <= ratio_now / 2:
        t_new = float(SCALES[above][ratios[above].argmin()])
    else:
        t_new = None
    return t_new, b - math.log(max(ratio_now, 1.0))


class GradientBalance:
    """Logs pos_grad_share every call and warns once when negatives carry more than `threshold` times
    the positives' gradient, naming the t (or b) to try. Only the sigmoid losses have this failure mode."""

    def __init__(self, batch: int, loss: str = "sigmoid", threshold: float = 10.0, rows: int = 256, every: int = 1):
        self.batch, self.threshold, self.rows, self.every = batch, threshold, rows, every
        self.enabled = loss in ("sigmoid", "multi-positive")
        self.warned = False
        self.message: str | None = None

    def __call__(self, x: torch.Tensor, y: torch.Tensor, t: float, b: float, step: int) -> dict:
        if not self.enabled or step % self.every:
            return {}
        pos, neg = sampled_cosines(x.detach(), y.detach(), self.rows, seed=step)
        ratio = float(balance_ratio(pos, neg, t, b, self.batch)[0])
        if ratio > self.threshold and not self.warned:
            t_new, b_new = suggest(pos, neg, t, b, self.batch)
            fix = (f"try --init-scale {t_new:.0f} (t grows with the batch)" if t_new is not None
                   else "no t <= 100 balances it") + f", or --init-bias {b_new:.1f}"
            self.message = (f"step {step}: negatives carry {100 * ratio / (1 + ratio):.1f}% of the gradient "
                            f"({ratio:.1f}x the positives at batch {self.batch}, t={t:.1f}, b={b:.2f}); sigmoid "
                            f"training tends to collapse here: {fix}")
            from tqdm.auto import tqdm

            tqdm.write(f"warning: {self.message}", file=sys.stderr)
            self.warned = True
        return {"pos_grad_share": 1.0 / (1.0 + ratio)}
