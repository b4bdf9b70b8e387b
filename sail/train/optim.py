"""Optimizers and learning-rate schedules used by the alignment recipes.

    Lion   (Chen et al. 2023)  SAIL paper: lr 1e-5, betas (0.9, 0.99), wd 1e-7, cosine schedule
    LAMB   (You et al. 2019)   ALIGN: lr 1e-3, wd 1e-5, linear warmup then linear decay
    AdamW  (torch)             ALIP: lr 1e-3, wd 0.2, betas (0.9, 0.98), OneCycleLR

    opt = build_optimizer("lion", heads.param_groups(weight_decay=1e-7), lr=1e-5, weight_decay=1e-7)
    sched = cosine_with_warmup(opt, total_steps=10_000, warmup_steps=1_000)
    for batch in batches:
        loss.backward(); opt.step(); sched.step(); opt.zero_grad(); heads.clamp_()

Weight decay is decoupled in both custom optimizers (AdamW style: it scales with the current lr and is not
fed through the moments). Schedules are LambdaLR multipliers of each group's base lr, stepped once per
optimizer step; `optimizer.state_dict()` and `scheduler.state_dict()` resume exactly.
"""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR, OneCycleLR

from sail.core.errors import SailError

OPTIMIZERS = ("lion", "adamw", "lamb")
# eps of AdamW / LAMB when build_optimizer is not given one. With the loss averaged over all B^2 pairs
# (SAIL) the heads' parameter gradients are ~1e-9 .. 1e-8 at B = 36864 (benchmarks/align_step.py prints
# them), so sqrt(v) ~ |g| sits at torch's 1e-8 and eps would shrink Adam's step m / (sqrt(v) + eps) by 2x
# or more. 1e-12 keeps the step at ~lr for gradients down to ~1e-11 and still guards v = 0.
# Lion (the default) divides by nothing and is unaffected. Recipes averaging over B pass their own eps.
DEFAULT_EPS = 1e-12


def _check_hparams(name: str, lr: float, betas: tuple[float, float], weight_decay: float, eps: float = 0.0):
    if not lr >= 0:
        raise SailError(f"{name}: lr must be >= 0, got {lr}")
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise SailError(f"{name}: betas must be two numbers in [0, 1), got {betas}")
    if not weight_decay >= 0:
        raise SailError(f"{name}: weight_decay must be >= 0, got {weight_decay}")
    if not eps >= 0:
        raise SailError(f"{name}: eps must be >= 0, got {eps}")


def _closure_loss(closure):
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def _with_grads(group: dict, state: dict, name: str, init) -> dict:
    """The group's parameters that have a gradient, bucketed by (device, dtype) for the foreach kernels:
    {(device, dtype): (params, grads, states)}. `init(p)` fills a parameter's state on its first step."""
    buckets: dict = {}
    for p in group["params"]:
        if p.grad is None:
            continue
        if p.grad.is_sparse:
            raise SailError(f"{name} does not support sparse gradients")
        if not state[p]:
            state[p].update(init(p))
        params, grads, states = buckets.setdefault((p.device, p.dtype), ([], [], []))
        params.append(p)
        grads.append(p.grad)
        states.append(state[p])
    return buckets


