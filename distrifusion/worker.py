"""One rank of a worker group: joins the process group, loads the weights itself, serves jobs.

Runs in a process started by ``worker_main.py`` (the controller never imports the worker loop at
ComfyUI start-up). Two channels:

- the **rendezvous store** (torch ``TCPStore`` at ``MASTER_ADDR:MASTER_PORT``, hosted by the
  controller of rank 0): group settings (``group``), numbered commands ``cmd/<n>`` (a job, a forward
  session or a shutdown) that *every* rank reads, local or on another host, and ``ready/<rank>`` /
  ``error/<rank>`` reports, and each rank's heartbeat ``alive/<rank>`` (a counter it adds 1 to every
  second; the controller fails the job when a rank on another host stops counting). The store is not
  authenticated, so its payloads are JSON + safetensors, never pickle. A rank that loses the store
  (controller gone, or no answer for ``STORE_LOST_S``: link cut) exits.
- the **control connection** (local ranks only; ``multiprocessing.connection`` with a random
  authkey from the environment): pickled dicts. Worker -> controller: ``hello``, ``ready``,
  ``progress`` (rank 0, every step), ``result`` (rank 0), ``cancelled``, ``prediction`` (rank 0, every
  session call), ``session_end``, ``error``. Controller -> worker: ``cancel``, ``forward``, ``end``
  (rank 0), ``shutdown``. EOF means the controller died.

A **job** runs the whole sampler on the ranks. Every step each rank all-gathers ``[cancel flag, memory
in use, peak memory]``; a set flag anywhere stops every rank after the same step, so the collectives
stay matched and the group is reusable.

A **forward session** lets the controller run the sampler itself (ComfyUI's samplers): each call sends
``(x, t)`` to rank 0, which broadcasts it to every rank (local or remote) through the process group;
every rank evaluates the guided flow (``wanvideo.sampling.GuidedFlow``, the same code the job path
samples with) and rank 0 returns it. ``end`` is broadcast the same way, so every rank leaves the
session after the same call and the group is reusable.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import pickle
import platform
import signal
import socket
import struct
import sys
import threading
import time
import traceback
from collections import deque
from datetime import timedelta
from multiprocessing.connection import Client, Connection

import torch
import torch.distributed as dist
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from ..wanvideo.errors import WanDistriFusionError
from ..wanvideo.loading import PRECISIONS, load_wan_model
from ..wanvideo.sampling import GuidedFlow
from .config import ParallelConfig
from .job import GenerationJob
from .settings import RuntimeSpec
from .shared_latents import SharedLatents

logger = logging.getLogger(__name__)

AUTHKEY_ENV = "WAN_DISTRIFUSION_AUTHKEY"
"""Environment variable that carries the control connection's authkey (hex) to local workers."""
STORE_PREFIX = "wan_distrifusion/"
PG_STORE_PREFIX = "process_group/"
STORE_CHUNK_BYTES = 4 << 20
"""TCPStore refuses values over 8 MiB; larger payloads are split into chunks."""
POLL_S = 0.05
STORE_WATCH_S = 1.0
"""Every rank adds 1 to ``alive/<rank>`` in the store this often: its heartbeat, and its check that the store is there."""
STORE_LOST_S = 30.0
"""A rank whose store round-trip has not come back for this long exits (a cut link leaves the TCP connection
hanging instead of failing it); ``cli.py worker`` then waits for the next group. Override with ``STORE_LOST_ENV``."""
STORE_LOST_ENV = "WAN_DISTRIFUSION_STORE_LOST_S"
SESSION_KEEPALIVE_S = 10.0
"""Rank 0 wakes the other ranks this often while the controller is between session calls, so their
broadcast never runs into the collective timeout."""
_CALL_END, _CALL_FORWARD, _CALL_KEEPALIVE = 0.0, 1.0, 2.0

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CONTROLLER_GONE = 3


# ----------------------------------------------------------------------------------------------
# Payloads in the store: a JSON header plus safetensors, never pickle.


