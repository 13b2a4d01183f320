"""EasyCache (``wanvideo/step_cache.py``): its settings, its rules on a scripted model, and on gloo ranks one decision
for the group: every rank skips the same steps (CFG-parallel halves too), a skipped step runs no model call, the
exact modes equal one process with the same cache, and ranks that measure different changes still agree.

Its equality with ComfyUI's own EasyCache is checked in real ComfyUI (``tests/comfyui/test_easycache_vs_comfyui.py``).
"""

from __future__ import annotations

import pytest
import torch
from parallel_harness import digest, rel_err, run_ranks, tiny_model
from wan_distrifusion.distrifusion.job import GenerationJob
from wan_distrifusion.distrifusion.store import decode_job, encode_job
from wan_distrifusion.wanvideo.errors import WanDistriFusionError
from wan_distrifusion.wanvideo.sampling import time_shift
from wan_distrifusion.wanvideo.step_cache import EasyCache, EasyCacheSettings, percent_to_sigma

STEPS = 16
CACHE = EasyCacheSettings(reuse_threshold=0.3, start_percent=0.1, end_percent=0.9)
"""Skips 5 of the 16 steps of the sharp tiny model below (every second one from step 5), computes the others."""


# --- settings ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "widget"),
    [
        ({"reuse_threshold": -0.1}, "reuse_threshold"),
        ({"reuse_threshold": 3.5}, "reuse_threshold"),
        ({"reuse_threshold": float("nan")}, "reuse_threshold"),
        ({"start_percent": 1.2}, "start_percent"),
        ({"end_percent": -0.5}, "end_percent"),
        ({"start_percent": 0.8, "end_percent": 0.3}, "start_percent"),
    ],
)
def test_bad_settings_name_the_widget(kwargs, widget):
    with pytest.raises(WanDistriFusionError, match=widget):
        EasyCacheSettings(**kwargs)


def test_cli_form_and_job_round_trip():
    assert EasyCacheSettings.parse("0.25") == EasyCacheSettings(0.25)
    assert EasyCacheSettings.parse("0.3, 0.1,0.9") == EasyCacheSettings(0.3, 0.1, 0.9)
    for bad in ("0.2,0.1", "fast", "0.2,a,0.9"):
        with pytest.raises(WanDistriFusionError, match="--easycache"):
            EasyCacheSettings.parse(bad)
    job = GenerationJob(positive=torch.zeros(1, 3, 32), negative=None, step_cache=CACHE)
    header, tensors = encode_job(job)
    assert decode_job(header, tensors).step_cache == CACHE
    with pytest.raises(WanDistriFusionError, match="easycache"):
        GenerationJob(positive=torch.zeros(1, 3, 32), negative=None, step_cache={"reuse_threshold": 0.2})


def test_percents_become_shifted_sigmas_as_in_comfyui():
    for shift in (1.0, 3.0, 8.0):
        assert percent_to_sigma(0.0, shift) == 1.0 and percent_to_sigma(1.0, shift) == 0.0
        for percent in (0.15, 0.5, 0.95):
            expected = float(time_shift(torch.tensor(1.0 - percent, dtype=torch.float64), shift))
            assert percent_to_sigma(percent, shift) == pytest.approx(expected, rel=1e-15)


# --- the rules, on a scripted model ---------------------------------------------------------------------


