"""One rank's process: joins the group, loads the weights itself, serves forward sessions until shutdown.

Started by ``worker_main.py`` (the controller never imports this loop). The rank reads the group's
``RuntimeSpec`` and numbered commands from the rendezvous store (``store.py``), so ranks on other hosts are
served exactly like local ones; a local rank also holds a control connection to the controller (``wire.py``
messages; EOF means the controller died). A rank that loses the store (controller gone, or no answer for
``store_lost_s()``: link cut) exits.

In a **forward session** the controller runs the sampler: each call puts ``x`` into the shared latents and
sends ``Forward`` to rank 0, which broadcasts ``t`` (and ``x`` when a rank runs on another host) to every rank;
every rank evaluates the guided flow (``rank.session_flow``), rank 0 writes it back and answers ``Prediction``.
``End`` is broadcast the same way, so every rank leaves the session after the same call and the group is
reusable. While the controller is between calls, rank 0 wakes the others every ``SESSION_KEEPALIVE_S`` so their
broadcast never runs into the collective timeout.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import socket
import sys
import threading
import time
from collections import deque
from datetime import timedelta
from multiprocessing.connection import Client, Connection

import torch
import torch.distributed as dist

from ..wanvideo.errors import WanDistriFusionError
from . import wire
from .devices import device_memory, device_name, memory_in_use, memory_peak, resolve_device
from .rank import apply_rank_loras, last_stats, load_rank_models, rank_kernels, resolve_weights, session_flow
from .settings import RuntimeSpec
from .shared_latents import SharedLatents
from .store import (
    PG_STORE_PREFIX,
    STORE_WATCH_S,
    ApplyLoras,
    DecodeVAE,
    OpenSession,
    StopServing,
    connect_store,
    decode_command,
    store_lost_s,
    store_take,
)
from .wire import AUTHKEY_ENV, EXIT_CONTROLLER_GONE, EXIT_FAILED, EXIT_OK

logger = logging.getLogger(__name__)

POLL_S = 0.05
SESSION_KEEPALIVE_S = 10.0
_CALL_END, _CALL_FORWARD, _CALL_KEEPALIVE = 0.0, 1.0, 2.0


class RankProcess:
    """This process's rank: its channels to the controller, its model and the serve loop."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.rank = args.rank
        self.world_size = args.world_size
        self.conn: Connection | None = None
        self.store = None
        self.raw_store = None
        self.model = None
        self.device = torch.device("cpu")
        self.spec: RuntimeSpec | None = None
        self.backend = "none"
        self.inbox: deque[wire.Message] = deque()
        """Control messages read ahead (e.g. a session's first ``Forward`` before its command was taken)."""
        self.vae_decoder = None
        """(weights key, decoder) of the last VAE decode, kept for the next (``vae_session.serve_decode``)."""

    # -- channels ------------------------------------------------------------------------------

    def send(self, message: wire.Message) -> None:
        if self.conn is None:
            return
        try:
            wire.send(self.conn, message)
        except OSError:
            logger.warning("controller connection lost; exiting")
            os._exit(EXIT_CONTROLLER_GONE)

    def pull_control(self, timeout: float = 0.0) -> bool:
        """Move the controller's pending messages into ``inbox`` (waiting up to ``timeout`` for the first); EOF
        (controller gone) queues ``ControllerGone`` and drops the connection. Whether any arrived."""
        if self.conn is None:
            return False
        got = False
        try:
            while self.conn.poll(timeout):
                self.inbox.append(wire.receive(self.conn))
                got, timeout = True, 0.0
        except (EOFError, OSError):
            self.inbox.append(wire.ControllerGone())
            self.conn = None
            got = True
        return got

    def report_error(self, error: BaseException, phase: str, step: int | None = None, total: int | None = None) -> None:
        failure = wire.Failure.of(self.rank, error, phase, step, total)
        logger.error("rank %d failed %s:\n%s", self.rank, phase, failure.traceback)
        if self.store is not None:  # first: ``send`` ends the process when the controller is gone
            try:
                self.store.set(f"error/{self.rank}", wire.encode(failure))
            except Exception:  # the store may be what failed
                pass
        self.send(failure)

    # -- start ---------------------------------------------------------------------------------

    def start(self) -> None:
        """Join the rendezvous and the process group, load the model, report ``Ready``."""
        self.spec = self._join()
        self._watch_connection = watch_store(self.args, self.rank)
        self.device = resolve_device(self.args.device, self.args.local_index)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if self.args.threads:
            torch.set_num_threads(self.args.threads)
        free_before, total_memory = device_memory(self.device)
        if self.world_size > 1:
            self.backend = "nccl" if self.device.type == "cuda" else "gloo"
            dist.init_process_group(
                self.backend,
                store=dist.PrefixStore(PG_STORE_PREFIX, self.raw_store),
                rank=self.rank,
                world_size=self.world_size,
                timeout=timedelta(seconds=float(self.store.get("collective_timeout_s"))),
            )
        began = time.perf_counter()
        weights = resolve_weights(self.spec, self.device, free_before)
        self.models = load_rank_models(self.spec, self.device, weights)
        self.model = self.models[0]
        ready = wire.Ready(
            rank=self.rank,
            pid=os.getpid(),
            host=socket.gethostname(),
            device=str(self.device),
            device_name=device_name(self.device),
            memory_bytes=memory_in_use(self.device),
            free_before_load=free_before,
            total_memory=total_memory,
            model_config=dataclasses.asdict(self.model.config),
            comm_backend=self.backend,
            load_seconds=time.perf_counter() - began,
            weights=weights,
            **rank_kernels(self.spec.parallel, self.device),
        )
        self.store.set(f"ready/{self.rank}", wire.encode(ready))
        self.send(ready)
        logger.info(
            "rank %d ready on %s (%s) in %.1f s, %s weights, attention %s, compile %s",
            self.rank,
            self.device,
            ready.device_name,
            ready.load_seconds,
            weights,
            ready.attention,
            ready.compile,
        )

    def _join(self) -> RuntimeSpec:
        """Connect to the store, claim this rank and read the group's spec (this host's model path and device)."""
        args = self.args
        try:
            self.raw_store, self.store = connect_store(
                args.master_addr, args.master_port, is_master=False, timeout_s=args.start_timeout
            )
        except dist.DistError as error:
            raise WanDistriFusionError(
                f"master address: cannot reach the rendezvous at {args.master_addr}:{args.master_port} within "
                f"{args.start_timeout:.0f} s ({wire.describe_error(error).splitlines()[0]}); start the controller "
                "first (ComfyUI's Loader or `cli.py generate`) and check the address, port and firewall."
            ) from error
        if self.store.add(f"claim/{self.rank}", 1) != 1:
            raise WanDistriFusionError(
                f"rank: rank {self.rank} was already started by another worker; give each `cli.py worker` its own --rank."
            )
        text = self.store.get("group").decode()
        changes = {}
        if json.loads(text).get("second_model_path") is not None:  # the controller runs Wan 2.2 A14B's two experts
            if not args.second_model:
                raise WanDistriFusionError(
                    "second model: the controller runs two experts (Wan 2.2 A14B); start this worker with "
                    "--second-model <the low-noise expert's path on this host> beside --model."
                )
            changes["second_model_path"] = args.second_model
        spec = RuntimeSpec.from_json(text, model_path=args.model, device=args.device, **changes)
        if spec.world_size != self.world_size:
            raise WanDistriFusionError(
                f"world size: this worker was started with --world-size {self.world_size} but the controller runs "
                f"{spec.world_size}; use the same world size everywhere."
            )
        return spec

    # -- serving -------------------------------------------------------------------------------

    def serve(self) -> int:
        """Serve the numbered commands until shutdown, failure or the controller's death; the exit code."""
        number = 1
        while True:
            command = self.next_command(number)
            match command:
                case None:
                    logger.info("controller gone; exiting")
                    return EXIT_CONTROLLER_GONE
                case StopServing():
                    logger.info("shutting down")
                    return EXIT_OK
                case OpenSession():
                    if not self.serve_session(command):
                        return EXIT_FAILED
                case DecodeVAE():
                    from .vae_session import serve_decode

                    if not serve_decode(self, command):
                        return EXIT_FAILED
                case ApplyLoras():
                    if not self.apply_loras(number, command):
                        return EXIT_FAILED
            number += 1

    def apply_loras(self, number: int, command: ApplyLoras) -> bool:
        """Re-merge each model whose LoRA chain changed from its unmodified weights; False when it failed (the
        controller stops the group)."""
        try:
            summary = apply_rank_loras(self.models, self.spec, command.chains)
        except BaseException as error:
            self.report_error(error, "lora")
            return False
        self.spec = self.spec.with_expert_loras(command.chains)
        experts = tuple(summary["experts"])
        self.send(wire.LorasApplied(number, self.rank, summary["tensors"], summary["seconds"], experts))
        return True

    def next_command(self, number: int) -> OpenSession | DecodeVAE | StopServing | ApplyLoras | None:
        """Block until command ``number`` is in the store; ``None`` when the controller is gone."""
        key = f"cmd/{number}"
        while True:
            try:
                if self.store.check([key]):
                    return decode_command(store_take(self.store, key))
            except dist.DistError:
                return None
            self.pull_control()
            if any(isinstance(message, wire.ControllerGone) for message in self.inbox):
                return None
            if any(isinstance(message, wire.Shutdown) for message in self.inbox):
                return StopServing()
            # Keep what belongs to this or a later command (a session's first call may come early).
            self.inbox = deque(m for m in self.inbox if getattr(m, "session", number) >= number)
            time.sleep(POLL_S)

    def memory_table(self) -> list[list[float]]:
        """``[memory in use, peak memory]`` of every rank (index = rank); collective."""
        row = torch.tensor(
            [memory_in_use(self.device), memory_peak(self.device)], dtype=torch.float64, device=self.device
        )
        if self.world_size == 1:
            return [row.cpu().tolist()]
        rows = [torch.empty_like(row) for _ in range(self.world_size)]
        dist.all_gather(rows, row)
        return torch.stack(rows).cpu().tolist()

    # -- forward sessions ----------------------------------------------------------------------

    def serve_session(self, command: OpenSession) -> bool:
        """Serve one forward session; False when it failed (the controller stops the group)."""
        calls = 0
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        try:
            all_local = set(command.latents_ranks) == set(range(self.world_size))
            mapped = self.rank == 0 or (all_local and self.rank in command.latents_ranks)
            latents = SharedLatents(command.latents, command.shape) if mapped else None
            model = self.models[command.job.expert]
            flow = session_flow(
                model,
                self.spec.parallel,
                self.rank,
                self.device,
                command.job,
                command.shape[0],
                command.return_uncond,
            )
            while (call := self.next_call(command, latents, all_local)) is not None:
                began = time.perf_counter()
                with torch.no_grad():
                    out = flow(*call)
                table = self.memory_table()
                calls += 1
                if self.rank == 0:
                    latents.flow.copy_(out)
                    if flow.return_uncond:
                        latents.uncond.copy_(flow.last_uncond)
                    memory, peak = ([int(row[i]) for row in table] for i in (0, 1))
                    skipped = flow.step_cache is not None and flow.step_cache.last_skipped
                    seconds = time.perf_counter() - began
                    notes = list(flow.step_cache.notes) if flow.step_cache is not None else []
                    self.send(wire.Prediction(command.session, calls, seconds, memory, peak, skipped, notes))
        except BaseException as error:  # everything goes back to the controller
            self.report_error(error, "session", calls + 1, command.job.steps)
            return False
        logger.info("session %d ended after %d calls", command.session, calls)
        stats = last_stats(self.models[command.job.expert]) if self.rank == 0 else {}
        self.send(wire.SessionEnded(command.session, self.rank, calls, stats))
        return True

    def next_call(self, command: OpenSession, latents: SharedLatents | None, all_local: bool):
        """The next ``(x, t)`` of the session on every rank; ``None`` on every rank once the controller ends the
        session (or is gone)."""
        if self.rank != 0:
            return self._follow_call(command.shape, latents, all_local)
        while True:
            if not self.inbox and self.conn is None:
                self._broadcast_call(_CALL_END)  # no controller to drive the session
                return None
            if not self.inbox and not self.pull_control(SESSION_KEEPALIVE_S):
                self._broadcast_call(_CALL_KEEPALIVE)
                continue
            message = self.inbox.popleft()
            match message:
                case wire.ControllerGone() | wire.Shutdown():
                    self.inbox.appendleft(message)  # the serve loop acts on it after the session
                    self._broadcast_call(_CALL_END)
                    return None
                case wire.End(session=command.session):
                    self._broadcast_call(_CALL_END)
                    return None
                case wire.Forward(session=command.session, t=t):
                    x = latents.x.to(self.device, torch.float32)  # on CPU: the shared tensor itself, read only
                    self._broadcast_call(_CALL_FORWARD, t, None if all_local else x)
                    return x, t
                # anything else: a late message of an earlier command

    def _follow_call(self, shape: tuple[int, ...], latents: SharedLatents | None, all_local: bool):
        """A rank other than 0: wait for rank 0's broadcast of the next call."""
        while True:
            head = torch.zeros(2, dtype=torch.float64, device=self.device)
            dist.broadcast(head, 0)
            code, t = head.tolist()
            if code == _CALL_END:
                return None
            if code == _CALL_FORWARD and all_local:
                return latents.x.to(self.device, torch.float32), t
            if code == _CALL_FORWARD:
                x = torch.empty(shape, dtype=torch.float32, device=self.device)
                dist.broadcast(x, 0)
                return x, t

    def _broadcast_call(self, code: float, t: float = 0.0, x: torch.Tensor | None = None) -> None:
        if self.world_size == 1:
            return
        dist.broadcast(torch.tensor([code, t], dtype=torch.float64, device=self.device), 0)
        if x is not None:
            dist.broadcast(x.contiguous(), 0)


