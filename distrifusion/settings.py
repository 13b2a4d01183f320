"""The runtime's settings as one frozen object, checked when built: what the Loader or ``cli.py`` asks for, the
same object the runtime, the rendezvous store (``to_json``) and every rank (``from_json``) hold."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from ..wanvideo.errors import WanDistriFusionError
from ..wanvideo.loading import PRECISIONS, resolve_quantization
from ..wanvideo.lora import LoraFile
from .config import ParallelConfig
from .sharded_weights import WEIGHTS

DEVICES = ("cuda", "cpu")
REMOTE_HEARTBEAT_TIMEOUT_S = 10.0
"""A ready rank on another host whose heartbeat (``alive/<rank>``, counted every second) stood still this long
fails the job: the link is cut or the host is down (a cut link stalls the collectives without an error)."""


def check_weights(weights: str, world_size: int) -> None:
    """The ``weights`` setting against the group's size (``cli.py`` checks it before reading the model)."""
    if weights not in WEIGHTS:
        raise WanDistriFusionError(
            f"weights: {weights!r} is unknown; choose replicated, sharded (each GPU stores 1/N of the model) or auto."
        )
    if weights == "sharded" and world_size < 2:
        raise WanDistriFusionError(
            "weights: sharded weights need 2 or more GPUs (one GPU holds the whole model); set GPUs to 2 or more, "
            "or weights to replicated or auto."
        )


