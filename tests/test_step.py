"""sail.train.step: the chunked (GradCache) step equals plain autograd on the whole batch, for every head x loss.

The reference is the obvious code: both heads on the whole batch with autograd, the plain B x B loss
formula, backward. Everything runs in float64, so "equal" means equal to float rounding (rtol 1e-10).
Also: the chunk plan covers every row once for thousands of (n, size); activations kept by autograd
scale with the chunk, not the batch; the automatic chunk size follows free memory; two gloo processes
give the single-process gradients for every head x loss (info-nce, whose bias gets no gradient, too).
"""

import math
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from sail.core.errors import SailError
from sail.core.precision import resolve_precision
from sail.train import losses
from sail.train.heads import AlignmentHeads
from sail.train.step import activation_bytes_per_row, auto_chunk_size, chunks, memory_model, train_step

HEADS = ("linear", "mlp", "glu")
LOSSES = ("sigmoid", "multi-positive", "info-nce")
FP32 = resolve_precision("fp32", "cpu")


def loss_fn(name):
    """Our blockwise loss, as sail.train.align_heads calls it (small blocks so several are used)."""
    if name == "sigmoid":
        return lambda x, ys, t, b: losses.sigmoid_loss(x, ys[0], t, b, block_size=3)
    if name == "multi-positive":
        return lambda x, ys, t, b: losses.multi_positive_loss(x, ys, t, b, block_size=3)
    return lambda x, ys, t, b: losses.info_nce_loss(x, ys[0], t, block_size=3)


def plain_loss(name, x, ys, t, b):
    """The B x B formulas written the obvious way."""
    n = x.shape[0]
    if name == "info-nce":
        logits, labels = t * x @ ys[0].T, torch.arange(n)
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    z = 2 * torch.eye(n, dtype=x.dtype) - 1
    used = ys if name == "multi-positive" else ys[:1]
    return sum(-F.logsigmoid(z * (t * x @ y.T + b)).sum() for y in used) / (len(used) * n * n)


def make(head, seed=0, n=23, k=2):
    torch.manual_seed(seed)
    heads = AlignmentHeads(12, 10, 8, head, width=2, init_scale=6.0, init_bias=-2.0).double()
    g = torch.Generator().manual_seed(seed + 1)
    image = torch.randn(n, 12, generator=g, dtype=torch.float64)
    texts = [torch.randn(n, 10, generator=g, dtype=torch.float64) for _ in range(k)]
    return heads, image, texts


def grads_of(heads):
    return {name: None if p.grad is None else p.grad.clone() for name, p in heads.named_parameters()}


def reference(head, loss, n=23):
    heads, image, texts = make(head, n=n)
    x, ys = heads.encode_image(image), [heads.encode_text(t) for t in texts]
    value = plain_loss(loss, x, ys, heads.scale(), heads.logit_bias)
    value.backward()
    return value.item(), grads_of(heads)


def assert_same_grads(got, want, rtol=1e-10):
    assert got.keys() == want.keys()
    for name in want:
        if want[name] is None:
            assert got[name] is None or not got[name].any(), name
            continue
        err = (got[name] - want[name]).abs().max().item()
        assert err <= rtol * max(want[name].abs().max().item(), 1e-300), f"{name}: error {err:.3e}"


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("loss", LOSSES)
def test_chunked_step_equals_plain_autograd(head, loss):
    want_value, want = reference(head, loss)
    for size in (1, 5, 8, 23, 100):  # 5 and 8 do not divide 23; 100 > B
        heads, image, texts = make(head)
        stats = train_step(heads, image, texts, loss_fn(loss), precision=FP32, chunk_size=size)
        assert stats[0].item() == pytest.approx(want_value, rel=1e-10)
        assert_same_grads(grads_of(heads), want)
        assert stats[1].item() == pytest.approx(6.0) and stats[2].item() == pytest.approx(-2.0)
        if loss == "info-nce":
            assert heads.logit_bias.grad is None  # never used, never touched


