"""Two-process gloo test of the distributed losses: each rank holds half of a fixed global batch.

Checks the documented convention on every rank: the loss equals the single-process loss of the global
batch, the local embeddings' gradients equal world_size x the single-process gradients of those rows,
and t / b gradients averaged over ranks equal the single-process ones. Also the gates' global means and
the error for unequal local batches.
"""

import math
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from sail.core.errors import SailError
from sail.train.losses import ConsistencyGates, info_nce_loss, multi_positive_loss, sigmoid_loss

WORLD, B, D = 2, 10, 5  # global batch B, split 5 + 5


def unit(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)


def ref_sigmoid(x, ys, t, b):
    z = 2 * torch.eye(x.shape[0], dtype=x.dtype) - 1
    return sum(-F.logsigmoid(z * (t * x @ y.T + b)).sum() for y in ys) / (len(ys) * x.shape[0] ** 2)


def ref_info_nce(x, y, t, eps, w):
    logits, labels = t * x @ y.T, torch.arange(x.shape[0])
    i2t = F.cross_entropy(logits, labels, reduction="none", label_smoothing=eps)
    t2i = F.cross_entropy(logits.T, labels, reduction="none", label_smoothing=eps)
    return (w * (i2t + t2i) / 2).mean()


def grads(fn, embeddings, log_t, b):
    """Loss and gradients w.r.t. the embeddings, log t and b (fresh leaves each call)."""
    emb = [e.clone().requires_grad_(True) for e in embeddings]
    lt, bb = log_t.clone().requires_grad_(True), b.clone().requires_grad_(True)
    loss = fn(emb, lt.exp(), bb)
    return loss.detach(), torch.autograd.grad(loss, [*emb, lt, bb], allow_unused=True)


def check(rank, name, ours_fn, ref_fn, global_embeddings, log_t, b):
    lo, hi = rank * B // WORLD, (rank + 1) * B // WORLD
    v_ref, g_ref = grads(ref_fn, global_embeddings, log_t, b)
    v, g = grads(ours_fn, [e[lo:hi] for e in global_embeddings], log_t, b)
    k = len(global_embeddings)
    torch.testing.assert_close(v, v_ref, rtol=1e-10, atol=0, msg=f"{name}: loss")
    for i in range(k):
        want = WORLD * g_ref[i][lo:hi]
        torch.testing.assert_close(g[i], want, rtol=1e-10, atol=1e-14, msg=f"{name}: grad {i}")
    for i in range(k, k + 2):
        if g_ref[i] is None:  # info-nce has no bias
            continue
        avg = g[i].clone()
        dist.all_reduce(avg)
        torch.testing.assert_close(avg / WORLD, g_ref[i], rtol=1e-10, atol=1e-14, msg=f"{name}: scalar grad")


def worker(rank, port):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        x, y1, y2, y3 = (unit(B, D, s) for s in range(4))
        log_t, b = torch.tensor(math.log(6.0), dtype=torch.float64), torch.tensor(-2.0, dtype=torch.float64)
        w = torch.rand(B, dtype=torch.float64, generator=torch.Generator().manual_seed(9)) * 2
        lo, hi = rank * B // WORLD, (rank + 1) * B // WORLD

        check(rank, "sigmoid",
              lambda e, t, b: sigmoid_loss(e[0], e[1], t, b, block_size=2),
              lambda e, t, b: ref_sigmoid(e[0], [e[1]], t, b), [x, y1], log_t, b)
        check(rank, "multi-positive",
              lambda e, t, b: multi_positive_loss(e[0], e[1:], t, b, block_size=3),
              lambda e, t, b: ref_sigmoid(e[0], e[1:], t, b), [x, y1, y2, y3], log_t, b)
        check(rank, "info-nce",
              lambda e, t, b: info_nce_loss(e[0], e[1], t, 0.1, weights=w[lo:hi], block_size=2),
              lambda e, t, b: ref_info_nce(e[0], e[1], t, 0.1, w), [x, y1], log_t, b)

        # gates: running means use the global batch mean on every rank
        s = torch.arange(B, dtype=torch.float64) / B  # global mean 0.45
        gates = ConsistencyGates(momentum=0.5)
        gates(s[lo:hi], s[lo:hi], s[lo:hi])
        assert gates.H_tc.item() == pytest.approx(0.5 + 0.5 * 0.45, rel=1e-12)

        # unequal local batches: a clear error on every rank, no hang
        with pytest.raises(SailError, match="same local batch size"):
            sigmoid_loss(x[: 4 + rank], y1[: 4 + rank], 1.0, 0.0)
    finally:
        dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_gloo_matches_single_process():
    mp.spawn(worker, args=(free_port(),), nprocs=WORLD, join=True)
