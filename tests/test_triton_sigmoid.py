"""The fused Triton sigmoid loss (sail.train.triton_sigmoid) against the float64 reference formula.

Without a GPU the kernel runs on CPU through Triton's interpreter (TRITON_INTERPRET=1, set here before the
kernel module is imported) with 16 x 16 x 16 tiles, so sizes like B = 21, D = 19 cross tile, stripe and
k-loop boundaries. The interpreter costs ~0.1 s per tile: tiny sizes here; a random sweep and the 2-process
gloo run under -m slow.
Checked: the loss and the gradients of the embeddings, log t and b for K = 1, 2, 3 caption sets, both
averages, extreme t and b, fp32 / bf16 / fp16 inputs, no-grad calls, the diagonal offset of each rank
(simulated, and with 2 gloo processes), the grouped tile order, and the impl= selection and its errors.
"""

import json
import math
import os
import random
import socket
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before sail.train.triton_sigmoid (and triton.jit) import
pytest.importorskip("triton", reason="the optional triton extra is not installed")

import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from sail.core.errors import SailError  # noqa: E402
from sail.train import losses  # noqa: E402
from sail.train import triton_sigmoid as ts  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
assert DEVICE == "cuda" or ts.INTERPRET, "set TRITON_INTERPRET=1 before anything imports sail.train.triton_sigmoid"


def unit(n, d, seed, near=None):
    """(n, d) float64 unit rows; near= gives rows close to those (realistic positives)."""
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(n, d, generator=g, dtype=torch.float64)
    return F.normalize(v if near is None else near + 0.5 * v / math.sqrt(d), dim=-1)


def ref_loss(x, ys, t, b, average):
    z = 2 * torch.eye(x.shape[0], dtype=x.dtype) - 1
    total = sum(-F.logsigmoid(z * (t * x @ y.T + b)).sum() for y in ys)
    return total / (len(ys) * x.shape[0] ** 2 if average == "pairs" else x.shape[0])


def value_and_grads(fn, embeddings, log_t, b, dtype):
    """Loss and gradients w.r.t. the embeddings, log t and b; embeddings cast to dtype as leaves."""
    emb = [e.to(DEVICE, dtype).requires_grad_(True) for e in embeddings]
    lt = torch.tensor(log_t, dtype=torch.float64, requires_grad=True)
    bb = torch.tensor(b, dtype=torch.float64, requires_grad=True)
    loss = fn(emb, lt.exp(), bb)
    return loss.detach().double().cpu(), [g.double().cpu() for g in torch.autograd.grad(loss, [*emb, lt, bb])]


def compare(embeddings, t, b, k, average, dtype, block_size, rtol_loss, rtol_grad):
    """Triton loss on embeddings cast to dtype vs the float64 reference on the SAME rounded values."""
    rounded = [e.to(dtype).double() for e in embeddings]  # inputs' rounding is not the kernel's error
    v, g = value_and_grads(
        lambda e, tt, bb: losses.multi_positive_loss(e[0], e[1:], tt, bb, average=average,
                                                     block_size=block_size, impl="triton"),
        embeddings, math.log(t), b, dtype)
    v_ref, g_ref = value_and_grads(lambda e, tt, bb: ref_loss(e[0], e[1:], tt, bb, average),
                                   rounded, math.log(t), b, torch.float64)
    torch.testing.assert_close(v, v_ref, rtol=rtol_loss, atol=0, msg="loss")
    names = ["image"] + [f"text {i}" for i in range(k)] + ["log t", "b"]
    for name, got, want in zip(names, g, g_ref):
        # embeddings: error relative to the gradient's norm (elementwise would punish cancellation)
        err = (got - want).norm() / want.norm().clamp_min(1e-300)
        assert err <= rtol_grad, f"{name}: relative error {err:.3g} > {rtol_grad} ({dtype}, t={t}, b={b})"


# K, average, t, b, B, D, block_size (rows per stripe; None = all rows in one stripe)
CASES = [
    (1, "pairs", 10.0, -10.0, 21, 19, None),
    (2, "rows", 1.0, -30.0, 21, 19, 8),
    (3, "pairs", 100.0, 10.0, 17, 19, 5),
    (1, "rows", 100.0, -30.0, 18, 33, 16),
    (2, "pairs", 1.0, 10.0, 19, 7, 19),
]


