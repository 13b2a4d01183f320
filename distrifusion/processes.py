"""The local ranks as processes: launch (``python <repo>/distrifusion/worker_main.py``, a fresh interpreter
that imports the pack under a fixed alias), the authenticated control port and its handshake, messages to and
from each rank (``wire.py``), exits and signals, log tails, teardown, and the log folders of dead controllers."""

from __future__ import annotations

import logging
import os
import queue
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Client, Connection, Listener, wait
from pathlib import Path

import psutil

from . import wire
from .settings import RuntimeSpec
from .shared_latents import FILE_PREFIX as SHARED_FILE_PREFIX
from .shared_latents import shared_folder
from .wire import AUTHKEY_ENV, EXIT_CONTROLLER_GONE, EXIT_FAILED

logger = logging.getLogger(__name__)

WORKER_MAIN = Path(__file__).resolve().with_name("worker_main.py")
TERMINATE_GRACE_S = 3.0
SHUTDOWN_GRACE_S = 5.0
LOG_TAIL_LINES = 12
LOG_DIR_PREFIX = "wan-distrifusion-"
"""Rank log folders are ``<temp>/wan-distrifusion-<controller pid>-<random>``; those of dead controllers are
removed by the next group's start."""


@dataclass
class LocalRank:
    """One local rank's process, log, control connection and ready report."""

    rank: int
    process: subprocess.Popen
    log_path: Path
    conn: Connection | None = None
    ready: wire.Ready | None = None


