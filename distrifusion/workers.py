"""Worker lifecycle: one process per rank, started, fed, watched and stopped by the controller.

The controller is the ComfyUI (or ``cli.py``) process and holds no rank. It hosts the rendezvous
store, starts every local rank as ``python <repo>/distrifusion/worker_main.py`` (a fresh
interpreter that imports the pack under a fixed alias, since ComfyUI's hyphenated folder name is
not importable), posts jobs into the store for all ranks (local and on other hosts alike) and
listens on a local authenticated connection for readiness, per-step progress, the result and
errors. Besides whole jobs, a **forward session** lets the controller drive the sampler itself (ComfyUI's
KSampler samplers): ``with group.forward_session(job) as model: model(x, t)`` runs one guided model
evaluation on every rank per call. See ``worker.py`` for the protocol. Any dead, failing or hung rank stops the whole group
and fails the job with :class:`WorkerFailed`; the next :meth:`WorkerGroup.run` starts a fresh group.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import pickle
import queue
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Client, Connection, Listener, wait
from pathlib import Path

import psutil
import torch

from ..wanvideo.errors import WanDistriFusionError
from ..wanvideo.model import WanConfig
from .config import ParallelConfig
from .in_process import InProcessRunner
from .job import GenerationJob
from .memory_plan import MemoryPlan, plan_memory
from .session import ForwardSession, JobCancelled, ProgressCallback, ProgressEvent, WorkerFailed, session_options
from .settings import RuntimeSpec
from .shared_latents import FILE_PREFIX as SHARED_FILE_PREFIX
from .shared_latents import SharedLatents, shared_folder
from .validation import check_before_start, check_job
from .worker import (
    AUTHKEY_ENV,
    EXIT_CONTROLLER_GONE,
    EXIT_FAILED,
    connect_store,
    describe_error,
    encode_job,
    encode_payload,
    store_drop,
    store_put,
)

logger = logging.getLogger(__name__)

WORKER_MAIN = Path(__file__).resolve().with_name("worker_main.py")
SHUTDOWN_GRACE_S = 5.0
TERMINATE_GRACE_S = 3.0
POLL_S = 0.1
LOG_TAIL_LINES = 12
LOG_DIR_PREFIX = "wan-distrifusion-"
"""Rank log folders are ``<temp>/wan-distrifusion-<controller pid>-<random>``; those of dead controllers are
removed by the next group's start."""


@dataclass
class _Rank:
    rank: int
    process: subprocess.Popen | None = None
    log_path: Path | None = None
    conn: Connection | None = None
    info: dict = field(default_factory=dict)
    ready: bool = False


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


