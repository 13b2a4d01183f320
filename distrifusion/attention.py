"""The parallel self-attention: the one cross-patch operator of Wan's DiT, swapped in per block.

Each rank runs its blocks over its own tokens (plus, in the displaced mode, a halo of its neighbours'
tokens). Queries are always local; what differs is where the other ranks' keys/values come from:

- ``displaced`` (DistriFusion): the previous step's K/V of the other ranks, all-gathered asynchronously
  while this step computes; synchronous steps (warm-up, every ``sync_frequency``-th) gather fresh K/V first.
- ``sync``: a blocking all-gather of every layer's fresh K/V (exact).
- ``ulysses``: all-to-all from a token split to a head split and back (exact).

Keys are stored after RoPE, so the order of the concatenated keys does not matter; pad rows (every rank's
slab is padded to the largest) are never attended.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from ..wanvideo.errors import WanDistriFusionError
from ..wanvideo.loading import DTYPES
from .comm import make_comm_manager, transfer_dtype
from .partition import RankTokens

log = logging.getLogger(__name__)

AttentionFn = Callable[[Tensor, Tensor, Tensor], Tensor]

_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def kv_storage_dtype(kv_dtype: str, compute_dtype: torch.dtype) -> torch.dtype:
    """dtype of exchanged/stale K/V for a ``ParallelConfig.kv_dtype`` ("auto" = the compute dtype)."""
    return compute_dtype if kv_dtype == "auto" else DTYPES[kv_dtype]


def stale_kv_bytes(
    *,
    num_layers: int,
    dim: int,
    max_own_tokens: int,
    group_size: int,
    batch: int,
    kv_dtype: torch.dtype,
) -> int:
    """Bytes of the displaced mode's K/V buffer on one rank: every layer's K and V of every rank's slab."""
    return num_layers * batch * group_size * max_own_tokens * 2 * dim * kv_dtype.itemsize


def check_heads(mode: str, num_heads: int, group_size: int, cfg_parallel: bool) -> None:
    """Raise when Ulysses cannot split the heads over the GPUs of one batch item."""
    if mode != "ulysses" or group_size <= 1 or num_heads % group_size == 0:
        return
    divisors = [d for d in range(1, num_heads + 1) if num_heads % d == 0 and d <= 64]
    gpus = [2 * d for d in divisors if 2 * d <= 64] if cfg_parallel else divisors
    raise WanDistriFusionError(
        f"parallel mode 'ulysses': the model's {num_heads} attention heads do not split evenly over the "
        f"{group_size} GPUs that share one batch item{' (CFG parallel halves the GPUs)' if cfg_parallel else ''}; "
        f"use {', '.join(map(str, gpus))} GPUs, or parallel mode 'sync' or 'displaced' (any GPU count)."
    )


@dataclass
class TokenLayout:
    """Facts every layer of one forward shares: slab sizes and which remote K/V rows this rank reads."""

    counts: list[int]
    """Own tokens of each group rank."""
    num_own: int
    num_computed: int
    remote_rows: list[int | Tensor | None]
    """Per group rank: ``None`` (self), ``n`` (its first n rows) or the row ids not recomputed here (halo)."""
    batch: int

    @property
    def max_count(self) -> int:
        return max(self.counts)

    @property
    def num_remote(self) -> int:
        return sum(r if isinstance(r, int) else r.numel() for r in self.remote_rows if r is not None)


def token_layout(parts: list[RankTokens], group_rank: int, batch: int, device: torch.device) -> TokenLayout:
    """Layout of this rank's attention for a partition of one batch item's tokens."""
    me = parts[group_rank]
    total = sum(p.num_own for p in parts)
    computed = torch.zeros(total, dtype=torch.bool)
    computed[me.computed_index] = True
    remote_rows: list[int | Tensor | None] = []
    for p in parts:
        if p.rank == group_rank:
            remote_rows.append(None)
            continue
        keep = ~computed[p.own_index]
        if bool(keep.all()):
            remote_rows.append(p.num_own)
        else:
            remote_rows.append(keep.nonzero().flatten().to(device))
    return TokenLayout([p.num_own for p in parts], me.num_own, me.num_computed, remote_rows, batch)


