"""What one generation asks of the runtime: latents, conditioning and sampler settings, checked when built."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch

from ..wanvideo.errors import WanDistriFusionError
from ..wanvideo.model import WAN22_LATENT_CHANNELS, WanConfig
from ..wanvideo.step_cache import EasyCacheSettings
from .config import ModeChoice, ParallelConfig

VAE_STRIDE = 8
"""Pixels per latent row/column of the Wan 2.1 VAE (16 channels); the Wan 2.2 VAE (48 channels) has 16."""


def vae_stride(latent_channels: int) -> int:
    """Pixels per latent row/column of the VAE that makes ``latent_channels``-channel latents."""
    return 2 * VAE_STRIDE if latent_channels == WAN22_LATENT_CHANNELS else VAE_STRIDE


def pixels_per_token(config: WanConfig) -> int:
    """Video pixels per token row/column: the VAE's stride times the 2x2 patchify (16 for Wan 2.1, 32 for the 5B)."""
    return vae_stride(config.out_dim) * config.patch_size[1]


@dataclass(frozen=True)
class GenerationJob:
    """One clip. Tensors live on the CPU; every rank rebuilds the same noise from ``seed``. Frozen and checked
    when built (``with_changes`` makes a changed copy, checked again); ``check_text_dim`` is the one check that
    needs the model."""

    positive: torch.Tensor
    """Text context ``[1, L, text_dim]`` (the sampler pads it to 512 tokens)."""
    negative: torch.Tensor | None
    width: int = 832
    height: int = 480
    length: int = 81
    steps: int = 30
    cfg: float = 5.0
    shift: float = 5.0
    seed: int = 0
    sampler: str = "unipc"
    scheduler: str = "simple"
    denoise: float = 1.0
    sync_frequency: int = 0
    latent: torch.Tensor | None = None
    """Starting latent ``[1, C, F, H, W]`` (model space); ``None`` = empty latent of width/height/length."""
    positive_y: torch.Tensor | None = None
    """Image-to-video channels concatenated to the latent for the positive prompt ``[1, 4 + C, F, H, W]`` (mask and
    image latents, as ComfyUI's ``WAN21.concat_cond`` builds them); ``None`` for models without them."""
    negative_y: torch.Tensor | None = None
    positive_clip_fea: torch.Tensor | None = None
    """CLIP vision tokens ``[1, N, 1280]`` of the positive prompt (Wan 2.1 I2V / FLF2V ``img_emb``)."""
    negative_clip_fea: torch.Tensor | None = None
    expert: int = 0
    """Which of the group's models runs the job: 0 = the Loader's model (Wan 2.2 A14B: the high-noise expert), 1 = its
    second model (the low-noise expert), both loaded on every rank."""
    frame_denoise: torch.Tensor | None = None
    """TI2V 5B: each latent frame's mean denoise mask ``[1, 1, F, 1, 1]`` (0 = a kept image frame): its timestep is
    ``t`` times this (``wanvideo.sampling.frame_timesteps``)."""
    step_cache: EasyCacheSettings | None = None
    """ComfyUI's EasyCache settings (``wanvideo.step_cache``): skip model calls whose output barely changes, the same
    calls on every rank; ``None`` = every call runs the model."""
    mode_choice: ModeChoice | None = None
    """The parallel mode the job runs in and why, chosen once by the runtime that takes the job (``auto`` resolved
    with the memory plan, ``memory_plan.plan_job``); ``None`` until then."""
    extra: dict = field(default_factory=dict)

    def latent_shape(self, channels: int = 16) -> tuple[int, int, int, int, int]:
        if self.latent is not None:
            return tuple(self.latent.shape)
        stride = vae_stride(channels)
        return (1, channels, (self.length - 1) // 4 + 1, self.height // stride, self.width // stride)

    def model_kwargs(self, prompt: str) -> dict[str, torch.Tensor]:
        """The image inputs of ``prompt`` ("positive" / "negative") as the model takes them (``y``, ``clip_fea``)."""
        names = {"y": getattr(self, f"{prompt}_y"), "clip_fea": getattr(self, f"{prompt}_clip_fea")}
        return {name: value for name, value in names.items() if value is not None}

    def parallel_config(self, parallel: ParallelConfig) -> ParallelConfig:
        """``parallel`` in the mode this job runs in: the runtime's choice (``mode_choice``); before the runtime has
        chosen, a set mode as set and ``auto`` by the steps alone (``ParallelConfig.auto_choice``, no memory
        information: the runtime may still pick an exact mode where displaced does not fit)."""
        if self.mode_choice is not None:
            return replace(parallel, mode=self.mode_choice.mode)
        if parallel.mode == "auto":
            return replace(parallel, mode=parallel.auto_choice(self.steps, self.sync_frequency).mode)
        return parallel

    def with_changes(self, **changes) -> GenerationJob:
        return replace(self, **changes)

    def __post_init__(self) -> None:
        """Raise ``WanDistriFusionError`` naming the widget that cannot work."""
        if self.width % 16 or self.width < 16:
            raise WanDistriFusionError(f"width: {self.width} is not a positive multiple of 16; use e.g. 832 or 1280.")
        if self.height % 16 or self.height < 16:
            raise WanDistriFusionError(f"height: {self.height} is not a positive multiple of 16; use e.g. 480 or 720.")
        if self.length < 1 or (self.length - 1) % 4:
            raise WanDistriFusionError(
                f"length: {self.length} frames is not of the form 4k+1; use e.g. {4 * max(0, (self.length - 1) // 4) + 1} or 81."
            )
        if self.steps < 1:
            raise WanDistriFusionError(f"steps: {self.steps} must be at least 1.")
        if not (math.isfinite(self.cfg) and self.cfg >= 0):
            raise WanDistriFusionError(
                f"cfg: {self.cfg} must be a finite number, 0 or more; use e.g. 5.0 (1 turns the negative prompt off)."
            )
        if not (math.isfinite(self.shift) and self.shift > 0):
            raise WanDistriFusionError(
                f"shift: {self.shift} must be a finite number above 0; use about 3.0 for 480p and 5.0 for 720p."
            )
        if not 0.0 < self.denoise <= 1.0:
            raise WanDistriFusionError(f"denoise: {self.denoise} must be in (0, 1].")
        if self.expert not in (0, 1):
            raise WanDistriFusionError(f"expert: {self.expert} must be 0 (the Loader's model) or 1 (its second model).")
        if self.step_cache is not None and not isinstance(self.step_cache, EasyCacheSettings):
            raise WanDistriFusionError(
                f"easycache: expected EasyCache settings, got {type(self.step_cache).__name__}; connect the "
                "DistriFusion EasyCache node's model output."
            )
        if self.sync_frequency < 0:
            raise WanDistriFusionError(f"sync frequency: {self.sync_frequency} must be 0 (never) or more.")
        if self.mode_choice is not None and not isinstance(self.mode_choice, ModeChoice):
            raise WanDistriFusionError(f"mode choice: expected a ModeChoice, got {type(self.mode_choice).__name__}.")
        for name, cond in self._conditionings():
            if cond.dim() != 3 or cond.shape[0] != 1:
                raise WanDistriFusionError(f"{name}: conditioning must be [1, tokens, width], got {list(cond.shape)}.")

    def check_text_dim(self, text_dim: int) -> None:
        """The conditioning is as wide as the model's text input (``WanConfig.text_dim``)."""
        for name, cond in self._conditionings():
            if cond.shape[-1] != text_dim:
                raise WanDistriFusionError(
                    f"{name}: conditioning is {cond.shape[-1]} wide but the model expects {text_dim}; "
                    "encode the prompt with Wan's umT5 text encoder (Load CLIP, type wan)."
                )

    def _conditionings(self) -> list[tuple[str, torch.Tensor]]:
        return [
            (name, cond)
            for name, cond in (("positive", self.positive), ("negative", self.negative))
            if cond is not None
        ]
