"""Blocks streamed from host memory (``wanvideo/offload.py``): the same results as the resident model, bit for bit,
on one rank and on two (sync, displaced), with fp8 storage, compiled blocks and a LoRA switch; its bad inputs."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from parallel_harness import digest, run_ranks, tiny_model
from tiny_lora import random_lora, write_lora
from tiny_wan import random_model, tiny_config, tiny_job, write_checkpoint
from wan_distrifusion.distrifusion.config import ParallelConfig
from wan_distrifusion.distrifusion.memory_plan import (
    GIB,
    check_host_memory,
    check_offload_host_memory,
    plan_memory,
)
from wan_distrifusion.distrifusion.run import run_job
from wan_distrifusion.distrifusion.settings import RuntimeSpec
from wan_distrifusion.distrifusion.weight_memory import block_bytes
from wan_distrifusion.distrifusion.workers import start_runtime
from wan_distrifusion.wanvideo.errors import WanDistriFusionError
from wan_distrifusion.wanvideo.fp8 import Fp8Linear
from wan_distrifusion.wanvideo.loading import model_from_state_dict
from wan_distrifusion.wanvideo.lora import LoraFile
from wan_distrifusion.wanvideo.model import WanConfig
from wan_distrifusion.wanvideo.offload import BlockStreamer, stream_blocks_from_host

CONFIG = tiny_config()


def _inputs(shape=(2, 4, 3, 8, 12), steps=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen)
    context = torch.randn(shape[0], 9, CONFIG.text_dim, generator=gen)
    return [
        (x + 0.3 * step * torch.randn(shape, generator=gen), torch.full((shape[0],), 900.0 - 250 * step), context)
        for step in range(steps)
    ]


def _offloaded(model):
    twin = copy.deepcopy(model)
    streamer = stream_blocks_from_host(twin, "cpu")
    return twin, streamer


def _storages(module) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in list(module.parameters()) + list(module.buffers())}


def test_offloaded_forward_equals_resident_bit_for_bit_and_streams_through_the_ring():
    model = random_model(CONFIG, seed=1).to(torch.bfloat16)
    model.compute_dtype = torch.bfloat16
    model.fuse_projections()
    twin, streamer = _offloaded(model)
    host = [_storages(block) for block in twin.blocks]
    ring = [{t.untyped_storage().data_ptr() for t in slot} for slot in streamer._slots]
    seen = []
    for block in twin.blocks:  # where each block's weights are while it runs
        block.register_forward_pre_hook(lambda module, args: seen.append(_storages(module)))
    with torch.no_grad():
        for x, t, context in _inputs():
            assert torch.equal(twin(x, t, context), model(x, t, context))
    assert len(seen) == 3 * CONFIG.num_layers
    assert all(storages == ring[i % 2] for i, storages in enumerate(seen)), "a block ran outside its ring slot"
    assert [_storages(block) for block in twin.blocks] == host  # back on the host copies between forwards
    block_bytes = sum(
        t.numel() * t.element_size() for t in list(model.blocks.parameters()) + list(model.blocks.buffers())
    )
    assert streamer.host_bytes == block_bytes
    assert streamer.device_bytes == 2 * block_bytes // CONFIG.num_layers


def test_offloaded_fp8_storage_equals_resident():
    state = random_model(CONFIG, seed=2).state_dict()
    model = model_from_state_dict(state, dtype="bf16", quantization="fp8_e4m3fn", num_heads=CONFIG.num_heads)
    model.fuse_projections()
    assert any(isinstance(m, Fp8Linear) for m in model.blocks.modules())
    twin, streamer = _offloaded(model)
    scales = sum(m.scale_weight.numel() * 4 for m in twin.blocks.modules() if isinstance(m, Fp8Linear))
    assert scales and streamer.host_bytes >= scales  # the fp8 scales travel with their weights
    with torch.no_grad():
        for x, t, context in _inputs(steps=2):
            assert torch.equal(twin(x, t, context), model(x, t, context))


def test_offloaded_compiled_blocks_equal_resident_compiled_without_recompiling():
    from torch._dynamo.utils import counters

    model = random_model(CONFIG, seed=3)
    model.fuse_projections()
    twin, _ = _offloaded(model)
    model.compile_blocks(backend="aot_eager")
    twin.compile_blocks(backend="aot_eager")
    graphs = []
    with torch.no_grad():
        for x, t, context in _inputs(steps=3):
            assert torch.equal(twin(x, t, context), model(x, t, context))
            graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[0] == graphs[-1]  # the blocks' weights moving between host and ring slots recompiles nothing


def test_an_error_inside_a_block_leaves_every_block_on_its_host_copy():
    model = random_model(CONFIG, seed=4)
    twin, _ = _offloaded(model)
    host = [_storages(block) for block in twin.blocks]

    def fail(module, args):
        raise RuntimeError("boom")

    handle = twin.blocks[1].register_forward_pre_hook(fail)
    x, t, context = _inputs(steps=1)[0]
    with torch.no_grad(), pytest.raises(RuntimeError, match="boom"):
        twin(x, t, context)
    assert [_storages(block) for block in twin.blocks] == host
    handle.remove()
    with torch.no_grad():
        assert torch.equal(twin(x, t, context), model(x, t, context))


def test_bad_offload_settings_are_refused(tmp_path):
    model = random_model(CONFIG, seed=5)
    with pytest.raises(WanDistriFusionError, match="offload: a ring of 1"):
        BlockStreamer(model.blocks, torch.device("cpu"), ring=1)
    odd = copy.deepcopy(model)
    odd.blocks[1].ffn[0] = torch.nn.Linear(CONFIG.dim, 2 * CONFIG.ffn_dim)
    with pytest.raises(WanDistriFusionError, match="offload: block 1 has other tensors"):
        stream_blocks_from_host(odd, "cpu")
    twin, _ = _offloaded(model)
    with pytest.raises(WanDistriFusionError, match="already streams"):
        stream_blocks_from_host(twin, "cpu")
    twin.blocks[0] = copy.deepcopy(model.blocks[0])  # replaced after the set-up: refused, not run from elsewhere
    x, t, context = _inputs(steps=1)[0]
    with torch.no_grad(), pytest.raises(WanDistriFusionError, match="offload: block 0 was not set up"):
        twin(x, t, context)
    checkpoint = write_checkpoint(tmp_path / "tiny.safetensors", model)
    with pytest.raises(WanDistriFusionError, match="offload: 'yes' is not true or false"):
        RuntimeSpec(str(checkpoint), device="cpu", offload="yes")


def parallel_offload_matches(rank: int, world_size: int) -> dict:
    """Per mode: digests of several steps through ParallelWan, resident model vs its offloaded twin."""
    from wan_distrifusion.distrifusion.config import ParallelConfig
    from wan_distrifusion.distrifusion.parallel_model import ParallelWan
    from wan_distrifusion.wanvideo.offload import stream_blocks_from_host

    model = tiny_model(0, sharp=True)
    twin = copy.deepcopy(model)
    stream_blocks_from_host(twin, "cpu")
    results = {}
    with torch.no_grad():
        for mode in ("sync", "displaced", "ulysses"):
            config = ParallelConfig(world_size=world_size, mode=mode, patch_size=16, warmup_steps=1)
            outs = []
            for which in (model, twin):
                runner = ParallelWan(which, config, rank, "cpu")
                runner.begin_job()
                outs.append([digest(runner(x, t, c)) for x, t, c in _inputs(shape=(2, 4, 3, 10, 12), steps=4)])
                stale = runner.stats["stale_steps"]
                runner.close()
            results[mode] = (outs[0] == outs[1], stale, outs[1])
    return results


def test_offloaded_equals_resident_on_two_ranks_sync_and_displaced():
    results = run_ranks("test_offload", "parallel_offload_matches", 2)
    for mode in ("sync", "displaced", "ulysses"):
        assert all(rank[mode][0] for rank in results), mode
        assert results[0][mode][2] == results[1][mode][2], mode  # every rank returns the same prediction
    assert results[0]["displaced"][1] == 3  # the displaced run did use stale K/V


@pytest.fixture(scope="module")
def lora_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("offload_lora")
    checkpoint = write_checkpoint(folder / "tiny.safetensors", random_model(CONFIG, seed=6))
    lora = random_lora(CONFIG, seed=2, with_diffs=True, scale=0.1)
    return checkpoint, str(write_lora(folder / "style.safetensors", lora, "lightx2v"))


@pytest.mark.parametrize("world_size,mode", [(1, "sync"), (2, "displaced")])
def test_runtime_with_offload_and_a_lora_switch_equals_resident(lora_files, world_size, mode):
    checkpoint, lora_path = lora_files
    results = {}
    for offload in (False, True):
        spec = RuntimeSpec(
            str(checkpoint),
            parallel=ParallelConfig(world_size=world_size, mode=mode, patch_size=16, warmup_steps=1),
            device="cpu",
            loras=(LoraFile(lora_path, 1.0),),
            offload=offload,
            start_timeout_s=120,
        )
        runtime = start_runtime(spec)
        try:
            first = run_job(runtime, tiny_job())
            runtime.apply_loras((LoraFile(lora_path, -0.5),))
            second = run_job(runtime, tiny_job())
        finally:
            runtime.close()
        results[offload] = (first, second)
    assert not torch.equal(results[True][0], results[True][1])  # the switch changed the weights that stream
    assert torch.equal(results[True][0], results[False][0])
    assert torch.equal(results[True][1], results[False][1])


# -- the memory plan ---------------------------------------------------------------------------------------------
WAN_14B = WanConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40)
LATENT_720P_81 = (1, 16, 21, 90, 160)
CARD_24GB = 24 * 10**9 - GIB // 2  # what a 24 GB card has free with a desktop on it


@pytest.mark.parametrize("model_type", ["t2v", "i2v"])
def test_planned_block_bytes_are_what_the_streamer_holds(model_type):
    config = tiny_config(model_type=model_type)
    model = random_model(config, seed=7)
    model.fuse_projections()
    _, streamer = _offloaded(model)
    assert streamer.host_bytes == config.num_layers * block_bytes(config, "fp32", "disabled")
    assert streamer.device_bytes == 2 * block_bytes(config, "fp32", "disabled")
    plan = plan_memory(config, ParallelConfig(), (1, 4, 3, 8, 12), "fp32", check=False, offload=True)
    resident = plan_memory(config, ParallelConfig(), (1, 4, 3, 8, 12), "fp32", check=False)
    assert plan.host_bytes == streamer.host_bytes
    assert plan.weights_bytes == resident.weights_bytes - streamer.host_bytes + streamer.device_bytes


def test_14b_720p_fits_a_24gb_card_only_with_offload_and_the_refusal_says_so():
    for guidance in (1, 2):
        resident = plan_memory(WAN_14B, ParallelConfig(), LATENT_720P_81, "bf16", check=False, guidance_batch=guidance)
        offload = plan_memory(
            WAN_14B,
            ParallelConfig(),
            LATENT_720P_81,
            "bf16",
            device_free_bytes=CARD_24GB,
            guidance_batch=guidance,
            offload=True,
        )
        assert offload.fits and not resident.total_bytes < CARD_24GB
        ring = 2 * block_bytes(WAN_14B, "bf16", "disabled")
        assert 1.3e9 < ring < 1.5e9  # two 14B blocks of ~0.7 GB
        assert offload.weights_bytes == resident.weights_bytes - offload.host_bytes + ring
        assert 27e9 < offload.host_bytes < 29e9 and "pinned host memory: 26.2 GiB" in offload.summary()
    with pytest.raises(
        WanDistriFusionError,
        match=r"what would fit, cheapest first: offload \(\d+\.\d GiB per rank \+ 26.2 GiB pinned",
    ):
        plan_memory(WAN_14B, ParallelConfig(), LATENT_720P_81, "bf16", device_free_bytes=CARD_24GB)


def test_displaced_on_24gb_cards_is_refused_with_exact_modes_and_offload():
    """The stale K/V (31 GB per batch item in fp8 at 14B 720p) fits no 24 GB card: the plan proposes what does."""
    displaced = ParallelConfig(world_size=2, kv_dtype="fp8_e4m3fn")
    plan = plan_memory(WAN_14B, displaced, LATENT_720P_81, "bf16", guidance_batch=1, check=False, offload=True)
    assert 30e9 < plan.stale_kv_bytes < 32e9 and not plan.stale_kv_bytes < CARD_24GB
    with pytest.raises(WanDistriFusionError) as refused:
        plan_memory(WAN_14B, displaced, LATENT_720P_81, "bf16", device_free_bytes=CARD_24GB, offload=True)
    assert "sync mode (" in str(refused.value) and "ulysses mode (" in str(refused.value)
    with pytest.raises(WanDistriFusionError) as refused:
        plan_memory(WAN_14B, displaced, LATENT_720P_81, "bf16", device_free_bytes=CARD_24GB)
    assert "sync mode + offload (" in str(refused.value) and "CFG parallel + offload (" in str(refused.value)


def test_cpu_ranks_count_the_offloaded_blocks_in_the_hosts_ram():
    config = tiny_config()
    plan = plan_memory(config, ParallelConfig(), (1, 4, 3, 8, 12), "fp32", check=False, offload=True)
    check_host_memory(plan, 1, available_bytes=plan.total_bytes + plan.host_bytes, cores=4)
    with pytest.raises(WanDistriFusionError, match="memory: this job needs"):
        check_host_memory(plan, 1, available_bytes=plan.total_bytes + plan.host_bytes - 1, cores=4)


def test_cli_offload_equals_resident_and_records_it(lora_files, tmp_path):
    import json
    import subprocess
    import sys

    from safetensors import safe_open

    checkpoint, _ = lora_files
    cli = Path(__file__).resolve().parents[1] / "cli.py"
    outs = {}
    for offload in ([], ["--offload"]):
        out = tmp_path / f"latent{len(offload)}.safetensors"
        args = ["generate", "--model", str(checkpoint), "--width", "48", "--height", "32", "--length", "5"]
        args += ["--steps", "2", "--device", "cpu", "--out", str(out), *offload]
        result = subprocess.run([sys.executable, str(cli), *args], capture_output=True, text=True, timeout=240)
        assert result.returncode == 0, result.stderr[-3000:]
        with safe_open(str(out), "pt") as handle:
            outs[bool(offload)] = handle.get_tensor("latent")
            assert json.loads(handle.metadata()["settings"])["offload"] is bool(offload)
    assert torch.equal(outs[True], outs[False])


def test_offload_is_refused_before_loading_when_the_hosts_ram_cannot_hold_the_blocks():
    blocks = WAN_14B.num_layers * block_bytes(WAN_14B, "bf16", "disabled")
    assert check_offload_host_memory(WAN_14B, "bf16", "disabled", 2, available_bytes=2 * blocks) == 2 * blocks
    with pytest.raises(WanDistriFusionError, match=r"offload: 2 ranks on this host would pin 52.4 GiB .* fp8_e4m3fn"):
        check_offload_host_memory(WAN_14B, "bf16", "disabled", 2, available_bytes=40 * GIB)
    with pytest.raises(WanDistriFusionError, match=r"offload: 1 rank on this host would pin 26.2 GiB .* free RAM"):
        check_offload_host_memory(WAN_14B, "bf16", "fp8_e4m3fn", 1, models=2, available_bytes=20 * GIB)


def test_the_spec_check_before_start_runs_the_offload_check(lora_files, monkeypatch):
    from wan_distrifusion.distrifusion import memory_plan
    from wan_distrifusion.distrifusion.validation import check_spec_before_start

    checkpoint, _ = lora_files
    spec = RuntimeSpec(str(checkpoint), device="cpu", offload=True)
    assert check_spec_before_start(spec).num_layers == CONFIG.num_layers
    monkeypatch.setattr(memory_plan, "host_available_bytes", lambda: 1000)
    with pytest.raises(WanDistriFusionError, match="offload: 1 rank on this host would pin"):
        check_spec_before_start(spec)
    assert check_spec_before_start(spec.with_changes(offload=False)).num_layers == CONFIG.num_layers


def test_status_says_the_blocks_stream_from_host_memory(lora_files):
    from wan_distrifusion.distrifusion.status import RunActivity, format_report, status_report

    checkpoint, _ = lora_files
    spec = RuntimeSpec(str(checkpoint), device="cpu", offload=True)
    assert "offload" in format_report(status_report(activity=RunActivity(), spec=spec))
    assert "offload" not in format_report(status_report(activity=RunActivity(), spec=spec.with_changes(offload=False)))
