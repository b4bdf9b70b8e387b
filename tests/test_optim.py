"""Tests for sail/train/optim.py: Lion and LAMB against plain formulas, schedules at key steps, exact resume."""

import math

import pytest
import torch

from sail.core.errors import SailError
from sail.train.heads import AlignmentHeads
from sail.train.optim import LAMB, Lion, build_optimizer, cosine_with_warmup, linear_warmup_decay, one_cycle


def grads_for(steps, shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=g, dtype=torch.float64) for s in shapes] for _ in range(steps)]


def run(opt_cls, init, grads, **kw):
    params = [torch.nn.Parameter(p.clone()) for p in init]
    opt = opt_cls(params, **kw)
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()
    return [p.detach() for p in params]


# ------------------------------------------------------------------ Lion
def lion_reference(init, grads, lr, beta1, beta2, wd):
    ps = [p.clone() for p in init]
    ms = [torch.zeros_like(p) for p in init]
    for step_grads in grads:
        for i, g in enumerate(step_grads):
            c = beta1 * ms[i] + (1 - beta1) * g
            ps[i] = ps[i] - lr * (torch.sign(c) + wd * ps[i])
            ms[i] = beta2 * ms[i] + (1 - beta2) * g
    return ps


@pytest.mark.parametrize("wd", [0.0, 0.3])
def test_lion_matches_formula(wd):
    shapes = [(4, 3), (5,)]
    init = [t for t in grads_for(1, shapes, seed=1)[0]]
    grads = grads_for(6, shapes)
    got = run(Lion, init, grads, lr=0.01, betas=(0.8, 0.95), weight_decay=wd)
    want = lion_reference(init, grads, 0.01, 0.8, 0.95, wd)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    # every coordinate moves by exactly lr (up to decay) in the first step: sign update
    first = run(Lion, init, grads[:1], lr=0.01, betas=(0.8, 0.95), weight_decay=0.0)
    torch.testing.assert_close((first[0] - init[0]).abs(), torch.full((4, 3), 0.01, dtype=torch.float64))


def test_lion_paper_defaults():
    opt = Lion([torch.nn.Parameter(torch.zeros(2))])
    assert opt.defaults == {"lr": 1e-5, "betas": (0.9, 0.99), "weight_decay": 1e-7}


# ------------------------------------------------------------------ LAMB
def lamb_reference(init, grads, lr, beta1, beta2, eps, wd):
    ps = [p.clone() for p in init]
    ms = [torch.zeros_like(p) for p in init]
    vs = [torch.zeros_like(p) for p in init]
    for t, step_grads in enumerate(grads, start=1):
        for i, g in enumerate(step_grads):
            ms[i] = beta1 * ms[i] + (1 - beta1) * g
            vs[i] = beta2 * vs[i] + (1 - beta2) * g * g
            m_hat = ms[i] / (1 - beta1 ** t)
            v_hat = vs[i] / (1 - beta2 ** t)
            r = m_hat / (torch.sqrt(v_hat) + eps) + wd * ps[i]
            p_norm = math.sqrt(float((ps[i] ** 2).sum()))
            r_norm = math.sqrt(float((r ** 2).sum()))
            trust = p_norm / r_norm if p_norm > 0 and r_norm > 0 else 1.0
            ps[i] = ps[i] - lr * trust * r
    return ps


@pytest.mark.parametrize("wd", [0.0, 0.2])
def test_lamb_matches_formula(wd):
    shapes = [(4, 3), (5,), (2, 2, 2)]
    init = grads_for(1, shapes, seed=3)[0]
    init[1] = torch.zeros(5, dtype=torch.float64)  # zero-norm param: trust ratio falls back to 1
    grads = grads_for(7, shapes)
    got = run(LAMB, init, grads, lr=0.05, betas=(0.85, 0.99), eps=1e-6, weight_decay=wd)
    want = lamb_reference(init, grads, 0.05, 0.85, 0.99, 1e-6, wd)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_lamb_zero_norm_edge_cases():
    # zero parameter: the first step is a plain Adam step of size lr (|m_hat / sqrt(v_hat)| = 1)
    g = torch.tensor([[0.5, -2.0, 3.0]], dtype=torch.float64)
    (p,) = run(LAMB, [torch.zeros(1, 3, dtype=torch.float64)], [[g]], lr=0.1, eps=0.0, weight_decay=0.0)
    torch.testing.assert_close(p, -0.1 * torch.sign(g), rtol=0, atol=1e-12)
    # zero gradient and no decay: r = 0, trust 1, the parameter does not move (no NaN from 0/0)
    init = torch.tensor([1.0, -2.0], dtype=torch.float64)
    (p,) = run(LAMB, [init], [[torch.zeros(2, dtype=torch.float64)]] * 3, lr=0.1, weight_decay=0.0)
    assert torch.equal(p, init)
    # trust ratio makes the step size ||p|| * lr regardless of the gradient's scale
    init = torch.tensor([3.0, 4.0], dtype=torch.float64)
    (p,) = run(LAMB, [init], [[torch.tensor([1e-3, 0.0], dtype=torch.float64)]], lr=0.1, eps=1e-12,
               weight_decay=0.0)
    torch.testing.assert_close(p, torch.tensor([3.0 - 0.5, 4.0], dtype=torch.float64), rtol=0, atol=1e-12)


