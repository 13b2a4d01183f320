"""Flow-matching sampling for Wan: sigma schedules, Euler / UniPC / DPM++ 2M solvers and the CFG loop.

Stands alone on purpose: the official DistriFusion profile pins diffusers 0.24, which has no flow-matching
schedulers. The solvers reproduce diffusers' ``FlowMatchEulerDiscreteScheduler``, ``UniPCMultistepScheduler``
(``use_flow_sigmas=True, prediction_type="flow_prediction"``, Wan's default) and ``DPMSolverMultistepScheduler``
(``algorithm_type="dpmsolver++"``, flow sigmas) step for step; the schedules other than ``simple`` follow
ComfyUI's definitions for a flow model patched by ``ModelSamplingSD3(shift)``.

Conventions: ``x_sigma = sigma * noise + (1 - sigma) * x0`` with sigma running from 1 (noise) to 0; the model
predicts the flow ``v = noise - x0``, so ``x0 = x - sigma * v``; the model is given ``t = sigma * 1000``.
"""

from __future__ import annotations

import functools
import logging
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from .errors import WanDistriFusionError
from .step_cache import EasyCache

logger = logging.getLogger(__name__)

SAMPLERS = ("euler", "unipc", "dpm++")
"""Solver names, as the Sampler node's ``sampler`` widget lists them."""
SCHEDULERS = ("simple", "normal", "sgm_uniform", "beta", "karras", "exponential")
"""Sigma schedules, as the Sampler node's ``scheduler`` widget lists them."""

NUM_TRAIN_TIMESTEPS = 1000
"""Wan was trained with t = sigma * 1000."""
BATCHED_MODEL_KWARGS = ("clip_fea", "y")
"""``model_kwargs`` with a batch dimension: one per conditioning, stacked [cond; uncond] (I2V CLIP features, image
latents)."""
MAX_SCHEDULE_STEPS = 100_000
"""Cap on ``steps / denoise``: a tinier denoise would build a schedule of millions of sigmas."""
_FULL_DENOISE = 0.9999
"""ComfyUI treats any denoise above this as 1."""
_UNIPC_SIGMA_MAX = 1.0 - 1e-6
"""UniPC's first sigma when the schedule starts at 1, as diffusers does, so log-SNR stays finite."""

StepCallback = Callable[[int, int, Tensor], None]
"""``callback(step_index, total_steps, x)`` after each step; ``step_index`` counts from 0."""
VelocityFn = Callable[[Tensor, float], Tensor]
"""``velocity_fn(x, sigma) -> v``: the (guided) flow prediction at noise level ``sigma``."""


# --------------------------------------------------------------------------------------------- schedules


def time_shift(sigmas: Tensor, shift: float) -> Tensor:
    """Wan/SD3 timestep shift ``shift * s / (1 + (shift - 1) * s)``: more steps at high noise for large videos."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def _flow_sigma_table(shift: float) -> Tensor:
    """ComfyUI's ``ModelSamplingDiscreteFlow.sigmas``: the shifted sigma of each training timestep 1..1000."""
    return time_shift(torch.arange(1, NUM_TRAIN_TIMESTEPS + 1, dtype=torch.float64) / NUM_TRAIN_TIMESTEPS, shift)


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta function I_x(a, b) (continued fraction), so ``beta`` needs no scipy."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x > (a + 1.0) / (a + b + 2.0):
        return 1.0 - _betainc(b, a, 1.0 - x)
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    fraction = d
    for m in range(1, 500):
        for numerator in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            fraction *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return math.exp(log_front) * fraction / a


@functools.lru_cache(maxsize=4)
def _beta_timestep_boundaries(alpha: float, beta: float) -> Tensor:
    """CDF of Beta(alpha, beta) at (k + 0.5) / 999: where ``rint(ppf(u) * 999)`` steps from k to k + 1."""
    last = NUM_TRAIN_TIMESTEPS - 1
    return torch.tensor([_betainc(alpha, beta, (k + 0.5) / last) for k in range(last)], dtype=torch.float64)


