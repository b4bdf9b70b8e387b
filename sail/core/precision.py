"""One precision policy for training (align, recipes) and inference (extract, eval).

    from sail.core.precision import resolve_precision
    prec = resolve_precision("auto", device)        # or "fp32" | "bf16" | "fp16" (`--precision`)
    with prec.autocast():
        x = heads.encode_image(features)             # matmuls in prec.dtype, fp32 accumulation
    scaler = prec.grad_scaler()                      # dynamic loss scaling for fp16, a no-op otherwise

Policy (why each rule):
- bf16 autocast only where the hardware does bf16 natively: CUDA compute capability >= 8.0 (Ampere+), or a
  CPU with AVX512-BF16 or AMX. `torch.cuda.is_bf16_supported()` is not used: it is true on pre-Ampere GPUs
  through emulation, which is slower than fp32.
- auto on CUDA: bf16 on capability >= 8.0 (TF32 on for the matmuls left in fp32); fp16 with dynamic loss
  scaling on 7.x (tensor cores do fp16 only); fp32 below.
- auto on CPU: fp32, even on a CPU with native bf16. CPU runs are tests, demos and small jobs where the
  same numbers on every machine matter more than speed; ask for `--precision bf16` to use AMX / AVX512-BF16.
- fp16 only on CUDA and only with dynamic loss scaling (torch.amp.GradScaler): with the loss averaged over
  B^2 pairs the per-embedding gradients are ~3e-10 at B = 36864, below fp16's smallest subnormal (6e-8).
- explicit fp32 is exact fp32 (TF32 off), the reference. TF32 is a process-wide torch switch, so it is
  only changed inside `prec.scope()` (and `prec.autocast()`, which enters it) and restored on leaving:
  resolving a precision changes nothing for the rest of the process.
Asking for what the hardware cannot do raises SailError naming what it can do.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from sail.core.errors import SailError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def native_bf16(device) -> bool:
    """True where bf16 matmuls run in hardware: CUDA capability >= 8.0, or a CPU with AVX512-BF16 / AMX."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.get_device_capability(device) >= (8, 0)
    if device.type == "cpu":
        probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
        if any(p is not None and p() for p in probes):
            return True
        return bool({"avx512_bf16", "amx_bf16"} & _cpu_flags())
    return False


@dataclass(frozen=True)
class Precision:
    """A resolved precision: `name` fp32 | bf16 | fp16 on `device`; `dtype` for autocast and frozen weights."""

    name: str
    device: torch.device
    tf32: bool = False  # fp32 matmuls may use TF32 (inside scope() / autocast())

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.name]

    @property
    def needs_loss_scaling(self) -> bool:
        return self.name == "fp16"

    @contextlib.contextmanager
    def scope(self):
        """TF32 switched on or off as this precision wants while inside, then put back as it was."""
        if self.device.type != "cuda":
            yield
            return
        before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = self.tf32
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before

    def autocast(self):
        """Autocast to `dtype` on this device (inside `scope`); a null context for fp32 off CUDA."""
        if self.device.type != "cuda" and self.name == "fp32":
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        stack.enter_context(self.scope())
        if self.name != "fp32":
            stack.enter_context(torch.autocast(self.device.type, dtype=self.dtype))
        return stack

    def grad_scaler(self) -> torch.amp.GradScaler:
        """Dynamic loss scaling for fp16; a disabled (pass-through) scaler otherwise."""
        return torch.amp.GradScaler(self.device.type, enabled=self.needs_loss_scaling)

    def __str__(self) -> str:
        return self.name + (" + tf32" if self.tf32 else "")


def _describe(device: torch.device) -> str:
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"{torch.cuda.get_device_name(device)} (compute capability {major}.{minor})"
    return f"this {device.type}"


def resolve_precision(requested: str = "auto", device="cpu") -> Precision:
    """The Precision to use for `requested` (auto | fp32 | bf16 | fp16) on `device`; see the module docstring."""
    device = torch.device(device)
    if requested not in PRECISIONS:
        raise SailError(f"unknown precision {requested!r}; use one of {', '.join(PRECISIONS)}")
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SailError(f"device {device} asked for but CUDA is not available; use --device cpu")
    cap = torch.cuda.get_device_capability(device) if cuda else None
    name = requested
    if requested == "auto":
        if cuda:
            name = "bf16" if cap >= (8, 0) else "fp16" if cap >= (7, 0) else "fp32"
        else:
            name = "fp32"
    elif requested == "bf16" and not native_bf16(device):
        other = "fp16 (with loss scaling) or fp32" if cuda else "fp32"
        raise SailError(f"--precision bf16: {_describe(device)} has no native bf16 (needs CUDA compute capability "
                        f">= 8.0 or a CPU with AVX512-BF16/AMX); use --precision {other}")
    elif requested == "fp16" and not cuda:
        raise SailError(f"--precision fp16 needs a CUDA GPU; on {device.type} use bf16 (where native) or fp32")
    tf32 = cuda and cap >= (8, 0) and requested != "fp32"
    return Precision(name, device, tf32)
