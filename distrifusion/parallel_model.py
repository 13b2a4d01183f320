"""``ParallelWan``: a Wan model run across ranks, callable like the model itself.

Every rank computes its share of the token grid (``partition.py``) through the unchanged model, with
the blocks' ``self_attn.attention_fn`` swapped for the parallel attention (``attention.py``); the own
tokens' outputs are then all-gathered so every rank returns the full prediction. With CFG parallel the
ranks form two groups: group g computes batch item g of the ``[cond; uncond]`` call.
"""

from __future__ import annotations

import logging
import time

import torch
import torch.distributed as dist
from torch import Tensor

from ..wanvideo.errors import WanDistriFusionError
from .attention import AttentionRuntime, check_heads
from .config import DisplacedSchedule, ParallelConfig
from .job import pixels_per_token
from .partition import RankTokens, partition_summary, partition_tokens

log = logging.getLogger(__name__)

_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


_SUBGROUPS: dict[tuple, tuple] = {}
"""(purpose, rank lists) -> (default group, subgroups): creating a communicator is slow (NCCL) and
collective, so every ``ParallelWan`` of a process reuses them. All ranks create them in the same order."""


def _subgroups(groups: list[list[int]], purpose: str) -> list:
    """One subgroup per rank list (collective on first use under the current default group)."""
    key = (purpose, tuple(tuple(ranks) for ranks in groups))
    world = dist.group.WORLD
    cached = _SUBGROUPS.get(key)
    if cached is None or cached[0] is not world:  # none yet, or the default group was re-initialised
        _SUBGROUPS[key] = (world, [dist.new_group(ranks) for ranks in groups])
    return _SUBGROUPS[key][1]