def encode_payload(header: dict, tensors: dict[str, torch.Tensor] | None = None) -> bytes:
    """``header`` (JSON) + ``tensors`` (safetensors) as one byte string."""
    head = json.dumps(header).encode()
    body = b""
    if tensors:
        body = save_tensors({name: t.detach().to("cpu").clone().contiguous() for name, t in tensors.items()})
    return struct.pack("<Q", len(head)) + head + body


def decode_payload(data: bytes) -> tuple[dict, dict[str, torch.Tensor]]:
    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + size])
    body = data[8 + size :]
    return header, (load_tensors(body) if body else {})


def encode_job(job_id: int, job: GenerationJob, kind: str = "job", options: dict | None = None) -> bytes:
    """A job (``kind="session"``: a forward session, with its ``options``) as a store payload: tensor fields
    (and tensors in ``extra``) by value, the rest as JSON."""
    fields, tensors, extra = {}, {}, {}
    for field in dataclasses.fields(job):
        value = getattr(job, field.name)
        if field.name == "extra":
            for key, item in value.items():
                if isinstance(item, torch.Tensor):
                    tensors[f"extra.{key}"] = item
                else:
                    extra[key] = _json_value(f"job.extra[{key!r}]", item)
        elif isinstance(value, torch.Tensor):
            tensors[field.name] = value
        else:
            fields[field.name] = _json_value(f"job.{field.name}", value)
    header = {"type": kind, "id": job_id, "fields": fields, "extra": extra}
    if options:
        header["options"] = _json_value("session options", options)
    return encode_payload(header, tensors)


def decode_job(header: dict, tensors: dict[str, torch.Tensor]) -> GenerationJob:
    kwargs = dict(header["fields"])
    extra = dict(header.get("extra", {}))
    for name, tensor in tensors.items():
        if name.startswith("extra."):
            extra[name[len("extra.") :]] = tensor
        else:
            kwargs[name] = tensor
    return GenerationJob(**kwargs, extra=extra)


def _json_value(name: str, value):
    try:
        json.dumps(value)
    except TypeError as error:
        raise WanDistriFusionError(
            f"{name}: {type(value).__name__} cannot be sent to the workers; use tensors, numbers, strings, lists or dicts."
        ) from error
    return value


def store_put(store, key: str, data: bytes) -> None:
    """Write ``data`` under ``key`` in chunks; ``key`` itself (the chunk count) is written last."""
    chunks = [data[i : i + STORE_CHUNK_BYTES] for i in range(0, len(data), STORE_CHUNK_BYTES)] or [b""]
    for index, chunk in enumerate(chunks):
        store.set(f"{key}/{index}", chunk)
    store.set(key, str(len(chunks)))


def store_take(store, key: str) -> bytes:
    count = int(store.get(key))
    return b"".join(store.get(f"{key}/{index}") for index in range(count))


def store_drop(store, key: str) -> None:
    if not store.check([key]):
        return
    count = int(store.get(key))
    store.delete_key(key)
    for index in range(count):
        store.delete_key(f"{key}/{index}")


def connect_store(host: str, port: int, *, is_master: bool, timeout_s: float):
    """The raw TCPStore (controller: ``is_master``) and our prefixed view of it."""
    raw = dist.TCPStore(host, port, None, is_master, timeout=timedelta(seconds=timeout_s), wait_for_workers=False)
    return raw, dist.PrefixStore(STORE_PREFIX, raw)


def store_lost_s() -> float:
    """``STORE_LOST_S``, or the positive number of seconds in the ``STORE_LOST_ENV`` environment variable."""
    try:
        value = float(os.environ.get(STORE_LOST_ENV, ""))
    except ValueError:
        return STORE_LOST_S
    return value if value > 0 else STORE_LOST_S


# ----------------------------------------------------------------------------------------------
# Device facts, also used by the in-process runner.


