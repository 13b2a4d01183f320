"""Comm managers of the displaced mode: every layer's K/V slab in one flat per-step buffer, exchanged by
batched asynchronous all-gathers while the next layers compute (distrifuser's ``PatchParallelismCommManager``).

Two implementations with one interface (``register_tensor``, ``create_buffer``, ``get_buffer_list``,
``enqueue``, ``flush``, ``wait``, ``gather_now``, ``clear``, ``handles``, ``name``):

- ``BuiltinCommManager``: ours. Buffers are laid out chunk-major so each batch of layers is one
  contiguous ``all_gather_into_tensor`` (no flatten/copy-back as with list all-gathers).
- ``OfficialCommManager``: drives ``distrifuser.utils.PatchParallelismCommManager`` itself, handed a
  small stand-in for its ``DistriConfig`` (whose constructor needs CUDA + NCCL).

Every rank's slab has the same size (padded to the largest rank's tokens); pad rows are never read.
"""

from __future__ import annotations

import importlib
import logging
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from ..wanvideo.errors import WanDistriFusionError

log = logging.getLogger(__name__)

OFFICIAL_INSTALL_HINT = "pip install -r requirements_official_distrifusion.txt"
DEFAULT_COMM_CHECKPOINT = 6
"""Layers per batched all-gather (Wan 1.3B: 30 layers -> 5 gathers per step; 14B: 40 -> 7)."""

_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def official_status() -> tuple[bool, str]:
    """(importable, version or the import error) of the official ``distrifuser`` package."""
    try:
        importlib.import_module("distrifuser.utils")
    except Exception as exc:  # any import failure means: not usable
        return False, f"{type(exc).__name__}: {exc}"
    try:
        from importlib.metadata import version

        return True, version("distrifuser")
    except Exception:
        module = importlib.import_module("distrifuser.__version__")
        return True, str(getattr(module, "__version__", "unknown"))


def resolve_comm_backend(comm_backend: str) -> str:
    """``"official"`` or ``"builtin"`` for a ``ParallelConfig.comm_backend`` ("auto" = official if importable)."""
    if comm_backend == "builtin":
        return "builtin"
    ok, detail = official_status()
    if ok:
        return "official"
    if comm_backend == "official":
        raise WanDistriFusionError(
            f"comm backend: 'official' needs the distrifuser package, which does not import ({detail}); "
            f"install the official profile ({OFFICIAL_INSTALL_HINT}) or choose comm backend 'builtin' or 'auto'."
        )
    return "builtin"


def make_comm_manager(
    comm_backend: str,
    *,
    group: dist.ProcessGroup | None,
    group_rank: int,
    group_size: int,
    device: torch.device,
    comm_checkpoint: int = DEFAULT_COMM_CHECKPOINT,
) -> BuiltinCommManager | OfficialCommManager:
    """The comm manager that ``comm_backend`` selects, for the ranks of ``group`` (one batch item)."""
    if resolve_comm_backend(comm_backend) == "official":
        return OfficialCommManager(
            group=group, group_rank=group_rank, group_size=group_size, device=device, comm_checkpoint=comm_checkpoint
        )
    return BuiltinCommManager(
        group=group, group_rank=group_rank, group_size=group_size, device=device, comm_checkpoint=comm_checkpoint
    )


def transfer_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype the bytes travel as: fp8 goes as uint8 (gloo and older NCCL have no fp8 collectives)."""
    return torch.uint8 if dtype.itemsize == 1 and dtype.is_floating_point else dtype


class _ManagerBase:
    name = "?"
    handles: list

    def __init__(
        self,
        *,
        group: dist.ProcessGroup | None,
        group_rank: int,
        group_size: int,
        device: torch.device,
        comm_checkpoint: int = DEFAULT_COMM_CHECKPOINT,
    ):
        """The ranks of ``group`` that share one batch item's tokens; ``comm_checkpoint`` layers per all-gather."""
        self.group, self.group_rank, self.group_size = group, group_rank, group_size
        self.device = torch.device(device)
        self.comm_checkpoint = max(1, int(comm_checkpoint))

    def wait(self, idx: int) -> None:
        """Block until the all-gather that carries layer ``idx`` has landed (no-op if none is pending)."""
        handle = self.handles[idx] if self.handles is not None else None
        if handle is not None:
            handle.wait()
            for i, other in enumerate(self.handles):
                if other is handle:
                    self.handles[i] = None

    def gather_now(self, idx: int, tensor: Tensor) -> None:
        """Blocking all-gather of layer ``idx`` (synchronous steps); the buffer then holds this step's K/V."""
        self.wait(idx)
        dist.all_gather(self.get_buffer_list(idx), tensor.reshape(self.shapes[idx]), group=self.group)


