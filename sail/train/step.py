"""The one training step of sail (GradCache): one algorithm, `gradcache`, behind `train_step` for heads on cached
features (`sail align`) and `contrastive_backward` for towers with trainable encoders (the recipes); one gradient
sync for both (`all_reduce_gradients`).

    from sail.train.step import train_step
    opt.zero_grad(set_to_none=True)
    stats = train_step(heads, image, texts, loss_fn, precision=prec, chunk_size=None, scaler=scaler)
    scaler.step(opt); scaler.update(); heads.clamp_()      # or opt.step() when no loss scaling
    # stats: (5,) device tensor [loss, t, b, mean positive cosine, mean negative cosine]; no host sync

Why. Autograd through the heads keeps every activation of the whole batch: a GLU head at width 4 keeps
~(B x 4 x 8192) floats, ~10 GB at B = 36864 (fp32) and ~190 GB at B = 1M (bf16), while the loss itself
needs O(B*D).
The step runs in three passes (Gao et al. 2021, "GradCache"):
1. the heads forward over chunks of rows without autograd -> embeddings x, y_k: (B, D) each;
2. the loss once on the whole batch, on detached copies that require grad; sail.train.losses computes the
   embeddings' gradients blockwise in its forward, backward fills x.grad, y_k.grad (B, D) and the t, b grads;
3. each chunk again WITH autograd (LayerNorm, head, L2-normalise), then backward with its rows of the
   embedding gradients: torch.autograd.backward([x_c, y_c...], [gx_c, gy_c...]). Parameter gradients
   accumulate over chunks. The chunk forward is the same code as pass 1, so the result equals the
   unchunked step up to float rounding (tests/test_step.py checks it in float64 for every head x loss).
Peak memory: parameters + features + the larger of the loss phase (embeddings and the loss's O(B*D)
buffers) and the chunk phase (the embeddings' gradients and one chunk's activations): the embeddings
are freed once the loss has their gradients. See `memory_model` (printed by benchmarks/align_step.py).

Under torch.distributed each rank passes its LOCAL rows; the losses gather the other ranks' embeddings as
negatives and follow the convention in sail.train.losses (local embedding gradients are world x the
single-process ones), so after the chunks the parameter gradients are averaged over ranks with one
all-reduce per parameter. This replaces DDP: DDP's reducer cannot see gradients accumulated over several
backward calls outside its forward, and it raises on parameters that get no gradient (the bias b under
info-nce). Here a parameter without a gradient has none on every rank and is simply skipped. The ranks
start from the same weights (same seed or the same checkpoint; `broadcast_parameters` makes sure).

Precision (sail.core.precision): the heads run under `precision.autocast()`; the embeddings reach the loss in
the dtype the heads produce (bf16 under bf16 autocast, float64 for float64 heads), except fp16, which is
upcast to float32 (fp16 cannot hold the B^2-normalised gradients; see sail.train.losses). With fp16 the loss
is multiplied by the GradScaler's scale before backward, so the chunk backward sees scaled gradients.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from typing import Callable, Sequence

import torch
import torch.distributed as dist
from torch import nn

from sail.core.errors import SailError
from sail.core.precision import Precision

CHUNK_CAP = {"cuda": 32768, "cpu": 4096}  # rows past which a bigger chunk no longer speeds the matmuls up
MEMORY_FRACTION = 0.25  # share of the free memory one chunk's activations may take


# ------------------------------------------------------------------------------------------ chunk size


def activation_bytes_per_row(heads: nn.Module, elem_bytes: int = 4) -> int:
    """Bytes autograd keeps per row for both heads: every Linear's input and output (LayerNorm, activation,
    gating and normalisation add about as much again, hence the factor 2)."""
    dims = sum(m.in_features + m.out_features for m in heads.modules() if isinstance(m, nn.Linear))
    return 2 * dims * elem_bytes


def free_memory(device: torch.device) -> int:
    """Free bytes on the device: cudaMemGetInfo on CUDA, MemAvailable from /proc/meminfo on CPU."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def auto_chunk_size(heads: nn.Module, rows: int, device: torch.device, free: int | None = None) -> int:
    """Rows per chunk: what fits in MEMORY_FRACTION of the free memory, at most CHUNK_CAP, at most `rows`."""
    free = free_memory(device) if free is None else free
    fit = int(MEMORY_FRACTION * free) // activation_bytes_per_row(heads)
    return max(1, min(rows, CHUNK_CAP.get(device.type, 4096), max(64, fit)))


