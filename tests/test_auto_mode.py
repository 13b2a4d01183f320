"""The ``auto`` parallel mode: exact when too few steps would use stale K/V, else the fastest mode whose memory plan
fits (displaced, then sync, then ulysses), chosen once per job by the controller, run by every rank and reported by
the Status node."""

from __future__ import annotations

import dataclasses

import pytest
from parallel_harness import run_ranks, tiny_model
from tiny_wan import drive_euler, relative_error, tiny_job
from wan_distrifusion.distrifusion.config import AUTO_MIN_STALE_STEPS, ModeChoice, ParallelConfig
from wan_distrifusion.distrifusion.memory_plan import GIB, plan_job, plan_memory
from wan_distrifusion.distrifusion.settings import RuntimeSpec
from wan_distrifusion.distrifusion.status import RunActivity, format_report, status_report
from wan_distrifusion.distrifusion.store import OpenSession, decode_command, encode_command
from wan_distrifusion.distrifusion.workers import InProcessRunner, start_runtime
from wan_distrifusion.wanvideo.errors import WanDistriFusionError
from wan_distrifusion.wanvideo.model import WanConfig

WAN_14B = WanConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40)
LATENT_720P_81 = (1, 16, 21, 90, 160)


@pytest.mark.parametrize(
    ("steps", "warmup", "sync_frequency", "picked"),
    [
        (4, 2, 0, "sync"),  # the 4-step LoRA path: 2 stale steps
        (8, 1, 0, "sync"),  # 7 stale
        (9, 1, 0, "displaced"),  # 8 stale
        (30, 4, 0, "displaced"),
        (20, 4, 2, "displaced"),  # 8 stale
        (18, 4, 2, "sync"),  # 7 stale
    ],
)
def test_auto_picks_sync_for_few_stale_steps(steps, warmup, sync_frequency, picked):
    config = ParallelConfig(world_size=2, mode="auto", warmup_steps=warmup)
    choice = config.auto_choice(steps, sync_frequency)
    assert choice.mode == picked and "stale K/V" in choice.reason
    job = tiny_job(steps=steps, sync_frequency=sync_frequency)
    assert job.parallel_config(config).mode == picked  # no controller yet: the steps alone
    assert job.parallel_config(ParallelConfig(world_size=2, mode="ulysses")).mode == "ulysses"  # a set mode as set
    assert AUTO_MIN_STALE_STEPS == 8


def test_cfg_parallel_on_two_ranks_has_nothing_to_exchange():
    assert ParallelConfig(world_size=2, mode="auto", cfg_parallel=True).auto_choice(30).mode == "sync"


def test_a_job_runs_the_controllers_choice_not_the_steps_rule():
    job = tiny_job(steps=30, mode_choice=ModeChoice("sync", "displaced does not fit"))
    assert job.parallel_config(ParallelConfig(world_size=2, mode="auto")).mode == "sync"
    with pytest.raises(WanDistriFusionError, match="parallel mode: a job runs displaced, sync, ulysses, not 'auto'"):
        ModeChoice("auto", "unresolved")
    command = OpenSession(1, job, (1, 4, 2, 6, 8), False, "latents", (0, 1))
    assert decode_command(encode_command(command)).job.mode_choice == job.mode_choice  # through the store


# -- the memory part of the choice: 14B 720p x 81 (batch 1, cfg 1), free memory placed between the modes' plans --


def _needed(parallel: ParallelConfig, mode: str) -> int:
    plan = plan_memory(WAN_14B, dataclasses.replace(parallel, mode=mode), LATENT_720P_81, guidance_batch=1, check=False)
    return plan.total_bytes


def _gib(value: int) -> str:
    return f"{value / GIB:.1f} GiB"


def _choice(parallel: ParallelConfig, free: int | None, steps: int = 30) -> ModeChoice:
    job = tiny_job(steps=steps, cfg=1.0, negative=None, width=1280, height=720, length=81)
    assert job.latent_shape(16) == LATENT_720P_81
    job, plan = plan_job(WAN_14B, parallel, job, "bf16", "disabled", free)
    assert plan.mode == job.mode_choice.mode and (free is None or plan.fits)
    return job.mode_choice