class WorkerGroup:
    """Ranks ``first_rank .. first_rank + local_ranks - 1`` of a patch-parallel group, one process each.

    The group that holds rank 0 (``first_rank == 0``) hosts the rendezvous store on
    ``master_addr:master_port`` and runs jobs; a group with ``first_rank > 0`` (another host, see
    ``cli.py worker``) joins it and gets its jobs from there.
    """

    def __init__(self, spec: RuntimeSpec):
        self.spec = spec
        self.parallel = spec.parallel
        self.step_timeout_s = spec.step_timeout_s
        """The spec's step timeout, adjustable while the group runs."""

        self._run_lock = threading.Lock()
        self._state_lock = threading.RLock()
        self._ranks: dict[int, _Rank] = {}
        self._alive = False
        self._closing = False
        self._raw_store = None
        self._store = None
        self._port: int | None = None
        self._listener: Listener | None = None
        self._accepted: queue.Queue = queue.Queue()
        self._accepting = False
        self._accept_thread: threading.Thread | None = None
        self._remote_infos: dict[int, dict] = {}
        """Ready reports of ranks on other hosts, read from the store once."""
        self._heartbeats: dict[int, tuple[int, float]] = {}
        """Ranks on other hosts: (last ``alive/<rank>`` count, monotonic time it was first seen)."""
        self._last_stats: dict = {}
        self._authkey = b""
        self._log_dir: Path | None = None
        self._next_command = 1
        self._model_config: WanConfig | None = None
        self._last_error: str | None = None
        self._progress = {"step": 0, "total": 0, "seconds_per_step": None, "memory_per_rank": [], "job": None}
        self._jobs_run = 0
        self._last_plan: MemoryPlan | None = None

    # -- public --------------------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        """Whether the ranks are up; a failed or closed group is not (``run`` restarts it)."""
        if not self._alive:
            return False
        return all(r.process is None or r.process.poll() is None for r in self._ranks.values())

    @property
    def is_leader(self) -> bool:
        return self.spec.is_leader

    def start(self) -> WorkerGroup:
        """Start the local ranks and wait until every rank of the world is ready; returns self."""
        with self._state_lock:
            if self.alive:
                return self
            if self._ranks:
                self._teardown(kill=True)
            self._closing = False
            check_before_start(
                self.spec.model_path,
                self.parallel,
                device=self.spec.device,
                local_ranks=self.spec.local_ranks,
                first_rank=self.spec.first_rank,
            )
            _register_atexit(self)
            try:
                self._launch()
                self._wait_ready()
            except BaseException:
                self._teardown(kill=True)
                raise
            self._alive = True
            logger.info("worker group ready: %s", self._describe())
            return self

    def forward_session(
        self,
        job: GenerationJob,
        progress: ProgressCallback | None = None,
        cancelled: Callable[[], bool] | None = None,
        *,
        return_uncond: bool = False,
    ) -> ForwardSession:
        """A ``ForwardSession`` on every rank for ``job``'s conditioning, cfg, sync frequency and latent size
        (``job.latent``'s shape, else width/height/length); ``job.steps`` is the expected number of calls.

        ``with group.forward_session(job) as model: flow = model(x, t)``. A dead, failing or hung rank raises
        ``WorkerFailed`` from the call (the group is stopped; the next session or run restarts it).
        ``return_uncond`` also returns the negative prompt's flow (``model.last_uncond``), batching cond and
        uncond even at cfg 1, for ComfyUI's CFG++ samplers.
        """
        self._check_leader()
        return _GroupSession(self, job, progress, cancelled, return_uncond)

    def _check_leader(self) -> None:
        if not self.is_leader:
            raise WanDistriFusionError(
                f"rank: this group holds ranks {self.spec.first_rank}..{self.spec.first_rank + self.spec.local_ranks - 1}; "
                "jobs are submitted on the host that runs rank 0."
            )

    def _begin_command(self, job: GenerationJob, cancelled: Callable[[], bool] | None) -> int:
        """Start the group when needed, check ``job`` and reserve its command number (holding the run lock)."""
        job.validate()
        if not self.alive:
            self.start()
        check_job(self._model_config, self.parallel, job)
        self._check_memory(job)
        if cancelled is not None and cancelled():
            raise JobCancelled("cancelled before the first step", 0, job.steps)
        number = self._next_command
        self._next_command += 1
        self._progress = {
            "step": 0,
            "total": job.steps,
            "seconds_per_step": None,
            "memory_per_rank": [],
            "job": number,
        }
        return number

    def _post(self, number: int, payload: bytes) -> None:
        try:
            store_put(self._store, f"cmd/{number}", payload)
        except Exception as error:
            if isinstance(error, WanDistriFusionError):
                raise
            self._fail(None, f"could not post the job to the workers' store ({describe_error(error)})")

    def _end_command(self, number: int) -> None:
        self._progress["job"] = None
        if self._alive:
            try:
                store_drop(self._store, f"cmd/{number}")
            except Exception:
                logger.debug("could not drop command %d from the store", number, exc_info=True)

    def close(self) -> None:
        """Stop every local rank (asked, then terminated, then killed) and free the store; idempotent."""
        self._closing = True
        with self._state_lock:
            if not self._ranks and self._raw_store is None:
                return
            running = self._run_lock.locked()
            self._teardown(kill=running)
            _live_groups.discard(self)

    def status(self) -> dict:
        """A JSON-friendly snapshot for the Status node and the CLI."""
        ranks = []
        for rank in range(self.parallel.world_size):
            info = self._ranks[rank].info if rank in self._ranks else self._remote_infos.get(rank, {})
            ranks.append(
                {
                    "rank": rank,
                    "local": rank in self._ranks,
                    "pid": info.get("pid"),
                    "host": info.get("host"),
                    "device": info.get("device"),
                    "device_name": info.get("device_name"),
                    "memory_bytes": info.get("memory_bytes"),
                    "free_before_load": info.get("free_before_load"),
                    "total_memory": info.get("total_memory"),
                    "ready": bool(info),
                }
            )
        memory = list(self._progress["memory_per_rank"]) or [r["memory_bytes"] for r in ranks]
        infos = [r.info for r in self._ranks.values()] + list(self._remote_infos.values())
        backends = {info.get("comm_backend") for info in infos if info.get("comm_backend")}
        return {
            "runtime": "workers",
            "alive": self.alive,
            "world_size": self.parallel.world_size,
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
            "last_error": self._last_error,
            "comm_backend": backends.pop()
            if len(backends) == 1
            else ("none" if not backends else "/".join(sorted(backends))),
            "comm_manager": self._last_stats.get("comm_backend", self.parallel.comm_backend),
            "last_job_stats": self._last_stats,
            "parallel": self.parallel.to_dict(),
            "precision": self.spec.precision,
            "quantization": self.spec.quantization,
            "device": self.spec.device,
            "master_addr": self.spec.master_addr,
            "master_port": self._port or self.spec.master_port,
            "log_dir": str(self._log_dir) if self._log_dir else None,
            "memory_plan": self._last_plan.summary() if self._last_plan else None,
        }

    def __enter__(self) -> WorkerGroup:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- starting ------------------------------------------------------------------------------

    def _launch(self) -> None:
        remove_orphaned_log_dirs()
        self._log_dir = Path(tempfile.mkdtemp(prefix=f"{LOG_DIR_PREFIX}{os.getpid()}-"))
        self._authkey = secrets.token_bytes(32)
        self._next_command = 1
        self._model_config = None
        world = self.parallel.world_size
        if self.spec.device == "cuda":
            count = torch.cuda.device_count() if torch.cuda.is_available() else 0
            if count < self.spec.local_ranks:
                raise WanDistriFusionError(
                    f"GPUs: {self.spec.local_ranks} local ranks need {self.spec.local_ranks} GPUs but {count} are visible; "
                    "lower GPUs/world size, or start the other ranks on more hosts with `cli.py worker`."
                )
        if self.is_leader:
            port = self.spec.master_port or 0
            try:
                self._raw_store, self._store = connect_store(
                    self.spec.master_addr, port, is_master=True, timeout_s=self.spec.start_timeout_s
                )
            except Exception as error:
                raise WanDistriFusionError(
                    f"master port: cannot host the rendezvous on {self.spec.master_addr}:{port} ({describe_error(error).splitlines()[0]}); "
                    "choose a free port or leave it empty for a random one."
                ) from error
            self._port = self._raw_store.port
            self._store.set("group", self.spec.to_json())
            self._store.set("collective_timeout_s", str(max(self.step_timeout_s, self.spec.start_timeout_s) + 60.0))
        else:
            self._port = self.spec.master_port
        self._listener = Listener(("127.0.0.1", 0), authkey=self._authkey)
        self._accepted = queue.Queue()
        self._accepting = True
        self._accept_thread = threading.Thread(
            target=self._accept_loop, args=(self._listener, self._accepted), name="wan-workers-accept", daemon=True
        )
        self._accept_thread.start()
        host, control_port = self._listener.address
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env[AUTHKEY_ENV] = self._authkey.hex()
        threads = self.spec.threads_per_rank
        if threads is None and self.spec.device == "cpu":
            threads = max(1, (os.cpu_count() or 1) // self.spec.local_ranks)
        pdeathsig = threading.current_thread() is threading.main_thread()
        self._ranks = {}
        for local_index in range(self.spec.local_ranks):
            rank = self.spec.first_rank + local_index
            log_path = self._log_dir / f"rank{rank}.log"
            command = [
                sys.executable,
                str(WORKER_MAIN),
                "--rank",
                str(rank),
                "--world-size",
                str(world),
                "--local-index",
                str(local_index),
                "--device",
                self.spec.device,
                "--master-addr",
                self.spec.master_addr,
                "--master-port",
                str(self._port),
                "--model",
                str(self.spec.model_path),
                "--control",
                f"{host}:{control_port}",
                "--parent-pid",
                str(os.getpid()),
                "--start-timeout",
                str(self.spec.start_timeout_s),
                "--threads",
                str(threads or 0),
            ]
            if pdeathsig:
                command.append("--pdeathsig")  # Linux ties it to the spawning thread: only safe from the main thread
            with open(log_path, "wb") as log:
                process = subprocess.Popen(
                    command,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    start_new_session=os.name == "posix",
                    close_fds=True,
                )
            self._ranks[rank] = _Rank(rank, process, log_path)
        logger.info("started ranks %s (logs in %s)", list(self._ranks), self._log_dir)

    def _accept_loop(self, listener: Listener, accepted: queue.Queue) -> None:
        while True:
            try:
                conn = listener.accept()
            except OSError:
                return
            except Exception:  # a stranger failed the authkey challenge
                logger.warning("rejected a connection to the worker control port", exc_info=True)
                continue
            if not self._accepting:
                conn.close()
                return
            accepted.put(conn)

    def _stop_accepting(self) -> None:
        """Close the control port; the accept thread is woken by one last connection of our own."""
        listener, thread = self._listener, self._accept_thread
        self._listener = self._accept_thread = None
        self._accepting = False
        if listener is None:
            return
        if thread is not None and thread.is_alive():
            address, authkey = listener.address, self._authkey

            def wake() -> None:
                try:
                    Client(address, authkey=authkey).close()
                except Exception:
                    pass

            threading.Thread(target=wake, name="wan-workers-wake", daemon=True).start()
            thread.join(timeout=2.0)
        listener.close()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.spec.start_timeout_s
        pending: list[Connection] = []
        last_remote_check = 0.0
        remote = self._remote_ranks() if self.is_leader else []
        while True:
            self._take_new_connections(pending)
            for rank, message in self._receive(POLL_S):
                self._handle_start_message(rank, message)
            self._check_processes("while starting (joining the group and loading the model)")
            now = time.monotonic()
            if remote and now - last_remote_check > 0.5:
                last_remote_check = now
                self._check_remote_ranks(starting=True)
                self._update_remote_ready()
            missing = [r.rank for r in self._ranks.values() if not r.ready]
            missing += [r for r in remote if r not in self._remote_infos]
            if not missing:
                break
            if self._closing:
                self._fail(None, "the worker group was closed while starting")
            if now > deadline:
                local_missing = [r for r in missing if r in self._ranks]
                remote_missing = [r for r in missing if r not in self._ranks]
                hint = ""
                if remote_missing:
                    hint = (
                        f" Ranks {_ranges(remote_missing)} run on other hosts: start them there with `python cli.py worker "
                        f"--rank R --world-size {self.parallel.world_size} --master-addr {self.spec.master_addr} "
                        f"--master-port {self._port} --model PATH`."
                    )
                self._fail(
                    local_missing[0] if local_missing else None,
                    f"the workers were not ready within start_timeout_s = {self.spec.start_timeout_s:.0f} s "
                    f"(waiting for ranks {_ranges(missing)}).{hint}",
                    all_logs=True,
                )
        self._stop_accepting()
        if self._model_config is None:
            config = next((r.info["model_config"] for r in self._ranks.values() if r.info.get("model_config")), None)
            if config:
                self._model_config = WanConfig(**{**config, "patch_size": tuple(config["patch_size"])})

    def _take_new_connections(self, pending: list[Connection]) -> None:
        while True:
            try:
                pending.append(self._accepted.get_nowait())
            except queue.Empty:
                break
        pids = {r.process.pid: r for r in self._ranks.values()}
        for conn in list(pending):
            if not conn.poll(0):
                continue
            pending.remove(conn)
            try:
                hello = pickle.loads(conn.recv_bytes())
            except Exception:
                conn.close()
                continue
            entry = pids.get(hello.get("pid"))
            if hello.get("type") != "hello" or entry is None or entry.rank != hello.get("rank"):
                logger.warning("unexpected hello on the worker control port: %r", hello)
                conn.close()
                continue
            entry.conn = conn

    def _handle_start_message(self, rank: int, message: dict) -> None:
        kind = message.get("type")
        if kind == "ready":
            entry = self._ranks[rank]
            entry.info, entry.ready = message, True
            config = message.get("model_config")
            if config and self._model_config is None:
                self._model_config = WanConfig(**{**config, "patch_size": tuple(config["patch_size"])})
        elif kind == "error":
            self._fail_from_report(message, "while starting")

    def _remote_ranks(self) -> list[int]:
        local = set(self._ranks)
        return [r for r in range(self.parallel.world_size) if r not in local]

    def _update_remote_ready(self) -> None:
        for rank in self._remote_ranks():
            if rank not in self._remote_infos and self._store.check([f"ready/{rank}"]):
                self._remote_infos[rank] = json.loads(self._store.get(f"ready/{rank}"))
                self._heartbeats[rank] = (self._store.add(f"alive/{rank}", 0), time.monotonic())
                logger.info("remote rank %d ready on %s", rank, self._remote_infos[rank].get("host"))

    def _check_remote_ranks(self, starting: bool = False) -> None:
        if not self.is_leader or self._store is None:
            return
        for rank in self._remote_ranks():
            try:
                if self._store.check([f"error/{rank}"]):
                    report = json.loads(self._store.get(f"error/{rank}"))
                    self._fail_from_report(report, "while starting" if starting else None)
            except WanDistriFusionError:
                raise
            except Exception:
                logger.debug("could not read rank %d's error report", rank, exc_info=True)
        if not starting:  # while starting, a rank that has not joined yet is the start timeout's business
            self._check_heartbeats()

    def _check_heartbeats(self) -> None:
        """Fail when a ready rank on another host stopped counting its heartbeat for ``remote_timeout_s``."""
        now = time.monotonic()
        for rank, (count, since) in list(self._heartbeats.items()):
            try:
                current = self._store.add(f"alive/{rank}", 0)
            except Exception:
                logger.debug("could not read rank %d's heartbeat", rank, exc_info=True)
                continue
            if current != count:
                self._heartbeats[rank] = (current, now)
            elif now - since > self.spec.remote_timeout_s:
                host = self._remote_infos.get(rank, {}).get("host") or "?"
                self._fail(
                    rank,
                    f"rank {rank} on host {host} stopped answering for {now - since:.0f} s {self._phase()} "
                    f"(link cut or host down; remote_timeout_s = {self.spec.remote_timeout_s:.0f} s)",
                )

    # -- running -------------------------------------------------------------------------------

    def _check_memory(self, job: GenerationJob) -> None:
        if self._model_config is None:
            return
        free = None
        if self.spec.device == "cuda":
            infos = [r.info for r in self._ranks.values()] + list(self._remote_infos.values())
            frees = [info["free_before_load"] for info in infos if info.get("free_before_load")]
            free = min(frees) if frees else None
        guidance = 2 if job.negative is not None and job.cfg != 1.0 else 1
        self._last_plan = plan_memory(
            self._model_config,
            self.parallel,
            job.latent_shape(self._model_config.out_dim),
            self.spec.precision,
            self.spec.quantization,
            free,
            guidance_batch=guidance,
        )
        logger.info("memory plan: %s", self._last_plan.summary())

    def _rank_states(self) -> str:
        """Each local rank's process state, so a stopped or zombie rank is named in a hang message."""
        states = []
        for rank, entry in sorted(self._ranks.items()):
            try:
                state = psutil.Process(entry.process.pid).status() if entry.process else "not started"
            except psutil.Error:
                state = "gone"
            states.append(f"rank {rank} {state}")
        return "local ranks: " + ", ".join(states) if states else "no local ranks"

    # -- channels ------------------------------------------------------------------------------

    def _send(self, rank: int, message: dict) -> None:
        entry = self._ranks.get(rank)
        if entry is None or entry.conn is None:
            return
        try:
            entry.conn.send_bytes(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))
        except OSError:
            logger.debug("rank %d's connection is closed", rank)

    def _receive(self, timeout: float) -> list[tuple[int, dict]]:
        """Messages from the local ranks (waits up to ``timeout`` for the first); EOF closes the connection."""
        conns = {r.conn: r.rank for r in self._ranks.values() if r.conn is not None}
        if not conns:
            time.sleep(timeout)
            return []
        messages = []
        try:
            ready = wait(list(conns), timeout)
        except (OSError, ValueError):  # closed by close() from another thread
            return []
        for conn in ready:
            rank = conns[conn]
            while True:
                try:
                    messages.append((rank, pickle.loads(conn.recv_bytes())))
                except (EOFError, OSError):
                    self._ranks[rank].conn = None
                    conn.close()
                    break
                if not conn.poll(0):
                    break
        return messages

    # -- failures ------------------------------------------------------------------------------

    def _phase(self) -> str:
        if not self._alive:
            return "while starting (joining the group and loading the model)"
        step, total = self._progress["step"], self._progress["total"]
        if self._progress["job"] is None:
            return "while idle"
        return f"during step {min(step + 1, total) if total else step + 1} of {total}"

    def _check_processes(self, phase: str | None) -> None:
        for entry in self._ranks.values():
            code = entry.process.poll() if entry.process is not None else None
            if code is None:
                continue
            # The rank may have reported why before exiting: that report is the better message.
            if entry.conn is not None:
                for _rank, message in self._receive(0.2):
                    if message.get("type") == "error":
                        self._fail_from_report(message, phase)
            self._fail(entry.rank, f"rank {entry.rank} {_describe_exit(code)} {phase or self._phase()}")

    def _fail_from_report(self, report: dict, phase: str | None) -> None:
        rank = report.get("rank")
        # A rank whose peer was killed fails in its next collective: the dead peer is the real cause.
        deadline = time.monotonic() + 0.3
        while True:
            dead = [e for e in self._ranks.values() if e.rank != rank and _died(e.process)]
            if dead or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        if dead:
            entry = dead[0]
            self._fail(
                entry.rank,
                f"rank {entry.rank} {_describe_exit(entry.process.returncode)} {phase or self._phase()} "
                f"(rank {rank} then failed: {report.get('error')})",
            )
        if report.get("phase") == "start":
            where = "while starting (joining the group and loading the model)"
        elif report.get("step"):
            where = f"during step {report['step']} of {report.get('total') or '?'}"
        else:
            where = phase or self._phase()
        message = f"rank {rank} failed {where}: {report.get('error')}"
        if report.get("out_of_memory"):
            message += " (out of memory: lower the resolution or length, or use fp8 K/V buffers, CFG parallel, the sync/ulysses mode or more GPUs)"
        lines = [line for line in (report.get("traceback") or "").strip().splitlines() if line.strip()]
        self._fail(rank, message, traceback_tail=lines[-LOG_TAIL_LINES:] if lines else None)

    def _fail(self, rank: int | None, reason: str, *, all_logs: bool = False, traceback_tail=None) -> None:
        details = []
        if traceback_tail:
            details.append(
                f"rank {rank}'s traceback (last lines):\n" + "\n".join(f"    {line}" for line in traceback_tail)
            )
        else:
            ranks = list(self._ranks) if all_logs or rank is None else [rank]
            for r in ranks:
                tail = self._log_tail(r)
                if tail:
                    details.append(f"last lines of rank {r}'s log:\n" + "\n".join(f"    {line}" for line in tail))
        self._teardown(kill=True)
        message = f"{reason}; the group was stopped; run again to restart it."
        if details:
            message += "\n" + "\n".join(details)
        self._last_error = message
        raise WorkerFailed(message, rank)

    def _log_tail(self, rank: int) -> list[str]:
        entry = self._ranks.get(rank)
        if entry is None or entry.log_path is None or not entry.log_path.exists():
            return []
        try:
            with open(entry.log_path, "rb") as log:
                log.seek(0, os.SEEK_END)
                log.seek(max(0, log.tell() - 16384))
                text = log.read().decode(errors="replace")
        except OSError:
            return []
        lines = [line for line in text.splitlines() if line.strip() and not line.startswith("frame #")]
        return lines[-LOG_TAIL_LINES:]

    # -- stopping ------------------------------------------------------------------------------

    def _teardown(self, kill: bool) -> None:
        """Stop every local rank (politely unless ``kill``), close channels, drop the store and logs."""
        with self._state_lock:
            self._alive = False
            entries = list(self._ranks.values())
            if not kill:
                if self._store is not None:
                    try:
                        store_put(self._store, f"cmd/{self._next_command}", encode_payload({"type": "shutdown"}))
                    except Exception:
                        logger.debug("could not post shutdown", exc_info=True)
                for entry in entries:
                    self._send(entry.rank, {"type": "shutdown"})
                _wait_all(entries, SHUTDOWN_GRACE_S)
                _signal_all(entries, signal.SIGTERM)
                _wait_all(entries, TERMINATE_GRACE_S)
            _signal_all(entries, signal.SIGKILL if hasattr(signal, "SIGKILL") else signal.SIGTERM)
            _wait_all(entries, TERMINATE_GRACE_S)
            for entry in entries:
                if entry.conn is not None:
                    entry.conn.close()
                    entry.conn = None
            self._stop_accepting()
            self._store = None
            self._raw_store = None  # the last reference: the store server stops, remote ranks exit
            self._remote_infos = {}
            self._heartbeats = {}
            self._ranks = {}
            if self._log_dir is not None:
                shutil.rmtree(self._log_dir, ignore_errors=True)
                self._log_dir = None

    def _describe(self) -> str:
        ranks = ", ".join(
            f"{r.rank}: pid {r.info.get('pid')} {r.info.get('device')} ({r.info.get('device_name')})"
            for r in self._ranks.values()
        )
        return f"world {self.parallel.world_size}, {self.parallel.mode}, local ranks {ranks}"


