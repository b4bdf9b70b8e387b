"""Tests for sail.train.losses: blockwise losses against the plain B x B formulas (values and all four
gradients, float64), closed-form values, dtypes, errors, and ALIP's gates on a hand-worked example."""

import math

import pytest
import torch
import torch.nn.functional as F

from sail.core.errors import SailError
from sail.train.losses import ConsistencyGates, info_nce_loss, multi_positive_loss, sigmoid_loss

B, D = 11, 6
BLOCKS = [None, 1, 3, 4, B, 100]  # 3 and 4 do not divide B; 100 > B


def unit(n, d, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=-1)


def leaf(x):
    return x.clone().requires_grad_(True)


def scalars(t=4.0, b=-2.0, dtype=torch.float64):
    # t as the exponent of a learnable log-scale, the way the heads hold it
    log_t = torch.tensor(math.log(t), dtype=dtype, requires_grad=True)
    return log_t, torch.tensor(b, dtype=dtype, requires_grad=True)


# plain reference formulas, written the obvious way with the whole B x B matrix


def ref_sigmoid(x, ys, t, b, average):
    n = x.shape[0]
    z = 2 * torch.eye(n, dtype=x.dtype) - 1
    total = sum(-F.logsigmoid(z * (t * x @ y.T + b)).sum() for y in ys)
    return total / (len(ys) * n * n if average == "pairs" else n)


def ref_info_nce(x, y, t, eps, w):
    logits = t * x @ y.T
    labels = torch.arange(x.shape[0])
    i2t = F.cross_entropy(logits, labels, reduction="none", label_smoothing=eps)
    t2i = F.cross_entropy(logits.T, labels, reduction="none", label_smoothing=eps)
    per = (i2t + t2i) / 2
    return (per if w is None else w * per).mean()


def run(fn, inputs):
    """Loss value and gradients w.r.t. every input leaf (inputs: list of leaf tensors)."""
    loss = fn(*inputs)
    return loss.detach(), torch.autograd.grad(loss, inputs)


def assert_close(a, b, rtol=1e-5):
    err = (a - b).abs().max().item()
    scale = max(b.abs().max().item(), 1e-12)
    assert err <= rtol * scale, f"relative error {err / scale:.2e}"


def check_against_reference(ours, ref, inputs, rtol=1e-5):
    v1, g1 = run(ours, [leaf(v) for v in inputs])
    v2, g2 = run(ref, [leaf(v) for v in inputs])
    assert_close(v1, v2, rtol)
    for a, b in zip(g1, g2):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert_close(a, b, rtol)


# ---------------------------------------------------------------------------------------------------
# sigmoid and multi-positive


@pytest.mark.parametrize("average", ["pairs", "rows"])
@pytest.mark.parametrize("block", BLOCKS)
def test_sigmoid_matches_plain_formula(average, block):
    x, y = unit(B, D, 0), unit(B, D, 1)
    log_t, b = scalars()
    check_against_reference(
        lambda x, y, lt, b: sigmoid_loss(x, y, lt.exp(), b, average=average, block_size=block),
        lambda x, y, lt, b: ref_sigmoid(x, [y], lt.exp(), b, average),
        [x, y, log_t.detach(), b.detach()],
    )


@pytest.mark.parametrize("average", ["pairs", "rows"])
@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("block", [None, 1, 4, B])
def test_multi_positive_matches_plain_formula(average, k, block):
    x, ys = unit(B, D, 0), [unit(B, D, 10 + i) for i in range(k)]
    log_t, b = scalars(t=7.0, b=-3.0)

    def ours(x, lt, b, *ys):
        return multi_positive_loss(x, list(ys), lt.exp(), b, average=average, block_size=block)

    def ref(x, lt, b, *ys):
        return ref_sigmoid(x, ys, lt.exp(), b, average)

    check_against_reference(ours, ref, [x, log_t.detach(), b.detach(), *ys])


def test_multi_positive_with_one_caption_set_is_sigmoid_loss():
    x, y = unit(B, D, 0), unit(B, D, 1)
    t, b = torch.tensor(5.0, dtype=torch.float64), torch.tensor(-1.0, dtype=torch.float64)
    for average in ("pairs", "rows"):
        assert multi_positive_loss(x, [y], t, b, average=average).item() == pytest.approx(
            sigmoid_loss(x, y, t, b, average=average).item(), rel=1e-12
        )


