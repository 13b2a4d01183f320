"""Ranks on two "hosts": two network namespaces of this machine joined by a veth pair (gloo, CPU, tiny Wan).

Host A (``10.231.7.1``) runs the controller and rank 0 (``WorkerGroup(RuntimeSpec(local_ranks=1))``, as ComfyUI with world
size 2 and GPUs 1); host B (``10.231.7.2``) runs ``python cli.py worker --rank 1`` as a user would. The addresses
exist only inside the two namespaces, so no traffic leaves them. Checked: the result equals the single-process
one; cutting the link mid-job and killing host B mid-job both fail the job on the controller within a bounded
time, leave no rank on host A, and the next job runs once host B's worker is back. A cut link is noticed by the
remote rank's store heartbeat (well before the step timeout), and host B's rank behind the cut exits by itself
once the store stops answering, while its ``cli.py worker`` stays to join the next group.

Needs root and iproute2 (``ip netns``); skipped with the reason otherwise. The namespaces are removed at the end.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch
from measured import report_table
from safetensors.torch import load_file, save_file
from tiny_wan import random_model, relative_error, tiny_config, write_checkpoint
from wan_distrifusion.distrifusion.job import GenerationJob
from wan_distrifusion.distrifusion.run import run_job as sample_job
from wan_distrifusion.distrifusion.settings import REMOTE_HEARTBEAT_TIMEOUT_S, RuntimeSpec
from wan_distrifusion.distrifusion.store import STORE_LOST_ENV
from wan_distrifusion.distrifusion.workers import start_runtime

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[1]
CLI = REPO_ROOT / "cli.py"
HOST_A, HOST_B = "10.231.7.1", "10.231.7.2"
PORT = 29517
STEP_TIMEOUT_S = 120.0
"""Large, so that what notices a cut link is the remote rank's heartbeat, not the step timeout."""
LINK_CUT_BOUND_S = REMOTE_HEARTBEAT_TIMEOUT_S + 5.0
"""A cut link stalls the ranks' collective without an error: host B's rank stops counting ``alive/1``."""
REMOTE_STORE_LOST_S = 4.0
"""Host B's ranks exit after this long without an answer from the store (``STORE_LOST_ENV``; default 30 s)."""
HOST_KILLED_BOUND_S = 5.0
"""A killed host closes its connections: rank 0's collective fails at once."""
SETTINGS = dict(width=64, height=48, length=5, cfg=5.0, seed=7, sampler="euler")


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


def namespace_pids(namespace: str) -> set[int]:
    result = ip("netns", "pids", namespace, check=False)
    return {int(pid) for pid in result.stdout.split()}


def kill_namespace(namespace: str, within: float = 10.0) -> list[Path]:
    """SIGKILL every process in ``namespace`` (all started by this test) and wait until they are gone.

    A killed ``cli.py worker`` cannot remove its ranks' log folder: those folders (found through the ranks'
    stdout) are removed here and returned.
    """
    folders = set()
    for pid in namespace_pids(namespace):
        try:
            log = Path(os.readlink(f"/proc/{pid}/fd/1"))
        except OSError:
            continue
        if log.parent.name.startswith("wan-distrifusion-") and log.name.startswith("rank"):
            folders.add(log.parent)
    deadline = time.monotonic() + within
    while namespace_pids(namespace) and time.monotonic() < deadline:
        for pid in namespace_pids(namespace):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)
    assert not namespace_pids(namespace), f"processes left in namespace {namespace}: {namespace_pids(namespace)}"
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)
    return sorted(folders)


@pytest.fixture(scope="module")
def hosts():
    """Namespaces A and B with a veth pair between them; removed (with every process in them) at the end."""
    if os.name != "posix" or os.geteuid() != 0:
        pytest.skip("multi-host test needs root (ip netns)")
    if shutil.which("ip") is None:
        pytest.skip("multi-host test needs iproute2 (`apt-get install -y iproute2`)")
    tag = f"wdf{os.getpid() % 100000}"
    a, b = f"{tag}a", f"{tag}b"
    created = []
    try:
        for namespace in (a, b):
            result = ip("netns", "add", namespace, check=False)
            if result.returncode:
                pytest.skip(f"network namespaces unsupported here: {result.stderr.strip()}")
            created.append(namespace)
        veth = ip(
            "link", "add", f"{tag}va", "netns", a, "type", "veth", "peer", "name", f"{tag}vb", "netns", b, check=False
        )
        if veth.returncode:
            pytest.skip(f"veth pairs unsupported here: {veth.stderr.strip()}")
        for namespace, device, address in ((a, f"{tag}va", HOST_A), (b, f"{tag}vb", HOST_B)):
            ip("-n", namespace, "addr", "add", f"{address}/24", "dev", device)
            ip("-n", namespace, "link", "set", device, "up")
            ip("-n", namespace, "link", "set", "lo", "up")  # the controller's connection to its local ranks
        ping = subprocess.run(
            ["ip", "netns", "exec", a, sys.executable, "-c", _REACH, HOST_B], capture_output=True, text=True, timeout=30
        )
        if ping.returncode == 2:
            pytest.skip(f"veth between namespaces does not carry traffic here: {ping.stdout.strip()}")
        yield {"a": a, "b": b, "dev_a": f"{tag}va", "dev_b": f"{tag}vb"}
    finally:
        for namespace in created:
            try:
                kill_namespace(namespace)
            finally:
                ip("netns", "del", namespace, check=False)  # takes the veth pair with it


