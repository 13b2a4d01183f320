"""Flow-matching sampling: schedules against ComfyUI and diffusers, solvers against diffusers, the CFG loop."""

import inspect
import math

import pytest
import torch
from wan_distrifusion.wanvideo import sampling
from wan_distrifusion.wanvideo.errors import WanDistriFusionError

SHAPE = (1, 4, 2, 4, 4)
TEXT_DIM = 8


class ToyFlowModel:
    """A fixed random flow: linear in x, smooth in t, with a per-item offset from the (padding-blind) text context."""

    def __init__(self, channels: int = SHAPE[1], seed: int = 1):
        g = torch.Generator().manual_seed(seed)
        self.mix = torch.randn(channels, channels, generator=g) * 0.3
        self.bias = torch.randn(1, channels, 1, 1, 1, generator=g)
        self.text_proj = torch.randn(TEXT_DIM, channels, generator=g) * 0.5
        self.calls = []

    def __call__(self, x, t, context, **kwargs):
        self.calls.append({"x": x.clone(), "t": t.clone(), "context": context.clone(), "kwargs": kwargs})
        tt = (t / 1000).view(-1, 1, 1, 1, 1)
        text = (context.sum(dim=1) @ self.text_proj).view(x.shape[0], -1, 1, 1, 1)
        return torch.einsum("oc,bcfhw->bofhw", self.mix, x) * (1 + tt) + self.bias * torch.cos(3 * tt) + text * tt


def zero_model(x, t, context, **kwargs):
    return torch.zeros_like(x)


def text(value: float, tokens: int = 3) -> torch.Tensor:
    return torch.full((1, tokens, TEXT_DIM), value)


def seeded_noise(seed: int, shape=SHAPE) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed), dtype=torch.float32)


# ------------------------------------------------------------------------------------------- schedules