# -- watching the controller ----------------------------------------------------------------------


def watch_parent(parent: int) -> None:
    """Exit when the controller process dies (our parent; reparenting changes getppid)."""

    def loop() -> None:
        import psutil

        while True:
            gone = os.getppid() != parent if os.name == "posix" else not psutil.pid_exists(parent)
            if gone:
                os._exit(EXIT_CONTROLLER_GONE)
            time.sleep(0.5)

    threading.Thread(target=loop, name="parent-watch", daemon=True).start()


def watch_store(args: argparse.Namespace, rank: int):
    """Exit when the rendezvous store (the controller of rank 0) goes away, even mid-collective.

    Every ``STORE_WATCH_S`` the watch adds 1 to ``alive/<rank>`` (the controller's heartbeat of a rank on another
    host); an error exits at once, and a watchdog exits when no round-trip came back for ``store_lost_s()`` (a cut
    link blocks the call instead of failing it).
    """
    raw, store = connect_store(args.master_addr, args.master_port, is_master=False, timeout_s=30)
    where = f"{args.master_addr}:{args.master_port}"
    lost_after = store_lost_s()
    last_ok = [time.monotonic()]

    def beat() -> None:
        while True:
            try:
                store.add(f"alive/{rank}", 1)
            except Exception:
                logger.warning("rendezvous store at %s is gone; exiting", where)
                os._exit(EXIT_CONTROLLER_GONE)
            last_ok[0] = time.monotonic()
            time.sleep(STORE_WATCH_S)

    def watchdog() -> None:
        while True:
            time.sleep(min(1.0, lost_after / 4))
            silent = time.monotonic() - last_ok[0]
            if silent > lost_after:
                logger.warning(
                    "no answer from the rendezvous store at %s for %.0f s (link cut or controller host down); exiting",
                    where,
                    silent,
                )
                os._exit(EXIT_CONTROLLER_GONE)

    threading.Thread(target=beat, name="store-watch", daemon=True).start()
    threading.Thread(target=watchdog, name="store-watchdog", daemon=True).start()
    return raw  # the caller keeps the watch's connection open