def test_sigmoid_closed_form_at_zero_logits():
    # t = 0, b = 0: every pair costs log 2, so "pairs" gives log 2 and "rows" gives B log 2
    x, y = unit(B, D, 0), unit(B, D, 1)
    zero = torch.tensor(0.0, dtype=torch.float64)
    assert sigmoid_loss(x, y, zero, zero).item() == pytest.approx(math.log(2), rel=1e-12)
    assert sigmoid_loss(x, y, zero, zero, average="rows").item() == pytest.approx(B * math.log(2), rel=1e-12)


def test_sigmoid_stable_at_large_scale():
    # SAIL's late-training regime: t = 100, b = -10 gives logits up to +-110; still finite and exact
    x = unit(B, D, 0)
    y = F.normalize(x + 0.05 * unit(B, D, 1), dim=-1)
    log_t, b = scalars(t=100.0, b=-10.0)
    check_against_reference(
        lambda x, y, lt, b: sigmoid_loss(x, y, lt.exp(), b, block_size=3),
        lambda x, y, lt, b: ref_sigmoid(x, [y], lt.exp(), b, "pairs"),
        [x, y, log_t.detach(), b.detach()],
    )


# ---------------------------------------------------------------------------------------------------
# info-nce


@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("block", BLOCKS)
def test_info_nce_matches_plain_formula(eps, weighted, block):
    x, y = unit(B, D, 0), unit(B, D, 1)
    log_t, _ = scalars(t=9.0)
    w = torch.rand(B, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * 2
    w = w if weighted else None
    check_against_reference(
        lambda x, y, lt: info_nce_loss(x, y, lt.exp(), label_smoothing=eps, weights=w, block_size=block),
        lambda x, y, lt: ref_info_nce(x, y, lt.exp(), eps, w),
        [x, y, log_t.detach()],
    )


def test_info_nce_closed_form_and_weight_normalisation():
    x, y = unit(B, D, 0), unit(B, D, 1)
    zero = torch.tensor(0.0, dtype=torch.float64)
    # t = 0: uniform softmax, each CE is log B
    assert info_nce_loss(x, y, zero).item() == pytest.approx(math.log(B), rel=1e-12)
    # weights divide by B, not by their sum: halving every weight halves the loss
    t = torch.tensor(5.0, dtype=torch.float64)
    full = info_nce_loss(x, y, t).item()
    half = info_nce_loss(x, y, t, weights=torch.full((B,), 0.5, dtype=torch.float64)).item()
    assert half == pytest.approx(full / 2, rel=1e-12)


def test_info_nce_weights_get_no_gradient():
    x, y = leaf(unit(B, D, 0)), leaf(unit(B, D, 1))
    w = torch.rand(B, dtype=torch.float64, requires_grad=True)
    info_nce_loss(x, y, torch.tensor(3.0, dtype=torch.float64), weights=w).backward()
    assert w.grad is None and x.grad is not None


# ---------------------------------------------------------------------------------------------------
# autograd plumbing, dtypes, errors


def test_backward_scales_by_grad_output_and_accumulates():
    x, y = unit(B, D, 0), unit(B, D, 1)
    log_t, b = scalars()
    xa, ya = leaf(x), leaf(y)
    sigmoid_loss(xa, ya, log_t.exp(), b).backward()
    g_x, g_t, g_b = xa.grad.clone(), log_t.grad.clone(), b.grad.clone()
    xb, yb = leaf(x), leaf(y)
    log_t.grad, b.grad = None, None
    loss = sigmoid_loss(xb, yb, log_t.exp(), b)
    (3 * loss).backward(retain_graph=True)
    loss.backward()  # second backward through the same graph accumulates
    assert_close(xb.grad, 4 * g_x, 1e-12)
    assert_close(log_t.grad, 4 * g_t, 1e-12)
    assert_close(b.grad, 4 * g_b, 1e-12)


def test_partial_requires_grad_and_no_grad():
    x, y = unit(B, D, 0), unit(B, D, 1)
    log_t, b = scalars()
    # only t requires grad
    g_ours = torch.autograd.grad(sigmoid_loss(x, y, log_t.exp(), b.detach()), log_t)[0]
    g_ref = torch.autograd.grad(ref_sigmoid(x, [y], log_t.exp(), b.detach(), "pairs"), log_t)[0]
    assert_close(g_ours, g_ref)
    # nothing requires grad: a plain value, no graph
    with torch.no_grad():
        v = info_nce_loss(x, y, log_t.exp(), label_smoothing=0.1)
    assert not v.requires_grad
    assert v.item() == pytest.approx(ref_info_nce(x, y, log_t.exp().detach(), 0.1, None).item(), rel=1e-12)


def test_float32_and_bfloat16_inputs():
    x64, y64 = unit(64, 16, 0), unit(64, 16, 1)
    t, b = torch.tensor(10.0), torch.tensor(-5.0)
    ref = ref_sigmoid(x64, [y64], t.double(), b.double(), "pairs").item()
    x32, y32 = leaf(x64.float()), leaf(y64.float())
    loss = sigmoid_loss(x32, y32, t, b, block_size=5)
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(ref, rel=1e-5)
    loss.backward()
    assert x32.grad.dtype == torch.float32
    xb, yb = leaf(x64.bfloat16()), leaf(y64.bfloat16())
    loss = info_nce_loss(xb, yb, t)  # computed in float32 internally
    assert loss.dtype == torch.float32
    loss.backward()
    assert xb.grad.dtype == torch.bfloat16 and torch.isfinite(xb.grad.float()).all()


# dtype policy: the inputs' dtype picks the matmul dtype, autocast does not


LOSSES = {
    "sigmoid": lambda x, ys, t, b: sigmoid_loss(x, ys[0], t, b, block_size=7),
    "multi-positive": lambda x, ys, t, b: multi_positive_loss(x, ys, t, b, block_size=7),
    "info-nce": lambda x, ys, t, b: info_nce_loss(x, ys[0], t, label_smoothing=0.1, block_size=7),
}
REFS = {
    "sigmoid": lambda x, ys, t, b: ref_sigmoid(x, ys[:1], t, b, "pairs"),
    "multi-positive": lambda x, ys, t, b: ref_sigmoid(x, ys, t, b, "pairs"),
    "info-nce": lambda x, ys, t, b: ref_info_nce(x, ys[0], t, 0.1, None),
}


def record_mm(monkeypatch):
    """Dtypes of every torch.mm's operands and result (autocast would show as a bf16 result)."""
    seen, mm = set(), torch.mm

    def recorder(a, b, **kw):
        out = mm(a, b, **kw)
        seen.update((a.dtype, b.dtype, out.dtype))
        return out

    monkeypatch.setattr(torch, "mm", recorder)
    return seen


@pytest.mark.parametrize("loss", list(LOSSES))
@pytest.mark.parametrize("dtype, matmul", [(torch.float64, torch.float64), (torch.float32, torch.float32),
                                           (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32)])
def test_matmul_dtype_follows_the_inputs_even_under_autocast(monkeypatch, loss, dtype, matmul):
    x, ys = leaf(unit(20, 8, 0).to(dtype)), [leaf(unit(20, 8, s).to(dtype)) for s in (1, 2)]
    seen = record_mm(monkeypatch)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a caller's autocast must not turn fp32 into bf16
        value = LOSSES[loss](x, ys, torch.tensor(5.0), torch.tensor(-2.0))
    value.backward()
    assert seen == {matmul}
    assert value.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert x.grad.dtype == dtype and ys[0].grad.dtype == dtype


@pytest.mark.parametrize("loss", list(LOSSES))
def test_bfloat16_inputs_match_float64_of_the_same_values(loss):
    # bf16 matmuls with fp32 element-wise work: within bf16 rounding of the exact (float64) loss of the
    # same bf16 values; gradients point the same way (cosine) and t, b gradients agree to ~1e-2
    x = unit(300, 64, 0).bfloat16()
    ys = [F.normalize(x.double() + 0.7 * unit(300, 64, s), dim=-1).bfloat16() for s in (1, 2)]
    log_t, b = scalars(t=20.0, b=-10.0)

    def go(dt, fn):
        leaves = [leaf(v.to(dt)) for v in (x, *ys)]
        lt, bb = leaf(log_t.detach()), leaf(b.detach())
        value = fn(leaves[0], leaves[1:], lt.exp(), bb)
        value.backward()
        return value.detach().double(), [v.grad if v.grad is None else v.grad.double() for v in leaves] + [lt.grad, bb.grad]

    v16, g16 = go(torch.bfloat16, LOSSES[loss])
    v64, g64 = go(torch.float64, REFS[loss])
    assert abs(v16 - v64) <= 1e-3 * abs(v64)
    for a, b_ in zip(g16, g64):
        if b_ is None:  # info-nce has no bias
            continue
        if a.numel() == 1:
            assert abs(a - b_) <= 1e-2 * abs(b_) + 1e-9
        else:
            assert F.cosine_similarity(a.flatten(), b_.flatten(), dim=0) >= 0.999


def test_float16_gradients_survive_loss_scaling():
    # "pairs" at B = 2048: the embedding gradients (~1e-6) are fp16 subnormals (spacing 6e-8); kept in
    # fp32 until grad_output (a GradScaler's scale) multiplies them, they come back exact to fp16 rounding
    x, y = unit(2048, 16, 0), unit(2048, 16, 1)
    t, b = torch.tensor(1.0), torch.tensor(0.0)
    x16, y16 = leaf(x.half()), leaf(y.half())
    (sigmoid_loss(x16, y16, t, b) * 65536.0).backward()
    x64, y64 = leaf(x.half().double()), leaf(y.half().double())
    (ref_sigmoid(x64, [y64], t.double(), b.double(), "pairs") * 65536.0).backward()
    assert x16.grad.dtype == torch.float16
    assert x64.grad.abs().max() < 1e-4 * 65536  # unscaled they would be subnormal in fp16
    assert_close(x16.grad.double(), x64.grad, rtol=2e-3)
    assert_close(y16.grad.double(), y64.grad, rtol=2e-3)


def test_python_float_scalars():
    x, y = unit(B, D, 0), unit(B, D, 1)
    got = sigmoid_loss(x, y, 4.0, -2.0).item()
    assert got == pytest.approx(ref_sigmoid(x, [y], 4.0, -2.0, "pairs").item(), rel=1e-12)


def test_user_errors():
    x, y = unit(B, D, 0), unit(B, D, 1)
    t, b = torch.tensor(1.0), torch.tensor(0.0)
    with pytest.raises(SailError, match="average"):
        sigmoid_loss(x, y, t, b, average="mean")
    with pytest.raises(SailError, match="average"):
        multi_positive_loss(x, [y], t, b, average="sum")
    with pytest.raises(SailError, match=r"\(B, D\)"):
        sigmoid_loss(x, y[:-1], t, b)
    with pytest.raises(SailError, match="texts"):
        multi_positive_loss(x, [], t, b)
    with pytest.raises(SailError, match="texts"):
        multi_positive_loss(x, y, t, b)
    with pytest.raises(SailError, match="block_size"):
        sigmoid_loss(x, y, t, b, block_size=0)
    with pytest.raises(SailError, match="weights"):
        info_nce_loss(x, y, t, weights=torch.ones(B + 1))
    with pytest.raises(SailError, match="label_smoothing"):
        info_nce_loss(x, y, t, label_smoothing=1.5)
    with pytest.raises(SailError, match="scalar"):
        sigmoid_loss(x, y, torch.ones(2), b)


# ---------------------------------------------------------------------------------------------------
# ALIP consistency gates: a worked example (momentum 0.5, gamma_s 2, gamma_p 3), computed by hand


def test_consistency_gates_worked_example():
    gates = ConsistencyGates(momentum=0.5, gamma_s=2.0, gamma_p=3.0)
    f64 = dict(dtype=torch.float64)
    # call 1: batch means 0.5, 0.375, 0.5625 -> H = 0.5 * 1 + 0.5 * mean = 0.75, 0.6875, 0.78125
    s_tc = torch.tensor([0.75, 0.25, 0.5, 0.5], **f64)  # sample 0 ties H_tc: W_s = exp(0) = 1, not < 1
    s_xt = torch.tensor([0.5, 0.25, 0.5, 0.25], **f64)
    s_xc = torch.tensor([0.25, 0.75, 0.25, 1.0], **f64)
    w_t, w_c = gates(s_tc, s_xt, s_xc)
    assert [gates.H_tc.item(), gates.H_xt.item(), gates.H_xc.item()] == [0.75, 0.6875, 0.78125]
    # W_s = exp(2 (S_tc - 0.75)) = [1, e^-1, e^-0.5, e^-0.5]
    # W_t = exp(3 (S_xt - 0.6875)) = [1, e^-1.3125, e^-0.5625, e^-1.3125]
    # W_c = exp(3 (S_xc - 0.78125)) = [1, e^-0.09375, e^-1.59375, e^0.65625]  (last one > 1: not capped)
    # W_s W_t = e^[0, -2.3125, -1.0625, -1.8125], W_s W_c = e^[0, -1.09375, -2.09375, 0.15625]
    want_t = [1.0, 0.0990134083638263, 0.3455907525769745, 0.16324551245395838]
    want_c = [1.0, 0.33495804292529496, 0.12322417764723749, 1.1691184461695043]
    assert w_t.tolist() == pytest.approx(want_t, rel=1e-12)
    assert w_c.tolist() == pytest.approx(want_c, rel=1e-12)

    # call 2: means 0.5, 0.5, 0.5625 -> H = 0.625, 0.59375, 0.671875
    s_tc = torch.tensor([1.0, 0.0, 0.5, 0.5], **f64)  # sample 0 above H_tc: all weights 1
    s_xt = torch.tensor([0.0, 0.5, 0.75, 0.75], **f64)
    s_xc = torch.tensor([0.5, 0.25, 1.0, 0.5], **f64)
    w_t, w_c = gates(s_tc, s_xt, s_xc)
    assert [gates.H_tc.item(), gates.H_xt.item(), gates.H_xc.item()] == [0.625, 0.59375, 0.671875]
    # W_s = [1, e^-1.25, e^-0.25, e^-0.25]; W_t = [1, e^-0.28125, e^0.46875, e^0.46875]
    # W_c = [1, e^-1.265625, e^0.984375, e^-0.515625]
    # W_s W_t = e^[0, -1.53125, 0.21875, 0.21875], W_s W_c = e^[0, -2.515625, 0.734375, -0.765625]
    want_t = [1.0, 0.21626516682988728, 1.2445201077660952, 1.2445201077660952]
    want_c = [1.0, 0.08081238867682221, 2.0841789734955687, 0.4650431881340563]
    assert w_t.tolist() == pytest.approx(want_t, rel=1e-12)
    assert w_c.tolist() == pytest.approx(want_c, rel=1e-12)


def test_consistency_gates_defaults_eval_and_ablation():
    gates = ConsistencyGates()
    assert gates.momentum == 0.99 and gates.gamma_s == 2.0 and gates.gamma_p == 2.0
    assert set(dict(gates.named_buffers())) == {"H_tc", "H_xt", "H_xc"}
    s = torch.full((4,), 0.5, requires_grad=True)
    w_t, w_c = gates(s, s, s)
    assert gates.H_tc.item() == pytest.approx(0.995)  # 0.99 * 1 + 0.01 * 0.5
    assert not w_t.requires_grad and not w_c.requires_grad
    assert w_t.tolist() == pytest.approx([math.exp(2 * (0.5 - 0.995)) ** 2] * 4, rel=1e-6)
    gates.eval()  # no running-mean update outside training
    gates(s, s, s)
    assert gates.H_tc.item() == pytest.approx(0.995)
    off = ConsistencyGates(enabled=False)
    w_t, w_c = off(s * 0, s, s)
    assert w_t.tolist() == [1.0] * 4 and w_c.tolist() == [1.0] * 4


@pytest.mark.parametrize("loss", ["sigmoid", "info-nce"])
def test_no_gradients_are_computed_under_no_grad_even_for_inputs_that_require_grad(loss, monkeypatch):
    import sail.train.losses as L

    seen = []
    for name in ("_multi_positive_kernel", "_info_nce_kernel"):
        real = getattr(L, name)
        monkeypatch.setattr(L, name, lambda *a, _real=real, **k: seen.append(k["want_grad"]) or _real(*a, **k))
    x, y = unit(B, D, 0).requires_grad_(), unit(B, D, 1).requires_grad_()
    log_t, b = scalars()
    fn = (lambda: sigmoid_loss(x, y, log_t.exp(), b, impl="torch")) if loss == "sigmoid" else \
        (lambda: info_nce_loss(x, y, log_t.exp()))
    with torch.no_grad():
        v = fn()
    assert seen == [False] and not v.requires_grad
    w = fn()
    assert seen == [False, True] and w.requires_grad and v.item() == w.item()
