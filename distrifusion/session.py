"""The forward session: model calls driven by the controller (``ForwardSession``, and ``GroupSession`` on a worker
group's ranks), what they report (``ProgressEvent``) and the two ways a job ends early (``JobCancelled``,
``WorkerFailed``); the in-process runner's session is in ``in_process.py``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from ..wanvideo.errors import WanDistriFusionError
from ..wanvideo.step_cache import skip_summary
from . import wire
from .job import GenerationJob
from .shared_latents import SharedLatents
from .store import OpenSession

logger = logging.getLogger(__name__)

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
    runtime's model at latent ``x`` ``[1, C, F, H, W]`` (float32) and timestep ``t`` (0..1000), as float32 on
    ``x``'s device. ``device`` is where the ranks take ``x`` (CPU for a worker group, the model's device in-process):
    a sampler that keeps its latents there copies nothing per call.

    One call = one step of the runtime (the displaced mode's warm-up and stale-K/V counting, progress events,
    the step timeout). The cond/uncond batch, the 512-token context padding and ``uncond + cfg * (cond -
    uncond)`` happen on the ranks (``wanvideo.sampling.GuidedFlow``, as ``wanvideo.sampling.sample`` does). Use it as a context
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
        self.skipped_calls: list[int] = []
        """Calls (from 0) whose model evaluation the job's EasyCache skipped on every rank."""
        self.return_uncond = bool(return_uncond) and job.negative is not None
        self.last_uncond: torch.Tensor | None = None
        """With ``return_uncond``: the unguided (negative-prompt) flow of the last call."""
        self.device = torch.device("cpu")
        """Where a call's ``x`` goes without a copy (the flow comes back on ``x``'s device either way)."""
        self._progress = progress
        self._cancelled = cancelled
        self._open = False

    def __enter__(self) -> ForwardSession:
        raise NotImplementedError

    def __exit__(self, *exc) -> None:
        raise NotImplementedError

    def _evaluate(
        self, x: torch.Tensor, t: float
    ) -> tuple[torch.Tensor, torch.Tensor | None, float, tuple[int, ...], bool]:
        """(flow, uncond flow or None, seconds, memory per rank, whether the ranks skipped the model) of one call;
        ``x`` is on ``device``, and so are the flows."""
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
        flow, uncond, seconds, memory, skipped = self._evaluate(
            x.detach().to(self.device, torch.float32).contiguous(), float(t)
        )
        if skipped:
            self.skipped_calls.append(self.calls)
        self.calls += 1
        self.last_uncond = None if uncond is None else uncond.to(x.device)
        event = ProgressEvent(self.calls, max(self.total, self.calls), seconds, tuple(memory))
        self._record(event)
        if self._progress is not None:
            self._progress(event)
        return flow.to(x.device)

    def step_cache_summary(self) -> str | None:
        """ComfyUI's EasyCache closing line for this session (``None`` without EasyCache)."""
        if self.job.step_cache is None:
            return None
        return skip_summary(self.skipped_calls, self.calls)


class Runtime:
    """What the worker group and the in-process runner share: forward sessions and a ``with`` lifetime."""

    session_class: type[ForwardSession]

    def start(self) -> Runtime:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def apply_loras(self, loras, second_loras=()) -> tuple[int, ...]:
        """Make ``loras`` (``LoraFile``s; ``second_loras``: the second model's) the chains merged into the weights,
        without restarting the ranks; re-merges only the models whose chain changed and returns their numbers."""
        raise NotImplementedError

    def forward_session(
        self,
        job: GenerationJob,
        progress: ProgressCallback | None = None,
        cancelled: Callable[[], bool] | None = None,
        *,
        return_uncond: bool = False,
    ) -> ForwardSession:
        """A ``ForwardSession`` for ``job``'s conditioning, cfg, sync frequency and latent size (``job.latent``'s
        shape, else width/height/length); ``job.steps`` is the expected number of calls.

        ``with runtime.forward_session(job) as model: flow = model(x, t)``. On a worker group a dead, failing or
        hung rank raises ``WorkerFailed`` from the call (the group is stopped; the next session restarts it).
        ``return_uncond`` also returns the negative prompt's flow (``model.last_uncond``), batching cond and uncond
        even at cfg 1, for ComfyUI's CFG++ samplers.
        """
        return self.session_class(self, job, progress, cancelled, return_uncond)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