def set_parent_death_signal(parent_pid: int | None) -> None:
    """Linux: SIGKILL this process when the parent dies (tied to the spawning thread, see ``processes.py``)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if parent_pid is not None and os.getppid() != parent_pid:
        os._exit(EXIT_CONTROLLER_GONE)  # the parent died before prctl took effect


# -- entry ----------------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="worker_main.py", description="One rank of a WanVideo DistriFusion group.")
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world-size", type=int, required=True)
    parser.add_argument("--local-index", type=int, default=0, help="GPU index on this host")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--master-addr", required=True)
    parser.add_argument("--master-port", type=int, required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--second-model", default=None, help="Wan 2.2 A14B's low-noise expert, as a path on this host")
    parser.add_argument("--control", default=None, help="HOST:PORT of the controller's connection (local ranks)")
    parser.add_argument("--parent-pid", type=int, default=None)
    parser.add_argument("--pdeathsig", action="store_true", help="Linux: get SIGKILL when the parent dies")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0 = torch's default)")
    parser.add_argument("--start-timeout", type=float, default=600.0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run one rank until shutdown, failure or the controller's death; the process exit code."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format=f"%(asctime)s rank {args.rank} %(levelname)s %(name)s: %(message)s",
    )
    rank = RankProcess(args)
    if args.pdeathsig:
        set_parent_death_signal(args.parent_pid)
    if args.parent_pid is not None:
        watch_parent(args.parent_pid)
    if args.control:
        host, port = args.control.rsplit(":", 1)
        rank.conn = Client((host, int(port)), authkey=bytes.fromhex(os.environ.pop(AUTHKEY_ENV)))
        rank.send(wire.Hello(args.rank, os.getpid()))
    for phase, step in (("start", rank.start), ("serve", rank.serve)):
        try:
            code = step()
        except BaseException as error:  # reported, then the process ends
            rank.report_error(error, phase)
            return EXIT_FAILED
    if code == EXIT_OK and dist.is_initialized():
        dist.destroy_process_group()
    logger.info("exiting (%d)", code)
    return code
