"""One rank's model: loaded for the spec, wrapped for the topology (``ParallelWan``) and guided for a session."""

from __future__ import annotations

import logging
import os

import torch
import torch.distributed as dist

from ..wanvideo.attention import attention_kernel_name, preload_attention
from ..wanvideo.block_compile import compile_available, preload_compiler
from ..wanvideo.fp8 import enable_fp8_matmul
from ..wanvideo.loading import PRECISIONS, inspect_wan_checkpoint, load_wan_model
from ..wanvideo.lora import LoraFile, apply_loras, plan_loras
from ..wanvideo.offload import stream_blocks_from_host
from ..wanvideo.sampling import GuidedFlow
from ..wanvideo.step_cache import EasyCache
from .config import ParallelConfig
from .job import GenerationJob
from .parallel_model import ParallelWan
from .settings import RuntimeSpec
from .sharded_weights import assign_rows, shard_blocks, weights_mesh
from .weight_memory import choose_weights

log = logging.getLogger(__name__)

_RUNTIME_ATTR = "_distrifusion_parallel"
"""Attribute of the model holding its ``{(config, rank, device): ParallelWan}``: subgroups and K/V buffers
outlive a job (kept on the model, so they go with it)."""


def parallel_model(model, config: ParallelConfig, rank: int, device: str | torch.device) -> ParallelWan:
    """The ``ParallelWan`` for this model and topology, built on first use (collective on every rank)."""
    per_model = model.__dict__.setdefault(_RUNTIME_ATTR, {})
    key = (config, rank, str(torch.device(device)))
    if key not in per_model:
        for other in per_model.values():
            other.close()
        per_model.clear()
        per_model[key] = ParallelWan(model, config, rank, device)
    return per_model[key]


def job_model(model, config: ParallelConfig, rank: int, device: str | torch.device, job: GenerationJob):
    """What this rank calls for ``job``'s model evaluations: the plain model (world size 1) or its ``ParallelWan``
    in the job's parallel mode (``job.mode_choice``: the controller's, the same on every rank) with the step count
    reset (each call = one step). Collective on first use: every rank calls it."""
    job.check_text_dim(model.config.text_dim)
    if config.world_size == 1:
        return model
    config = job.parallel_config(config)
    if job.mode_choice is not None:
        log.info("job runs in the %s mode (%s)", config.mode, job.mode_choice.reason)
    runner = parallel_model(model, config, rank, device)
    runner.begin_job(config.schedule(job.sync_frequency))
    return runner


def last_stats(model) -> dict:
    """Statistics of the last job (session) on this model (empty for world size 1)."""
    per_model = model.__dict__.get(_RUNTIME_ATTR) or {}
    for runner in per_model.values():
        return runner.stats
    return {}


def resolve_weights(spec: RuntimeSpec, device: torch.device, free_bytes: int) -> str:
    """``spec.weights`` with ``auto`` resolved the same way on every rank (collective for ``auto`` on several GPUs:
    the smallest free memory of the group decides, see ``weight_memory.choose_weights``)."""
    if spec.weights != "auto":
        return spec.weights
    if spec.world_size < 2 or device.type != "cuda" or spec.offload:  # offload streams whole blocks instead
        return "replicated"
    free = torch.tensor([float(free_bytes)], dtype=torch.float64, device=device)
    dist.all_reduce(free, op=dist.ReduceOp.MIN)
    config = inspect_wan_checkpoint(spec.model_path).config
    models = len(spec.model_paths)
    choice = choose_weights(config, spec.precision, spec.quantization, spec.world_size, int(free.item()), models)
    log.info("weights auto: %s (smallest free memory of the group %.1f GiB)", choice, free.item() / 1024**3)
    return choice


def load_rank_models(
    spec: RuntimeSpec, device: torch.device, weights: str = "replicated"
) -> tuple[torch.nn.Module, ...]:
    """Every model of ``spec`` (one, or Wan 2.2 A14B's two experts) on this rank's device, in ``job.expert`` order,
    each with its own LoRA chain merged; ``weights`` ``sharded``: each model's blocks sharded over the group
    (collective)."""
    mesh = weights_mesh(device) if weights == "sharded" else None
    return tuple(
        load_rank_model(spec, device, path, loras, mesh) for path, loras in zip(spec.model_paths, spec.expert_loras)
    )