class Scripted:
    """A model whose output moves slowly with its input; counts its calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self, x):
        self.calls += 1
        return 0.5 * x + 0.01 * self.calls


def drive(cache: EasyCache, sigmas, items: int = 1):
    model, outputs = Scripted(), []
    x = torch.linspace(-1, 1, items * 2 * 16 * 16).reshape(items, 2, 1, 16, 16)
    for step, sigma in enumerate(sigmas):
        x = x * 0.97 + 0.001 * step
        outputs.append((x.clone(), cache(x, sigma, lambda x=x: model(x), items - 1, items)))
    return model, outputs


def test_skips_return_the_cached_difference_and_run_no_model():
    sigmas = [1.0 - i / 20 for i in range(20)]
    cache = EasyCache(EasyCacheSettings(0.5, 0.0, 1.0), shift=1.0)
    model, outputs = drive(cache, sigmas, items=2)
    assert cache.skipped and min(cache.skipped) == 2, "two computed calls in range (x_prev, then the rate) come first"
    assert model.calls == len(sigmas) - len(cache.skipped)
    for index in cache.skipped:
        last = max(i for i in range(index) if i not in cache.skipped)
        (x_prev, out_prev), (x, out) = outputs[last], outputs[index]
        torch.testing.assert_close(out, x + (out_prev - x_prev), rtol=0, atol=1e-6)


def test_no_skip_at_threshold_zero_nor_outside_start_end():
    sigmas = [1.0 - i / 20 for i in range(20)]
    cache = EasyCache(EasyCacheSettings(0.0, 0.0, 1.0), shift=1.0)
    assert drive(cache, sigmas)[0].calls == 20 and cache.skipped == []
    # start 0.5 / end 0.7 at shift 1: sigmas 0.5 .. 0.3 only; the first skip needs 2 computed calls in range
    cache = EasyCache(EasyCacheSettings(3.0, 0.5, 0.7), shift=1.0)
    drive(cache, sigmas)
    in_range = [i for i, s in enumerate(sigmas) if 0.3 < s <= 0.5]
    assert cache.skipped and set(cache.skipped) <= set(in_range[2:])


# --- gloo ranks -----------------------------------------------------------------------------------------

CASES = {
    2: [
        dict(mode="sync", split_mode="spatial"),
        dict(mode="ulysses", split_mode="spatial"),
        dict(mode="sync", split_mode="spatial", cfg_parallel=True),
        dict(mode="displaced", split_mode="spatial", warmup_steps=2),
    ],
    3: [
        dict(mode="sync", split_mode="spatiotemporal"),
        dict(mode="displaced", split_mode="spatial", warmup_steps=2),
    ],
    4: [dict(mode="sync", split_mode="spatial", cfg_parallel=True)],
}
EXACT_TOL = 1e-5


def _job(cfg: float = 4.0) -> GenerationJob:
    gen = torch.Generator().manual_seed(3)
    positive, negative = torch.randn(1, 7, 32, generator=gen), torch.randn(1, 5, 32, generator=gen)
    return GenerationJob(
        positive, negative, width=128, height=112, length=9, steps=STEPS, cfg=cfg, shift=3.0, seed=2,
        sampler="euler", step_cache=CACHE,
    )  # fmt: skip


def _sample(model, config, rank: int, job: GenerationJob):
    """``job`` through the rank's session flow (``rank.session_flow``: parallel model + EasyCache), as a worker does."""
    from wan_distrifusion.distrifusion.rank import session_flow
    from wan_distrifusion.wanvideo.sampling import sample_guided

    flow = session_flow(model, config, rank, "cpu", job, 1, False)
    latent = sample_guided(flow, job.latent_shape(4), seed=job.seed, steps=job.steps, shift=job.shift, sampler="euler")
    return latent, list(flow.step_cache.skipped)


