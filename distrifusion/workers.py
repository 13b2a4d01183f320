"""The worker group: one process per rank, started, fed and stopped by the controller (ComfyUI or ``cli.py``).

The controller holds no rank. The group that holds rank 0 hosts the rendezvous store (``store.py``), starts its
local ranks (``processes.py``), posts commands for every rank (local or on another host) and drives forward
sessions (``session.py``) while ``supervision.py`` watches the ranks. Any dead, failing or hung rank stops the
whole group and fails the call with ``WorkerFailed``; the next session starts a fresh group. Jobs run through
``run.run_job``, which drives the sampler on the controller through a session.
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
import threading
import time
import weakref
from collections.abc import Callable

import torch

from ..wanvideo.errors import WanDistriFusionError
from ..wanvideo.lora import LoraFile, plan_loras
from ..wanvideo.model import WanConfig
from . import wire
from .config import ModeChoice
from .in_process import InProcessRunner
from .job import GenerationJob
from .memory_plan import MemoryPlan, plan_job
from .processes import RankProcesses, describe_exit
from .session import GroupSession, JobCancelled, ProgressEvent, Runtime, WorkerFailed
from .settings import RuntimeSpec
from .store import ApplyLoras, OpenSession, StopServing, connect_store, encode_command, store_drop, store_put
from .supervision import STARTING, RemoteRanks, Supervisor
from .validation import check_job, check_spec_before_start

logger = logging.getLogger(__name__)

__all__ = ["JobCancelled", "WorkerFailed", "WorkerGroup", "serve_remote_ranks", "start_runtime"]

_live_groups: weakref.WeakSet = weakref.WeakSet()
_atexit_registered = False


def _register_atexit(group) -> None:
    global _atexit_registered
    _live_groups.add(group)
    if not _atexit_registered:
        atexit.register(_close_all)
        _atexit_registered = True


def _close_all() -> None:
    for group in list(_live_groups):
        try:
            group.close()
        except Exception:  # at exit: keep closing the others
            logger.exception("closing a worker group at exit failed")


class WorkerGroup(Runtime):
    """Ranks ``spec.local_rank_ids`` of a patch-parallel group, one process each.

    The group that holds rank 0 (``spec.first_rank == 0``) hosts the rendezvous store on
    ``spec.master_addr:master_port`` and runs sessions; a group with ``first_rank > 0`` (another host, see
    ``cli.py worker``) joins it and gets its commands from there.
    """

    session_class = GroupSession

    def __init__(self, spec: RuntimeSpec):
        self.spec = spec
        self.parallel = spec.parallel
        self.step_timeout_s = spec.step_timeout_s
        """The spec's step timeout, adjustable while the group runs."""
        self.run_lock = threading.Lock()
        """Held by a forward session from its start to its end."""
        self._state_lock = threading.RLock()
        self.processes = RankProcesses(spec)
        self.remote: RemoteRanks | None = None
        self.supervisor = Supervisor(self.processes, None, lambda: self.stop(kill=True), self._phase)
        self._alive = False
        self._raw_store = None
        self._store = None
        self._port: int | None = None
        self._next_command = 1
        self.model_config: WanConfig | None = None
        self._last_stats: dict = {}
        self._progress = {"step": 0, "total": 0, "seconds_per_step": None, "memory_per_rank": [], "session": None}
        self._jobs_run = 0
        self._last_plan: MemoryPlan | None = None
        self._last_choice: ModeChoice | None = None
        self.posted_payloads: set[str] = set()
        """Payloads the ranks were sent through the store (the VAE's weights), forgotten when the group stops."""

    # -- public --------------------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        """Whether the ranks are up; a failed or closed group is not (the next session restarts it)."""
        return self._alive and self.processes.running()

    @property
    def is_leader(self) -> bool:
        return self.spec.is_leader

    def start(self) -> WorkerGroup:
        """Start the local ranks and wait until every rank of the world is ready; returns self."""
        with self._state_lock:
            if self.alive:
                return self
            if self.processes.ranks:
                self.stop(kill=True)
            self.supervisor.closing = False
            spec = self.spec
            check_spec_before_start(spec)
            _register_atexit(self)
            try:
                self._launch()
                self._wait_ready()
            except BaseException:
                self.stop(kill=True)
                raise
            self._alive = True
            logger.info("worker group ready: %s", self._describe())
            return self

    def close(self) -> None:
        """Stop every local rank (asked, then terminated, then killed) and free the store; idempotent."""
        self.supervisor.closing = True
        with self._state_lock:
            if not self.processes.ranks and self._raw_store is None:
                return
            self.stop(kill=self.run_lock.locked())
            _live_groups.discard(self)

    def stop(self, kill: bool) -> None:
        """Stop every local rank (politely unless ``kill``), close the channels, drop the store and the logs."""
        with self._state_lock:
            self._alive = False
            if not kill and self._store is not None:
                try:
                    store_put(self._store, f"cmd/{self._next_command}", encode_command(StopServing()))
                except Exception:
                    logger.debug("could not post the shutdown", exc_info=True)
            self.processes.stop(kill)
            self.posted_payloads = set()
            self._store = None
            self._raw_store = None  # the last reference: the store server stops, remote ranks exit
            self.remote = self.supervisor.remote = None

    def apply_loras(self, loras: tuple[LoraFile, ...], second_loras: tuple[LoraFile, ...] = ()) -> tuple[int, ...]:
        """Make ``loras`` (and ``second_loras``, the second model's) the chains merged on every rank: the running
        ranks re-merge each model whose chain changed from its unmodified weights (same processes, no reload); a
        group not running takes them at its next start. Checked against the model before any rank changes a weight.
        The experts re-merged (``GenerationJob.expert`` numbers)."""
        target = self.spec.with_changes(loras=tuple(loras), second_loras=tuple(second_loras))
        with self.run_lock:
            if not self.alive:
                self.spec = target
                return ()
            changed = [chain for chain, before in zip(target.expert_loras, self.spec.expert_loras) if chain != before]
            if not changed:
                return ()
            for chain in changed:
                plan_loras(chain, self.model_config)  # raises naming the file before anything is posted
            number = self._next_command
            self._next_command += 1
            try:
                self.post_command(number, ApplyLoras(target.expert_loras))
                applied: dict[int, tuple[int, ...]] = {}

                def take(rank: int, message: wire.Message) -> None:
                    if isinstance(message, wire.LorasApplied) and message.command == number:
                        applied[rank] = tuple(message.experts)

                local = set(self.spec.local_rank_ids)
                self.supervisor.wait(
                    take,
                    lambda: applied.keys() >= local,
                    doing="the ranks were merging LoRAs",
                    phase="while merging LoRAs",
                    timeout_s=self.spec.start_timeout_s,
                    on_timeout=lambda: (
                        None,
                        f"the ranks did not finish merging LoRAs within {self.spec.start_timeout_s:.0f} s",
                    ),
                )
            finally:
                self.end_command(number)
            self.spec = target
            experts = applied[min(applied)]
            logger.info("LoRA chains of expert(s) %s re-merged on ranks %s", list(experts), sorted(applied))
            return experts

    # -- what a session asks of the group -----------------------------------------------------

    def open_command(self, job: GenerationJob, cancelled: Callable[[], bool] | None) -> tuple[int, GenerationJob]:
        """Start the group when needed, check ``job``, choose its parallel mode and check its memory, and reserve its
        command number (holding the run lock). The number, and the job as the ranks run it (``mode_choice`` set)."""
        if not self.alive:
            self.start()
        check_job(self.model_config, self.parallel, job)
        job = self._plan_job(job)
        if cancelled is not None and cancelled():
            raise JobCancelled("cancelled before the first step", 0, job.steps)
        number = self._next_command
        self._next_command += 1
        self._progress = {
            "step": 0,
            "total": job.steps,
            "seconds_per_step": None,
            "memory_per_rank": [],
            "session": number,
        }
        return number, job

    def post_command(self, number: int, command: OpenSession) -> None:
        try:
            store_put(self._store, f"cmd/{number}", encode_command(command))
        except Exception as error:
            if isinstance(error, WanDistriFusionError):
                raise
            self.supervisor.fail(None, f"could not post the job to the workers' store ({wire.describe_error(error)})")

    def reserve_command(self) -> int:
        """Start the group when needed and reserve a command number (holding the run lock): VAE decodes."""
        if not self.alive:
            self.start()
        number = self._next_command
        self._next_command += 1
        return number

    def post_payload(self, key: str, data: bytes) -> None:
        """Leave ``data`` under ``key`` in the store for the ranks to read (the ranks keep what they read)."""
        try:
            store_put(self._store, key, data)
        except Exception as error:
            self.supervisor.fail(None, f"could not post {key} to the workers' store ({wire.describe_error(error)})")
        self.posted_payloads.add(key)

    def drop_payload(self, key: str) -> None:
        """Free ``key``'s bytes in the store once every rank has read them (``posted_payloads`` keeps the key)."""
        try:
            store_drop(self._store, key)
        except Exception:
            logger.debug("could not drop %s from the store", key, exc_info=True)

    def end_command(self, number: int) -> None:
        self._progress["session"] = None
        if self._alive:
            try:
                store_drop(self._store, f"cmd/{number}")
            except Exception:
                logger.debug("could not drop command %d from the store", number, exc_info=True)

    def record_progress(self, event: ProgressEvent) -> None:
        self._progress.update(
            step=event.step,
            total=event.total,
            seconds_per_step=event.seconds_per_step,
            memory_per_rank=list(event.memory_per_rank),
        )

    def record_stats(self, stats: dict) -> None:
        self._last_stats = dict(stats or {})

    def count_job(self) -> None:
        self._jobs_run += 1

    # -- status --------------------------------------------------------------------------------

    def ready_reports(self) -> dict[int, wire.Ready]:
        """The ``Ready`` report of every rank that sent one (local and on other hosts), by rank."""
        reports = {rank: entry.ready for rank, entry in self.processes.ranks.items() if entry.ready is not None}
        return {**reports, **(self.remote.ready if self.remote is not None else {})}

    def ranks_ready(self) -> tuple[int, int]:
        """(ranks that reported ready, ranks in the world), also while ``start`` is waiting for them."""
        return len(self.ready_reports()), self.spec.world_size

    def status(self) -> dict:
        """A JSON-friendly snapshot for the Status node and the CLI."""
        reports = self.ready_reports()
        ranks = [
            _rank_status(rank, reports.get(rank), rank in self.processes.ranks) for rank in range(self.spec.world_size)
        ]
        memory = list(self._progress["memory_per_rank"]) or [r["memory_bytes"] for r in ranks]
        backends = {report.comm_backend for report in reports.values() if report.comm_backend}
        return {
            "runtime": "workers",
            "alive": self.alive,
            "world_size": self.spec.world_size,
            "first_rank": self.spec.first_rank,
            "local_ranks": self.spec.local_ranks,
            "ranks": ranks,
            "pids": [r["pid"] for r in ranks],
            "device_names": [r["device_name"] for r in ranks],
            "memory_per_rank": memory,
            "current_step": self._progress["step"],
            "total_steps": self._progress["total"],
            "seconds_per_step": self._progress["seconds_per_step"],
            "jobs_run": self._jobs_run,
            "last_error": self.supervisor.last_error,
            "comm_backend": backends.pop() if len(backends) == 1 else ("/".join(sorted(backends)) or "none"),
            "weights": self.weights,
            **self.kernels,
            "comm_manager": self._last_stats.get("comm_backend", self.parallel.comm_backend),
            "last_job_stats": self._last_stats,
            "parallel": self.parallel.to_dict(),
            "precision": self.spec.precision,
            "quantization": self.spec.quantization,
            "device": self.spec.device,
            "master_addr": self.spec.master_addr,
            "master_port": self._port or self.spec.master_port,
            "log_dir": str(self.processes.log_dir) if self.processes.log_dir else None,
            "memory_plan": self._last_plan.summary() if self._last_plan else None,
            "mode_choice": dataclasses.asdict(self._last_choice) if self._last_choice else None,
        }

    # -- starting ------------------------------------------------------------------------------

    def _launch(self) -> None:
        spec = self.spec
        self._next_command = 1
        self.model_config = None
        if spec.device == "cuda":
            count = torch.cuda.device_count() if torch.cuda.is_available() else 0
            if count < spec.local_ranks:
                raise WanDistriFusionError(
                    f"GPUs: {spec.local_ranks} local ranks need {spec.local_ranks} GPUs but {count} are visible; "
                    "lower GPUs/world size, or start the other ranks on more hosts with `cli.py worker`."
                )
        self._port = spec.master_port
        if spec.is_leader:
            self._host_store()
        self.remote = self.supervisor.remote = RemoteRanks(spec, self._store)
        self.processes.launch(self._port)

    def _host_store(self) -> None:
        """Host the rendezvous store and put the group's spec into it."""
        spec = self.spec
        port = spec.master_port or 0
        try:
            self._raw_store, self._store = connect_store(
                spec.master_addr, port, is_master=True, timeout_s=spec.start_timeout_s
            )
        except Exception as error:
            raise WanDistriFusionError(
                f"master port: cannot host the rendezvous on {spec.master_addr}:{port} "
                f"({wire.describe_error(error).splitlines()[0]}); choose a free port or leave it empty for a random one."
            ) from error
        self._port = self._raw_store.port
        self._store.set("group", spec.to_json())
        self._store.set("collective_timeout_s", str(max(self.step_timeout_s, spec.start_timeout_s) + 60.0))

    def _wait_ready(self) -> None:
        processes, remote = self.processes, self.remote

        def take(rank: int, message: wire.Message) -> None:
            if isinstance(message, wire.Ready):
                processes.ranks[rank].ready = message
                if self.model_config is None:
                    self.model_config = _wan_config(message.model_config)

        def missing() -> list[int]:
            return [r for r, entry in processes.ranks.items() if entry.ready is None] + remote.missing()

        self.supervisor.wait(
            take,
            lambda: not missing(),
            doing="starting",
            phase=STARTING,
            timeout_s=self.spec.start_timeout_s,
            on_timeout=lambda: self._start_timeout(missing()),
            starting=True,
            tick=processes.take_new_connections,
        )
        processes.stop_accepting()
        if self.model_config is None and remote.ready:
            self.model_config = _wan_config(next(iter(remote.ready.values())).model_config)

    def _start_timeout(self, missing: list[int]) -> tuple[int | None, str]:
        local_missing = [r for r in missing if r in self.processes.ranks]
        remote_missing = [r for r in missing if r not in self.processes.ranks]
        hint = ""
        if remote_missing:
            hint = (
                f" Ranks {_ranges(remote_missing)} run on other hosts: start them there with `python cli.py worker "
                f"--rank R --world-size {self.spec.world_size} --master-addr {self.spec.master_addr} "
                f"--master-port {self._port} --model PATH`."
            )
        reason = (
            f"the workers were not ready within start_timeout_s = {self.spec.start_timeout_s:.0f} s "
            f"(waiting for ranks {_ranges(missing)}).{hint}"
        )
        return (local_missing[0] if local_missing else None), reason

    # -- running -------------------------------------------------------------------------------

    @property
    def weights(self) -> str | None:
        """``replicated`` or ``sharded``: what the ranks loaded (``auto`` resolved); ``None`` before they are ready."""
        choices = {report.weights for report in self.ready_reports().values()}
        return choices.pop() if len(choices) == 1 else None

    @property
    def kernels(self) -> dict[str, str | None]:
        """``{"attention": ..., "compile": ...}`` as the ranks resolved them (``rank.rank_kernels``; ranks that differ
        are joined with ``/``); ``None`` before they are ready."""
        reports = self.ready_reports().values()
        return {
            key: " / ".join(sorted({getattr(report, key) for report in reports if getattr(report, key)})) or None
            for key in ("attention", "compile")
        }

    def smallest_free_memory(self) -> int | None:
        """The smallest free memory of the group's GPUs before the ranks loaded (``None`` on the CPU: no limit)."""
        if self.spec.device != "cuda":
            return None
        frees = [report.free_before_load for report in self.ready_reports().values() if report.free_before_load]
        return min(frees) if frees else None

    def _plan_job(self, job: GenerationJob) -> GenerationJob:
        """``job`` with its parallel mode chosen (``auto`` resolved once, here, with the memory plan and the group's
        smallest free memory) after that mode's memory plan is checked."""
        job, self._last_plan = plan_job(
            self.model_config,
            self.parallel,
            job,
            self.spec.precision,
            self.spec.quantization,
            self.smallest_free_memory(),
            models=len(self.spec.model_paths),
            weights=self.weights or "replicated",
            offload=self.spec.offload,
        )
        self._last_choice = job.mode_choice
        if self.parallel.mode == "auto":
            logger.info("parallel mode auto: %s (%s)", job.mode_choice.mode, job.mode_choice.reason)
        logger.info("memory plan: %s", self._last_plan.summary())
        return job

    def _phase(self) -> str:
        if not self._alive:
            return STARTING
        step, total = self._progress["step"], self._progress["total"]
        if self._progress["session"] is None:
            return "while idle"
        return f"during step {min(step + 1, total) if total else step + 1} of {total}"

    def _describe(self) -> str:
        ranks = ", ".join(
            f"{rank}: pid {report.pid} {report.device} ({report.device_name})"
            for rank, report in self.ready_reports().items()
            if rank in self.processes.ranks
        )
        return f"world {self.spec.world_size}, {self.parallel.mode}, local ranks {ranks}"

    def serve_until_ended(self, say: Callable[[str], None]) -> None:
        """A group on another host: relay its ranks' failures to ``say`` until the group ends, then say how."""
        while self.alive:
            for rank, message in self.processes.receive(0.5):
                if isinstance(message, wire.Failure):
                    say(f"rank {rank} failed: {message.error}")
        codes = self.processes.exits()
        say(f"the group ended ({', '.join(f'rank {r} {describe_exit(c)}' for r, c in codes)})")