def load_rank_model(
    spec: RuntimeSpec, device: torch.device, path: str, loras: tuple[LoraFile, ...], mesh=None
) -> torch.nn.Module:
    """Load ``path`` (one of ``spec``'s models) on this rank's device with ``loras`` merged, projections fused, with
    the group's attention kernel and compile setting. With a ``mesh`` the model is loaded on the CPU (memory-mapped),
    the LoRA chain merged there, and only this rank's shard of each block moves to the device
    (``sharded_weights.py``). With ``offload`` the blocks stay in host memory, streamed to the device per forward
    (``wanvideo/offload.py``)."""
    compile_now, state = compile_choice(spec.parallel, device)
    # Streamed or sharded blocks have their weights only inside their own call: they compile there, at the first step.
    compile_in_background = os.environ.get(COMPILE_IN_BACKGROUND_ENV) != "0" and not spec.offload and mesh is None
    preload_attention(spec.parallel.attention_backend, device)
    if compile_now:
        preload_compiler()
    model = load_wan_model(
        path,
        dtype=PRECISIONS[spec.precision],
        quantization=spec.quantization,
        device="cpu" if mesh is not None or spec.offload else device,
    )
    model.eval()
    model.fuse_projections()
    if spec.offload:
        stream_blocks_from_host(model, device)
    if loras:
        apply_loras(model, path, loras)
    if mesh is not None:
        shard_blocks(model, device, mesh)
        enable_fp8_matmul(model)  # on the device now: fp8 tensor cores where it has them
    model.set_attention_backend(spec.parallel.attention_backend)
    if compile_now:
        model.compile_blocks(in_background=compile_in_background)
    elif spec.parallel.compile_blocks:
        log.info("compile %s", state)
    return model


COMPILE_IN_BACKGROUND_ENV = "WDF_COMPILE_IN_BACKGROUND"
"""Ranks compile their blocks in a background thread while the first steps run eager (``block_compile``); ``0``:
at the first step, which waits for it (``bench/comfyui_native.py --variants foreground``). Ranks whose blocks are
streamed or sharded always compile at the first step."""


def compile_choice(parallel: ParallelConfig, device: torch.device) -> tuple[bool, str]:
    """Whether this rank compiles its blocks, and the state as the status shows it (``on``, ``off``, or ``off (why
    not here)``): the ``compile`` setting asks for it, ``wanvideo.block_compile.compile_available`` says where it
    runs (CUDA GPUs with Triton); elsewhere the rank runs eager rather than fail."""
    if not parallel.compile_blocks:
        return False, "off"
    available, reason = compile_available(device)
    return (True, "on") if available else (False, f"off ({reason})")


def rank_kernels(parallel: ParallelConfig, device: torch.device) -> dict[str, str]:
    """What this rank runs with, ``auto`` and the compile request resolved: ``{"attention": kernel, "compile": state}``
    (the ``Ready`` report and the in-process status carry it to the Status node and the CLI)."""
    return {
        "attention": attention_kernel_name(parallel.attention_backend, device),
        "compile": compile_choice(parallel, device)[1],
    }


def apply_rank_loras(models, spec: RuntimeSpec, chains) -> dict:
    """Make ``chains`` (one per model of ``spec``) the merged LoRA chains: each model whose chain differs from
    ``spec``'s is re-merged from its unmodified weights (read again from its checkpoint), the others are left alone.
    Sharded weights: each rank writes the rows of its shards (no communication). Returns the tensors changed, the
    seconds and which experts were re-merged."""
    target = spec.with_expert_loras(chains)
    changed = [
        (expert, models[expert], path, after)
        for expert, (path, before, after) in enumerate(zip(spec.model_paths, spec.expert_loras, target.expert_loras))
        if before != after
    ]
    for _, model, _, after in changed:  # every chain checked before any weight changes
        plan_loras(after, model.config)
    summary = {"tensors": 0, "seconds": 0.0, "experts": []}
    with torch.no_grad():
        for expert, model, path, after in changed:
            merged = apply_loras(model, path, after, assign=assign_rows)
            summary["tensors"] += merged["tensors"]
            summary["seconds"] += merged["seconds"]
            summary["experts"].append(expert)
    return summary


def session_flow(
    model,
    parallel: ParallelConfig,
    rank: int,
    device: torch.device,
    job: GenerationJob,
    batch: int,
    return_uncond: bool,
) -> GuidedFlow:
    """The guided flow this rank evaluates for each call of a forward session (``wanvideo.sampling``'s CFG code)."""
    return GuidedFlow(
        job_model(model, parallel, rank, device, job),
        job.positive,
        job.negative,
        cfg=job.cfg,
        batch=int(batch),
        device=device,
        model_kwargs={**(job.extra.get("model_kwargs") or {}), **job.model_kwargs("positive")},
        negative_kwargs={**(job.extra.get("model_kwargs") or {}), **job.model_kwargs("negative")},
        return_uncond=bool(return_uncond),
        denoise_mask=job.frame_denoise,
        step_cache=job_step_cache(job, parallel.world_size, rank),
    )


def job_step_cache(job: GenerationJob, world_size: int, rank: int) -> EasyCache | None:
    """``job``'s EasyCache for this rank: with several ranks every skip decision is the group's (the accumulated
    change all-reduced with MAX over every rank, CFG-parallel halves included), so all ranks skip the same calls
    and a skipped call runs no collective of the model; rank 0 logs."""
    if job.step_cache is None:
        return None
    return EasyCache(job.step_cache, job.shift, decide=group_max if world_size > 1 else None, log=rank == 0)


def group_max(value: torch.Tensor) -> torch.Tensor:
    """The largest of every rank's ``value`` (a 0-d tensor on the rank's device), identical on every rank."""
    agreed = value.detach().reshape(1).to(torch.float64)
    dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
    return agreed[0]
