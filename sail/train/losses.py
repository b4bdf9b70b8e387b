"""Contrastive losses for alignment tuning, computed in blocks so the B x B logits never exist.

    from sail.train.losses import sigmoid_loss, multi_positive_loss, info_nce_loss, ConsistencyGates
    img = F.normalize(heads.vision(v), dim=-1)              # (B, D)
    txt = F.normalize(heads.text(w), dim=-1)                # (B, D)
    loss = sigmoid_loss(img, txt, heads.logit_scale.exp(), heads.logit_bias)
    loss.backward()

Formulas (x_i, y_j L2-normalised rows; l_ij = t x_i.y_j + b; z_ij = +1 if i == j else -1):
- sigmoid_loss:        L = (1/N) sum_ij softplus(-z_ij l_ij), N = B^2 ("pairs", SAIL) or B ("rows", SigLIP).
- multi_positive_loss: the same pairwise term for each of K caption sets, summed; N = K B^2 ("pairs",
                       the official SAIL code's mean over B x KB) or B ("rows", SAIL paper eq. 2).
- info_nce_loss:       l_i = (CE_i2t + CE_t2i) / 2 on logits t X Y^T (no bias), L = (1/B) sum_i w_i l_i.

How it is computed. Each loss is one torch.autograd.Function. Its forward walks over blocks of rows of X,
(rows, D) @ (D, B) -> (rows, B) logits, and accumulates the loss and, when any input requires grad, the
gradients for X, Y, t and b (O(B*D) memory). The backward only scales the stored gradients by grad_output.
The sigmoid losses do the same three matmuls as autograd on the plain formula (logits, G @ Y, G^T @ X);
info-nce needs one more (a first pass for the row and column log-sum-exps). Memory is O(B*D + B*rows):
by default a block holds BLOCK_BYTES of logits; `block_size=` sets the rows per block. Double backward
is not supported.

Dtypes (the inputs' dtype decides; autocast is switched off inside):
- float64: everything in float64 (the reference).
- float32: float32 matmuls and element-wise work.
- bfloat16: bf16 matmuls (the GEMM accumulates in fp32; each (rows, B) similarity block is rounded to bf16
  once), then logits, softplus / softmax, sigmoid and every sum in float32; the gradients accumulate in
  float32 and are returned in bf16 (same exponent range as fp32, so ~1e-10 gradients survive).
- float16: upcast to float32 and computed as float32. The gradients are kept in float32 until backward
  has multiplied them by grad_output, then cast to fp16: at B^2 normalisation they are ~3e-10 at
  B = 36864, 0 in fp16, so fp16 callers must scale the loss (torch.amp.GradScaler, see sail.core.precision).
The loss is returned in float64 for float64 inputs, float32 otherwise; gradients in the inputs' dtypes.

torch.distributed. When torch.distributed is initialised with more than one process (or `group=` names a
group), each rank passes its LOCAL batch (the same size on every rank) and the rows of all ranks serve as
negatives for each other (texts are all-gathered; partial text gradients are summed across ranks).
Convention:
- the returned loss is, on every rank, the single-process loss of the global batch (the ranks' batches
  concatenated in rank order);
- the gradient for a rank's local embeddings is world_size x the single-process gradient of those rows,
  and t and b get the full single-process gradient on every rank; so backward on every rank followed by
  DDP's gradient averaging gives exactly the single-process parameter gradients.
Each call checks that the ranks' batch sizes agree with one small all_gather read on the host: the only
host sync of a distributed training step (ranks whose sizes differ would otherwise hang in the gather).

ConsistencyGates are ALIP's per-sample weights for info_nce_loss(weights=...).
"""

import warnings

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from sail.core.errors import SailError
# the block and process-group pieces live below both losses and the Triton kernel, which share them
from sail.train.loss_blocks import BLOCK_BYTES, CUDA_BLOCK_BYTES, _gather_rows, _process_group, _rows_per_block, _sum_own_rows  # noqa: F401