class _GroupSession(ForwardSession):
    """A forward session on a ``WorkerGroup``: holds its run lock from ``__enter__`` to ``__exit__``."""

    def __init__(self, group: WorkerGroup, job, progress, cancelled, return_uncond):
        out_dim = group._model_config.out_dim if group._model_config else 16
        super().__init__(job, job.latent_shape(out_dim), progress, cancelled, return_uncond)
        self.group = group
        self.number: int | None = None
        self.latents: SharedLatents | None = None
        self._backlog: deque[tuple[int, dict]] = deque()
        """Messages received but not yet looked at (two ranks' replies may come in one read)."""

    def __enter__(self) -> _GroupSession:
        group = self.group
        group._run_lock.acquire()
        try:
            self.number = group._begin_command(self.job, self._cancelled)
            if group._model_config is not None:
                self.shape = tuple(self.job.latent_shape(group._model_config.out_dim))
            # The ranks get the latent size, never the latent itself: the controller holds x, and each call
            # passes it to rank 0 (and the flow back) through shared memory.
            self.latents = SharedLatents.create(self.shape)
            options = {
                **session_options(self.shape, self.return_uncond),
                "latents": str(self.latents.path),
                "latents_ranks": list(group._ranks),  # these map the file; others get x broadcast from rank 0
            }
            payload = encode_job(self.number, replace(self.job, latent=None), kind="session", options=options)
            group._post(self.number, payload)
        except BaseException:
            self._drop_latents()
            if self.number is not None:
                group._end_command(self.number)
            group._run_lock.release()
            raise
        self._open = True
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        group = self.group
        self._open = False
        try:
            if group._alive:
                try:
                    stopped = self._end()
                except WorkerFailed:  # the group was stopped; the next session or run restarts it
                    if exc is None:
                        raise
                    logger.warning("ending the forward session failed after %r", exc, exc_info=True)
                except BaseException:  # e.g. Ctrl-C while ending: the ranks' state is unknown, stop them
                    group._teardown(kill=True)
                    raise
                else:
                    if isinstance(exc, JobCancelled):
                        exc.stopped_steps = stopped
            if exc is None:
                group._jobs_run += 1
        finally:
            self._drop_latents()
            group._end_command(self.number)
            group._run_lock.release()

    def _drop_latents(self) -> None:
        if self.latents is not None:
            self.latents.unlink()
            self.latents = None

    def _evaluate(self, x, t):
        group, number, call, latents = self.group, self.number, self.calls + 1, self.latents
        latents.x.copy_(x)
        group._send(0, {"type": "forward", "session": number, "call": call, "t": t})
        message = self._wait(
            lambda m: m.get("type") == "prediction" and m.get("session") == number and m.get("call") == call,
            f"during step {call} of {max(self.total, call)}",
        )[1]
        latents.unlink()  # rank 0 has mapped it: nothing is left in the shared-memory folder
        uncond = latents.uncond.clone() if self.return_uncond else None
        return latents.flow.clone(), uncond, message["seconds_per_step"], message["memory_per_rank"]

    def _record(self, event: ProgressEvent) -> None:
        self.group._progress.update(
            step=event.step,
            total=event.total,
            seconds_per_step=event.seconds_per_step,
            memory_per_rank=list(event.memory_per_rank),
        )

    def _end(self) -> dict[int, int]:
        """End the session on every rank; the number of calls each local rank served (all equal)."""
        group, number = self.group, self.number
        group._send(0, {"type": "end", "session": number})
        stopped: dict[int, int] = {}
        while len(stopped) < len(group._ranks):
            rank, message = self._wait(
                lambda m: m.get("type") == "session_end" and m.get("session") == number,
                f"while ending the session after step {self.calls}",
            )
            stopped[rank] = message["calls"]
            if rank == 0:
                group._last_stats = message.get("stats") or {}
        if len(set(stopped.values())) > 1:
            group._fail(None, f"the ranks left the session after different steps {stopped}")
        return stopped

    def _wait(self, wanted: Callable[[dict], bool], phase: str) -> tuple[int, dict]:
        """The first ``(rank, message)`` that is ``wanted``; ``WorkerFailed`` when a rank dies, fails or hangs."""
        group = self.group
        deadline = time.monotonic() + group.step_timeout_s
        last_remote_check = time.monotonic()
        while True:
            if group._closing:
                group._fail(None, "the worker group was closed while a forward session was running")
            if not self._backlog:
                self._backlog.extend(group._receive(POLL_S))
            while self._backlog:
                rank, message = self._backlog.popleft()
                if message.get("type") == "error":
                    group._fail_from_report(message, phase)
                if wanted(message):
                    return rank, message
            group._check_processes(phase)
            now = time.monotonic()
            if now - last_remote_check > 0.5:
                last_remote_check = now
                group._check_remote_ranks()
            if now > deadline:
                group._fail(
                    None,
                    f"no progress from the workers for step_timeout_s = {group.step_timeout_s:.0f} s {phase} "
                    f"(a rank is hung, or a step takes longer than step_timeout_s allows; {group._rank_states()})",
                    all_logs=True,
                )


