"""Fused sigmoid / multi-positive loss for CUDA GPUs, in Triton: logits, loss and dL/dlogits in one pass.

    from sail.train.losses import sigmoid_loss, multi_positive_loss
    loss = sigmoid_loss(img, txt, t, b, impl="triton")      # impl="auto" picks this on CUDA when triton imports
    PYTHONPATH=. TRITON_INTERPRET=1 python -m pytest -q tests/test_triton_sigmoid.py   # CPU, Triton interpreter

Same formulas, averaging conventions ("pairs" N = K B^2, "rows" N = B) and torch.distributed behaviour
(texts all-gathered, partial text gradients summed over ranks, local gradients x world size) as the blockwise
torch losses in sail.train.losses, which call `multi_positive_kernel` below when impl selects it; the gathering,
reduction and process-group helpers are sail.train.loss_blocks', shared with sail.train.losses.

Design. For a stripe of R rows of X (R x D, local rows) against all m gathered rows of Y (m x D):
1. `_sigmoid_tile_kernel` (Triton) computes the (R, m) cosine similarities tile by tile on tensor cores
   (input dtype, fp32 accumulation) and, in the same tile's epilogue, everything element-wise:
   l = t s + b, the loss term softplus(-z l), dL/dl = sigmoid(l) - [i == j] (positives where column
   j == row i + diag, diag = rank * n + first row of the stripe), and the per-tile sums of the loss,
   G s and G (for dL/dt and dL/db). It writes G once, in the input dtype (bf16 for bf16 inputs), and
   its per-tile sums to a small buffer; no fp32 (R, m) block and nothing of size B x B exists.
2. dX[stripe] = G @ Y and dY += G^T @ X[stripe] are two cuBLAS GEMMs in the input dtype (fp32
   accumulation inside; dX complete in one GEMM; dY summed over stripes in an fp32 buffer).
Why not one kernel that also accumulates dX and dY tile by tile (flash-attention style)? At D = 1024 the
accumulators do not fit on chip: a 128-row fp32 dX accumulator is 128 x 1024 x 4 = 512 KiB, twice an
H100 SM's register file. They would have to be read-modified-written in global memory per tile (dX) or
added with atomics (dY): ~8 (BM + BN) D bytes per 6 BM BN D flops, ~48 flop/byte at 128 x 128 tiles, far
below the ~300 flop/byte an H100 needs to stay compute-bound, and atomics make the sums
non-deterministic. A second, column-blocked kernel for dY would recompute the logits (4 matmuls instead
of 3, capping the useful share of peak at 75 %). Writing G once in bf16 (2 bytes) and reading it twice
costs 6 bytes per logit against 6 D = 6144 flops, ~1000 flop/byte, so the three matmuls run at GEMM
speed; the torch path instead sends each fp32 block through memory ~6 times for its element-wise work.
The dY partials come out of cuBLAS in the input dtype and are added to the fp32 buffer: 12 bytes per
(m x D) element per stripe against 2 R flops, fine for R in the thousands (the default stripe).

Two ways to do step 1 (STRATEGIES; SAIL_SIGMOID_STRATEGY=fused|gemm|auto, default auto):
- "fused": the tile kernel above, similarities and epilogue in one Triton kernel. On an H200 its matmul ran
  at ~290 TFLOP/s against cuBLAS's ~690 for the two gradient GEMMs (benchmarks/gpu_kernel.py's breakdown),
  so the whole loss stayed at 57-60 % of the bf16 peak.
- "gemm": cuBLAS computes S = X Y^T with fp32 output (torch.mm(..., out_dtype=float32) for bf16 / fp16, in
  row blocks of at most GEMM_S_BYTES), then `_sigmoid_epilogue_kernel` runs the same `_epilogue` on S and
  writes G. It moves 4 + 2 bytes per logit through memory (~1.3 ps at 4.8 TB/s) against 2 D = 2048 flops of
  GEMM (~3 ps at 690 TFLOP/s): if cuBLAS holds its rate, ~75 % of the peak for the whole loss (a model,
  not a measurement: benchmarks/gpu.py times both).
"auto" times both once per stripe shape on the device (after their warm-up: compilation, autotuning) and
keeps the faster; where torch has no fp32-output GEMM it stays "fused". The float64 self-check covers both.

Precision: bf16 / fp16 / fp32 inputs, fp32 accumulation and element-wise math; the loss and t, b sums are
reduced in float64. G is stored in the input dtype: for bf16 a 2^-9 relative rounding per element, the
same as the gradient's own output rounding. fp32 inputs use TF32 in the similarity kernel only when
torch.get_float32_matmul_precision() allows it (as torch.mm does). float64 inputs stay on the torch path.
Host syncs: none (t and b are read by the kernel from device memory; the sums stay on device).

Under TRITON_INTERPRET=1 (set before this module is imported) the kernel runs on CPU tensors through
Triton's interpreter, with small tiles and no autotuning; the interpreter's tl.dot is wrong for bf16 /
fp16 operands (triton 3.9), so there the tiles are upcast to fp32 first, which is exact (bf16 x bf16
products are exact in fp32, as on tensor cores).
"""

