"""ComfyUI's own sampling around a model that runs on our workers: the Sampler's math is KSampler's.

Native ``Load Diffusion Model`` + ``ModelSamplingSD3(shift)`` + ``KSampler`` computes its sigmas with
``comfy.samplers.KSampler`` (scheduler, denoise truncation, dropped penultimate sigma for UniPC),
its noise with ``comfy.sample.prepare_noise``, and integrates with ``comfy.samplers.sampler_object(name)``
calling a CFG guider ``(x, sigma) -> denoised``. We do the same with the guider replaced by
``WorkerModel``: each call is one call of the runtime's forward session, where the ranks evaluate the
Wan model on the [cond; uncond] batch and apply cfg; the flow comes back and becomes ``denoised``
through ComfyUI's own ``model_sampling.calculate_denoised``. So every sampler and scheduler name of
KSampler works, with KSampler's results. ``unipc`` and ``dpm++`` are Wan's reference solvers, run
exactly as ``cli.py generate`` runs them (``wanvideo.sampling``: diffusers' UniPC / DPM-Solver++ and
their schedules, as the official Wan code). ComfyUI is imported inside the functions only.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..wanvideo.errors import WanDistriFusionError
from ..wanvideo.sampling import NUM_TRAIN_TIMESTEPS, SCHEDULERS, sample_flow, sigma_schedule

WAN_SOLVERS = ("unipc", "dpm++")
"""Wan's reference solvers (diffusers' schedulers), offered beside KSampler's names; not ComfyUI's uni_pc/dpmpp_2m."""
FLOW_MULTIPLIER = 1000
"""ModelSamplingSD3's ``multiplier``: t = sigma * 1000, as Wan was trained."""

SamplerCallback = Callable[[int, Tensor | None, Tensor, int], None]
"""``callback(step_index, denoised or None, x, total_steps)``, KSampler's callback signature."""


def model_sampling_sd3(shift: float):
    """ComfyUI's ``model_sampling`` of a model patched by ``ModelSamplingSD3(shift)``: discrete flow + CONST."""
    import comfy.model_sampling

    class ModelSamplingAdvanced(comfy.model_sampling.ModelSamplingDiscreteFlow, comfy.model_sampling.CONST):
        pass

    sampling = ModelSamplingAdvanced(None)
    sampling.set_parameters(shift=shift, multiplier=FLOW_MULTIPLIER)
    return sampling


def needs_uncond(sampler: str) -> bool:
    """Whether ``sampler`` reads the negative prompt's own prediction (ComfyUI's CFG++ samplers do)."""
    return sampler.endswith("_cfg_pp")


class WorkerModel:
    """What ComfyUI's samplers call in place of its CFG guider: ``(x, sigma) -> denoised``.

    The samplers reach ``model_sampling`` as ``model_wrap.inner_model.model_sampling``, as
    ``model.inner_model.inner_model.model_sampling`` and through ``model_patcher.get_model_object``;
    all lead here. ``forward(x, t)`` is the runtime's forward session (CFG applied on the ranks).
    """

    def __init__(self, forward: Callable[[Tensor, float], Tensor], model_sampling, cfg: float):
        self.forward = forward
        self.model_sampling = model_sampling
        self.cfg = cfg
        self.inner_model = self
        self.model_patcher = self

    def scale_latent_inpaint(self, x, sigma, noise, latent_image, **kwargs) -> Tensor:
        """A masked (kept) region's latent at each step: the clean latent itself, as ComfyUI's ``WAN22`` keeps
        TI2V 5B's image frame (the only model the Sampler takes a noise mask for)."""
        return latent_image

    def get_model_object(self, name: str):
        if name == "model_sampling":
            return self.model_sampling
        raise AttributeError(f"the DistriFusion model has no {name!r}")

    def __call__(self, x: Tensor, sigma: Tensor, model_options: dict | None = None, seed=None, **kwargs) -> Tensor:
        model_options = model_options or {}
        sampling = self.model_sampling
        sigma = torch.as_tensor(sigma, dtype=torch.float32)
        if sigma.numel() > 1 and not torch.all(sigma == sigma.flatten()[0]):
            raise WanDistriFusionError("latent: the DistriFusion Sampler makes one clip at a time (batch size 1).")
        t = float(sampling.timestep(sigma.flatten()[0]))
        flow = self.forward(x, t).to(x.device, x.dtype)
        denoised = sampling.calculate_denoised(sigma, flow, x)
        post_cfg = model_options.get("sampler_post_cfg_function", [])
        if post_cfg:
            uncond = getattr(self.forward, "last_uncond", None)
            if uncond is None:
                raise WanDistriFusionError(
                    "sampler: this sampler needs the negative prompt's own prediction, which the forward session "
                    "did not return; choose a sampler without _cfg_pp."
                )
            uncond_denoised = sampling.calculate_denoised(sigma, uncond.to(x.device, x.dtype), x)
            cond_denoised = uncond_denoised + (denoised - uncond_denoised) / self.cfg if self.cfg else None
            for function in post_cfg:
                denoised = function(
                    {
                        "denoised": denoised,
                        "cond": None,
                        "uncond": None,
                        "cond_scale": self.cfg,
                        "model": self,
                        "uncond_denoised": uncond_denoised,
                        "cond_denoised": cond_denoised,
                        "sigma": sigma,
                        "model_options": model_options,
                        "input": x,
                    }
                )
        return denoised


