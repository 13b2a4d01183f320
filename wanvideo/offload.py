"""Transformer blocks streamed from host memory: how one 24 GB GPU runs the 14B model.

Every block's weights (fp8 weights and their scales included) live in pinned host memory; a small ring of
device buffers (2 blocks) holds the blocks about to run. Block i+1 is copied into the ring on a side CUDA stream
while block i computes, so the copies (14B bf16: ~0.7 GB per block, ~13 ms at 55 GB/s) hide under the block's
compute (~300 ms at 720p). Embeddings and the head stay on the device.

The model only sees ``WanModel.block_streamer``: its forward asks it for the blocks in turn, each pointing at
device weights while it runs (the parameters keep their identity, so ``torch.compile``'d blocks and the parallel
attention swapped per block keep working). Between forwards the parameters point at the host copies again, so a
LoRA merge (``lora.apply_loras``) writes the host copies and the next forward streams the merged weights.
On the CPU the "device" copy is a plain copy: the same code path, bit for bit the resident model's results.
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from .errors import WanDistriFusionError
from .fp8 import enable_fp8_matmul

logger = logging.getLogger(__name__)

RING_BLOCKS = 2
"""Device buffers for this many blocks: one computing, the next one arriving."""


def _block_tensors(block: nn.Module) -> list[tuple[str, Tensor]]:
    """Every parameter and buffer of ``block`` by name, in a fixed order."""
    return list(block.named_parameters()) + list(block.named_buffers())


def _signature(block: nn.Module) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    return [(name, tuple(t.shape), t.dtype) for name, t in _block_tensors(block)]


class BlockStreamer:
    """Hands out a model's blocks one at a time with their weights on ``device``, copied from host memory ahead
    of use into a ring of ``ring`` device buffers. Build it with ``stream_blocks_from_host``."""

    def __init__(self, blocks: nn.ModuleList, device: torch.device, ring: int = RING_BLOCKS):
        if ring < 2:
            raise WanDistriFusionError(
                f"offload: a ring of {ring} block buffer(s) cannot overlap copy and compute; use 2 or more."
            )
        if len(blocks) == 0:
            raise WanDistriFusionError("offload: the model has no transformer blocks to stream.")
        template = _signature(blocks[0])
        for index, block in enumerate(blocks):
            if _signature(block) != template:
                raise WanDistriFusionError(
                    f"offload: block {index} has other tensors than block 0 (shapes or dtypes), so the blocks cannot "
                    "share device buffers; load the model without offload."
                )
        self.device = torch.device(device)
        self.ring = ring
        self._cuda = self.device.type == "cuda"
        self._host: dict[int, list[Tensor]] = {}
        """id(block) -> its tensors' host copies (pinned on CUDA), in ``_block_tensors`` order."""
        self._pinned: list[Tensor] = []
        """One flat page-locked buffer per block (CUDA), registered with the driver at its exact size."""
        for block in blocks:
            tensors = [t for _, t in _block_tensors(block)]
            if self._cuda:
                flat, host = _pinned_copies(tensors)
                self._pinned.append(flat)
            else:
                host = [t.detach().to("cpu") for t in tensors]
            self._host[id(block)] = host
            for tensor, copy in zip(tensors, host):
                tensor.data = copy
        if self._pinned:  # unregister before the buffers can be freed (the finalizer holds them until then)
            weakref.finalize(self, _unregister, list(self._pinned))
        self._slots = [
            [torch.empty_like(t, device=self.device) for t in self._host[id(blocks[0])]] for _ in range(ring)
        ]
        if self._cuda:
            self._copy_stream = torch.cuda.Stream(self.device)
            self._ready = [torch.cuda.Event() for _ in range(ring)]
            self._free = [torch.cuda.Event() for _ in range(ring)]

    @property
    def host_bytes(self) -> int:
        """Bytes of block weights kept in host memory."""
        return sum(t.numel() * t.element_size() for tensors in self._host.values() for t in tensors)

    @property
    def device_bytes(self) -> int:
        """Bytes of the ring of device buffers."""
        return sum(t.numel() * t.element_size() for slot in self._slots for t in slot)

    @contextlib.contextmanager
    def streaming(self, blocks: nn.ModuleList) -> Iterator[Iterator[nn.Module]]:
        """``with streamer.streaming(model.blocks) as on_device: for block in on_device: block(...)``: each block
        points at device weights from when it is handed out until the next one is asked for; on leaving (also after
        an error), every block points at its host copy again."""
        try:
            yield self._in_turn(blocks)
        finally:
            for block in blocks:
                if id(block) in self._host:  # (a block not set up for streaming raised in ``_in_turn``)
                    self._point_at(block, self._host[id(block)])
            if self._cuda:  # a slot may still be read by work queued before an error: later copies wait for it
                compute = torch.cuda.current_stream(self.device)
                for event in self._free:
                    event.record(compute)

    def _in_turn(self, blocks: nn.ModuleList) -> Iterator[nn.Module]:
        compute = torch.cuda.current_stream(self.device) if self._cuda else None
        hosts = [self._lookup(block, index) for index, block in enumerate(blocks)]
        if hosts:
            self._copy_in(hosts[0], 0)
        for index, block in enumerate(blocks):
            if index + 1 < len(blocks):
                self._copy_in(hosts[index + 1], (index + 1) % self.ring)  # in flight while this block computes
            slot = index % self.ring
            if compute is not None:
                compute.wait_event(self._ready[slot])
            self._point_at(block, self._slots[slot])
            yield block
            if compute is not None:
                self._free[slot].record(compute)  # this slot may be overwritten once the block's kernels are done
            self._point_at(block, hosts[index])

    def _lookup(self, block: nn.Module, index: int) -> list[Tensor]:
        host = self._host.get(id(block))
        if host is None:
            raise WanDistriFusionError(
                f"offload: block {index} was not set up for streaming (blocks replaced after loading); load the model "
                "again with offload."
            )
        return host

    def _copy_in(self, host: list[Tensor], slot: int) -> None:
        targets = self._slots[slot]
        if not self._cuda:
            for target, source in zip(targets, host):
                target.copy_(source)
            return
        with torch.cuda.stream(self._copy_stream):
            self._copy_stream.wait_event(self._free[slot])
            for target, source in zip(targets, host):
                target.copy_(source, non_blocking=True)
            self._ready[slot].record(self._copy_stream)

    @staticmethod
    def _point_at(block: nn.Module, tensors: list[Tensor]) -> None:
        for (_, tensor), storage in zip(_block_tensors(block), tensors):
            tensor.data = storage


