"""The transformer blocks' weights sharded over the ranks with PyTorch's FSDP2 (``fully_shard``), for inference.

Each rank stores 1/N of every block's tensors (fp8 weights included; per-row fp8 scales are small buffers and
stay replicated); a block's full weights are all-gathered just before it runs and freed after it, and the next
block's gather is issued (on its own stream on GPUs) while the current block computes. The model is unaware:
FSDP2's hooks fire around ``block(...)``, which the model, its ``ParallelWan`` and the compiled block halves call
unchanged. Embeddings and the head are small and stay replicated (``ignored_params``).

Loading never needs the whole model on a GPU: the caller loads on the CPU (safetensors memory map), merges the
LoRA chain there, and ``shard_blocks`` moves one block at a time to the device and keeps only its shard.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
from torch import Tensor, nn

WEIGHTS = ("replicated", "sharded", "auto")
"""The ``weights`` setting: every rank a full copy, 1/N of the blocks per rank, or sharded when copies do not fit."""

logger = logging.getLogger(__name__)


def weights_mesh(device: torch.device):
    """A device mesh over every rank on its own process group (collective: every rank calls it once, in order),
    so the weight gathers never queue behind the parallel attention's collectives."""
    from torch.distributed.device_mesh import DeviceMesh

    group = dist.new_group(ranks=list(range(dist.get_world_size())))
    return DeviceMesh.from_group(group, device.type)


def shard_blocks(model: nn.Module, device: torch.device, mesh) -> None:
    """Move ``model`` (on the CPU) to ``device`` with its blocks sharded over ``mesh``: non-block modules whole,
    each block's tensors 1/N per rank, gathered around its forward with the next block's gather prefetched."""
    from torch.distributed.fsdp import fully_shard

    own = []
    for name, child in model.named_children():
        if name != "blocks":
            child.to(device)
            own.extend(child.parameters())
    blocks = list(model.blocks)
    for block in blocks:  # one block at a time on the device, then only its shard stays
        fully_shard(block, mesh=mesh, reshard_after_forward=True)
    for block, following in zip(blocks, blocks[1:]):
        block.set_modules_to_forward_prefetch([following])
    # The model as FSDP root (no tensors of its own to shard): one lazy initialisation for all blocks, which
    # the explicit prefetch needs (with every block its own root, the prefetched block's streams do not exist yet).
    fully_shard(model, mesh=mesh, ignored_params=set(own))


def is_sharded(model: nn.Module) -> bool:
    """Whether ``shard_blocks`` sharded ``model`` (its block parameters are FSDP2 ``DTensor`` shards)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(param, DTensor) for param in model.parameters())


def resident_weight_bytes(model: nn.Module) -> int:
    """Bytes of weights this rank holds between forwards: its shards of the blocks plus the replicated rest."""
    from torch.distributed.tensor import DTensor

    total = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
        total += local.numel() * local.element_size()
    return total


@torch.no_grad()
def assign_rows(target: Tensor, rows: slice, value: Tensor) -> None:
    """``target[rows] = value`` for a plain or an FSDP2-sharded (``Shard(0)``) tensor: a sharded one writes the
    rows this rank stores (no communication: every rank computes the same full value)."""
    from torch.distributed.tensor import DTensor

    if not isinstance(target, DTensor):
        target.data[rows] = value.reshape(target.data[rows].shape)
        return
    local = target.to_local()
    mesh = target.device_mesh
    total = target.shape[0]
    chunk = -(-total // mesh.size())  # torch.chunk's split, as fully_shard uses
    start = min(mesh.get_local_rank() * chunk, total)
    low, high, _ = rows.indices(total)
    value = value.reshape((high - low, *target.shape[1:]))
    first, last = max(low, start), min(high, start + local.shape[0])
    if first < last:
        local[first - start : last - start] = value[first - low : last - low].to(local.dtype)
