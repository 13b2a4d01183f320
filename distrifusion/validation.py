"""Everything about a run that can be checked before a worker starts, each failure naming the widget and the fix.

The ranks check the same things again when they build their ``ParallelWan`` (``attention.check_heads``,
``partition.partition_tokens``), but a failure there costs a group start (the weights loaded on every GPU) and
then the group itself. These checks need only the widgets, this machine and the checkpoint's headers:

    config = check_before_start(path, parallel, device="cuda", local_ranks=2)   # Loader / WorkerGroup.start
    check_job(config, parallel, job)                                          # Sampler / WorkerGroup.open_command
    check_guidance(parallel, job)                                             # Sampler / cli.py
    check_solver(job)                                                         # cli.py (the ranks' own sampler)
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..wanvideo.errors import WanDistriFusionError
from ..wanvideo.loading import inspect_wan_checkpoint
from ..wanvideo.model import WanConfig
from ..wanvideo.sampling import SAMPLERS, SCHEDULERS, sigma_schedule
from .attention import check_heads
from .config import ParallelConfig
from .job import GenerationJob, pixels_per_token
from .memory_plan import check_offload_host_memory
from .partition import partition_tokens
from .settings import RuntimeSpec

DEVICES = ("cuda", "cpu")


def visible_cuda_devices() -> int:
    """CUDA devices this process can use (0 without a CUDA build or driver)."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def check_devices(device: str, local_ranks: int, *, cuda_devices: int | None = None) -> None:
    """The GPUs asked for on this host exist (``cuda_devices``: the count to assume, default what torch sees)."""
    if device not in DEVICES:
        raise WanDistriFusionError(f"device: {device!r} is unknown; choose cuda or cpu.")
    if device != "cuda":
        return
    count = visible_cuda_devices() if cuda_devices is None else cuda_devices
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    where = f" (CUDA_VISIBLE_DEVICES={visible})" if visible is not None else ""
    if count == 0:
        raise WanDistriFusionError(
            f"GPUs: {local_ranks} requested on this host but no CUDA device is visible to this Python{where}; run "
            "on the CPU (device cpu, ComfyUI started with --cpu) or install a CUDA build of torch and check the driver."
        )
    if local_ranks > count:
        raise WanDistriFusionError(
            f"GPUs: {local_ranks} requested on this host but {count} CUDA device(s) are visible{where}; lower GPUs "
            f"to {count}, or raise world size above GPUs and start the other ranks on other hosts with "
            "`python cli.py worker`."
        )


def check_topology(parallel: ParallelConfig, local_ranks: int | None = None, first_rank: int = 0) -> int:
    """The parallel widgets agree with each other and with this host's ranks; returns the local rank count."""
    world = parallel.world_size
    if not 0 <= first_rank < world:
        raise WanDistriFusionError(
            f"rank: first rank {first_rank} is outside the world of {world} ranks; use 0 to {world - 1} (keep 0 on "
            "the host that runs ComfyUI)."
        )
    local_ranks = world - first_rank if local_ranks is None else local_ranks
    if local_ranks < 1:
        raise WanDistriFusionError(f"GPUs: {local_ranks} is out of range; use 1 to {world - first_rank}.")
    if local_ranks > world - first_rank:
        raise WanDistriFusionError(
            f"world size: {world} is smaller than this host's ranks {first_rank}..{first_rank + local_ranks - 1}; "
            f"set world size to at least {first_rank + local_ranks} (0 = GPUs) or lower GPUs."
        )
    return local_ranks


def check_model(model_path: str | os.PathLike, parallel: ParallelConfig) -> WanConfig:
    """The checkpoint is a readable Wan DiT (headers only) whose heads the parallel mode can split; its config."""
    config = inspect_wan_checkpoint(Path(model_path).expanduser()).config
    if parallel.world_size > 1:
        check_heads(parallel.mode, config.num_heads, parallel.patch_parallel_degree, parallel.cfg_parallel)
    return config