def test_step_statistics_are_the_mean_positive_and_negative_cosines():
    heads, image, texts = make("linear", n=9, k=1)
    stats = train_step(heads, image, texts, loss_fn("sigmoid"), precision=FP32, chunk_size=4)
    with torch.no_grad():
        s = heads.encode_image(image) @ heads.encode_text(texts[0]).T  # (9, 9) cosines
    off = ~torch.eye(9, dtype=torch.bool)
    assert stats[3].item() == pytest.approx(s.diagonal().mean().item(), rel=1e-6)
    assert stats[4].item() == pytest.approx(s[off].mean().item(), rel=1e-5, abs=1e-7)
    assert stats.device == image.device and stats.dtype == torch.float64  # float64 heads


def test_chunk_plan_covers_every_row_once_in_order():
    for n in range(1, 200):
        for size in list(range(1, 40)) + [n - 1, n, n + 1, 4 * n]:
            if size < 1:
                continue
            parts = chunks(n, size)
            rows = [i for sl in parts for i in range(sl.start, sl.stop)]
            assert rows == list(range(n))
            assert all(0 < sl.stop - sl.start <= size for sl in parts)
            assert len(parts) == math.ceil(n / size)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(SailError, match="--chunk-size must be a positive"):
            chunks(10, bad)


def saved_bytes_peak(heads, image, texts, size):
    """Most bytes autograd holds saved for backward at any moment of a step (hooks see every save)."""
    live, peak = [0], [0]

    def pack(t):
        live[0] += t.numel() * t.element_size()
        peak[0] = max(peak[0], live[0])
        return t

    def unpack(t):
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        # count per chunk: a chunk's graph is freed by its backward before the next chunk runs
        for sl in chunks(image.shape[0], size):
            live[0] = 0
            out = [heads.encode_image(image[sl])] + [heads.encode_text(t[sl]) for t in texts]
            sum(o.sum() for o in out).backward()
    return peak[0]


def test_saved_activations_scale_with_the_chunk_not_the_batch():
    heads, image, texts = make("glu", n=256, k=1)
    whole, chunked = saved_bytes_peak(heads, image, texts, 256), saved_bytes_peak(heads, image, texts, 16)
    assert chunked * 8 < whole  # 16 rows instead of 256, plus the weights autograd also saves
    per_row = activation_bytes_per_row(heads, elem_bytes=8)
    assert whole <= per_row * 256 * 1.5  # the estimate used for the automatic chunk size is an upper bound-ish


def test_auto_chunk_size_follows_free_memory_and_caps():
    heads, _, _ = make("glu")
    per_row = activation_bytes_per_row(heads)
    cpu = torch.device("cpu")
    assert auto_chunk_size(heads, 10**6, cpu, free=4 * per_row * 1000) == 1000
    assert auto_chunk_size(heads, 10**6, cpu, free=1) == 64  # never below 64 rows
    assert auto_chunk_size(heads, 10**6, cpu, free=10**15) == 4096  # CPU cap
    assert auto_chunk_size(heads, 100, cpu, free=10**15) == 100  # never above the batch


def test_memory_model_of_a_million_pair_batch_fits_an_80_gb_gpu():
    with torch.device("meta"):  # sizes only, no 54M weights to initialise
        heads = AlignmentHeads(2048, 1024, 1024, "glu", 4)
    m = memory_model(heads, 1 << 20)
    phases = max(m["embeddings"] + m["loss"], m["grads"] + m["chunk"])
    assert m["peak"] == m["parameters"] + m["features"] + phases
    assert m["features"] == (1 << 20) * 3072 * 2 and m["embeddings"] == 2 * (1 << 20) * 1024 * 2
    assert m["peak"] < 80e9
    heads_only = activation_bytes_per_row(heads, 2) * (1 << 20)  # what unchunked autograd would keep
    assert heads_only > 80e9


