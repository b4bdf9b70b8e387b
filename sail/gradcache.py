"""One contrastive training step of a two-tower model, optionally in micro-batches that keep every negative
(GradCache, Gao et al. 2021).

    loss, logs = contrastive_backward(model, pixels, input_ids, attention_mask, loss_fn, accum_steps=4)
    optimizer.step()

`model(pixels, input_ids, attention_mask) -> (x (B, D), y (C*B, D), scale)` (scale: the temperature t) (sail.towers.Towers, or DDP around it);
the texts are C columns stacked column-major: rows [c*B, (c+1)*B) are column c. `loss_fn(x, y, scale) -> (loss, logs)`
sees the WHOLE batch (B images, C*B texts) whatever `accum_steps` is.

accum_steps = 1: one forward with graph, loss, backward.
accum_steps = k > 1, memory O(B/k) for the towers:
  1. embed each micro-batch without graph (remembering the RNG state before each, and leaving BatchNorm's
     running statistics as they were), cache the embeddings;
  2. loss on the cached whole batch with the embeddings (and scale) as leaves: backward gives dL/dx, dL/dy, dL/dscale;
  3. re-run each micro-batch with graph from its saved RNG state (same dropout masks) and backward
     sum(x_j * dL/dx_j) + sum(y_j * dL/dy_j) (+ scale * dL/dscale once): by the chain rule exactly the big step's
     parameter gradient. Under DDP gradients are synchronised on the last micro-batch only (no_sync).
Equal to the one big step up to float rounding for models without BatchNorm; BatchNorm normalises each
micro-batch with its own statistics (as each rank does under DDP without SyncBatchNorm).
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn

from sail.errors import SailError


def _rng_state(device: torch.device) -> tuple:
    return torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def _set_rng_state(state: tuple, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def _batchnorm_buffers(model: nn.Module) -> list[torch.Tensor]:
    return [b for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) for b in m.buffers()]


# ~60 lines on purpose: the three passes share the micro-batch rows, RNG states and cached gradients.
def contrastive_backward(model: nn.Module, pixels: torch.Tensor, input_ids: torch.Tensor,
                         attention_mask: torch.Tensor, loss_fn, accum_steps: int = 1,
                         autocast=nullcontext) -> tuple[torch.Tensor, dict]:
    """Forward + backward of one step (see the module doc); returns (detached loss, loss_fn's logs).
    Gradients are accumulated into the parameters' .grad; zero them before."""
    if isinstance(accum_steps, bool) or not isinstance(accum_steps, int) or accum_steps < 1:
        raise SailError(f"accum_steps must be a positive integer, got {accum_steps!r}")
    b = pixels.shape[0]
    if input_ids.shape[0] % b:
        raise ValueError(f"{input_ids.shape[0]} texts for {b} images: texts must be whole columns of B")
    if accum_steps <= 1:
        with autocast():
            x, y, scale = model(pixels, input_ids, attention_mask)
        loss, logs = loss_fn(x, y, scale)
        loss.backward()
        return loss.detach(), logs
    columns = input_ids.shape[0] // b
    chunks = [c for c in torch.arange(b, device=pixels.device).tensor_split(accum_steps) if len(c)]
    # text rows of micro-batch j: its images' rows in every column, column-major like the whole batch
    text_rows = [torch.cat([c + k * b for k in range(columns)]) for c in chunks]

    # 1. embeddings without graph; BatchNorm running statistics restored afterwards (pass 3 updates them once)
    buffers = [buf.clone() for buf in _batchnorm_buffers(model)]
    states, xs, ys = [], [], []
    with torch.no_grad():
        for c, rows in zip(chunks, text_rows):
            states.append(_rng_state(pixels.device))
            with autocast():
                x, y, scale = model(pixels[c], input_ids[rows], attention_mask[rows])
            xs.append(x)
            ys.append(y)
    for saved, live in zip(buffers, _batchnorm_buffers(model)):
        live.copy_(saved)
    after = _rng_state(pixels.device)

    # 2. the loss on the whole batch; gradients with respect to the cached embeddings and the scale
    x_all = torch.cat(xs).requires_grad_()                                   # (B, D)
    y_all = torch.empty(input_ids.shape[0], ys[0].shape[1], dtype=ys[0].dtype, device=x_all.device)
    for rows, y in zip(text_rows, ys):
        y_all[rows] = y                                                       # back to column-major (C*B, D)
    y_all.requires_grad_()
    scale_leaf = scale.detach().requires_grad_()
    loss, logs = loss_fn(x_all, y_all, scale_leaf)
    loss.backward()
    grad_x, grad_y, grad_scale = x_all.grad, y_all.grad, scale_leaf.grad

    # 3. re-run each micro-batch with graph and push the cached gradients through it
    last = len(chunks) - 1
    for j, (c, rows, state) in enumerate(zip(chunks, text_rows, states)):
        _set_rng_state(state, pixels.device)
        sync = model.no_sync() if j < last and hasattr(model, "no_sync") else nullcontext()
        with sync:
            with autocast():
                x, y, scale = model(pixels[c], input_ids[rows], attention_mask[rows])
            surrogate = (x * grad_x[c]).sum() + (y * grad_y[rows]).sum()  # towers return float32 under autocast
            if j == last:  # the scale's gradient once; under DDP every parameter then takes part in the synced backward
                surrogate = surrogate + (scale * grad_scale).sum()
            surrogate.backward()
    _set_rng_state(after, pixels.device)
    return loss.detach(), logs