class ParallelWan:
    """A ``WanModel`` split over ``config.world_size`` ranks; every rank calls it with the same inputs.

    Construct it on every rank in the same order (it creates process subgroups). Each call is one
    sampling step; ``begin_job`` starts a new clip.
    """

    def __init__(
        self,
        model,
        config: ParallelConfig,
        rank: int,
        device: str | torch.device,
        *,
        comm_checkpoint: int | None = None,
    ):
        self.model = model
        self.parallel_config = config
        """The ``ParallelConfig``; ``.config`` is the model's ``WanConfig``, as on the model."""
        self.rank = rank
        self.device = torch.device(device)
        self.world_size = config.world_size
        self.group_size = config.patch_parallel_degree
        self.batch_group_index = rank // self.group_size if config.cfg_parallel else 0
        self.group_rank = rank % self.group_size
        num_heads = model.config.num_heads
        check_heads(config.mode, num_heads, self.group_size, config.cfg_parallel)
        if self.world_size > 1:
            if not dist.is_initialized():
                raise WanDistriFusionError(
                    f"world size: {self.world_size} ranks need torch.distributed; join a process group first (the worker group does)."
                )
            if dist.get_world_size() != self.world_size or dist.get_rank() != rank:
                raise WanDistriFusionError(
                    f"world size: the process group has rank {dist.get_rank()} of {dist.get_world_size()}, "
                    f"the settings say rank {rank} of {self.world_size}."
                )
        self.group, kv_group = self._build_groups()
        self.runtime: AttentionRuntime | None = None
        if self.group_size > 1:
            self.runtime = AttentionRuntime(
                config.mode,
                group=self.group,
                kv_group=kv_group,
                group_rank=self.group_rank,
                group_size=self.group_size,
                device=self.device,
                num_layers=len(model.blocks),
                kv_dtype=config.kv_dtype,
                comm_backend=config.comm_backend,
                comm_checkpoint=comm_checkpoint,
            )
        self._partitions: dict[tuple[int, int, int], list[RankTokens]] = {}
        self._indices: dict[tuple[int, int, int], tuple[Tensor, Tensor]] = {}
        self._layout_key: tuple | None = None
        self._last_grid: tuple[int, int, int] | None = None
        self.schedule = config.schedule(0)
        self.step = 0
        self._counters = {"steps": 0, "sync_steps": 0, "stale_steps": 0, "output_gather_seconds": 0.0}

    # --- set-up --------------------------------------------------------------------------------------
    def _build_groups(self) -> tuple[dist.ProcessGroup | None, dist.ProcessGroup | None]:
        """(attention group, K/V exchange group) of this rank; collective: every rank builds every group."""
        if self.world_size == 1 or self.group_size == 1:
            return None, None
        groups = [
            list(range(g * self.group_size, (g + 1) * self.group_size))
            for g in range(self.world_size // self.group_size)
        ]
        mine = self.rank // self.group_size
        attention_group = None  # the default group
        if len(groups) > 1:
            attention_group = _subgroups(groups, "attention")[mine]
        # The asynchronous K/V gathers get their own communicator, so the blocking collectives of the
        # step (outputs, sync steps) never queue behind them.
        kv_group = _subgroups(groups, "kv")[mine] if self.parallel_config.mode == "displaced" else None
        return attention_group, kv_group

    def partition(self, grid: tuple[int, int, int]) -> list[RankTokens]:
        """This group's token partition for a token grid (cached)."""
        if grid not in self._partitions:
            token_px = pixels_per_token(self.model.config)
            overlap = self.parallel_config.overlap_tokens(token_px) if self.parallel_config.mode == "displaced" else 0
            self._partitions[grid] = partition_tokens(
                grid,
                self.parallel_config.split_mode,
                self.parallel_config.patch_size,
                self.group_size,
                overlap,
                token_px,
            )
            parts = self._partitions[grid]
            self._indices[grid] = (
                parts[self.group_rank].computed_index.to(self.device),
                torch.cat([p.own_index for p in parts]).to(self.device),
            )
            log.info(
                "partition of %s over %d ranks: %s", grid, self.group_size, [(p.num_own, p.num_halo) for p in parts]
            )
        return self._partitions[grid]

    # --- jobs and steps ------------------------------------------------------------------------------
    def begin_job(self, schedule: DisplacedSchedule | None = None) -> None:
        """Start a clip (``schedule``: its displaced-mode steps; default the config's warm-up, no periodic sync):
        step 0, no stale K/V, fresh statistics."""
        self.schedule = schedule or self.parallel_config.schedule(0)
        self.step = 0
        if self.runtime is not None:
            self.runtime.reset()
        self._counters = {"steps": 0, "sync_steps": 0, "stale_steps": 0, "output_gather_seconds": 0.0}

    def __call__(self, x: Tensor, t: Tensor, context: Tensor, **kwargs) -> Tensor:
        """One step's flow prediction for the whole batch, identical on every rank."""
        with torch.no_grad():
            return self._forward(x, t, context, **kwargs)

    def _forward(self, x: Tensor, t: Tensor, context: Tensor, **kwargs) -> Tensor:
        if self.world_size == 1:
            return self.model(x, t, context, **kwargs)
        batch = x.shape[0]
        split = self.parallel_config.cfg_parallel and batch % 2 == 0
        local_batch = batch // 2 if split else batch
        if split:
            items = slice(self.batch_group_index * local_batch, (self.batch_group_index + 1) * local_batch)
            x, t, context = x[items], (t[items] if t.dim() and t.shape[0] == batch else t), context[items]
            kwargs = {
                k: (v[items] if isinstance(v, Tensor) and v.dim() and v.shape[0] == batch else v)
                for k, v in kwargs.items()
            }
        grid = tuple(int(s) for s in self.model.token_grid(x))
        parts = self.partition(grid)
        self._last_grid = grid
        computed_index, all_own_index = self._indices[grid]
        dtype = getattr(self.model, "compute_dtype", x.dtype)
        synchronous = True
        if self.runtime is not None:
            key = (grid, local_batch, dtype)
            if key != self._layout_key:
                cfg = self.model.config
                self.runtime.set_layout(parts, local_batch, cfg.num_heads, cfg.dim // cfg.num_heads, dtype)
                self._layout_key = key
            wanted = self.parallel_config.mode != "displaced" or self.schedule.is_synchronous(self.step)
            synchronous = self.runtime.begin_step(wanted)
        out = self._run_model(x, t, context, token_index=computed_index, **kwargs)
        own = out[:, : parts[self.group_rank].num_own]
        full = self._gather_outputs(own, parts, all_own_index, batch, local_batch, split)
        if self.runtime is not None:
            self.runtime.end_step()
        self.step += 1
        self._counters["steps"] += 1
        self._counters["sync_steps" if synchronous else "stale_steps"] += 1
        return self.model.unpatchify(full, grid)

    def _run_model(self, *args, **kwargs) -> Tensor:
        """The model with the parallel attention installed for this call only; the blocks' own attention
        is the local kernel it wraps, so the model stays usable on its own (and other wrappers independent)."""
        if self.runtime is None:
            return self.model(*args, **kwargs)
        blocks = self.model.blocks
        originals = [block.self_attn.attention_fn for block in blocks]
        for layer, block in enumerate(blocks):
            block.self_attn.attention_fn = self.runtime.attention_fn(layer, originals[layer])
        try:
            return self.model(*args, **kwargs)
        finally:
            for block, fn in zip(blocks, originals):
                block.self_attn.attention_fn = fn

    def _gather_outputs(
        self, own: Tensor, parts: list[RankTokens], all_own_index: Tensor, batch: int, local_batch: int, split: bool
    ) -> Tensor:
        """All-gather every rank's own-token outputs (padded to the largest slab) into ``[B, L, C*p]``."""
        counts = [p.num_own for p in parts]
        longest = max(counts)
        send = (
            own
            if own.shape[1] == longest
            else torch.cat([own, own.new_zeros(own.shape[0], longest - own.shape[1], own.shape[2])], dim=1)
        )
        recv = send.new_empty(self.world_size, *send.shape)
        start = time.perf_counter()
        _all_gather_single(recv.view(-1), send.contiguous().view(-1))
        self._counters["output_gather_seconds"] += time.perf_counter() - start
        full = own.new_empty(batch, sum(counts), own.shape[2])
        item_groups = range(2) if split else range(1)
        for g in item_groups:
            ranks = range(g * self.group_size, (g + 1) * self.group_size)
            rows = torch.cat([recv[r, :, :count] for r, count in zip(ranks, counts)], dim=1)
            full[g * local_batch : (g + 1) * local_batch, all_own_index] = rows
        return full

    # --- reporting / delegation ---------------------------------------------------------------------
    @property
    def comm_backend(self) -> str:
        """Name of the K/V exchange in use: "official", "builtin", "torch.distributed" (sync/ulysses) or "none"."""
        return self.runtime.comm_backend_name if self.runtime is not None else "none"

    @property
    def stats(self) -> dict:
        """Counters of the current job for the Status node and benchmarks (seconds are host-side)."""
        attention_seconds = self.runtime.comm_seconds if self.runtime is not None else 0.0
        stats = dict(self._counters)
        stats.update(
            mode=self.parallel_config.mode,
            comm_backend=self.comm_backend,
            world_size=self.world_size,
            patch_parallel_degree=self.group_size,
            cfg_parallel=self.parallel_config.cfg_parallel,
            attention_comm_seconds=attention_seconds,
            comm_seconds=attention_seconds + self._counters["output_gather_seconds"],
            kv_buffer_bytes=self.runtime.buffer_bytes if self.runtime is not None else 0,
            partition=partition_summary(self._partitions[self._last_grid]) if self._last_grid else [],
        )
        return stats

    def close(self) -> None:
        """Wait for pending exchanges and free the K/V buffers (the process subgroups are kept for reuse)."""
        if self.runtime is not None:
            self.runtime.reset()
            self.runtime.manager = None
            self._layout_key = None

    def __getattr__(self, name: str):
        if name == "model":
            raise AttributeError(name)
        return getattr(self.model, name)
