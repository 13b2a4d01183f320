"""The ``auto`` parallel mode: exact (sync) when too few steps would use stale K/V, displaced otherwise, resolved per
job the same way on every rank and reported by the Status node."""

from __future__ import annotations

import pytest
from tiny_wan import relative_error, tiny_job
from wan_distrifusion.distrifusion.config import AUTO_MIN_STALE_STEPS, ParallelConfig
from wan_distrifusion.distrifusion.run import run_job
from wan_distrifusion.distrifusion.settings import RuntimeSpec
from wan_distrifusion.distrifusion.status import RunActivity, format_report, status_report
from wan_distrifusion.distrifusion.workers import start_runtime


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
    mode, why = config.auto_choice(steps, sync_frequency)
    assert mode == picked and "stale K/V" in why
    assert config.for_job(steps, sync_frequency).mode == picked
    assert ParallelConfig(world_size=2, mode="ulysses").for_job(steps).mode == "ulysses"  # only auto is resolved
    assert AUTO_MIN_STALE_STEPS == 8


def test_cfg_parallel_on_two_ranks_has_nothing_to_exchange():
    assert ParallelConfig(world_size=2, mode="auto", cfg_parallel=True).auto_choice(30)[0] == "sync"


@pytest.mark.slow
def test_auto_runs_exact_for_a_few_steps_and_displaced_for_many(checkpoint, reference):
    parallel = ParallelConfig(world_size=2, mode="auto", patch_size=16, warmup_steps=1)
    group = start_runtime(RuntimeSpec(checkpoint, parallel=parallel, device="cpu", start_timeout_s=120))
    try:
        few = run_job(group, tiny_job())  # 3 steps: 2 would be stale -> sync
        stats = group.status()["last_job_stats"]
        assert stats["mode"] == "sync"
        assert relative_error(few, reference) < 1e-5
        run_job(group, tiny_job(steps=10))  # 9 stale -> displaced
        stats = group.status()["last_job_stats"]
        assert stats["mode"] == "displaced" and stats["stale_steps"] == 9
    finally:
        group.close()


def test_status_says_what_auto_picked_and_why(tmp_path):
    model = tmp_path / "wan.safetensors"
    model.write_bytes(b"0")
    spec = RuntimeSpec(str(model), ParallelConfig(world_size=2, mode="auto", warmup_steps=2), device="cpu")
    activity = RunActivity()
    activity.begin(4)
    text = format_report(status_report(activity=activity, spec=spec))
    assert "auto picked sync for the last job (4 steps): 2 of 4 steps would use stale K/V" in text