def _wait_all(entries: list[_Rank], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for entry in entries:
        if entry.process is None:
            continue
        try:
            entry.process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass


def _signal_all(entries: list[_Rank], sig: int) -> None:
    for entry in entries:
        process = entry.process
        if process is None:
            continue
        try:
            if os.name == "posix":
                os.killpg(process.pid, sig)  # the rank's own session: also its helper processes
            elif process.poll() is None:
                process.kill()
        except (ProcessLookupError, PermissionError):
            pass


def _died(process: subprocess.Popen | None) -> bool:
    """Whether a rank ended without reporting why (killed, crashed), as opposed to exiting after its report."""
    code = None if process is None else process.poll()
    return code is not None and code not in (0, EXIT_FAILED, EXIT_CONTROLLER_GONE)


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = "unknown"
        return f"exited with signal {-code} ({name})"
    if code == EXIT_CONTROLLER_GONE:
        return "exited because it lost the controller's rendezvous store"
    return f"exited with code {code}"


def remove_orphaned_log_dirs(folder: str | os.PathLike | None = None) -> list[Path]:
    """Remove the rank log folders (``wan-distrifusion-<pid>-*`` in ``folder``, default the temp dir) and
    ``cli.py``'s scratch folders (``wan-distrifusion-cli-<pid>-*``) of controllers that are no longer running
    (e.g. SIGKILLed); returns the folders removed."""
    removed = []
    try:
        candidates = list(Path(folder or tempfile.gettempdir()).glob(f"{LOG_DIR_PREFIX}*-*"))
        if folder is None:  # and the shared latents of forward sessions those controllers left
            candidates += [p for p in shared_folder().glob(f"{SHARED_FILE_PREFIX}*-*.latents") if p.is_file()]
    except OSError:
        return removed
    for path in candidates:
        owner = path.name[len(LOG_DIR_PREFIX) :].removeprefix("cli-")  # cli.py's scratch: wan-distrifusion-cli-<pid>-*
        pid = owner.split("-", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid() or psutil.pid_exists(int(pid)):
            continue
        if path.is_file():
            path.unlink(missing_ok=True)
        elif path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        if not path.exists():
            logger.info("removed the log folder %s of a controller that is gone (pid %s)", path, pid)
            removed.append(path)
    return removed


def _ranges(ranks: list) -> str:
    return ", ".join(str(r) for r in ranks if r is not None) or "none"


def start_runtime(spec: RuntimeSpec) -> WorkerGroup | InProcessRunner:
    """A started runtime for ``spec``: ``InProcessRunner`` for world size 1, else a ``WorkerGroup``."""
    runtime = InProcessRunner(spec) if spec.world_size == 1 else WorkerGroup(spec)
    return runtime.start()


def serve_remote_ranks(
    model_path: str | os.PathLike,
    *,
    first_rank: int,
    world_size: int,
    master_addr: str,
    master_port: int,
    local_ranks: int = 1,
    device: str = "cuda",
    start_timeout_s: float = 600.0,
    once: bool = False,
    on_event: Callable[[str], None] | None = None,
) -> int:
    """Host ranks ``first_rank..`` of a group whose rank 0 runs elsewhere (``cli.py worker``).

    The ranks get the group's settings and jobs from the controller's rendezvous store; when that
    group ends they are started again to join the next one (unless ``once``). Returns an exit code: with
    ``once``, 1 when the ranks could not join.
    """
    say = on_event or logger.info
    spec = RuntimeSpec(  # the group's own settings come from the controller's store
        str(model_path),
        ParallelConfig(world_size=world_size),
        device=device,
        local_ranks=local_ranks,
        first_rank=first_rank,
        master_addr=master_addr,
        master_port=master_port,
        start_timeout_s=start_timeout_s,
    )
    joined = False
    while True:
        group = WorkerGroup(spec)
        try:
            say(
                f"waiting for the controller at {master_addr}:{master_port} (ranks {first_rank}..{first_rank + local_ranks - 1})"
            )
            group.start()
            joined = True
            say("joined the group; serving jobs")
            while group.alive:
                for rank, message in group._receive(0.5):
                    if message.get("type") == "error":
                        say(f"rank {rank} failed: {message.get('error')}")
            codes = {r.rank: r.process.poll() for r in group._ranks.values()}
            say(f"the group ended ({', '.join(f'rank {r} {_describe_exit(c)}' for r, c in codes.items())})")
        except WorkerFailed as error:
            say(f"could not join: {str(error).splitlines()[0]}")
        finally:
            group.close()
        if once:
            return 0 if joined else 1
        time.sleep(2.0)