def test_lamb_align_defaults():
    opt = LAMB([torch.nn.Parameter(torch.zeros(2))])
    assert opt.defaults == {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-6, "weight_decay": 1e-5}


# ------------------------------------------------------------------ resume
@pytest.mark.parametrize("name", ["lion", "lamb", "adamw"])
def test_state_dict_resume_gives_identical_steps(name):
    shapes = [(3, 2), (4,)]
    init = grads_for(1, shapes, seed=5)[0]
    grads = grads_for(8, shapes)

    def fresh(values):
        params = [torch.nn.Parameter(v.clone()) for v in values]
        opt = build_optimizer(name, [{"params": params}], lr=0.01, weight_decay=0.1)
        return params, opt, cosine_with_warmup(opt, total_steps=8, warmup_steps=2)

    def steps(params, opt, sched, chunk):
        for gs in chunk:
            for p, g in zip(params, gs):
                p.grad = g.clone()
            opt.step()
            sched.step()

    params, opt, sched = fresh(init)
    steps(params, opt, sched, grads)

    p1, o1, s1 = fresh(init)
    steps(p1, o1, s1, grads[:4])
    opt_state, sched_state = o1.state_dict(), s1.state_dict()
    p2, o2, s2 = fresh([p.detach() for p in p1])
    o2.load_state_dict(opt_state)
    s2.load_state_dict(sched_state)
    steps(p2, o2, s2, grads[4:])
    for a, b in zip(params, p2):
        assert torch.equal(a, b)


# ------------------------------------------------------------------ build_optimizer
def test_build_optimizer_kinds_and_param_groups():
    heads = AlignmentHeads(6, 5, out_dim=4, kind="linear")
    opt = build_optimizer("Lion", heads.param_groups(weight_decay=1e-7), lr=1e-5, weight_decay=123.0)
    assert isinstance(opt, Lion) and opt.defaults["betas"] == (0.9, 0.99)
    assert [g["weight_decay"] for g in opt.param_groups] == [1e-7, 0.0]  # groups keep their own decay
    opt = build_optimizer("adamw", heads.parameters(), lr=1e-3, weight_decay=0.2, betas=(0.9, 0.98), eps=1e-6)
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.param_groups[0]["betas"] == (0.9, 0.98) and opt.param_groups[0]["eps"] == 1e-6
    assert opt.param_groups[0]["weight_decay"] == 0.2
    opt = build_optimizer("lamb", heads.parameters(), lr=1e-3, weight_decay=1e-5)
    assert isinstance(opt, LAMB) and opt.defaults["eps"] == 1e-12  # sail.train.optim.DEFAULT_EPS, for B^2-sized gradients
    with pytest.raises(SailError, match="lion, adamw, lamb"):
        build_optimizer("sgd", heads.parameters(), lr=1.0, weight_decay=0.0)
    with pytest.raises(SailError, match="betas"):
        build_optimizer("lion", heads.parameters(), lr=1.0, weight_decay=0.0, betas=(0.9, 1.5))


# ------------------------------------------------------------------ schedules
def lrs(sched_fn, steps, base_lr=2.0, **kw):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base_lr)
    sched = sched_fn(opt, **kw)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])  # the lr the optimizer step at this index uses
        opt.step()
        sched.step()
    return out


def test_cosine_with_warmup_key_steps():
    v = lrs(cosine_with_warmup, 13, total_steps=12, warmup_steps=4, min_ratio=0.1)
    assert v[0] == pytest.approx(2.0 * 1 / 4) and v[3] == pytest.approx(2.0)  # warmup 1/4 .. 1
    assert v[1] == pytest.approx(2.0 * 2 / 4)
    assert v[4] == pytest.approx(2.0)  # cosine starts at 1
    assert v[8] == pytest.approx(2.0 * (0.1 + 0.9 * 0.5))  # halfway: midpoint
    assert v[6] == pytest.approx(2.0 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4))))
    assert v[12] == pytest.approx(2.0 * 0.1)  # ends at min_ratio
    assert all(a >= b for a, b in zip(v[4:], v[5:]))
    no_warmup = lrs(cosine_with_warmup, 3, total_steps=2, warmup_steps=0)
    assert no_warmup == pytest.approx([2.0, 1.0, 0.0])


def test_linear_warmup_decay_key_steps():
    v = lrs(linear_warmup_decay, 12, total_steps=10, warmup_steps=2)
    assert v[0] == pytest.approx(1.0) and v[1] == pytest.approx(2.0) and v[2] == pytest.approx(2.0)
    assert v[6] == pytest.approx(2.0 * 4 / 8)
    assert v[10] == 0.0 and v[11] == 0.0


