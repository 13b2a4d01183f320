"""Worker lifecycle on CPU/gloo with a tiny Wan: results, progress, cancel, failures, parent death, import name."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
import torch
from tiny_wan import drive_euler, relative_error, tiny_job
from wan_distrifusion.distrifusion import bootstrap
from wan_distrifusion.distrifusion.config import ParallelConfig
from wan_distrifusion.distrifusion.job import GenerationJob
from wan_distrifusion.distrifusion.run import run_job
from wan_distrifusion.distrifusion.session import ForwardSession
from wan_distrifusion.distrifusion.settings import RuntimeSpec
from wan_distrifusion.distrifusion.store import OpenSession, decode_command, encode_command
from wan_distrifusion.distrifusion.workers import (
    JobCancelled,
    WorkerFailed,
    WorkerGroup,
    start_runtime,
)
from wan_distrifusion.wanvideo.errors import WanDistriFusionError

REPO_ROOT = Path(__file__).resolve().parents[1]
FAILURE_BOUND_S = 30.0

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def group(checkpoint):
    parallel = ParallelConfig(world_size=2, mode="sync", patch_size=16)
    group = WorkerGroup(
        RuntimeSpec(checkpoint, parallel=parallel, device="cpu", step_timeout_s=30, start_timeout_s=120)
    )
    group.start()
    yield group
    pids = [pid for pid in group.status()["pids"] if pid]
    group.close()
    _assert_gone(pids)


def _assert_gone(pids, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        alive = [pid for pid in alive if _alive(pid)]
        time.sleep(0.1)
    assert not alive, f"worker processes left behind: {alive}"


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_group_of_two_equals_in_process_and_reports_every_step(group, reference):
    events = []
    latent = run_job(group, tiny_job(), progress=events.append)
    assert relative_error(latent, reference) < 1e-5
    assert [event.step for event in events] == [1, 2, 3]
    assert all(event.total == 3 and len(event.memory_per_rank) == 2 for event in events)
    assert all(memory > 0 for event in events for memory in event.memory_per_rank)
    assert all(event.seconds_per_step > 0 for event in events)
    status = group.status()
    assert status["alive"] and status["world_size"] == 2 and status["comm_backend"] == "gloo"
    assert len(status["pids"]) == 2 and all(_alive(pid) for pid in status["pids"])
    assert status["current_step"] == 3 and status["last_error"] is None
    json.dumps(status)  # the Status node serves it as JSON


def test_cancel_stops_every_rank_at_the_same_step_and_the_group_is_reusable(group, reference):
    events = []
    with pytest.raises(JobCancelled) as caught:
        run_job(group, tiny_job(steps=200), progress=events.append, cancelled=lambda: len(events) >= 2)
    cancel = caught.value
    assert 2 <= cancel.step < 200
    assert cancel.stopped_steps == {0: cancel.step, 1: cancel.step}
    assert events[-1].step == cancel.step
    assert group.alive
    assert relative_error(run_job(group, tiny_job()), reference) < 1e-5


def test_exception_in_progress_cancels_all_ranks_then_propagates(group, reference):
    class Interrupted(Exception):
        pass

    def progress(event):
        if event.step == 2:
            raise Interrupted

    with pytest.raises(Interrupted):
        run_job(group, tiny_job(steps=200), progress=progress)
    assert group.alive
    assert relative_error(run_job(group, tiny_job()), reference) < 1e-5


def test_killed_worker_fails_the_job_in_bounded_time_and_the_next_job_restarts(group, reference):
    old_pids = group.start().status()["pids"]  # an earlier test may have left it stopped
    others = {p.pid for p in psutil.Process().children(recursive=True)} - set(old_pids)  # e.g. a ComfyUI fixture
    killed_at = []

    def progress(event):
        if event.step == 2 and not killed_at:
            os.kill(old_pids[1], signal.SIGKILL)
            killed_at.append(time.monotonic())

    with pytest.raises(WorkerFailed) as caught:
        run_job(group, tiny_job(steps=200), progress=progress)
    elapsed = time.monotonic() - killed_at[0]
    assert elapsed < FAILURE_BOUND_S
    message = str(caught.value)
    assert "rank 1 exited with signal 9" in message and "during step" in message and "run again" in message
    assert caught.value.rank == 1
    assert not group.alive
    _assert_gone(old_pids)
    left = [p for p in psutil.Process().children(recursive=True) if p.pid not in others]
    assert not [p for p in left if p.status() != psutil.STATUS_ZOMBIE]

    latent = run_job(group, tiny_job())  # starts a fresh group
    assert relative_error(latent, reference) < 1e-5
    assert set(group.status()["pids"]).isdisjoint(old_pids)


def _hang_a_rank_mid_run(group, run, message: str) -> None:
    """SIGSTOP rank 1 after the first step of ``run(job, progress)``: it must fail with ``message`` within the
    3 s step timeout plus a margin, and leave no process behind."""
    pids = group.start().status()["pids"]  # an earlier test may have left it stopped
    group.step_timeout_s = 3.0
    stopped = []

    def progress(event):
        if event.step == 1 and not stopped:
            os.kill(pids[1], signal.SIGSTOP)  # alive but making no progress
            stopped.append(time.monotonic())

    try:
        with pytest.raises(WorkerFailed, match=message):
            run(tiny_job(steps=200), progress)
        assert time.monotonic() - stopped[0] < 3.0 + 10.0
    finally:
        group.step_timeout_s = 30.0
    _assert_gone(pids)


def test_hung_worker_fails_the_job_after_the_step_timeout(group):
    run = lambda job, progress: run_job(group, job, progress=progress)  # noqa: E731
    _hang_a_rank_mid_run(group, run, "no progress from the workers for step_timeout_s = 3 s")


def test_worker_error_comes_back_with_its_traceback(group, checkpoint):
    job = tiny_job()
    job.extra["model_kwargs"] = {"no_such_argument": 1}  # every rank's model call raises TypeError
    with pytest.raises(WorkerFailed) as caught:
        run_job(group, job)
    message = str(caught.value)
    assert "failed during step 1 of 3" in message and "TypeError" in message and "traceback" in message


def test_close_is_idempotent_and_leaves_no_process(checkpoint, reference):
    group = WorkerGroup(
        RuntimeSpec(
            checkpoint,
            parallel=ParallelConfig(world_size=2, mode="sync", patch_size=16),
            device="cpu",
            start_timeout_s=120,
        )
    )
    with group:
        assert relative_error(run_job(group, tiny_job()), reference) < 1e-5
        pids = group.status()["pids"]
    group.close()
    assert not group.alive
    _assert_gone(pids, within=1.0)


def test_in_process_runner_cancels_at_the_step(checkpoint, reference):
    runner = start_runtime(RuntimeSpec(checkpoint, device="cpu"))
    events = []
    with pytest.raises(JobCancelled) as caught:
        run_job(runner, tiny_job(steps=50), progress=events.append, cancelled=lambda: len(events) >= 2)
    assert caught.value.step == 2
    assert relative_error(run_job(runner, tiny_job()), reference) < 1e-5
    assert runner.status()["world_size"] == 1
    runner.close()
    runner.close()


# --- forward sessions: the controller runs the sampler, the ranks evaluate the model -----------------------


@pytest.fixture(scope="module")
def runner(checkpoint):
    runner = start_runtime(RuntimeSpec(checkpoint, device="cpu"))
    yield runner
    runner.close()


def test_forward_session_in_process_equals_the_job(runner, reference):
    events = []
    assert torch.equal(drive_euler(runner, tiny_job(), progress=events.append), reference)
    assert [event.step for event in events] == [1, 2, 3] and all(event.total == 3 for event in events)
    assert runner.status()["current_step"] == 3


def test_forward_session_of_two_equals_in_process_and_reports_every_call(group, reference):
    events = []
    latent = drive_euler(group, tiny_job(), progress=events.append)
    assert relative_error(latent, reference) < 1e-5
    assert [event.step for event in events] == [1, 2, 3]
    assert all(len(event.memory_per_rank) == 2 and min(event.memory_per_rank) > 0 for event in events)
    assert group.status()["current_step"] == 3
    assert relative_error(run_job(group, tiny_job()), reference) < 1e-5  # run_job after a raw session


def test_forward_session_checks_its_input_and_ends(group, runner):
    for runtime in (group, runner):
        with runtime.forward_session(tiny_job()) as model:
            with pytest.raises(WanDistriFusionError, match="shape"):
                model(torch.zeros(1, 4, 2, 6, 7), 500.0)
        with pytest.raises(WanDistriFusionError, match="ended"):
            model(torch.zeros(1, 4, 2, 6, 8), 500.0)


def test_forward_session_hands_x_to_the_ranks_on_its_device():
    """A sampler keeping its latents on the session's ``device`` (the GPU in-process) copies nothing per call; x
    from elsewhere is moved there. Here the session's device is ``meta``, the caller's the CPU."""
    seen = []

    class MetaSession(ForwardSession):
        def _evaluate(self, x, t):
            seen.append(x.device)
            return torch.full(self.shape, t), torch.zeros(self.shape), 0.0, (0,), False

    job = tiny_job()
    session = MetaSession(job, job.latent_shape(4), None, None, return_uncond=True)
    session.device, session._open = torch.device("meta"), True
    flow = session(torch.zeros(job.latent_shape(4)), 500.0)
    assert seen == [torch.device("meta")]
    assert flow.device.type == "cpu" and torch.all(flow == 500.0)


def test_in_process_session_runs_on_the_models_device(runner):
    with runner.forward_session(tiny_job()) as model:
        assert model.device == runner._device


def test_forward_session_returns_the_unguided_flow_on_request(group, runner):
    job = tiny_job()
    x = torch.randn(job.latent_shape(4), generator=torch.Generator().manual_seed(3))
    cond_only = GenerationJob(**{**vars(tiny_job()), "negative": None})
    uncond_only = GenerationJob(**{**vars(tiny_job()), "positive": job.negative, "negative": None})
    with runner.forward_session(cond_only) as model:
        cond = model(x, 700.0)
    with runner.forward_session(uncond_only) as model:
        uncond = model(x, 700.0)
    for runtime in (runner, group):
        with runtime.forward_session(job, return_uncond=True) as model:
            guided = model(x, 700.0)
            assert relative_error(model.last_uncond, uncond) < 1e-5
        assert relative_error(guided, uncond + job.cfg * (cond - uncond)) < 1e-5
        with runtime.forward_session(GenerationJob(**{**vars(tiny_job()), "cfg": 1.0}), return_uncond=True) as model:
            assert relative_error(model(x, 700.0), cond) < 1e-5  # cfg 1: cond and uncond still batched
            assert relative_error(model.last_uncond, uncond) < 1e-5


def test_forward_session_cancel_between_calls_stops_every_rank_at_the_same_call(group, reference):
    events = []
    with pytest.raises(JobCancelled) as caught:
        drive_euler(group, tiny_job(steps=200), progress=events.append, cancelled=lambda: len(events) >= 2)
    assert caught.value.step == 2 and caught.value.stopped_steps == {0: 2, 1: 2}
    assert group.alive
    assert relative_error(drive_euler(group, tiny_job()), reference) < 1e-5


def test_exception_inside_a_forward_session_ends_it_on_every_rank(group, reference):
    class Interrupted(Exception):
        pass

    def progress(event):
        if event.step == 2:
            raise Interrupted

    pids = group.status()["pids"]
    with pytest.raises(Interrupted):
        drive_euler(group, tiny_job(steps=200), progress=progress)
    assert group.alive and group.status()["pids"] == pids
    assert relative_error(drive_euler(group, tiny_job()), reference) < 1e-5


def test_in_process_forward_session_cancels_between_calls(runner, reference):
    events = []
    with pytest.raises(JobCancelled) as caught:
        drive_euler(runner, tiny_job(steps=50), progress=events.append, cancelled=lambda: len(events) >= 2)
    assert caught.value.step == 2 and caught.value.stopped_steps == {0: 2}
    assert torch.equal(drive_euler(runner, tiny_job()), reference)


def test_killed_worker_during_a_forward_session_fails_in_bounded_time_and_the_next_restarts(group, reference):
    old_pids = group.start().status()["pids"]  # an earlier test may have left it stopped
    killed_at = []

    def progress(event):
        if event.step == 2 and not killed_at:
            os.kill(old_pids[1], signal.SIGKILL)
            killed_at.append(time.monotonic())

    with pytest.raises(WorkerFailed) as caught:
        drive_euler(group, tiny_job(steps=200), progress=progress)
    assert time.monotonic() - killed_at[0] < FAILURE_BOUND_S
    message = str(caught.value)
    assert "rank 1 exited with signal 9" in message and "during step 3" in message and "run again" in message
    assert not group.alive
    _assert_gone(old_pids)

    assert relative_error(drive_euler(group, tiny_job()), reference) < 1e-5  # a fresh group
    assert set(group.status()["pids"]).isdisjoint(old_pids)


def test_hung_worker_fails_the_forward_session_after_the_step_timeout(group, reference):
    run = lambda job, progress: drive_euler(group, job, progress=progress)  # noqa: E731
    _hang_a_rank_mid_run(group, run, "no progress from the workers for step_timeout_s = 3 s")
    assert relative_error(drive_euler(group, tiny_job()), reference) < 1e-5


def test_forward_session_counts_steps_like_the_job_path_in_displaced_mode(checkpoint):
    """Each call is one step of the displaced runtime: warm-up then stale K/V, exactly as in a job."""
    parallel = ParallelConfig(world_size=2, mode="displaced", patch_size=16, warmup_steps=1)
    with WorkerGroup(
        RuntimeSpec(checkpoint, parallel=parallel, device="cpu", step_timeout_s=30, start_timeout_s=120)
    ) as group:
        job_latent = run_job(group, tiny_job(steps=4))
        assert group.status()["last_job_stats"]["stale_steps"] == 3
        session_latent = drive_euler(group, tiny_job(steps=4))
        assert group.status()["last_job_stats"]["stale_steps"] == 3
    assert relative_error(session_latent, job_latent) < 1e-6


CONTROLLER = """
import importlib, importlib.util, json, sys, time
from pathlib import Path
import torch
root = Path(sys.argv[1])
name = "ComfyUI-WanVideo-DistriFusion"  # how ComfyUI imports the pack: its hyphenated folder name
spec = importlib.util.spec_from_file_location(name, root / "__init__.py", submodule_search_locations=[str(root)])
package = importlib.util.module_from_spec(spec)
sys.modules[name] = package
spec.loader.exec_module(package)
workers = importlib.import_module(name + ".distrifusion.workers")
config = importlib.import_module(name + ".distrifusion.config")
job_module = importlib.import_module(name + ".distrifusion.job")
run_job = importlib.import_module(name + ".distrifusion.run").run_job
group = workers.WorkerGroup(workers.RuntimeSpec(sys.argv[2], parallel=config.ParallelConfig(world_size=2, mode="sync", patch_size=16),
                            device="cpu", start_timeout_s=120))