class GroupSession(ForwardSession):
    """A forward session on a ``WorkerGroup``'s ranks: holds the group's run lock from ``__enter__`` to ``__exit__``.

    ``x`` goes to rank 0 and the flow comes back through shared memory (``SharedLatents``); each call is one
    ``Forward`` and one ``Prediction`` message.
    """

    def __init__(self, group, job: GenerationJob, progress, cancelled, return_uncond: bool):
        if not group.is_leader:
            raise WanDistriFusionError(
                f"rank: this group holds ranks {group.spec.first_rank}..{group.spec.local_rank_ids[-1]}; "
                "jobs are submitted on the host that runs rank 0."
            )
        config = group.model_config
        super().__init__(job, job.latent_shape(config.out_dim if config else 16), progress, cancelled, return_uncond)
        self.group = group
        self.number: int | None = None
        self.latents: SharedLatents | None = None

    def __enter__(self) -> GroupSession:
        group = self.group
        group.run_lock.acquire()
        try:
            self.number, self.job = group.open_command(self.job, self._cancelled)
            self.shape = tuple(self.job.latent_shape(group.model_config.out_dim))
            self.latents = SharedLatents.create(self.shape)
            command = OpenSession(
                session=self.number,
                job=replace(self.job, latent=None),  # the ranks get the latent's size; the controller holds x
                shape=self.shape,
                return_uncond=self.return_uncond,
                latents=str(self.latents.path),
                latents_ranks=tuple(group.spec.local_rank_ids),  # these map the file; others get x broadcast
            )
            group.post_command(self.number, command)
        except BaseException:
            self._drop_latents()
            if self.number is not None:
                group.end_command(self.number)
            group.run_lock.release()
            raise
        self._open = True
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        group = self.group
        self._open = False
        try:
            if group.alive:
                try:
                    stopped = self._end()
                except WorkerFailed:  # the group was stopped; the next session restarts it
                    if exc is None:
                        raise
                    logger.warning("ending the forward session failed after %r", exc, exc_info=True)
                except BaseException:  # e.g. Ctrl-C while ending: the ranks' state is unknown, stop them
                    group.stop(kill=True)
                    raise
                else:
                    if isinstance(exc, JobCancelled):
                        exc.stopped_steps = stopped
            if exc is None:
                group.count_job()
        finally:
            self._drop_latents()
            group.end_command(self.number)
            group.run_lock.release()

    def _drop_latents(self) -> None:
        if self.latents is not None:
            self.latents.unlink()
            self.latents = None

    def _evaluate(self, x, t):
        group, latents, call = self.group, self.latents, self.calls + 1
        latents.x.copy_(x)
        group.processes.send(0, wire.Forward(self.number, call, t))
        answer: list[wire.Prediction] = []

        def take(rank: int, message: wire.Message) -> None:
            match message:
                case wire.Prediction(session=self.number, call=number) if number == call:
                    answer.append(message)

        self._wait(take, lambda: bool(answer), f"during step {call} of {max(self.total, call)}")
        latents.unlink()  # rank 0 has mapped it: nothing is left in the shared-memory folder
        uncond = latents.uncond.clone() if self.return_uncond else None
        done = answer[0]
        for note in done.notes:  # EasyCache's verbose lines from rank 0, in the controller's console
            logger.info(note)
        return latents.flow.clone(), uncond, done.seconds_per_step, done.memory_per_rank, done.skipped

    def _record(self, event: ProgressEvent) -> None:
        self.group.record_progress(event)

    def _end(self) -> dict[int, int]:
        """End the session on every rank; the number of calls each local rank served (all equal)."""
        group = self.group
        group.processes.send(0, wire.End(self.number))
        stopped: dict[int, int] = {}

        def take(rank: int, message: wire.Message) -> None:
            match message:
                case wire.SessionEnded(session=self.number, calls=calls, stats=stats):
                    stopped[rank] = calls
                    if rank == 0:
                        group.record_stats(stats)

        local = len(group.spec.local_rank_ids)
        self._wait(take, lambda: len(stopped) >= local, f"while ending the session after step {self.calls}")
        if len(set(stopped.values())) > 1:
            group.supervisor.fail(None, f"the ranks left the session after different steps {stopped}")
        return stopped

    def _wait(self, take, done, phase: str) -> None:
        group = self.group
        group.supervisor.wait(
            take,
            done,
            doing="a forward session was running",
            phase=phase,
            timeout_s=group.step_timeout_s,
            on_timeout=lambda: (
                None,
                f"no progress from the workers for step_timeout_s = {group.step_timeout_s:.0f} s {phase} "
                f"(a rank is hung, or a step takes longer than step_timeout_s allows; {group.processes.states()})",
            ),
        )