AVERAGES = ("pairs", "rows")
IMPLS = ("auto", "torch", "triton")  # sigmoid / multi-positive: blockwise torch, or sail.train.triton_sigmoid


# ---------------------------------------------------------------------------------------------------
# autograd wrapper: gradients are computed in the forward pass, backward rescales them


def _apply(kernel, *inputs) -> torch.Tensor:
    """_StoredGradLoss on `inputs`; gradients are computed only when autograd will use them: under
    torch.no_grad() an input that requires grad would otherwise still pay for (and hold) its gradient."""
    if torch.is_grad_enabled():
        return _StoredGradLoss.apply(kernel, *inputs)
    return _StoredGradLoss.apply(lambda *args, want_grad: kernel(*args, want_grad=False), *inputs)


class _StoredGradLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, kernel, *inputs):
        # kernel(*inputs, want_grad) -> (scalar loss, list of gradients, None where not wanted).
        # Autocast off: the kernels choose their dtypes from the inputs' (see _matmul_dtype).
        with torch.autocast(inputs[0].device.type, enabled=False):
            loss, grads = kernel(*inputs, want_grad=any(ctx.needs_input_grad[1:]))
        # Stored in the input's dtype, except fp16: kept in fp32 until scaled by grad_output (see above).
        ctx.dtypes = [x.dtype for x in inputs]
        ctx.grads = [
            None if g is None or not need
            else g.to(x.device, torch.float32 if x.dtype == torch.float16 else x.dtype).reshape(x.shape)
            for g, x, need in zip(grads, inputs, ctx.needs_input_grad[1:])
        ]
        return loss.clone()  # not a view of the kernel's buffers

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        return (None, *[None if g is None else (g * grad_loss.to(g.dtype)).to(dt)
                        for g, dt in zip(ctx.grads, ctx.dtypes)])


# ---------------------------------------------------------------------------------------------------
# input checks and distributed helpers


def _check_pair(image, text, name="text"):
    if not isinstance(image, torch.Tensor) or not isinstance(text, torch.Tensor):
        raise SailError(f"image and {name} embeddings must be torch tensors")
    if image.ndim != 2 or image.shape != text.shape or image.shape[0] == 0:
        raise SailError(
            f"image and {name} embeddings must both be (B, D) with B >= 1, got {tuple(image.shape)} "
            f"and {tuple(text.shape)}"
        )


def _check_average(average):
    if average not in AVERAGES:
        raise SailError(f"average must be 'pairs' (SAIL, divide by B^2) or 'rows' (SigLIP), got {average!r}")


def _scalar(v, name):
    """t or b as a one-element tensor; a tensor is passed on as is so autograd sees it."""
    v = v if isinstance(v, torch.Tensor) else torch.tensor(float(v))
    if v.numel() != 1:
        raise SailError(f"{name} must be a scalar (one element), got shape {tuple(v.shape)}")
    return v


