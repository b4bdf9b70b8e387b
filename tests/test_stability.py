"""Gradient balance of the sigmoid loss: the estimate against autograd on the plain B x B formula, the
suggested t, the warning, and the hook in `sail align`."""

import json
import math

import pytest
import torch

from sail.train import losses
from sail.train.align_heads import AlignConfig, align
from sail.train.stability import GradientBalance, balance_ratio, gradient_balance, sampled_cosines, suggest
from synthetic import paired_stores


def _autograd_share(x, y, t, b):
    """sum |dL/dl| on the diagonal over the total, from autograd on the plain sigmoid loss (float64)."""
    logits = (t * x.double() @ y.double().T + b).requires_grad_(True)
    labels = 2 * torch.eye(len(x), dtype=torch.float64) - 1
    loss = -torch.nn.functional.logsigmoid(labels * logits).mean()
    (g,) = torch.autograd.grad(loss, logits)
    pos = g.diagonal().abs().sum()
    return float(pos / g.abs().sum())


@pytest.mark.parametrize("n,t,b,seed", [(8, 10.0, -10.0, 0), (50, 20.0, -10.0, 1), (97, 3.0, 0.5, 2), (200, 60.0, -4.0, 3)])
def test_share_matches_autograd_when_all_rows_are_used(n, t, b, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.normalize(torch.randn(n, 16, generator=g), dim=1)
    y = torch.nn.functional.normalize(x + 0.8 * torch.randn(n, 16, generator=g), dim=1)
    got = gradient_balance(x, y, t, b, rows=n)
    assert got["pos_grad_share"] == pytest.approx(_autograd_share(x, y, t, b), rel=1e-5)
    # the library loss's own gradient agrees with that reference formula
    tt = torch.tensor(t, dtype=torch.float64)
    bb = torch.tensor(b, dtype=torch.float64)
    ref = -torch.nn.functional.logsigmoid((2 * torch.eye(n, dtype=torch.float64) - 1) * (t * x.double() @ y.double().T + b)).mean()
    assert float(losses.sigmoid_loss(x.double(), y.double(), tt, bb)) == pytest.approx(float(ref), rel=1e-6)


def test_sampled_rows_estimate_the_ratio():
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(2000, 32, generator=g), dim=1)
    y = torch.nn.functional.normalize(x + torch.randn(2000, 32, generator=g), dim=1)
    exact = gradient_balance(x, y, 10.0, -10.0, rows=2000)["neg_pos_grad_ratio"]
    est = [gradient_balance(x, y, 10.0, -10.0, rows=200, seed=s)["neg_pos_grad_ratio"] for s in range(5)]
    assert all(abs(e / exact - 1) < 0.1 for e in est)


def test_init_ratio_grows_with_batch_as_in_the_paper():
    # cosines 0 at init: every negative weighs sigmoid(-10), every positive sigmoid(10)
    pos, neg = torch.zeros(4, dtype=torch.float64), torch.zeros(12, dtype=torch.float64)
    for batch in (1024, 32768, 1 << 20):
        want = (batch - 1) * (1 / (1 + math.exp(10))) / (1 / (1 + math.exp(-10)))
        assert float(balance_ratio(pos, neg, 10.0, -10.0, batch)[0]) == pytest.approx(want, rel=1e-12)


def test_suggested_t_balances_or_lowers_the_ratio_most():
    from sail.train.stability import SCALES

    batch, b = 1 << 20, -10.0
    # negatives pushed apart (cosine -0.5), positives not yet learned (0.05): a larger t balances
    pos, neg = torch.full((64,), 0.05, dtype=torch.float64), torch.full((4032,), -0.5, dtype=torch.float64)
    assert float(balance_ratio(pos, neg, 2.0, b, batch)[0]) > 10
    t_new, b_new = suggest(pos, neg, 2.0, b, batch)
    ratios = balance_ratio(pos, neg, SCALES, b, batch)
    first = int(((SCALES >= 2.0) & (ratios <= 1)).nonzero()[0])
    assert t_new == pytest.approx(float(SCALES[first])) and float(ratios[first - 1]) > 1
    # a b shift by -log(ratio) balances at the current t (negatives are in sigmoid's exp tail)
    assert float(balance_ratio(pos, neg, 2.0, b_new, batch)[0]) == pytest.approx(1.0, rel=0.05)
    # positives already satisfied: no t reaches 1, the suggestion is the t with the lowest ratio
    pos, neg = torch.full((64,), 0.5, dtype=torch.float64), torch.full((4032,), -0.2, dtype=torch.float64)
    t_new, _ = suggest(pos, neg, 5.0, b, batch)
    best = float(balance_ratio(pos, neg, t_new, b, batch)[0])
    assert best <= float(balance_ratio(pos, neg, 5.0, b, batch)[0]) / 2
    assert best == pytest.approx(float(balance_ratio(pos, neg, SCALES[SCALES >= 5.0], b, batch).min()))
    # cosines that t cannot separate: only b helps
    t_none, _ = suggest(torch.zeros(8, dtype=torch.float64), torch.zeros(56, dtype=torch.float64), 10.0, -10.0, 1 << 24)
    assert t_none is None


def test_monitor_warns_once_and_skips_softmax(capsys):
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(64, 8, generator=g), dim=1)
    mon = GradientBalance(batch=1 << 20, loss="sigmoid", threshold=10.0)
    first = mon(x, x, 10.0, -10.0, step=1)
    second = mon(x, x, 10.0, -10.0, step=2)
    err = capsys.readouterr().err
    assert err.count("warning: step 1: negatives carry") == 1 and "--init-bias" in err
    assert first["pos_grad_share"] < 1 / 11 and "pos_grad_share" in second
    assert GradientBalance(batch=64, loss="info-nce")(x, x, 10.0, -10.0, 1) == {}
    quiet = GradientBalance(batch=64, loss="sigmoid")
    quiet(x, x, 10.0, -10.0, 1)
    assert capsys.readouterr().err == "" and not quiet.warned


def test_align_logs_the_share(tmp_path):
    img, txt = paired_stores(tmp_path, n=300, latent=8, image_dim=24, text_dim=16)
    align(AlignConfig(image=str(img), text=str(txt), out=str(tmp_path / "run"), head="linear", out_dim=8, batch=128,
                      steps=3, optimizer="adamw", lr=1e-3, val_fraction=0.2, progress=False, init_scale=10.0))
    rows = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(0 < r["pos_grad_share"] < 1 for r in rows)
    # at step 1 the logits are t x.y + b with the logged t, b: the share must match a direct computation
    assert rows[0]["pos_grad_share"] > 0.5  # batch 128: sigmoid(-10) * 127 << 1, the positives dominate