class RankProcesses:
    """This host's ranks of one group: ``spec.local_rank_ids``, one process each."""

    def __init__(self, spec: RuntimeSpec):
        self.spec = spec
        self.ranks: dict[int, LocalRank] = {}
        self.log_dir: Path | None = None
        self._authkey = b""
        self._listener: Listener | None = None
        self._accept_thread: threading.Thread | None = None
        self._accepted: queue.Queue = queue.Queue()
        self._pending: list[Connection] = []
        self._accepting = False

    # -- launch --------------------------------------------------------------------------------

    def launch(self, store_port: int) -> None:
        """Open the control port and start every local rank (they join the store at ``store_port``)."""
        remove_orphaned_log_dirs()
        self.log_dir = Path(tempfile.mkdtemp(prefix=f"{LOG_DIR_PREFIX}{os.getpid()}-"))
        self._authkey = secrets.token_bytes(32)
        self._listener = Listener(("127.0.0.1", 0), authkey=self._authkey)
        self._accepted, self._pending, self._accepting = queue.Queue(), [], True
        self._accept_thread = threading.Thread(
            target=self._accept_loop, args=(self._listener, self._accepted), name="wan-workers-accept", daemon=True
        )
        self._accept_thread.start()
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env[AUTHKEY_ENV] = self._authkey.hex()
        self.ranks = {}
        for local_index, rank in enumerate(self.spec.local_rank_ids):
            log_path = self.log_dir / f"rank{rank}.log"
            with open(log_path, "wb") as log:
                process = subprocess.Popen(
                    self._command(rank, local_index, store_port),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    start_new_session=os.name == "posix",
                    close_fds=True,
                )
            self.ranks[rank] = LocalRank(rank, process, log_path)
        logger.info("started ranks %s (logs in %s)", list(self.ranks), self.log_dir)

    def _command(self, rank: int, local_index: int, store_port: int) -> list[str]:
        spec = self.spec
        host, control_port = self._listener.address
        threads = spec.threads_per_rank
        if threads is None and spec.device == "cpu":
            threads = max(1, (os.cpu_count() or 1) // spec.local_ranks)
        command = [sys.executable, str(WORKER_MAIN), "--rank", str(rank), "--world-size", str(spec.world_size)]
        command += ["--local-index", str(local_index), "--device", spec.device, "--master-addr", spec.master_addr]
        command += ["--master-port", str(store_port), "--model", spec.model_path, "--control", f"{host}:{control_port}"]
        if spec.second_model_path is not None:
            command += ["--second-model", spec.second_model_path]
        command += ["--parent-pid", str(os.getpid()), "--start-timeout", str(spec.start_timeout_s)]
        command += ["--threads", str(threads or 0)]
        if threading.current_thread() is threading.main_thread():
            command.append("--pdeathsig")  # Linux ties it to the spawning thread: only safe from the main thread
        return command

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

    def take_new_connections(self) -> None:
        """Match new control connections to our processes by their ``Hello`` (rank and pid)."""
        while True:
            try:
                self._pending.append(self._accepted.get_nowait())
            except queue.Empty:
                break
        pids = {entry.process.pid: entry for entry in self.ranks.values()}
        for conn in list(self._pending):
            if not conn.poll(0):
                continue
            self._pending.remove(conn)
            try:
                hello = wire.receive(conn)
            except Exception:
                conn.close()
                continue
            entry = pids.get(getattr(hello, "pid", None))
            if not isinstance(hello, wire.Hello) or entry is None or entry.rank != hello.rank:
                logger.warning("unexpected hello on the worker control port: %r", hello)
                conn.close()
                continue
            entry.conn = conn

    def stop_accepting(self) -> None:
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

    # -- messages ------------------------------------------------------------------------------

    def send(self, rank: int, message: wire.Message) -> None:
        entry = self.ranks.get(rank)
        if entry is None or entry.conn is None:
            return
        try:
            wire.send(entry.conn, message)
        except OSError:
            logger.debug("rank %d's connection is closed", rank)

    def receive(self, timeout: float) -> list[tuple[int, wire.Message]]:
        """Messages from the local ranks (waits up to ``timeout`` for the first); EOF closes the connection."""
        conns = {entry.conn: entry.rank for entry in self.ranks.values() if entry.conn is not None}
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
                    messages.append((rank, wire.receive(conn)))
                except (EOFError, OSError):
                    self.ranks[rank].conn = None
                    conn.close()
                    break
                if not conn.poll(0):
                    break
        return messages

    def connected(self, rank: int) -> bool:
        entry = self.ranks.get(rank)
        return entry is not None and entry.conn is not None

    # -- exits and logs ------------------------------------------------------------------------

    def exits(self) -> list[tuple[int, int]]:
        """``(rank, exit code)`` of every local rank that has ended."""
        codes = [(rank, entry.process.poll()) for rank, entry in self.ranks.items()]
        return [(rank, code) for rank, code in codes if code is not None]

    def died_unreported(self, except_rank: int | None = None) -> list[tuple[int, int]]:
        """Ranks that ended without reporting why (killed, crashed), as opposed to exiting after their report."""
        return [
            (rank, code)
            for rank, code in self.exits()
            if rank != except_rank and code not in (0, EXIT_FAILED, EXIT_CONTROLLER_GONE)
        ]

    def running(self) -> bool:
        return all(entry.process.poll() is None for entry in self.ranks.values())

    def states(self) -> str:
        """Each local rank's process state, so a stopped or zombie rank is named in a hang message."""
        states = []
        for rank, entry in sorted(self.ranks.items()):
            try:
                state = psutil.Process(entry.process.pid).status()
            except psutil.Error:
                state = "gone"
            states.append(f"rank {rank} {state}")
        return "local ranks: " + ", ".join(states) if states else "no local ranks"

    def log_tail(self, rank: int) -> list[str]:
        entry = self.ranks.get(rank)
        if entry is None or not entry.log_path.exists():
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

    def stop(self, kill: bool) -> None:
        """Stop every local rank (asked with ``Shutdown``, then terminated, unless ``kill``; then killed), close the
        channels and the control port, remove the logs."""
        entries = list(self.ranks.values())
        if not kill:
            for entry in entries:
                self.send(entry.rank, wire.Shutdown())
            _wait_all(entries, SHUTDOWN_GRACE_S)
            _signal_all(entries, signal.SIGTERM)
            _wait_all(entries, TERMINATE_GRACE_S)
        _signal_all(entries, signal.SIGKILL if hasattr(signal, "SIGKILL") else signal.SIGTERM)
        _wait_all(entries, TERMINATE_GRACE_S)
        for entry in entries:
            if entry.conn is not None:
                entry.conn.close()
                entry.conn = None
        self.stop_accepting()
        self.ranks = {}
        if self.log_dir is not None:
            shutil.rmtree(self.log_dir, ignore_errors=True)
            self.log_dir = None


def _wait_all(entries: list[LocalRank], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for entry in entries:
        try:
            entry.process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass


def _signal_all(entries: list[LocalRank], sig: int) -> None:
    for entry in entries:
        try:
            if os.name == "posix":
                os.killpg(entry.process.pid, sig)  # the rank's own session: also its helper processes
            elif entry.process.poll() is None:
                entry.process.kill()
        except (ProcessLookupError, PermissionError):
            pass


def describe_exit(code: int) -> str:
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
    """Remove the rank log folders (``wan-distrifusion-<pid>-*`` in ``folder``, default the temp dir), ``cli.py``'s
    scratch folders (``wan-distrifusion-cli-<pid>-*``) and the sessions' shared latents of controllers that are no
    longer running (e.g. SIGKILLed); returns the paths removed."""
    removed = []
    try:
        candidates = list(Path(folder or tempfile.gettempdir()).glob(f"{LOG_DIR_PREFIX}*-*"))
        if folder is None:
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