_REACH = """
import socket, sys
try:  # nothing listens there: a refusal proves the packets went to B and back
    socket.create_connection((sys.argv[1], 9), timeout=3).close()
except ConnectionRefusedError:
    sys.exit(0)
except OSError as error:
    print(error)
    sys.exit(2)
"""


# --- the two "hosts" --------------------------------------------------------------------------------------------

CONTROLLER = """
import importlib.util, json, sys, time, traceback
from pathlib import Path
root, checkpoint, context, host, port, step_timeout = sys.argv[1:7]
spec = importlib.util.spec_from_file_location("wan_distrifusion", Path(root) / "__init__.py",
                                              submodule_search_locations=[root])
package = importlib.util.module_from_spec(spec)
sys.modules["wan_distrifusion"] = package
spec.loader.exec_module(package)
from safetensors.torch import load_file, save_file
from wan_distrifusion.distrifusion.config import ParallelConfig
from wan_distrifusion.distrifusion.job import GenerationJob
from wan_distrifusion.distrifusion.run import run_job
from wan_distrifusion.distrifusion.settings import RuntimeSpec
from wan_distrifusion.distrifusion.workers import WorkerGroup
from wan_distrifusion.wanvideo.errors import WanDistriFusionError

def say(**fields):
    print(json.dumps(fields), flush=True)

conditioning = load_file(context)
group = WorkerGroup(RuntimeSpec(checkpoint, parallel=ParallelConfig(world_size=2, mode="sync", patch_size=16), device="cpu",
                    local_ranks=1, master_addr=host, master_port=int(port), step_timeout_s=float(step_timeout),
                    start_timeout_s=60))
say(ready=True)
for line in sys.stdin:
    command = json.loads(line)
    if command["cmd"] == "quit":
        break
    job = GenerationJob(positive=conditioning["positive"], negative=conditioning["negative"], **command["job"])
    began = time.monotonic()
    try:
        latent = run_job(group, job, progress=lambda event: say(step=event.step, pids=group.status()["pids"]))
    except WanDistriFusionError as error:
        say(error=str(error), rank=getattr(error, "rank", None), kind=type(error).__name__,
            alive=group.alive, seconds=time.monotonic() - began)
        continue
    save_file({"latent": latent.contiguous()}, command["out"])
    say(done=True, seconds=time.monotonic() - began, pids=group.status()["pids"])
group.close()
say(closed=True)
"""