def sampler_sigmas(model_sampling, sampler: str, scheduler: str, steps: int, shift: float, denoise: float) -> Tensor:
    """The sigmas for the Sampler's widgets: KSampler's for its samplers, the CLI's for Wan's ``unipc`` / ``dpm++``."""
    if sampler not in WAN_SOLVERS:
        return ksampler_sigmas(model_sampling, sampler, scheduler, steps, denoise)
    if scheduler not in SCHEDULERS:
        raise WanDistriFusionError(
            f"scheduler: {scheduler} works with KSampler's samplers; Wan's {sampler} takes {', '.join(SCHEDULERS)} "
            "(or choose uni_pc / dpmpp_2m)."
        )
    return sigma_schedule(scheduler, steps, shift, denoise)


def ksampler_sigmas(model_sampling, sampler: str, scheduler: str, steps: int, denoise: float) -> Tensor:
    """The sigmas native ``KSampler`` uses for these widgets (``comfy.samplers.KSampler``'s own computation)."""
    import comfy.samplers

    class _Model:  # all KSampler reads from its model to compute the sigmas
        def get_model_object(self, name):
            return model_sampling

    if scheduler not in comfy.samplers.KSampler.SCHEDULERS:
        raise WanDistriFusionError(
            f"scheduler: {scheduler!r} is unknown; choose one of {', '.join(comfy.samplers.KSampler.SCHEDULERS)}."
        )
    name = sampler if sampler in comfy.samplers.KSampler.SAMPLERS else "euler"  # ours drop no sigma
    return comfy.samplers.KSampler(_Model(), steps, "cpu", sampler=name, scheduler=scheduler, denoise=denoise).sigmas


def advanced_sigmas(
    sigmas: Tensor, start_step: int | None, last_step: int | None, *, force_full_denoise: bool
) -> Tensor | None:
    """KSamplerAdvanced's cut of the schedule (``comfy.samplers.KSampler.sample``): up to ``last_step`` (its sigma
    set to 0 with ``force_full_denoise``, else the run returns with that much noise left), then from ``start_step``;
    ``None`` when ``start_step`` leaves no step (the latent passes through)."""
    if last_step is not None and last_step < len(sigmas) - 1:
        sigmas = sigmas[: last_step + 1].clone()
        if force_full_denoise:
            sigmas[-1] = 0
    if start_step is not None:
        if start_step >= len(sigmas) - 1:
            return None
        sigmas = sigmas[start_step:]
    return sigmas


def sample(
    forward: Callable[[Tensor, float], Tensor],
    *,
    model_sampling,
    sampler: str,
    sigmas: Tensor,
    noise: Tensor,
    latent_image: Tensor,
    cfg: float,
    seed: int,
    callback: SamplerCallback | None = None,
    denoise_mask: Tensor | None = None,
    device: str | torch.device = "cpu",
) -> Tensor:
    """Denoise from ``noise`` (``latent_image`` in model space, zeros when empty) over ``sigmas`` with ComfyUI's
    ``sampler`` (or one of ``WAN_SOLVERS``), every model call going to ``forward``; the latent in model space, on
    ``device``. ``device`` is where the sampler's own math runs, as native KSampler moves its noise, latent, sigmas
    and mask to the model's device: the forward session's ``device`` (the GPU in-process), so no call copies."""
    import comfy.samplers
    import comfy.utils

    sigmas = sigmas.to(device, torch.float32)
    noise, latent_image = noise.to(device), latent_image.to(device)
    denoise_mask = None if denoise_mask is None else denoise_mask.to(device)
    model_sampling = model_sampling.to(device)
    if len(sigmas) < 2:
        return latent_image
    if sampler in WAN_SOLVERS:
        x = model_sampling.noise_scaling(sigmas[0], noise, latent_image)
        last_call: dict[str, Tensor] = {}

        def velocity(x: Tensor, sigma: float) -> Tensor:
            v = forward(x, sigma * NUM_TRAIN_TIMESTEPS)
            last_call.update(x=x, sigma=torch.tensor(sigma, dtype=torch.float32, device=x.device), v=v)
            return v

        def on_step(step: int, total: int, x: Tensor) -> None:
            if callback is not None:
                callback(step, denoised_estimate(model_sampling, last_call), x, total)

        with torch.no_grad():
            x = sample_flow(velocity, x, sigmas, sampler, on_step)
        return model_sampling.inverse_noise_scaling(sigmas[-1], x)
    if sampler not in comfy.samplers.KSampler.SAMPLERS:
        choices = ", ".join([*comfy.samplers.KSampler.SAMPLERS, *WAN_SOLVERS])
        raise WanDistriFusionError(f"sampler: {sampler!r} is unknown; choose one of {choices}.")
    extra_args = {"model_options": {"transformer_options": {"sample_sigmas": sigmas}}, "seed": seed}
    return comfy.samplers.sampler_object(sampler).sample(
        WorkerModel(forward, model_sampling, cfg),
        sigmas,
        extra_args,
        callback,
        noise,
        latent_image,
        denoise_mask,
        not comfy.utils.PROGRESS_BAR_ENABLED,
    )


def denoised_estimate(model_sampling, last_call: dict[str, Tensor]) -> Tensor | None:
    """The x0 estimate of the latest model call (flow: ``x0 = x - sigma * v``), what KSampler's samplers hand the
    step callback as ``denoised`` and ComfyUI's previews decode; ``None`` before the first call."""
    if not last_call:
        return None
    x, v = last_call["x"], last_call["v"].to(last_call["x"].device, last_call["x"].dtype)
    return model_sampling.calculate_denoised(last_call["sigma"], v, x)
