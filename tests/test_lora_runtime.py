"""LoRA chains on the runtime: merged at load on every rank, switched between jobs on the running ranks (same pids)."""

from __future__ import annotations

import pytest
import torch
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


# -- Wan 2.2 A14B: one chain per expert ------------------------------------------------------------------------------

HIGH = tiny_config(version="2.2", expert="high_noise")
LOW = tiny_config(version="2.2", expert="low_noise")


@pytest.fixture(scope="module")
def experts(tmp_path_factory):
    """Two tiny experts of one A14B-shaped pair and one LoRA for each (the 4-step LoRAs come as such a pair)."""
    folder = tmp_path_factory.mktemp("experts")
    found = {}
    for name, config, seed in (("high", HIGH, 5), ("low", LOW, 6)):
        model = random_model(config, seed=seed)
        lora = random_lora(config, seed=seed + 10, with_diffs=True, scale=0.1)
        found[name] = {
            "state": model.state_dict(),
            "config": config,
            "checkpoint": str(write_checkpoint(folder / f"{name}_noise.safetensors", model)),
            "lora": lora,
            "lora_path": str(write_lora(folder / f"4steps_{name}_noise.safetensors", lora, "lightx2v")),
        }
    return folder, found


def _merged_reference(folder, expert: dict, strength: float, job):
    """``job`` on the expert's checkpoint with its LoRA merged in directly, in-process."""
    state = reference_merge(expert["state"], expert["lora"], strength)
    name = f"{expert['config'].expert}_{strength}.safetensors"
    merged = write_checkpoint(folder / name, state, config=expert["config"])
    runner = start_runtime(RuntimeSpec(str(merged), device="cpu"))
    try:
        return run_job(runner, job.with_changes(expert=0))  # the merged file is this runtime's only model
    finally:
        runner.close()


def test_second_chain_needs_a_second_model(experts):
    _, found = experts
    high, low = found["high"], found["low"]
    with pytest.raises(WanDistriFusionError, match="^second lora: .*no second model"):
        RuntimeSpec(high["checkpoint"], device="cpu", second_loras=(LoraFile(low["lora_path"]),))
    spec = RuntimeSpec(
        high["checkpoint"],
        device="cpu",
        second_model_path=low["checkpoint"],
        loras=(LoraFile(high["lora_path"], 1.0),),
        second_loras=(LoraFile(low["lora_path"], 0.5),),
    )
    assert RuntimeSpec.from_json(spec.to_json()) == spec
    assert [[lora.strength for lora in chain] for chain in spec.expert_loras] == [[1.0], [0.5]]


@pytest.mark.parametrize("world_size", [1, 2])
def test_each_expert_merges_its_own_chain_and_a_change_re_merges_only_that_expert(experts, world_size):
    folder, found = experts
    high, low = found["high"], found["low"]
    parallel = ParallelConfig(world_size=world_size, mode="sync", patch_size=16)
    spec = RuntimeSpec(
        high["checkpoint"],
        parallel=parallel,
        device="cpu",
        second_model_path=low["checkpoint"],
        loras=(LoraFile(high["lora_path"], 1.0),),
        second_loras=(LoraFile(low["lora_path"], 1.0),),
        start_timeout_s=120,
    )
    jobs = [tiny_job(cfg=1.0, negative=None, expert=expert) for expert in (0, 1)]
    runtime = start_runtime(spec)
    try:
        pids = runtime.status()["pids"]
        first = [run_job(runtime, job) for job in jobs]
        assert runtime.apply_loras(spec.loras, (LoraFile(low["lora_path"], -0.7),)) == (1,)  # only the low expert
        second = [run_job(runtime, job) for job in jobs]
        assert runtime.apply_loras(spec.loras, (LoraFile(low["lora_path"], -0.7),)) == ()  # nothing changed
        assert runtime.apply_loras((), (LoraFile(low["lora_path"], -0.7),)) == (0,)
        third = run_job(runtime, jobs[0])
        assert runtime.status()["pids"] == pids  # no restart
    finally:
        runtime.close()
    errors = {
        "high at 1.0": relative_error(first[0], _merged_reference(folder, high, 1.0, jobs[0])),
        "low at 1.0": relative_error(first[1], _merged_reference(folder, low, 1.0, jobs[1])),
        "high kept at 1.0": relative_error(second[0], first[0]),
        "low at -0.7": relative_error(second[1], _merged_reference(folder, low, -0.7, jobs[1])),
        "high without LoRA": relative_error(third, _merged_reference(folder, high, 0.0, jobs[0])),
    }
    print(f"world size {world_size}, per-expert chains vs directly merged checkpoints: {errors}")
    assert torch.equal(second[0], first[0])  # the high expert was not touched by the low expert's change
    assert relative_error(second[1], first[1]) > 1e-2  # the low expert's strength really changed its result
    assert relative_error(first[1], first[0]) > 1e-2  # the two experts are different models
    assert max(errors.values()) < 1e-5


def test_loader_checks_each_chain_against_its_own_expert(experts, tmp_path):
    """The Loader's ``lora`` / ``second_lora`` inputs: a chain for a missing second model, or a LoRA that does not
    fit its expert, is refused naming the input and the file before any worker starts."""
    from wan_distrifusion.nodes.lora import with_loras
    from wan_distrifusion.nodes.runtime import RuntimeSettings

    _, found = experts
    high, low = found["high"], found["low"]
    alone = RuntimeSettings("high", (0, 0), RuntimeSpec(high["checkpoint"], device="cpu"))
    with pytest.raises(WanDistriFusionError, match="^second lora: .*second model is none"):
        with_loras(alone, None, (LoraFile(low["lora_path"]),))
    pair = RuntimeSettings(
        "high", (0, 0), RuntimeSpec(high["checkpoint"], device="cpu", second_model_path=low["checkpoint"]), "low"
    )
    settings = with_loras(pair, (LoraFile(high["lora_path"]),), (LoraFile(low["lora_path"], 0.5),))
    assert settings.spec.expert_loras == ((LoraFile(high["lora_path"]),), (LoraFile(low["lora_path"], 0.5),))
    assert settings.same_group(pair)  # a chain change re-merges on the running group, never restarts it
    wide = write_lora(tmp_path / "wide.safetensors", random_lora(tiny_config(dim=128, version="2.2"), seed=2), "kohya")
    with pytest.raises(WanDistriFusionError, match="wide.safetensors"):
        with_loras(pair, None, (LoraFile(str(wide)),))


def test_status_names_each_experts_chain(experts):
    from wan_distrifusion.distrifusion.status import RunActivity, format_report, status_report

    _, found = experts
    spec = RuntimeSpec(
        found["high"]["checkpoint"],
        device="cpu",
        second_model_path=found["low"]["checkpoint"],
        loras=(LoraFile(found["high"]["lora_path"], 1.0),),
        second_loras=(LoraFile(found["low"]["lora_path"], 0.5),),
    )
    text = format_report(status_report(activity=RunActivity(), spec=spec))
    assert "LoRA: 4steps_high_noise.safetensors at 1" in text, text
    assert "LoRA of the second model: 4steps_low_noise.safetensors at 0.5" in text, text
