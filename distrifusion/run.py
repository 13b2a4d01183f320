"""The one way to run a job: the controller runs the sampler loop, the runtime's ranks serve each model call
through its forward session (as the ComfyUI Sampler does with ComfyUI's samplers)."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from ..wanvideo.sampling import sample_guided
from .job import GenerationJob
from .session import ProgressCallback
from .validation import check_solver

logger = logging.getLogger(__name__)


def run_job(
    runtime,
    job: GenerationJob,
    progress: ProgressCallback | None = None,
    cancelled: Callable[[], bool] | None = None,
    report: Callable[[str], None] | None = None,
) -> torch.Tensor:
    """Sample ``job`` (Wan's solvers: ``job.sampler`` / ``job.scheduler``) and return the final latent (float32, CPU).

    ``runtime`` is a ``WorkerGroup`` or an ``InProcessRunner``. Raises ``JobCancelled`` (runtime still usable) once
    ``cancelled()`` turns true between steps, ``WorkerFailed`` (group stopped) when a rank died, failed or hung; an
    exception from ``progress`` (e.g. ComfyUI's interrupt) ends the session on every rank and is re-raised.
    ``report`` gets the EasyCache summary (which calls were skipped) when the job has one.
    """
    check_solver(job)  # before any rank works
    with runtime.forward_session(job, progress, cancelled) as model:
        latent = sample_guided(
            model,
            model.shape,
            latent=job.latent,
            seed=job.seed,
            steps=job.steps,
            shift=job.shift,
            sampler=job.sampler,
            scheduler=job.scheduler,
            denoise=job.denoise,
            device=model.device,
        )
        summary = model.step_cache_summary()
    if summary is not None:
        (report or logger.info)(summary)
    return latent