def test_auto_runs_displaced_when_its_plan_fits():
    parallel = ParallelConfig(world_size=2, mode="auto", kv_dtype="fp8_e4m3fn")
    free = _needed(parallel, "displaced") + GIB
    choice = _choice(parallel, free)
    assert choice.mode == "displaced"
    assert choice.reason == (
        "26 of 30 steps would use stale K/V, at least 8: displaced hides the exchange behind each step; "
        f"displaced ({_gib(_needed(parallel, 'displaced'))} per rank) fits the {_gib(free)} free"
    )


def test_auto_runs_sync_where_displaced_does_not_fit():
    parallel = ParallelConfig(world_size=2, mode="auto", kv_dtype="fp8_e4m3fn")
    free = (_needed(parallel, "displaced") + _needed(parallel, "sync")) // 2
    choice = _choice(parallel, free)
    assert choice.mode == "sync"
    assert choice.reason.endswith(
        f"; displaced needs {_gib(_needed(parallel, 'displaced'))} per rank, the GPUs have {_gib(free)} free: "
        f"sync ({_gib(_needed(parallel, 'sync'))})"
    )


def test_auto_runs_ulysses_where_only_ulysses_fits():
    parallel = ParallelConfig(world_size=4, mode="auto")  # 40 heads over 4 GPUs: ulysses needs less than sync
    assert _needed(parallel, "ulysses") < _needed(parallel, "sync")
    free = (_needed(parallel, "ulysses") + _needed(parallel, "sync")) // 2
    choice = _choice(parallel, free)
    assert choice.mode == "ulysses"
    assert choice.reason.endswith(
        f"; displaced needs {_gib(_needed(parallel, 'displaced'))} per rank, sync needs "
        f"{_gib(_needed(parallel, 'sync'))} per rank, the GPUs have {_gib(free)} free: "
        f"ulysses ({_gib(_needed(parallel, 'ulysses'))})"
    )
    few = _choice(parallel, free, steps=4)  # exact anyway: still ulysses, as sync does not fit
    assert few.mode == "ulysses" and few.reason.startswith("0 of 4 steps would use stale K/V")


def test_auto_never_picks_ulysses_when_the_heads_do_not_split():
    parallel = ParallelConfig(world_size=3, mode="auto", kv_dtype="fp32")  # 40 heads over 3 GPUs
    free = (_needed(parallel, "ulysses") + _needed(parallel, "sync")) // 2
    assert _needed(parallel, "ulysses") < free  # ulysses' plan would fit, but ulysses cannot run
    with pytest.raises(WanDistriFusionError, match=r"memory: .*; displaced, 3 ranks"):  # the steps' mode, refused
        _choice(parallel, free)


def test_auto_keeps_the_refusal_with_its_proposals_when_nothing_fits():
    parallel = ParallelConfig(world_size=2, mode="auto")
    free = min(_needed(parallel, mode) for mode in ("displaced", "sync", "ulysses")) - GIB
    with pytest.raises(WanDistriFusionError, match=r"; displaced, 2 ranks.*what would fit, cheapest first: .*sync"):
        _choice(parallel, free)


def test_auto_on_the_cpu_has_no_memory_limit():
    choice = _choice(ParallelConfig(world_size=2, mode="auto"), None)
    assert choice.mode == "displaced" and "GiB" not in choice.reason


def test_a_set_mode_is_not_changed_by_memory():
    parallel = ParallelConfig(world_size=2, mode="displaced")
    with pytest.raises(WanDistriFusionError, match="memory: .*what would fit"):
        _choice(parallel, _needed(parallel, "sync") + GIB)


