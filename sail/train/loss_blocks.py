"""The pieces the blockwise losses (sail.train.losses) and the fused Triton kernel (sail.train.triton_sigmoid) share:
how many rows a block of logits holds, which process group a loss gathers over, and the hand-made
all_gather / reduce-scatter of rows. Both import them from here, so neither imports the other at load time.
"""

import torch
import torch.distributed as dist

from sail.core.errors import SailError

BLOCK_BYTES = 32 * 2**20  # default size of one (rows, B) block of logits on CPU; see benchmarks/loss.py
# On a GPU a 32 MiB block would be 8 rows at B = 1M, far too thin for the tensor cores: 1 GiB gives 256
# rows at B = 1M (2.5 GiB with the bf16 similarity and fp32 softplus buffers; see sail.train.step.memory_model).
CUDA_BLOCK_BYTES = 2**30


def _rows_per_block(block_size, n_rows, n_cols, elem_bytes, device=None):
    if block_size is None:
        budget = CUDA_BLOCK_BYTES if device is not None and device.type == "cuda" else BLOCK_BYTES
        return max(1, min(n_rows, budget // (n_cols * elem_bytes)))
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise SailError(f"block_size must be a positive int (rows per block) or None, got {block_size!r}")
    return min(block_size, n_rows)


def _process_group(group, n, device):
    """The group to gather over, or None for single-process; checks equal local batch sizes."""
    if group is None:
        if not (dist.is_available() and dist.is_initialized()):
            return None
        group = dist.group.WORLD
    world = dist.get_world_size(group)
    if world == 1:
        return None
    sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([n], dtype=torch.int64, device=device), group=group)
    if any(int(s) != n for s in sizes):
        raise SailError(
            f"distributed loss needs the same local batch size on every rank, got {[int(s) for s in sizes]}; "
            "drop the last incomplete batch (drop_last=True)"
        )
    return group


def _gather_rows(x, group):
    """(n, D) on each rank -> (world * n, D), rank order. No autograd: gradients are handled by hand."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts)


def _sum_own_rows(full, n, group):
    """Sum (world * n, D) partial gradients over ranks and keep this rank's n rows."""
    if full.is_cuda and "nccl" in str(dist.get_backend(group)):
        out = full.new_empty((n, full.shape[1]))
        dist.reduce_scatter_tensor(out, full, group=group)
        return out
    dist.all_reduce(full, group=group)  # gloo has no reduce_scatter
    r = dist.get_rank(group)
    return full[r * n : (r + 1) * n].clone()
