"""Wan 2.2 on the node side, without ComfyUI: the two experts' slots, their memory, KSamplerAdvanced's schedule
cut, the 5B's 32 px tokens and the image inputs a job carries."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from tiny_wan import tiny_job
from wan_distrifusion.distrifusion.config import ParallelConfig
from wan_distrifusion.distrifusion.job import pixels_per_token
from wan_distrifusion.distrifusion.memory_plan import plan_memory
from wan_distrifusion.distrifusion.validation import check_experts, check_job
from wan_distrifusion.nodes.comfy_sampling import advanced_sigmas
from wan_distrifusion.wanvideo.errors import WanDistriFusionError
from wan_distrifusion.wanvideo.model import WanConfig

A14B = dict(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40, version="2.2")
HIGH = WanConfig(**A14B, expert="high_noise")
LOW = WanConfig(**A14B, expert="low_noise")
TI2V = WanConfig(dim=3072, ffn_dim=14336, num_heads=24, num_layers=30, in_dim=48, out_dim=48, version="2.2")


def test_experts_in_their_slots_pass_and_swapped_files_are_refused_naming_the_slot():
    check_experts(HIGH, LOW)
    check_experts(dataclasses.replace(HIGH, expert=""), dataclasses.replace(LOW, expert=""))  # files that say nothing
    with pytest.raises(WanDistriFusionError, match=r"^model: this file is Wan 2.2 T2V A14B \(low-noise expert\); swap"):
        check_experts(LOW, HIGH)
    with pytest.raises(WanDistriFusionError, match=r"^second model: this file is .*high-noise expert.*swap"):
        check_experts(HIGH, HIGH)
    with pytest.raises(WanDistriFusionError, match=r"^model: Wan 2.1 T2V is not a Wan 2.2 A14B expert"):
        check_experts(WanConfig(**{**A14B, "version": "2.1"}), LOW)
    with pytest.raises(WanDistriFusionError, match=r"^second model: .*in_dim differ.*T2V with T2V, I2V with I2V"):
        check_experts(HIGH, dataclasses.replace(LOW, in_dim=36))


def test_memory_plan_counts_both_experts_weights_and_stale_kv():
    parallel = ParallelConfig(world_size=4, mode="displaced")
    shape = (1, 16, 21, 90, 160)
    one = plan_memory(HIGH, parallel, shape, "bf16", "fp8_e4m3fn", check=False)
    two = plan_memory(HIGH, parallel, shape, "bf16", "fp8_e4m3fn", check=False, models=2)
    assert two.weights_bytes == 2 * one.weights_bytes and two.stale_kv_bytes == 2 * one.stale_kv_bytes
    assert two.activation_bytes == one.activation_bytes
    fits_one = one.total_bytes + 2**30
    assert plan_memory(HIGH, parallel, shape, "bf16", "fp8_e4m3fn", fits_one).fits
    with pytest.raises(WanDistriFusionError, match="^memory: "):
        plan_memory(HIGH, parallel, shape, "bf16", "fp8_e4m3fn", fits_one, models=2)


def test_advanced_sigmas_cut_like_ksampler_advanced():
    sigmas = torch.linspace(1.0, 0.0, 21)
    high = advanced_sigmas(sigmas, 0, 10, force_full_denoise=False)
    low = advanced_sigmas(sigmas, 10, 10000, force_full_denoise=True)
    assert torch.equal(high, sigmas[:11]) and torch.equal(low, sigmas[10:])  # leftover noise: ends at sigma[10]
    assert advanced_sigmas(sigmas, 0, 10, force_full_denoise=True)[-1] == 0 and sigmas[10] != 0
    assert advanced_sigmas(sigmas, 20, 10000, force_full_denoise=True) is None  # nothing left: latent passes
    assert torch.equal(advanced_sigmas(sigmas, None, None, force_full_denoise=True), sigmas)


def test_ti2v_5b_tokens_are_32_px_for_sizes_and_patches():
    assert pixels_per_token(TI2V) == 32 and pixels_per_token(HIGH) == 16
    job = tiny_job(width=1280, height=704, length=121)
    assert job.latent_shape(48) == (1, 48, 31, 44, 80)
    text = job.positive.shape[-1]
    config = dataclasses.replace(TI2V, text_dim=text)
    check_job(config, ParallelConfig(world_size=2, patch_size=64), job)
    with pytest.raises(WanDistriFusionError, match=r"^width: 1296 px is not a multiple of 32 px, the token size of"):
        check_job(config, ParallelConfig(), tiny_job(width=1296, height=704, length=5))
    with pytest.raises(WanDistriFusionError, match=r"^patch size: 48 px is not a positive multiple of 32 px"):
        check_job(config, ParallelConfig(world_size=2, patch_size=48), job)


def test_image_inputs_must_fit_the_model():
    i2v = WanConfig(
        dim=64, ffn_dim=128, num_heads=4, num_layers=2, in_dim=36, out_dim=16, text_dim=32, model_type="i2v"
    )
    job = tiny_job(width=64, height=64, length=5)
    shape = job.latent_shape(16)
    y = torch.zeros(1, 20, *shape[2:])
    clip = torch.zeros(1, 257, 1280)
    good = job.with_changes(positive_y=y, negative_y=y, positive_clip_fea=clip, negative_clip_fea=clip)
    check_job(i2v, ParallelConfig(), good)
    assert set(good.model_kwargs("negative")) == {"y", "clip_fea"}
    with pytest.raises(WanDistriFusionError, match=r"^negative: Wan 2.1 I2V needs image channels .* WanImageToVideo"):
        check_job(i2v, ParallelConfig(), good.with_changes(negative_y=None))
    t2v = dataclasses.replace(i2v, in_dim=16, model_type="t2v")
    with pytest.raises(WanDistriFusionError, match=r"^positive: CLIP vision features .* do not fit Wan 2.1 T2V"):
        check_job(t2v, ParallelConfig(), job.with_changes(positive_clip_fea=clip))


def test_guided_flow_stacks_each_prompts_own_image_inputs():
    """ComfyUI builds ``y`` / ``clip_fea`` per conditioning: the [cond; uncond] batch gets the positive's and then the
    negative's (not the positive's twice), and at cfg 1 only the positive's."""
    from wan_distrifusion.wanvideo.sampling import GuidedFlow

    seen = {}

    def model(x, t, context, **kwargs):
        seen.update(kwargs)
        return torch.zeros_like(x)

    x = torch.zeros(1, 16, 2, 4, 4)
    pos_y, neg_y = torch.ones(1, 20, 2, 4, 4), 2 * torch.ones(1, 20, 2, 4, 4)
    pos_clip, neg_clip = torch.ones(1, 257, 1280), 2 * torch.ones(1, 257, 1280)
    text = torch.zeros(1, 4, 32)
    positive, negative = {"y": pos_y, "clip_fea": pos_clip}, {"y": neg_y, "clip_fea": neg_clip}
    GuidedFlow(model, text, text, cfg=3.0, model_kwargs=positive, negative_kwargs=negative)(x, 500.0)
    assert torch.equal(seen["y"], torch.cat([pos_y, neg_y])) and torch.equal(
        seen["clip_fea"], torch.cat([pos_clip, neg_clip])
    )
    GuidedFlow(model, text, text, cfg=1.0, model_kwargs=positive, negative_kwargs=negative)(x, 500.0)
    assert torch.equal(seen["y"], pos_y)
    with pytest.raises(WanDistriFusionError, match="positive and negative carry different image inputs"):
        GuidedFlow(model, text, text, cfg=3.0, model_kwargs=positive, negative_kwargs={"y": neg_y})


def test_status_partition_of_the_5b_uses_32_px_tokens():
    from wan_distrifusion.distrifusion.partition import partition_tokens
    from wan_distrifusion.distrifusion.status import _partition_sizes

    parallel = ParallelConfig(world_size=3, patch_size=96)
    expected = [int(r.own_index.numel()) for r in partition_tokens((31, 22, 40), "spatial", 96, 3, 0, 32)]
    assert _partition_sizes(parallel, [1, 48, 31, 44, 80]) == expected and sum(expected) == 31 * 22 * 40
    assert expected != [int(r.own_index.numel()) for r in partition_tokens((31, 22, 40), "spatial", 96, 3)]
