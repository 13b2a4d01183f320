"""LoRA chains on the runtime: merged at load on every rank, switched between jobs on the running ranks (same pids)."""

from __future__ import annotations

import pytest
from tiny_lora import random_lora, reference_merge, write_lora
from tiny_wan import random_model, relative_error, tiny_config, tiny_job, write_checkpoint
from wan_distrifusion.distrifusion.config import ParallelConfig
from wan_distrifusion.distrifusion.run import run_job
from wan_distrifusion.distrifusion.settings import RuntimeSpec
from wan_distrifusion.distrifusion.workers import start_runtime
from wan_distrifusion.wanvideo.errors import WanDistriFusionError
from wan_distrifusion.wanvideo.lora import LoraFile

CONFIG = tiny_config()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lora")
    model = random_model(CONFIG, seed=3)
    checkpoint = write_checkpoint(folder / "tiny.safetensors", model)
    lora = random_lora(CONFIG, seed=1, with_diffs=True, scale=0.1)
    lora_path = str(write_lora(folder / "lightx2v_style.safetensors", lora, "lightx2v"))
    return folder, model.state_dict(), checkpoint, lora, lora_path


def _reference(files, strength: float):
    """The job on a checkpoint with the LoRA merged in directly, in-process without any LoRA machinery."""
    folder, state, _, lora, _ = files
    merged = write_checkpoint(
        folder / f"merged_{strength}.safetensors", reference_merge(state, lora, strength), config=CONFIG
    )
    runner = start_runtime(RuntimeSpec(str(merged), device="cpu"))
    try:
        return run_job(runner, tiny_job())
    finally:
        runner.close()


def test_spec_carries_the_chain_through_json(files):
    _, _, checkpoint, _, lora_path = files
    spec = RuntimeSpec(str(checkpoint), device="cpu", loras=(LoraFile(lora_path, 0.5),))
    assert RuntimeSpec.from_json(spec.to_json()) == spec
    with pytest.raises(WanDistriFusionError, match="strength"):
        RuntimeSpec(str(checkpoint), device="cpu", loras=({"path": lora_path, "strength": float("inf")},))


@pytest.mark.parametrize("world_size", [1, 2])
def test_strength_change_re_merges_on_the_running_ranks(files, world_size):
    _, _, checkpoint, _, lora_path = files
    parallel = ParallelConfig(world_size=world_size, mode="sync", patch_size=16)
    spec = RuntimeSpec(
        str(checkpoint), parallel=parallel, device="cpu", loras=(LoraFile(lora_path, 1.0),), start_timeout_s=120
    )
    runtime = start_runtime(spec)
    try:
        pids = runtime.status()["pids"]
        first = run_job(runtime, tiny_job())
        runtime.apply_loras((LoraFile(lora_path, -0.6),))
        second = run_job(runtime, tiny_job())
        assert runtime.status()["pids"] == pids  # no restart
        runtime.apply_loras(())
        third = run_job(runtime, tiny_job())
    finally:
        runtime.close()
    errors = [
        relative_error(first, _reference(files, 1.0)),
        relative_error(second, _reference(files, -0.6)),
        relative_error(third, _reference(files, 0.0)),
    ]
    print(f"world size {world_size}: strength 1.0, -0.6, none vs the directly merged checkpoint: {errors}")
    assert relative_error(first, second) > 1e-2  # the strength really changed the result
    assert max(errors) < 1e-5


def test_status_names_the_chain(files):
    from wan_distrifusion.distrifusion.status import RunActivity, format_report, status_report

    _, _, checkpoint, _, lora_path = files
    spec = RuntimeSpec(str(checkpoint), device="cpu", loras=(LoraFile(lora_path, 0.75),))
    assert "LoRA: lightx2v_style.safetensors at 0.75" in format_report(status_report(activity=RunActivity(), spec=spec))
    plain = format_report(status_report(activity=RunActivity(), spec=spec.with_changes(loras=())))
    assert "LoRA" not in plain