def _beta_timesteps(steps: int, alpha: float = 0.6, beta: float = 0.6) -> Tensor:
    """ComfyUI's ``rint(beta.ppf(1 - i / steps) * 999)`` for i < steps, without scipy (inverts the CDF instead)."""
    quantiles = 1.0 - torch.arange(steps, dtype=torch.float64) / steps
    # A tie (u exactly on a boundary, e.g. u = 0.5 for alpha == beta) rounds up, as numpy's rint of scipy's ppf does.
    return torch.searchsorted(_beta_timestep_boundaries(alpha, beta), quantiles + 1e-12, right=True)


def _full_schedule(scheduler: str, steps: int, shift: float) -> Tensor:
    """All sigmas of a ``steps``-step schedule, descending, ending with 0 (float64)."""
    if scheduler == "simple":
        # Linear 1 -> 0 then shifted: Wan's and diffusers' flow schedule (ComfyUI's ``simple`` up to 1/1000 rounding).
        return time_shift(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64), shift)
    table = _flow_sigma_table(shift)
    sigma_min, sigma_max = float(table[0]), float(table[-1])
    if scheduler == "normal":
        # Timesteps linear between the end sigmas, shifted again (= diffusers FlowMatchEulerDiscreteScheduler's default).
        sigmas = time_shift(torch.linspace(sigma_max, sigma_min, steps, dtype=torch.float64), shift)
    elif scheduler == "sgm_uniform":
        sigmas = time_shift(torch.linspace(sigma_max, sigma_min, steps + 1, dtype=torch.float64)[:-1], shift)
    elif scheduler == "karras":
        rho = 7.0
        ramp = torch.linspace(0.0, 1.0, steps, dtype=torch.float64)
        sigmas = (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    elif scheduler == "exponential":
        sigmas = torch.linspace(math.log(sigma_max), math.log(sigma_min), steps, dtype=torch.float64).exp()
    elif scheduler == "beta":
        timesteps = torch.unique_consecutive(_beta_timesteps(steps))  # ComfyUI drops repeated timesteps
        sigmas = table[timesteps]
    else:
        raise WanDistriFusionError(_unknown_choice("scheduler", scheduler, SCHEDULERS))
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def sigma_schedule(scheduler: str, steps: int, shift: float, denoise: float = 1.0) -> Tensor:
    """Sigmas (float32, descending, last 0) the sampler walks; ``denoise < 1`` keeps the tail, as ComfyUI's KSampler."""
    _check_choice("scheduler", scheduler, SCHEDULERS)
    steps = _check_steps(steps)
    shift = _check_positive("shift", shift, "Wan uses 3.0 for 480p and 5.0 for 720p")
    denoise = _check_denoise(denoise)
    if denoise > _FULL_DENOISE:
        return _full_schedule(scheduler, steps, shift).float()
    total_steps = int(steps / denoise)  # ComfyUI truncates, so do we (same sigmas as its KSampler)
    if total_steps > MAX_SCHEDULE_STEPS:
        raise WanDistriFusionError(
            f"denoise {denoise:g} is too small for {steps} steps: the schedule would have {total_steps} steps "
            f"(at most {MAX_SCHEDULE_STEPS}). Raise 'denoise' or lower 'steps'."
        )
    return _full_schedule(scheduler, total_steps, shift)[-(steps + 1) :].float()


# --------------------------------------------------------------------------------------------- solvers


def _log_snr(sigma: float) -> float:
    """lambda = log(alpha / sigma) with alpha = 1 - sigma; infinite at the ends (the solvers handle the limits)."""
    if sigma <= 0.0:
        return math.inf
    if sigma >= 1.0:
        return -math.inf
    return math.log1p(-sigma) - math.log(sigma)


def _report(callback: StepCallback | None, step_index: int, total_steps: int, x: Tensor) -> None:
    if callback is not None:
        callback(step_index, total_steps, x)  # exceptions propagate: that is how cancel works


def _sample_euler(velocity_fn: VelocityFn, x: Tensor, sigmas: list[float], callback: StepCallback | None) -> Tensor:
    total_steps = len(sigmas) - 1
    for i in range(total_steps):
        x = x + (sigmas[i + 1] - sigmas[i]) * velocity_fn(x, sigmas[i])
        _report(callback, i, total_steps, x)
    return x


def _sample_dpmpp_2m(velocity_fn: VelocityFn, x: Tensor, sigmas: list[float], callback: StepCallback | None) -> Tensor:
    """DPM-Solver++(2M), midpoint form, on x0 = x - sigma * v; first order on the first and the final (to 0) step."""
    log_snr = [_log_snr(s) for s in sigmas]
    total_steps = len(sigmas) - 1
    previous_x0 = None
    for i in range(total_steps):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x0 = x - sigma * velocity_fn(x, sigma)
        if sigma_next == 0.0:
            x = x0
        else:
            h = log_snr[i + 1] - log_snr[i]
            phi = math.expm1(-h)
            alpha_next = 1.0 - sigma_next
            x_next = (sigma_next / sigma) * x - (alpha_next * phi) * x0
            if previous_x0 is not None:
                ratio = (log_snr[i] - log_snr[i - 1]) / h  # infinite after a step from sigma 1: term vanishes
                x_next = x_next - (0.5 * alpha_next * phi / ratio) * (x0 - previous_x0)
            x = x_next
        previous_x0 = x0
        _report(callback, i, total_steps, x)
    return x


def _unipc_predict(
    x: Tensor, x0s: list[Tensor], sigmas: list[float], log_snr: list[float], i: int, order: int
) -> Tensor:
    """UniP-bh2 from sigmas[i] to sigmas[i + 1] (``x0s[-1]`` is the x0 at sigmas[i])."""
    sigma, sigma_next = sigmas[i], sigmas[i + 1]
    x0 = x0s[-1]
    if sigma_next == 0.0:
        return x0
    h = log_snr[i + 1] - log_snr[i]
    phi = math.expm1(-h)  # h*phi_1(-h) and, for bh2, B(h)
    alpha_next = 1.0 - sigma_next
    x_next = (sigma_next / sigma) * x - (alpha_next * phi) * x0
    if order == 2:
        ratio = (log_snr[i - 1] - log_snr[i]) / h
        x_next = x_next - (alpha_next * phi * 0.5 / ratio) * (x0s[-2] - x0)
    return x_next


def _unipc_correct(
    x0_now: Tensor, last_x: Tensor, x0s: list[Tensor], sigmas: list[float], log_snr: list[float], i: int, order: int
) -> Tensor:
    """UniC-bh2: redo the step sigmas[i-1] -> sigmas[i] from ``last_x`` using the new x0 at sigmas[i]."""
    sigma_prev, sigma = sigmas[i - 1], sigmas[i]
    x0_prev = x0s[-1]
    hh = -(log_snr[i] - log_snr[i - 1])
    phi = math.expm1(hh)
    alpha = 1.0 - sigma
    corrected = (sigma / sigma_prev) * last_x - (alpha * phi) * x0_prev
    h_phi_1 = phi / hh - 1.0
    b1 = h_phi_1 / phi
    if order == 1:
        return corrected - (alpha * phi * 0.5) * (x0_now - x0_prev)
    b2 = (h_phi_1 / hh - 0.5) * 2.0 / phi
    ratio = (log_snr[i - 2] - log_snr[i - 1]) / -hh
    rho_history = (b1 - b2) / (1.0 - ratio)  # solves [[1, 1], [ratio, 1]] @ rho = [b1, b2]
    rho_now = b1 - rho_history
    return corrected - (alpha * phi) * ((rho_history / ratio) * (x0s[-2] - x0_prev) + rho_now * (x0_now - x0_prev))


def _sample_unipc(velocity_fn: VelocityFn, x: Tensor, sigmas: list[float], callback: StepCallback | None) -> Tensor:
    """UniPC multistep, bh2, order 2 with the corrector, lower order on the first and last step (diffusers' defaults)."""
    solver_sigmas = list(sigmas)
    if abs(solver_sigmas[0] - 1.0) < 1e-6:
        solver_sigmas[0] = _UNIPC_SIGMA_MAX
    log_snr = [_log_snr(s) for s in solver_sigmas]
    total_steps = len(sigmas) - 1
    x0s: list[Tensor] = []
    last_x, last_order = None, 0
    for i in range(total_steps):
        x0 = x - solver_sigmas[i] * velocity_fn(x, sigmas[i])
        if last_x is not None:
            x = _unipc_correct(x0, last_x, x0s, solver_sigmas, log_snr, i, last_order)
        x0s = [*x0s[-1:], x0]
        order = min(2, total_steps - i, len(x0s))
        last_x = x
        x = _unipc_predict(x, x0s, solver_sigmas, log_snr, i, order)
        last_order = order
        _report(callback, i, total_steps, x)
    return x


_SOLVERS = {"euler": _sample_euler, "unipc": _sample_unipc, "dpm++": _sample_dpmpp_2m}


def sample_flow(
    velocity_fn: VelocityFn,
    x: Tensor,
    sigmas: Tensor | Sequence[float],
    sampler: str = "unipc",
    callback: StepCallback | None = None,
) -> Tensor:
    """Integrate from ``sigmas[0]`` to ``sigmas[-1]`` with one ``velocity_fn`` call per step; ``x`` is at ``sigmas[0]``."""
    _check_choice("sampler", sampler, SAMPLERS)
    sigma_list = [float(s) for s in (sigmas.tolist() if isinstance(sigmas, Tensor) else sigmas)]
    if len(sigma_list) < 2:
        raise WanDistriFusionError("The sigma schedule needs at least 2 values (one step); raise 'steps'.")
    return _SOLVERS[sampler](velocity_fn, x, sigma_list, callback)


# --------------------------------------------------------------------------------------------- the sampler


def sample(
    model: Callable[..., Tensor],
    positive: Tensor,
    negative: Tensor | None = None,
    *,
    latent_shape: Sequence[int] | None = None,
    latent: Tensor | None = None,
    seed: int = 0,
    steps: int = 30,
    cfg: float = 5.0,
    shift: float = 5.0,
    sampler: str = "unipc",
    scheduler: str = "simple",
    denoise: float = 1.0,
    callback: StepCallback | None = None,
    device: str | torch.device = "cpu",
    text_len: int = 512,
    model_kwargs: Mapping[str, Any] | None = None,
) -> Tensor:
    """Generate Wan latents [B, C, F, H, W] (float32, CPU) by flow matching from CPU-seeded noise.

    ``model(x, t, context, **model_kwargs)`` returns the flow; with ``cfg != 1`` and a ``negative`` it is called once
    per step on the batch [cond; uncond]. ``latent`` (with ``denoise < 1``) is the starting point to re-noise;
    without it, ``latent_shape`` gives the size. ``callback(step_index, total_steps, x)`` runs after every step and
    may raise to cancel.
    """
    check_settings(sampler, scheduler, steps, shift, denoise, seed)  # before the model is touched
    shape = _latent_shape(latent_shape, latent)
    device = torch.device(device)
    flow = GuidedFlow(
        model, positive, negative, cfg=cfg, batch=shape[0], text_len=text_len, device=device, model_kwargs=model_kwargs
    )
    return sample_guided(
        flow,
        shape,
        latent=latent,
        seed=seed,
        steps=steps,
        shift=shift,
        sampler=sampler,
        scheduler=scheduler,
        denoise=denoise,
        callback=callback,
        device=device,
    )


def check_settings(sampler: str, scheduler: str, steps: int, shift: float, denoise: float, seed: int) -> Tensor:
    """Raise ``WanDistriFusionError`` naming the first sampler setting that cannot work; the sigma schedule."""
    _check_choice("sampler", sampler, SAMPLERS)
    sigmas = sigma_schedule(scheduler, steps, shift, denoise)
    _check_seed(seed)
    return sigmas


def sample_guided(
    flow: Callable[[Tensor, float], Tensor],
    shape: Sequence[int],
    *,
    latent: Tensor | None = None,
    seed: int = 0,
    steps: int = 30,
    shift: float = 5.0,
    sampler: str = "unipc",
    scheduler: str = "simple",
    denoise: float = 1.0,
    callback: StepCallback | None = None,
    device: str | torch.device = "cpu",
) -> Tensor:
    """``sample`` with the guidance already inside ``flow(x, t)`` (a ``GuidedFlow``, or a runtime's forward session,
    whose ranks guide): the noise, the schedule and the solver loop, the same for every runtime."""
    sigmas = check_settings(sampler, scheduler, steps, shift, denoise, seed)
    seed = _check_seed(seed)
    shape = tuple(int(n) for n in shape)
    device = torch.device(device)
    noise = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed), dtype=torch.float32)
    first_sigma = float(sigmas[0])
    if first_sigma == 1.0 or latent is None:
        x = first_sigma * noise  # an empty latent is zeros, as ComfyUI's
    else:
        x = first_sigma * noise + (1.0 - first_sigma) * latent.detach().to("cpu", torch.float32)
    x = x.to(device)

    def velocity(x: Tensor, sigma: float) -> Tensor:
        return flow(x, sigma * NUM_TRAIN_TIMESTEPS)

    logger.debug(
        "sampling %s/%s, %d steps, shift %s, denoise %s, sigmas %s",
        sampler, scheduler, len(sigmas) - 1, shift, denoise, [round(s, 4) for s in sigmas.tolist()],
    )  # fmt: skip
    with torch.no_grad():
        x = sample_flow(velocity, x, sigmas, sampler, callback)
    return x.to("cpu", torch.float32)