def resolve_device(kind: str, local_index: int = 0) -> torch.device:
    if kind == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise WanDistriFusionError(
            "device: CUDA is not available in this Python; choose device cpu or install a CUDA build of torch."
        )
    count = torch.cuda.device_count()
    if local_index >= count:
        raise WanDistriFusionError(
            f"GPUs: local rank {local_index} needs GPU {local_index} but only {count} are visible; lower GPUs/world size."
        )
    return torch.device("cuda", local_index)


def memory_in_use(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.memory_allocated(device))
    import psutil

    return int(psutil.Process().memory_info().rss)


def memory_peak(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        import resource
    except ImportError:  # Windows
        return memory_in_use(device)
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * scale


def device_memory(device: torch.device) -> tuple[int, int]:
    """(free, total) bytes of the device (CPU: available and total system memory)."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return int(free), int(total)
    import psutil

    vm = psutil.virtual_memory()
    return int(vm.available), int(vm.total)


def load_rank_model(spec: RuntimeSpec, device: torch.device) -> torch.nn.Module:
    """Load ``spec``'s weights on this rank's device, projections fused, with the group's attention kernel and
    compile setting."""
    parallel = spec.parallel
    model = load_wan_model(
        spec.model_path, dtype=PRECISIONS[spec.precision], quantization=spec.quantization, device=device
    )
    model.eval()
    model.fuse_projections()
    model.set_attention_backend(parallel.attention_backend)
    if parallel.compile_blocks:
        model.compile_blocks()
    return model


def session_flow(
    model, parallel: ParallelConfig, rank: int, device: torch.device, job: GenerationJob, options: dict
) -> GuidedFlow:
    """The guided flow a rank evaluates for each call of a forward session (the job path's model and CFG code)."""
    from .rank import job_model

    return GuidedFlow(
        job_model(model, parallel, rank, device, job),
        job.positive,
        job.negative,
        cfg=job.cfg,
        batch=int(options["shape"][0]),
        device=device,
        model_kwargs=job.extra.get("model_kwargs"),
        return_uncond=bool(options.get("return_uncond")),
    )


def session_message_id(message: dict) -> int:
    """The command number a control message belongs to (0 when it names none)."""
    return int(message.get("session", message.get("job", 0)) or 0)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or "CPU"


def describe_error(error: BaseException) -> str:
    return "".join(traceback.format_exception_only(type(error), error)).strip()


# ----------------------------------------------------------------------------------------------
# The worker process.


class _Worker:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.rank = args.rank
        self.world_size = args.world_size
        self.conn: Connection | None = None
        self.store = None
        self.raw_store = None
        self.model = None
        self.device = torch.device("cpu")
        self.parallel: ParallelConfig | None = None
        self.backend = "none"
        self.inbox: deque[dict] = deque()
        """Control messages read ahead (e.g. a session's first ``forward`` before its command was taken)."""

    # -- channels ------------------------------------------------------------------------------

    def send(self, message: dict) -> None:
        if self.conn is None:
            return
        try:
            self.conn.send_bytes(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))
        except OSError:
            logger.warning("controller connection lost; exiting")
            os._exit(EXIT_CONTROLLER_GONE)

    def pull_control(self, timeout: float = 0.0) -> bool:
        """Move the controller's pending messages into ``inbox`` (waiting up to ``timeout`` for the first);
        EOF (controller gone) queues ``{"type": "eof"}`` and drops the connection. Whether any arrived."""
        if self.conn is None:
            return False
        got = False
        try:
            while self.conn.poll(timeout):
                self.inbox.append(pickle.loads(self.conn.recv_bytes()))
                got, timeout = True, 0.0
        except (EOFError, OSError):
            self.inbox.append({"type": "eof"})
            self.conn = None
            got = True
        return got

    def report_error(self, error: BaseException, phase: str, step: int | None = None, total: int | None = None) -> None:
        text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
        logger.error("rank %d failed %s:\n%s", self.rank, phase, text)
        report = {
            "type": "error",
            "rank": self.rank,
            "phase": phase,
            "step": step,
            "total": total,
            "error": describe_error(error),
            "traceback": text[-4000:],
            "user_error": isinstance(error, WanDistriFusionError),
            "out_of_memory": "out of memory" in str(error).lower(),
        }
        if self.store is not None:  # first: ``send`` ends the process when the controller is gone
            try:
                self.store.set(f"error/{self.rank}", json.dumps(report))
            except Exception:  # the store may be what failed
                pass
        self.send(report)

    def watch_parent(self) -> None:
        """Exit when the controller process dies (our parent; reparenting changes getppid)."""
        parent = self.args.parent_pid

        def loop() -> None:
            import psutil

            while True:
                gone = os.getppid() != parent if os.name == "posix" else not psutil.pid_exists(parent)
                if gone:
                    os._exit(EXIT_CONTROLLER_GONE)
                time.sleep(0.5)

        threading.Thread(target=loop, name="parent-watch", daemon=True).start()

    def watch_store(self) -> None:
        """Exit when the rendezvous store (the controller of rank 0) goes away, even mid-collective.

        Every ``STORE_WATCH_S`` the watch adds 1 to ``alive/<rank>`` (the controller's heartbeat of a rank on
        another host); an error exits at once, and a watchdog exits when no round-trip came back for
        ``store_lost_s()`` (a cut link blocks the call instead of failing it).
        """
        raw, store = connect_store(self.args.master_addr, self.args.master_port, is_master=False, timeout_s=30)
        key = f"alive/{self.rank}"
        lost_after = store_lost_s()
        last_ok = [time.monotonic()]

        def loop() -> None:
            while True:
                try:
                    store.add(key, 1)
                except Exception:
                    logger.warning(
                        "rendezvous store at %s:%d is gone; exiting", self.args.master_addr, self.args.master_port
                    )
                    os._exit(EXIT_CONTROLLER_GONE)
                last_ok[0] = time.monotonic()
                time.sleep(STORE_WATCH_S)

        def watchdog() -> None:
            while True:
                time.sleep(min(1.0, lost_after / 4))
                silent = time.monotonic() - last_ok[0]
                if silent > lost_after:
                    logger.warning(
                        "no answer from the rendezvous store at %s:%d for %.0f s (link cut or controller host down); "
                        "exiting",
                        self.args.master_addr,
                        self.args.master_port,
                        silent,
                    )
                    os._exit(EXIT_CONTROLLER_GONE)

        threading.Thread(target=loop, name="store-watch", daemon=True).start()
        threading.Thread(target=watchdog, name="store-watchdog", daemon=True).start()
        self._watch_store = raw  # keep the connection open

    # -- start ---------------------------------------------------------------------------------

    def start(self) -> None:
        args = self.args
        try:
            self.raw_store, self.store = connect_store(
                args.master_addr, args.master_port, is_master=False, timeout_s=args.start_timeout
            )
        except dist.DistError as error:
            raise WanDistriFusionError(
                f"master address: cannot reach the rendezvous at {args.master_addr}:{args.master_port} within "
                f"{args.start_timeout:.0f} s ({describe_error(error).splitlines()[0]}); start the controller first "
                "(ComfyUI's Loader or `cli.py generate`) and check the address, port and firewall."
            ) from error
        if self.store.add(f"claim/{self.rank}", 1) != 1:
            raise WanDistriFusionError(
                f"rank: rank {self.rank} was already started by another worker; give each `cli.py worker` its own --rank."
            )
        spec = RuntimeSpec.from_json(self.store.get("group").decode(), model_path=args.model, device=args.device)
        if spec.world_size != self.world_size:
            raise WanDistriFusionError(
                f"world size: this worker was started with --world-size {self.world_size} but the controller runs "
                f"{spec.world_size}; use the same world size everywhere."
            )
        self.watch_store()
        self.parallel = spec.parallel
        self.device = resolve_device(args.device, args.local_index)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if args.threads:
            torch.set_num_threads(args.threads)
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
        self.model = load_rank_model(spec, self.device)
        ready = {
            "type": "ready",
            "rank": self.rank,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "device": str(self.device),
            "device_name": device_name(self.device),
            "memory_bytes": memory_in_use(self.device),
            "free_before_load": free_before,
            "total_memory": total_memory,
            "model_config": dataclasses.asdict(self.model.config),
            "comm_backend": self.backend,
            "load_seconds": time.perf_counter() - began,
        }
        self.store.set(f"ready/{self.rank}", json.dumps(ready))
        self.send(ready)
        logger.info(
            "rank %d ready on %s (%s) in %.1f s", self.rank, self.device, ready["device_name"], ready["load_seconds"]
        )

    # -- serving -------------------------------------------------------------------------------

    def next_command(self, number: int) -> tuple[dict, dict] | None:
        """Block until command ``number`` is in the store; ``None`` when the controller is gone."""
        key = f"cmd/{number}"
        while True:
            try:
                if self.store.check([key]):
                    return decode_payload(store_take(self.store, key))
            except dist.DistError:
                return None
            self.pull_control()
            kinds = {message.get("type") for message in self.inbox}
            if "eof" in kinds:
                return None
            if "shutdown" in kinds:
                return {"type": "shutdown"}, {}
            # Keep what belongs to this or a later command (a session's first call may come early).
            self.inbox = deque(m for m in self.inbox if session_message_id(m) >= number)
            time.sleep(POLL_S)

    def serve(self) -> int:
        number = 1
        while True:
            command = self.next_command(number)
            if command is None:
                logger.info("controller gone; exiting")
                return EXIT_CONTROLLER_GONE
            header, tensors = command
            if header["type"] == "shutdown":
                logger.info("shutting down")
                return EXIT_OK
            if header["type"] == "session":
                if not self.run_session(header, tensors):
                    return EXIT_FAILED
            number += 1

    def memory_table(self) -> list[list[float]]:
        """``[memory in use, peak memory]`` of every rank (index = rank); collective."""
        flags = torch.tensor(
            [memory_in_use(self.device), memory_peak(self.device)],
            dtype=torch.float64,
            device=self.device,
        )
        if self.world_size == 1:
            return [flags.cpu().tolist()]
        rows = [torch.empty_like(flags) for _ in range(self.world_size)]
        dist.all_gather(rows, flags)
        return torch.stack(rows).cpu().tolist()

    # -- forward sessions ----------------------------------------------------------------------

    def next_call(self, session_id: int, shape: tuple[int, ...], latents: SharedLatents | None, all_local: bool):
        """The next ``(x, t)`` of the session on every rank (rank 0 takes it from the controller and broadcasts
        ``t``; ``x`` comes from the shared latents, or is broadcast when a rank runs on another host); ``None`` on
        every rank once the controller ends the session (or is gone)."""
        if self.rank != 0:
            while True:
                head = torch.zeros(2, dtype=torch.float64, device=self.device)
                dist.broadcast(head, 0)
                code, t = head.tolist()
                if code == _CALL_END:
                    return None
                if code == _CALL_FORWARD and all_local:
                    return latents.x.to(self.device, torch.float32, copy=True), t
                if code == _CALL_FORWARD:
                    x = torch.empty(shape, dtype=torch.float32, device=self.device)
                    dist.broadcast(x, 0)
                    return x, t
        while True:
            if not self.inbox and self.conn is None:
                self._broadcast_call(_CALL_END)  # no controller to drive the session
                return None
            if not self.inbox and not self.pull_control(SESSION_KEEPALIVE_S):
                self._broadcast_call(_CALL_KEEPALIVE)
                continue
            message = self.inbox.popleft()
            kind = message.get("type")
            if kind in ("eof", "shutdown"):
                self.inbox.appendleft(message)  # the serve loop acts on it after the session
                self._broadcast_call(_CALL_END)
                return None
            if session_message_id(message) != session_id:
                continue  # late message of an earlier command
            if kind == "end":
                self._broadcast_call(_CALL_END)
                return None
            if kind == "forward":
                x = latents.x.to(self.device, torch.float32, copy=True)
                t = float(message["t"])
                self._broadcast_call(_CALL_FORWARD, t, None if all_local else x)
                return x, t

    def _broadcast_call(self, code: float, t: float = 0.0, x: torch.Tensor | None = None) -> None:
        if self.world_size == 1:
            return
        dist.broadcast(torch.tensor([code, t], dtype=torch.float64, device=self.device), 0)
        if x is not None:
            dist.broadcast(x.contiguous(), 0)

    def run_session(self, header: dict, tensors: dict) -> bool:
        """Serve one forward session; False when it failed (the controller stops the group)."""
        from .rank import last_stats

        session_id = header["id"]
        options = header.get("options") or {}
        calls = 0
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        try:
            job = decode_job(header, tensors)
            shape = tuple(int(n) for n in options["shape"])
            all_local = set(options["latents_ranks"]) == set(range(self.world_size))
            mapped = self.rank == 0 or (all_local and self.rank in options["latents_ranks"])
            latents = SharedLatents(options["latents"], shape) if mapped else None
            flow = session_flow(self.model, self.parallel, self.rank, self.device, job, options)
            while True:
                call = self.next_call(session_id, shape, latents, all_local)
                if call is None:
                    break
                began = time.perf_counter()
                with torch.no_grad():
                    out = flow(*call)
                table = self.memory_table()
                calls += 1
                if self.rank == 0:
                    latents.flow.copy_(out)
                    if flow.return_uncond:
                        latents.uncond.copy_(flow.last_uncond)
                    self.send(
                        {
                            "type": "prediction",
                            "session": session_id,
                            "call": calls,
                            "seconds_per_step": time.perf_counter() - began,
                            "memory_per_rank": [int(row[0]) for row in table],
                            "peak_per_rank": [int(row[1]) for row in table],
                        }
                    )
        except BaseException as error:  # everything goes back to the controller
            self.report_error(error, "session", calls + 1, header["fields"].get("steps"))
            return False
        logger.info("session %d ended after %d calls", session_id, calls)
        message = {"type": "session_end", "session": session_id, "rank": self.rank, "calls": calls}
        if self.rank == 0:
            message["stats"] = last_stats(self.model)
        self.send(message)
        return True


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="worker_main.py", description="One rank of a WanVideo DistriFusion worker group."
    )
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world-size", type=int, required=True)
    parser.add_argument("--local-index", type=int, default=0, help="GPU index on this host")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--master-addr", required=True)
    parser.add_argument("--master-port", type=int, required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--control", default=None, help="HOST:PORT of the controller's connection (local ranks)")
    parser.add_argument("--parent-pid", type=int, default=None)
    parser.add_argument("--pdeathsig", action="store_true", help="Linux: get SIGKILL when the parent dies")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0 = torch's default)")
    parser.add_argument("--start-timeout", type=float, default=600.0)
    return parser.parse_args(argv)


def _set_parent_death_signal(parent_pid: int | None) -> None:
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if parent_pid is not None and os.getppid() != parent_pid:
        os._exit(EXIT_CONTROLLER_GONE)  # the parent died before prctl took effect


def main(argv: list[str] | None = None) -> int:
    """Run one rank until shutdown, failure or the controller's death; the process exit code."""
    args = _parse(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format=f"%(asctime)s rank {args.rank} %(levelname)s %(name)s: %(message)s",
    )
    worker = _Worker(args)
    if args.pdeathsig:
        _set_parent_death_signal(args.parent_pid)
    if args.parent_pid is not None:
        worker.watch_parent()
    if args.control:
        host, port = args.control.rsplit(":", 1)
        worker.conn = Client((host, int(port)), authkey=bytes.fromhex(os.environ.pop(AUTHKEY_ENV)))
        worker.send({"type": "hello", "rank": args.rank, "pid": os.getpid()})
    try:
        worker.start()
    except BaseException as error:  # reported, then the process ends
        worker.report_error(error, "start")
        return EXIT_FAILED
    try:
        code = worker.serve()
    except BaseException as error:
        worker.report_error(error, "serve")
        return EXIT_FAILED
    if code == EXIT_OK and dist.is_initialized():
        dist.destroy_process_group()
    logger.info("exiting (%d)", code)
    return code
