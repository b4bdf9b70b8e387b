"""sail.core.precision: which precision each device gets, errors for what the hardware cannot do, autocast dtypes.

CUDA devices are simulated by patching torch.cuda's capability queries (the policy is pure logic over them).
"""

import contextlib

import pytest
import torch

from sail.core import precision
from sail.core.errors import SailError
from sail.core.precision import native_bf16, resolve_precision


@pytest.fixture
def fake_cuda(monkeypatch):
    """Pretend a CUDA device with a given capability exists; restores the TF32 switches afterwards."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32

    def install(cap):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: cap)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: f"FakeGPU sm{cap[0]}{cap[1]}")

    yield install
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize("cap, auto, tf32", [((9, 0), "bf16", True), ((8, 0), "bf16", True),
                                             ((7, 5), "fp16", False), ((7, 0), "fp16", False),
                                             ((6, 1), "fp32", False)])
def test_cuda_auto_follows_compute_capability(fake_cuda, cap, auto, tf32):
    fake_cuda(cap)
    p = resolve_precision("auto", "cuda")
    assert (p.name, p.tf32) == (auto, tf32)
    assert p.dtype == {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[auto]
    assert p.needs_loss_scaling == (auto == "fp16")
    # TF32 is switched only inside the precision's scope, and put back on leaving it
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    with p.scope():
        assert torch.backends.cuda.matmul.allow_tf32 == tf32 and torch.backends.cudnn.allow_tf32 == tf32
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before
    assert native_bf16("cuda") == (cap >= (8, 0))


def test_cuda_bf16_refused_before_ampere_even_though_torch_emulates_it(fake_cuda, monkeypatch):
    fake_cuda((7, 0))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # what torch says on a V100
    with pytest.raises(SailError, match=r"FakeGPU sm70 \(compute capability 7.0\) has no native bf16.*fp16"):
        resolve_precision("bf16", "cuda")
    assert resolve_precision("fp16", "cuda").needs_loss_scaling


def test_explicit_fp32_turns_tf32_off(fake_cuda):
    fake_cuda((8, 0))
    torch.backends.cuda.matmul.allow_tf32 = True  # someone else's process-wide choice
    assert resolve_precision("auto", "cuda").tf32
    p = resolve_precision("fp32", "cuda")
    assert p.name == "fp32" and not p.tf32 and torch.backends.cuda.matmul.allow_tf32  # resolving changed nothing
    with p.autocast():  # fp32 on CUDA: no autocast, TF32 off inside only
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.is_autocast_enabled("cuda")
    assert torch.backends.cuda.matmul.allow_tf32
    assert isinstance(resolve_precision("fp32", "cpu").autocast(), contextlib.nullcontext)


def test_cpu_auto_is_fp32_and_bf16_needs_native_support(monkeypatch):
    p = resolve_precision("auto", "cpu")
    assert (p.name, p.dtype, p.tf32, p.needs_loss_scaling) == ("fp32", torch.float32, False, False)
    assert not p.grad_scaler().is_enabled()
    monkeypatch.setattr(precision, "native_bf16", lambda device: False)
    with pytest.raises(SailError, match="no native bf16.*use --precision fp32"):
        resolve_precision("bf16", "cpu")
    monkeypatch.setattr(precision, "native_bf16", lambda device: True)
    p = resolve_precision("bf16", "cpu")
    layer = torch.nn.Linear(4, 3)
    with p.autocast():
        out = layer(torch.randn(2, 4))
    assert p.name == "bf16" and out.dtype == torch.bfloat16
    with resolve_precision("fp32", "cpu").autocast():
        assert layer(torch.randn(2, 4)).dtype == torch.float32


def test_fp16_needs_cuda_and_unknown_names_are_refused():
    with pytest.raises(SailError, match="fp16 needs a CUDA GPU"):
        resolve_precision("fp16", "cpu")
    with pytest.raises(SailError, match="unknown precision 'half'"):
        resolve_precision("half", "cpu")


def test_cpu_native_bf16_from_torch_probes_or_cpuinfo_flags(monkeypatch):
    for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.setattr(torch.cpu, name, lambda: False, raising=False)
    monkeypatch.setattr(precision, "_cpu_flags", lambda: {"avx2", "avx512f"})
    assert not native_bf16("cpu")
    monkeypatch.setattr(precision, "_cpu_flags", lambda: {"avx2", "amx_bf16"})
    assert native_bf16("cpu")
    monkeypatch.setattr(precision, "_cpu_flags", set)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    assert native_bf16("cpu")
    assert not native_bf16("meta")
