"""Watching a group's ranks while the controller waits for them, and saying what went wrong.

``Supervisor.wait`` is the one loop every wait goes through (the start, each session call, the session's end):
it hands each message to the caller until the caller has what it expects, and meanwhile fails the group
(``WorkerFailed``, the group stopped) when a rank reports a failure, a local rank's process ends, a rank on
another host reports a failure or stops beating its heartbeat, or nothing came within the timeout.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import NoReturn

from . import wire
from .processes import LOG_TAIL_LINES, RankProcesses, describe_exit
from .session import WorkerFailed
from .settings import RuntimeSpec

logger = logging.getLogger(__name__)

POLL_S = 0.1
REMOTE_CHECK_S = 0.5
STARTING = "while starting (joining the group and loading the model)"
OUT_OF_MEMORY_HINT = (
    " (out of memory: lower the resolution or length, or use fp8 K/V buffers, CFG parallel, the sync/ulysses mode or "
    "more GPUs)"
)


class RemoteRanks:
    """The ranks of the group on other hosts, seen through the rendezvous store: ready reports, failure reports and
    heartbeats (``alive/<rank>``, which each rank counts up every second)."""

    def __init__(self, spec: RuntimeSpec, store):
        self.spec = spec
        self.store = store
        local = set(spec.local_rank_ids)
        self.ranks = [r for r in range(spec.world_size) if r not in local] if spec.is_leader else []
        self.ready: dict[int, wire.Ready] = {}
        self._heartbeats: dict[int, tuple[int, float]] = {}
        """(last ``alive/<rank>`` count, monotonic time it was first seen)."""

    def missing(self) -> list[int]:
        return [rank for rank in self.ranks if rank not in self.ready]

    def update_ready(self) -> None:
        for rank in self.missing():
            if self.store.check([f"ready/{rank}"]):
                self.ready[rank] = wire.decode(self.store.get(f"ready/{rank}"))
                self._heartbeats[rank] = (self.store.add(f"alive/{rank}", 0), time.monotonic())
                logger.info("remote rank %d ready on %s", rank, self.ready[rank].host)

    def failure(self) -> wire.Failure | None:
        """The first failure a rank on another host reported in the store."""
        for rank in self.ranks:
            try:
                if self.store.check([f"error/{rank}"]):
                    return wire.decode(self.store.get(f"error/{rank}"))
            except Exception:
                logger.debug("could not read rank %d's error report", rank, exc_info=True)
        return None

    def silent(self) -> tuple[int, float] | None:
        """``(rank, seconds)`` of a ready rank whose heartbeat stood still longer than ``remote_timeout_s``."""
        now = time.monotonic()
        for rank, (count, since) in list(self._heartbeats.items()):
            try:
                current = self.store.add(f"alive/{rank}", 0)
            except Exception:
                logger.debug("could not read rank %d's heartbeat", rank, exc_info=True)
                continue
            if current != count:
                self._heartbeats[rank] = (current, now)
            elif now - since > self.spec.remote_timeout_s:
                return rank, now - since
        return None


class Supervisor:
    """Fails the group with a message naming the rank, the step and what happened; ``stop`` kills it first."""

    def __init__(
        self, processes: RankProcesses, remote: RemoteRanks | None, stop: Callable[[], None], phase: Callable[[], str]
    ):
        self.processes = processes
        self.remote = remote
        self._stop = stop
        self._phase = phase
        """Where the group is now (``during step 3 of 20``), for messages that name no phase."""
        self.closing = False
        self.last_error: str | None = None

    def wait(
        self,
        take: Callable[[int, wire.Message], None],
        done: Callable[[], bool],
        *,
        doing: str,
        phase: str,
        timeout_s: float,
        on_timeout: Callable[[], tuple[int | None, str]],
        starting: bool = False,
        tick: Callable[[], None] | None = None,
    ) -> None:
        """Hand every message to ``take(rank, message)`` until ``done()``; fail the group on the way when anything
        goes wrong. ``doing`` names the wait for a close; ``phase`` the step for failure messages; ``on_timeout()``
        gives the rank and reason when the wait was not done within ``timeout_s``; ``tick`` runs every poll (the
        start takes new connections there)."""
        deadline = time.monotonic() + timeout_s
        last_remote_check = 0.0 if starting else time.monotonic()
        while True:
            if self.closing:
                self.fail(None, f"the worker group was closed while {doing}")
            if tick is not None:
                tick()
            for rank, message in self.processes.receive(POLL_S):
                if isinstance(message, wire.Failure):
                    self.fail_from_report(message, phase)
                take(rank, message)
            if done():
                return
            self.check_exits(phase)
            now = time.monotonic()
            if now - last_remote_check > REMOTE_CHECK_S:
                last_remote_check = now
                self.check_remote(starting)
                if done():
                    return
            if now > deadline:
                rank, reason = on_timeout()
                self.fail(rank, reason, all_logs=True)

    def check_exits(self, phase: str | None) -> None:
        """Fail when a local rank's process ended (with its report when it sent one before exiting)."""
        for rank, code in self.processes.exits():
            if self.processes.connected(rank):
                for _rank, message in self.processes.receive(0.2):
                    if isinstance(message, wire.Failure):
                        self.fail_from_report(message, phase)
            self.fail(rank, f"rank {rank} {describe_exit(code)} {phase or self._phase()}")

    def check_remote(self, starting: bool = False) -> None:
        """Fail when a rank on another host reported a failure or (once ready) stopped beating."""
        if self.remote is None or not self.remote.ranks:
            return
        if starting:
            self.remote.update_ready()
        failure = self.remote.failure()
        if failure is not None:
            self.fail_from_report(failure, STARTING if starting else None)
        silent = None if starting else self.remote.silent()  # starting: the start timeout's business
        if silent is not None:
            rank, seconds = silent
            host = self.remote.ready[rank].host if rank in self.remote.ready else "?"
            self.fail(
                rank,
                f"rank {rank} on host {host} stopped answering for {seconds:.0f} s {self._phase()} "
                f"(link cut or host down; remote_timeout_s = {self.remote.spec.remote_timeout_s:.0f} s)",
            )

    def fail_from_report(self, report: wire.Failure, phase: str | None) -> NoReturn:
        rank = report.rank
        # A rank whose peer was killed fails in its next collective: the dead peer is the real cause.
        deadline = time.monotonic() + 0.3
        while not (dead := self.processes.died_unreported(except_rank=rank)) and time.monotonic() < deadline:
            time.sleep(0.02)
        if dead:
            dead_rank, code = dead[0]
            self.fail(
                dead_rank,
                f"rank {dead_rank} {describe_exit(code)} {phase or self._phase()} "
                f"(rank {rank} then failed: {report.error})",
            )
        if report.phase == "start":
            where = STARTING
        elif report.step:
            where = f"during step {report.step} of {report.total or '?'}"
        else:
            where = phase or self._phase()
        message = f"rank {rank} failed {where}: {report.error}" + (OUT_OF_MEMORY_HINT if report.out_of_memory else "")
        lines = [line for line in report.traceback.strip().splitlines() if line.strip()]
        self.fail(rank, message, traceback_tail=lines[-LOG_TAIL_LINES:] if lines else None)

    def fail(
        self, rank: int | None, reason: str, *, all_logs: bool = False, traceback_tail: list[str] | None = None
    ) -> NoReturn:
        """Stop the group and raise ``WorkerFailed`` with ``reason`` and the evidence (traceback or log tails)."""
        details = []
        if traceback_tail:
            details.append(
                f"rank {rank}'s traceback (last lines):\n" + "\n".join(f"    {line}" for line in traceback_tail)
            )
        else:
            ranks = list(self.processes.ranks) if all_logs or rank is None else [rank]
            for r in ranks:
                tail = self.processes.log_tail(r)
                if tail:
                    details.append(f"last lines of rank {r}'s log:\n" + "\n".join(f"    {line}" for line in tail))
        self._stop()
        message = f"{reason}; the group was stopped; run again to restart it."
        if details:
            message += "\n" + "\n".join(details)
        self.last_error = message
        raise WorkerFailed(message, rank)