def frame_timesteps(timestep: Tensor, denoise_mask: Tensor) -> Tensor:
    """Wan 2.2 TI2V 5B's timesteps per latent frame ``[B, F]``, as ComfyUI's ``WAN22.process_timestep``: each item's
    timestep times its frame's mean denoise mask ``[B, C, F, H, W]`` (a kept image frame, mask 0, gets 0)."""
    weights = denoise_mask.float().mean(dim=(1, 3, 4))
    return weights * timestep.float().reshape(-1, 1)


class GuidedFlow:
    """The classifier-free-guided flow prediction ``v(x, t)`` of a Wan model: THE place that pads the text
    contexts and batches [cond; uncond], shared by ``sample`` and the workers' controller-driven sessions.

    Contexts are zero-padded to ``text_len`` tokens once. With ``cfg != 1`` and a ``negative`` (or with
    ``return_uncond`` and a ``negative``) the model is called once per call on the batch [cond; uncond]
    (x and t repeated, contexts stacked) and the result is ``uncond + cfg * (cond - uncond)``; otherwise
    batch 1 with the positive context. ``return_uncond`` also keeps the unguided flow of the last call in
    ``last_uncond`` (what ComfyUI's CFG++ samplers need). ``denoise_mask`` ``[1 or batch, C, F, H, W]`` (TI2V 5B,
    *Wan22ImageToVideoLatent*'s ``noise_mask``) turns the timestep into one per latent frame (``frame_timesteps``);
    keeping the masked frames' latents fixed stays the sampler's business.
    """

    def __init__(
        self,
        model: Callable[..., Tensor],
        positive: Tensor,
        negative: Tensor | None = None,
        *,
        cfg: float = 5.0,
        batch: int = 1,
        text_len: int = 512,
        device: str | torch.device = "cpu",
        model_kwargs: Mapping[str, Any] | None = None,
        return_uncond: bool = False,
        denoise_mask: Tensor | None = None,
        negative_kwargs: Mapping[str, Any] | None = None,
        step_cache: EasyCache | None = None,
    ):
        self.model = model
        self.step_cache = step_cache
        """ComfyUI's EasyCache around the model call (``step_cache.py``): a skipped call runs no model."""
        self.cfg = _check_cfg(cfg)
        text_len = _check_text_len(text_len)
        if model_kwargs is not None and not isinstance(model_kwargs, Mapping):
            raise WanDistriFusionError(
                f"model_kwargs must be a dict of extra model inputs, got {type(model_kwargs).__name__}."
            )
        self.device = torch.device(device)
        self.return_uncond = bool(return_uncond) and negative is not None
        self.use_cfg = negative is not None and (self.cfg != 1.0 or self.return_uncond)
        conds = [positive, negative] if self.use_cfg else [positive]
        names = ["positive", "negative"] if self.use_cfg else ["positive"]
        self.context = _stack_contexts(conds, names, batch, text_len, self.device)
        kwargs = [model_kwargs, model_kwargs if negative_kwargs is None else negative_kwargs]
        self.extra = _model_inputs(kwargs[: len(conds)], device=self.device)
        self.model_batch = self.context.shape[0]
        self.denoise_mask = None
        if denoise_mask is not None:
            mask = denoise_mask.detach().to(self.device, torch.float32)
            self.denoise_mask = torch.cat([mask.expand(batch, *mask.shape[1:])] * len(conds))
        self.last_uncond: Tensor | None = None

    def __call__(self, x: Tensor, t: float) -> Tensor:
        """The guided flow at ``x`` (on ``device``) and timestep ``t`` (0..1000, Wan's ``sigma * 1000``), float32."""
        timestep = torch.full((self.model_batch,), float(t), dtype=torch.float32, device=self.device)
        if self.denoise_mask is not None:
            timestep = frame_timesteps(timestep, self.denoise_mask)
        model_x = torch.cat([x, x]) if self.use_cfg else x

        def run() -> Tensor:
            return self.model(model_x, timestep, self.context, **self.extra)

        if self.step_cache is None:
            out = run()
        else:
            # What ComfyUI's Wan model is handed: the latent with the image channels concatenated; ComfyUI batches
            # [uncond; cond] and measures its first item, so here (batched [cond; uncond]) the last one.
            model_input = (
                torch.cat([model_x, self.extra["y"].to(model_x.dtype)], dim=1) if "y" in self.extra else model_x
            )
            items = 2 if self.use_cfg else 1
            out = self.step_cache(model_input, float(t) / NUM_TRAIN_TIMESTEPS, run, items - 1, items)
        if tuple(out.shape) != tuple(model_x.shape):
            raise WanDistriFusionError(
                f"The model returned shape {tuple(out.shape)} for latents {tuple(model_x.shape)}: the latent channels "
                "or size do not fit this checkpoint (check the model and the width/height/length widgets)."
            )
        out = out.float()
        if not self.use_cfg:
            return out
        cond, uncond = out.chunk(2)
        if self.return_uncond:
            self.last_uncond = uncond
        return uncond + self.cfg * (cond - uncond)