def check_before_start(
    model_path: str | os.PathLike,
    parallel: ParallelConfig,
    *,
    device: str = "cuda",
    local_ranks: int | None = None,
    first_rank: int = 0,
    cuda_devices: int | None = None,
    second_model_path: str | os.PathLike | None = None,
) -> WanConfig:
    """Everything a worker group needs that is known before it starts; returns the checkpoint's ``WanConfig``."""
    local_ranks = check_topology(parallel, local_ranks, first_rank)
    check_devices(device, local_ranks, cuda_devices=cuda_devices)
    config = check_model(model_path, parallel)
    if second_model_path is not None:
        check_experts(config, check_model(second_model_path, parallel))
    return config


def check_spec_before_start(spec: RuntimeSpec) -> WanConfig:
    """``check_before_start`` for a runtime's settings (the Loader's, and the worker group's before it launches)."""
    config = check_before_start(
        spec.model_path,
        spec.parallel,
        device=spec.device,
        local_ranks=spec.local_ranks,
        first_rank=spec.first_rank,
        second_model_path=spec.second_model_path,
    )
    if spec.offload:
        check_offload_host_memory(config, spec.precision, spec.quantization, spec.local_ranks, len(spec.model_paths))
    return config


EXPERT_SHAPE = ("dim", "ffn_dim", "num_heads", "num_layers", "in_dim", "out_dim", "text_dim", "model_type")


def check_experts(first: WanConfig, second: WanConfig) -> None:
    """``first`` / ``second`` are Wan 2.2 A14B's high- / low-noise experts of one release, in their slots (as far as
    the files say: ``WanConfig.version`` and ``expert``)."""
    if first.expert == "low_noise" or second.expert == "high_noise":
        slot, other = ("model", "second model") if first.expert == "low_noise" else ("second model", "model")
        wrong = first if slot == "model" else second
        raise WanDistriFusionError(
            f"{slot}: this file is {wrong.variant}; swap the files: the high-noise expert goes in model (it runs the "
            f"first, noisiest steps), the low-noise expert in {other if slot == 'model' else 'second model'}."
        )
    for slot, config in (("model", first), ("second model", second)):
        if config.version != "2.2" or config.per_frame_timesteps:
            raise WanDistriFusionError(
                f"{slot}: {config.variant} is not a Wan 2.2 A14B expert; a second model is only for Wan 2.2 A14B's "
                "high- and low-noise pair (e.g. wan2.2_t2v_high_noise_14B_fp8_scaled / ..._low_noise_...); set "
                "second model to none otherwise."
            )
    differ = [name for name in EXPERT_SHAPE if getattr(first, name) != getattr(second, name)]
    if differ:
        raise WanDistriFusionError(
            f"second model: {second.variant} does not match {first.variant} ({', '.join(differ)} differ); pick the "
            "two experts of one release (T2V with T2V, I2V with I2V)."
        )