def test_simple_schedule_is_shifted_linear():
    assert torch.allclose(sampling.sigma_schedule("simple", 4, 1.0), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    base = torch.linspace(1, 0, 11, dtype=torch.float64)
    expected = 5.0 * base / (1 + 4.0 * base)
    assert torch.allclose(sampling.sigma_schedule("simple", 10, 5.0).double(), expected, atol=1e-7)


# Generated with ComfyUI 0.3.64: comfy.samplers.calculate_sigmas on ModelSamplingDiscreteFlow(shift), and
# KSampler.set_steps' denoise rule (schedule for int(steps / denoise) steps, keep the last steps + 1 sigmas).
COMFYUI_SIGMAS = {
    ("normal", 6, 5.0, 1.0): [1.0, 0.9526629, 0.8832126, 0.7714307, 0.5616499, 0.0244141, 0.0],
    ("normal", 5, 3.0, 0.55): [0.7511211, 0.6446863, 0.5029851, 0.3050089, 0.0089286, 0.0],
    ("sgm_uniform", 6, 5.0, 1.0): [1.0, 0.9617593, 0.9097071, 0.8347121, 0.7173175, 0.5073965, 0.0],
    ("sgm_uniform", 5, 3.0, 0.55): [0.7903684, 0.7072785, 0.6021506, 0.464876, 0.2780488, 0.0],
    ("beta", 2, 5.0, 1.0): [1.0, 0.8338881, 0.0],
    ("beta", 6, 5.0, 1.0): [1.0, 0.9803711, 0.9294872, 0.8338881, 0.6558935, 0.3362573, 0.0],
    ("beta", 5, 3.0, 0.55): [0.8036212, 0.6883116, 0.5335051, 0.3390093, 0.1313869, 0.0],
    ("beta", 8, 5.0, 1.0): [1.0, 0.9880553, 0.9590316, 0.9106949, 0.8338881, 0.7112069, 0.5181499, 0.2353896, 0.0],
    ("karras", 6, 5.0, 1.0): [1.0, 0.4555964, 0.187892, 0.0681417, 0.0208016, 0.0049801, 0.0],
    ("karras", 5, 3.0, 0.55): [0.0983614, 0.0477106, 0.0212885, 0.0085495, 0.002994, 0.0],
    ("exponential", 6, 5.0, 1.0): [1.0, 0.3462959, 0.1199208, 0.0415281, 0.014381, 0.0049801, 0.0],
    ("exponential", 5, 3.0, 0.55): [0.0547176, 0.0264642, 0.0127994, 0.0061904, 0.002994, 0.0],
}


@pytest.mark.parametrize("case", sorted(COMFYUI_SIGMAS), ids=lambda c: "-".join(map(str, c)))
def test_schedules_match_comfyui(case):
    scheduler, steps, shift, denoise = case
    ours = sampling.sigma_schedule(scheduler, steps, shift, denoise)
    assert ours.dtype == torch.float32
    assert torch.allclose(ours, torch.tensor(COMFYUI_SIGMAS[case]), atol=1e-6)


@pytest.mark.parametrize("scheduler", sampling.SCHEDULERS)
@pytest.mark.parametrize("steps", [1, 2, 7, 30])
def test_every_schedule_runs_from_noise_to_zero(scheduler, steps):
    sigmas = sampling.sigma_schedule(scheduler, steps, 5.0)
    assert sigmas[0] == 1.0 and sigmas[-1] == 0.0
    assert (sigmas[1:] < sigmas[:-1]).all()
    # beta drops repeated timesteps, as ComfyUI's does; the others give exactly `steps` steps
    assert len(sigmas) == steps + 1 or (scheduler == "beta" and len(sigmas) <= steps + 1)


def test_denoise_keeps_the_tail_of_a_longer_schedule():
    assert torch.allclose(sampling.sigma_schedule("simple", 4, 1.0, 0.5), torch.tensor([0.5, 0.375, 0.25, 0.125, 0.0]))
    # ComfyUI truncates steps / denoise: 20 / 0.3 -> a 66-step schedule
    sigmas = sampling.sigma_schedule("simple", 20, 1.0, 0.3)
    assert len(sigmas) == 21 and math.isclose(float(sigmas[0]), 20 / 66, rel_tol=1e-6)
    assert torch.equal(sampling.sigma_schedule("simple", 8, 3.0, 0.99995), sampling.sigma_schedule("simple", 8, 3.0))


# ------------------------------------------------------------------------------------------- against diffusers


def require_diffusers_flow(class_name: str, flow_parameter: str | None = None):
    diffusers = pytest.importorskip(
        "diffusers", reason="diffusers is the reference for the solvers (compatible profile)"
    )
    scheduler_class = getattr(diffusers, class_name, None)
    if scheduler_class is None or (
        flow_parameter and flow_parameter not in inspect.signature(scheduler_class.__init__).parameters
    ):
        pytest.skip(
            f"diffusers {diffusers.__version__} has no flow-matching {class_name} (the official profile pins 0.24)"
        )
    return scheduler_class


def velocity_of(model, context):
    def velocity(x, sigma):
        return model(x, torch.full((x.shape[0],), float(sigma) * 1000), context)

    return velocity


def run_diffusers(scheduler, model, noise, context):
    """The WanPipeline loop, with the model given t = sigma * 1000 like ours."""
    scheduler.set_begin_index(0)
    x = noise.clone()
    for i, t in enumerate(scheduler.timesteps):
        v = model(x, (scheduler.sigmas[i] * 1000).reshape(1), context)
        x = scheduler.step(v, t, x, return_dict=False)[0]
    return x


@pytest.mark.parametrize("steps, shift", [(1, 5.0), (10, 5.0), (25, 3.0)])
def test_euler_matches_diffusers_flow_match_euler(steps, shift):
    scheduler_class = require_diffusers_flow("FlowMatchEulerDiscreteScheduler")
    model = ToyFlowModel()
    positive, negative, cfg = text(0.5), text(-0.3), 4.0

    scheduler = scheduler_class(shift=shift)
    scheduler.set_timesteps(sigmas=torch.linspace(1, 0, steps + 1)[:-1].numpy())
    assert torch.allclose(scheduler.sigmas, sampling.sigma_schedule("simple", steps, shift), atol=1e-7)

    # the WanPipeline loop: two model calls, t straight from the scheduler (float sigma * 1000 here)
    x = seeded_noise(7)
    for t in scheduler.timesteps:
        t = t.reshape(1)
        cond, uncond = model(x, t, positive), model(x, t, negative)
        x = scheduler.step(uncond + cfg * (cond - uncond), t, x, return_dict=False)[0]

    ours = sampling.sample(
        model, positive, negative, latent_shape=SHAPE, seed=7, steps=steps, cfg=cfg, shift=shift, sampler="euler"
    )
    assert torch.allclose(ours, x, atol=1e-5)


def test_normal_schedule_is_diffusers_flow_match_default():
    scheduler_class = require_diffusers_flow("FlowMatchEulerDiscreteScheduler")
    for steps, shift in [(10, 5.0), (30, 3.0)]:
        scheduler = scheduler_class(shift=shift)
        scheduler.set_timesteps(steps)
        assert torch.allclose(scheduler.sigmas, sampling.sigma_schedule("normal", steps, shift), atol=1e-6)


def wan_unipc(scheduler_class, shift):
    """Wan's diffusers scheduler (Wan-AI/Wan2.1-T2V-*-Diffusers): the UniPC defaults plus these three."""
    return scheduler_class(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift)


@pytest.mark.parametrize("steps, shift", [(1, 5.0), (2, 5.0), (3, 1.0), (10, 5.0), (30, 3.0)])
def test_unipc_matches_diffusers_unipc(steps, shift):
    scheduler_class = require_diffusers_flow("UniPCMultistepScheduler", "use_flow_sigmas")
    model, context, noise = ToyFlowModel(), text(0.5), seeded_noise(3)

    # Wan's own diffusers schedule (linspace(1, 1/1000) shifted), fed to our solver
    scheduler = wan_unipc(scheduler_class, shift)
    scheduler.set_timesteps(steps)
    expected = run_diffusers(scheduler, model, noise, context)
    ours = sampling.sample_flow(velocity_of(model, context), noise.clone(), scheduler.sigmas, "unipc")
    assert torch.allclose(ours, expected, atol=1e-5)

    # our "simple" schedule given to diffusers; it nudges sigma 1 to 1 - 1e-6 for the solver, as we do
    scheduler = wan_unipc(scheduler_class, shift)
    scheduler.set_timesteps(sigmas=torch.linspace(1, 0, steps + 1)[:-1].numpy())
    ours_sigmas = sampling.sigma_schedule("simple", steps, shift)
    assert torch.allclose(scheduler.sigmas, ours_sigmas, atol=2e-6)
    expected = run_diffusers(scheduler, model, noise, context)
    ours = sampling.sample_flow(velocity_of(model, context), noise.clone(), scheduler.sigmas, "unipc")
    assert torch.allclose(ours, expected, atol=1e-5)
    ours = sampling.sample_flow(velocity_of(model, context), noise.clone(), ours_sigmas, "unipc")
    assert torch.allclose(ours, expected, atol=1e-4)  # only the model's t differs: 1000 vs 999.999


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # diffusers' own numpy 2 warning in set_timesteps
@pytest.mark.parametrize("steps, shift", [(1, 5.0), (2, 3.0), (10, 5.0), (30, 3.0)])
def test_dpmpp_matches_diffusers_dpm_solver_pp_2m(steps, shift):
    scheduler_class = require_diffusers_flow("DPMSolverMultistepScheduler", "use_flow_sigmas")
    model, context, noise = ToyFlowModel(), text(0.5), seeded_noise(5)

    def make():
        scheduler = scheduler_class(
            algorithm_type="dpmsolver++", solver_order=2, prediction_type="flow_prediction",
            use_flow_sigmas=True, flow_shift=shift,
        )  # fmt: skip
        scheduler.set_timesteps(steps)
        return scheduler

    scheduler = make()  # its flow sigmas: linspace(0.999, 0) shifted, as the official Wan code
    expected = run_diffusers(scheduler, model, noise, context)
    ours = sampling.sample_flow(velocity_of(model, context), noise.clone(), scheduler.sigmas, "dpm++")
    assert torch.allclose(ours, expected, atol=1e-5)

    scheduler = make()
    scheduler.sigmas = sampling.sigma_schedule("simple", steps, shift)  # from sigma exactly 1 (log-SNR -inf)
    expected = run_diffusers(scheduler, model, noise, context)
    assert torch.isfinite(expected).all()
    ours = sampling.sample(
        model, text(0.5), latent_shape=SHAPE, seed=5, steps=steps, cfg=1.0, shift=shift, sampler="dpm++"
    )
    assert torch.allclose(ours, expected, atol=1e-5)


def test_samplers_differ_so_the_comparisons_mean_something():
    model = ToyFlowModel()
    results = [
        sampling.sample(model, text(0.5), latent_shape=SHAPE, steps=6, cfg=1.0, sampler=name)
        for name in sampling.SAMPLERS
    ]
    for i in range(len(results)):
        for j in range(i + 1, len(results)):
            assert (results[i] - results[j]).abs().max() > 1e-3


# ------------------------------------------------------------------------------------------- the sampling loop


def test_noise_is_cpu_seeded_and_ignores_the_global_rng():
    torch.manual_seed(123)
    a = sampling.sample(zero_model, text(1.0), latent_shape=SHAPE, seed=42, steps=3, sampler="euler", device="cpu")
    torch.manual_seed(456)
    b = sampling.sample(
        zero_model, text(1.0), latent_shape=SHAPE, seed=42, steps=3, sampler="euler", device=torch.device("cpu")
    )
    # a zero flow leaves Euler's x where it started: exactly the seeded noise
    assert torch.equal(a, seeded_noise(42)) and torch.equal(b, a)
    assert a.dtype == torch.float32 and a.device.type == "cpu"


@pytest.mark.parametrize("sampler", sampling.SAMPLERS)
def test_seed_determinism(sampler):
    model = ToyFlowModel()

    def run(seed):
        return sampling.sample(model, text(0.5), text(-0.5), latent_shape=SHAPE, seed=seed, steps=4, sampler=sampler)

    assert torch.equal(run(1), run(1))
    assert not torch.allclose(run(1), run(2))


@pytest.mark.parametrize("sampler", sampling.SAMPLERS)
def test_denoise_starts_from_the_given_latent(sampler):
    latent = torch.randn(SHAPE, generator=torch.Generator().manual_seed(9))
    # with shift 1, 4 steps at denoise 0.5 start at sigma 0.5: x = 0.5 * noise + 0.5 * latent, kept by a zero flow
    out = sampling.sample(
        zero_model, text(1.0), latent=latent, seed=3, steps=4, shift=1.0, denoise=0.5, sampler=sampler
    )
    assert torch.allclose(out, 0.5 * seeded_noise(3) + 0.5 * latent, atol=1e-6)

    # denoise 1 ignores the latent's content: pure noise
    out = sampling.sample(zero_model, text(1.0), latent=latent, seed=3, steps=4, sampler=sampler)
    assert torch.allclose(out, seeded_noise(3), atol=1e-6)

    # a tiny denoise barely moves a real flow off the latent
    out = sampling.sample(
        ToyFlowModel(), text(1.0), latent=latent, seed=3, steps=2, shift=1.0, denoise=0.01, sampler=sampler
    )
    assert (out - latent).abs().max() < 0.1
    assert (out - latent).abs().max() > 0


@pytest.mark.parametrize("sampler", sampling.SAMPLERS)
def test_callback_every_step_and_one_model_call_per_step(sampler):
    model, seen = ToyFlowModel(), []
    out = sampling.sample(
        model, text(1.0), text(0.0), latent_shape=SHAPE, steps=5, sampler=sampler,
        callback=lambda i, total, x: seen.append((i, total, x.clone())),
    )  # fmt: skip
    assert [(i, total) for i, total, _ in seen] == [(i, 5) for i in range(5)]
    assert torch.equal(seen[-1][2], out)
    assert len(model.calls) == 5


class Cancelled(Exception):
    pass


def test_an_exception_in_the_callback_aborts_sampling():
    model = ToyFlowModel()

    def cancel_at_second_step(step_index, total_steps, x):
        if step_index == 1:
            raise Cancelled

    with pytest.raises(Cancelled):
        sampling.sample(model, text(1.0), latent_shape=SHAPE, steps=10, callback=cancel_at_second_step)
    assert len(model.calls) == 2


def test_cfg_is_one_batch2_call_cond_first():
    model = ToyFlowModel()
    positive, negative, cfg = text(0.7), text(-0.2), 3.5
    out = sampling.sample(model, positive, negative, latent_shape=SHAPE, seed=0, steps=1, cfg=cfg, sampler="euler")

    (call,) = model.calls
    assert call["x"].shape[0] == 2 and torch.equal(call["x"][0], call["x"][1])
    assert torch.equal(call["t"], torch.tensor([1000.0, 1000.0]))
    assert torch.equal(call["context"][0, :3], positive[0]) and torch.equal(call["context"][1, :3], negative[0])
    # one Euler step from sigma 1 to 0: x0 = noise - (uncond + cfg * (cond - uncond))
    reference = ToyFlowModel()
    noise = seeded_noise(0)
    t = torch.tensor([1000.0])
    cond, uncond = reference(noise, t, positive), reference(noise, t, negative)
    assert not torch.allclose(cond, uncond)
    assert torch.allclose(out, noise - (uncond + cfg * (cond - uncond)), atol=1e-6)


@pytest.mark.parametrize("cfg, with_negative", [(1.0, True), (5.0, False)])
def test_no_guidance_is_batch1(cfg, with_negative):
    model = ToyFlowModel()
    negative = text(-1.0) if with_negative else None
    sampling.sample(model, text(1.0), negative, latent_shape=SHAPE, steps=2, cfg=cfg)
    assert all(call["x"].shape[0] == 1 and call["context"].shape[0] == 1 for call in model.calls)


def test_contexts_are_zero_padded_to_text_len():
    model = ToyFlowModel()
    positive, negative = text(0.5, tokens=5)[0], text(-0.5, tokens=2)  # [L, D] is accepted too
    sampling.sample(model, positive, negative, latent_shape=SHAPE, steps=1, text_len=16)
    context = model.calls[0]["context"]
    assert context.shape == (2, 16, TEXT_DIM)
    assert torch.equal(context[0, :5], positive) and torch.equal(context[1, :2], negative[0])
    assert not context[0, 5:].any() and not context[1, 2:].any()

    model.calls.clear()  # longer prompts are kept whole; a batch of latents shares the prompt
    sampling.sample(model, text(0.5, tokens=20), text(0.1), latent_shape=(2, *SHAPE[1:]), steps=1, text_len=16)
    assert model.calls[0]["context"].shape == (4, 20, TEXT_DIM)


def test_model_kwargs_batched_for_cfg():
    model = ToyFlowModel()
    y, marker = torch.randn(1, 3, 2, 4, 4), torch.arange(3)
    sampling.sample(
        model, text(1.0), text(0.0), latent_shape=SHAPE, steps=1, model_kwargs={"y": y, "token_index": marker}
    )
    kwargs = model.calls[0]["kwargs"]
    assert torch.equal(kwargs["y"], torch.cat([y, y])) and torch.equal(kwargs["token_index"], marker)


def test_low_precision_model_output_gives_float32():
    model = ToyFlowModel()
    out = sampling.sample(lambda x, t, c: model(x, t, c).bfloat16(), text(1.0), latent_shape=SHAPE, steps=2)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


@pytest.mark.parametrize(
    "settings, widget",
    [
        ({"sampler": "heun"}, "sampler"),
        ({"scheduler": "linear"}, "scheduler"),
        ({"steps": 0}, "steps"),
        ({"steps": 2.5}, "steps"),
        ({"denoise": 0.0}, "denoise"),
        ({"denoise": 1.5}, "denoise"),
        ({"cfg": -1.0}, "cfg"),
        ({"cfg": float("nan")}, "cfg"),
        ({"shift": 0.0}, "shift"),
        ({"shift": -2.0}, "shift"),
        ({"latent_shape": None}, "latent"),
        ({"latent_shape": (1, 4, 4, 4)}, "latent"),
        ({"text_len": 0}, "text_len"),
        ({"seed": 2**64}, "seed"),
    ],
)
def test_invalid_settings_name_the_widget(settings, widget):
    kwargs = {"latent_shape": SHAPE, "steps": 2, **settings}
    with pytest.raises(WanDistriFusionError, match=widget) as raised:
        sampling.sample(zero_model, text(1.0), **kwargs)
    assert isinstance(raised.value, ValueError)


def test_wrong_model_output_shape_is_a_clear_error():
    with pytest.raises(WanDistriFusionError, match="model returned shape"):
        sampling.sample(lambda x, t, c: x[:, :2], text(1.0), latent_shape=SHAPE, steps=1)
