"""Settings of a patch-parallel run: frozen, checked when built (errors name the setting), so holding one means
its values work."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..wanvideo.attention import ATTENTION_BACKENDS
from ..wanvideo.errors import WanDistriFusionError

SPLIT_MODES = ("spatial", "temporal", "spatiotemporal")
RUN_MODES = ("displaced", "sync", "ulysses")
"""The modes a job runs in; ``auto`` is resolved to one of them per job by the controller."""
PARALLEL_MODES = (*RUN_MODES, "auto")
AUTO_MIN_STALE_STEPS = 8
"""``auto`` runs a job displaced only when at least this many of its steps would use stale K/V; with fewer it runs
``sync`` (exact): at 4-8 steps the stale steps cost ~1e-2 of error and save ~2% of the run (README: Few steps)."""
KV_DTYPES = ("auto", "bf16", "fp16", "fp32", "fp8_e4m3fn")  # names of wanvideo.loading.DTYPES
COMM_BACKENDS = ("auto", "builtin", "official")
PIXELS_PER_TOKEN = 16
"""Wan: 8x VAE downsampling times the 2x2 patchify."""


@dataclass(frozen=True)
class ParallelConfig:
    """Topology and algorithm of one worker group (the Loader's parallel widgets)."""

    world_size: int = 1
    split_mode: str = "spatial"
    patch_size: int = 64
    """Granularity of the partition in pixels (multiple of 16): slabs are cut on these boundaries."""
    patch_overlap: int = 0
    """Pixels of neighbouring tokens each rank recomputes fresh in the displaced mode (0 = pure DistriFusion)."""
    mode: str = "displaced"
    cfg_parallel: bool = False
    warmup_steps: int = 4
    kv_dtype: str = "auto"
    comm_backend: str = "auto"
    attention_backend: str = "auto"
    """Kernel for attention (``wanvideo.attention.ATTENTION_BACKENDS``); auto = FlashAttention-4 when installed."""
    compile_blocks: bool = False
    """``torch.compile`` the blocks around attention where the rank's device can (a CUDA GPU with Triton; eager
    elsewhere, see ``rank.compile_choice``): the first call of a new shape slower, later ones faster. The Loader and
    the CLI ask for it by default; ``False`` here, so benches and tests that build a config run eager unless they
    say otherwise."""

    def __post_init__(self) -> None:
        """Raise ``WanDistriFusionError`` naming the first setting that cannot work."""
        if not 1 <= self.world_size <= 64:
            _fail("world size", f"{self.world_size} is out of range", "use 1 to 64 ranks")
        if self.split_mode not in SPLIT_MODES:
            _fail("split mode", f"{self.split_mode!r} is unknown", f"choose one of {', '.join(SPLIT_MODES)}")
        if self.mode not in PARALLEL_MODES:
            _fail("parallel mode", f"{self.mode!r} is unknown", f"choose one of {', '.join(PARALLEL_MODES)}")
        if self.patch_size < PIXELS_PER_TOKEN or self.patch_size % PIXELS_PER_TOKEN:
            _fail(
                "patch size",
                f"{self.patch_size} px is not a positive multiple of {PIXELS_PER_TOKEN}",
                f"use a multiple of {PIXELS_PER_TOKEN} px (Wan: 8x VAE x 2x2 patchify), e.g. 32, 48 or 64",
            )
        if not 0 <= self.patch_overlap <= 32:
            _fail("patch overlap", f"{self.patch_overlap} px is out of range", "use 0 to 32 px")
        if self.patch_overlap > self.patch_size:
            _fail(
                "patch overlap",
                f"{self.patch_overlap} px is larger than the patch size ({self.patch_size} px)",
                "lower the overlap or raise the patch size",
            )
        if self.warmup_steps < 0:
            _fail("warm-up steps", f"{self.warmup_steps} is negative", "use 0 or more")
        if self.kv_dtype not in KV_DTYPES:
            _fail("K/V buffer dtype", f"{self.kv_dtype!r} is unknown", f"choose one of {', '.join(KV_DTYPES)}")
        if self.comm_backend not in COMM_BACKENDS:
            _fail("comm backend", f"{self.comm_backend!r} is unknown", f"choose one of {', '.join(COMM_BACKENDS)}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            _fail(
                "attention backend",
                f"{self.attention_backend!r} is unknown",
                f"choose one of {', '.join(ATTENTION_BACKENDS)}",
            )
        if self.cfg_parallel and self.world_size % 2:
            _fail(
                "CFG parallel",
                f"needs an even world size, got {self.world_size}",
                "use an even number of GPUs or turn CFG parallel off",
            )

    @property
    def patch_parallel_degree(self) -> int:
        """Ranks that share one batch item's tokens (half the world with CFG parallel)."""
        return self.world_size // 2 if self.cfg_parallel else self.world_size

    def overlap_tokens(self, pixels_per_token: int = PIXELS_PER_TOKEN) -> int:
        """The overlap in whole tokens of ``pixels_per_token`` px (16 for Wan 2.1, 32 for Wan 2.2 TI2V 5B)."""
        return -(-self.patch_overlap // pixels_per_token)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ParallelConfig:
        return cls(**data)

    def auto_choice(self, steps: int, sync_frequency: int = 0) -> ModeChoice:
        """What ``auto`` picks for a job of ``steps`` model calls by its steps alone (no memory information):
        ``sync`` when too few steps would use stale K/V to pay for the displaced mode's error, else ``displaced``.
        The controller refines it with the memory plan (``memory_plan.plan_job``)."""
        if self.patch_parallel_degree == 1:
            return ModeChoice("sync", "no tokens are split over ranks: nothing to exchange")
        schedule = self.schedule(sync_frequency)
        stale = sum(not schedule.is_synchronous(step) for step in range(steps))
        if stale < AUTO_MIN_STALE_STEPS:
            return ModeChoice(
                "sync",
                f"{stale} of {steps} steps would use stale K/V, fewer than {AUTO_MIN_STALE_STEPS}: exact costs ~2% "
                "more time and no error",
            )
        return ModeChoice(
            "displaced",
            f"{stale} of {steps} steps would use stale K/V, at least {AUTO_MIN_STALE_STEPS}: displaced hides the "
            "exchange behind each step",
        )

    def schedule(self, sync_frequency: int) -> DisplacedSchedule:
        """The displaced mode's schedule of a job: this config's warm-up and the job's (Sampler's) sync frequency."""
        return DisplacedSchedule(self.warmup_steps, sync_frequency)


@dataclass(frozen=True)
class ModeChoice:
    """The parallel mode one job runs in and why: ``auto`` resolved once by the controller (``GenerationJob.mode_choice``
    carries it to every rank, so none decides again)."""

    mode: str
    reason: str

    def __post_init__(self) -> None:
        if self.mode not in RUN_MODES:
            _fail("parallel mode", f"a job runs {', '.join(RUN_MODES)}, not {self.mode!r}", "resolve auto first")


@dataclass(frozen=True)
class DisplacedSchedule:
    """Which steps of the displaced mode exchange fresh K/V (synchronous) instead of using the stale K/V.

    The first ``warmup_steps`` steps are synchronous (as distrifuser); after that every ``sync_frequency``-th step
    is (1 = every step = exact; 0 = never after warm-up).
    """

    warmup_steps: int = 4
    sync_frequency: int = 0

    def __post_init__(self) -> None:
        if self.warmup_steps < 0:
            _fail("warm-up steps", f"{self.warmup_steps} is negative", "use 0 or more")
        if self.sync_frequency < 0:
            _fail("sync frequency", f"{self.sync_frequency} must be 0 (never) or more", "use 0, 1, 2, ...")

    def is_synchronous(self, step: int) -> bool:
        """Whether ``step`` (0-based) exchanges fresh K/V before attention."""
        if step < self.warmup_steps:
            return True
        return self.sync_frequency > 0 and (step - self.warmup_steps + 1) % self.sync_frequency == 0


def is_synchronous_step(step: int, warmup_steps: int, sync_frequency: int) -> bool:
    """``DisplacedSchedule(warmup_steps, sync_frequency).is_synchronous(step)``."""
    return DisplacedSchedule(warmup_steps, sync_frequency).is_synchronous(step)


def _fail(setting: str, problem: str, fix: str) -> None:
    raise WanDistriFusionError(f"{setting}: {problem}; {fix}.")