def _stack_contexts(conds: list[Tensor], names: list[str], batch: int, text_len: int, device: torch.device) -> Tensor:
    """Text contexts [len(conds) * batch, L, D], zero-padded to ``text_len`` tokens (as Wan pads its umT5 output)."""
    contexts = []
    for cond, name in zip(conds, names):
        if not isinstance(cond, Tensor):
            raise WanDistriFusionError(
                f"'{name}' must be a text-embedding tensor [tokens, dim], got {type(cond).__name__}."
            )
        if cond.dim() == 2:
            cond = cond.unsqueeze(0)
        if cond.dim() != 3 or cond.shape[0] not in (1, batch):
            raise WanDistriFusionError(
                f"'{name}' conditioning has shape {tuple(cond.shape)}; expected [1 or {batch}, tokens, dim] "
                "(connect a CLIP Text Encode output made with the Wan umT5 text encoder)."
            )
        contexts.append(cond.detach().to(device, torch.float32).expand(batch, -1, -1))
    if len({c.shape[2] for c in contexts}) != 1:
        raise WanDistriFusionError(
            f"'positive' and 'negative' have different embedding sizes ({contexts[0].shape[2]} vs "
            f"{contexts[1].shape[2]}); encode both with the same text encoder."
        )
    length = max(text_len, *(c.shape[1] for c in contexts))  # longer prompts are kept whole, as ComfyUI's Wan does
    return torch.cat([torch.nn.functional.pad(c, (0, 0, 0, length - c.shape[1])) for c in contexts])