class AttentionRuntime:
    """State the swapped attention functions of one rank share: group, token layout, K/V buffers, step kind."""

    def __init__(
        self,
        mode: str,
        *,
        group: dist.ProcessGroup | None,
        kv_group: dist.ProcessGroup | None,
        group_rank: int,
        group_size: int,
        device: torch.device,
        num_layers: int,
        kv_dtype: str = "auto",
        comm_backend: str = "auto",
        comm_checkpoint: int | None = None,
    ):
        self.mode = mode
        self.group, self.kv_group = group, kv_group
        self.group_rank, self.group_size = group_rank, group_size
        self.device = torch.device(device)
        self.num_layers = num_layers
        self.kv_dtype = kv_dtype
        self.comm_backend = comm_backend
        self.comm_checkpoint = comm_checkpoint
        self.layout: TokenLayout | None = None
        self.manager = None
        self.storage_dtype: torch.dtype | None = None
        self._stale_valid = False
        self.synchronous = True
        self.comm_seconds = 0.0

    # --- lifecycle ---------------------------------------------------------------------------------
    def attention_fn(self, layer: int, inner: AttentionFn) -> AttentionFn:
        """The attention for block ``layer``; ``inner`` is the local kernel (the block's original one)."""
        run = {"displaced": self._displaced, "sync": self._sync, "ulysses": self._ulysses}[self.mode]

        def parallel_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            return run(layer, inner, q, k, v)

        parallel_attention.layer = layer  # for introspection / tests
        return parallel_attention

    def set_layout(
        self, parts: list[RankTokens], batch: int, heads: int, head_dim: int, compute_dtype: torch.dtype
    ) -> None:
        """Prepare forwards over ``parts`` with ``batch`` items: (re)builds the K/V buffers; call on change only."""
        self.layout = token_layout(parts, self.group_rank, batch, self.device)
        self.storage_dtype = kv_storage_dtype(self.kv_dtype, compute_dtype)
        if self.mode == "displaced":
            if self.manager is not None:
                self.manager.clear()
                self.manager = None  # free the old buffer before allocating the new one
            self._create_buffers(batch, heads, head_dim)

    def _create_buffers(self, batch: int, heads: int, head_dim: int) -> None:
        # Plain tensors even when called under inference_mode, so later in-place use works in any mode.
        with torch.inference_mode(False):
            manager = make_comm_manager(
                self.comm_backend,
                group=self.kv_group,
                group_rank=self.group_rank,
                group_size=self.group_size,
                device=self.device,
                **({} if self.comm_checkpoint is None else {"comm_checkpoint": self.comm_checkpoint}),
            )
            shape = (batch, self.layout.max_count, 2, heads, head_dim)
            for _ in range(self.num_layers):
                manager.register_tensor(shape, transfer_dtype(self.storage_dtype), layer_type="self_attn")
            manager.create_buffer()
        self.manager = manager
        self._stale_valid = False

    def begin_step(self, synchronous: bool) -> bool:
        """Start a forward; returns whether it runs synchronously (forced while no stale K/V exists)."""
        self.synchronous = synchronous or not self._stale_valid
        return self.synchronous

    def end_step(self) -> None:
        if self.mode == "displaced" and self.manager is not None:
            if not self.synchronous:
                self.manager.flush()
            self._stale_valid = True

    def reset(self) -> None:
        """Wait for pending exchanges and forget stale K/V (a new job starts)."""
        if self.manager is not None:
            self.manager.clear()
        self._stale_valid = False
        self.comm_seconds = 0.0

    @property
    def comm_backend_name(self) -> str:
        if self.mode != "displaced":
            return "torch.distributed"
        if self.manager is not None:
            return self.manager.name
        from .comm import resolve_comm_backend

        return resolve_comm_backend(self.comm_backend)

    @property
    def buffer_bytes(self) -> int:
        return 0 if self.manager is None else self.manager.buffer_bytes

    # --- helpers -----------------------------------------------------------------------------------
    def _pack_own(self, k: Tensor, v: Tensor, out: Tensor | None = None) -> Tensor:
        """Own K/V ``[b, n_own, H, D]`` into a padded slab ``[b, max, 2, H, D]`` of the transfer dtype."""
        b, n, heads, head_dim = k.shape
        if out is None:
            out = torch.empty(
                (b, self.layout.max_count, 2, heads, head_dim),
                dtype=transfer_dtype(self.storage_dtype),
                device=k.device,
            )
        typed = out.view(self.storage_dtype)
        typed[:, :n, 0].copy_(k)
        typed[:, :n, 1].copy_(v)
        return out

    def _full_kv(self, k: Tensor, v: Tensor, slabs) -> tuple[Tensor, Tensor]:
        """Fresh K/V of the computed tokens followed by the other ranks' rows of ``slabs`` (never pads)."""
        layout = self.layout
        b, n, heads, head_dim = k.shape
        total = n + layout.num_remote
        k_full = k.new_empty(b, total, heads, head_dim)
        v_full = v.new_empty(b, total, heads, head_dim)
        k_full[:, :n] = k
        v_full[:, :n] = v
        offset = n
        for rank, rows in enumerate(layout.remote_rows):
            if rows is None:
                continue
            slab = slabs[rank].view(self.storage_dtype)
            part = slab[:, :rows] if isinstance(rows, int) else slab.index_select(1, rows)
            count = part.shape[1]
            k_full[:, offset : offset + count] = part[:, :, 0]
            v_full[:, offset : offset + count] = part[:, :, 1]
            offset += count
        return k_full, v_full

    # --- the three modes ---------------------------------------------------------------------------
    def _displaced(self, layer: int, inner: AttentionFn, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        manager, n_own = self.manager, self.layout.num_own
        start = time.perf_counter()
        manager.wait(layer)
        if self.synchronous:
            manager.gather_now(layer, self._pack_own(k[:, :n_own], v[:, :n_own]))
        self.comm_seconds += time.perf_counter() - start
        k_full, v_full = self._full_kv(k, v, manager.get_buffer_list(layer))
        if not self.synchronous:
            # Read before write: this layer's stale rows are copied out above, now send our fresh ones.
            slot = manager.own_slot(layer)
            if slot is not None:
                self._pack_own(k[:, :n_own], v[:, :n_own], out=slot)
                manager.enqueue(layer)
            else:
                manager.enqueue(layer, self._pack_own(k[:, :n_own], v[:, :n_own]))
        return inner(q, k_full, v_full)

    def _sync(self, layer: int, inner: AttentionFn, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        own = self._pack_own(k, v)
        gathered = own.new_empty((self.group_size, *own.shape))
        start = time.perf_counter()
        _all_gather_single(gathered.view(-1), own.view(-1), group=self.group)
        self.comm_seconds += time.perf_counter() - start
        k_full, v_full = self._full_kv(k, v, gathered)
        return inner(q, k_full, v_full)

    def _ulysses(self, layer: int, inner: AttentionFn, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        counts, size = self.layout.counts, self.group_size
        b, n_own, heads, head_dim = q.shape
        local_heads, longest = heads // size, max(counts)
        # [b, n, 3, size, h, D] -> per destination rank (its head chunk), padded to the longest slab.
        send = q.new_empty(size, b, longest, 3, local_heads, head_dim)
        qkv = torch.stack([q, k, v], dim=2).view(b, n_own, 3, size, local_heads, head_dim)
        send[:, :, :n_own] = qkv.permute(3, 0, 1, 2, 4, 5)
        recv = torch.empty_like(send)
        start = time.perf_counter()
        dist.all_to_all_single(recv, send, group=self.group)
        self.comm_seconds += time.perf_counter() - start
        full = torch.cat([recv[rank, :, :count] for rank, count in enumerate(counts)], dim=1)
        out = inner(full[:, :, 0], full[:, :, 1], full[:, :, 2])
        back = out.new_empty(size, b, longest, local_heads, head_dim)
        offset = 0
        for rank, count in enumerate(counts):
            back[rank, :, :count] = out[:, offset : offset + count]
            offset += count
        returned = torch.empty_like(back)
        start = time.perf_counter()
        dist.all_to_all_single(returned, back, group=self.group)
        self.comm_seconds += time.perf_counter() - start
        return returned[:, :, :n_own].permute(1, 2, 0, 3, 4).reshape(b, n_own, heads, head_dim)