def _compute_dtype(x):
    """Element-wise dtype for embeddings of x's dtype: float64 stays float64, everything else is float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _matmul_dtype(x):
    """Matmul dtype: bf16 embeddings keep bf16 matmuls (fp32 accumulation inside the GEMM); fp16 is upcast
    to float32 (its 5-bit exponent cannot hold the B^2-normalised gradient terms); float32 / float64 stay."""
    return torch.bfloat16 if x.dtype == torch.bfloat16 else _compute_dtype(x)


def _matvec(a, v, step=8192):
    """(n,) = a @ v with v in the element-wise dtype; bf16 rows of a are upcast a slice at a time."""
    out = torch.empty(a.shape[0], dtype=v.dtype, device=a.device)
    for i in range(0, a.shape[0], step):
        out[i : i + step] = a[i : i + step].to(v.dtype) @ v
    return out


class _BlockGrads:
    """G @ Y rows and G^T @ X accumulation for (rows, m) blocks G held in the element-wise dtype.

    Same dtype as the embeddings: one mm into the output rows and one addmm into the accumulator. bf16
    embeddings: G is rounded to bf16 (into the block's similarity buffer) so both products are bf16 matmuls
    with fp32 accumulation inside the GEMM; each block's product is rounded to bf16 once and then added
    to the float32 outputs, so the sum over blocks is float32.
    """

    def __init__(self, x, y, rows, edt):
        self.low = x.dtype != edt
        if self.low:
            self.gx_tmp = x.new_empty((rows, x.shape[1]))  # (rows, D) bf16
            self.gy_tmp = y.new_empty(y.shape)  # (m, D) bf16

    def __call__(self, g, g_low, x_blk, y, gx_rows, gy):
        if not self.low:
            torch.mm(g, y, out=gx_rows)  # (rows, m) @ (m, D) -> (rows, D)
            gy.addmm_(g.T, x_blk)  # (m, rows) @ (rows, D) -> (m, D)
            return
        g_low.copy_(g)
        gx_rows.copy_(torch.mm(g_low, y, out=self.gx_tmp[: g.shape[0]]))
        gy.add_(torch.mm(g_low.T, x_blk, out=self.gy_tmp))


# ---------------------------------------------------------------------------------------------------
# sigmoid (SigLIP / SAIL) and multi-positive


def _sigmoid_sums(x, y, t, b, rows, want_grad, diag):
    """Blockwise sums over all pairs (rows of x) x (rows of y), l = t x y^T + b, z = +1 on the positives.

    Row i of x is positive with row diag + i of y (diag: this rank's first global row). Returns
    sum_ij softplus(-z_ij l_ij) and, when want_grad, G @ y (n, D), G^T @ x (m, D), sum_ij G_ij s_ij and
    sum_ij G_ij with G = sigmoid(l) - I (s = x y^T). x, y are in the matmul dtype, t, b in the element-wise
    dtype edt (see _matmul_dtype): the similarity block comes out of the matmul in x's dtype; logits,
    softplus, sigmoid, the positives' -1 and all sums are in edt, before G is rounded for the matmuls (so
    G_ii = P_ii - 1 ~ -1e-3 keeps its precision, and the positives' softplus(-l) is not a difference).
    """
    n, m, d = x.shape[0], y.shape[0], x.shape[1]
    edt = t.dtype
    grads = _BlockGrads(x, y, rows, edt)
    t1, b1 = t.reshape(1), b.reshape(1)  # 1-d: they take part in type promotion, so l = t s + b is in edt
    loss = x.new_zeros((), dtype=edt)
    p_sum = x.new_zeros((), dtype=edt)
    gs_sum = x.new_zeros((), dtype=edt)
    gx = x.new_empty((n, d), dtype=edt) if want_grad else None
    gy = x.new_zeros((m, d), dtype=edt) if want_grad else None
    # reused so big blocks are not re-allocated (and page-faulted) each step
    s_buf = x.new_empty((rows, m))  # similarities in the matmul dtype
    l_buf = x.new_empty((rows, m), dtype=edt) if grads.low else s_buf  # logits, then G, in edt
    tmp = x.new_empty((rows, m), dtype=edt)
    zero = x.new_zeros((), dtype=edt)
    for r0 in range(0, n, rows):
        r1 = min(r0 + rows, n)
        s, l = s_buf[: r1 - r0], l_buf[: r1 - r0]
        torch.mm(x[r0:r1], y.T, out=s)  # (rows, D) @ (D, m) -> (rows, m) cosine similarities
        torch.addcmul(b1, s, t1, out=l)  # logits t s + b, one pass
        l_pos = l[:, diag + r0 : diag + r1].diagonal()  # (rows,) view: the positives' logits
        sp = torch.logaddexp(l, zero, out=tmp[: r1 - r0])  # softplus(l) for the negatives ...
        sp[:, diag + r0 : diag + r1].diagonal().copy_(torch.logaddexp(-l_pos, zero))  # ... softplus(-l) for +
        loss += sp.sum()
        if want_grad:
            l.sigmoid_()  # P block, in place
            p_sum += l.sum()
            l_pos.sub_(1)  # G = P - I
            grads(l, s, x[r0:r1], y, gx[r0:r1], gy)
            # sum_ij G_ij x_i.y_j = sum_i x_i . (G y)_i: no extra B x B pass, and no (B, D) temporary
            gs_sum += (gx[r0:r1] * x[r0:r1]).sum()  # (rows, D), still in cache
    if not want_grad:
        return loss, None, None, None, None
    return loss, gx, gy, gs_sum, p_sum - n


def _multi_positive_kernel(image, t_in, b_in, *texts, average, block_size, group, want_grad):
    cdt, mdt = _compute_dtype(image), _matmul_dtype(image)
    x = image.detach().to(mdt)
    t = t_in.detach().to(x.device, cdt).reshape(())
    b = b_in.detach().to(x.device, cdt).reshape(())
    n, k = x.shape[0], len(texts)
    group = _process_group(group, n, x.device)
    world = 1 if group is None else dist.get_world_size(group)
    m = n * world  # global batch
    norm = k * m * m if average == "pairs" else m
    rows = _rows_per_block(block_size, n, m, t.element_size(), x.device)

    # [loss, sum_ij G_ij s_ij, sum_ij G_ij] with G = P - I summed over the K caption sets
    sums = x.new_zeros(3, dtype=cdt)
    gx, gys = None, []
    for text in texts:
        y = text.detach().to(mdt)
        y_all = y if group is None else _gather_rows(y, group)
        r = 0 if group is None else dist.get_rank(group)
        loss, gx_k, gy, gs_sum, g_sum = _sigmoid_sums(x, y_all, t, b, rows, want_grad, diag=r * n)
        sums[0] += loss
        if not want_grad:
            continue
        gx = gx_k if gx is None else gx.add_(gx_k)
        gys.append(gy if group is None else _sum_own_rows(gy, n, group))
        sums[1] += gs_sum
        sums[2] += g_sum
    if group is not None:
        dist.all_reduce(sums, group=group)
    sums /= norm
    if not want_grad:
        return sums[0], [None] * (3 + k)
    scale = t * world / norm  # dL/dx = t G y / N; x world for DDP's averaging (see module docstring)
    return sums[0], [gx.mul_(scale), sums[1], sums[2], *[gy.mul_(scale) for gy in gys]]


def sigmoid_loss(image, text, t, b, average="pairs", block_size=None, group=None, impl="auto"):
    """SigLIP loss -(1/N) sum_ij log sigmoid(z_ij (t x_i.y_j + b)), computed blockwise.

    image, text: (B, D) L2-normalised; t: exponentiated scale, b: bias (scalar tensors, may require grad).
    average: "pairs" -> N = B^2 (SAIL, default), "rows" -> N = B (SigLIP). block_size: rows per block.
    group: torch.distributed group; by default the world group when initialised (see module docstring).
    impl: "torch" (blockwise), "triton" (fused GPU kernel, sail.train.triton_sigmoid) or "auto" (triton for
    bf16 / fp16 / fp32 CUDA tensors when triton imports, torch otherwise).
    """
    _check_pair(image, text)
    return multi_positive_loss(image, [text], t, b, average=average, block_size=block_size, group=group,
                               impl=impl)


_WARNED: set = set()  # self-check failures already reported


def _pick_kernel(impl, image):
    """The multi-positive kernel impl names: sail.train.triton_sigmoid's fused one or the blockwise torch one."""
    if impl not in IMPLS:
        raise SailError(f"impl must be one of {', '.join(IMPLS)}, got {impl!r}")
    if impl == "torch" or (impl == "auto" and not (image.is_cuda and image.dtype != torch.float64)):
        return _multi_positive_kernel
    try:
        import sail.train.triton_sigmoid as triton_sigmoid  # optional: needs the triton package
    except ImportError as e:
        if impl == "auto":
            return _multi_positive_kernel
        raise SailError(f"impl='triton' needs the triton package ({e}); pip install 'sail[triton]' "
                        "(torch's CUDA wheels ship it) or use impl='torch'") from None
    if impl == "triton":
        triton_sigmoid.check_inputs(image)
    if image.numel() == 0:  # check_impl's probe: nothing to verify yet
        return triton_sigmoid.multi_positive_kernel
    why = triton_sigmoid.self_check(image.device, image.dtype)  # once per (device, dtype)
    if why is None:
        return triton_sigmoid.multi_positive_kernel
    if impl == "triton":
        raise SailError(f"impl='triton': {why}; use impl='torch' (and please report the GPU and triton version)")
    if why not in _WARNED:
        _WARNED.add(why)
        warnings.warn(f"impl='auto' uses the torch sigmoid loss: {why}", stacklevel=3)
    return _multi_positive_kernel


def check_impl(impl, device):
    """Raise SailError now if the sigmoid losses cannot run impl on device (for up-front CLI checks)."""
    _pick_kernel(impl, torch.empty(0, device=device))


def multi_positive_loss(image, texts, t, b, average="pairs", block_size=None, group=None, impl="auto"):
    """Sigmoid loss with K captions per image: image i's own captions positive, all others negative.

    texts: list of K (B, D) tensors (e.g. raw / short / long captions). The pairwise term is summed over
    the K sets and divided by K B^2 ("pairs", the official code's mean) or B ("rows", paper eq. 2).
    K = 1 equals sigmoid_loss. impl: as for sigmoid_loss.
    """
    _check_average(average)
    if isinstance(texts, torch.Tensor) or not isinstance(texts, (list, tuple)) or len(texts) == 0:
        raise SailError("texts must be a non-empty list of (B, D) tensors, one per caption set")
    for i, text in enumerate(texts):
        _check_pair(image, text, name=f"texts[{i}]")
    t, b = _scalar(t, "t"), _scalar(b, "b")
    impl_kernel = _pick_kernel(impl, image)

    def kernel(*inputs, want_grad):
        return impl_kernel(
            *inputs, average=average, block_size=block_size, group=group, want_grad=want_grad
        )

    return _apply(kernel, image, t, b, *texts)


# ---------------------------------------------------------------------------------------------------
# info-nce (CLIP / ALIGN / ALIP)


# long: its two passes share the block buffers, both log-sum-exp vectors and the rank offsets (a split would
# pass a dozen of them); the passes are marked inside
def _info_nce_kernel(image, text, t_in, *, eps, weights, block_size, group, want_grad):
    cdt, mdt = _compute_dtype(image), _matmul_dtype(image)  # element-wise and matmul dtypes
    x, y = image.detach().to(mdt), text.detach().to(mdt)
    t = t_in.detach().to(x.device, cdt).reshape(())
    t1 = t.reshape(1)  # 1-d: takes part in type promotion, so t * s is computed in cdt
    n = x.shape[0]
    w = torch.ones(n, dtype=cdt, device=x.device) if weights is None else weights.detach().to(x.device, cdt)
    group = _process_group(group, n, x.device)
    world, r = (1, 0) if group is None else (dist.get_world_size(group), dist.get_rank(group))
    m, off = n * world, r * n  # global batch, this rank's first global row
    y_all = y if group is None else _gather_rows(y, group)
    w_all = w if group is None else _gather_rows(w[:, None], group)[:, 0]
    x_sum = x.sum(0, dtype=cdt)
    if group is not None:
        dist.all_reduce(x_sum, group=group)
    rows = _rows_per_block(block_size, n, m, t.element_size(), x.device)
    s_buf = x.new_empty((rows, m))  # similarities in the matmul dtype
    l_buf = x.new_empty((rows, m), dtype=cdt) if mdt != cdt else s_buf  # logits in cdt

    def logits(r0, r1, pos=None):
        s, l = s_buf[: r1 - r0], l_buf[: r1 - r0]
        torch.mm(x[r0:r1], y_all.T, out=s)  # (rows, D) @ (D, m) -> (rows, m)
        if pos is not None:  # s_ii as the block holds them, so lse - l_ii is computed consistently
            pos[r0:r1] = s[:, off + r0 : off + r1].diagonal()
        return s, torch.mul(s, t1, out=l)  # (may overwrite s in place: l_buf is s_buf unless bf16)

    # pass 1: row log-sum-exps (complete here) and column ones (online over blocks, then over ranks)
    row_lse = x.new_empty(n, dtype=cdt)
    col_lse = x.new_full((m,), float("-inf"), dtype=cdt)
    pos = x.new_empty(n, dtype=cdt)  # (n,) s_ii
    for r0 in range(0, n, rows):
        r1 = min(r0 + rows, n)
        _, blk = logits(r0, r1, pos)
        row_lse[r0:r1] = torch.logsumexp(blk, 1)
        col_lse = torch.logaddexp(col_lse, torch.logsumexp(blk, 0))
    if group is not None:
        col_lse = torch.logsumexp(_gather_rows(col_lse[None], group), 0)  # (world, m) -> (m,)

    # CE with label smoothing eps over C = m classes: lse - (1 - eps) l_ii - eps mean_j l_ij
    smooth = _matvec(x, y_all.sum(0, dtype=cdt) / m) + _matvec(y, x_sum / m)  # mean_j s_ij + mean_j s_ji
    per = row_lse + col_lse[off : off + n] - t * (2 * (1 - eps) * pos + eps * smooth)
    sums = torch.stack([(w * per).sum(), x.new_zeros((), dtype=cdt)])  # [loss, sum_ij G_ij s_ij]

    gx = gy = None
    if want_grad:
        # pass 2: G_ij = dL/dl_ij * 2m = w_i (Pr_ij - q_ij) + w_j (Pc_ij - q_ji), q = (1-eps) I + eps / m
        gx, gy = x.new_empty(x.shape, dtype=cdt), x.new_zeros(y_all.shape, dtype=cdt)
        grads = _BlockGrads(x, y_all, rows, cdt)
        for r0 in range(0, n, rows):
            r1 = min(r0 + rows, n)
            wr = w[r0:r1, None]
            s, blk = logits(r0, r1)
            pr = torch.exp(blk - row_lse[r0:r1, None]).mul_(wr)  # w_i * row softmax
            blk.sub_(col_lse).exp_().mul_(w_all)  # w_j * column softmax, in place
            blk.add_(pr)
            del pr
            if eps > 0:
                blk.sub_(wr * (eps / m)).sub_(w_all * (eps / m))
            blk[:, off + r0 : off + r1].diagonal().sub_(w[r0:r1] * (2 * (1 - eps)))
            grads(blk, s, x[r0:r1], y_all, gx[r0:r1], gy)
            sums[1] += (gx[r0:r1] * x[r0:r1]).sum()  # sum_ij G_ij s_ij, a (rows, D) temporary
        if group is not None:
            gy = _sum_own_rows(gy, n, group)
    if group is not None:
        dist.all_reduce(sums, group=group)
    sums /= 2 * m
    if not want_grad:
        return sums[0], [None, None, None]
    scale = t * world / (2 * m)  # x world for DDP's averaging (see module docstring)
    return sums[0], [gx.mul_(scale), gy.mul_(scale), sums[1]]


def info_nce_loss(image, text, t, label_smoothing=0.0, weights=None, block_size=None, group=None):
    """CLIP / ALIGN softmax loss, L = (1/B) sum_i w_i (CE_i2t + CE_t2i) / 2 on logits t X Y^T.

    label_smoothing: as torch.nn.functional.cross_entropy's (target (1-eps) one-hot + eps/B uniform).
    weights: optional (B,) per-sample weights (e.g. ConsistencyGates), used without gradient; the sum is
    divided by B, not by the sum of weights. Under torch.distributed each rank passes its local weights.
    """
    _check_pair(image, text)
    t = _scalar(t, "t")
    eps = float(label_smoothing)
    if not 0.0 <= eps <= 1.0:
        raise SailError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if weights is not None and (not isinstance(weights, torch.Tensor) or weights.shape != image.shape[:1]):
        raise SailError(f"weights must be a ({image.shape[0]},) tensor, one weight per sample")

    def kernel(*inputs, want_grad):
        return _info_nce_kernel(
            *inputs, eps=eps, weights=weights, block_size=block_size, group=group, want_grad=want_grad
        )

    return _apply(kernel, image, text, t)


# ---------------------------------------------------------------------------------------------------
# ALIP consistency gates


class ConsistencyGates(torch.nn.Module):
    """ALIP's Language and Description Consistency Gates: per-sample weights for info_nce_loss.

    forward(s_tc, s_xt, s_xc), each (B,) cosine similarities (raw text . caption, image . raw text,
    image . caption), first updates the running means H = m H + (1 - m) batch_mean (in training mode;
    under torch.distributed the batch mean is over the global batch), then returns (W_s W_t, W_s W_c)
    without gradient, with
        W_s = exp((S_tc - H_tc) g_s) if S_tc <= H_tc else 1
        W_t = exp((S_xt - H_xt) g_p) if W_s < 1 else 1,   W_c likewise with S_xc, H_xc   (not capped).
    enabled=False returns all-ones weights (the ablation) while still tracking the means.
    """

    def __init__(self, momentum=0.99, gamma_s=2.0, gamma_p=2.0, enabled=True, group=None):
        super().__init__()
        if not 0.0 <= momentum <= 1.0:
            raise SailError(f"momentum must be in [0, 1], got {momentum}")
        self.momentum, self.gamma_s, self.gamma_p, self.enabled = momentum, gamma_s, gamma_p, enabled
        self.group = group
        for name in ("H_tc", "H_xt", "H_xc"):
            self.register_buffer(name, torch.ones((), dtype=torch.float64))

    @torch.no_grad()
    def forward(self, s_tc, s_xt, s_xc):
        if not (s_tc.ndim == 1 and s_tc.shape == s_xt.shape == s_xc.shape):
            raise SailError("ConsistencyGates expects three (B,) similarity tensors of the same length")
        stats = torch.stack([s.detach().double().sum() for s in (s_tc, s_xt, s_xc)])
        stats = torch.cat([stats, stats.new_tensor([s_tc.shape[0]])])  # [3 sums, count]
        group = self.group
        if group is None and dist.is_available() and dist.is_initialized():
            group = dist.group.WORLD
        if group is not None and dist.get_world_size(group) > 1:
            dist.all_reduce(stats, group=group)
        if self.training:
            m = self.momentum
            for h, mean in zip((self.H_tc, self.H_xt, self.H_xc), stats[:3] / stats[3]):
                h.mul_(m).add_((1 - m) * mean)
        ones = torch.ones_like(s_tc)
        if not self.enabled:
            return ones, ones.clone()
        h_tc, h_xt, h_xc = (h.to(s_tc.dtype) for h in (self.H_tc, self.H_xt, self.H_xc))
        w_s = torch.where(s_tc <= h_tc, torch.exp((s_tc - h_tc) * self.gamma_s), ones)
        gated = w_s < 1
        w_t = torch.where(gated, torch.exp((s_xt - h_xt) * self.gamma_p), ones)
        w_c = torch.where(gated, torch.exp((s_xc - h_xc) * self.gamma_p), ones)
        return (w_s * w_t).detach(), (w_s * w_c).detach()
