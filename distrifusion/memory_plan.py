"""Per-rank memory estimate of a run, checked before a job starts.

Displaced patch parallelism keeps every layer's stale K/V of the *whole* token grid on every rank
(design notes: Wan 14B at 720p x 81 frames, ~1.5 GB per layer per batch item in bf16, ~62 GB for 40
layers), which more GPUs do not shrink. So before a job runs we add up weights, activations, stale
K/V and attention buffers per rank, compare with the device's free memory, and refuse with the
numbers and the settings that would fit instead of failing with an out-of-memory mid-run.
The weights' bytes are counted in ``weight_memory``; the split VAE decode has its own plan (``vae_memory_plan``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..wanvideo.errors import WanDistriFusionError
from ..wanvideo.loading import DTYPES
from ..wanvideo.model import WanConfig
from ..wanvideo.offload import RING_BLOCKS
from .config import ModeChoice, ParallelConfig
from .job import GenerationJob
from .weight_memory import PRECISION_BYTES, block_bytes, outside_block_parameters, weight_bytes

logger = logging.getLogger(__name__)

GIB = 1024**3
RESERVE_BYTES = GIB // 2
"""Allocator fragmentation, cuBLAS workspaces and communicator buffers."""


@dataclass(frozen=True)
class MemoryPlan:
    """Estimated bytes one rank needs for one job, and whether that fits the device."""

    world_size: int
    mode: str
    cfg_parallel: bool
    kv_dtype: str
    tokens_total: int
    tokens_local: int
    batch_per_rank: int
    weights_bytes: int
    activation_bytes: int
    stale_kv_bytes: int
    attention_bytes: int
    reserve_bytes: int
    device_free_bytes: int | None
    weights: str = "replicated"
    """``replicated`` or ``sharded`` (``weights_bytes`` is then this rank's shards plus the replicated rest)."""
    gather_bytes: int = 0
    """Sharded weights: the full weights of the blocks in flight (the running one and the prefetched next)."""
    offload: bool = False
    """Blocks streamed from host memory: ``weights_bytes`` is then the ring of device buffers plus the rest."""
    host_bytes: int = 0
    """Pinned host memory per rank (the offloaded blocks), not counted in ``total_bytes`` (the device's)."""

    @property
    def total_bytes(self) -> int:
        return (
            self.weights_bytes
            + self.gather_bytes
            + self.activation_bytes
            + self.stale_kv_bytes
            + self.attention_bytes
            + self.reserve_bytes
        )

    @property
    def fits(self) -> bool | None:
        """``None`` when the free memory is unknown (CPU)."""
        return None if self.device_free_bytes is None else self.total_bytes <= self.device_free_bytes

    def breakdown(self) -> str:
        """``weights .. + activations .. + stale K/V .. + attention buffers .. + reserve ..`` and the setup."""
        weights = f"weights {format_bytes(self.weights_bytes)}"
        if self.weights == "sharded":
            weights = f"sharded weights {format_bytes(self.weights_bytes)} + gathered blocks {format_bytes(self.gather_bytes)}"
        if self.offload:
            weights += f" (offload: {RING_BLOCKS}-block ring + the rest; blocks in pinned host memory: {format_bytes(self.host_bytes)})"
        return (
            f"{weights} + activations {format_bytes(self.activation_bytes)} + "
            f"stale K/V {format_bytes(self.stale_kv_bytes)} + attention buffers {format_bytes(self.attention_bytes)} + "
            f"reserve {format_bytes(self.reserve_bytes)}; {self.mode}, {self.world_size} rank{'s' if self.world_size > 1 else ''}"
            f"{', CFG parallel' if self.cfg_parallel else ''}, {self.tokens_local:,} of {self.tokens_total:,} tokens "
            f"per rank, batch {self.batch_per_rank}, K/V {self.kv_dtype}"
        )

    def summary(self) -> str:
        """One line: the total per rank, the free memory it was compared with, and the parts."""
        free = (
            "free memory not checked"
            if self.device_free_bytes is None
            else f"{format_bytes(self.device_free_bytes)} free"
        )
        return f"{format_bytes(self.total_bytes)} per rank, {free} ({self.breakdown()})"


@dataclass(frozen=True)
class PlanRequest:
    """What the memory plan sizes, apart from the parallel setup: the model, the latents, the precision and the
    device. Built once by ``plan_job`` / ``plan_memory``; the mode choice and the refusal's alternatives vary its
    quantization, weights and offload (``dataclasses.replace``) next to the ``ParallelConfig`` they try."""

    config: WanConfig
    shape: tuple[int, ...]
    """Latents ``[B, C, F, H, W]``."""
    precision: str
    quantization: str
    device_free_bytes: int | None
    guidance_batch: int
    """2 when CFG runs cond and uncond as one batch, else 1."""
    models: int = 1
    weights: str = "replicated"
    offload: bool = False

    def __post_init__(self) -> None:
        if self.precision not in PRECISION_BYTES:
            raise WanDistriFusionError(
                f"precision: {self.precision!r} is unknown; choose one of {', '.join(PRECISION_BYTES)}."
            )
        if self.weights not in ("replicated", "sharded"):
            raise WanDistriFusionError(
                f"weights: {self.weights!r} is not resolved; the plan takes replicated or sharded."
            )


def plan_job(
    config: WanConfig,
    parallel: ParallelConfig,
    job: GenerationJob,
    precision: str = "bf16",
    quantization: str = "disabled",
    device_free_bytes: int | None = None,
    *,
    check: bool = True,
    models: int = 1,
    weights: str = "replicated",
    offload: bool = False,
) -> tuple[GenerationJob, MemoryPlan]:
    """What the runtime that takes ``job`` does once, before any rank gets it: choose the parallel mode
    (``job.mode_choice``: ``auto`` resolved with the memory plans, ``_choose_mode``) and plan the memory of that mode
    (as ``plan_memory``: with ``check``, a plan that does not fit is refused, naming what would). ``device_free_bytes``:
    the smallest free memory of the group's GPUs (``None`` on the CPU: no limit)."""
    request = PlanRequest(
        config=config,
        shape=job.latent_shape(config.out_dim),
        precision=precision,
        quantization=quantization,
        device_free_bytes=device_free_bytes,
        guidance_batch=2 if job.negative is not None and job.cfg != 1.0 else 1,
        models=models,
        weights=weights,
        offload=offload,
    )
    choice, estimated = _choose_mode(request, parallel, job)
    job = job.with_changes(mode_choice=choice)
    job_parallel = job.parallel_config(parallel)
    plan = estimated.get(choice.mode) or _estimate(request, job_parallel)
    if check:
        _refuse_unless_it_fits(request, job_parallel, plan)
    return job, plan


def _choose_mode(
    request: PlanRequest, parallel: ParallelConfig, job: GenerationJob
) -> tuple[ModeChoice, dict[str, MemoryPlan]]:
    """The mode ``job`` runs in: a set mode as set; ``auto`` by the README's measurements (Which mode), which rank
    the modes the same over NVLink and with P2P off: with too few stale steps the exact ``sync``
    (``ParallelConfig.auto_choice``), else ``displaced`` if its plan fits ``free`` (the group's smallest free
    memory), else ``sync`` if it fits, else ``ulysses`` where it fits and the heads split. With the free memory
    unknown (CPU: no limit) or nothing fitting, the steps alone decide (``plan_job`` then refuses with what
    would fit). Also returns the plans it estimated, by mode, so that the chosen one is not estimated again."""
    if parallel.mode != "auto":
        return ModeChoice(parallel.mode, "the Loader's parallel mode"), {}
    by_steps = parallel.auto_choice(job.steps, job.sync_frequency)
    free = request.device_free_bytes
    if free is None or parallel.world_size == 1 or parallel.patch_parallel_degree == 1:
        return by_steps, {}
    candidates = ["displaced"] if by_steps.mode == "displaced" else []
    candidates += ["sync", "ulysses"] if request.config.num_heads % parallel.patch_parallel_degree == 0 else ["sync"]
    plans = {mode: _estimate(request, dataclasses.replace(parallel, mode=mode)) for mode in candidates}
    needed = {mode: plan.total_bytes for mode, plan in plans.items()}
    fitting = [mode for mode in candidates if needed[mode] <= free]
    if not fitting:
        return by_steps, plans
    picked = fitting[0]
    if picked == candidates[0]:
        memory = f"{picked} ({format_bytes(needed[picked])} per rank) fits the {format_bytes(free)} free"
    else:
        too_big = ", ".join(
            f"{mode} needs {format_bytes(needed[mode])} per rank" for mode in candidates[: candidates.index(picked)]
        )
        memory = f"{too_big}, the GPUs have {format_bytes(free)} free: {picked} ({format_bytes(needed[picked])})"
    return ModeChoice(picked, f"{by_steps.reason}; {memory}"), plans


def plan_memory(
    config: WanConfig,
    parallel: ParallelConfig,
    job_shape: Sequence[int],
    precision: str = "bf16",
    quantization: str = "disabled",
    device_free_bytes: int | None = None,
    *,
    guidance_batch: int = 2,
    check: bool = True,
    models: int = 1,
    weights: str = "replicated",
    offload: bool = False,
) -> MemoryPlan:
    """Estimate one rank's memory for latents of ``job_shape`` ``[B, C, F, H, W]``.

    ``guidance_batch`` is 2 when CFG runs cond and uncond as one batch, else 1. ``models`` is how many models of
    ``config``'s shape every rank holds (2: Wan 2.2 A14B's experts, each with its own stale K/V); ``weights``
    ``replicated`` or ``sharded`` (``auto`` resolved by the ranks, see ``choose_weights``). ``offload``: the blocks
    stay in pinned host memory (``host_bytes``), the device holds a ring of two per model. With ``check`` and a
    known ``device_free_bytes``, a plan that does not fit raises ``WanDistriFusionError`` naming the
    numbers and the settings that would fit.
    """
    request = PlanRequest(
        config=config,
        shape=tuple(job_shape),
        precision=precision,
        quantization=quantization,
        device_free_bytes=device_free_bytes,
        guidance_batch=guidance_batch,
        models=models,
        weights=weights,
        offload=offload,
    )
    plan = _estimate(request, parallel)
    if check:
        _refuse_unless_it_fits(request, parallel, plan)
    return plan


def _refuse_unless_it_fits(request: PlanRequest, parallel: ParallelConfig, plan: MemoryPlan) -> None:
    """Raise ``WanDistriFusionError`` when ``plan`` is known not to fit, with the numbers and what would fit."""
    if plan.fits is False:
        alternatives = _alternatives(request, parallel)
        if alternatives:
            fix = "what would fit, cheapest first: " + "; ".join(alternatives)
        else:
            fix = (
                "none of CFG parallel, sharded weights, fp8 K/V buffers, the sync or ulysses mode, fp8 weights, offload "
                "or more GPUs would fit; lower the resolution or the length"
            )
        raise WanDistriFusionError(
            f"memory: this job needs about {format_bytes(plan.total_bytes)} per rank but the device has "
            f"{format_bytes(plan.device_free_bytes)} free ({plan.breakdown()}); {fix}."
        )


def check_host_memory(
    plan: MemoryPlan, ranks: int, available_bytes: int | None = None, cores: int | None = None
) -> None:
    """On the CPU every rank is a process in this host's RAM: refuse ``ranks`` copies of ``plan`` that do not fit
    ``available_bytes`` (default: what the host has available now); warn when the ranks outnumber the cores."""
    available = host_available_bytes() if available_bytes is None else available_bytes
    per_rank = plan.total_bytes + plan.host_bytes  # on the CPU, offloaded blocks are in the same RAM
    needed = ranks * per_rank
    if needed > available:
        fitting = available // per_rank
        fix = (
            f"lower world size to {fitting} or fewer ranks on this host (the others can run on other hosts with "
            "`cli.py worker`)"
            if ranks > 1 and fitting >= 1
            else "lower the resolution or the length, or use quantization fp8_e4m3fn"
        )
        who = f"world size: {ranks} CPU ranks on this host need" if ranks > 1 else "memory: this job needs"
        raise WanDistriFusionError(
            f"{who} about {format_bytes(needed)} of RAM ({format_bytes(per_rank)} each: {plan.breakdown()}) but "
            f"{format_bytes(available)} is available; {fix}."
        )
    cores = _usable_cores() if cores is None else cores
    if ranks > cores:
        logger.warning(
            "%d CPU ranks on %d cores: the ranks take turns on the cores, so each step is slower than with %d ranks",
            ranks,
            cores,
            cores,
        )


def check_offload_host_memory(
    config: WanConfig,
    precision: str,
    quantization: str,
    ranks: int,
    models: int = 1,
    available_bytes: int | None = None,
) -> int:
    """Refuse ``offload`` before loading when this host's ``ranks`` ranks cannot keep their blocks in its RAM (each
    rank pins its own copy); returns the bytes they pin."""
    needed = ranks * models * config.num_layers * block_bytes(config, precision, quantization)
    available = host_available_bytes() if available_bytes is None else available_bytes
    if needed > available:
        if "fp8" not in quantization:
            fix = "use quantization fp8_e4m3fn (half the bytes)"
        else:
            fix = "use fewer GPUs on this host" if ranks > 1 else "free RAM (other programs, ComfyUI's cached models)"
        raise WanDistriFusionError(
            f"offload: {ranks} rank{'s' if ranks > 1 else ''} on this host would pin {format_bytes(needed)} of transformer "
            f"blocks in host memory but {format_bytes(available)} of RAM is available; {fix}, or turn offload off."
        )
    return needed


def host_available_bytes() -> int:
    """RAM this process can still use: the system's available memory, capped by a cgroup v2 limit when set."""
    import psutil

    available = psutil.virtual_memory().available
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text())
            available = min(available, int(limit) - used)
    except (OSError, ValueError):
        pass
    return max(available, 0)


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _estimate(request: PlanRequest, parallel: ParallelConfig) -> MemoryPlan:
    config, precision, quantization = request.config, request.precision, request.quantization
    batch, _, frames, height, width = request.shape
    pf, ph, pw = config.patch_size
    grid = (frames // pf, height // ph, width // pw)
    tokens_total = math.prod(grid)
    world = parallel.world_size
    degree = parallel.patch_parallel_degree if world > 1 else 1
    split_groups = 2 if parallel.cfg_parallel and world > 1 and request.guidance_batch == 2 else 1
    batch_per_rank = batch * request.guidance_batch // split_groups
    act = PRECISION_BYTES[precision]
    kv = act if parallel.kv_dtype == "auto" else DTYPES[parallel.kv_dtype].itemsize
    kv_name = precision if parallel.kv_dtype == "auto" else parallel.kv_dtype
    dim, layers = config.dim, config.num_layers

    tokens_local = -(-tokens_total // degree)
    if world > 1 and parallel.mode == "displaced" and parallel.patch_overlap:
        axis = {"spatial": grid[1], "temporal": grid[0]}.get(parallel.split_mode, grid[1])
        halo = 2 * parallel.overlap_tokens() * (tokens_total // max(axis, 1))
        tokens_local = min(tokens_total, tokens_local + halo)

    weights = request.weights if world > 1 else "replicated"
    resident, gathered = weight_bytes(config, precision, quantization, world, weights)
    host_bytes = 0
    if request.offload:  # every model's blocks in host memory, a ring of RING_BLOCKS of them on the device
        weights, gathered = "replicated", 0  # offload streams whole blocks; sharded weights are not combined with it
        block = block_bytes(config, precision, quantization)
        host_bytes = request.models * layers * block
        resident = outside_block_parameters(config) * act + RING_BLOCKS * block

    # Live tensors of one block per local token at its peak: residual, modulated input, the fused qkv output, q/k in
    # fp32 for RoPE, the attention kernel's layout copies; or input, hidden and GELU output around the FFN. fp8
    # matmuls add the FFN hidden's quantized copy (made through fp32); per-frame timesteps (5B) the modulation picked
    # per token. Calibrated on an H200 (max_memory_allocated minus the weights; bench/offload.py, bench/wan22_gpu.py):
    # 12.3 x dim per token for 14B bf16 (plan 13), 17.6 for 14B fp8 (plan 18.4), 18.0 for the 5B (plan 18.3), the
    # patch embedding's 1 x dim of the full grid included.
    per_token = max(12 * dim, 4 * dim + 2 * config.ffn_dim)
    if quantization == "fp8_e4m3fn":
        per_token += 2 * config.ffn_dim
    if config.per_frame_timesteps:
        per_token += 4 * dim
    activation = batch_per_rank * (tokens_local * per_token + tokens_total * dim) * act  # + full-grid patch embedding

    stale_kv = attention = 0
    if degree > 1:  # CFG parallel alone (2 ranks, one per guidance half) exchanges no K/V
        if parallel.mode == "displaced":
            # each expert keeps its own
            stale_kv = request.models * 2 * layers * tokens_total * dim * kv * batch_per_rank
            attention = batch_per_rank * (2 * tokens_total * dim * act + 2 * tokens_local * dim * kv)
        elif parallel.mode == "sync":
            attention = batch_per_rank * 2 * tokens_total * dim * (act + kv)
        else:  # ulysses: q, k, v, out head-split over the full sequence, send and receive side
            attention = batch_per_rank * 8 * tokens_total * dim * act // degree
    return MemoryPlan(
        world_size=world,
        mode=parallel.mode if world > 1 else "single GPU",
        cfg_parallel=parallel.cfg_parallel and world > 1,
        kv_dtype=kv_name,
        tokens_total=tokens_total,
        tokens_local=tokens_local,
        batch_per_rank=batch_per_rank,
        weights_bytes=request.models * resident,
        gather_bytes=gathered,  # one model runs at a time
        weights=weights,
        activation_bytes=activation,
        stale_kv_bytes=stale_kv,
        attention_bytes=attention,
        reserve_bytes=RESERVE_BYTES,
        device_free_bytes=request.device_free_bytes,
        offload=request.offload,
        host_bytes=host_bytes,
    )


def _alternatives(request: PlanRequest, parallel: ParallelConfig) -> list[str]:
    """The settings under which the job would fit, cheapest first: exact changes that keep the overlap (CFG
    parallel, sharded weights), then fp8 K/V (rounds the stale K/V), then the exact modes without overlap (sync,
    ulysses), then fp8 weights (rounds the model), each alone and with sharded weights; then offload (streams every
    block over PCIe each step), alone or with a change that does not fit without it; then more GPUs."""
    world = parallel.world_size
    # (cost rank, label, parallel, request): the rank orders the proposals, lower is cheaper
    changes: list[tuple[int, str, ParallelConfig, PlanRequest]] = []
    fp8_kv = parallel.mode == "displaced" and world > 1 and parallel.kv_dtype != "fp8_e4m3fn"
    cfg_split = request.guidance_batch == 2 and world > 1 and world % 2 == 0 and not parallel.cfg_parallel
    if cfg_split:
        changes.append((0, "CFG parallel", dataclasses.replace(parallel, cfg_parallel=True), request))
    if fp8_kv:
        fp8 = dataclasses.replace(parallel, kv_dtype="fp8_e4m3fn")
        changes.append((4, "K/V buffer dtype fp8_e4m3fn", fp8, request))
        if cfg_split:
            changes.append((5, "fp8_e4m3fn K/V + CFG parallel", dataclasses.replace(fp8, cfg_parallel=True), request))
    if world > 1:
        for mode in ("sync", "ulysses"):
            degree = parallel.patch_parallel_degree
            if mode != parallel.mode and (mode != "ulysses" or request.config.num_heads % degree == 0):
                changes.append((8, f"{mode} mode", dataclasses.replace(parallel, mode=mode), request))
    if "fp8" not in request.quantization:
        changes.append(
            (10, "quantization fp8_e4m3fn", parallel, dataclasses.replace(request, quantization="fp8_e4m3fn"))
        )
    candidates = list(changes)
    if world > 1 and request.weights != "sharded":  # gathers overlap the blocks' compute: cheap, and exact
        candidates.append((1, "sharded weights", parallel, dataclasses.replace(request, weights="sharded")))
        candidates += [
            (cost + 2, f"sharded weights + {label}", option, dataclasses.replace(option_request, weights="sharded"))
            for cost, label, option, option_request in changes
        ]
    candidates.sort(key=lambda candidate: candidate[0])
    found, fitting_labels = [], set()
    for _, label, option, option_request in candidates:
        plan = _estimate(option_request, option)
        if plan.fits:
            found.append(f"{label} ({format_bytes(plan.total_bytes)} per rank)")
            fitting_labels.add(label)
    if not request.offload:  # blocks streamed from host memory: alone, or with each change that does not fit without it
        for label, option, option_request in [("offload", parallel, request), *(change[1:] for change in changes)]:
            if label in fitting_labels:
                continue
            plan = _estimate(dataclasses.replace(option_request, weights="replicated", offload=True), option)
            if plan.fits:
                label = label if label == "offload" else f"{label} + offload"
                found.append(
                    f"{label} ({format_bytes(plan.total_bytes)} per rank + {format_bytes(plan.host_bytes)} pinned host memory)"
                )
    modes = [parallel.mode] if world > 1 else ["ulysses", "sync", "displaced"]  # one rank has no mode yet
    for more in range(world + 1, 65):
        fitting = None
        for weights_option in dict.fromkeys((request.weights, "sharded")):
            for mode in modes:
                option = dataclasses.replace(parallel, world_size=more, mode=mode)
                if (
                    option.cfg_parallel
                    and more % 2
                    or mode == "ulysses"
                    and request.config.num_heads % option.patch_parallel_degree
                ):
                    continue
                plan = _estimate(dataclasses.replace(request, weights=weights_option), option)
                if plan.fits:
                    fitting = (mode, plan)
                    break
            if fitting:
                break
        if fitting:
            mode, plan = fitting
            shard = " with sharded weights" if plan.weights == "sharded" and request.weights != "sharded" else ""
            found.append(f"{more} GPUs in the {mode} mode{shard} ({format_bytes(plan.total_bytes)} per rank)")
            break
    return found


def format_bytes(value: int) -> str:
    """``value`` in GiB with one decimal, or in MiB below a tenth of a GiB."""
    if value < GIB // 10:
        return f"{value / 1024**2:.1f} MiB"
    return f"{value / GIB:.1f} GiB"