group.start()
job = job_module.GenerationJob(positive=torch.randn(1, 8, 32), negative=None, width=32, height=32, length=1, steps=2)
latent = run_job(group, job)
print(json.dumps({"pids": group.status()["pids"], "shape": list(latent.shape),
                  "alias_loaded": "wan_distrifusion" in sys.modules}), flush=True)
time.sleep(600)
"""


@pytest.fixture(scope="module")
def hyphenated_controller(tmp_path_factory, checkpoint):
    script = tmp_path_factory.mktemp("controller") / "controller.py"
    script.write_text(textwrap.dedent(CONTROLLER))
    log = script.with_suffix(".log")
    with open(log, "wb") as stderr:
        process = subprocess.Popen(
            [sys.executable, str(script), str(REPO_ROOT), str(checkpoint)],
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            cwd=script.parent,
        )
    line = process.stdout.readline()
    if not line:
        process.kill()
        pytest.fail(f"controller failed: {log.read_text()[-3000:]}")
    info = json.loads(line)
    yield process, info
    if process.poll() is None:
        process.kill()
        process.wait()
    for pid in info["pids"]:  # leftovers of a failed test, by the ids the controller reported
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_pack_imported_under_a_hyphenated_name_starts_workers(hyphenated_controller):
    _, info = hyphenated_controller
    assert info["shape"] == [1, 4, 1, 4, 4]
    assert not info["alias_loaded"]  # the controller never needed our alias; only the workers use it
    assert len(info["pids"]) == 2


def test_workers_exit_when_the_controller_dies(hyphenated_controller):
    process, info = hyphenated_controller
    assert all(_alive(pid) for pid in info["pids"])
    process.kill()
    process.wait()
    _assert_gone(info["pids"], within=10.0)


def test_job_payload_round_trips_without_pickle():
    job = tiny_job(latent=torch.randn(1, 4, 2, 6, 8), extra={"clip_fea": torch.randn(1, 3, 5), "note": {"a": [1, 2]}})

    def command(number, job):
        return OpenSession(number, job, (1, 4, 2, 6, 8), False, "latents", (0, 1))

    back = decode_command(encode_command(command(5, job)))
    assert back.session == 5
    back = back.job
    assert torch.equal(back.positive, job.positive) and torch.equal(back.latent, job.latent)
    assert torch.equal(back.extra["clip_fea"], job.extra["clip_fea"]) and back.extra["note"] == {"a": [1, 2]}
    assert (back.steps, back.seed, back.sampler) == (job.steps, job.seed, job.sampler)
    job = job.with_changes(negative=None)
    assert decode_command(encode_command(command(6, job))).job.negative is None
    job = job.with_changes(extra={"callback": print})
    with pytest.raises(WanDistriFusionError, match=r"job.extra\['callback'\]"):
        encode_command(command(7, job))


def test_group_settings_are_checked_before_anything_starts(checkpoint, tmp_path):
    with pytest.raises(WanDistriFusionError, match="model"):
        WorkerGroup(RuntimeSpec(tmp_path / "missing.safetensors", parallel=ParallelConfig(world_size=2), device="cpu"))
    with pytest.raises(WanDistriFusionError, match="precision"):
        WorkerGroup(RuntimeSpec(checkpoint, precision="fp64", parallel=ParallelConfig(world_size=2), device="cpu"))
    with pytest.raises(WanDistriFusionError, match="GPUs"):
        WorkerGroup(RuntimeSpec(checkpoint, parallel=ParallelConfig(world_size=2), device="cpu", local_ranks=3))
    follower = WorkerGroup(
        RuntimeSpec(checkpoint, parallel=ParallelConfig(world_size=2), device="cpu", first_rank=1, master_port=29999)
    )
    with pytest.raises(WanDistriFusionError, match="rank 0"):
        run_job(follower, tiny_job())


def test_bootstrap_registers_the_alias_once(tmp_path):
    package = bootstrap.register_package()
    assert package is sys.modules[bootstrap.PACKAGE_ALIAS]
    assert bootstrap.register_package() is package
    with pytest.raises(ImportError, match="already taken"):
        bootstrap.register_package(bootstrap.PACKAGE_ALIAS, tmp_path)