@dataclass(frozen=True)
class RuntimeSpec:
    """One runtime: the checkpoint, its precision, the parallel topology and where this host's ranks run.

    ``local_ranks`` ``None`` means every rank from ``first_rank`` on (resolved when built). A group with
    ``first_rank > 0`` runs on another host and joins the controller's rendezvous at ``master_addr:master_port``.
    """

    model_path: str
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    precision: str = "fp32"
    quantization: str = "disabled"
    device: str = "cuda"
    local_ranks: int | None = None
    first_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int | None = None
    step_timeout_s: float = 600.0
    """How long a step (one model call on every rank) may take before the ranks count as hung."""
    start_timeout_s: float = 600.0
    remote_timeout_s: float = REMOTE_HEARTBEAT_TIMEOUT_S
    """How long a ready rank on another host may go without a heartbeat before the job fails."""
    threads_per_rank: int | None = None
    """CPU threads per rank (default on CPU: the cores shared out over the local ranks)."""
    loras: tuple[LoraFile, ...] = ()
    """The LoRA chain every rank merges into ``model_path``'s weights after loading; a change re-merges on the
    running ranks (no restart)."""
    second_model_path: str | None = None
    """Wan 2.2 A14B: the low-noise expert, loaded beside ``model_path`` (the high-noise one) on the same ranks, so a
    job picks either (``GenerationJob.expert``) without a reload."""
    weights: str = "auto"
    """``replicated`` (every rank a full copy), ``sharded`` (each rank 1/N of every block, gathered around the
    block; ``sharded_weights.py``) or ``auto`` (sharded when the ranks' GPUs cannot hold a full copy)."""
    offload: bool = False
    """Keep the transformer blocks in pinned host memory and stream them to the GPU ahead of use
    (``wanvideo/offload.py``): each rank holds only a ring of two blocks on its device."""
    second_loras: tuple[LoraFile, ...] = ()
    """The second model's own LoRA chain (Wan 2.2's 4-step LoRAs come as a high-noise and a low-noise file)."""

    def __post_init__(self) -> None:
        world = self.parallel.world_size
        if self.precision not in PRECISIONS:
            raise WanDistriFusionError(
                f"precision: {self.precision!r} is unknown; choose one of {', '.join(PRECISIONS)}."
            )
        resolve_quantization(self.quantization)
        check_weights(self.weights, world)
        if self.device not in DEVICES:
            raise WanDistriFusionError(f"device: {self.device!r} is unknown; choose cuda or cpu.")
        if not 0 <= self.first_rank < world:
            raise WanDistriFusionError(
                f"rank: first rank {self.first_rank} is outside the world of {world} ranks; use 0 to {world - 1}."
            )
        local = world - self.first_rank if self.local_ranks is None else self.local_ranks
        if not 1 <= local <= world - self.first_rank:
            raise WanDistriFusionError(
                f"GPUs: {local} local ranks starting at rank {self.first_rank} do not fit a world of {world}; "
                f"use 1 to {world - self.first_rank}."
            )
        if self.first_rank > 0 and not self.master_port:
            raise WanDistriFusionError("master port: ranks on another host need the controller's master port.")
        path = Path(self.model_path).expanduser().resolve()
        if not path.exists():
            raise WanDistriFusionError(f"model: {path} does not exist; pick a Wan checkpoint (.safetensors).")
        if not float(self.remote_timeout_s) > 0:
            raise WanDistriFusionError(
                f"remote timeout: {self.remote_timeout_s!r} s is not positive; use about 10 s (the ranks beat every "
                "second)."
            )
        object.__setattr__(self, "model_path", str(path))
        for name in ("loras", "second_loras"):
            chain = tuple(x if isinstance(x, LoraFile) else LoraFile(**x) for x in getattr(self, name))
            object.__setattr__(self, name, chain)
        if self.second_model_path is not None:
            second = Path(self.second_model_path).expanduser().resolve()
            if not second.exists():
                raise WanDistriFusionError(f"second model: {second} does not exist; pick the low-noise expert file.")
            object.__setattr__(self, "second_model_path", str(second))
        elif self.second_loras:
            raise WanDistriFusionError(
                "second lora: a LoRA chain for the second model, but there is no second model; pick the low-noise "
                "expert in second model (Wan 2.2 A14B) or connect the chain to the lora input."
            )
        if not isinstance(self.offload, bool):
            raise WanDistriFusionError(f"offload: {self.offload!r} is not true or false; use true or false.")
        if self.offload and self.weights == "sharded":
            raise WanDistriFusionError(
                "offload: streamed blocks and sharded weights are two answers to one problem and do not combine; "
                "turn offload off (sharded weights over fast links) or set weights to replicated or auto."
            )
        object.__setattr__(self, "local_ranks", local)
        for name in ("step_timeout_s", "start_timeout_s", "remote_timeout_s"):
            object.__setattr__(self, name, float(getattr(self, name)))

    @property
    def world_size(self) -> int:
        return self.parallel.world_size

    @property
    def model_paths(self) -> tuple[str, ...]:
        """The checkpoints every rank holds, in ``GenerationJob.expert`` order."""
        return (self.model_path,) if self.second_model_path is None else (self.model_path, self.second_model_path)

    @property
    def expert_loras(self) -> tuple[tuple[LoraFile, ...], ...]:
        """Each model's LoRA chain, in ``model_paths`` order."""
        return (self.loras,) if self.second_model_path is None else (self.loras, self.second_loras)

    def with_expert_loras(self, chains) -> RuntimeSpec:
        """A copy whose models take ``chains`` (one chain per model, in ``model_paths`` order)."""
        chains = tuple(tuple(chain) for chain in chains)
        if len(chains) != len(self.model_paths):
            raise WanDistriFusionError(
                f"lora: {len(chains)} LoRA chains for {len(self.model_paths)} model(s); give one chain per model."
            )
        return self.with_changes(loras=chains[0], second_loras=chains[1] if len(chains) > 1 else ())

    @property
    def is_leader(self) -> bool:
        """Whether this host runs rank 0 (hosts the rendezvous and drives the jobs)."""
        return self.first_rank == 0

    @property
    def local_rank_ids(self) -> range:
        return range(self.first_rank, self.first_rank + self.local_ranks)

    def with_changes(self, **changes) -> RuntimeSpec:
        """A copy with ``changes`` (checked again)."""
        return replace(self, **changes)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str, **changes) -> RuntimeSpec:
        """The spec ``to_json`` wrote, with ``changes`` (a rank on another host: its own model path and device)."""
        data = json.loads(text)
        data["parallel"] = ParallelConfig(**data["parallel"])
        return cls(**{**data, **changes})