def ranks_skip_together(rank: int, world_size: int) -> list:
    from wan_distrifusion.distrifusion.config import ParallelConfig
    from wan_distrifusion.distrifusion.rank import last_stats

    model, job = tiny_model(0, sharp=True), _job()
    reference, reference_skipped = _sample(model, ParallelConfig(world_size=1), 0, job)
    results = []
    for case in CASES[world_size]:
        config = ParallelConfig(world_size=world_size, patch_size=16, comm_backend="builtin", **case)
        latent, skipped = _sample(model, config, rank, job)
        calls = last_stats(model)["steps"]
        results.append((str(case), skipped, reference_skipped, calls, rel_err(latent, reference), digest(latent)))
    return results


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_every_rank_skips_the_same_steps_and_exact_modes_equal_one_process(world_size):
    per_rank = run_ranks("test_step_cache", "ranks_skip_together", world_size)
    for case_index, case in enumerate(CASES[world_size]):
        rows = [results[case_index] for results in per_rank]
        label, skipped, reference_skipped, calls, error, _ = rows[0]
        print(f"{world_size} ranks {label}: skipped {skipped} (1 process {reference_skipped}), error {error:.1e}")
        assert all(row[1] == skipped for row in rows), f"{label}: the ranks skipped different steps {rows}"
        assert 0 < len(skipped) < STEPS // 2, f"{label}: {skipped}"
        assert all(row[3] == STEPS - len(skipped) for row in rows), f"{label}: a skipped step ran the model"
        assert len({row[5] for row in rows}) == 1, f"{label}: the ranks returned different latents"
        if case["mode"] != "displaced":
            assert skipped == reference_skipped
            assert error < EXACT_TOL, f"{label}: {error}"


def ranks_that_measure_differently(rank: int, world_size: int) -> dict:
    """Each rank scales its accumulated change differently (as ranks on unlike GPUs might round differently): alone
    they would skip different steps; through the group's decision they skip the same ones."""
    from wan_distrifusion.distrifusion.rank import group_max
    from wan_distrifusion.wanvideo.sampling import GuidedFlow, sample_guided

    model, job = tiny_model(0, sharp=True), _job()
    factor = 1.0 + 0.15 * rank
    results = {}
    for name, decide in (("alone", lambda v: v * factor), ("group", lambda v: group_max(v * factor))):
        cache = EasyCache(CACHE, job.shift, decide=decide)
        flow = GuidedFlow(model, job.positive, job.negative, cfg=job.cfg, step_cache=cache)
        sample_guided(flow, job.latent_shape(4), seed=job.seed, steps=job.steps, shift=job.shift, sampler="euler")
        results[name] = list(cache.skipped)
    return results


def test_the_group_decision_overrides_ranks_that_measure_differently():
    per_rank = run_ranks("test_step_cache", "ranks_that_measure_differently", 3)
    alone = [result["alone"] for result in per_rank]
    group = [result["group"] for result in per_rank]
    print(f"alone {alone}; as a group {group}")
    assert len({tuple(skipped) for skipped in alone}) > 1, "the scaling must change a rank's own decisions"
    assert all(skipped == group[-1] for skipped in group) and group[-1]
    assert group[-1] == alone[-1], "the group takes the largest change: that of the rank that scales most"


def test_image_to_video_skips_reuse_the_previous_prediction_as_native():
    """With concatenated image channels ComfyUI takes the cached difference against the input's last output-width
    channels (the image latent, constant over the steps): a skipped call returns the previous prediction itself."""
    from wan_distrifusion.wanvideo.sampling import GuidedFlow, sample_guided

    model = tiny_model(0, model_type="i2v")
    gen = torch.Generator().manual_seed(4)
    y = torch.randn(1, 8, 3, 16, 16, generator=gen)
    cache = EasyCache(EasyCacheSettings(0.5, 0.0, 1.0), shift=3.0)
    flow = GuidedFlow(
        model, torch.randn(1, 7, 32, generator=gen), torch.randn(1, 5, 32, generator=gen), cfg=4.0,
        model_kwargs={"y": y}, step_cache=cache,
    )  # fmt: skip
    predictions = []

    def recorded(x, t):
        predictions.append(flow(x, t))
        return predictions[-1]

    sample_guided(recorded, (1, 4, 3, 16, 16), seed=1, steps=12, shift=3.0, sampler="euler")
    assert cache.skipped, "the threshold must skip some calls"
    for index in cache.skipped:
        last = max(i for i in range(index) if i not in cache.skipped)
        # equal up to round-off of image + (prediction - image) (the x term of text-to-video would be ~0.1 here)
        torch.testing.assert_close(predictions[index], predictions[last], rtol=0, atol=1e-5)