import contextlib
import os

import torch
import torch.distributed as dist
import triton
import triton.language as tl

from sail.core.errors import SailError
from sail.train import loss_blocks

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
STRIPE_ROWS = 4096  # rows of X per stripe: dY's fp32 accumulation costs 12 bytes per 2 * STRIPE_ROWS flops
STRIPE_BYTES = 8 * 2**30  # at most this much memory for one (rows, m) stripe of G
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
STRATEGIES = ("fused", "gemm")
GEMM_S_BYTES = 2**30  # "gemm": at most this much fp32 similarity block at once (rows of the stripe per block)
EPILOGUE_META = {"BLOCK_R": 16, "BLOCK_M": 512}  # "gemm": elements per program of the memory-bound epilogue


def strategy_setting() -> str:
    """SAIL_SIGMOID_STRATEGY: fused, gemm or auto (default)."""
    value = os.environ.get("SAIL_SIGMOID_STRATEGY", "auto").strip() or "auto"
    if value not in ("auto", *STRATEGIES):
        raise SailError(f"SAIL_SIGMOID_STRATEGY must be auto, fused or gemm, not {value!r}")
    return value

# Tile shapes for H100-class GPUs; autotuned per (R, M, D). Each config's grid size differs, so the
# per-tile sums go to a buffer sized for the smallest tile (64 x 64). Compiled for sm_90 without a GPU
# (tests/test_triton_sigmoid.py -m slow): all use wgmma and cp.async pipelining; 4-warp 128 x 128 tiles
# spilled ~1.2 KB of registers per thread and were dropped. First H200 run (7 configs): 57 % of the bf16
# matmul peak at B = 1M; the two 4-stage 128 x 256 / 256 x 128 configs were added after it for autotune to try.
# Second run (B = 262144): autotune kept 128 x 128 x 64 / 8 warps / 4 stages when writing G and took the new
# 128 x 256 one for the loss only; 59.5 % of peak. The tile kernel, not the GEMMs, is where the time is
# (benchmarks/gpu_kernel.py's breakdown: 290 TFLOP/s for its third of the flops, the GEMMs 694).
GPU_CONFIGS = [
    triton.Config({"BLOCK_R": br, "BLOCK_M": bm, "BLOCK_D": bd, "GROUP_R": 8}, num_warps=w, num_stages=s)
    for br, bm, bd, w, s in [
        (128, 128, 64, 8, 4), (128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3),
        (128, 128, 128, 8, 3), (64, 128, 64, 4, 4), (64, 64, 64, 4, 4), (128, 256, 64, 8, 4), (256, 128, 64, 8, 4),
    ]
]
MIN_TILE, MAX_TILE = 64, 256
INTERPRET_META = {"BLOCK_R": 16, "BLOCK_M": 16, "BLOCK_D": 16, "GROUP_R": 2}