def _rank_status(rank: int, report: wire.Ready | None, local: bool) -> dict:
    fields = ("pid", "host", "device", "device_name", "memory_bytes", "free_before_load", "total_memory")
    return {
        "rank": rank,
        "local": local,
        **{name: getattr(report, name, None) for name in fields},
        "ready": report is not None,
    }


def _wan_config(config: dict) -> WanConfig:
    return WanConfig(**{**config, "patch_size": tuple(config["patch_size"])})


def _ranges(ranks: list) -> str:
    return ", ".join(str(r) for r in ranks if r is not None) or "none"


def create_runtime(spec: RuntimeSpec) -> WorkerGroup | InProcessRunner:
    """The runtime for ``spec``, not started: ``InProcessRunner`` for world size 1, else a ``WorkerGroup``."""
    return InProcessRunner(spec) if spec.world_size == 1 else WorkerGroup(spec)


def start_runtime(spec: RuntimeSpec) -> WorkerGroup | InProcessRunner:
    """``create_runtime(spec)``, started."""
    return create_runtime(spec).start()


def serve_remote_ranks(spec: RuntimeSpec, *, once: bool = False, on_event: Callable[[str], None] | None = None) -> int:
    """Host ranks ``spec.first_rank..`` of a group whose rank 0 runs elsewhere (``cli.py worker``).

    The ranks get the group's settings and commands from the controller's rendezvous store (``spec.parallel`` only
    gives the world size); when that group ends they are started again to join the next one (unless ``once``).
    Returns an exit code: with ``once``, 1 when the ranks could not join.
    """
    say = on_event or logger.info
    joined = False
    while True:
        group = WorkerGroup(spec)
        try:
            say(
                f"waiting for the controller at {spec.master_addr}:{spec.master_port} "
                f"(ranks {spec.first_rank}..{spec.local_rank_ids[-1]})"
            )
            group.start()
            joined = True
            say("joined the group; serving jobs")
            group.serve_until_ended(say)
        except WorkerFailed as error:
            say(f"could not join: {str(error).splitlines()[0]}")
        finally:
            group.close()
        if once:
            return 0 if joined else 1
        time.sleep(2.0)