def test_mode_choice_table():
    """14B 720p x 81, bf16 weights, cfg 1 (batch 1), 4 warm-up steps: what auto picks (``pytest -s`` prints it)."""
    rows = [
        (2, "fp8_e4m3fn", 30, 79),
        (2, "fp8_e4m3fn", 4, 79),
        (2, "fp8_e4m3fn", 30, 40),
        (2, "auto", 30, 40),
        (4, "auto", 30, 32),
        (4, "auto", 4, 32),
        (2, "auto", 30, None),
    ]
    lines = ["| GPUs | K/V | steps | free per GPU | auto picks | why |", "| --- | --- | --- | --- | --- | --- |"]
    for world, kv, steps, free in rows:
        parallel = ParallelConfig(world_size=world, mode="auto", kv_dtype=kv)
        choice = _choice(parallel, None if free is None else free * GIB, steps)
        free_text = "CPU (no limit)" if free is None else f"{free} GiB"
        lines.append(f"| {world} | {kv} | {steps} | {free_text} | {choice.mode} | {choice.reason} |")
    print("\n" + "\n".join(lines))
    picks = [line.split(" | ")[4] for line in lines[2:]]
    assert picks == ["displaced", "sync", "sync", "sync", "ulysses", "ulysses", "displaced"]


# -- every rank runs the controller's choice --------------------------------------------------------------------


def ranks_follow_the_job(rank: int, world_size: int) -> list[str]:
    """On every rank of a gloo group: a 30-step job that the steps alone would run displaced, carrying the
    controller's choice of sync (and of ulysses), runs in that mode."""
    from wan_distrifusion.distrifusion.rank import job_model

    model = tiny_model(0)
    parallel = ParallelConfig(world_size=world_size, mode="auto", patch_size=16, warmup_steps=1)
    modes = []
    for picked in ("sync", "ulysses"):
        job = tiny_job(steps=30, mode_choice=ModeChoice(picked, "the controller's"))
        runner = job_model(model, parallel, rank, "cpu", job)
        modes.append(runner.parallel_config.mode)
    return modes


@pytest.mark.slow
def test_every_rank_runs_the_mode_the_job_carries():
    assert run_ranks("test_auto_mode", "ranks_follow_the_job", 2) == [["sync", "ulysses"]] * 2


@pytest.mark.slow
def test_the_group_runs_and_reports_the_controllers_choice(checkpoint):
    """2 CPU ranks: with a (faked) free memory between sync's and displaced's plans, a 10-step job that the steps
    alone would run displaced runs sync on every rank, equals the single process, and the Status node says why."""
    job = tiny_job(steps=10)
    parallel = ParallelConfig(world_size=2, mode="auto", patch_size=16, warmup_steps=1)
    with InProcessRunner(RuntimeSpec(checkpoint, ParallelConfig(mode="auto"), device="cpu")) as single:
        reference = drive_euler(single, job)
        assert single.status()["mode_choice"]["reason"] == "no tokens are split over ranks: nothing to exchange"
    group = start_runtime(RuntimeSpec(checkpoint, parallel=parallel, device="cpu", start_timeout_s=120))
    try:
        drive_euler(group, job)  # CPU: no memory limit, the steps decide
        assert group.status()["last_job_stats"]["mode"] == "displaced"

        def plan(mode):
            spec = group.spec
            mode_parallel = dataclasses.replace(parallel, mode=mode)
            return plan_job(group.model_config, mode_parallel, job, spec.precision, spec.quantization, check=False)[1]

        free = (plan("sync").total_bytes + plan("displaced").total_bytes) // 2
        group.smallest_free_memory = lambda: free
        out = drive_euler(group, job)
        stats = group.status()["last_job_stats"]
        assert stats["mode"] == "sync" and stats["stale_steps"] == 0
        assert relative_error(out, reference) < 1e-5
        for rank in range(2):  # each rank says which mode it ran and why: the controller's choice
            log = (group.processes.log_dir / f"rank{rank}.log").read_text()
            assert log.count("job runs in the sync mode (9 of 10 steps would use stale K/V") == 1
            assert "displaced needs" in log.split("job runs in the sync mode")[1].splitlines()[0]

        activity = RunActivity()
        activity.begin(10)
        text = format_report(status_report(group, activity))
        assert "auto picked sync for the last job: 9 of 10 steps would use stale K/V" in text
        assert "displaced needs" in text and "the GPUs have" in text and ": sync (" in text
    finally:
        group.close()