def test_one_cycle_peaks_at_pct_start():
    v = lrs(one_cycle, 20, base_lr=1.0, max_lr=1.0, total_steps=20, pct_start=0.25)
    assert max(v) == pytest.approx(1.0) and v.index(max(v)) == 4  # peak at step pct_start * total - 1
    assert v[0] == pytest.approx(1.0 / 25) and v[-1] < 1e-4


def test_schedule_argument_errors():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(SailError, match="warmup_steps"):
        cosine_with_warmup(opt, total_steps=5, warmup_steps=6)
    with pytest.raises(SailError, match="total_steps"):
        linear_warmup_decay(opt, total_steps=0, warmup_steps=0)
    with pytest.raises(SailError, match="min_ratio"):
        cosine_with_warmup(opt, total_steps=5, warmup_steps=1, min_ratio=2.0)


# ------------------------------------------------------------------ foreach paths vs the per-tensor loops
class LionPerTensor(torch.optim.Optimizer):
    """sail 0.1's Lion: a Python loop over tensors (the plain reference for the foreach path)."""

    def __init__(self, params, lr, betas, weight_decay):
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            lr, wd, (beta1, beta2) = group["lr"], group["weight_decay"], group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p)
                m = state["exp_avg"]
                update = (m * beta1 + p.grad * (1 - beta1)).sign_()
                p.mul_(1 - lr * wd)
                p.add_(update, alpha=-lr)
                m.mul_(beta2).add_(p.grad, alpha=1 - beta2)


class LAMBPerTensor(torch.optim.Optimizer):
    """sail 0.1's LAMB: a Python loop over tensors."""

    def __init__(self, params, lr, betas, eps, weight_decay):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            lr, wd, eps, (beta1, beta2) = group["lr"], group["weight_decay"], group["eps"], group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state.update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
                state["step"] += 1
                t, m, v = state["step"], state["exp_avg"], state["exp_avg_sq"]
                m.mul_(beta1).add_(p.grad, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                r = (m / (1 - beta1 ** t)) / ((v / (1 - beta2 ** t)).sqrt() + eps)
                if wd != 0:
                    r.add_(p, alpha=wd)
                p_norm, r_norm = p.norm(), r.norm()
                trust = torch.where((p_norm > 0) & (r_norm > 0), p_norm / r_norm, torch.ones_like(p_norm))
                p.sub_(r * (lr * trust))


@pytest.mark.parametrize("name", ["lion", "lamb"])
def test_foreach_step_matches_the_per_tensor_loop(name):
    # mixed shapes and dtypes (two foreach buckets), two groups with their own decay, a zero tensor, and a
    # tensor without a gradient on some steps (it must keep its state and not move)
    g = torch.Generator().manual_seed(11)
    shapes = [(7, 5), (5,), (3, 2, 4), (1,), (16, 3), (2, 2)]
    dtypes = [torch.float32, torch.float32, torch.float64, torch.float32, torch.float64, torch.float32]
    init = [torch.randn(s, generator=g, dtype=d) for s, d in zip(shapes, dtypes)]
    init[3].zero_()
    grads = [[torch.randn(s, generator=g, dtype=d) for s, d in zip(shapes, dtypes)] for _ in range(9)]
    skip = {(2, 1), (5, 1), (6, 4)}  # (step, tensor) pairs without a gradient

    def train(cls, **kw):
        params = [torch.nn.Parameter(p.clone()) for p in init]
        opt = cls([{"params": params[:3], "weight_decay": 0.3}, {"params": params[3:], "weight_decay": 0.0}], **kw)
        for step, gs in enumerate(grads):
            for i, (p, grad) in enumerate(zip(params, gs)):
                p.grad = None if (step, i) in skip else grad.clone()
            opt.step()
        return params, opt

    kw = dict(lr=0.03, betas=(0.85, 0.97), weight_decay=0.3)
    if name == "lamb":
        got, opt = train(LAMB, eps=1e-6, **kw)
        want, ref = train(LAMBPerTensor, eps=1e-6, **kw)
    else:
        got, opt = train(Lion, **kw)
        want, ref = train(LionPerTensor, **kw)
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.dtype == b.dtype
        tol = 1e-12 if a.dtype == torch.float64 else 2e-6
        torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=f"tensor {i}")
        assert not torch.equal(a, init[i])  # every tensor moved, the zero one included
    for p_got, p_want in zip(got, want):  # same state layout: checkpoints written by 0.1 load unchanged
        sa, sb = opt.state[p_got], ref.state[p_want]
        assert sa.keys() == sb.keys()
        for k in sa:
            if torch.is_tensor(sa[k]):
                torch.testing.assert_close(sa[k], sb[k], rtol=2e-6, atol=2e-6)
            else:
                assert sa[k] == sb[k]
