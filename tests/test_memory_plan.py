"""The memory plan against the design notes' figures (Wan 14B, 720p x 81 frames) and its refusals."""

from __future__ import annotations

import re

import pytest
from tiny_wan import tiny_config
from wan_distrifusion.distrifusion.config import ParallelConfig
from wan_distrifusion.distrifusion.memory_plan import GIB, plan_memory
from wan_distrifusion.distrifusion.weight_memory import parameter_counts
from wan_distrifusion.wanvideo.errors import WanDistriFusionError
from wan_distrifusion.wanvideo.model import WanConfig, WanModel

WAN_14B = WanConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40)
WAN_1_3B = WanConfig(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30)
LATENT_720P_81 = (1, 16, 21, 90, 160)  # 21 x 45 x 80 = 75,600 tokens
LATENT_480P_81 = (1, 16, 21, 60, 104)


@pytest.mark.parametrize("config", [tiny_config(), tiny_config(model_type="i2v")])
def test_parameter_count_matches_the_model(config):
    assert sum(parameter_counts(config)) == sum(p.numel() for p in WanModel(config).parameters())


def test_14b_weights_are_about_28_gb_in_bf16_and_fp8_halves_the_blocks():
    bf16 = plan_memory(WAN_14B, ParallelConfig(), LATENT_720P_81, "bf16", "disabled")
    fp8 = plan_memory(WAN_14B, ParallelConfig(), LATENT_720P_81, "bf16", "fp8_e4m3fn")
    assert 28.0e9 < bf16.weights_bytes < 29.0e9
    assert 0.5 < fp8.weights_bytes / bf16.weights_bytes < 0.52


def test_stale_kv_of_14b_720p_is_1_5_gb_per_layer_and_62_gb_for_40_layers():
    plan = plan_memory(WAN_14B, ParallelConfig(world_size=4), LATENT_720P_81, "bf16", guidance_batch=1)
    assert plan.tokens_total == 75_600 and plan.tokens_local == 18_900
    per_layer = plan.stale_kv_bytes / WAN_14B.num_layers
    assert 1.5e9 < per_layer < 1.6e9
    assert 61e9 < plan.stale_kv_bytes < 63e9
    with_cfg = plan_memory(WAN_14B, ParallelConfig(world_size=4), LATENT_720P_81, "bf16", guidance_batch=2)
    assert with_cfg.stale_kv_bytes == 2 * plan.stale_kv_bytes
    split = plan_memory(
        WAN_14B, ParallelConfig(world_size=4, cfg_parallel=True), LATENT_720P_81, "bf16", guidance_batch=2
    )
    assert split.stale_kv_bytes == plan.stale_kv_bytes and split.tokens_local == 2 * plan.tokens_local


def test_cfg_parallel_over_two_ranks_keeps_no_stale_kv():
    """2 ranks with CFG parallel: each runs the whole grid for one guidance half, nothing to exchange (measured on
    2x H200, 14B 720p: 45.8 GiB peak with the bench's 10.5 GiB of extra unfused weight copies)."""
    two = plan_memory(
        WAN_14B, ParallelConfig(world_size=2, cfg_parallel=True), LATENT_720P_81, "bf16", guidance_batch=2
    )
    single = plan_memory(WAN_14B, ParallelConfig(), LATENT_720P_81, "bf16", guidance_batch=1)
    assert two.stale_kv_bytes == two.attention_bytes == 0
    assert two.batch_per_rank == 1 and two.total_bytes == single.total_bytes


def test_14b_fp8_kv_at_four_ranks_matches_the_measured_peak():
    """Design notes: 14B 720p with fp8 K/V fits an 80 GB card, 62-65 GiB peak per rank at N=4 (one forward, batch 1)."""
    parallel = ParallelConfig(world_size=4, kv_dtype="fp8_e4m3fn")
    plan = plan_memory(WAN_14B, parallel, LATENT_720P_81, "bf16", device_free_bytes=79 * GIB, guidance_batch=1)
    assert 55 * GIB < plan.total_bytes < 70 * GIB
    assert plan.fits


def test_a_plan_that_does_not_fit_is_refused_with_numbers_and_what_fits():
    with pytest.raises(WanDistriFusionError) as caught:
        plan_memory(WAN_14B, ParallelConfig(world_size=4), LATENT_720P_81, "bf16", device_free_bytes=79 * GIB)
    message = str(caught.value)
    assert message.startswith("memory: this job needs about")
    assert "79.0 GiB free" in message and "stale K/V 115.4 GiB" in message
    assert "fp8_e4m3fn K/V + CFG parallel" in message and "sync mode" in message and "ulysses mode" in message


def test_one_gpu_that_is_too_small_is_told_about_fp8_weights_and_more_gpus():
    with pytest.raises(WanDistriFusionError) as caught:
        plan_memory(WAN_14B, ParallelConfig(), LATENT_720P_81, "bf16", device_free_bytes=42 * GIB)
    message = str(caught.value)
    assert "quantization fp8_e4m3fn (" in message
    assert re.search(r"\d GPUs in the (sync|ulysses) mode( with sharded weights)? \(\d+\.\d GiB per rank\)", message)


def test_nothing_fits_says_to_lower_the_size():
    with pytest.raises(WanDistriFusionError, match="lower the resolution or the length"):
        plan_memory(WAN_14B, ParallelConfig(world_size=2), LATENT_720P_81, "bf16", device_free_bytes=8 * GIB)


def test_exact_modes_keep_no_stale_kv_and_ulysses_buffers_shrink_with_ranks():
    sync = plan_memory(WAN_1_3B, ParallelConfig(world_size=2, mode="sync"), LATENT_480P_81, "bf16")
    two = plan_memory(WAN_1_3B, ParallelConfig(world_size=2, mode="ulysses"), LATENT_480P_81, "bf16")
    four = plan_memory(WAN_1_3B, ParallelConfig(world_size=4, mode="ulysses"), LATENT_480P_81, "bf16")
    assert sync.stale_kv_bytes == two.stale_kv_bytes == four.stale_kv_bytes == 0
    assert four.attention_bytes * 2 == two.attention_bytes
    assert four.activation_bytes < two.activation_bytes


def test_unknown_free_memory_is_not_checked_and_the_summary_names_the_parts():
    plan = plan_memory(WAN_14B, ParallelConfig(world_size=2), LATENT_720P_81, "bf16")
    assert plan.fits is None
    summary = plan.summary()
    for part in (
        "weights",
        "activations",
        "stale K/V",
        "attention buffers",
        "reserve",
        "GiB",
        "free memory not checked",
    ):
        assert part in summary
    assert "75,600 tokens" in summary


def test_overlap_adds_halo_tokens_in_the_displaced_mode():
    plain = plan_memory(WAN_1_3B, ParallelConfig(world_size=4), LATENT_480P_81, "bf16")
    halo = plan_memory(WAN_1_3B, ParallelConfig(world_size=4, patch_overlap=32), LATENT_480P_81, "bf16")
    assert halo.tokens_local > plain.tokens_local and halo.activation_bytes > plain.activation_bytes
