"""Faults of a worker group, with real processes (CPU, gloo, tiny Wan): a rank SIGKILLed mid-step (rank 0 of two
in a job and in a forward session, the middle rank of three), a rank raising CUDA's out-of-memory error mid-step
(``tests/fault_worker.py``), a rank that stops answering (SIGSTOP), and the controller SIGKILLed mid-step (group
started from the main thread, and from a worker thread as ComfyUI does).

Each test measures and asserts: the time until the controller raises (controller killed: until the ranks are
gone), that no process is left (no descendant of the controller, no process with the failed group's worker
command line), that the rendezvous port is closed and the group's log folder and shared memory are gone, that
the message names the rank and what happened, and that the next job works. ``tests/test_workers.py`` covers the
rest (rank 1 killed or stopped in a job and a session, every rank raising, the idle controller killed). The
numbers are printed in the terminal summary (README: fault behaviour).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
import torch
from measured import descendants, report_table
from tiny_wan import drive_euler, relative_error, tiny_job
from wan_distrifusion.distrifusion import processes
from wan_distrifusion.distrifusion.config import ParallelConfig
from wan_distrifusion.distrifusion.run import run_job
from wan_distrifusion.distrifusion.settings import RuntimeSpec
from wan_distrifusion.distrifusion.workers import WorkerFailed, WorkerGroup

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[1]
FAULT_WORKER = Path(__file__).resolve().with_name("fault_worker.py")
KILL_DETECT_S = 5.0
"""A killed or failing rank is noticed by polling its process and connection every 0.1 s."""
STEP_TIMEOUT_S = 2.0
HANG_MARGIN_S = 5.0
"""A hung rank is noticed after ``step_timeout_s`` and torn down within this margin."""
CONTROLLER_GONE_S = 5.0
"""Ranks of a dead controller exit within this (PR_SET_PDEATHSIG, else the 0.5 s parent watch / 1 s store watch)."""
CLEANUP_S = 5.0

MEASURED: list[tuple[str, str, float, float, float]] = []
"""(scenario, outcome, seconds to detect, seconds until no process is left, seconds of the next job incl. restart)."""


def new_group(checkpoint: Path, world_size: int = 2, **kwargs) -> WorkerGroup:
    parallel = ParallelConfig(world_size=world_size, mode="sync", patch_size=16)
    kwargs = {"step_timeout_s": 30.0, "start_timeout_s": 120.0, **kwargs}
    return WorkerGroup(RuntimeSpec(checkpoint, parallel=parallel, device="cpu", **kwargs))


@pytest.fixture(scope="module")
def group(checkpoint):
    """A two-rank group shared by the tests; a test that breaks it restarts it with its next job."""
    group = new_group(checkpoint)
    group.start()
    yield group
    group.close()


PREEXISTING: set[int] = set()
"""Processes below this one before the module started (e.g. the session's ComfyUI server): not ours to judge."""


@pytest.fixture(scope="module", autouse=True)
def preexisting():
    PREEXISTING.clear()
    PREEXISTING.update(p.pid for p in descendants())


@pytest.fixture(scope="module", autouse=True)
def measured(request):
    """The numbers this module measures, printed in the terminal summary (README: fault behaviour)."""
    table = report_table(
        request.config,
        "fault tests: measured",
        ["fault", "outcome", "detected after", "no process left after", "next job (restart + run)"],
    )
    MEASURED.clear()
    yield
    table.extend([s, o, f"{d:.2f} s", f"{c:.2f} s", "-" if n != n else f"{n:.2f} s"] for s, o, d, c, n in MEASURED)


# --- what "nothing left" means -----------------------------------------------------------------------------


def shared_memory() -> set[str]:
    """Entries in /dev/shm that torch, Python's multiprocessing or we could create."""
    try:
        names = os.listdir("/dev/shm")
    except OSError:  # no /dev/shm (macOS)
        return set()
    return {name for name in names if name.startswith(("torch_", "psm_", "sem.", "wnsm_", "wan"))}


def group_processes(port: int) -> list[psutil.Process]:
    """Every live process on this machine that runs a rank of the group whose store is on ``port``."""
    found = []
    for process in psutil.process_iter(["cmdline", "status"]):
        cmdline = process.info["cmdline"] or []
        if process.info["status"] == psutil.STATUS_ZOMBIE or "--master-port" not in cmdline:
            continue
        entry = any(part.endswith(("worker_main.py", "fault_worker.py")) for part in cmdline)
        if entry and cmdline[cmdline.index("--master-port") + 1] == str(port):
            found.append(process)
    return found


def port_closed(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return True
    return False


def wait_until_clean(pids: list[int], port: int) -> float:
    """Seconds until the ranks ``pids`` and every process of the group on ``port`` are gone (fails after CLEANUP_S)."""
    began = time.monotonic()
    while time.monotonic() - began < CLEANUP_S:
        if not any(psutil.pid_exists(pid) and _alive(pid) for pid in pids) and not group_processes(port):
            break
        time.sleep(0.02)
    seconds = time.monotonic() - began
    left = [p for p in pids if _alive(p)] + [p.pid for p in group_processes(port)]
    assert not left, f"rank processes left after {CLEANUP_S} s: {left}"
    return seconds


def assert_nothing_left(snapshot: dict, keep: set[int] = frozenset()) -> None:
    """No descendant (but ``keep``), no rank of the group, its port closed, its logs and shared memory gone."""
    left = descendants(keep | PREEXISTING)
    assert not left, f"processes left: {[(p.pid, p.cmdline()) for p in left]}"
    assert not group_processes(snapshot["port"])
    assert port_closed(snapshot["port"]), f"the rendezvous port {snapshot['port']} still accepts connections"
    if snapshot.get("log_dir"):
        assert not Path(snapshot["log_dir"]).exists(), f"log folder left: {snapshot['log_dir']}"
    assert shared_memory() <= snapshot["shm"], f"shared memory left: {shared_memory() - snapshot['shm']}"


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def snapshot_of(group: WorkerGroup) -> dict:
    status = group.status()
    assert status["alive"], "the group should be running before the fault"
    return {
        "pids": list(status["pids"]),
        "port": status["master_port"],
        "log_dir": status["log_dir"],
        "shm": shared_memory(),
    }


def next_job_works(group, reference: torch.Tensor, old_pids: list[int]) -> float:
    began = time.monotonic()
    latent = run_job(group, tiny_job())
    seconds = time.monotonic() - began
    assert relative_error(latent, reference) < 1e-5
    assert set(group.status()["pids"]).isdisjoint(old_pids), "the next job should run on a fresh group"
    return seconds


# --- a rank killed ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("world_size", "victim", "path"),
    [(2, 0, "job"), (2, 0, "session"), (3, 1, "job")],  # rank 1 of 2: tests/test_workers.py
    ids=["2ranks-rank0-job", "2ranks-rank0-session", "3ranks-rank1-job"],
)
def test_sigkilled_rank_fails_the_job_fast_and_leaves_nothing(world_size, victim, path, group, checkpoint, reference):
    if world_size == 2:
        runtime, keep = group, set()
    else:
        runtime, keep = new_group(checkpoint, world_size).start(), set(group.status()["pids"]) - {None}
    try:
        runtime.start()
        before = snapshot_of(runtime)
        killed_at = []

        def progress(event):
            if event.step == 2 and not killed_at:
                os.kill(before["pids"][victim], signal.SIGKILL)
                killed_at.append(time.monotonic())

        with pytest.raises(WorkerFailed) as caught:
            if path == "job":
                run_job(runtime, tiny_job(steps=200), progress=progress)
            else:
                drive_euler(runtime, tiny_job(steps=200), progress=progress)
        detect = time.monotonic() - killed_at[0]
        cleanup = wait_until_clean(before["pids"], before["port"])
        message = str(caught.value)
        assert caught.value.rank == victim, message
        assert f"rank {victim} exited with signal 9 (SIGKILL) during step" in message, message
        assert "the group was stopped; run again to restart it" in message
        assert not runtime.alive
        assert_nothing_left(before, keep)
        assert detect < KILL_DETECT_S, f"took {detect:.2f} s to notice"
        next_job = next_job_works(runtime, reference, before["pids"])
    finally:
        if runtime is not group:
            runtime.close()
    MEASURED.append(
        (
            f"SIGKILL rank {victim} of {world_size} ({path})",
            f"WorkerFailed naming rank {victim}",
            detect,
            cleanup,
            next_job,
        )
    )


# --- a rank raising (CUDA out of memory, injected by tests/fault_worker.py) ----------------------------------


def test_rank_out_of_memory_fails_the_job_naming_it_and_leaves_nothing(
    group, checkpoint, reference, monkeypatch, tmp_path
):
    stamp = tmp_path / "raised_at"
    monkeypatch.setattr(processes, "WORKER_MAIN", FAULT_WORKER)
    monkeypatch.setenv("WDF_FAULT", "oom:1:3")  # rank 1 raises in its 3rd model call, i.e. mid-step 3
    monkeypatch.setenv("WDF_FAULT_STAMP", str(stamp))
    runtime = new_group(checkpoint).start()
    try:
        before = snapshot_of(runtime)
        monkeypatch.delenv("WDF_FAULT")  # the restarted group runs plain workers
        with pytest.raises(WorkerFailed) as caught:
            run_job(runtime, tiny_job(steps=200))
        detect = time.time() - float(stamp.read_text())
        cleanup = wait_until_clean(before["pids"], before["port"])
        message = str(caught.value)
        assert caught.value.rank == 1, message
        assert message.startswith("rank 1 failed during step 3 of 200: torch.OutOfMemoryError: CUDA out of memory")
        assert "(out of memory: lower the resolution or length" in message  # what to change
        assert "rank 1's traceback" in message and "run again to restart it" in message
        assert_nothing_left(before, keep=set(group.status()["pids"]) - {None})
        assert detect < KILL_DETECT_S, f"took {detect:.2f} s to notice"
        next_job = next_job_works(runtime, reference, before["pids"])
    finally:
        runtime.close()
    MEASURED.append(
        ("rank 1 raises OutOfMemoryError (step 3)", "WorkerFailed naming rank 1 + fix", detect, cleanup, next_job)
    )


# --- a rank that stops answering ---------------------------------------------------------------------------


def test_stopped_rank_fails_the_job_after_the_step_timeout_and_leaves_nothing(group, reference):
    group.start()
    before = snapshot_of(group)
    group.step_timeout_s = STEP_TIMEOUT_S
    stopped_at = []

    def progress(event):
        if event.step == 2 and not stopped_at:
            os.kill(before["pids"][0], signal.SIGSTOP)  # alive, holds its memory, answers nothing
            stopped_at.append(time.monotonic())

    try:
        with pytest.raises(WorkerFailed) as caught:
            run_job(group, tiny_job(steps=200), progress=progress)
        detect = time.monotonic() - stopped_at[0]
        cleanup = wait_until_clean(before["pids"], before["port"])
    finally:
        group.step_timeout_s = 30.0
        for pid in before["pids"]:  # never leave a stopped process behind, even when the test fails
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
    message = str(caught.value)
    assert f"no progress from the workers for step_timeout_s = {STEP_TIMEOUT_S:.0f} s during step" in message
    assert "a rank is hung" in message and "run again to restart it" in message
    assert "rank 0 stopped" in message, message  # the stopped rank is named
    assert_nothing_left(before)
    assert STEP_TIMEOUT_S <= detect < STEP_TIMEOUT_S + HANG_MARGIN_S, f"took {detect:.2f} s to notice"
    next_job = next_job_works(group, reference, before["pids"])
    MEASURED.append(
        (
            f"SIGSTOP rank 0 (step_timeout_s {STEP_TIMEOUT_S:.0f})",
            "WorkerFailed: no progress",
            detect,
            cleanup,
            next_job,
        )
    )


# --- the controller killed -----------------------------------------------------------------------------------

CONTROLLER = """
import importlib.util, json, sys, threading
from pathlib import Path
root, checkpoint, where = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
spec = importlib.util.spec_from_file_location("wan_distrifusion", root / "__init__.py",
                                              submodule_search_locations=[str(root)])
package = importlib.util.module_from_spec(spec)
sys.modules["wan_distrifusion"] = package
spec.loader.exec_module(package)
import torch
from wan_distrifusion.distrifusion.config import ParallelConfig
from wan_distrifusion.distrifusion.job import GenerationJob
from wan_distrifusion.distrifusion.run import run_job
from wan_distrifusion.distrifusion.settings import RuntimeSpec
from wan_distrifusion.distrifusion.workers import WorkerGroup

def say(**fields):
    print(json.dumps(fields), flush=True)

def work():
    group = WorkerGroup(RuntimeSpec(checkpoint, parallel=ParallelConfig(world_size=2, mode="sync", patch_size=16), device="cpu",
                        start_timeout_s=120))
    group.start()
    status = group.status()
    say(pids=status["pids"], port=status["master_port"], log_dir=status["log_dir"])
    job = GenerationJob(positive=torch.randn(1, 8, 32), negative=torch.randn(1, 8, 32), width=64, height=48,
                        length=5, steps=100000, sampler="euler")
    run_job(group, job, progress=lambda event: say(step=event.step))

if where == "thread":  # as ComfyUI: the Loader starts the group in its prompt-worker thread (no PDEATHSIG)
    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
else:
    work()
"""


@pytest.mark.parametrize("where", ["main-thread", "thread"])
def test_killed_controller_mid_step_leaves_no_rank_and_the_next_controller_works(
    where, group, checkpoint, tmp_path, reference
):
    script = tmp_path / "controller.py"
    script.write_text(textwrap.dedent(CONTROLLER))
    shm = shared_memory()
    with open(tmp_path / "controller.log", "wb") as log:
        controller = subprocess.Popen(
            [sys.executable, str(script), str(REPO_ROOT), str(checkpoint), where],
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
        )
    info = {}
    try:
        for line in controller.stdout:
            info.update(json.loads(line))
            if info.get("step", 0) >= 2:
                break
        assert info.get("step", 0) >= 2, (tmp_path / "controller.log").read_text()[-3000:]
        assert all(_alive(pid) for pid in info["pids"])
        controller.kill()
        killed_at = time.monotonic()
        controller.wait()
        wait_until_clean(info["pids"], info["port"])
        detect = time.monotonic() - killed_at
        assert detect < CONTROLLER_GONE_S, f"the ranks took {detect:.2f} s to exit"
    finally:
        if controller.poll() is None:
            controller.kill()
            controller.wait()
        for pid in info.get("pids", []):  # leftovers of a failed test, by the ids the controller reported
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
    assert not descendants(keep=set(group.status()["pids"]) | PREEXISTING)
    assert port_closed(info["port"])
    assert shared_memory() <= shm
    # The dead controller could not remove its log folder (rank logs, a few KiB); it names the dead controller's
    # pid, and the next group started on this machine removes it.
    log_dir = Path(info["log_dir"])
    assert log_dir.name.startswith(f"{processes.LOG_DIR_PREFIX}{controller.pid}-"), log_dir
    assert log_dir.exists(), "a SIGKILLed controller cannot remove its log folder"
    assert sum(f.stat().st_size for f in log_dir.iterdir()) < 1 << 20
    try:
        began = time.monotonic()
        with new_group(checkpoint) as fresh:
            assert not log_dir.exists(), f"the next group's start left the dead controller's log folder {log_dir}"
            assert Path(fresh.status()["log_dir"]).exists()  # ours (this pid is alive): kept
            assert Path(group.status()["log_dir"]).exists()
            if where == "thread":  # once is enough: the new group also runs
                assert relative_error(run_job(fresh, tiny_job()), reference) < 1e-5
        next_job = time.monotonic() - began if where == "thread" else float("nan")
    finally:
        shutil.rmtree(log_dir, ignore_errors=True)
    leftover = "log folder removed by the next group's start"
    MEASURED.append(
        (
            f"controller SIGKILLed mid-step (group started in {where})",
            f"ranks exit; {leftover}",
            detect,
            detect,
            next_job,
        )
    )