class Process:
    """A process started in a namespace; its stdout lines (JSON for the controller) are read by a thread."""

    def __init__(self, namespace: str, command: list[str], env: dict, log: Path):
        self.log_path = log
        self._log = open(log, "wb")
        self.popen = subprocess.Popen(
            ["ip", "netns", "exec", namespace, *command],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            env={**os.environ, **env},
            text=True,
            cwd=REPO_ROOT,
        )
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.popen.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def expect(self, predicate, timeout: float) -> dict:
        """The first JSON line that satisfies ``predicate`` (fails on timeout or exit)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no matching output within {timeout:.0f} s; log:\n{self.log()}") from None
            if line is None:
                raise AssertionError(f"exited with {self.popen.wait()}; log:\n{self.log()}")
            try:
                message = json.loads(line)
            except json.JSONDecodeError:
                continue
            if predicate(message):
                return message

    def send(self, **command) -> None:
        self.popen.stdin.write(json.dumps(command) + "\n")
        self.popen.stdin.flush()

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-4000:]

    def close(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(timeout=10)
        self._log.close()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("multihost")
    checkpoint = write_checkpoint(folder / "tiny.safetensors", random_model(tiny_config(), seed=3))
    generator = torch.Generator().manual_seed(11)
    context = {
        "positive": torch.randn(1, 8, 32, generator=generator),
        "negative": torch.randn(1, 8, 32, generator=generator),
    }
    save_file(context, str(folder / "context.safetensors"))
    script = folder / "controller.py"
    script.write_text(textwrap.dedent(CONTROLLER))
    return {"folder": folder, "checkpoint": checkpoint, "context": folder / "context.safetensors", "script": script}


@pytest.fixture(scope="module")
def reference(files) -> torch.Tensor:
    context = load_file(str(files["context"]))
    runner = start_runtime(RuntimeSpec(files["checkpoint"], device="cpu"))
    try:
        return sample_job(
            runner, GenerationJob(positive=context["positive"], negative=context["negative"], steps=3, **SETTINGS)
        )
    finally:
        runner.close()


REMOTE_WORKERS: list[Process] = []


def start_remote_worker(hosts, files, name: str) -> Process:
    """``python cli.py worker --rank 1`` on host B, as the README says (killed with the namespace at the end)."""
    command = [sys.executable, str(CLI), "worker", "--rank", "1", "--world-size", "2", "--master-addr", HOST_A]
    command += ["--master-port", str(PORT), "--model", str(files["checkpoint"]), "--device", "cpu"]
    env = {"GLOO_SOCKET_IFNAME": hosts["dev_b"], STORE_LOST_ENV: str(REMOTE_STORE_LOST_S)}
    process = Process(hosts["b"], command, env, files["folder"] / f"{name}.log")
    REMOTE_WORKERS.append(process)
    return process


@pytest.fixture(scope="module")
def controller(hosts, files):
    command = [sys.executable, str(files["script"]), str(REPO_ROOT), str(files["checkpoint"]), str(files["context"])]
    command += [HOST_A, str(PORT), str(STEP_TIMEOUT_S)]
    process = Process(hosts["a"], command, {"GLOO_SOCKET_IFNAME": hosts["dev_a"]}, files["folder"] / "controller.log")
    try:
        process.expect(lambda m: m.get("ready"), timeout=60)
        yield process
        process.send(cmd="quit")
        process.expect(lambda m: m.get("closed"), timeout=30)
    finally:
        process.close()
        for remote in REMOTE_WORKERS:
            remote.close()


@pytest.fixture(scope="module")
def measured(request):
    return report_table(request.config, "multi-host tests: measured", ["event", "outcome", "detected after"])


def run_job(controller, out: Path, steps: int = 3, timeout: float = 90) -> dict:
    controller.send(cmd="run", job={**SETTINGS, "steps": steps}, out=str(out))
    return controller.expect(lambda m: "done" in m or "error" in m, timeout=timeout)


def cli_workers(hosts) -> set[int]:
    """``cli.py worker`` processes on host B."""
    found = set()
    for pid in namespace_pids(hosts["b"]):
        try:
            if str(CLI) in psutil.Process(pid).cmdline():
                found.add(pid)
        except psutil.NoSuchProcess:
            pass
    return found


def assert_only_the_controller_on_host_a(hosts, controller, within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while namespace_pids(hosts["a"]) - {controller.popen.pid} and time.monotonic() < deadline:
        time.sleep(0.05)
    left = namespace_pids(hosts["a"]) - {controller.popen.pid}
    assert not left, f"rank processes left on host A: {left}"


# --- tests (in order: they share the controller and host B's worker) ------------------------------------------------


def test_two_hosts_equal_single_process(hosts, files, controller, reference, measured):
    start_remote_worker(hosts, files, "worker-1")
    result = run_job(controller, files["folder"] / "two-hosts.safetensors")
    assert "done" in result, result
    latent = load_file(str(files["folder"] / "two-hosts.safetensors"))["latent"]
    error = relative_error(latent, reference)
    assert error < 1e-5
    assert len(namespace_pids(hosts["b"])) == 2  # cli.py worker and its rank 1
    measured.append(["job on 2 hosts (A: controller + rank 0, B: cli.py worker)", f"rel err {error:.1e}", "-"])


def test_cut_link_fails_the_job_on_the_controller_in_bounded_time(hosts, files, controller, reference, measured):
    cli_worker = cli_workers(hosts)
    assert len(cli_worker) == 1, cli_worker
    controller.send(cmd="run", job={**SETTINGS, "steps": 100000}, out=str(files["folder"] / "never.safetensors"))
    controller.expect(lambda m: m.get("step", 0) >= 2, timeout=60)
    remote_ranks = namespace_pids(hosts["b"]) - cli_worker
    assert len(remote_ranks) == 1, remote_ranks
    rank_gone = {}

    def watch_remote_rank() -> None:  # when host B's rank behind the cut exits (its store watchdog)
        while psutil.pid_exists(next(iter(remote_ranks))) and time.monotonic() - cut_at < 60:
            time.sleep(0.05)
        rank_gone["at"] = time.monotonic()

    ip("-n", hosts["a"], "link", "set", hosts["dev_a"], "down")
    cut_at = time.monotonic()
    watcher = threading.Thread(target=watch_remote_rank, daemon=True)
    watcher.start()
    try:
        failure = controller.expect(lambda m: "error" in m or "done" in m, timeout=LINK_CUT_BOUND_S + 10)
        detect = time.monotonic() - cut_at
        assert "error" in failure, failure
        assert failure["kind"] == "WorkerFailed" and not failure["alive"]
        message = failure["error"]
        assert re.match(r"rank 1 on host \S+ stopped answering for \d+ s during step \d+ of 100000", message), message
        assert "(link cut or host down" in message and "run again to restart it" in message
        assert detect < LINK_CUT_BOUND_S < STEP_TIMEOUT_S / 4, f"took {detect:.2f} s"
        assert_only_the_controller_on_host_a(hosts, controller)
        # Still cut: host B's rank cannot hear that the group is gone; its store watchdog ends it.
        watcher.join(timeout=max(0.0, REMOTE_STORE_LOST_S + 5 - (time.monotonic() - cut_at)))
        assert "at" in rank_gone, f"host B's rank {remote_ranks} still runs behind the cut link"
        rank_exit = rank_gone["at"] - cut_at
        assert rank_exit < REMOTE_STORE_LOST_S + 3, f"host B's rank took {rank_exit:.2f} s to exit"
        assert cli_workers(hosts) == cli_worker, "cli.py worker should stay, waiting for the next group"
    finally:
        ip("-n", hosts["a"], "link", "set", hosts["dev_a"], "up")
    measured.append(["link A-B cut mid-job", f"WorkerFailed: {message.split(' (')[0]}", f"{detect:.2f} s"])
    measured.append(
        [
            f"host B's rank behind the cut (store lost after {REMOTE_STORE_LOST_S:.0f} s)",
            "rank exits; cli.py worker stays",
            f"{rank_exit:.2f} s",
        ]
    )

    # Host B's `cli.py worker` (no --once) started a new rank, which joins the controller's next group by itself.
    began = time.monotonic()
    result = run_job(controller, files["folder"] / "after-cut.safetensors", timeout=90)
    rejoined = time.monotonic() - began
    assert "done" in result, result
    assert relative_error(load_file(str(files["folder"] / "after-cut.safetensors"))["latent"], reference) < 1e-5
    assert cli_workers(hosts) == cli_worker, "the same cli.py worker should serve the new group"
    measured.append(
        ["link restored", "same cli.py worker rejoins; next job equals single-process", f"{rejoined:.2f} s"]
    )


def test_killed_remote_host_fails_the_job_on_the_controller_in_bounded_time(
    hosts, files, controller, reference, measured
):
    controller.send(cmd="run", job={**SETTINGS, "steps": 100000}, out=str(files["folder"] / "never.safetensors"))
    controller.expect(lambda m: m.get("step", 0) >= 2, timeout=60)
    kill_namespace(hosts["b"])  # the whole host: cli.py worker and its rank
    killed_at = time.monotonic()
    failure = controller.expect(lambda m: "error" in m or "done" in m, timeout=HOST_KILLED_BOUND_S + 30)
    detect = time.monotonic() - killed_at
    assert "error" in failure, failure
    assert failure["kind"] == "WorkerFailed" and not failure["alive"]
    assert "run again to restart it" in failure["error"]
    assert HOST_B in failure["error"]  # gloo names the peer that closed the connection
    assert detect < HOST_KILLED_BOUND_S, f"took {detect:.2f} s: {failure['error']}"
    assert_only_the_controller_on_host_a(hosts, controller)
    first_line = failure["error"].splitlines()[0]
    reason = re.search(r"(Connection [a-z ]+|[A-Z][a-z]+ pipe|[Tt]imed out)[^.\[]*", failure["error"])
    outcome = f"WorkerFailed: {first_line.split(':')[0]} ({reason.group(0).strip() if reason else '?'}, peer {HOST_B})"
    measured.append(["host B killed mid-job", outcome, f"{detect:.2f} s"])

    start_remote_worker(hosts, files, "worker-3")
    result = run_job(controller, files["folder"] / "after-kill.safetensors")
    assert "done" in result, result
    assert relative_error(load_file(str(files["folder"] / "after-kill.safetensors"))["latent"], reference) < 1e-5
