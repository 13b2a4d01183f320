"""🎯 Official DistriFusion Sampler: native CONDITIONING/LATENT in, ComfyUI's Wan LATENT out.

The sampler math is ComfyUI's own (``comfy_sampling``): KSampler's sigmas, noise and samplers run here,
in the ComfyUI process; each model call goes to the workers through the runtime's forward session.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace

import torch

from ..distrifusion.job import GenerationJob, vae_stride
from ..distrifusion.validation import check_guidance, check_job, check_model
from ..wanvideo.errors import WanDistriFusionError
from ..wanvideo.model import WanConfig
from . import _comfy, comfy_memory, comfy_sampling, wan_conditioning
from ._widgets import combo_widget, float_widget, int_widget, socket
from .loader import CATEGORY
from .runtime import MODEL_TYPE, RUNTIMES

logger = logging.getLogger(__name__)

DEFAULT_SAMPLER = "uni_pc"
"""What ComfyUI's own Wan 2.1 templates sample with."""
MAX_SIZE = 4096
MAX_LENGTH = 1025


TOOLTIPS = {
    "model": "The worker group from the DistriFusion Model Loader. Its first output with a second model loaded (Wan 2.2 "
    "A14B) runs both experts, switching where Wan 2.2 does: at t = 875 (text-to-video) or 900 (image-to-video), as two "
    "KSamplerAdvanced split at that step.",
    "positive": "What the video should show: CLIP Text Encode with a Load CLIP of type wan (umT5).",
    "negative": "What to avoid; used when cfg is not 1 (one batched model call per step).",
    "steps": "Denoising steps, as KSampler counts them. Each model call runs on every rank; most samplers make one "
    "per step (heun, dpm_2 and the 2s/sde variants make two).",
    "cfg": "Classifier-free guidance scale; 1 skips the negative prompt (half the compute).",
    "shift": "Flow-matching timestep shift, exactly as the native ModelSamplingSD3 node's: Wan uses about 3 for 480p "
    "and 5 for 720p; higher spends more steps at high noise.",
    "seed": "Seed of the starting noise, drawn as KSampler draws it (same seed, same noise).",
    "sampler": "KSampler's samplers (euler, uni_pc, dpmpp_2m, ...), run by ComfyUI's own code with the model calls "
    "on the workers: the same result as native KSampler with ModelSamplingSD3(shift). Plus unipc and dpm++: Wan's "
    "reference solvers with their own schedules (diffusers' UniPC and DPM-Solver++ 2M, as the official Wan code and "
    "`cli.py generate`), which differ from ComfyUI's uni_pc and dpmpp_2m.",
    "scheduler": "How the sigmas are spaced over the steps, computed as KSampler does (ComfyUI's Wan templates use "
    "simple).",
    "denoise": "1 = from pure noise; below 1 keeps that much of the input latent (video-to-video).",
    "width": "Video width in pixels, a multiple of 16. Ignored when a latent is connected.",
    "height": "Video height in pixels, a multiple of 16. Ignored when a latent is connected.",
    "length": "Frames, of the form 4k+1 (Wan's VAE packs 4 frames per latent frame). Ignored when a latent is "
    "connected.",
    "sync_frequency": "Displaced mode: after warm-up, every k-th step does a full synchronous K/V exchange that "
    "refreshes the stale K/V (1 = every step = exact; 0 = never, pure DistriFusion). No effect in the sync and "
    "ulysses modes.",
    "latent": "Optional starting latent (Empty Hunyuan Latent Video, or a VAE-encoded video with denoise < 1); its "
    "size overrides width/height/length.",
}


