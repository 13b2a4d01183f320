"""Sharded weights (FSDP2, ``distrifusion/sharded_weights.py``): bit for bit the replicated result at 2, 3 and 4 ranks
in every mode, with fp8 storage, a LoRA (and a switch of it) and Wan 2.2's two experts; the per-rank bytes against
the memory plan; the plan's proposals; the ``weights`` setting's checks."""

from __future__ import annotations

import re

import pytest
import torch
from parallel_harness import digest, run_ranks
from tiny_lora import random_lora, write_lora
from tiny_wan import random_model, relative_error, tiny_config, tiny_job, write_checkpoint
from wan_distrifusion.distrifusion.config import ParallelConfig
from wan_distrifusion.distrifusion.memory_plan import GIB, plan_memory
from wan_distrifusion.distrifusion.settings import RuntimeSpec
from wan_distrifusion.distrifusion.weight_memory import block_parameter_counts, choose_weights, weight_bytes
from wan_distrifusion.wanvideo.errors import WanDistriFusionError
from wan_distrifusion.wanvideo.lora import LoraFile
from wan_distrifusion.wanvideo.model import WanConfig

WAN_14B = WanConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40)
WAN_1_3B = WanConfig(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30)
LATENT_720P_81 = (1, 16, 21, 90, 160)
LATENT_480P_81 = (1, 16, 21, 60, 104)
# 6 heads: ulysses runs at 2 and 3 ranks; 3 layers: the prefetch chain has a middle block
CONFIG = tiny_config(dim=96, num_heads=6, ffn_dim=192, num_layers=3)
# (precision, quantization, LoRA, second expert)
CASES = {
    "fp32": ("fp32", "disabled", False, False),
    "bf16": ("bf16", "disabled", False, False),
    "fp8": ("fp32", "fp8_e4m3fn", False, False),
    "fp32+lora": ("fp32", "disabled", True, False),
    "bf16+two-experts": ("bf16", "disabled", False, True),
}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sharded")
    write_checkpoint(folder / "high.safetensors", random_model(CONFIG, seed=3))
    write_checkpoint(folder / "low.safetensors", random_model(CONFIG, seed=4))
    for name, seed, strength in (("a", 1, 0.1), ("b", 2, 0.1)):
        lora = random_lora(CONFIG, seed=seed, with_diffs=True, scale=strength)
        write_lora(folder / f"lora_{name}.safetensors", lora, "lightx2v")
    return folder


def _spec(folder, world_size: int, case: str, weights: str, **parallel) -> RuntimeSpec:
    precision, quantization, lora, two = CASES[case]
    return RuntimeSpec(
        str(folder / "high.safetensors"),
        ParallelConfig(world_size=world_size, **parallel),
        precision=precision,
        quantization=quantization,
        device="cpu",
        weights=weights,
        loras=(LoraFile(str(folder / "lora_a.safetensors"), 0.8),) if lora else (),
        second_model_path=str(folder / "low.safetensors") if two else None,
    )