@pytest.fixture(params=ts.STRATEGIES)
def strategy(request, monkeypatch):
    """Each test below runs with both ways of computing the similarities (fused tile kernel; cuBLAS-style GEMM
    + the epilogue kernel), chosen as users choose: SAIL_SIGMOID_STRATEGY."""
    monkeypatch.setenv("SAIL_SIGMOID_STRATEGY", request.param)
    return request.param


@pytest.mark.parametrize("k,average,t,b,n,d,block", CASES)
def test_fp32_matches_float64_reference(k, average, t, b, n, d, block, strategy):
    x = unit(n, d, 0)
    ys = [unit(n, d, 1 + i, near=x) for i in range(k)]
    compare([x, *ys], t, b, k, average, torch.float32, block, rtol_loss=2e-6, rtol_grad=2e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_match_reference_on_rounded_inputs(dtype, strategy):
    # Compared with the float64 reference evaluated on the same rounded inputs, so only the kernel's own
    # arithmetic counts. Similarities: exact products, fp32 sums -> loss and the t, b gradients (reduced
    # from the fp32 G before it is stored) are fp32-accurate. Embedding gradients: G is stored in the
    # input dtype (relative rounding 2^-9 for bf16, 2^-12 for fp16), the GEMMs round their output once
    # more, and the returned gradient is cast to the input dtype: three roundings of <= 2^-9 each,
    # ~5e-3 in norm at worst; 1e-2 leaves room for cancellation in the sums over m.
    n, d, k = 21, 19, 2
    x = unit(n, d, 3)
    ys = [unit(n, d, 4 + i, near=x) for i in range(k)]
    compare([x, *ys], 20.0, -10.0, k, "pairs", dtype, 8, rtol_loss=1e-5, rtol_grad=1e-2)


def test_loss_without_grad_matches_reference(strategy):
    x, y = unit(20, 18, 5), unit(20, 18, 6)
    with torch.no_grad():
        v = losses.sigmoid_loss(x.float().to(DEVICE), y.float().to(DEVICE), torch.tensor(7.0), torch.tensor(-4.0),
                                average="rows", impl="triton")
    torch.testing.assert_close(v.double().cpu(), ref_loss(x, [y], 7.0, -4.0, "rows"), rtol=2e-6, atol=0)


def test_simulated_ranks_diagonal_offsets(strategy):
    # Each rank r holds rows [r n, (r + 1) n) of X and sees the gathered Y: its positives sit at column
    # row + r n (+ the stripe's first row). The kernel's G rows and sums of every (rank, stripe) must match
    # the global reference's rows; offsets 7, 14 and stripe starts 3, 6 do not align with 16-wide tiles.
    world, n, d, t, b = 3, 7, 10, 9.0, -6.0
    x, y = unit(world * n, d, 7), unit(world * n, d, 8)
    s = x @ y.T
    logit = t * s + b
    pos = torch.eye(world * n, dtype=torch.bool)
    g_ref = torch.sigmoid(logit) - pos.double()
    loss_ref = torch.where(pos, F.softplus(-logit), F.softplus(logit))
    tt, bb = (torch.tensor([v], dtype=torch.float32, device=DEVICE) for v in (t, b))
    y_all = y.float().to(DEVICE)
    for rank in range(world):
        for r0 in range(0, n, 3):
            r1 = min(r0 + 3, n)
            rows = slice(rank * n + r0, rank * n + r1)
            g = torch.empty((r1 - r0, world * n), dtype=torch.float32, device=DEVICE)
            sums = ts.stripe_sums(x[rows].float().to(DEVICE), y_all, tt, bb, diag=rank * n + r0, g=g)
            torch.testing.assert_close(g.double().cpu(), g_ref[rows], rtol=1e-5, atol=1e-6)
            want = torch.stack([loss_ref[rows].sum(), (g_ref[rows] * s[rows]).sum(), g_ref[rows].sum()])
            torch.testing.assert_close(sums.cpu(), want, rtol=1e-5, atol=1e-5)


@triton.jit
def _coords_probe(nr_ptr, nm_ptr, gr_ptr, pid_ptr, out_ptr, L, BLOCK: tl.constexpr):
    # one lane per (configuration, program id): the kernel's own tile-order function, vectorised
    i = tl.arange(0, BLOCK)
    mask = i < L
    r, m = ts._tile_coords(tl.load(pid_ptr + i, mask=mask, other=0), tl.load(nr_ptr + i, mask=mask, other=1),
                           tl.load(nm_ptr + i, mask=mask, other=1), tl.load(gr_ptr + i, mask=mask, other=1))
    tl.store(out_ptr + 2 * i, r, mask=mask)
    tl.store(out_ptr + 2 * i + 1, m, mask=mask)


def test_grouped_tile_order_visits_every_tile_once():
    # property: for every (row tiles, column tiles, group) the program ids map one-to-one onto the tiles
    configs = [(nr, nm, gr) for nr in range(1, 19) for nm in range(1, 19) for gr in (1, 2, 3, 8)]
    lanes = [(nr, nm, gr, pid) for nr, nm, gr in configs for pid in range(nr * nm)]
    cols = torch.tensor(lanes, dtype=torch.int32).T.contiguous()
    out = torch.empty((len(lanes), 2), dtype=torch.int32)
    block = triton.next_power_of_2(len(lanes))
    _coords_probe[(1,)](cols[0], cols[1], cols[2], cols[3], out, len(lanes), BLOCK=block)
    start = 0
    for nr, nm, gr in configs:
        got = {tuple(p) for p in out[start : start + nr * nm].tolist()}
        assert got == {(r, m) for r in range(nr) for m in range(nm)}, (nr, nm, gr)
        start += nr * nm
    assert len(configs) > 1000


def test_batch_beyond_int32_tile_offsets_is_refused():
    x = torch.zeros(1, 4, device=DEVICE)
    g = torch.empty(1, device=DEVICE).as_strided((1, 1), (2**23, 1))  # a stripe row of 2^23 columns
    one = torch.ones(1, device=DEVICE)
    with pytest.raises(SailError, match="global batches below 8388608"):
        ts.stripe_sums(x, x, one, one, diag=0, g=g)


def test_stripe_rows_plan():
    # property: the default stripe never exceeds STRIPE_ROWS or STRIPE_BYTES and covers at least one row
    rng = random.Random(0)
    for _ in range(5000):
        n, world, elem = rng.randint(1, 2**21), rng.choice([1, 2, 8]), rng.choice([2, 4])
        rows = ts._stripe_rows(None, n, n * world, elem)
        assert 1 <= rows <= min(n, ts.STRIPE_ROWS)
        assert rows == 1 or rows * n * world * elem <= ts.STRIPE_BYTES
    assert ts._stripe_rows(5, 100, 100, 2) == 5
    with pytest.raises(SailError, match="block_size"):
        ts._stripe_rows(0, 100, 100, 2)


# --------------------------------------------------------------------------------------------------
# impl selection


def test_impl_selection_and_errors(monkeypatch):
    cpu = torch.zeros(3, 4)
    assert losses._pick_kernel("torch", cpu) is losses._multi_positive_kernel
    assert losses._pick_kernel("auto", cpu) is losses._multi_positive_kernel  # auto: triton on CUDA only
    assert losses._pick_kernel("triton", cpu) is ts.multi_positive_kernel
    with pytest.raises(SailError, match="impl must be one of auto, torch, triton"):
        losses.sigmoid_loss(cpu, cpu, 1.0, 0.0, impl="cuda")
    with pytest.raises(SailError, match="float64"):
        losses.sigmoid_loss(cpu.double(), cpu.double(), 1.0, 0.0, impl="triton")
    monkeypatch.setattr(ts, "INTERPRET", False)
    if DEVICE == "cpu":
        with pytest.raises(SailError, match="runs on CUDA tensors"):
            losses.sigmoid_loss(cpu, cpu, 1.0, 0.0, impl="triton")
    monkeypatch.setitem(sys.modules, "sail.train.triton_sigmoid", None)  # as if triton were not installed
    with pytest.raises(SailError, match="needs the triton package"):
        losses.sigmoid_loss(cpu, cpu, 1.0, 0.0, impl="triton")
    assert losses._pick_kernel("auto", cpu) is losses._multi_positive_kernel


def test_cli_loss_impl_errors_before_reading_data(tmp_path, capsys):
    from sail.cli import main

    missing = str(tmp_path / "missing.h5")  # never opened: the impl is checked first
    for extra, msg in [(["--loss-impl", "cuda"], "impl must be one of auto, torch, triton"),
                       (["--loss", "info-nce", "--loss-impl", "triton"], "is for the sigmoid and multi-positive")]:
        assert main(["align", "--image", missing, "--text", missing, "--out", str(tmp_path / "run"), *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and msg in err and len(err.splitlines()) == 1
        assert not (tmp_path / "run").exists()


def test_align_with_triton_impl_matches_torch_impl(tmp_path):
    # the same 3 training steps with each impl: the logged losses agree to fp32 accuracy
    from sail.train.align_heads import AlignConfig, align
    from synthetic import paired_stores

    img, txt = paired_stores(tmp_path, n=120)
    logged = {}
    for impl in ("torch", "triton"):
        out = tmp_path / impl
        align(AlignConfig(image=str(img), text=str(txt), out=str(out), head="linear", out_dim=16, batch=24, steps=3,
                          lr=1e-3, optimizer="adamw", val_fraction=0.1, eval_every=1000, progress=False,
                          device=DEVICE, loss_impl=impl, log_every=1))
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        logged[impl] = torch.tensor([r["loss"] for r in rows], dtype=torch.float64)
        assert json.loads((out / "train_config.json").read_text())["loss_impl"] == impl
    assert len(logged["torch"]) == 3
    torch.testing.assert_close(logged["triton"], logged["torch"], rtol=1e-5, atol=0)


# --------------------------------------------------------------------------------------------------
# two gloo processes on CPU, each running the interpreted kernel on its half of the batch

WORLD, B, D = 2, 10, 6


def _dist_worker(rank, port):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        x = unit(B, D, 10)
        ys = [unit(B, D, 11 + i, near=x) for i in range(2)]
        lo, hi = rank * B // WORLD, (rank + 1) * B // WORLD
        for average in ("pairs", "rows"):
            v, g = value_and_grads(
                lambda e, t, b: losses.multi_positive_loss(e[0], e[1:], t, b, average=average, block_size=3,
                                                           impl="triton"),
                [e[lo:hi] for e in (x, *ys)], math.log(8.0), -3.0, torch.float32)
            v_ref, g_ref = value_and_grads(lambda e, t, b: ref_loss(e[0], e[1:], t, b, average),
                                           [x, *ys], math.log(8.0), -3.0, torch.float64)
            torch.testing.assert_close(v, v_ref, rtol=2e-6, atol=0)  # the global loss on every rank
            for i in range(3):  # local rows' gradients x world size
                torch.testing.assert_close(g[i], WORLD * g_ref[i][lo:hi], rtol=1e-5, atol=1e-7)
            for i in (3, 4):  # t, b: the full gradient on every rank
                torch.testing.assert_close(g[i], g_ref[i], rtol=1e-5, atol=1e-8)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # ~30 s: each process imports torch and triton and interprets the kernel
def test_two_gloo_processes_match_single_process_reference():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_dist_worker, args=(port,), nprocs=WORLD, join=True)


# --------------------------------------------------------------------------------------------------
# slow: the GPU path compiled for an H100 (sm_90) without a GPU, in a process without the interpreter

COMPILE = """
import sys, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from sail.train import triton_sigmoid as ts
dt, (br, bm, bd, warps, stages) = sys.argv[1], (128, 128, 64, 8, 4)
sig = {n: "*" + dt for n in ("x_ptr", "y_ptr", "g_ptr")}
sig.update({n: "*fp32" for n in ("part_ptr", "t_ptr", "b_ptr")})
sig.update({n: "i32" for n in ("R", "M", "D", "diag", "stride_x", "stride_y", "stride_g")})
const = dict(BLOCK_R=br, BLOCK_M=bm, BLOCK_D=bd, GROUP_R=8, STORE_G=True, UPCAST=False,
             PRECISION="ieee" if dt == "fp32" else "tf32")
sig.update({n: "constexpr" for n in const})
aligned = {(i,): [["tt.divisibility", 16]] for i in (0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12)}  # as the JIT sees
src = ASTSource(fn=ts._sigmoid_tile_kernel, signature=sig, constexprs=const, attrs=aligned)
k = triton.compile(src, target=GPUTarget("cuda", 90, 128), options={"num_warps": warps, "num_stages": stages})
ptx = k.asm["ptx"]
print("wgmma" in ptx or "mma.sync" in ptx, "cp.async" in ptx, k.metadata.shared)
"""


@pytest.mark.slow
@pytest.mark.parametrize("dt", ["bf16", "fp16", "fp32"])
def test_gpu_kernel_compiles_for_sm90(dt, tmp_path):
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    env["PYTHONPATH"] = os.pathsep.join([os.getcwd(), env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, "-c", COMPILE, dt], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    tensor_cores, pipelined, smem = out.stdout.split()
    assert pipelined == "True" and int(smem) > 0
    assert tensor_cores == "True" or dt == "fp32"  # fp32 without TF32 ("ieee") runs on the FMA units


# --------------------------------------------------------------------------------------------------
# slow: a random sweep of sizes, offsets and scalars through the interpreter


@pytest.mark.slow
def test_random_sweep():
    rng = random.Random(1)
    for trial in range(40):
        n, d, k = rng.randint(1, 40), rng.randint(1, 40), rng.randint(1, 3)
        t, b = rng.choice([1.0, 5.0, 20.0, 100.0]), rng.choice([-30.0, -10.0, 0.0, 10.0])
        average, block = rng.choice(["pairs", "rows"]), rng.choice([None, 1, 7, 16, 17])
        dtype = rng.choice([torch.float32, torch.float32, torch.bfloat16])
        x = unit(n, d, 100 + trial)
        ys = [unit(n, d, 200 + 10 * trial + i, near=x) for i in range(k)]
        fp32 = dtype == torch.float32
        compare([x, *ys], t, b, k, average, dtype, block, rtol_loss=2e-6 if fp32 else 1e-5,
                rtol_grad=2e-5 if fp32 else 1e-2)


# ---------------------------------------------------------------------------------------------------
# the self-check that guards every first use of the kernel on a (device, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_self_check_accepts_the_real_kernel(dtype):
    ts._CHECKED.clear()
    assert ts.self_check(DEVICE, dtype) is None


def test_self_check_catches_a_wrong_kernel_and_triton_refuses_it(monkeypatch):
    real = ts.stripe_sums

    def off_by_one_diagonal(x, y, t, b, diag, g=None, strategy=None):  # the classic tiling bug
        return real(x, y, t, b, diag + 1, g, strategy)

    monkeypatch.setattr(ts, "stripe_sums", off_by_one_diagonal)
    monkeypatch.setattr(ts, "_CHECKED", {})
    why = ts.self_check(DEVICE, torch.float32)
    assert why is not None and "disagrees with float64" in why
    x = F.normalize(torch.randn(8, 16, device=DEVICE), dim=1)
    with pytest.raises(SailError, match="impl='triton': the fused kernel disagrees"):
        losses.sigmoid_loss(x, x, 10.0, -10.0, impl="triton")


def test_self_check_reports_a_kernel_that_fails_to_run(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no kernel image is available for execution on the device")

    monkeypatch.setattr(ts, "stripe_sums", broken)
    monkeypatch.setattr(ts, "_CHECKED", {})
    assert "failed to run (RuntimeError: no kernel image" in ts.self_check(DEVICE, torch.float32)


# ---------------------------------------------------------------------------------------------------
# the "gemm" strategy: fp32 similarities from a GEMM, then the epilogue kernel


def test_gemm_row_blocks_give_the_unblocked_result(monkeypatch):
    """S is computed in row blocks of at most GEMM_S_BYTES: blocks of 1, 2, 5 and 7 rows (diagonal offsets moving
    with each block) give one block's G and sums, and the fused kernel's, within fp32 rounding (a wrong offset
    would move a positive: an O(1) error in G)."""
    x, y = unit(13, 9, 11).float(), unit(29, 9, 12).float()
    tt, bb = torch.tensor([12.0]), torch.tensor([-7.0])
    results = []
    for rows in (13, 1, 2, 5, 7):
        monkeypatch.setattr(ts, "GEMM_S_BYTES", 4 * 29 * rows)
        g = torch.empty(13, 29)
        results.append((ts.stripe_sums(x, y, tt, bb, diag=4, g=g, strategy="gemm"), g))
    g_fused = torch.empty(13, 29)
    fused = ts.stripe_sums(x, y, tt, bb, diag=4, g=g_fused, strategy="fused")
    for sums, g in results:
        torch.testing.assert_close(sums, results[0][0], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(g, results[0][1], rtol=1e-5, atol=1e-6)  # CPU BLAS sums in a per-shape order
        torch.testing.assert_close(sums, fused, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(g, g_fused, rtol=1e-5, atol=1e-6)


def test_strategy_setting(monkeypatch):
    monkeypatch.delenv("SAIL_SIGMOID_STRATEGY", raising=False)
    assert ts.strategy_setting() == "auto"
    monkeypatch.setenv("SAIL_SIGMOID_STRATEGY", "cublas")
    with pytest.raises(SailError, match="SAIL_SIGMOID_STRATEGY must be auto, fused or gemm, not 'cublas'"):
        ts.strategy_setting()
    x = F.normalize(torch.randn(8, 16, device=DEVICE), dim=1)
    with pytest.raises(SailError, match="SAIL_SIGMOID_STRATEGY"):
        losses.sigmoid_loss(x, x, 10.0, -10.0, impl="triton")
    monkeypatch.setenv("SAIL_SIGMOID_STRATEGY", "auto")
    assert ts._choose(x, x, None, None, None, 0, 8, 8, 16, False, "ieee") == "fused"  # the interpreter: fused


def test_auto_keeps_the_faster_strategy_timed_after_a_warm_up():
    """`faster` is auto's race: each run warmed up once (compilation, autotuning: not counted), then timed twice
    between device syncs."""
    import time

    calls = []

    def run(name, first, then):
        def call():
            calls.append(name)
            time.sleep(first if calls.count(name) == 1 else then)
        return call

    syncs = []
    # fused compiles slowly but runs fast; gemm the other way round: the warm-up must not decide
    assert ts.faster({"fused": run("fused", 0.2, 0.001), "gemm": run("gemm", 0.0, 0.06)}, lambda: syncs.append(1)) == "fused"
    assert calls == ["fused"] * 3 + ["gemm"] * 3 and len(syncs) == 4
    calls.clear()
    assert ts.faster({"fused": run("fused", 0.0, 0.06), "gemm": run("gemm", 0.0, 0.001)}, lambda: None) == "gemm"


def test_gemm_self_check_accepts_the_real_epilogue_and_names_a_broken_one(monkeypatch):
    monkeypatch.setattr(ts, "_GEMM_PROBLEM", {})
    assert ts.gemm_problem(DEVICE, torch.bfloat16) is None
    real = ts._similarities
    monkeypatch.setattr(ts, "_similarities", lambda x, y: real(x, y) * 0.5)  # a GEMM that scales its output
    monkeypatch.setattr(ts, "_GEMM_PROBLEM", {})
    assert "the gemm kernel disagrees with float64" in ts.gemm_problem(DEVICE, torch.float32)
    monkeypatch.setenv("SAIL_SIGMOID_STRATEGY", "gemm")  # forced where it disagrees: an error, not wrong gradients
    x = F.normalize(torch.randn(8, 16, device=DEVICE), dim=1)
    with pytest.raises(SailError, match="SAIL_SIGMOID_STRATEGY=gemm cannot run here: the gemm kernel disagrees"):
        losses.sigmoid_loss(x, x, 10.0, -10.0, impl="triton")


EPILOGUE_COMPILE = """
import sys, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from sail.train import triton_sigmoid as ts
dt = sys.argv[1]
sig = {"s_ptr": "*fp32", "g_ptr": "*" + dt, "part_ptr": "*fp32", "t_ptr": "*fp32", "b_ptr": "*fp32"}
sig.update({n: "i32" for n in ("R", "M", "diag", "stride_s", "stride_g")})
const = dict(ts.EPILOGUE_META, STORE_G=True)
sig.update({n: "constexpr" for n in const})
src = ASTSource(fn=ts._sigmoid_epilogue_kernel, signature=sig, constexprs=const,
                attrs={(i,): [["tt.divisibility", 16]] for i in (0, 1, 2, 3, 4, 8, 9)})
k = triton.compile(src, target=GPUTarget("cuda", 90, 128), options={"num_warps": 8})
print("ld.global" in k.asm["ptx"], k.metadata.num_warps)
"""


@pytest.mark.slow
@pytest.mark.parametrize("dt", ["bf16", "fp32"])
def test_epilogue_kernel_compiles_for_sm90(dt, tmp_path):
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    env["PYTHONPATH"] = os.pathsep.join([os.getcwd(), env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, "-c", EPILOGUE_COMPILE, dt], env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["True", "8"]