@triton.jit
def _tile_coords(pid, n_r, n_m, group_r):
    """Program id -> (row tile, column tile) in grouped order: group_r row tiles walk the column tiles
    together, so each Y tile is read from L2 by all of them. Works elementwise on tensors too (tests)."""
    per_group = group_r * n_m
    first = (pid // per_group) * group_r
    size = tl.minimum(n_r - first, group_r)
    return first + (pid % per_group) % size, (pid % per_group) // size


@triton.jit
def _epilogue(acc, rows, cols, g_ptrs, t, b, R, M, diag, STORE_G: tl.constexpr):
    """Element-wise work on a (rows, cols) block of similarities acc: returns its [sum softplus(-z l),
    sum G s, sum G] and, with STORE_G, writes G = dL/dl * N = sigmoid(l) - [positive] to g_ptrs."""
    valid = (rows < R)[:, None] & (cols < M)[None, :]
    pos = cols[None, :] == (rows + diag)[:, None]  # this rank's own pairs, at the diagonal offset
    u = t * acc + b
    u = tl.where(pos, -u, u)  # loss term softplus(u), u = -z l
    e = tl.exp(-tl.abs(u))  # in (0, 1], never overflows
    w = 1.0 + e
    r = 1.0 / w
    # softplus(u) = max(u, 0) + log1p(e); log1p(e) = log(w) - ((w - 1) - e) / w stays accurate for tiny e
    # (tl has no log1p that the CPU interpreter runs)
    loss = tl.sum(tl.where(valid, tl.maximum(u, 0.0) + tl.log(w) - ((w - 1.0) - e) * r, 0.0))
    gs = 0.0
    gsum = 0.0
    if STORE_G:
        g = tl.where(u >= 0, r, e * r)  # sigmoid(u), stable on both sides
        g = tl.where(valid, tl.where(pos, -g, g), 0.0)
        tl.store(g_ptrs, g.to(g_ptrs.dtype.element_ty), mask=valid)
        gs = tl.sum(g * acc)
        gsum = tl.sum(g)
    return loss, gs, gsum


@triton.jit
def _sigmoid_tile_kernel(
    x_ptr, y_ptr, g_ptr, part_ptr, t_ptr, b_ptr,
    R, M, D, diag, stride_x, stride_y, stride_g,
    BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, GROUP_R: tl.constexpr,
    STORE_G: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_r, pid_m = _tile_coords(pid, tl.cdiv(R, BLOCK_R), tl.cdiv(M, BLOCK_M), GROUP_R)
    lr = tl.arange(0, BLOCK_R)  # tile-local offsets stay int32; each tile's base offset is int64,
    lc = tl.arange(0, BLOCK_M)  # since at B = 1M a stripe of G has 4096 x 2^20 = 2^32 elements
    ks = tl.arange(0, BLOCK_D)
    rows = pid_r * BLOCK_R + lr  # (BLOCK_R,) rows of the stripe
    cols = pid_m * BLOCK_M + lc  # (BLOCK_M,) rows of the gathered Y
    x_ptrs = x_ptr + (pid_r * BLOCK_R).to(tl.int64) * stride_x + (lr[:, None] * stride_x + ks[None, :])
    y_ptrs = y_ptr + (pid_m * BLOCK_M).to(tl.int64) * stride_y + (lc[:, None] * stride_y + ks[None, :])
    acc = tl.zeros((BLOCK_R, BLOCK_M), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_D):
        kmask = (k0 + ks)[None, :] < D
        xt = tl.load(x_ptrs, mask=(rows[:, None] < R) & kmask, other=0.0)  # (BLOCK_R, BLOCK_D)
        yt = tl.load(y_ptrs, mask=(cols[:, None] < M) & kmask, other=0.0)  # (BLOCK_M, BLOCK_D)
        x_ptrs += BLOCK_D
        y_ptrs += BLOCK_D
        if UPCAST:
            xt = xt.to(tl.float32)
            yt = yt.to(tl.float32)
        acc = tl.dot(xt, tl.trans(yt), acc, input_precision=PRECISION)  # (BLOCK_R, BLOCK_M) similarities

    # epilogue in two column halves: fewer fp32 temporaries live at once (sm_90 compile of the 128 x 128
    # config: 144 instead of 352 bytes of register spill per thread)
    t = tl.load(t_ptr)
    b = tl.load(b_ptr)
    # (BLOCK_R, BLOCK_M) -> (BLOCK_R, 2, BLOCK_M / 2) -> columns [0, BLOCK_M / 2) and [BLOCK_M / 2, BLOCK_M)
    a0, a1 = tl.split(tl.permute(tl.reshape(acc, (BLOCK_R, 2, BLOCK_M // 2)), (0, 2, 1)))
    lh = tl.arange(0, BLOCK_M // 2)
    g_ptrs = g_ptr + (pid_r * BLOCK_R).to(tl.int64) * stride_g + pid_m * BLOCK_M + (lr[:, None] * stride_g + lh[None, :])
    half = pid_m * BLOCK_M + lh
    l0, s0, n0 = _epilogue(a0, rows, half, g_ptrs, t, b, R, M, diag, STORE_G)
    l1, s1, n1 = _epilogue(a1, rows, half + BLOCK_M // 2, g_ptrs + BLOCK_M // 2, t, b, R, M, diag, STORE_G)
    tl.store(part_ptr + pid * 3, l0 + l1)
    if STORE_G:
        tl.store(part_ptr + pid * 3 + 1, s0 + s1)
        tl.store(part_ptr + pid * 3 + 2, n0 + n1)


@triton.jit
def _sigmoid_epilogue_kernel(
    s_ptr, g_ptr, part_ptr, t_ptr, b_ptr, R, M, diag, stride_s, stride_g,
    BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, STORE_G: tl.constexpr,
):
    """The "gemm" strategy's element-wise pass: `_epilogue` on a (BLOCK_R, BLOCK_M) block of fp32 similarities
    S (R x M, computed by cuBLAS), G written as the fused kernel writes it, the block's three sums to part."""
    pid = tl.program_id(0)
    n_m = tl.cdiv(M, BLOCK_M)
    pid_r, pid_m = pid // n_m, pid % n_m
    lr = tl.arange(0, BLOCK_R)
    lc = tl.arange(0, BLOCK_M)
    rows = pid_r * BLOCK_R + lr
    cols = pid_m * BLOCK_M + lc
    valid = (rows < R)[:, None] & (cols < M)[None, :]
    s_ptrs = s_ptr + (pid_r * BLOCK_R).to(tl.int64) * stride_s + pid_m * BLOCK_M + (lr[:, None] * stride_s + lc[None, :])
    acc = tl.load(s_ptrs, mask=valid, other=0.0)
    g_ptrs = g_ptr + (pid_r * BLOCK_R).to(tl.int64) * stride_g + pid_m * BLOCK_M + (lr[:, None] * stride_g + lc[None, :])
    loss, gs, gsum = _epilogue(acc, rows, cols, g_ptrs, tl.load(t_ptr), tl.load(b_ptr), R, M, diag, STORE_G)
    tl.store(part_ptr + pid * 3, loss)
    if STORE_G:
        tl.store(part_ptr + pid * 3 + 1, gs)
        tl.store(part_ptr + pid * 3 + 2, gsum)


# reset_to_zero: autotuning runs every config into the same partial-sums buffer, and a config with bigger
# tiles writes fewer rows, so the buffer is zeroed before each trial and before the chosen config runs
_tuned_kernel = triton.autotune(configs=GPU_CONFIGS, key=["R", "M", "D", "STORE_G"],
                                reset_to_zero=["part_ptr"])(_sigmoid_tile_kernel)


def stripe_sums(x, y, t, b, diag, g=None, strategy=None):
    """Run the loss's step 1 on one stripe: x (R, D) against y (M, D), positives at column row + diag.

    t, b: one-element fp32 tensors on x's device. g: an (R, M) output for dL/dl * N in x's dtype, or None
    (loss only). strategy: "fused", "gemm", or None (SAIL_SIGMOID_STRATEGY; auto: the faster, timed once
    per shape). Returns a float64 (3,) tensor [sum softplus(-z l), sum G s, sum G] (the last two 0 when g
    is None). Public for the tests, which call it with a gathered y and a rank's diagonal offset.
    """
    R, D = x.shape
    M = y.shape[0]
    store_g = g is not None
    if store_g and MAX_TILE * g.stride(0) >= 2**31:  # tile-local offsets row * stride_g are int32
        raise SailError(f"impl='triton' handles global batches below {2**31 // MAX_TILE}, got {g.stride(0)}; "
                        "use impl='torch'")
    # fp32: TF32 only where torch.mm would use it; bf16 / fp16: the default ("tf32"), which they ignore
    precision = "ieee" if x.dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest" else "tf32"
    # Triton launches on the current CUDA device, not on the tensors' one
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        strategy = strategy or _choose(x, y, g, t, b, diag, R, M, D, store_g, precision)
        if strategy == "gemm":
            return _gemm_stripe(x, y, g, t, b, diag, R, M, store_g)
        return _launch(x, y, g, t, b, diag, R, M, D, store_g, precision)


_CHOSEN: dict = {}  # (device, dtype, R, M, D, store_g) -> the strategy auto timed faster


def _choose(x, y, g, t, b, diag, R, M, D, store_g, precision) -> str:
    """The strategy for this stripe: the setting, or under auto the faster of the two, timed once per shape
    on CUDA (three synchronised calls each; the first compiles and autotunes). The interpreter uses fused."""
    setting = strategy_setting()
    problem = gemm_problem(x.device, x.dtype) if setting == "gemm" else None
    if problem:
        raise SailError(f"SAIL_SIGMOID_STRATEGY=gemm cannot run here: {problem}; use fused or auto")
    if setting != "auto":
        return setting
    if INTERPRET or not x.is_cuda or gemm_problem(x.device, x.dtype):
        return "fused"
    key = (str(x.device), x.dtype, R, M, D, store_g)
    if key not in _CHOSEN:
        _CHOSEN[key] = faster({"fused": lambda: _launch(x, y, g, t, b, diag, R, M, D, store_g, precision),
                               "gemm": lambda: _gemm_stripe(x, y, g, t, b, diag, R, M, store_g)},
                              lambda: torch.cuda.synchronize(x.device))
    return _CHOSEN[key]


def faster(runs: dict, sync) -> str:
    """The name of the fastest of `runs` (name -> call): each called once to warm up, then twice timed,
    between calls of `sync` (which waits for the device)."""
    import time

    seconds = {}
    for name, run in runs.items():
        run()
        sync()
        start = time.perf_counter()
        run()
        run()
        sync()
        seconds[name] = time.perf_counter() - start
    return min(seconds, key=seconds.get)


def _similarities(x, y):
    """S = x y^T in fp32: cuBLAS with fp32 output for bf16 / fp16 on CUDA (fp32 accumulation, one rounding),
    torch.mm for fp32 (TF32 where torch.get_float32_matmul_precision() allows, as the fused kernel), and under
    the interpreter fp32 products of the upcast inputs (bf16 x bf16 products are exact in fp32)."""
    if x.dtype == torch.float32:
        return torch.mm(x, y.T)
    if INTERPRET:
        return torch.mm(x.float(), y.float().T)
    return torch.mm(x, y.T, out_dtype=torch.float32)


def _gemm_stripe(x, y, g, t, b, diag, R, M, store_g):
    """The "gemm" strategy on one stripe: S in row blocks of at most GEMM_S_BYTES, the epilogue kernel on each."""
    meta = INTERPRET_META if INTERPRET else EPILOGUE_META
    block = max(1, min(R, GEMM_S_BYTES // (4 * M)))
    sums = torch.zeros(3, dtype=torch.float64, device=x.device)
    for r0 in range(0, R, block):
        r1 = min(R, r0 + block)
        s = _similarities(x[r0:r1], y)  # (r1 - r0, M) fp32
        n = r1 - r0
        part = torch.zeros((triton.cdiv(n, meta["BLOCK_R"]) * triton.cdiv(M, meta["BLOCK_M"]), 3),
                           dtype=torch.float32, device=x.device)
        out = g[r0:r1] if store_g else part
        _sigmoid_epilogue_kernel[(part.shape[0],)](
            s, out, part, t, b, n, M, diag + r0, s.stride(0), out.stride(0) if store_g else 0,
            BLOCK_R=meta["BLOCK_R"], BLOCK_M=meta["BLOCK_M"], STORE_G=store_g,
            **({} if INTERPRET else {"num_warps": 8}))
        sums += part.sum(0, dtype=torch.float64)
    return sums


_GEMM_PROBLEM: dict = {}  # (device, dtype) -> why "gemm" cannot run there, or None


def gemm_problem(device, dtype) -> str | None:
    """Why the "gemm" strategy cannot run on (device, dtype): no fp32-output GEMM in this torch, or a
    disagreement with float64 (checked once, as self_check does for the fused kernel); None if it can."""
    key = (str(device), dtype)
    if key not in _GEMM_PROBLEM:
        _GEMM_PROBLEM[key] = _compare_with_float64(torch.device(device), dtype, "gemm")
    return _GEMM_PROBLEM[key]


def _launch(x, y, g, t, b, diag, R, M, D, store_g, precision):
    if INTERPRET:
        meta = INTERPRET_META
        part = torch.zeros((triton.cdiv(R, meta["BLOCK_R"]) * triton.cdiv(M, meta["BLOCK_M"]), 3),
                           dtype=torch.float32, device=x.device)
        grid = (part.shape[0],)
        _sigmoid_tile_kernel[grid](
            x, y, g if store_g else part, part, t, b, R, M, D, diag, x.stride(0), y.stride(0),
            g.stride(0) if store_g else 0, **meta, STORE_G=store_g, UPCAST=x.dtype != torch.float32,
            PRECISION="ieee")
    else:
        # zeroed each stripe: the tuned config may launch fewer programs than the buffer has rows
        part = torch.zeros((triton.cdiv(R, MIN_TILE) * triton.cdiv(M, MIN_TILE), 3),
                           dtype=torch.float32, device=x.device)

        def grid(meta):
            return (triton.cdiv(R, meta["BLOCK_R"]) * triton.cdiv(M, meta["BLOCK_M"]),)

        _tuned_kernel[grid](
            x, y, g if store_g else part, part, t, b, R, M, D, diag, x.stride(0), y.stride(0),
            g.stride(0) if store_g else 0, STORE_G=store_g, UPCAST=False, PRECISION=precision)
    return part.sum(0, dtype=torch.float64)


def _stripe_rows(block_size, n, m, elem_bytes):
    if block_size is not None:
        return loss_blocks._rows_per_block(block_size, n, m, elem_bytes)  # validates
    return max(1, min(n, STRIPE_ROWS, STRIPE_BYTES // (m * elem_bytes)))


_CHECKED: dict = {}  # (device, dtype) -> None (agrees) or the reason it does not


def self_check(device, dtype) -> str | None:
    """Run the kernel once on a small problem (sizes off every tile grid, a diagonal offset) and compare
    the loss, the two gradient sums and every dL/dl with a float64 computation on the same rounded inputs.

    Returns None when they agree, else a one-line reason. Cached per (device, dtype): the first use on a
    device costs one tiny launch (plus compilation). sail.train.losses runs it before the kernel is used, so a
    GPU, driver or triton version on which the kernel miscomputes falls back to the torch loss instead of
    training on wrong gradients.
    """
    key = (str(device), dtype)
    if key not in _CHECKED:
        _CHECKED[key] = _compare_with_float64(torch.device(device), dtype, "fused")
    return _CHECKED[key]


def _compare_with_float64(device, dtype, strategy="fused") -> str | None:
    n, m, d, diag, t, b = 37, 83, 40, 29, 20.0, -10.0
    gen = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(n, d, generator=gen, dtype=torch.float64), dim=1)
    y = torch.nn.functional.normalize(torch.randn(m, d, generator=gen, dtype=torch.float64), dim=1)
    y[diag:diag + n] = torch.nn.functional.normalize(x + 0.3 * y[diag:diag + n], dim=1)  # real positives
    xd, yd = x.to(device, dtype).contiguous(), y.to(device, dtype).contiguous()
    x, y = xd.double().cpu(), yd.double().cpu()  # the reference sees the same rounded inputs
    s = x @ y.T  # (n, m) cosines
    z = -torch.ones_like(s)
    z[torch.arange(n), torch.arange(n) + diag] = 1.0
    logits = t * s + b
    g_ref = torch.sigmoid(logits) - (z > 0).double()  # dL/dl * N
    want = torch.stack([torch.nn.functional.softplus(-z * logits).sum(), (g_ref * s).sum(), g_ref.sum()])
    try:
        g = torch.empty((n, m), device=device, dtype=dtype)
        got = stripe_sums(xd, yd, torch.tensor([t], device=device), torch.tensor([b], device=device), diag, g,
                          strategy=strategy)
        got, g = got.cpu(), g.double().cpu()
    except Exception as e:  # a compile or launch failure is a reason to fall back, not to crash
        return f"the {strategy} kernel failed to run ({type(e).__name__}: {str(e)[:200]})"
    tol = 1e-4 if dtype == torch.float32 else 1e-2  # G is stored in the input dtype (bf16: 2^-8 relative)
    err_sums = ((got - want).abs() / want.abs().clamp_min(1.0)).max().item()
    err_g = ((g - g_ref).norm() / g_ref.norm()).item()
    if not (err_sums < tol and err_g < tol):  # also catches NaN
        return (f"the {strategy} kernel disagrees with float64 on {device} / {dtype} (sums {err_sums:.1e}, "
                f"dL/dl {err_g:.1e}, tolerance {tol:.0e})")
    return None


def check_inputs(x):
    """SailError unless x can go through the kernel: CUDA (or the interpreter), bf16 / fp16 / fp32."""
    if x.device.type != "cuda" and not INTERPRET:
        raise SailError(
            f"impl='triton' runs on CUDA tensors, got {x.device.type} tensors; use impl='auto' or 'torch' "
            "(tests run it on CPU with TRITON_INTERPRET=1 set before import)"
        )
    if x.dtype not in DTYPES:
        raise SailError(f"impl='triton' takes bf16, fp16 or fp32 embeddings, got {x.dtype}; use impl='torch'")


def multi_positive_kernel(image, t_in, b_in, *texts, average, block_size, group, want_grad):
    """sail.train.losses' kernel contract: (loss, [d image, d t, d b, d texts...]), gradients of the global mean
    (scaled by world size for the local embeddings; see sail.train.losses' module docstring)."""
    check_inputs(image)
    x = image.detach().contiguous()
    cdt = x.dtype
    t = t_in.detach().to(x.device, torch.float32).reshape(1)
    b = b_in.detach().to(x.device, torch.float32).reshape(1)
    n, k = x.shape[0], len(texts)
    group = loss_blocks._process_group(group, n, x.device)
    world, rank = (1, 0) if group is None else (dist.get_world_size(group), dist.get_rank(group))
    m = n * world  # global batch
    norm = k * m * m if average == "pairs" else m
    rows = _stripe_rows(block_size, n, m, x.element_size())

    sums = torch.zeros(3, dtype=torch.float64, device=x.device)  # [loss, sum G s, sum G] over K sets
    gx = torch.zeros(x.shape, dtype=torch.float32, device=x.device) if want_grad else None
    g_buf = x.new_empty((rows, m)) if want_grad else None  # one stripe of G, reused
    gys = []
    for text in texts:
        y = text.detach().to(x.device, cdt).contiguous()
        y_all = y if group is None else loss_blocks._gather_rows(y, group)  # (m, D)
        gy = torch.zeros(y_all.shape, dtype=torch.float32, device=x.device) if want_grad else None
        for r0 in range(0, n, rows):
            r1 = min(r0 + rows, n)
            g = g_buf[: r1 - r0] if want_grad else None
            sums += stripe_sums(x[r0:r1], y_all, t, b, diag=rank * n + r0, g=g)
            if want_grad:
                gx[r0:r1] += torch.mm(g, y_all)  # (rows, m) @ (m, D), fp32 accumulation in the GEMM
                gy += torch.mm(g.T, x[r0:r1])  # (m, rows) @ (rows, D), summed over stripes in fp32
        if want_grad:
            gys.append(gy if group is None else loss_blocks._sum_own_rows(gy, n, group))
    if group is not None:
        dist.all_reduce(sums, group=group)
    sums = (sums / norm).float()
    if not want_grad:
        return sums[0], [None] * (3 + k)
    scale = t.reshape(()) * world / norm  # dL/dx = t G y / N; x world for DDP's averaging
    return sums[0], [gx.mul_(scale), sums[1], sums[2], *[gy.mul_(scale) for gy in gys]]
