"""``cli.py`` end to end: generate at world size 2 against the in-process API, flag errors, the tiny model, remote ranks."""

from __future__ import annotations

import errno
import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny_wan import random_model, relative_error, tiny_config, write_checkpoint
from wan_distrifusion.distrifusion.config import ParallelConfig
from wan_distrifusion.distrifusion.job import GenerationJob
from wan_distrifusion.distrifusion.run import run_job
from wan_distrifusion.distrifusion.settings import RuntimeSpec
from wan_distrifusion.distrifusion.workers import WorkerGroup, start_runtime

CLI = Path(__file__).resolve().parents[1] / "cli.py"
SETTINGS = dict(width=64, height=48, length=5, steps=3, cfg=4.0, shift=3.0, seed=5, sampler="euler")

pytestmark = pytest.mark.slow


def run_cli(*args: str, cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    """``python cli.py ...`` as a user runs it: a script, from an unrelated working directory."""
    return subprocess.run([sys.executable, str(CLI), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def flags(settings: dict) -> list[str]:
    return [item for key, value in settings.items() for item in (f"--{key}", str(value))]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    checkpoint = write_checkpoint(folder / "tiny.safetensors", random_model(tiny_config(), seed=4))
    generator = torch.Generator().manual_seed(2)
    context = {
        "positive": torch.randn(1, 6, 32, generator=generator),
        "negative": torch.randn(1, 6, 32, generator=generator),
    }
    save_file(context, str(folder / "context.safetensors"))
    return checkpoint, folder / "context.safetensors", context


def in_process(checkpoint: Path, context: dict) -> torch.Tensor:
    runner = start_runtime(RuntimeSpec(checkpoint, device="cpu"))
    try:
        return run_job(runner, GenerationJob(positive=context["positive"], negative=context["negative"], **SETTINGS))
    finally:
        runner.close()


def test_generate_at_world_size_two_equals_the_in_process_api(files, tmp_path):
    checkpoint, context_file, context = files
    out = tmp_path / "out" / "latent.safetensors"
    result = run_cli(
        "generate",
        "--model",
        str(checkpoint),
        "--context",
        str(context_file),
        *flags(SETTINGS),
        "--world-size",
        "2",
        "--mode",
        "sync",
        "--patch-size",
        "16",
        "--device",
        "cpu",
        "--out",
        str(out),
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    latent = load_file(str(out))["latent"]
    assert relative_error(latent, in_process(checkpoint, context)) < 1e-5
    assert "3/3" in result.stderr  # tqdm's per-step bar
    assert "wrote latent [1, 4, 2, 6, 8]" in result.stdout and "total" in result.stdout and "comm gloo" in result.stdout
    assert "(attention sdpa, compile off (runs eager on cpu" in result.stdout  # compile on by default, eager here
    with safe_open(str(out), "pt") as handle:
        assert '"seed": 5' in handle.metadata()["settings"]


@pytest.mark.parametrize(
    ("bad", "named"),
    [
        (["--length", "80"], "length"),
        (["--mode", "fast"], "parallel mode"),
        (["--cfg", "nan"], "cfg"),
        (["--sampler", "foo"], "sampler"),
        (["--scheduler", "foo"], "scheduler"),
        (["--shift", "0"], "shift"),
        (["--easycache", "0.2,0.1"], "--easycache"),
        (["--easycache", "5"], "reuse_threshold"),
        (["--easycache", "0.2,0.9,0.5"], "start_percent"),
    ],
)
def test_a_bad_setting_exits_non_zero_naming_it(bad, named, tmp_path):
    result = run_cli(
        "generate", "--device", "cpu", *bad, "--out", str(tmp_path / "x.safetensors"), cwd=tmp_path, timeout=60
    )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {named}:"), result.stderr
    assert "starting" not in result.stdout and not (tmp_path / "x.safetensors").exists()
    assert "tiny random Wan" not in result.stdout  # refused before the model was built


def _cli_module():
    spec = importlib.util.spec_from_file_location("wan_distrifusion_cli", CLI)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_failed_write_keeps_the_finished_latent_and_says_where(files, tmp_path, capsys, monkeypatch):
    """The job is done when ``--out`` fails (disk full, folder removed): the latent is kept and the error says where."""
    checkpoint, context_file, context = files
    out = tmp_path / "clips" / "latent.safetensors"
    real_replace = os.replace

    def full_disk(source, target, *args, **kwargs):
        if Path(target) == out:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_replace(source, target, *args, **kwargs)

    monkeypatch.setattr(os, "replace", full_disk)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    args = ["generate", "--model", str(checkpoint), "--context", str(context_file), *flags(SETTINGS)]
    code = _cli_module().main([*args, "--device", "cpu", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 1 and not out.exists() and list(out.parent.iterdir()) == [], err  # no half file beside it
    found = re.search(
        r"^error: out: could not write .*latent\.safetensors \(No space left on device\); the finished "
        r"latent was saved to (\S+) instead: move it where you want it\.$",
        err.strip().splitlines()[-1],  # after tqdm's bar
    )
    assert found, err
    kept = Path(found.group(1))
    assert kept.parent == tmp_path and kept.name.startswith("latent-")
    assert relative_error(load_file(str(kept))["latent"], in_process(checkpoint, context)) < 1e-5


def test_a_starting_latent_sets_the_size_and_the_metadata_records_it(files, tmp_path):
    checkpoint, context_file, _ = files
    start = tmp_path / "start.safetensors"
    save_file({"latent": torch.randn(1, 4, 2, 6, 8, generator=torch.Generator().manual_seed(1))}, str(start))
    common = ["generate", "--model", str(checkpoint), "--context", str(context_file), "--steps", "2"]
    common += ["--denoise", "0.5", "--latent", str(start), "--device", "cpu"]
    out = tmp_path / "out.safetensors"
    result = run_cli(*common, "--width", "64", "--out", str(out), cwd=tmp_path)  # agrees with the latent: fine
    assert result.returncode == 0, result.stderr[-3000:]
    with safe_open(str(out), "pt") as handle:
        settings = json.loads(handle.metadata()["settings"])
    assert (settings["width"], settings["height"], settings["length"]) == (64, 48, 5), settings

    result = run_cli(*common, "--height", "128", "--out", str(tmp_path / "no.safetensors"), cwd=tmp_path)
    assert result.returncode == 1 and result.stderr.startswith("error: latent: [1, 4, 2, 6, 8] is 64x48 px, 5 frames")
    assert "--height 128" in result.stderr and not (tmp_path / "no.safetensors").exists()


def test_without_model_builds_a_tiny_random_wan_and_says_so(tmp_path):
    out = tmp_path / "tiny.safetensors"
    result = run_cli(
        "generate",
        "--width",
        "32",
        "--height",
        "32",
        "--length",
        "1",
        "--steps",
        "2",
        "--device",
        "cpu",
        "--out",
        str(out),
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (
        "no --model given: built a tiny random Wan (2 layers, dim 64) — output is noise, this only shows the pipeline"
        in result.stdout
    )
    assert "no --context given: seeded random text context" in result.stdout
    assert list(load_file(str(out))["latent"].shape) == [1, 16, 1, 4, 4]


def test_compile_is_asked_for_by_default_and_no_compile_turns_it_off():
    spec = importlib.util.spec_from_file_location("wdf_cli", CLI)
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    parse = cli.build_parser().parse_args
    command = ["generate", "--out", "x.safetensors"]
    assert parse(command).compile is True
    assert parse([*command, "--compile"]).compile is True
    assert parse([*command, "--no-compile"]).compile is False


def test_the_demo_uses_stale_kv_after_its_warm_up_and_says_how_often(tmp_path):
    """The README's main job (no --model, world size 2): more steps than warm-up, and the stale share printed."""
    out = tmp_path / "demo.safetensors"
    result = run_cli("generate", "--world-size", "2", "--out", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "DistriFusion (displaced): 6 of 8 computed steps used the previous step's K/V" in result.stdout, (
        result.stdout
    )


def test_easycache_skips_steps_on_every_rank_and_says_which(tmp_path):
    """--easycache at world size 2 (displaced): the skipped steps are printed, the stale-K/V share counts only the
    computed steps, -v logs rank 0's decisions in the CLI's own log, and the metadata records the settings."""
    out = tmp_path / "cached.safetensors"
    result = run_cli(
        "generate", "--world-size", "2", "--steps", "16", "--easycache", "0.3,0.1,0.9", "-v", "--out", str(out),
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    found = re.search(r"EasyCache - skipped (\d+)/16 steps \([\d.]+x speedup\); skipped calls \[", result.stdout)
    assert found and 0 < int(found.group(1)) < 16, result.stdout
    computed = 16 - int(found.group(1))
    decisions = re.findall(r"EasyCache \[verbose\] - (NOT )?skipping step", result.stdout + result.stderr)
    assert sum(not negated for negated in decisions) == 16 - computed and len(decisions) > 16 - computed
    assert f"DistriFusion (displaced): {computed - 2} of {computed} computed steps" in result.stdout, result.stdout
    with safe_open(str(out), "pt") as handle:
        assert (
            '"easycache": {"reuse_threshold": 0.3, "start_percent": 0.1, "end_percent": 0.9'
            in handle.metadata()["settings"]
        )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_cli_worker_serves_a_rank_of_a_group_led_elsewhere(files, tmp_path):
    """Rank 1 joins as `cli.py worker` (the multi-host command) and gets its jobs through the rendezvous."""
    checkpoint, _, context = files
    port = _free_port()
    remote = subprocess.Popen(
        [
            sys.executable,
            str(CLI),
            "worker",
            "--rank",
            "1",
            "--world-size",
            "2",
            "--master-addr",
            "127.0.0.1",
            "--master-port",
            str(port),
            "--model",
            str(checkpoint),
            "--device",
            "cpu",
            "--once",
        ],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    leader = WorkerGroup(
        RuntimeSpec(
            checkpoint,
            parallel=ParallelConfig(world_size=2, mode="sync", patch_size=16),
            device="cpu",
            local_ranks=1,
            master_port=port,
            start_timeout_s=120,
        )
    )
    try:
        leader.start()
        status = leader.status()
        assert [r["local"] for r in status["ranks"]] == [True, False]
        assert status["ranks"][1]["ready"] and status["ranks"][1]["pid"]
        job = GenerationJob(positive=context["positive"], negative=context["negative"], **SETTINGS)
        events = []
        latent = run_job(leader, job, progress=events.append)
        assert relative_error(latent, in_process(checkpoint, context)) < 1e-5
        assert len(events) == 3 and len(events[-1].memory_per_rank) == 2
    finally:
        leader.close()
    began = time.monotonic()
    output, _ = remote.communicate(timeout=30)
    assert remote.returncode == 0, output
    assert time.monotonic() - began < 15
    assert "joined the group" in output and "the group ended" in output


def test_cli_worker_once_exits_non_zero_when_it_cannot_join(files, tmp_path):
    checkpoint, _, _ = files
    args = ["worker", "--once", "--rank", "1", "--world-size", "2", "--master-addr", "127.0.0.1"]
    args += ["--master-port", str(_free_port()), "--model", str(checkpoint), "--device", "cpu", "--start-timeout", "2"]
    result = run_cli(*args, cwd=tmp_path, timeout=60)
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "could not join" in result.stdout
    assert result.stderr.strip().startswith("error: master address: could not join the group at 127.0.0.1:")


def test_a_killed_clis_scratch_folder_is_removed_once_its_pid_is_gone(files, tmp_path):
    """``cli.py generate`` names its scratch folder after its pid, so a later run can tell it is an orphan."""
    from wan_distrifusion.distrifusion.processes import remove_orphaned_log_dirs

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    controller = subprocess.Popen(
        [sys.executable, str(CLI), "generate", "--steps", "400", "--device", "cpu", "--out", str(tmp_path / "x.st")],
        cwd=tmp_path,
        env={**os.environ, "TMPDIR": str(scratch)},
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        for line in controller.stdout:
            if line.startswith("starting"):
                break
        controller.send_signal(signal.SIGKILL)
        controller.wait(timeout=30)
    finally:
        if controller.poll() is None:
            controller.kill()
    left = [p for p in scratch.iterdir() if p.name.startswith("wan-distrifusion-cli-")]
    assert [p.name.split("-")[3] for p in left] == [str(controller.pid)], left
    assert (left[0] / "tiny_random_wan.safetensors").exists()
    alive = scratch / f"wan-distrifusion-cli-{os.getpid()}-running"  # a CLI still running: kept
    alive.mkdir()
    assert remove_orphaned_log_dirs(scratch) == left and not left[0].exists() and alive.exists()