class OfficialDistriFusionSampler:
    """Runs one clip on the Loader's worker group; all ranks stop together on Cancel."""

    @classmethod
    def INPUT_TYPES(cls):
        tip = TOOLTIPS
        return {
            "required": {
                "model": socket(MODEL_TYPE, tip["model"]),
                "positive": socket("CONDITIONING", tip["positive"]),
                "negative": socket("CONDITIONING", tip["negative"]),
                "steps": int_widget(30, 1, 10000, tip["steps"]),
                "cfg": float_widget(5.0, 0.0, 100.0, 0.1, tip["cfg"], round=0.01),
                "shift": float_widget(5.0, 0.0, 100.0, 0.01, tip["shift"]),
                "seed": int_widget(0, 0, 0xFFFFFFFFFFFFFFFF, tip["seed"], control_after_generate=True),
                "sampler": combo_widget(
                    _comfy.sampler_names(comfy_sampling.WAN_SOLVERS), DEFAULT_SAMPLER, tip["sampler"]
                ),
                "scheduler": combo_widget(_comfy.scheduler_names(), "simple", tip["scheduler"]),
                "denoise": float_widget(1.0, 0.01, 1.0, 0.01, tip["denoise"]),
                "width": int_widget(832, 16, MAX_SIZE, tip["width"], step=16),
                "height": int_widget(480, 16, MAX_SIZE, tip["height"], step=16),
                "length": int_widget(81, 1, MAX_LENGTH, tip["length"], step=4),
                "sync_frequency": int_widget(0, 0, 1000, tip["sync_frequency"]),
            },
            "optional": {"latent": socket("LATENT", tip["latent"])},
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    RETURN_TYPES = ("LATENT",)
    OUTPUT_TOOLTIPS = (
        "The denoised video latent in ComfyUI's Wan format (Wan 2.2 5B: 48 channels): connect VAE Decode.",
    )
    FUNCTION = "sample"
    CATEGORY = CATEGORY
    DESCRIPTION = (
        "Samples a Wan 2.1 / 2.2 video (text-to-video, or image-to-video from WanImageToVideo, WanFirstLastFrameToVideo "
        "or Wan22ImageToVideoLatent) with DistriFusion patch parallelism across the Loader's GPUs."
    )

    def sample(
        self,
        model,
        positive,
        negative,
        steps,
        cfg,
        shift,
        seed,
        sampler,
        scheduler,
        denoise,
        width,
        height,
        length,
        sync_frequency,
        latent=None,
        unique_id=None,
    ):
        settings = dict(
            steps=steps,
            cfg=cfg,
            shift=shift,
            seed=seed,
            sampler=sampler,
            scheduler=scheduler,
            denoise=denoise,
            size=(width, height, length),
            sync_frequency=sync_frequency,
            unique_id=unique_id,
        )
        if model.expert == 0 and model.settings.second_model is not None:
            return sample_two_experts(model, positive, negative, latent, **settings)
        return sample_video(model, positive, negative, latent, StepRange(), **settings)


ADVANCED_TOOLTIPS = {
    "add_noise": "enable: start from fresh noise of noise_seed, as KSamplerAdvanced. disable: continue a latent that "
    "still holds noise (the second expert's Sampler after one that returned with leftover noise).",
    "start_at_step": "First step of the schedule to run (KSamplerAdvanced's start_at_step): the low-noise expert "
    "starts where the high-noise one stopped (10 of 20 in ComfyUI's Wan 2.2 A14B templates, 2 of 4 with the "
    "4-step LoRAs).",
    "end_at_step": "Step to stop at (10000 = the end), as KSamplerAdvanced.",
    "return_with_leftover_noise": "enable: stop at end_at_step with the noise that is left (for a second Sampler to "
    "continue); disable: denoise fully at end_at_step.",
}


class OfficialDistriFusionSamplerAdvanced:
    """KSamplerAdvanced on the Loader's worker group: part of a schedule, for Wan 2.2 A14B's two experts."""

    @classmethod
    def INPUT_TYPES(cls):
        tip, adv = TOOLTIPS, ADVANCED_TOOLTIPS
        return {
            "required": {
                "model": socket(MODEL_TYPE, tip["model"] + " The Loader's second output runs its second model."),
                "add_noise": combo_widget(["enable", "disable"], "enable", adv["add_noise"]),
                "noise_seed": int_widget(0, 0, 0xFFFFFFFFFFFFFFFF, tip["seed"], control_after_generate=True),
                "steps": int_widget(20, 1, 10000, tip["steps"]),
                "cfg": float_widget(3.5, 0.0, 100.0, 0.1, tip["cfg"], round=0.01),
                "sampler_name": combo_widget(_comfy.sampler_names(comfy_sampling.WAN_SOLVERS), "euler", tip["sampler"]),
                "scheduler": combo_widget(_comfy.scheduler_names(), "simple", tip["scheduler"]),
                "positive": socket("CONDITIONING", tip["positive"]),
                "negative": socket("CONDITIONING", tip["negative"]),
                "latent_image": socket("LATENT", tip["latent"]),
                "start_at_step": int_widget(0, 0, 10000, adv["start_at_step"]),
                "end_at_step": int_widget(10000, 0, 10000, adv["end_at_step"]),
                "return_with_leftover_noise": combo_widget(
                    ["disable", "enable"], "disable", adv["return_with_leftover_noise"]
                ),
                "shift": float_widget(8.0, 0.0, 100.0, 0.01, tip["shift"]),
                "sync_frequency": int_widget(0, 0, 1000, tip["sync_frequency"]),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    RETURN_TYPES = ("LATENT",)
    OUTPUT_TOOLTIPS = ("The latent after end_at_step (with its leftover noise when asked): the next Sampler's input.",)
    FUNCTION = "sample"
    CATEGORY = CATEGORY
    DESCRIPTION = (
        "KSamplerAdvanced with DistriFusion patch parallelism: runs steps start..end of the schedule on the Loader's "
        "GPUs. Two of them on a Loader's two outputs are Wan 2.2 A14B's high- and low-noise experts, as in "
        "ComfyUI's templates."
    )

    def sample(
        self,
        model,
        add_noise,
        noise_seed,
        steps,
        cfg,
        sampler_name,
        scheduler,
        positive,
        negative,
        latent_image,
        start_at_step,
        end_at_step,
        return_with_leftover_noise,
        shift,
        sync_frequency,
        unique_id=None,
    ):
        for widget, value in (("add_noise", add_noise), ("return_with_leftover_noise", return_with_leftover_noise)):
            if value not in ("enable", "disable"):
                raise WanDistriFusionError(f"{widget}: {value!r} is unknown; choose enable or disable.")
        steps_range = StepRange(
            start=start_at_step,
            end=end_at_step,
            add_noise=add_noise == "enable",
            leftover_noise=return_with_leftover_noise == "enable",
        )
        return sample_video(
            model,
            positive,
            negative,
            latent_image,
            steps_range,
            steps=steps,
            cfg=cfg,
            shift=shift,
            seed=noise_seed,
            sampler=sampler_name,
            scheduler=scheduler,
            denoise=1.0,
            size=(832, 480, 81),  # the latent's size decides
            sync_frequency=sync_frequency,
            unique_id=unique_id,
        )


EXPERT_BOUNDARY = {"t2v": 0.875, "i2v": 0.9}
"""Wan 2.2 A14B's switch from the high- to the low-noise expert, as a fraction of the timesteps (Wan's
``boundary``): the high-noise expert runs the steps whose sigma is at least this."""


def sample_two_experts(model, positive, negative, latent, **settings) -> tuple[dict]:
    """Wan 2.2 A14B in one node: the Loader's model (high-noise expert) for the steps at or above Wan 2.2's boundary,
    then its second model (low-noise expert) for the rest, exactly as two KSamplerAdvanced split at that step."""
    spec = model.settings.spec
    config = check_model(model.model_path, spec.parallel)
    boundary = EXPERT_BOUNDARY["i2v" if config.concat_channels else "t2v"]
    model_sampling = comfy_sampling.model_sampling_sd3(settings["shift"])
    sigmas = comfy_sampling.sampler_sigmas(
        model_sampling, settings["sampler"], settings["scheduler"], settings["steps"], settings["shift"],
        settings["denoise"],
    )  # fmt: skip
    switch = sum(1 for sigma in sigmas[:-1].tolist() if sigma >= boundary)
    low = replace(model, expert=1)
    logger.info("two experts: steps 0-%d high-noise, %d-%d low-noise", switch, switch, len(sigmas) - 1)
    if switch == 0:
        return sample_video(low, positive, negative, latent, StepRange(), **settings)
    if switch == len(sigmas) - 1:
        return sample_video(model, positive, negative, latent, StepRange(), **settings)
    first = StepRange(start=0, end=switch, add_noise=True, leftover_noise=True)
    (noisy,) = sample_video(model, positive, negative, latent, first, **settings)
    second = StepRange(start=switch, end=None, add_noise=False, leftover_noise=False)
    return sample_video(low, positive, negative, noisy, second, **settings)


@dataclass(frozen=True)
class StepRange:
    """KSamplerAdvanced's part of the schedule: steps ``start``..``end`` of it, with or without fresh noise, ending at
    sigma 0 or with the leftover noise (the two-expert split of Wan 2.2 A14B: 0-10 high noise, 10-end low noise)."""

    start: int | None = None
    end: int | None = None
    add_noise: bool = True
    leftover_noise: bool = False


def sample_video(
    model,
    positive,
    negative,
    latent: dict | None,
    steps_range: StepRange,
    *,
    steps: int,
    cfg: float,
    shift: float,
    seed: int,
    sampler: str,
    scheduler: str,
    denoise: float,
    size: tuple[int, int, int],
    sync_frequency: int,
    unique_id=None,
) -> tuple[dict]:
    """One Sampler run on ``model``'s worker group: KSampler's (or KSamplerAdvanced's, ``steps_range``) math here,
    the model calls on the ranks; the LATENT out."""
    from ..distrifusion.workers import JobCancelled

    mm = _comfy.model_management()
    spec = model.settings.spec
    config = check_model(model.model_path, spec.parallel)
    width, height, length = size
    latent_format = _comfy.wan_latent_format(config.out_dim)
    start, noise_mask = None, None
    if latent is not None:
        start, noise_mask = latent_to_model_space(latent, latent_format, config)
        _, _, frames, rows, cols = start.shape
        stride = vae_stride(config.out_dim)
        width, height, length = cols * stride, rows * stride, (frames - 1) * 4 + 1
    job = GenerationJob(
        positive=conditioning_context(positive, "positive"),
        negative=conditioning_context(negative, "negative"),
        width=width,
        height=height,
        length=length,
        steps=steps,
        cfg=cfg,
        shift=shift,
        seed=seed,
        sampler=sampler,
        scheduler=scheduler,
        denoise=denoise,
        sync_frequency=sync_frequency,
        latent=start,
        expert=model.expert,
        step_cache=model.step_cache,
    )
    shape = job.latent_shape(config.out_dim)
    denoise_mask = None
    if noise_mask is not None:
        if sampler in comfy_sampling.WAN_SOLVERS:
            raise WanDistriFusionError(
                f"sampler: {sampler} (Wan's reference solver) does not keep a masked image frame; choose one of "
                "KSampler's samplers (e.g. uni_pc or euler) for image-to-video with this latent."
            )
        denoise_mask, per_frame = wan_conditioning.frame_denoise(noise_mask, shape)
        job = job.with_changes(frame_denoise=per_frame)
    job = job.with_changes(**image_inputs(positive, negative, config, shape, latent_format))
    check_before_sending(model, job, return_uncond=comfy_sampling.needs_uncond(sampler))
    latent_image = job.latent if job.latent is not None else torch.zeros(shape)

    model_sampling = comfy_sampling.model_sampling_sd3(shift)
    sigmas = comfy_sampling.sampler_sigmas(model_sampling, sampler, scheduler, steps, shift, denoise)
    sigmas = comfy_sampling.advanced_sigmas(
        sigmas, steps_range.start, steps_range.end, force_full_denoise=not steps_range.leftover_noise
    )
    out = dict(latent) if latent is not None else {}
    if sigmas is None:  # KSamplerAdvanced with start_at_step past the end: the latent as it came
        out["samples"] = latent["samples"] if latent is not None else torch.zeros(shape)
        return (out,)
    job = job.with_changes(steps=len(sigmas) - 1)
    noise = _comfy.prepare_noise(latent_image, seed) if steps_range.add_noise else torch.zeros(shape)
    steps = job.steps

    comfy_memory.make_room(model.settings, config, job, loaded=RUNTIMES.is_loaded(model.settings))
    runtime = model.runtime()
    activity = RUNTIMES.activity
    bar = _comfy.progress_bar(steps, node_id=unique_id)
    last = {"memory": None, "time": time.perf_counter()}

    def on_model_call(event) -> None:
        last["memory"] = event.memory_per_rank

    previewer = None  # made once the session says where the latents live

    def on_step(step: int, denoised, x, total: int) -> None:
        now = time.perf_counter()
        preview = None
        if previewer is not None and denoised is not None:
            preview = previewer.decode_latent_to_preview_image("JPEG", denoised)
        # The status counts the step before /ws shows it (a client that saw step k there finds k in the status),
        # except on Cancel: ComfyUI's progress hook then raises before sending this step, so neither counts it.
        if not mm.processing_interrupted():
            activity.update(step + 1, total, now - last["time"], last["memory"])
        bar.update_absolute(step + 1, total, preview)
        last["time"] = now

    activity.begin(steps, shape, model=f"{config.variant}: {model.model_name}")
    try:
        with runtime.forward_session(
            job,
            progress=on_model_call,
            cancelled=mm.processing_interrupted,
            return_uncond=comfy_sampling.needs_uncond(sampler),
        ) as forward:
            previewer = _comfy.previewer(latent_format, forward.device)
            samples = comfy_sampling.sample(
                forward,
                model_sampling=model_sampling,
                sampler=sampler,
                sigmas=sigmas,
                noise=noise,
                latent_image=latent_image,
                cfg=cfg,
                seed=seed,
                callback=on_step,
                denoise_mask=denoise_mask,
                device=forward.device,
            )
        if forward.step_cache_summary() is not None:
            logger.info(forward.step_cache_summary())
            activity.note_easycache(forward.step_cache_summary())
    except JobCancelled as exc:
        activity.cancel()
        mm.interrupt_current_processing(False)
        raise mm.InterruptProcessingException() from exc
    except mm.InterruptProcessingException:
        activity.cancel()
        raise
    except Exception as exc:
        activity.finish(exc)
        raise
    activity.finish()
    out["samples"] = latent_from_model_space(samples, latent_format)
    return (out,)


def check_before_sending(model, job: GenerationJob, *, return_uncond: bool) -> None:
    """What depends on the video size (partition vs ranks, latent channels, conditioning width, image inputs) and
    CFG parallel's use, checked from the checkpoint's headers before the workers start or get the job."""
    spec = model.settings.spec
    config = check_model(model.model_path, spec.parallel)
    check_job(config, spec.parallel, job)
    check_guidance(spec.parallel, job, return_uncond=return_uncond)


def image_inputs(positive, negative, config: WanConfig, shape: tuple[int, ...], latent_format) -> dict:
    """The job's image inputs (``positive_y``, ``negative_clip_fea``, ...) from both conditionings, as ComfyUI's Wan
    model builds them for each (they may differ)."""
    inputs = {}
    for name, conditioning in (("positive", positive), ("negative", negative)):
        options = conditioning[0][1] if conditioning and len(conditioning[0]) > 1 else {}
        inputs[f"{name}_y"] = wan_conditioning.image_channels(options, config, shape, latent_format, name)
        inputs[f"{name}_clip_fea"] = wan_conditioning.clip_features(options, config)
    return inputs


def conditioning_context(conditioning, name: str) -> torch.Tensor:
    """The text context ``[1, tokens, 4096]`` of a native CONDITIONING (``[[tensor, {...}], ...]``)."""
    if not conditioning:
        raise WanDistriFusionError(f"{name}: the conditioning is empty; connect a CLIP Text Encode output.")
    if len(conditioning) > 1:
        logger.warning(
            "%s: %d conditionings combined; the DistriFusion Sampler uses the first", name, len(conditioning)
        )
    context = conditioning[0][0]
    if not isinstance(context, torch.Tensor) or context.dim() != 3:
        raise WanDistriFusionError(f"{name}: expected a text conditioning [1, tokens, width] from CLIP Text Encode.")
    if context.shape[0] != 1:
        logger.warning("%s: batch of %d conditionings; using the first", name, context.shape[0])
        context = context[:1]
    return context.detach().to("cpu", torch.float32).contiguous()


def latent_to_model_space(latent: dict, latent_format, config: WanConfig) -> tuple[torch.Tensor, torch.Tensor | None]:
    """ComfyUI's Wan LATENT -> the model's normalised latent and the LATENT's noise mask, as KSampler does it.

    Like ``comfy.sample.fix_empty_latent_channels`` + ``KSampler``: an all-zero (empty) latent is widened to the
    model's channels and left as zeros; any other latent goes through the format's ``process_in``. A noise mask is
    what Wan 2.2 TI2V 5B's image-to-video keeps a frame with (``Wan22ImageToVideoLatent``).
    """
    samples = latent["samples"]
    channels = config.out_dim
    noise_mask = latent.get("noise_mask")
    if noise_mask is not None and not config.per_frame_timesteps:
        raise WanDistriFusionError(
            f"latent: it carries a noise mask (inpainting), which the DistriFusion Sampler supports only for Wan 2.2 "
            f"TI2V 5B's image-to-video, not {config.variant}; remove the Set Latent Noise Mask node (for "
            "image-to-video with this model use WanImageToVideo)."
        )
    if samples.dim() == 4:
        samples = samples.unsqueeze(2)
    if samples.dim() != 5:
        raise WanDistriFusionError(
            f"latent: expected a video latent [B, {channels}, frames, h, w], got {list(samples.shape)}."
        )
    if samples.shape[0] != 1:
        raise WanDistriFusionError(
            f"latent: batch size {samples.shape[0]}; the DistriFusion Sampler makes one clip at a time, set batch_size 1."
        )
    empty = torch.count_nonzero(samples) == 0
    if samples.shape[1] != channels:
        if not empty:
            source = (
                "Wan22ImageToVideoLatent or VAE Encode with the Wan 2.2 VAE"
                if channels == 48
                else "Empty Hunyuan Latent Video or VAE Encode with the Wan 2.1 VAE"
            )
            raise WanDistriFusionError(
                f"latent: {samples.shape[1]} channels, {config.variant} latents have {channels}; use {source}."
            )
        samples = samples.new_zeros(1, channels, *samples.shape[2:])
    samples = samples.to("cpu", torch.float32)
    samples = samples.contiguous() if empty else latent_format.process_in(samples).contiguous()
    return samples, noise_mask


def latent_from_model_space(samples: torch.Tensor, latent_format) -> torch.Tensor:
    """The model's normalised latent (on any device) -> ComfyUI's Wan LATENT convention (what VAE Decode expects), on
    the CPU: ``process_out`` where the latent is, then the copy, as KSampler does."""
    return latent_format.process_out(samples.to(torch.float32)).to("cpu")
