"""One rank's model: loaded for the spec, wrapped for the topology (``ParallelWan``) and guided for a session."""

from __future__ import annotations

import logging

import torch

from ..wanvideo.loading import PRECISIONS, load_wan_model
from ..wanvideo.lora import LoraFile, apply_loras, plan_loras
from ..wanvideo.sampling import GuidedFlow
from .config import ParallelConfig
from .job import GenerationJob
from .parallel_model import ParallelWan
from .settings import RuntimeSpec

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
    with the step count reset (each call = one step). Collective on first use: every rank calls it."""
    job.check_text_dim(model.config.text_dim)
    if config.world_size == 1:
        return model
    config = config.for_job(job.steps, job.sync_frequency)  # ``auto`` resolved the same way on every rank
    runner = parallel_model(model, config, rank, device)
    runner.begin_job(config.schedule(job.sync_frequency))
    return runner


def last_stats(model) -> dict:
    """Statistics of the last job (session) on this model (empty for world size 1)."""
    per_model = model.__dict__.get(_RUNTIME_ATTR) or {}
    for runner in per_model.values():
        return runner.stats
    return {}


def load_rank_models(spec: RuntimeSpec, device: torch.device) -> tuple[torch.nn.Module, ...]:
    """Every model of ``spec`` (one, or Wan 2.2 A14B's two experts) on this rank's device, in ``job.expert`` order,
    each with its own LoRA chain merged."""
    return tuple(load_rank_model(spec, device, path, loras) for path, loras in zip(spec.model_paths, spec.expert_loras))


def load_rank_model(spec: RuntimeSpec, device: torch.device, path: str, loras: tuple[LoraFile, ...]) -> torch.nn.Module:
    """Load ``path`` (one of ``spec``'s models) on this rank's device with ``loras`` merged, projections fused,
    with the group's attention kernel and compile setting."""
    model = load_wan_model(path, dtype=PRECISIONS[spec.precision], quantization=spec.quantization, device=device)
    model.eval()
    model.fuse_projections()
    if loras:
        apply_loras(model, path, loras)
    model.set_attention_backend(spec.parallel.attention_backend)
    if spec.parallel.compile_blocks:
        model.compile_blocks()
    return model


def apply_rank_loras(models, spec: RuntimeSpec, chains) -> dict:
    """Make ``chains`` (one per model of ``spec``) the merged LoRA chains: each model whose chain differs from
    ``spec``'s is re-merged from its unmodified weights (read again from its checkpoint), the others are left alone.
    Returns the tensors changed, the seconds and which experts were re-merged."""
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
            merged = apply_loras(model, path, after)
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
    )