def _modes(world_size: int) -> list[tuple[str, bool]]:
    modes = [("sync", False), ("ulysses", False), ("displaced", False)]
    if world_size % 2 == 0:
        modes += [("displaced", True), ("ulysses", True)]
    return [
        (mode, cfgp) for mode, cfgp in modes if mode != "ulysses" or CONFIG.num_heads % (world_size // (1 + cfgp)) == 0
    ]


def sharded_matrix(rank: int, world_size: int, folder) -> dict:
    """Every case x mode: digests of the replicated and the sharded run's last latents, and the sharded ranks'
    weight bytes."""
    from tiny_wan import sample_on_rank
    from wan_distrifusion.distrifusion.rank import apply_rank_loras, load_rank_models
    from wan_distrifusion.distrifusion.sharded_weights import is_sharded, resident_weight_bytes

    device = torch.device("cpu")
    job = tiny_job(steps=3, width=96, height=80)  # 5 x 6 token grid: uneven over 4 ranks
    results = {}
    for case in CASES:
        loaded = {}
        for weights in ("replicated", "sharded"):
            spec = _spec(folder, world_size, case, weights)
            loaded[weights] = load_rank_models(spec, device, weights)
        assert all(is_sharded(m) for m in loaded["sharded"]) and not any(is_sharded(m) for m in loaded["replicated"])
        results[f"{case}/bytes"] = [resident_weight_bytes(m) for m in loaded["sharded"]]
        for mode, cfgp in _modes(world_size):
            parallel = ParallelConfig(
                world_size=world_size, mode=mode, cfg_parallel=cfgp, patch_size=16, warmup_steps=1
            )  # displaced: stale K/V from the second step on
            for expert in range(len(loaded["replicated"])):
                out = {
                    weights: digest(sample_on_rank(models[expert], parallel, rank, device, job))
                    for weights, models in loaded.items()
                }
                results[f"{case}/{mode}/cfgp={cfgp}/expert={expert}"] = (out["replicated"], out["sharded"])
        if CASES[case][2]:  # a LoRA switch on the sharded ranks equals a replicated model loaded with that LoRA
            spec_b = _spec(folder, world_size, case, "replicated").with_changes(
                loras=(LoraFile(str(folder / "lora_b.safetensors"), -0.6),)
            )
            loaded_spec = _spec(folder, world_size, case, "sharded")
            chains = (spec_b.loras, *loaded_spec.expert_loras[1:])  # the first expert's chain changes
            assert apply_rank_loras(loaded["sharded"], loaded_spec, chains)["experts"] == [0]
            fresh = load_rank_models(spec_b, device, "replicated")[0]
            parallel = ParallelConfig(world_size=world_size, mode="sync", patch_size=16)
            switched = sample_on_rank(loaded["sharded"][0], parallel, rank, device, job)
            before = sample_on_rank(loaded["replicated"][0], parallel, rank, device, job)
            results[f"{case}/switch"] = (
                digest(sample_on_rank(fresh, parallel, rank, device, job)),
                digest(switched),
                relative_error(switched, before),
            )
    return results


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_sharded_weights_equal_replicated_bit_for_bit(files, world_size):
    per_rank = run_ranks("test_sharded_weights", "sharded_matrix", world_size, files, timeout=900)
    compared = 0
    for key in per_rank[0]:
        if key.endswith("/bytes") or key.endswith("/switch"):
            continue
        for rank, results in enumerate(per_rank):
            replicated, sharded = results[key]
            assert sharded == replicated, f"{key}, rank {rank}: sharded weights changed the result"
        compared += 1
    assert compared >= len(CASES) * 3
    for case, (precision, quantization, lora, _) in CASES.items():
        if lora:
            fresh, switched, change = per_rank[0][f"{case}/switch"]
            assert switched == fresh, "the re-merged sharded model differs from a model loaded with the new LoRA"
            assert change > 1e-2, "the LoRA switch changed nothing"
        planned, _ = weight_bytes(CONFIG, precision, quantization, world_size, "sharded")
        replicated, _ = weight_bytes(CONFIG, precision, quantization)
        for rank, results in enumerate(per_rank):
            for held in results[f"{case}/bytes"]:  # each expert
                assert abs(held - planned) < 0.1 * planned, f"{case} rank {rank}: holds {held} B, planned {planned} B"
                assert held < 0.85 * replicated


def compiled_pair(rank: int, world_size: int, folder) -> dict:
    """Digests of replicated and sharded runs with the blocks compiled (``compile_blocks``; aot_eager: dynamo's
    tracing of the gathered parameters without a C++ toolchain), in the sync and displaced modes."""
    from tiny_wan import sample_on_rank
    from wan_distrifusion.distrifusion.rank import load_rank_models

    device = torch.device("cpu")
    job = tiny_job(steps=3, width=96, height=80)
    torch._dynamo.reset()
    out = {}
    for weights in ("replicated", "sharded"):
        model = load_rank_models(_spec(folder, world_size, "bf16", weights), device, weights)[0]
        model.compile_blocks(backend="aot_eager")
        for mode in ("sync", "displaced"):
            parallel = ParallelConfig(world_size=world_size, mode=mode, patch_size=16, warmup_steps=1)
            out[f"{mode}/{weights}"] = digest(sample_on_rank(model, parallel, rank, device, job))
    return out


@pytest.mark.slow
def test_compiled_blocks_with_sharded_weights_equal_replicated(files):
    for rank, results in enumerate(run_ranks("test_sharded_weights", "compiled_pair", 2, files, timeout=600)):
        for mode in ("sync", "displaced"):
            assert results[f"{mode}/sharded"] == results[f"{mode}/replicated"], f"rank {rank}, {mode}"


def test_the_plan_counts_shards_and_gathered_blocks():
    replicated, none = weight_bytes(WAN_14B, "bf16", "disabled")
    sharded, gathered = weight_bytes(WAN_14B, "bf16", "disabled", 4, "sharded")
    assert none == 0 and 28.0e9 < replicated < 29.0e9
    assert 0.25 < sharded / replicated < 0.27  # the embeddings and head stay whole
    matrices, rest = block_parameter_counts(WAN_14B)
    assert gathered == 2 * 2 * (matrices + rest)  # two whole blocks in bf16
    plan = plan_memory(WAN_14B, ParallelConfig(world_size=4, mode="sync"), LATENT_480P_81, "bf16", weights="sharded")
    assert plan.weights_bytes == sharded and plan.gather_bytes == gathered
    assert "sharded weights" in plan.summary() and "gathered blocks" in plan.summary()
    two = plan_memory(WAN_14B, ParallelConfig(world_size=2), LATENT_480P_81, "bf16", models=2, weights="sharded")
    assert two.weights_bytes == 2 * weight_bytes(WAN_14B, "bf16", "disabled", 2, "sharded")[0]


def test_refusal_proposes_sharded_weights_cheapest_first():
    """14B bf16 on 2 x 24 GB cards: replicated weights alone (28 GB) do not fit, sharded ones do."""
    parallel = ParallelConfig(world_size=2, mode="displaced")
    with pytest.raises(WanDistriFusionError) as caught:
        plan_memory(WAN_14B, parallel, LATENT_480P_81, "bf16", device_free_bytes=23 * GIB, guidance_batch=1)
    message = str(caught.value)
    proposals = message.split("what would fit, cheapest first: ", 1)[1].rstrip(".").split("; ")
    assert all("sharded weights" in p for p in proposals if "GPUs" not in p and "offload" not in p), proposals
    streamed = [i for i, p in enumerate(proposals) if "offload" in p]
    assert streamed and min(streamed) > max(i for i, p in enumerate(proposals) if "sharded" in p), proposals
    first = re.fullmatch(r"(.+) \((\d+\.\d) GiB per rank\)", proposals[0])
    expected = plan_memory(
        WAN_14B, ParallelConfig(world_size=2, mode="sync"), LATENT_480P_81, "bf16", guidance_batch=1, weights="sharded"
    )
    assert first.group(1) == "sharded weights + sync mode", proposals  # the displaced stale K/V does not fit
    assert first.group(2) == f"{expected.total_bytes / GIB:.1f}"
    assert expected.total_bytes < 23 * GIB
    # already sharded: no sharded proposals, and the stated numbers are the sharded ones
    with pytest.raises(WanDistriFusionError) as caught:
        plan_memory(WAN_14B, parallel, LATENT_720P_81, "bf16", device_free_bytes=23 * GIB, weights="sharded")
    message = str(caught.value)
    assert "(sharded weights 13.5 GiB + gathered blocks 1.3 GiB + " in message
    assert "sharded weights + " not in message.split("free (", 1)[1].split(";", 1)[1]


def test_auto_shards_only_when_a_copy_does_not_fit():
    assert choose_weights(WAN_14B, "bf16", "disabled", 2, 23 * GIB) == "sharded"
    assert choose_weights(WAN_14B, "bf16", "disabled", 2, 79 * GIB) == "replicated"
    assert choose_weights(WAN_14B, "bf16", "fp8_e4m3fn", 2, 79 * GIB, models=2) == "replicated"
    assert choose_weights(WAN_14B, "bf16", "disabled", 2, 70 * GIB, models=2) == "sharded"  # two experts: 53 GiB
    assert choose_weights(WAN_1_3B, "bf16", "disabled", 2, 23 * GIB) == "replicated"
    assert choose_weights(WAN_14B, "bf16", "disabled", 1, 23 * GIB) == "replicated"  # nothing to shard over
    assert choose_weights(WAN_14B, "bf16", "disabled", 2, None) == "replicated"  # CPU


def test_unknown_or_impossible_weights_setting_is_refused(files):
    with pytest.raises(WanDistriFusionError, match=r"^weights: 'shared' is unknown; choose replicated, sharded"):
        _spec(files, 2, "fp32", "shared")
    with pytest.raises(WanDistriFusionError, match=r"^weights: sharded weights need 2 or more GPUs"):
        _spec(files, 1, "fp32", "sharded")
    spec = _spec(files, 2, "fp32", "sharded")
    assert RuntimeSpec.from_json(spec.to_json()).weights == "sharded"


@pytest.mark.slow
def test_sharded_group_switches_its_lora_and_says_it_is_sharded(files):
    """Real worker processes with sharded weights: the Status report says so, and a LoRA switch between jobs gives
    the replicated group's result bit for bit."""
    from wan_distrifusion.distrifusion.run import run_job
    from wan_distrifusion.distrifusion.status import format_report, status_report
    from wan_distrifusion.distrifusion.workers import start_runtime

    job = tiny_job()
    outputs = {}
    for weights in ("sharded", "replicated"):
        runtime = start_runtime(_spec(files, 2, "fp32+lora", weights, mode="sync", patch_size=16))
        try:
            first = run_job(runtime, job)
            runtime.apply_loras((LoraFile(str(files / "lora_b.safetensors"), -0.6),))
            outputs[weights] = (first, run_job(runtime, job))
            if weights == "sharded":
                assert runtime.status()["weights"] == "sharded"
                assert "weights sharded" in format_report(status_report(runtime))
        finally:
            runtime.close()
    assert torch.equal(outputs["sharded"][0], outputs["replicated"][0])
    assert torch.equal(outputs["sharded"][1], outputs["replicated"][1])
    assert relative_error(outputs["sharded"][0], outputs["sharded"][1]) > 1e-2


def test_offload_with_sharded_weights_is_refused(tmp_path):
    from wan_distrifusion.distrifusion.config import ParallelConfig
    from wan_distrifusion.distrifusion.settings import RuntimeSpec
    from wan_distrifusion.wanvideo.errors import WanDistriFusionError

    checkpoint = tmp_path / "model.safetensors"
    checkpoint.write_bytes(b"")
    with pytest.raises(WanDistriFusionError, match="offload: .*do not combine"):
        RuntimeSpec(str(checkpoint), ParallelConfig(world_size=2, mode="sync"), offload=True, weights="sharded")
    spec = RuntimeSpec(str(checkpoint), ParallelConfig(world_size=2, mode="sync"), offload=True, weights="auto")
    assert spec.offload and spec.weights == "auto"
