"""The rendezvous store (torch ``TCPStore`` at ``MASTER_ADDR:MASTER_PORT``, hosted by the controller of rank 0)
and what goes through it: the group's ``RuntimeSpec`` (``group``), numbered commands ``cmd/<n>`` that every rank
reads (local or on another host), each rank's ``ready/<rank>`` / ``error/<rank>`` (``wire`` messages) and its
heartbeat ``alive/<rank>`` (a counter it adds 1 to every second). The store is not authenticated: its payloads
are JSON + safetensors, never pickle.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from ..wanvideo.errors import WanDistriFusionError
from ..wanvideo.lora import LoraFile
from ..wanvideo.step_cache import EasyCacheSettings
from .config import ModeChoice
from .job import GenerationJob

STORE_PREFIX = "wan_distrifusion/"
PG_STORE_PREFIX = "process_group/"
STORE_CHUNK_BYTES = 4 << 20
"""TCPStore refuses values over 8 MiB; larger payloads are split into chunks."""
STORE_WATCH_S = 1.0
"""Every rank adds 1 to ``alive/<rank>`` in the store this often: its heartbeat, and its check that the store is there."""
STORE_LOST_S = 30.0
"""A rank whose store round-trip has not come back for this long exits (a cut link leaves the TCP connection
hanging instead of failing it); ``cli.py worker`` then waits for the next group. Override with ``STORE_LOST_ENV``."""
STORE_LOST_ENV = "WAN_DISTRIFUSION_STORE_LOST_S"


# -- commands ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OpenSession:
    """Command: serve a forward session for ``job``'s conditioning at latents of ``shape``.

    ``latents`` is the shared-memory file that the ranks in ``latents_ranks`` (the controller's host) map; the
    others get ``x`` broadcast from rank 0.
    """

    session: int
    job: GenerationJob
    shape: tuple[int, ...]
    return_uncond: bool
    latents: str
    latents_ranks: tuple[int, ...]


@dataclass(frozen=True)
class DecodeVAE:
    """Command: decode ``latent`` with the VAE decoder whose weights are under ``vae/<weights>`` in the store
    (read once per rank, then kept), in ``dtype``; rows split over the ranks, every rank writing its rows of
    the pixels into the shared file ``output`` (``vae_session.py``)."""

    session: int
    weights: str
    dtype: str
    latent: torch.Tensor
    output: str


@dataclass(frozen=True)
class StopServing:
    """Command: leave the serve loop and exit."""


@dataclass(frozen=True)
class ApplyLoras:
    """Command: make these the LoRA chains merged into the loaded weights, one per model (Wan 2.2 A14B: high-noise
    expert, low-noise expert; ``()``: none); a model whose chain changed re-merges from its unmodified weights."""

    chains: tuple[tuple[LoraFile, ...], ...]


def encode_command(command: OpenSession | DecodeVAE | StopServing | ApplyLoras) -> bytes:
    """A command as a store payload: the job's tensors (and tensors in ``job.extra``) by value, the rest as JSON."""
    if isinstance(command, StopServing):
        return encode_payload({"kind": "StopServing"})
    if isinstance(command, ApplyLoras):
        chains = [[dataclasses.asdict(lora) for lora in chain] for chain in command.chains]
        return encode_payload({"kind": "ApplyLoras", "chains": chains})
    if isinstance(command, DecodeVAE):
        header = {"kind": "DecodeVAE", "session": command.session, "weights": command.weights}
        header.update(dtype=command.dtype, output=command.output)
        return encode_payload(header, {"latent": command.latent})
    header, tensors = encode_job(command.job)
    header.update(
        kind="OpenSession",
        session=command.session,
        shape=list(command.shape),
        return_uncond=command.return_uncond,
        latents=command.latents,
        latents_ranks=list(command.latents_ranks),
    )
    return encode_payload(header, tensors)


def decode_command(data: bytes) -> OpenSession | DecodeVAE | StopServing | ApplyLoras:
    header, tensors = decode_payload(data)
    if header["kind"] == "StopServing":
        return StopServing()
    if header["kind"] == "ApplyLoras":
        return ApplyLoras(tuple(tuple(LoraFile(**lora) for lora in chain) for chain in header["chains"]))
    if header["kind"] == "DecodeVAE":
        fields = ("session", "weights", "dtype", "output")
        return DecodeVAE(**{name: header[name] for name in fields}, latent=tensors["latent"])
    return OpenSession(
        session=header["session"],
        job=decode_job(header, tensors),
        shape=tuple(header["shape"]),
        return_uncond=header["return_uncond"],
        latents=header["latents"],
        latents_ranks=tuple(header["latents_ranks"]),
    )


def encode_job(job: GenerationJob) -> tuple[dict, dict[str, torch.Tensor]]:
    """``job`` as a JSON header (``fields``, ``extra``) and its tensors."""
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
        elif isinstance(value, EasyCacheSettings):
            fields[field.name] = value.to_dict()
        elif isinstance(value, ModeChoice):
            fields[field.name] = dataclasses.asdict(value)
        else:
            fields[field.name] = _json_value(f"job.{field.name}", value)
    return {"fields": fields, "extra": extra}, tensors


def decode_job(header: dict, tensors: dict[str, torch.Tensor]) -> GenerationJob:
    kwargs = dict(header["fields"])
    if kwargs.get("step_cache") is not None:
        kwargs["step_cache"] = EasyCacheSettings(**kwargs["step_cache"])
    if kwargs.get("mode_choice") is not None:
        kwargs["mode_choice"] = ModeChoice(**kwargs["mode_choice"])
    extra = dict(header.get("extra", {}))
    for name, tensor in tensors.items():
        if name.startswith("extra."):
            extra[name[len("extra.") :]] = tensor
        else:
            kwargs[name] = tensor
    return GenerationJob(**kwargs, extra=extra)


# -- payloads: a JSON header plus safetensors ----------------------------------------------------------


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


def _json_value(name: str, value):
    try:
        json.dumps(value)
    except TypeError as error:
        raise WanDistriFusionError(
            f"{name}: {type(value).__name__} cannot be sent to the workers; use tensors, numbers, strings, lists or dicts."
        ) from error
    return value


# -- the store ----------------------------------------------------------------------------------------


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