class Lion(torch.optim.Optimizer):
    """Lion: p <- p - lr * (sign(b1*m + (1-b1)*g) + wd*p), then m <- b2*m + (1-b2)*g.

    One torch._foreach_* kernel per operation over all tensors of a (device, dtype) bucket, instead of a
    Python loop with ~5 launches per tensor (towers have hundreds of tensors)."""

    def __init__(self, params, lr: float = 1e-5, betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 1e-7):
        _check_hparams("Lion", lr, betas, weight_decay)
        super().__init__(params, dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = _closure_loss(closure)
        for group in self.param_groups:
            lr, wd = group["lr"], group["weight_decay"]
            beta1, beta2 = group["betas"]
            init = lambda p: {"exp_avg": torch.zeros_like(p)}  # noqa: E731
            for params, grads, states in _with_grads(group, self.state, "Lion", init).values():
                ms = [st["exp_avg"] for st in states]
                update = torch._foreach_mul(ms, beta1)  # interpolation uses the OLD momentum
                torch._foreach_add_(update, grads, alpha=1 - beta1)
                torch._foreach_sign_(update)
                torch._foreach_mul_(params, 1 - lr * wd)  # decoupled decay: same as p -= lr * wd * p
                torch._foreach_add_(params, update, alpha=-lr)
                torch._foreach_mul_(ms, beta2)
                torch._foreach_add_(ms, grads, alpha=1 - beta2)
        return loss


class LAMB(torch.optim.Optimizer):
    """LAMB: Adam direction r = m_hat / (sqrt(v_hat) + eps) + wd*p, scaled per tensor by ||p|| / ||r||.

    Vectorised like Lion: foreach kernels per (device, dtype) bucket, the per-tensor norms from one
    torch._foreach_norm each, the trust ratios computed on the stacked norms (no host sync)."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 1e-5):
        _check_hparams("LAMB", lr, betas, weight_decay, eps)
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = _closure_loss(closure)
        for group in self.param_groups:
            lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
            beta1, beta2 = group["betas"]
            init = lambda p: {"step": 0, "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}  # noqa: E731
            for params, grads, states in _with_grads(group, self.state, "LAMB", init).values():
                for st in states:
                    st["step"] += 1  # a Python int per tensor (checkpoints store it in JSON)
                ms, vs = [st["exp_avg"] for st in states], [st["exp_avg_sq"] for st in states]
                torch._foreach_mul_(ms, beta1)
                torch._foreach_add_(ms, grads, alpha=1 - beta1)
                torch._foreach_mul_(vs, beta2)
                torch._foreach_addcmul_(vs, grads, grads, value=1 - beta2)
                m_hat = torch._foreach_div(ms, [1 - beta1 ** st["step"] for st in states])
                denom = torch._foreach_div(vs, [1 - beta2 ** st["step"] for st in states])  # v_hat
                torch._foreach_sqrt_(denom)
                torch._foreach_add_(denom, eps)
                r = torch._foreach_div(m_hat, denom)
                if wd != 0:
                    torch._foreach_add_(r, params, alpha=wd)
                # Trust ratio per tensor; 1 when either norm is 0 (fresh zero-init biases, zero updates).
                p_norm, r_norm = torch.stack(torch._foreach_norm(params)), torch.stack(torch._foreach_norm(r))
                trust = torch.where((p_norm > 0) & (r_norm > 0), p_norm / r_norm, torch.ones_like(p_norm))
                torch._foreach_mul_(r, list((trust * -lr).unbind()))
                torch._foreach_add_(params, r)
        return loss


def build_optimizer(name: str, param_groups, lr: float, weight_decay: float, betas=None, eps=None):
    """"lion" | "adamw" | "lamb". `weight_decay` fills groups that do not set their own (see
    AlignmentHeads.param_groups). betas default to each optimizer's usual values, eps to DEFAULT_EPS
    (1e-12, small enough for B^2-normalised gradients; see above); Lion has no eps and ignores it."""
    key = str(name).lower()
    if key not in OPTIMIZERS:
        raise SailError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
    if key == "lion":
        return Lion(param_groups, lr=lr, betas=tuple(betas) if betas else (0.9, 0.99), weight_decay=weight_decay)
    if key == "lamb":
        return LAMB(param_groups, lr=lr, betas=tuple(betas) if betas else (0.9, 0.999),
                    eps=DEFAULT_EPS if eps is None else eps, weight_decay=weight_decay)
    betas = tuple(betas) if betas else (0.9, 0.999)
    eps = DEFAULT_EPS if eps is None else eps
    _check_hparams("AdamW", lr, betas, weight_decay, eps)
    return torch.optim.AdamW(param_groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


# ---------------------------------------------------------------------- schedules
def _check_steps(total_steps: int, warmup_steps: int):
    if total_steps < 1:
        raise SailError(f"total_steps must be >= 1, got {total_steps}")
    if not 0 <= warmup_steps <= total_steps:
        raise SailError(f"warmup_steps must be in [0, total_steps={total_steps}], got {warmup_steps}")


def _warmup(step: int, warmup_steps: int) -> float:
    # (step + 1) / warmup: the very first step already moves (lr/warmup), and step warmup-1 reaches 1.
    return (step + 1) / warmup_steps


def cosine_with_warmup(optimizer, total_steps: int, warmup_steps: int, min_ratio: float = 0.0) -> LambdaLR:
    """Multiplier: linear warmup 1/warmup .. 1 over `warmup_steps`, then cosine from 1 at step
    `warmup_steps` to `min_ratio` at `total_steps` (held there afterwards)."""
    _check_steps(total_steps, warmup_steps)
    if not 0.0 <= min_ratio <= 1.0:
        raise SailError(f"min_ratio must be in [0, 1], got {min_ratio}")
    decay_steps = max(1, total_steps - warmup_steps)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return _warmup(step, warmup_steps)
        progress = min(1.0, (step - warmup_steps) / decay_steps)
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)


def linear_warmup_decay(optimizer, total_steps: int, warmup_steps: int) -> LambdaLR:
    """ALIGN schedule. Multiplier: linear warmup to 1 at step `warmup_steps`, then linear decay to 0 at
    `total_steps` (held at 0 afterwards)."""
    _check_steps(total_steps, warmup_steps)
    decay_steps = max(1, total_steps - warmup_steps)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return _warmup(step, warmup_steps)
        return max(0.0, (total_steps - step) / decay_steps)

    return LambdaLR(optimizer, factor)


def one_cycle(optimizer, max_lr: float, total_steps: int, pct_start: float = 0.1,
              cycle_momentum: bool = False) -> OneCycleLR:
    """ALIP schedule: torch OneCycleLR (cosine annealing up to max_lr then down). Momentum cycling is off
    by default so the betas you chose (ALIP: (0.9, 0.98)) stay as given."""
    _check_steps(total_steps, 0)
    if not 0.0 < pct_start < 1.0:
        raise SailError(f"pct_start must be in (0, 1), got {pct_start}")
    return OneCycleLR(optimizer, max_lr=max_lr, total_steps=total_steps, pct_start=pct_start,
                      cycle_momentum=cycle_momentum)