def _model_inputs(per_cond: list[Mapping[str, Any] | None], device: torch.device) -> dict[str, Any]:
    """Extra model inputs on ``device``: the batched ones (``BATCHED_MODEL_KWARGS``) of each conditioning stacked in
    [cond; uncond] order (ComfyUI lets the positive and the negative prompt carry different images), the rest taken
    from the positive's."""
    per_cond = [dict(kwargs or {}) for kwargs in per_cond]
    batched = [{key: value for key, value in kwargs.items() if key in BATCHED_MODEL_KWARGS} for kwargs in per_cond]
    if any(set(other) != set(batched[0]) for other in batched[1:]):
        raise WanDistriFusionError(
            f"positive and negative carry different image inputs ({sorted(batched[0])} vs {sorted(batched[1])}); "
            "give both the same image nodes (e.g. connect both through WanImageToVideo / CLIP Vision Encode)."
        )
    inputs = {key: value.to(device) if isinstance(value, Tensor) else value for key, value in per_cond[0].items()}
    for key in batched[0]:
        values = [kwargs[key] for kwargs in batched]
        if all(isinstance(value, Tensor) for value in values):
            inputs[key] = torch.cat([value.to(device) for value in values])
    return inputs


# --------------------------------------------------------------------------------------------- validation


def _unknown_choice(widget: str, value: object, choices: Sequence[str]) -> str:
    return f"Unknown {widget} {value!r}: choose one of {', '.join(choices)} (widget '{widget}')."