def chunks(n: int, size: int) -> list[slice]:
    """Consecutive row slices of at most `size` rows covering range(n)."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise SailError(f"--chunk-size must be a positive number of rows, got {size!r}")
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


# ------------------------------------------------------------------------------------------ the step


def _embed(heads, image: torch.Tensor, texts: Sequence[torch.Tensor], prec: Precision) -> list[torch.Tensor]:
    """[x, y_1, .., y_K] for one chunk of rows: LayerNorm, head, L2-normalise (as AlignmentHeads does)."""
    with prec.autocast():
        out = [heads.encode_image(image)] + [heads.encode_text(text) for text in texts]
    if prec.name == "bf16":
        # CUDA autocast runs F.normalize's norm in float32, so the embeddings come out float32 there (bf16 on
        # CPU): cast them, so the loss's three B^2 D matmuls run in bf16 (2x faster, half the memory for G)
        return [e.to(torch.bfloat16) for e in out]
    # fp16 embeddings go to the loss as float32: its gradients (~1e-10 at B^2 normalisation) underflow fp16
    return [e.float() if e.dtype == torch.float16 else e for e in out]


def gradcache(embed: Callable, chunks: Sequence, rows: Callable, loss_on: Callable, *, backward: Callable = None,
              after_loss: Callable | None = None, replay: nn.Module | None = None, device: torch.device | None = None):
    """The one GradCache algorithm (module doc) behind both steps: heads on cached features and trainable towers.

    embed(chunk) -> (embeddings, extras): the chunk's embeddings [e_1 .. e_M] and any extra outputs whose gradient
    is taken once (the towers' scale); rows(chunk) -> for each embedding, the rows of the whole batch it fills
    (a slice or an index tensor). loss_on(leaves, extra_leaves) -> the scalar loss of the WHOLE batch, on leaves
    that require grad; backward(loss) differentiates it (default loss.backward(); the GradScaler scales first).
    after_loss(embeddings, loss): called once the loss has their gradients, before pass 3 frees the embeddings
    (statistics, probes); loss is detached.
    replay: a module with dropout or BatchNorm: pass 3 replays each chunk's RNG state (same dropout masks) and the
    BatchNorm running statistics pass 1 touched are restored, so pass 3 updates them once. Returns the loss, detached.
    """
    # pass 1: embeddings without autograd, written into whole-batch buffers (no torch.cat copy)
    buffers = [buf.clone() for buf in _batchnorm_buffers(replay)] if replay is not None else []
    states, emb, extras = [], None, []
    with torch.no_grad():
        for chunk in chunks:
            if replay is not None:
                states.append(_rng_state(device))
            out, extras = embed(chunk)
            where = rows(chunk)
            if emb is None:
                emb = [torch.empty((_rows_total(chunks, rows, m), e.shape[1]), dtype=e.dtype, device=e.device)
                       for m, e in enumerate(out)]
            for buf, r, e in zip(emb, where, out):
                buf[r] = e
    if replay is not None:
        for saved, live in zip(buffers, _batchnorm_buffers(replay)):
            live.copy_(saved)
        after = _rng_state(device)

    # pass 2: the loss once on the whole batch; backward leaves dL/d(embeddings) in .grad (and fills t, b)
    leaves = [e.requires_grad_(True) for e in emb]  # made under no_grad: leaves already
    extra_leaves = [x.detach().requires_grad_() for x in extras]
    loss = loss_on(leaves, extra_leaves)
    (backward or torch.Tensor.backward)(loss)
    loss = loss.detach()  # frees the graph and with it the loss's stored gradients
    grads, extra_grads = [e.grad for e in leaves], [x.grad for x in extra_leaves]
    if after_loss is not None:
        after_loss(emb, loss)
    del leaves, emb  # pass 3 needs only the embeddings' gradients

    # pass 3: each chunk again with autograd, backward with its rows of the gradients (the extras' once)
    last = len(chunks) - 1
    for j, chunk in enumerate(chunks):
        if replay is not None:
            _set_rng_state(states[j], device)
        out, extras = embed(chunk)
        used = [(o, g[r]) for o, g, r in zip(out, grads, rows(chunk)) if g is not None]  # an ignored caption set
        if j == last:
            used += [(x, g) for x, g in zip(extras, extra_grads) if g is not None]
        torch.autograd.backward([o for o, _ in used], [g for _, g in used])
        del out, used
    if replay is not None:
        _set_rng_state(after, device)
    return loss


def _rows_total(chunks, rows, m: int) -> int:
    """Rows of embedding m over the whole batch: what the chunks' row sets of it add up to."""
    total = 0
    for chunk in chunks:
        r = rows(chunk)[m]
        total += (r.stop - r.start) if isinstance(r, slice) else len(r)
    return total


def train_step(heads, image: torch.Tensor, texts: Sequence[torch.Tensor], loss_fn: Callable, *,
               precision: Precision, chunk_size: int | None = None, scaler: torch.amp.GradScaler | None = None,
               group=None, probe: Callable | None = None) -> torch.Tensor:
    """Forward + backward of one batch, gradients accumulated into the heads' .grad (zero them before).

    heads: AlignmentHeads (not DDP-wrapped). image: (n, image_dim), texts: K tensors (n, text_dim), this
    rank's rows. loss_fn(x, [y_1..y_K], scale, bias) -> scalar (scale: the temperature t), e.g. sail.train.losses.sigmoid_loss over the ys.
    chunk_size: rows per chunk of the head passes (None: auto_chunk_size). Returns the (5,) device tensor
    [loss, t, b, mean positive cosine, mean negative cosine] (detached; reading it is the only host sync).
    probe(x, y, scale, bias): optional, called once with the whole batch's embeddings (x and the first caption set,
    no autograd) and t, b as tensors, e.g. sail.train.stability.GradientBalance at log points; it may sync.
    """
    n = image.shape[0]
    if any(text.shape[0] != n for text in texts):
        raise SailError(f"image and text batches differ in rows: {n} vs {[text.shape[0] for text in texts]}")
    size = chunk_size if chunk_size is not None else auto_chunk_size(heads, n, image.device)
    scale, bias = heads.scale(), heads.logit_bias  # the temperature t and the bias b: parameters, in the loss
    stats = []

    def after_loss(emb, loss):
        stats.append(_stats(loss, scale, bias, emb[0], emb[1]))
        if probe is not None:
            probe(emb[0].detach(), emb[1].detach(), scale.detach(), bias.detach())

    gradcache(lambda sl: (_embed(heads, image[sl], [f[sl] for f in texts], precision), []), chunks(n, size),
              lambda sl: [sl] * (1 + len(texts)), lambda leaves, _: loss_fn(leaves[0], leaves[1:], scale, bias),
              after_loss=after_loss,
              backward=(lambda loss: scaler.scale(loss).backward()) if scaler is not None else None)
    all_reduce_gradients(heads, group)
    return stats[0]


@torch.no_grad()
def _stats(loss, scale, bias, x, y) -> torch.Tensor:
    """(5,) [loss, t, b, mean positive cosine, mean negative cosine] on the device, O(n*D)."""
    n = x.shape[0]
    dt = torch.promote_types(loss.dtype, torch.float32)  # float32, float64 for float64 heads
    pos = (x * y).sum(1, dtype=dt)  # (n,) cosine of each positive pair
    total = x.sum(0, dtype=dt) @ y.sum(0, dtype=dt)  # sum of all n^2 cosines, from the column sums
    neg = (total - pos.sum()) / max(1, n * n - n)
    return torch.stack([loss.to(dt), scale.detach().to(dt), bias.detach().to(dt), pos.mean(), neg])


# ------------------------------------------------------------------------------------------ trainable encoders
# The same three GradCache passes with the encoders in the graph (the recipes):
#     loss, logs = contrastive_backward(model, pixels, input_ids, attention_mask, loss_fn, accum_steps=4)
# model(pixels, input_ids, attention_mask) -> (x (B, D), y (C*B, D), scale) (sail.train.towers.Towers); the texts are
# C columns stacked column-major (rows [c*B, (c+1)*B) are column c); loss_fn(x, y, scale) -> (loss, logs) sees
# the WHOLE batch whatever accum_steps is. accum_steps = 1: one forward with graph, loss, backward.
# accum_steps = k > 1 (memory O(B/k) for the towers): 1. each micro-batch embedded without graph,
# remembering the RNG state before each and leaving BatchNorm's running statistics as they were; 2. the loss
# on the cached whole batch (embeddings and scale as leaves) gives dL/dx, dL/dy, dL/dscale; 3. each
# micro-batch again with graph from its saved RNG state (same dropout masks), backward with its rows of
# dL/dx, dL/dy (and dL/dscale once): the big step's gradient by the chain rule. These are `gradcache`'s three
# passes with `replay=model`. Then the one gradient sync of this module (all_reduce_gradients). Equal to the one big step up to
# float rounding without BatchNorm; BatchNorm normalises each micro-batch with its own statistics (as each
# rank does on CPU, where torch has no SyncBatchNorm).


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
    Gradients are accumulated into the parameters' .grad (zero them before) and, under torch.distributed,
    averaged over the ranks (all_reduce_gradients, as train_step)."""
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
        all_reduce_gradients(_unwrap(model))
        return loss.detach(), logs
    columns = input_ids.shape[0] // b
    # micro-batch j: its image rows c and its text rows, its images' rows in every column (column-major, like the
    # whole batch)
    micro = [(c, torch.cat([c + k * b for k in range(columns)]))
             for c in torch.arange(b, device=pixels.device).tensor_split(accum_steps) if len(c)]

    def embed(chunk):
        c, rows = chunk
        with autocast():
            x, y, scale = model(pixels[c], input_ids[rows], attention_mask[rows])
        return [x, y], [scale]

    logs = {}

    def loss_on(leaves, extra_leaves):
        loss, out = loss_fn(leaves[0], leaves[1], extra_leaves[0])
        logs.update(out)
        return loss

    loss = gradcache(embed, micro, lambda chunk: list(chunk), loss_on, replay=model, device=pixels.device)
    all_reduce_gradients(_unwrap(model))
    return loss, logs


# ------------------------------------------------------------------------------------------ distributed


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)  # a DDP wrapper a caller may still pass: its module's gradients


def _world(group) -> int:
    if group is None and not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def all_reduce_gradients(module: nn.Module, group=None) -> None:
    """Average every parameter's .grad over the ranks (a no-op in one process). Parameters without a
    gradient (b under info-nce) are skipped: they have none on every rank, the losses being global."""
    world = _world(group)
    if world == 1:
        return
    for p in module.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad, group=group)
            p.grad.div_(world)


def broadcast_parameters(module: nn.Module, group=None) -> None:
    """Make every rank start from rank 0's parameters (as DDP does at construction)."""
    if _world(group) == 1:
        return
    with torch.no_grad():
        for p in module.parameters():
            dist.broadcast(p.data, src=0, group=group)


# ------------------------------------------------------------------------------------------ memory model


def memory_model(heads: nn.Module, batch: int, *, captions: int = 1, chunk: int = 32768, feature_bytes: int = 2,
                 emb_bytes: int = 2, act_bytes: int = 2, block_bytes: int = 2**30, optimizer_states: int = 2) -> dict:
    """Estimated bytes of one step, per term, and the peak (defaults: a GPU run, fp16 features, bf16).

    features      the batch's frozen features, B (image_dim + K text_dim)
    embeddings    x, y_k: (K+1) B D in the embeddings' dtype (held through the loss, freed before pass 3)
    loss          the kernels' float32 gradient accumulators (K+1) B D, one bf16 (B, D) product buffer and
                  one (rows, B) block: similarities (bf16) + logits and softplus (fp32) = 2.5 x block_bytes;
                  then the stored gradients and .grad while backward hands them over: 2 (K+1) B D
    grads         the embeddings' gradients held through pass 3: (K+1) B D
    chunk         one chunk's activations in the heads (activation_bytes_per_row x chunk)
    parameters    weights + gradients + optimizer states, float32
    peak = parameters + features + max(embeddings + loss, grads + chunk): the two phases do not overlap.
    """
    d, k1 = heads.out_dim, captions + 1
    terms = {
        "features": batch * (heads.image_dim + captions * heads.text_dim) * feature_bytes,
        "embeddings": k1 * batch * d * emb_bytes,
        "loss": k1 * batch * d * 4 + batch * d * 2 + int(2.5 * block_bytes) + 2 * k1 * batch * d * emb_bytes,
        "grads": k1 * batch * d * emb_bytes,
        "chunk": activation_bytes_per_row(heads, act_bytes) * min(chunk, batch),
        "parameters": (2 + optimizer_states) * heads.num_parameters() * 4,
    }
    terms["peak"] = terms["parameters"] + terms["features"] + max(terms["embeddings"] + terms["loss"],
                                                                  terms["grads"] + terms["chunk"])
    return terms
