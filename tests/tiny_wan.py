"""Tiny Wan models and checkpoints for tests (2 layers, 64 wide: milliseconds on CPU).

    config = tiny_config(num_layers=1)                 # WanConfig with tiny defaults, any field overridable
    model = random_model(config, seed=0)               # WanModel with every parameter randomised
    write_checkpoint(tmp_path / "wan.safetensors", model, layout="comfyui", dtype=torch.bfloat16)
    loaded = load_wan_model(tmp_path / "wan.safetensors")

``write_checkpoint`` stores the head count as ``wan_config`` metadata (tiny widths are not multiples of
Wan's 128-wide heads, so the loader could not infer it); pass ``metadata=False`` to leave it out.
"""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor
from wan_distrifusion.distrifusion.job import GenerationJob
from wan_distrifusion.wanvideo import sampling
from wan_distrifusion.wanvideo.checkpoint_layout import COMFYUI_PREFIX, to_diffusers_key
from wan_distrifusion.wanvideo.model import WanConfig, WanModel

TINY = WanConfig(dim=64, ffn_dim=128, num_heads=4, num_layers=2, in_dim=4, out_dim=4, text_dim=32, freq_dim=32)
TINY_IMAGE_DIM = 32
"""CLIP feature width of tiny I2V models (t2v configs keep WanConfig's default, as the loader reports it)."""
LAYOUTS = ("original", "comfyui", "diffusers")


def tiny_config(**overrides) -> WanConfig:
    """A tiny WanConfig; ``model_type="i2v"`` also sets ``in_dim`` (noise + mask + image latents) and ``image_dim``."""
    if overrides.get("model_type") == "i2v":
        overrides.setdefault("in_dim", 2 * overrides.get("out_dim", TINY.out_dim) + 4)
        overrides.setdefault("image_dim", TINY_IMAGE_DIM)
    return replace(TINY, **overrides)


def random_model(config: WanConfig | None = None, seed: int = 0) -> WanModel:
    """A WanModel whose every parameter (norm weights and biases too) is random, so no term hides behind a 0 or 1."""
    generator = torch.Generator().manual_seed(seed)
    model = WanModel(config or tiny_config())
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    return model.eval().requires_grad_(False)


def write_checkpoint(
    path: str | Path,
    model_or_state: WanModel | dict[str, Tensor],
    layout: str = "original",
    dtype: torch.dtype | None = None,
    *,
    config: WanConfig | None = None,
    metadata: bool = True,
) -> Path:
    """Save original-layout weights as ``.safetensors`` in ``layout`` (original | comfyui | diffusers).

    ``dtype`` casts floating tensors; ``config`` (taken from the model when one is given) goes into the
    ``wan_config`` metadata unless ``metadata`` is False.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, not {layout!r}")
    if isinstance(model_or_state, WanModel):
        config = config or model_or_state.config
        state = model_or_state.state_dict()
    else:
        state = dict(model_or_state)
    tensors = {}
    for name, tensor in state.items():
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        key = {"original": name, "comfyui": COMFYUI_PREFIX + name, "diffusers": to_diffusers_key(name)}[layout]
        tensors[key] = tensor.detach().contiguous()
    info = None
    if metadata and config is not None:
        info = {
            "wan_config": json.dumps(
                {k: v for k, v in asdict(config).items() if k in ("num_heads", "eps", "dim", "version", "expert")}
            )
        }
    path = Path(path)
    save_file(tensors, str(path), metadata=info)
    return path


def relative_error(actual: Tensor, expected: Tensor) -> float:
    """``|actual - expected| / |expected|`` over the whole tensor, in fp64."""
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm() / expected.norm()).item()


def tiny_job(**overrides) -> GenerationJob:
    """The worker tests' job for tiny models: 64 x 48 px (3 token rows: an uneven split over 2 ranks), 5 frames,
    3 euler steps, CFG 5, seed 7, fixed random text contexts; any field overridable."""
    generator = torch.Generator().manual_seed(11)
    fields = dict(
        positive=torch.randn(1, 8, 32, generator=generator),
        negative=torch.randn(1, 8, 32, generator=generator),
        width=64,
        height=48,
        length=5,
        steps=3,
        cfg=5.0,
        seed=7,
        sampler="euler",
    )
    return GenerationJob(**{**fields, **overrides})


def drive_euler(runtime, job: GenerationJob, **session_kwargs) -> Tensor:
    """``job``'s euler run with the sampler here and every model call through a forward session (ComfyUI's path)."""
    sigmas = sampling.sigma_schedule(job.scheduler, job.steps, job.shift, job.denoise)
    noise = torch.randn(job.latent_shape(4), generator=torch.Generator("cpu").manual_seed(job.seed))
    with runtime.forward_session(job, **session_kwargs) as model:
        return sampling.sample_flow(lambda x, sigma: model(x, sigma * 1000), noise * sigmas[0], sigmas, "euler")


def sample_on_rank(model, config, rank: int, device, job: GenerationJob, callback=None) -> Tensor:
    """``job`` sampled on one rank of a test's process group, the sampler on every rank (each must call it): the
    parallel model checked without a controller (the product's jobs run the sampler on the controller)."""
    from wan_distrifusion.distrifusion.rank import job_model

    extra = dict(job.extra)
    return sampling.sample(
        job_model(model, config, rank, device, job),
        job.positive,
        job.negative,
        latent_shape=None if job.latent is not None else job.latent_shape(model.config.out_dim),
        latent=job.latent,
        seed=job.seed,
        steps=job.steps,
        cfg=job.cfg,
        shift=job.shift,
        sampler=job.sampler,
        scheduler=job.scheduler,
        denoise=job.denoise,
        callback=callback,
        device=device,
        model_kwargs=extra.pop("model_kwargs", None),
    )
