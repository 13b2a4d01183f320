"""What a runtime reports to the controller and the model calls it drives: progress events, the two ways a job
ends early (``JobCancelled``, ``WorkerFailed``) and ``ForwardSession``, shared by the worker group and the
in-process runner.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..wanvideo.errors import WanDistriFusionError
from .job import GenerationJob

ProgressCallback = Callable[["ProgressEvent"], None]


class JobCancelled(WanDistriFusionError):
    """The job was cancelled; every rank stopped after the same step and the group is still usable."""

    def __init__(self, message: str, step: int = 0, total: int = 0, stopped_steps: dict[int, int] | None = None):
        super().__init__(message)
        self.step, self.total = step, total
        self.stopped_steps = dict(stopped_steps or {})
        """Step each local rank reported stopping after (they agree by construction)."""


class WorkerFailed(WanDistriFusionError):
    """A rank died, failed or hung; the group was stopped and the next run starts a fresh one."""

    def __init__(self, message: str, rank: int | None = None):
        super().__init__(message)
        self.rank = rank


@dataclass(frozen=True)
class ProgressEvent:
    """One finished step, reported by rank 0: a job's sampler step, or one call of a forward session."""

    step: int
    """Steps done, 1..total."""
    total: int
    seconds_per_step: float
    """Wall time of this step (a session call: the ranks' time for it)."""
    memory_per_rank: tuple[int, ...]
    """Bytes in use per rank, index = rank (CUDA: allocated by torch; CPU: resident set)."""


class ForwardSession:
    """Model evaluations driven by the controller: ``session(x, t)`` is the CFG-guided flow prediction of the
    runtime's model at latent ``x`` ``[1, C, F, H, W]`` (float32) and timestep ``t`` (0..1000), as float32 CPU.

    One call = one step of the runtime (the displaced mode's warm-up and stale-K/V counting, progress events,
    the step timeout). The cond/uncond batch, the 512-token context padding and ``uncond + cfg * (cond -
    uncond)`` happen on the ranks (``wanvideo.sampling.GuidedFlow``, as in the job path). Use it as a context
    manager, from ``runtime.forward_session(job, ...)``; leaving the ``with`` block ends the session on every
    rank after the same call, also when an exception leaves it, and the runtime stays usable. ``cancelled()``
    is polled before each call: true raises ``JobCancelled``. An exception raised by ``progress`` propagates
    out of the call.
    """

    def __init__(
        self,
        job: GenerationJob,
        shape: tuple[int, ...],
        progress: ProgressCallback | None,
        cancelled: Callable[[], bool] | None,
        return_uncond: bool,
    ):
        self.job = job
        self.shape = tuple(int(n) for n in shape)
        """The latent shape every call takes."""
        self.total = job.steps
        """Expected number of calls (the job's steps), for progress events."""
        self.calls = 0
        self.return_uncond = bool(return_uncond) and job.negative is not None
        self.last_uncond: torch.Tensor | None = None
        """With ``return_uncond``: the unguided (negative-prompt) flow of the last call."""
        self._progress = progress
        self._cancelled = cancelled
        self._open = False

    def __enter__(self) -> ForwardSession:
        raise NotImplementedError

    def __exit__(self, *exc) -> None:
        raise NotImplementedError

    def _evaluate(self, x: torch.Tensor, t: float) -> tuple[torch.Tensor, torch.Tensor | None, float, tuple[int, ...]]:
        """(flow, uncond flow or None, seconds, memory per rank) of one call."""
        raise NotImplementedError

    def _record(self, event: ProgressEvent) -> None:
        """Keep ``event`` for the runtime's status."""

    def __call__(self, x: torch.Tensor, t: float) -> torch.Tensor:
        """The guided flow at ``(x, t)``; see the class docstring."""
        if not self._open:
            raise WanDistriFusionError("forward session: it has ended; open a new one with runtime.forward_session().")
        if tuple(x.shape) != self.shape:
            raise WanDistriFusionError(
                f"forward session: latent of shape {list(x.shape)}, but the session was opened for {list(self.shape)}."
            )
        if self._cancelled is not None and self._cancelled():
            raise JobCancelled(
                f"cancelled after step {self.calls} of {self.total}", self.calls, max(self.total, self.calls)
            )
        x = x.detach().to("cpu", torch.float32).contiguous()
        flow, uncond, seconds, memory = self._evaluate(x, float(t))
        self.calls += 1
        self.last_uncond = uncond
        event = ProgressEvent(self.calls, max(self.total, self.calls), seconds, tuple(memory))
        self._record(event)
        if self._progress is not None:
            self._progress(event)
        return flow


def session_options(runtime_shape: tuple[int, ...], return_uncond: bool) -> dict:
    """The options a rank's ``session_flow`` takes for a session of this latent shape."""
    return {"shape": list(runtime_shape), "return_uncond": bool(return_uncond)}