def check_job(config: WanConfig, parallel: ParallelConfig, job: GenerationJob) -> None:
    """``job`` fits the model (conditioning width, latent channels) and the topology (every rank gets tokens)."""
    job.check_text_dim(config.text_dim)
    if job.latent is not None:
        shape = tuple(job.latent.shape)
        if len(shape) != 5 or shape[1] != config.out_dim:
            raise WanDistriFusionError(
                f"latent: expected [1, {config.out_dim}, frames, height/8, width/8], got {list(shape)}; connect a "
                "Wan 2.1 video latent (Empty Hunyuan/Wan latent or a Wan VAE encode)."
            )
    shape = job.latent_shape(config.out_dim)
    token_px = pixels_per_token(config)
    if job.latent is None:
        for widget, value, example in (("width", job.width, 1280), ("height", job.height, 704)):
            if value % token_px:
                raise WanDistriFusionError(
                    f"{widget}: {value} px is not a multiple of {token_px} px, the token size of {config.variant}; "
                    f"use e.g. {example} or {value - value % token_px}."
                )
    check_image_inputs(config, job, shape)
    grid = tuple(size // patch for size, patch in zip(shape[2:], config.patch_size))
    if min(grid) < 1:
        raise WanDistriFusionError(
            f"latent: {list(shape)} is smaller than one {config.patch_size} patch; use at least 16 x 16 pixels."
        )
    if parallel.world_size > 1:
        parallel = job.parallel_config(parallel)
        overlap = parallel.overlap_tokens(token_px) if parallel.mode == "displaced" else 0
        partition_tokens(
            grid, parallel.split_mode, parallel.patch_size, parallel.patch_parallel_degree, overlap, token_px
        )


def check_image_inputs(config: WanConfig, job: GenerationJob, shape: tuple[int, ...]) -> None:
    """The image-to-video channels (``y``) and CLIP tokens the job carries fit the model and the latent."""
    for prompt in ("positive", "negative"):
        y, clip_fea = getattr(job, f"{prompt}_y"), getattr(job, f"{prompt}_clip_fea")
        if prompt == "negative" and job.negative is None:
            continue
        expected = (1, config.concat_channels, *shape[2:])
        if config.concat_channels and (y is None or tuple(y.shape) != expected):
            got = "none" if y is None else list(y.shape)
            raise WanDistriFusionError(
                f"{prompt}: {config.variant} needs image channels {list(expected)} (mask + image latents), got "
                f"{got}; connect the prompts through WanImageToVideo (or WanFirstLastFrameToVideo)."
            )
        if not config.concat_channels and y is not None:
            raise WanDistriFusionError(
                f"{prompt}: image channels given, but {config.variant} takes none; use an image-to-video model."
            )
        if clip_fea is not None and (
            not config.clip_image or clip_fea.dim() != 3 or clip_fea.shape[-1] != config.image_dim
        ):
            raise WanDistriFusionError(
                f"{prompt}: CLIP vision features {list(clip_fea.shape)} do not fit {config.variant} (it takes "
                f"{'[1, tokens, ' + str(config.image_dim) + ']' if config.clip_image else 'none'}); connect CLIP Vision "
                "Encode (clip_vision_h) only for Wan 2.1 I2V / FLF2V."
            )
    if job.frame_denoise is not None:
        if not config.per_frame_timesteps or tuple(job.frame_denoise.shape) != (1, 1, shape[2], 1, 1):
            raise WanDistriFusionError(
                f"latent: a noise mask per frame {list(job.frame_denoise.shape)} does not fit {config.variant} and "
                f"the latent {list(shape)}; only Wan 2.2 TI2V 5B keeps an image frame (Wan22ImageToVideoLatent)."
            )


def check_guidance(parallel: ParallelConfig, job: GenerationJob, *, return_uncond: bool = False) -> None:
    """CFG parallel has work for both halves of the ranks: a negative prompt run beside the positive one.

    With cfg 1 (and no sampler that needs the unguided prediction, ``return_uncond``) or no negative prompt,
    each model call is one batch item, and the half that would run the negative prompt would sit idle.
    """
    if not parallel.cfg_parallel or parallel.world_size < 2:
        return
    if job.negative is None:
        why = "there is no negative prompt"
    elif job.cfg == 1.0 and not return_uncond:
        why = "cfg is 1, so the negative prompt is not run"
    else:
        return
    half = parallel.world_size // 2
    raise WanDistriFusionError(
        f"CFG parallel: {why}, and {half} of the {parallel.world_size} ranks would sit idle; set cfg above 1 with a "
        "negative prompt, or turn CFG parallel off (all ranks then split the video)."
    )


def check_solver(job: GenerationJob) -> None:
    """``job``'s sampler and scheduler are ones Wan's own solvers run (``cli.py``, ``run.run_job``)."""
    for setting, value, choices in (("sampler", job.sampler, SAMPLERS), ("scheduler", job.scheduler, SCHEDULERS)):
        if value not in choices:
            raise WanDistriFusionError(f"{setting}: {value!r} is unknown; choose one of {', '.join(choices)}.")
    sigma_schedule(job.scheduler, job.steps, job.shift, job.denoise)  # also refuses a denoise too small for the steps