def _check_choice(widget: str, value: object, choices: Sequence[str]) -> None:
    if value not in choices:
        raise WanDistriFusionError(_unknown_choice(widget, value, choices))


def _check_steps(steps: object) -> int:
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
        raise WanDistriFusionError(f"'steps' must be a whole number of at least 1, got {steps!r}.")
    return int(steps)


def _check_real(widget: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise WanDistriFusionError(f"'{widget}' must be a finite number, got {value!r}.")
    return float(value)


def _check_positive(widget: str, value: object, hint: str) -> float:
    value = _check_real(widget, value)
    if value <= 0:
        raise WanDistriFusionError(f"'{widget}' must be greater than 0, got {value:g} ({hint}).")
    return value


def _check_denoise(denoise: object) -> float:
    denoise = _check_real("denoise", denoise)
    if not 0.0 < denoise <= 1.0:
        raise WanDistriFusionError(
            f"'denoise' must be in (0, 1], got {denoise:g}: 1.0 generates from pure noise, "
            "lower values keep more of the input latent."
        )
    return denoise


def _check_cfg(cfg: object) -> float:
    cfg = _check_real("cfg", cfg)
    if cfg < 0:
        raise WanDistriFusionError(f"'cfg' must be 0 or more, got {cfg:g} (1.0 turns guidance off; Wan uses about 5).")
    return cfg


def _check_seed(seed: object) -> int:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not -(2**63) <= seed < 2**64:
        raise WanDistriFusionError(f"'seed' must be a whole number between 0 and 2**64 - 1, got {seed!r}.")
    return int(seed)


def _check_text_len(text_len: object) -> int:
    if isinstance(text_len, bool) or not isinstance(text_len, numbers.Integral) or text_len < 1:
        raise WanDistriFusionError(f"'text_len' must be a whole number of at least 1 (Wan uses 512), got {text_len!r}.")
    return int(text_len)


def _latent_shape(latent_shape: Sequence[int] | None, latent: Tensor | None) -> tuple[int, ...]:
    """The [B, C, F, H, W] to sample, from ``latent`` or ``latent_shape`` (which must agree when both are given)."""
    if latent is None and latent_shape is None:
        raise WanDistriFusionError("Sampling needs an input 'latent' or a 'latent_shape' (width, height, length).")
    shape = tuple(int(n) for n in (latent.shape if latent is not None else latent_shape))
    if latent is not None and latent_shape is not None and tuple(int(n) for n in latent_shape) != shape:
        raise WanDistriFusionError(f"'latent' has shape {shape} but 'latent_shape' says {tuple(latent_shape)}.")
    if len(shape) != 5 or min(shape) < 1:
        raise WanDistriFusionError(
            f"The latent must be a video latent [batch, channels, frames, height, width], got shape {shape}; "
            "use an empty video latent (e.g. EmptyHunyuanLatentVideo) or let the Sampler make one."
        )
    return shape