class BuiltinCommManager(_ManagerBase):
    """Our flat-buffer comm manager: same algorithm as distrifuser's, contiguous batched all-gathers."""

    name = "builtin"

    def __init__(self, **topology):
        super().__init__(**topology)
        self.torch_dtype: torch.dtype | None = None
        self.shapes: list[tuple[int, ...]] = []
        self.numels: list[int] = []
        self.buffer: Tensor | None = None
        self.handles: list | None = None
        self._chunks: list[tuple[int, int, int, int]] = []  # (first idx, stop idx, buffer offset, per-rank numel)
        self._chunk_of: list[int] = []
        self._offset_in_chunk: list[int] = []
        self._pending: set[int] = set()

    def register_tensor(self, shape: tuple[int, ...], torch_dtype: torch.dtype, layer_type: str | None = None) -> int:
        if self.buffer is not None:
            raise RuntimeError("comm manager: register every tensor before create_buffer()")
        if self.torch_dtype is None:
            self.torch_dtype = torch_dtype
        elif torch_dtype != self.torch_dtype:
            raise RuntimeError(f"comm manager: mixed dtypes {self.torch_dtype} and {torch_dtype}")
        self.shapes.append(tuple(int(s) for s in shape))
        self.numels.append(math.prod(self.shapes[-1]))
        return len(self.shapes) - 1

    def create_buffer(self) -> None:
        offset = 0
        for first in range(0, len(self.shapes), self.comm_checkpoint):
            stop = min(first + self.comm_checkpoint, len(self.shapes))
            inner = 0
            for idx in range(first, stop):
                self._chunk_of.append(len(self._chunks))
                self._offset_in_chunk.append(inner)
                inner += self.numels[idx]
            self._chunks.append((first, stop, offset, inner))
            offset += inner * self.group_size
        self.buffer = torch.empty(offset, dtype=self.torch_dtype, device=self.device)
        self.handles = [None] * len(self.shapes)
        log.debug(
            "comm buffer: %.1f MB for %d tensors", self.buffer.numel() * self.buffer.itemsize / 1e6, len(self.shapes)
        )

    @property
    def buffer_bytes(self) -> int:
        return 0 if self.buffer is None else self.buffer.numel() * self.buffer.itemsize

    def _chunk_view(self, chunk: int) -> Tensor:
        _, _, offset, inner = self._chunks[chunk]
        return self.buffer[offset : offset + inner * self.group_size].view(self.group_size, inner)

    def get_buffer_list(self, idx: int) -> list[Tensor]:
        """Per group rank, layer ``idx``'s slab (views into the flat buffer)."""
        start = self._offset_in_chunk[idx]
        rows = self._chunk_view(self._chunk_of[idx])[:, start : start + self.numels[idx]]
        return [row.view(self.shapes[idx]) for row in rows]

    def own_slot(self, idx: int) -> Tensor:
        return self.get_buffer_list(idx)[self.group_rank]

    def enqueue(self, idx: int, tensor: Tensor | None = None) -> None:
        """Mark layer ``idx``'s own slab ready (copying ``tensor`` in, unless written via ``own_slot``)."""
        if tensor is not None:
            self.own_slot(idx).copy_(tensor.reshape(self.shapes[idx]))
        self._pending.add(idx)
        first, stop, _, _ = self._chunks[self._chunk_of[idx]]
        if all(i in self._pending for i in range(first, stop)):
            self._communicate(self._chunk_of[idx])

    def flush(self) -> None:
        """Send every chunk with a pending layer (end of step)."""
        for chunk in sorted({self._chunk_of[i] for i in self._pending}):
            self._communicate(chunk)

    def _communicate(self, chunk: int) -> None:
        first, stop, _, _ = self._chunks[chunk]
        view = self._chunk_view(chunk)
        handle = _all_gather_single(view.view(-1), view[self.group_rank], group=self.group, async_op=True)
        for idx in range(first, stop):
            self.handles[idx] = handle
            self._pending.discard(idx)

    def clear(self) -> None:
        """Send what is queued and wait for every pending gather."""
        if self.handles is None:
            return
        self.flush()
        for idx in range(len(self.handles)):
            self.wait(idx)


@dataclass
class _OfficialTopology:
    """What ``PatchParallelismCommManager`` reads from its ``DistriConfig``, without NCCL/CUDA set-up."""

    rank: int
    world_size: int
    device: torch.device
    n_device_per_batch: int
    group_rank: int
    batch_group: dist.ProcessGroup | None
    comm_checkpoint: int
    verbose: bool = False

    def split_idx(self, rank: int | None = None) -> int:
        return self.group_rank if rank is None else rank % self.n_device_per_batch


class OfficialCommManager(_ManagerBase):
    """Adapter around ``distrifuser.utils.PatchParallelismCommManager`` (official install profile)."""

    name = "official"

    def __init__(self, **topology):
        from distrifuser.utils import PatchParallelismCommManager

        super().__init__(**topology)
        self.topology = _OfficialTopology(
            rank=dist.get_rank() if dist.is_initialized() else 0,
            world_size=dist.get_world_size() if dist.is_initialized() else 1,
            device=self.device,
            n_device_per_batch=self.group_size,
            group_rank=self.group_rank,
            batch_group=self.group,
            comm_checkpoint=self.comm_checkpoint,
        )
        self.manager = PatchParallelismCommManager(self.topology)

    @property
    def handles(self) -> list | None:
        return self.manager.handles

    @property
    def shapes(self) -> list:
        return self.manager.shapes

    @property
    def buffer_bytes(self) -> int:
        buffers = self.manager.buffer_list or []
        return sum(b.numel() * b.itemsize for b in buffers)

    def register_tensor(self, shape: tuple[int, ...], torch_dtype: torch.dtype, layer_type: str | None = None) -> int:
        return self.manager.register_tensor(tuple(shape), torch_dtype, layer_type)

    def create_buffer(self) -> None:
        self.manager.create_buffer()

    def get_buffer_list(self, idx: int) -> list[Tensor]:
        return self.manager.get_buffer_list(idx)

    def own_slot(self, idx: int) -> Tensor | None:
        return None  # the official manager copies in ``enqueue``

    def enqueue(self, idx: int, tensor: Tensor | None = None) -> None:
        if tensor is None:
            raise RuntimeError("official comm manager: enqueue needs the tensor")
        self.manager.enqueue(idx, tensor)

    def flush(self) -> None:
        if self.manager.idx_queue:
            self.manager.communicate()

    def clear(self) -> None:
        if self.manager.buffer_list is not None:
            self.manager.clear()