_ALIGN = 256


def _pinned_copies(tensors: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
    """Host copies of ``tensors`` as views into one flat page-locked buffer (so copies to the GPU run
    asynchronously at full speed). Registered with ``cudaHostRegister`` at its exact size: PyTorch's pinned
    allocator rounds every allocation up to a power of two (14B bf16: ~40 GB for 28 GB of blocks)."""
    offsets, total = [], 0
    for tensor in tensors:
        offsets.append(total)
        total += -(-tensor.numel() * tensor.element_size() // _ALIGN) * _ALIGN
    flat = torch.empty(total, dtype=torch.uint8)
    cudart = torch.cuda.cudart()
    error = cudart.cudaHostRegister(flat.data_ptr(), total, 0)
    if int(getattr(error, "value", error)) != 0:  # cannot lock this memory: PyTorch's pinned allocator instead
        logger.warning("offload: cudaHostRegister failed (%s); pinned memory rounded up to powers of two", error)
        if hasattr(cudart, "cudaGetLastError"):
            cudart.cudaGetLastError()  # clear it, so no later CUDA check reports it
        flat = torch.empty(total, dtype=torch.uint8, pin_memory=True)
        flat.registered = False
    copies = []
    for tensor, offset in zip(tensors, offsets):
        nbytes = tensor.numel() * tensor.element_size()
        view = flat[offset : offset + nbytes].view(tensor.dtype).view(tensor.shape)
        view.copy_(tensor.detach())
        copies.append(view)
    return flat, copies


def _unregister(buffers: list[Tensor]) -> None:
    for flat in buffers:
        if getattr(flat, "registered", True):
            torch.cuda.cudart().cudaHostUnregister(flat.data_ptr())


def stream_blocks_from_host(model: nn.Module, device: str | torch.device, ring: int = RING_BLOCKS) -> BlockStreamer:
    """Keep ``model``'s blocks in host memory (pinned on CUDA) and stream them to ``device`` per forward; everything
    else moves to ``device``. Merge LoRAs before or after (they write the host copies); compile after."""
    device = torch.device(device)
    if getattr(model, "block_streamer", None) is not None:
        raise WanDistriFusionError("offload: this model already streams its blocks from host memory.")
    for name, child in model.named_children():
        if name != "blocks":
            child.to(device)
    streamer = BlockStreamer(model.blocks, device, ring)
    enable_fp8_matmul(model, device)  # fp8 matmuls are chosen by where the weights run, not where they are kept
    model.block_streamer = streamer
    logger.info(
        "offload: %d blocks in %s host memory (%.2f GiB), a ring of %d on %s (%.2f GiB)",
        len(model.blocks),
        "pinned" if device.type == "cuda" else "plain",
        streamer.host_bytes / 1024**3,
        ring,
        device,
        streamer.device_bytes / 1024**3,
    )
    return streamer