def test_fp16_style_scaled_backward_gives_the_same_gradients():
    # a GradScaler multiplies the loss; the chunk backward sees scaled embedding gradients; unscaling
    # must give back exactly the unscaled gradients (float64, scale a power of two)
    class Scaler:
        def scale(self, loss):
            return loss * 1024.0

    want_value, want = reference("mlp", "sigmoid")
    heads, image, texts = make("mlp")
    train_step(heads, image, texts, loss_fn("sigmoid"), precision=FP32, chunk_size=7, scaler=Scaler())
    got = {k: None if v is None else v / 1024.0 for k, v in grads_of(heads).items()}
    assert_same_grads(got, want)


def test_bf16_step_runs_bf16_heads_and_bf16_loss(monkeypatch):
    # under bf16 autocast the embeddings reach the loss in bf16 and gradients stay close to fp32's
    from sail.core import precision

    monkeypatch.setattr(precision, "native_bf16", lambda device: True)
    bf16 = resolve_precision("bf16", "cpu")
    seen = []
    fn = loss_fn("sigmoid")

    def spy(x, ys, t, b):
        seen.append(x.dtype)
        return fn(x, ys, t, b)

    heads, image, texts = make("glu", n=64, k=1)
    heads.float()
    train_step(heads, image.float(), [t.float() for t in texts], spy, precision=bf16, chunk_size=16)
    got = grads_of(heads)
    heads.zero_grad(set_to_none=True)
    train_step(heads, image.float(), [t.float() for t in texts], fn, precision=FP32, chunk_size=16)
    want = grads_of(heads)
    assert seen == [torch.bfloat16]
    for name in ("image_head.w_out.weight", "text_head.w1.weight"):
        assert F.cosine_similarity(got[name].flatten(), want[name].flatten(), dim=0) > 0.99


def test_bf16_loss_gets_bf16_even_where_autocast_normalises_in_float32(monkeypatch):
    # CUDA autocast runs F.normalize's norm in float32, so the heads' embeddings come out float32 there (on
    # CPU they stay bf16); the loss must still get bf16 (measured on an H200: a 1M step took 33 s, 2x the
    # bf16 loss, before this cast). Mimic CUDA by normalising in float32 inside the heads.
    from sail.core import precision

    monkeypatch.setattr(precision, "native_bf16", lambda device: True)
    heads, image, texts = make("glu", n=32, k=1)
    heads.float()
    for name in ("encode_image", "encode_text"):
        real = getattr(heads, name)
        monkeypatch.setattr(heads, name, lambda f, real=real: F.normalize(real(f).float(), dim=-1))
    seen = []
    fn = loss_fn("sigmoid")

    def spy(x, ys, t, b):
        seen.append((x.dtype, ys[0].dtype))
        return fn(x, ys, t, b)

    train_step(heads, image.float(), [t.float() for t in texts], spy, precision=resolve_precision("bf16", "cpu"),
               chunk_size=8)
    assert seen == [(torch.bfloat16, torch.bfloat16)]


# ------------------------------------------------------------------------------------------ distributed


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, port, world, results):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        for head in HEADS:
            for loss in LOSSES:
                heads, image, texts = make(head, n=24)
                lo, hi = rank * 24 // world, (rank + 1) * 24 // world
                train_step(heads, image[lo:hi], [t[lo:hi] for t in texts], loss_fn(loss), precision=FP32,
                           chunk_size=5)
                if rank == 0:
                    results[f"{head}/{loss}"] = grads_of(heads)
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_give_the_single_process_gradients():
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_worker, args=(_free_port(), 2, results), nprocs=2, join=True)
    for head in HEADS:
        for loss in LOSSES:
            _, want = reference(head, loss, n=24)
            assert_same_grads(results[f"{head}/{loss}"], want, rtol=1e-9)


ALIGN_EVERY_COMBINATION = '''
import sys
from sail.train.align_heads import AlignConfig, align
img, txt, out = sys.argv[1:4]
for head in ("linear", "mlp", "glu"):
    for loss in ("sigmoid", "multi-positive", "info-nce"):
        align(AlignConfig(image=img, text=txt, out=f"{out}/{head}-{loss}", head=head, loss=loss, width=2,
                          out_dim=16, batch=64, steps=3, optimizer="adamw", lr=1e-3, weight_decay=0.0,
                          val_fraction=0.1, eval_every=3, checkpoint_every=2, chunk_size=12, in_memory="yes",
                          progress=False, log_every=1))
'''


