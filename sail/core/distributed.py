"""torchrun support shared by extract, align and the recipes: one place that picks the device and starts
the process group.

    rank, world = init_distributed()   # (0, 1) outside torchrun
    device = local_device(pick_device("auto"), rank, world)   # or both at once: rank, world, device = setup("auto")
    sync_batchnorm(towers, device)   # BatchNorm -> SyncBatchNorm under torchrun on GPUs
    barrier(world)
"""

from __future__ import annotations

import datetime
import os

import torch

from sail.core.errors import SailError


def init_distributed(timeout: datetime.timedelta | None = None, device: torch.device | str | None = None
                     ) -> tuple[int, int]:
    """(rank, world) under torchrun, initialising the process group once: nccl for a CUDA `device`, gloo for
    any other (None: CUDA when it is available), so `--device cpu` on a GPU host runs on gloo.

    timeout: how long a collective (a barrier) may wait; None keeps torch's default (10 min for NCCL).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        kwargs = {"timeout": timeout} if timeout is not None else {}
        dist.init_process_group(backend_for(device), **kwargs)
    return dist.get_rank(), dist.get_world_size()


def backend_for(device: torch.device | str | None) -> str:
    """nccl for a CUDA device, gloo otherwise; None means CUDA when it is available."""
    if device is None:
        return "nccl" if torch.cuda.is_available() else "gloo"
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def current() -> tuple[int, int]:
    """(rank, world) of the initialised process group, (0, 1) when there is none."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier(world: int | None = None) -> None:
    """Wait for every rank; a no-op in a single process."""
    if (world if world is not None else current()[1]) > 1:
        import torch.distributed as dist

        dist.barrier()


def local_device(device: torch.device, rank: int, world: int) -> torch.device:
    """Under torchrun on GPUs each process takes cuda:LOCAL_RANK."""
    if world > 1 and device.type == "cuda":
        device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}")
        torch.cuda.set_device(device)
    return device


def sync_batchnorm(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Under torch.distributed on GPUs, `module`'s BatchNorm layers become SyncBatchNorm in place, so batch
    statistics are those of the global batch (ALIGN's EfficientNet) and W processes train like one. torch's
    SyncBatchNorm runs on GPUs only: on CPU (gloo) each rank keeps its own batch statistics, as one process
    does per micro-batch with accum_steps (sail.train.step.contrastive_backward). Gradients are averaged by
    sail.train.step.all_reduce_gradients (no DDP wrapper: one gradient sync for heads and towers)."""
    if current()[1] > 1 and device.type == "cuda":
        converted = torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)
        assert converted is module, "convert_sync_batchnorm swaps children in place unless the root is a BatchNorm"
    return module


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        picked = torch.device(device)
    except RuntimeError:
        raise SailError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if picked.type == "cuda":
        if not torch.cuda.is_available():
            raise SailError(f"--device {device}: CUDA is not available here (torch {torch.__version__}); use --device cpu")
        if picked.index is not None and picked.index >= torch.cuda.device_count():
            raise SailError(f"--device {device}: this machine has {torch.cuda.device_count()} GPU(s); use cuda:0..."
                            f"cuda:{torch.cuda.device_count() - 1}")
    elif picked.type not in ("cpu", "mps"):
        raise SailError(f"unsupported device {device!r}; use auto, cpu, cuda or cuda:N")
    return picked


def setup(device: str = "auto") -> tuple[int, int, torch.device]:
    """(rank, world, device): the process group (init_distributed) and this process's device (cuda:LOCAL_RANK
    under torchrun on GPUs; `device` "auto" | "cpu" | "cuda" ... as pick_device above reads it)."""
    chosen = pick_device(device)
    rank, world = init_distributed(device=chosen)
    return rank, world, local_device(chosen, rank, world)


def cleanup() -> None:
    """Destroy the process group if one was started (end of a torchrun script)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
