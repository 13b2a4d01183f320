"""What the controller and its ranks say to each other: typed messages, one ``encode``/``decode``.

Local ranks talk over an authenticated ``multiprocessing.connection`` (``send``/``receive``); ranks on other hosts
leave their ``Ready`` and ``Failure`` in the rendezvous store, in the same encoding (JSON: the store is not
authenticated, so nothing here is ever unpickled). A session call carries no tensor: the latents travel in
shared memory (``shared_latents.py``).
"""

from __future__ import annotations

import json
import traceback
from dataclasses import asdict, dataclass, field, fields
from multiprocessing.connection import Connection

from ..wanvideo.errors import WanDistriFusionError

AUTHKEY_ENV = "WAN_DISTRIFUSION_AUTHKEY"
"""Environment variable that carries the control connection's authkey (hex) to local ranks."""
EXIT_OK = 0
EXIT_FAILED = 1
"""A rank's exit code after it reported a ``Failure``."""
EXIT_CONTROLLER_GONE = 3
"""A rank's exit code when it lost the controller (its connection, its process or the rendezvous store)."""

# -- rank -> controller ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Hello:
    """A local rank's first message on its connection: who it is (matched against the process we started)."""

    rank: int
    pid: int


@dataclass(frozen=True)
class Ready:
    """A rank joined the group and loaded the weights."""

    rank: int
    pid: int
    host: str
    device: str
    device_name: str
    memory_bytes: int
    free_before_load: int
    total_memory: int
    model_config: dict
    comm_backend: str
    load_seconds: float
    weights: str = "replicated"
    """``replicated`` or ``sharded`` (``auto`` as this group resolved it)."""
    attention: str = ""
    """The attention kernel this rank runs (``auto`` resolved, e.g. ``flash4`` or ``sdpa``)."""
    compile: str = ""
    """``on``, ``off`` or ``off (why not on this rank)``: the ``compile`` request resolved on this device."""


@dataclass(frozen=True)
class Prediction:
    """Rank 0 wrote the flow of session call ``call`` into the shared latents."""

    session: int
    call: int
    seconds_per_step: float
    memory_per_rank: list[int]
    peak_per_rank: list[int]
    skipped: bool = False
    """The job's EasyCache skipped the model on every rank for this call."""
    notes: list[str] = field(default_factory=list)
    """EasyCache's verbose lines of this call on rank 0, for the controller's log."""


@dataclass(frozen=True)
class SessionEnded:
    """A rank left session ``session`` after ``calls`` calls (rank 0 adds its parallel model's statistics)."""

    session: int
    rank: int
    calls: int
    stats: dict = field(default_factory=dict)


@dataclass(frozen=True)
class DecodeProgress:
    """Rank 0 decoded latent frame ``chunk`` of ``total`` of VAE decode command ``session``."""

    session: int
    chunk: int
    total: int
    seconds: float


@dataclass(frozen=True)
class LorasApplied:
    """A rank merged the LoRA chains of command ``command`` into its weights: ``experts`` are the models whose chain
    changed (re-merged), the others were left alone."""

    command: int
    rank: int
    tensors: int
    seconds: float
    experts: tuple[int, ...] = ()


@dataclass(frozen=True)
class Failure:
    """A rank failed (then exits); ``phase`` is ``start``, ``session`` or ``serve``."""

    rank: int
    phase: str
    error: str
    traceback: str = ""
    step: int | None = None
    total: int | None = None
    user_error: bool = False
    out_of_memory: bool = False

    @classmethod
    def of(cls, rank: int, error: BaseException, phase: str, step: int | None, total: int | None) -> Failure:
        text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
        return cls(
            rank=rank,
            phase=phase,
            error=describe_error(error),
            traceback=text[-4000:],
            step=step,
            total=total,
            user_error=isinstance(error, WanDistriFusionError),
            out_of_memory="out of memory" in str(error).lower(),
        )


# -- controller -> rank 0 (forward, end) and every local rank (shutdown) -------------------------------


@dataclass(frozen=True)
class Forward:
    """Evaluate the flow at the shared latents' ``x`` and timestep ``t``: call ``call`` of session ``session``."""

    session: int
    call: int
    t: float


@dataclass(frozen=True)
class End:
    """End session ``session`` on every rank after the calls so far."""

    session: int


@dataclass(frozen=True)
class Shutdown:
    """Leave the serve loop and exit."""


@dataclass(frozen=True)
class ControllerGone:
    """Not sent: what a rank's inbox holds once the controller's connection reached EOF."""


Message = (
    Hello
    | Ready
    | Prediction
    | SessionEnded
    | DecodeProgress
    | LorasApplied
    | Failure
    | Forward
    | End
    | Shutdown
    | ControllerGone
)
_KINDS = {
    kind.__name__: kind
    for kind in (Hello, Ready, Prediction, SessionEnded, DecodeProgress, LorasApplied, Failure, Forward, End, Shutdown)
}


def encode(message: Message) -> bytes:
    return json.dumps({"kind": type(message).__name__, **asdict(message)}).encode()


def decode(data: bytes | str) -> Message:
    fields_ = json.loads(data)
    kind = _KINDS[fields_.pop("kind")]
    known = {f.name for f in fields(kind)}
    return kind(**{name: value for name, value in fields_.items() if name in known})


def send(conn: Connection, message: Message) -> None:
    """Send ``message``; ``OSError`` when the other side is gone."""
    conn.send_bytes(encode(message))


def receive(conn: Connection) -> Message:
    """The next message; ``EOFError``/``OSError`` when the other side is gone."""
    return decode(conn.recv_bytes())


def describe_error(error: BaseException) -> str:
    return "".join(traceback.format_exception_only(type(error), error)).strip()