@pytest.mark.slow
def test_sail_align_under_torchrun_matches_one_process_for_every_head_and_loss(tmp_path):
    # One torchrun invocation loops over all 9 combinations (one process group, 9 runs); info-nce used
    # to crash at step 2 under DDP because the bias never receives a gradient.
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file
    from synthetic import paired_stores

    img, txt = paired_stores(tmp_path, n=600, captions=("caption", "long_caption"))
    script = tmp_path / "every.py"
    script.write_text(ALIGN_EVERY_COMBINATION)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, str(script), str(img), str(txt), str(tmp_path / "one")], check=True, env=env,
                   stdout=subprocess.DEVNULL, timeout=900)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        str(_free_port()), str(script), str(img), str(txt), str(tmp_path / "two")],
                       capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    for head in HEADS:
        for loss in LOSSES:
            a = load_file(str(tmp_path / "one" / f"{head}-{loss}" / "model.safetensors"))
            b = load_file(str(tmp_path / "two" / f"{head}-{loss}" / "model.safetensors"))
            assert a.keys() == b.keys()
            for k in a:
                assert torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4), f"{head}/{loss}: {k}"


@pytest.mark.parametrize("name", ["adamw", "lamb"])
def test_adamw_and_lamb_move_the_heads_at_b2_gradient_sizes(name):
    # Parameter gradients at B^2 normalisation are ~1e-9 .. 1e-8 at B = 36864 (benchmarks/align_step.py
    # prints them). Adam's first step is lr * g / (|g| + eps): with the default eps it is ~lr * sign(g);
    # torch's 1e-8 would shrink it (AdamW) or turn LAMB's direction from sign(g) into g.
    from sail.train.optim import build_optimizer

    def first_step(eps):
        torch.manual_seed(0)
        heads = AlignmentHeads(12, 10, 8, "mlp", width=2)
        g = torch.Generator().manual_seed(1)
        grads = {n: 3e-9 * torch.randn(p.shape, generator=g) for n, p in heads.named_parameters()}
        opt = build_optimizer(name, heads.param_groups(0.0), lr=1e-3, weight_decay=0.0, eps=eps)
        before = {n: p.detach().clone() for n, p in heads.named_parameters()}
        for n, p in heads.named_parameters():
            p.grad = grads[n].clone()
        opt.step()
        w = "image_head.fc1.weight"
        step = dict(heads.named_parameters())[w].detach() - before[w]
        return step, grads[w]

    step, grad = first_step(None)
    cos_sign = F.cosine_similarity(-step.flatten(), grad.sign().flatten(), dim=0).item()
    damped, dgrad = first_step(1e-8 if name == "adamw" else 1e-6)  # torch's / the old LAMB default
    cos_damped = F.cosine_similarity(-damped.flatten(), dgrad.sign().flatten(), dim=0).item()
    assert cos_sign > 0.999  # Adam's normalised direction
    if name == "adamw":
        assert step.abs().mean().item() == pytest.approx(1e-3, rel=1e-2)  # a full lr-sized step
        assert damped.abs().mean().item() < 0.3e-3
    else:
        assert cos_damped < 0.9  # eps-dominated: direction follows g, not g / sqrt(v)


# ------------------------------------------------------------------------------------------ the align loop


def _align_cfg(tmp_path, **kw):
    from sail.train.align_heads import AlignConfig
    from synthetic import paired_stores

    img, txt = paired_stores(tmp_path, n=400)
    base = dict(image=str(img), text=str(txt), out=str(tmp_path / "run"), head="linear", out_dim=16, batch=64,
                steps=20, lr=1e-3, optimizer="adamw", weight_decay=0.0, val_fraction=0.1, eval_every=1000,
                checkpoint_every=1000, progress=False, chunk_size=24)
    base.update(kw)
    return AlignConfig(**base)


