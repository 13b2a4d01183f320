"""World size 1: the runtime's interface (``forward_session``, ``status``) with the model in this process,
no workers and no process group. ``workers.start_runtime`` returns it for one rank.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable

import torch

from ..wanvideo.errors import WanDistriFusionError
from .config import ModeChoice
from .devices import device_memory, device_name, memory_in_use, memory_peak, resolve_device
from .job import GenerationJob
from .memory_plan import MemoryPlan, plan_job
from .rank import apply_rank_loras, load_rank_models, rank_kernels, session_flow
from .session import ForwardSession, JobCancelled, ProgressEvent, Runtime
from .settings import RuntimeSpec
from .validation import check_job
from .wire import describe_error


class LocalSession(ForwardSession):
    """A forward session on the ``InProcessRunner``'s model."""

    def __init__(self, runner: InProcessRunner, job, progress, cancelled, return_uncond):
        runner.start()
        super().__init__(job, job.latent_shape(runner._model.config.out_dim), progress, cancelled, return_uncond)
        self.runner = runner
        self.device = runner._device
        self.flow = None

    def __enter__(self) -> LocalSession:
        runner = self.runner
        self.job = runner._prepare(self.job, self._cancelled)
        self.flow = session_flow(
            runner._models[self.job.expert],
            runner.parallel,
            0,
            runner._device,
            self.job,
            self.shape[0],
            self.return_uncond,
        )
        self._open = True
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._open, self.flow = False, None
        if isinstance(exc, JobCancelled):
            exc.stopped_steps = {0: self.calls}
        elif exc is None:
            self.runner._jobs_run += 1
        else:
            self.runner._last_error = describe_error(exc)

    def _evaluate(self, x, t):
        began = time.perf_counter()
        with torch.no_grad():
            flow = self.flow(x, t)
        uncond = self.flow.last_uncond if self.flow.return_uncond else None
        skipped = self.flow.step_cache is not None and self.flow.step_cache.last_skipped
        if self.device.type == "cuda":  # the step's own time; the sampler needs the flow next anyway
            torch.cuda.synchronize(self.device)
        return flow, uncond, time.perf_counter() - began, (memory_in_use(self.device),), skipped

    def _record(self, event: ProgressEvent) -> None:
        self.runner._progress = {
            "step": event.step,
            "total": event.total,
            "seconds_per_step": event.seconds_per_step,
            "memory": event.memory_per_rank[0],
        }


class InProcessRunner(Runtime):
    """World size 1: the same interface as ``WorkerGroup``, with the model in this process."""

    session_class = LocalSession

    def __init__(self, spec: RuntimeSpec):
        if spec.world_size != 1:
            raise WanDistriFusionError(f"world size: the in-process runner runs 1 rank, not {spec.world_size}.")
        self.spec = spec
        self.parallel = spec.parallel
        self._model = None
        self._models: tuple = ()
        self._device: torch.device | None = None
        self._free_before_load: int | None = None
        self._kernels: dict[str, str | None] = {"attention": None, "compile": None}
        """The attention kernel and compile state the model loaded with (``rank.rank_kernels``), for the status."""
        self._progress = {"step": 0, "total": 0, "seconds_per_step": None, "memory": None}
        self._last_error: str | None = None
        self._last_plan: MemoryPlan | None = None
        self._last_choice: ModeChoice | None = None
        self._jobs_run = 0

    @property
    def alive(self) -> bool:
        return self._model is not None

    def start(self) -> InProcessRunner:
        if self._model is not None:
            return self
        index = torch.cuda.current_device() if self.spec.device == "cuda" and torch.cuda.is_available() else 0
        self._device = resolve_device(self.spec.device, index)
        self._free_before_load = device_memory(self._device)[0]
        self._models = load_rank_models(self.spec, self._device)
        self._model = self._models[0]
        self._kernels = rank_kernels(self.parallel, self._device)
        return self

    def apply_loras(self, loras, second_loras=()) -> tuple[int, ...]:
        """Make ``loras`` (and ``second_loras``, the second model's) the merged chains: each loaded model whose chain
        changed is re-merged from its unmodified weights. The experts re-merged."""
        target = self.spec.with_changes(loras=tuple(loras), second_loras=tuple(second_loras))
        experts = ()
        if self._model is not None:
            experts = tuple(apply_rank_loras(self._models, self.spec, target.expert_loras)["experts"])
        self.spec = target
        return experts

    def _prepare(self, job: GenerationJob, cancelled: Callable[[], bool] | None) -> GenerationJob:
        """Load the model when needed, check ``job`` and its memory, reset the progress; ``job`` with its parallel
        mode chosen (one rank: nothing to exchange)."""
        self.start()
        config = self._model.config
        check_job(config, self.parallel, job)
        job, self._last_plan = plan_job(
            config,
            self.parallel,
            job,
            self.spec.precision,
            self.spec.quantization,
            self._free_before_load if self._device.type == "cuda" else None,
            models=len(self._models),
            offload=self.spec.offload,
        )
        self._last_choice = job.mode_choice
        if cancelled is not None and cancelled():
            raise JobCancelled("cancelled before the first step", 0, job.steps)
        self._progress = {"step": 0, "total": job.steps, "seconds_per_step": None, "memory": None}
        if self._device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self._device)
        return job

    def close(self) -> None:
        """Free the model; idempotent."""
        device, self._model, self._models = self._device, None, ()
        if device is not None and device.type == "cuda":
            torch.cuda.empty_cache()

    def ranks_ready(self) -> tuple[int, int]:
        """(ranks ready, ranks in the world) while starting: the model is loaded or not."""
        return int(self._model is not None), 1

    def status(self) -> dict:
        device = self._device
        info = {
            "rank": 0,
            "local": True,
            "pid": os.getpid(),
            "device": str(device) if device else None,
            "device_name": device_name(device) if device else None,
            "memory_bytes": memory_in_use(device) if device and self._model is not None else None,
            "peak_bytes": memory_peak(device) if device else None,
            "ready": self._model is not None,
        }
        return {
            "runtime": "in-process",
            "alive": self.alive,
            "world_size": 1,
            "first_rank": 0,
            "local_ranks": 1,
            "ranks": [info],
            "pids": [info["pid"]],
            "device_names": [info["device_name"]],
            "memory_per_rank": [self._progress["memory"] or info["memory_bytes"]],
            "current_step": self._progress["step"],
            "total_steps": self._progress["total"],
            "seconds_per_step": self._progress["seconds_per_step"],
            "jobs_run": self._jobs_run,
            "last_error": self._last_error,
            "comm_backend": "none",
            "comm_manager": self.parallel.comm_backend,
            "parallel": self.parallel.to_dict(),
            "precision": self.spec.precision,
            "quantization": self.spec.quantization,
            "device": self.spec.device,
            "memory_plan": self._last_plan.summary() if self._last_plan else None,
            "mode_choice": dataclasses.asdict(self._last_choice) if self._last_choice else None,
            **self._kernels,
        }