def test_align_logs_interval_means_every_log_every_steps(tmp_path):
    import json

    from sail.train.align_heads import align

    align(_align_cfg(tmp_path, log_every=7, out=str(tmp_path / "a")))
    rows = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [7, 14, 20]  # every 7 steps and the last
    align(_align_cfg(tmp_path, log_every=1, out=str(tmp_path / "b")))
    every = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert len(every) == 20
    for r, (lo, hi) in zip(rows, [(0, 7), (7, 14), (14, 20)]):  # the same run, logged as interval means
        assert r["loss"] == pytest.approx(sum(e["loss"] for e in every[lo:hi]) / (hi - lo), rel=1e-5)
        assert r["t"] == pytest.approx(every[hi - 1]["t"], rel=1e-6)


def test_align_stops_on_nan_at_the_next_log_point_naming_the_first_bad_step(tmp_path):
    from sail.train.align_heads import align

    with pytest.raises(SailError, match=r"loss became nan at step 2; the last good checkpoint is .*checkpoint-00000001"):
        align(_align_cfg(tmp_path, lr=1e30, steps=40, log_every=5, checkpoint_every=1))
    with pytest.raises(SailError, match=r"loss became nan at step 2; no checkpoint was written yet"):
        align(_align_cfg(tmp_path, lr=1e30, steps=40, log_every=5, checkpoint_every=100, out=str(tmp_path / "c")))
    assert not (tmp_path / "c" / "model.safetensors").exists()


def test_align_refuses_bad_chunk_size_and_log_every(tmp_path):
    from sail.train.align_heads import align

    for kw, flag in (({"chunk_size": 0}, "--chunk-size"), ({"log_every": -1}, "--log-every")):
        with pytest.raises(SailError, match=f"{flag} -?[0-9]+ is invalid: must be at least 1"):
            align(_align_cfg(tmp_path, **kw))
        assert not (tmp_path / "run").exists()


def test_gradcache_core_equals_one_backward_over_chunkings():
    """sail.train.step.gradcache (the core both steps share): for many batch sizes and chunkings, with row sets that
    are slices or scattered index tensors and an extra output whose gradient is taken once, the parameters'
    gradients equal one plain backward over the whole batch (float64)."""
    from sail.train.step import gradcache

    gen = torch.Generator().manual_seed(0)
    for trial in range(300):
        n = int(torch.randint(1, 40, (1,), generator=gen))
        k = int(torch.randint(1, n + 1, (1,), generator=gen))  # chunks
        f = torch.nn.Linear(5, 3).double()
        g = torch.nn.Linear(4, 3).double()
        s = torch.nn.Parameter(torch.tensor(1.5, dtype=torch.float64))
        a = torch.randn(n, 5, generator=gen, dtype=torch.float64)
        b = torch.randn(n, 4, generator=gen, dtype=torch.float64)
        perm = torch.randperm(n, generator=gen)  # text rows scattered over the batch, as the towers' columns are

        def loss_of(x, y, scale):  # couples every row with every other: no per-chunk shortcut gives it
            return (scale * torch.tanh(x @ y.T)).logsumexp(1).mean() + (x - y).pow(2).sum() / n

        loss_of(f(a), g(b[perm]), s * 2).backward()
        want = [p.grad.clone() for p in (*f.parameters(), *g.parameters(), s)]
        for p in (*f.parameters(), *g.parameters(), s):
            p.grad = None
        parts = [c for c in torch.arange(n).tensor_split(k) if len(c)]
        use_slices = trial % 2 == 0

        def rows(c):
            return [slice(int(c[0]), int(c[-1]) + 1) if use_slices else c, c]

        def embed(c):
            return [f(a[c]), g(b[perm[c]])], [s * 2]

        loss = gradcache(embed, parts, rows, lambda leaves, extra: loss_of(leaves[0], leaves[1], extra[0]))
        assert torch.isfinite(loss)
        got = [p.grad for p in (*f.parameters(), *g.parameters(), s)]
        for w, h in zip(want, got):
            torch.testing.assert_close(h, w, rtol=1e-10, atol=1e-12)
