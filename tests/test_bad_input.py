"""Bad input is refused before any worker starts, naming the widget and the fix.

Every case runs with ``processes.subprocess`` replaced by a guard that fails the test if a worker process would
be spawned, and checks with psutil that this process got no new child. ``distrifusion/validation.py`` holds the
checks that need the checkpoint's headers or the job (heads for Ulysses, partitions, conditioning width), which
the runtime runs before it starts or uses its workers. A property test over the widget space checks that any
combination is either refused up front with a clear error, or runs and equals the single-process result.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import time
import types
from functools import partial
from pathlib import Path

import psutil
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from parallel_harness import rel_err, run_ranks, tiny_model
from safetensors.torch import save_file
from tiny_wan import random_model, tiny_config, tiny_job, write_checkpoint
from wan_distrifusion.distrifusion import processes, workers
from wan_distrifusion.distrifusion.config import ParallelConfig
from wan_distrifusion.distrifusion.job import GenerationJob
from wan_distrifusion.distrifusion.run import run_job
from wan_distrifusion.distrifusion.settings import RuntimeSpec
from wan_distrifusion.distrifusion.validation import check_before_start, check_job
from wan_distrifusion.distrifusion.workers import WorkerGroup, start_runtime
from wan_distrifusion.nodes.loader import build_settings
from wan_distrifusion.wanvideo.errors import WanDistriFusionError

REPO_ROOT = Path(__file__).resolve().parents[1]
WIDGETS = (
    "GPUs",
    "world size",
    "rank",
    "device",
    "master port",
    "patch size",
    "patch overlap",
    "split mode",
    "parallel mode",
    "CFG parallel",
    "width",
    "height",
    "length",
    "positive",
    "negative",
    "latent",
    "model",
)
FIXES = (
    "use ",
    "choose ",
    "connect ",
    "lower ",
    "raise ",
    "set ",
    "turn ",
    "pick ",
    "download ",
    "encode ",
    "run on",
    "keep ",
)


class WorkerSpawned(BaseException):
    """Raised by the guard instead of starting a worker process."""


def guard_spawning(monkeypatch) -> list:
    """Replace ``processes.subprocess`` so that starting a worker raises ``WorkerSpawned``; the commands tried."""
    spawned = []

    def popen(command, *args, **kwargs):
        spawned.append(command)
        raise WorkerSpawned(f"a worker was started: {command[:4]}")

    guard = types.SimpleNamespace(
        Popen=popen, TimeoutExpired=subprocess.TimeoutExpired, DEVNULL=subprocess.DEVNULL, STDOUT=subprocess.STDOUT
    )
    monkeypatch.setattr(processes, "subprocess", guard)
    return spawned


@pytest.fixture
def no_spawn(monkeypatch):
    """Fail if a worker process is started: ``processes.subprocess.Popen`` raises, psutil sees no new child."""
    spawned = guard_spawning(monkeypatch)
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    yield spawned
    after = {p.pid for p in psutil.Process().children(recursive=True)}
    assert not spawned, f"worker processes were started: {spawned}"
    assert after <= before, f"new processes: {after - before}"


def assert_clear(error: BaseException, widget: str | None = None) -> str:
    """The message starts with a widget's name (``widget`` when given) and says what to do."""
    message = str(error)
    assert isinstance(error, WanDistriFusionError), f"{type(error).__name__}: {message}"
    named = [w for w in WIDGETS if message.startswith(w) or message.startswith(w.lower())]
    if widget is not None:
        assert widget in message.split(":")[0] or widget in message, f"{widget!r} not named: {message}"
    else:
        assert named, f"no widget named first: {message}"
    assert any(fix in message.lower() for fix in FIXES), f"no fix given: {message}"
    assert "Traceback" not in message and "\n" not in message.strip(), message
    return message


# --- files --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("bad-input")
    good = write_checkpoint(folder / "tiny.safetensors", random_model(tiny_config(), seed=3))
    save_file(
        {"encoder.conv1.weight": torch.randn(8, 3, 3, 3, 3), "decoder.conv1.weight": torch.randn(3, 8, 3, 3, 3)},
        str(folder / "vae.safetensors"),
    )
    data = good.read_bytes()
    (folder / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    return {
        "good": good,
        "vae": folder / "vae.safetensors",
        "truncated": folder / "truncated.safetensors",
        "missing": folder / "missing.safetensors",
    }


def make_job(**overrides) -> GenerationJob:
    return tiny_job(**{"steps": 2, **overrides})


def parallel(**overrides) -> ParallelConfig:
    return ParallelConfig(**{"world_size": 2, "mode": "sync", "patch_size": 16, **overrides})


# --- settings refused by the runtime before it spawns ---------------------------------------------------------

MORE_GPUS_THAN_PRESENT = max(2, torch.cuda.device_count() + 1)

RUNTIME_CASES = {
    # name: (call(files) -> anything, widget named, regex on the message)
    "more GPUs than present": (
        lambda f: start_runtime(
            RuntimeSpec(f["good"], parallel=parallel(world_size=MORE_GPUS_THAN_PRESENT), device="cuda")
        ),
        "GPUs",
        r"requested on this host but (no CUDA device is|\d+ CUDA device\(s\) are) visible",
    ),
    "GPUs more than the world size": (
        lambda f: WorkerGroup(RuntimeSpec(f["good"], parallel=parallel(), device="cpu", local_ranks=3)),
        "GPUs",
        r"3 local ranks starting at rank 0 do not fit a world of 2; use 1 to 2",
    ),
    "rank outside the world": (
        lambda f: WorkerGroup(RuntimeSpec(f["good"], parallel=parallel(), device="cpu", first_rank=2)),
        "rank",
        r"first rank 2 is outside the world of 2 ranks; use 0 to 1",
    ),
    "patch size not a multiple of 16": (
        lambda f: start_runtime(
            RuntimeSpec(f["good"], parallel=ParallelConfig(world_size=2, patch_size=24), device="cpu")
        ),
        "patch size",
        r"24 px is not a positive multiple of 16; use a multiple of 16 px",
    ),
    "overlap larger than the patch": (
        lambda f: start_runtime(
            RuntimeSpec(f["good"], parallel=ParallelConfig(world_size=2, patch_size=16, patch_overlap=32), device="cpu")
        ),
        "patch overlap",
        r"32 px is larger than the patch size \(16 px\); lower the overlap or raise the patch size",
    ),
    "CFG parallel on an odd world": (
        lambda f: start_runtime(
            RuntimeSpec(f["good"], parallel=parallel(world_size=3, cfg_parallel=True), device="cpu")
        ),
        "CFG parallel",
        r"needs an even world size, got 3; use an even number of GPUs",
    ),
    "missing checkpoint": (
        lambda f: start_runtime(RuntimeSpec(f["missing"], parallel=parallel(), device="cpu")),
        "model",
        r"does not exist; pick a Wan checkpoint",
    ),
}

RUNTIME_CASES_CHECKED_FROM_FILE = {
    "ulysses with heads not divisible": (
        lambda f: WorkerGroup(
            RuntimeSpec(f["good"], parallel=parallel(world_size=3, mode="ulysses"), device="cpu")
        ).start(),
        "parallel mode",
        r"4 attention heads do not split evenly over the 3 GPUs",
    ),
    "non-Wan checkpoint": (
        lambda f: WorkerGroup(RuntimeSpec(f["vae"], parallel=parallel(), device="cpu")).start(),
        "model",
        r"is not a Wan diffusion model",
    ),
    "truncated checkpoint": (
        lambda f: WorkerGroup(RuntimeSpec(f["truncated"], parallel=parallel(), device="cpu")).start(),
        "model",
        r"it is truncated",
    ),
    "frame count not 4k+1 (group not started yet)": (
        lambda f: run_job(WorkerGroup(RuntimeSpec(f["good"], parallel=parallel(), device="cpu")), make_job(length=4)),
        "length",
        r"4 frames is not of the form 4k\+1",
    ),
}


@pytest.mark.parametrize("case", list(RUNTIME_CASES))
def test_runtime_refuses_before_spawning(case, files, no_spawn):
    call, widget, pattern = RUNTIME_CASES[case]
    with pytest.raises(WanDistriFusionError) as caught:
        call(files)
    assert re.search(pattern, assert_clear(caught.value, widget)), str(caught.value)


@pytest.mark.parametrize("case", list(RUNTIME_CASES_CHECKED_FROM_FILE))
def test_runtime_checks_the_file_and_job_before_spawning(case, files, monkeypatch):
    guard_spawning(monkeypatch)
    call, widget, pattern = RUNTIME_CASES_CHECKED_FROM_FILE[case]
    with pytest.raises(WanDistriFusionError) as caught:
        call(files)
    assert re.search(pattern, assert_clear(caught.value, widget)), str(caught.value)


# --- the same and more through validation.py (what the Loader, the Sampler and the runtime can call) -----------

BEFORE_START_CASES = {
    # name: (check_before_start kwargs, file, widget, regex)
    "more GPUs than present": (
        dict(parallel=parallel(world_size=4), device="cuda", cuda_devices=2),
        "good",
        "GPUs",
        r"4 requested on this host but 2 CUDA device\(s\) are visible.*; lower GPUs to 2",
    ),
    "no GPU at all": (dict(parallel=parallel(), device="cuda", cuda_devices=0), "good", "GPUs", r"device cpu"),
    "world size smaller than GPUs": (
        dict(parallel=parallel(world_size=2), device="cpu", local_ranks=3),
        "good",
        "world size",
        r"smaller than this host's ranks 0..2; set world size to at least 3",
    ),
    "ranks past the world": (
        dict(parallel=parallel(world_size=2), device="cpu", local_ranks=2, first_rank=1),
        "good",
        "world size",
        r"ranks 1..2; set world size to at least 3",
    ),
    "rank outside the world": (
        dict(parallel=parallel(world_size=2), device="cpu", first_rank=5),
        "good",
        "rank",
        r"use 0 to 1",
    ),
    "patch size not a multiple of 16": (
        dict(parallel=partial(ParallelConfig, world_size=2, patch_size=40), device="cpu"),
        "good",
        "patch size",
        r"40 px",
    ),
    "overlap larger than a patch": (
        dict(parallel=partial(ParallelConfig, world_size=2, patch_size=16, patch_overlap=24), device="cpu"),
        "good",
        "patch overlap",
        r"larger than the patch size",
    ),
    "ulysses with heads not divisible": (
        dict(parallel=parallel(world_size=3, mode="ulysses"), device="cpu"),
        "good",
        "parallel mode",
        r"4 attention heads do not split evenly over the 3 GPUs.*use 1, 2, 4 GPUs",
    ),
    "ulysses with heads not divisible, CFG parallel": (
        dict(parallel=parallel(world_size=6, mode="ulysses", cfg_parallel=True), device="cpu"),
        "good",
        "parallel mode",
        r"over the 3 GPUs that share one batch item \(CFG parallel halves the GPUs\)",
    ),
    "non-Wan checkpoint": (dict(parallel=parallel(), device="cpu"), "vae", "model", r"not a Wan diffusion model"),
    "truncated checkpoint": (dict(parallel=parallel(), device="cpu"), "truncated", "model", r"download it again"),
    "missing checkpoint": (dict(parallel=parallel(), device="cpu"), "missing", "model", r"not found"),
}


@pytest.mark.parametrize("case", list(BEFORE_START_CASES))
def test_check_before_start_names_the_widget(case, files, no_spawn):
    kwargs, file, widget, pattern = BEFORE_START_CASES[case]
    with pytest.raises(WanDistriFusionError) as caught:  # an invalid ParallelConfig already fails when built
        check_before_start(files[file], **{name: v() if callable(v) else v for name, v in kwargs.items()})
    assert re.search(pattern, assert_clear(caught.value, widget)), str(caught.value)


def test_check_before_start_passes_good_settings(files, no_spawn):
    config = check_before_start(files["good"], parallel(world_size=4, mode="ulysses"), device="cpu")
    assert config.num_heads == 4 and config.text_dim == 32
    check_before_start(files["good"], parallel(world_size=2), device="cuda", local_ranks=2, cuda_devices=2)
    check_before_start(files["good"], parallel(world_size=4), device="cpu", local_ranks=2, first_rank=2)


JOB_CASES = {
    # name: (parallel, job overrides, widget, regex)
    "frame count not 4k+1": (parallel(), dict(length=80), "length", r"80 frames is not of the form 4k\+1; use e\.g\."),
    "width not a multiple of 16": (parallel(), dict(width=72), "width", r"72 is not a positive multiple of 16"),
    "height not a multiple of 16": (parallel(), dict(height=40), "height", r"40 is not a positive multiple of 16"),
    "spatial partition leaves a rank without tokens": (
        parallel(world_size=4),  # 48 px = 3 token rows for 4 ranks
        dict(),
        "split mode",
        r"some GPU would get no tokens; use at most 3 GPUs",
    ),
    "patches too coarse for the ranks": (
        parallel(world_size=2, patch_size=64),  # one 64 px patch row
        dict(),
        "split mode",
        r"a smaller patch size \(16 px gives 3 patch rows\)",
    ),
    "temporal partition with too few frames": (
        parallel(world_size=3, split_mode="temporal"),  # 5 frames = 2 latent frames
        dict(),
        "split mode",
        r"2 latent frames",
    ),
    "conditioning of the wrong width": (
        parallel(),
        dict(positive=torch.randn(1, 8, 4096)),
        "positive",
        r"4096 wide but the model expects 32; encode the prompt with Wan's umT5",
    ),
    "negative conditioning of the wrong width": (
        parallel(),
        dict(negative=torch.randn(1, 8, 768)),
        "negative",
        r"768 wide but the model expects 32",
    ),
    "latent of the wrong channels": (
        parallel(),
        dict(latent=torch.randn(1, 16, 2, 6, 8)),
        "latent",
        r"expected \[1, 4, frames",
    ),
}


@pytest.mark.parametrize("case", list(JOB_CASES))
def test_check_job_names_the_widget(case, files, no_spawn):
    topology, overrides, widget, pattern = JOB_CASES[case]
    config = check_before_start(files["good"], parallel(world_size=1), device="cpu")
    with pytest.raises(WanDistriFusionError) as caught:
        check_job(config, topology, make_job(**overrides))
    assert re.search(pattern, assert_clear(caught.value, widget)), str(caught.value)


# --- the Loader node's own checks (GPUs present, world size vs GPUs and rank) ------------------------------------


def loader_settings(**overrides):
    widgets = dict(
        model="tiny.safetensors",
        precision="fp32",
        quantization="disabled",
        gpus=2,
        patch_size=16,
        patch_overlap=0,
        split_mode="spatial",
        world_size=0,
        rank=0,
        parallel_mode="sync",
        cfg_parallel=False,
        warmup_steps=1,
        attention="auto",
        kv_dtype="auto",
        comm_backend="auto",
        device="cuda",
        cuda_devices=8,
    )
    widgets.update(overrides)
    return build_settings(**widgets)


@pytest.mark.parametrize(
    ("overrides", "widget", "pattern"),
    [
        (
            dict(gpus=4, cuda_devices=2),
            "GPUs",
            r"4 requested but this machine shows 2 CUDA device\(s\).*; lower GPUs to 2",
        ),
        (dict(world_size=1), "world size", r"1 is smaller than GPUs \(2\); set world size to 0"),
        (dict(world_size=2, rank=1), "rank", r"ranks 1..2 do not fit in world size 2"),
        (dict(patch_size=24), "patch size", r"multiple of 16"),
        (dict(patch_size=16, patch_overlap=32), "patch overlap", r"larger than the patch size"),
        (dict(device="cpu", attention="flash4"), "attention", r"CUDA GPUs only.*choose auto or sdpa"),
        (dict(weights="shared"), "weights", r"'shared' is unknown; choose replicated, sharded"),
        (dict(gpus=1, weights="sharded"), "weights", r"sharded weights need 2 or more GPUs"),
    ],
    ids=[
        "more GPUs than present",
        "world < GPUs",
        "rank + GPUs > world",
        "patch size",
        "overlap",
        "GPU kernel on CPU",
        "unknown weights",
        "sharded on one GPU",
    ],
)
def test_loader_widgets_are_checked_before_any_worker(overrides, widget, pattern, no_spawn):
    with pytest.raises(WanDistriFusionError) as caught:
        loader_settings(**overrides)
    assert re.search(pattern, str(caught.value)) and str(caught.value).startswith(widget), str(caught.value)


# --- the CLI inspects the checkpoint before it starts anything ----------------------------------------------------


def _cli():
    spec = importlib.util.spec_from_file_location("wan_distrifusion_cli", REPO_ROOT / "cli.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("file", ["vae", "truncated"])
def test_cli_refuses_a_bad_checkpoint_before_starting(file, files, tmp_path, capsys, no_spawn):
    out = tmp_path / "latent.safetensors"
    code = _cli().main(
        ["generate", "--model", str(files[file]), "--world-size", "2", "--device", "cpu", "--out", str(out)]
    )
    captured = capsys.readouterr()
    assert code == 1 and not out.exists()
    assert captured.err.startswith("error: ") and "starting" not in captured.out, captured
    assert "download it again" in captured.err or "not a Wan diffusion model" in captured.err


# --- cli.py checks every setting before anything starts (issue 16, item 4) ---------------------------------------


def run_cli_in_process(capsys, *args: str) -> tuple[int, str, str, float]:
    """``cli.py generate ...`` in this process: (exit code, stdout, stderr, seconds)."""
    began = time.perf_counter()
    code = _cli().main(["generate", "--device", "cpu", *args])
    seconds = time.perf_counter() - began
    captured = capsys.readouterr()
    return code, captured.out, captured.err, seconds


def assert_refused_up_front(code: int, out: str, err: str, setting: str) -> None:
    """Exit 1, one ``error: <setting>:`` line, no traceback, and no rank started."""
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and lines[0].startswith(f"error: {setting}:"), (code, err)
    assert "Traceback" not in err and "starting" not in out, (out, err)


@pytest.mark.parametrize(
    ("flags", "setting"),
    [
        (["--cfg", "nan"], "cfg"),
        (["--cfg", "inf"], "cfg"),
        (["--cfg", "-1"], "cfg"),
        (["--sampler", "foo"], "sampler"),
        (["--scheduler", "foo"], "scheduler"),
        (["--shift", "0"], "shift"),
        (["--weights", "shared", "--world-size", "2"], "weights"),
        (["--weights", "sharded"], "weights"),  # one rank
    ],
)
def test_cli_refuses_sampling_flags_before_building_anything(flags, setting, tmp_path, capsys, no_spawn):
    out = tmp_path / "x.safetensors"
    code, stdout, stderr, seconds = run_cli_in_process(capsys, *flags, "--out", str(out))
    assert_refused_up_front(code, stdout, stderr, setting)
    assert "tiny random Wan" not in stdout and not out.exists()  # refused before the model was even built
    assert seconds < 1.0, f"{seconds:.2f} s"


def _unwritable_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    if os.access(folder, os.W_OK):  # root writes anyway: sysfs takes no new files, not even from root
        folder = Path("/sys")
    return folder


@pytest.mark.parametrize(
    ("make_out", "pattern"),
    [
        (lambda tmp: tmp, r"^error: out: .* is a folder; give a file path such as .*clip\.safetensors"),
        (lambda tmp: tmp / "a-file" / "sub" / "x.safetensors", r"^error: out: .*a-file is a file, so .*sub cannot be"),
        (lambda tmp: _unwritable_folder(tmp) / "x.safetensors", r"^error: out: cannot write in .*; choose a folder"),
    ],
    ids=["a folder as the path", "a parent that is a file", "an unwritable folder"],
)
def test_cli_checks_out_before_starting(make_out, pattern, tmp_path, capsys, no_spawn):
    (tmp_path / "a-file").write_text("not a folder")
    out = make_out(tmp_path)
    code, stdout, stderr, seconds = run_cli_in_process(capsys, "--out", str(out))
    assert_refused_up_front(code, stdout, stderr, "out")
    assert re.search(pattern, stderr), stderr
    assert "tiny random Wan" not in stdout and seconds < 1.0


def test_cli_refuses_cpu_ranks_that_do_not_fit_the_hosts_ram(tmp_path, capsys, monkeypatch, no_spawn):
    """The issue's machine: 2 cores, 24 GB; 64 ranks of ~0.5 GiB each do not fit, whatever this machine has."""
    from wan_distrifusion.distrifusion import memory_plan

    monkeypatch.setattr(memory_plan, "host_available_bytes", lambda: 24 * memory_plan.GIB)
    flags = ["--world-size", "64", "--height", "1024", "--patch-size", "16", "--mode", "sync"]  # 64 token rows
    code, stdout, stderr, seconds = run_cli_in_process(capsys, *flags, "--out", str(tmp_path / "x.safetensors"))
    assert_refused_up_front(code, stdout, stderr, "world size")
    assert re.search(r"64 CPU ranks on this host need about 3\d\.\d GiB of RAM \(0\.5 GiB each: weights", stderr)
    assert re.search(r"but 24\.0 GiB is available; lower world size to 4\d or fewer", stderr), stderr
    assert seconds < 3.0, f"{seconds:.2f} s"


def test_host_memory_check_refuses_with_the_numbers_and_warns_past_the_cores(files, caplog):
    from wan_distrifusion.distrifusion.memory_plan import GIB, check_host_memory, plan_memory

    config = check_before_start(files["good"], parallel(), device="cpu")
    plan = plan_memory(config, parallel(), (1, 4, 2, 6, 8), "fp32", check=False)
    with caplog.at_level("WARNING"):
        check_host_memory(plan, 2, available_bytes=8 * GIB, cores=2)
    assert not caplog.records
    with caplog.at_level("WARNING"):
        check_host_memory(plan, 4, available_bytes=8 * GIB, cores=2)
    assert "4 CPU ranks on 2 cores" in caplog.text
    with pytest.raises(WanDistriFusionError) as caught:
        check_host_memory(plan, 8, available_bytes=2 * GIB, cores=64)
    message = assert_clear(caught.value, "world size")
    assert "8 CPU ranks on this host need about 4.0 GiB" in message and "lower world size to 3 or fewer" in message
    with pytest.raises(WanDistriFusionError, match=r"^memory: this job needs about 0\.5 GiB .*lower the resolution"):
        check_host_memory(plan, 1, available_bytes=GIB // 4, cores=1)


def test_cli_refuses_cfg_parallel_at_cfg_one(tmp_path, capsys, no_spawn):
    flags = ["--cfg-parallel", "--world-size", "2", "--cfg", "1", "--out", str(tmp_path / "x.safetensors")]
    code, stdout, stderr, _ = run_cli_in_process(capsys, *flags)
    assert_refused_up_front(code, stdout, stderr, "CFG parallel")
    assert "cfg is 1" in stderr and "1 of the 2 ranks would sit idle" in stderr and "turn CFG parallel off" in stderr


def test_cfg_parallel_needs_a_second_batch_item(no_spawn):
    from wan_distrifusion.distrifusion.validation import check_guidance

    split = parallel(world_size=4, cfg_parallel=True)
    for job in (make_job(cfg=1.0), make_job(negative=None)):
        with pytest.raises(WanDistriFusionError) as caught:
            check_guidance(split, job)
        assert "2 of the 4 ranks would sit idle" in assert_clear(caught.value, "CFG parallel")
    check_guidance(split, make_job(cfg=5.0))
    check_guidance(split, make_job(cfg=1.0), return_uncond=True)  # CFG++ samplers run the negative prompt at cfg 1
    check_guidance(parallel(world_size=4), make_job(cfg=1.0))


def test_cli_refuses_a_latent_whose_size_differs_from_the_flags(tmp_path, capsys, no_spawn):
    save_file({"latent": torch.zeros(1, 16, 2, 6, 8)}, str(tmp_path / "start.safetensors"))
    flags = ["--latent", str(tmp_path / "start.safetensors"), "--denoise", "0.5", "--width", "128", "--length", "5"]
    code, stdout, stderr, _ = run_cli_in_process(capsys, *flags, "--out", str(tmp_path / "x.safetensors"))
    assert_refused_up_front(code, stdout, stderr, "latent")
    assert "is 64x48 px, 5 frames, but --width 128 was given; drop --width/--height/--length" in stderr, stderr


def test_sampler_node_checks_the_video_size_before_the_workers_start(files, no_spawn):
    """What the Sampler runs before it asks for the runtime (starting the workers) or sends a job; no ComfyUI."""
    from wan_distrifusion.nodes.runtime import DistriFusionModel, RuntimeSettings
    from wan_distrifusion.nodes.sampler import check_before_sending

    def model(**overrides) -> DistriFusionModel:
        spec = RuntimeSpec(str(files["good"]), parallel(**overrides), "fp32", "disabled", "cpu", 2, 0)
        settings = RuntimeSettings("tiny", (0, 0), spec)
        return DistriFusionModel(settings)

    cases = [
        (model(), make_job(height=16), "split mode", r"1 token rows"),  # one token row for two ranks
        (model(split_mode="temporal"), make_job(length=1), "split mode", r"latent frames"),
        (model(cfg_parallel=True), make_job(cfg=1.0), "CFG parallel", r"1 of the 2 ranks would sit idle"),
    ]
    for handle, job, widget, pattern in cases:
        with pytest.raises(WanDistriFusionError) as caught:
            check_before_sending(handle, job, return_uncond=False)
        assert re.search(pattern, assert_clear(caught.value, widget)), str(caught.value)
    check_before_sending(model(), make_job(), return_uncond=False)
    check_before_sending(model(cfg_parallel=True), make_job(cfg=1.0), return_uncond=True)


# --- a running group refuses a bad job and keeps its ranks --------------------------------------------------------


@pytest.fixture(scope="module")
def running_group(files):
    group = WorkerGroup(
        RuntimeSpec(files["good"], parallel=parallel(), device="cpu", step_timeout_s=30, start_timeout_s=120)
    )
    group.start()
    yield group
    group.close()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("overrides", "widget"),
    [(dict(length=4), "length"), (dict(width=72), "width"), (dict(positive=torch.randn(1, 8, 4096)), "positive")],
    ids=["frames", "width", "conditioning"],
)
def test_running_group_refuses_a_bad_job_and_keeps_its_ranks(overrides, widget, running_group):
    pids = running_group.status()["pids"]
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    with pytest.raises(WanDistriFusionError) as caught:
        run_job(running_group, make_job(**overrides))
    assert_clear(caught.value, widget)
    assert running_group.alive and running_group.status()["pids"] == pids
    assert {p.pid for p in psutil.Process().children(recursive=True)} == before


@pytest.mark.slow
def test_running_group_refuses_a_partition_without_tokens_and_keeps_its_ranks(running_group):
    pids = running_group.status()["pids"]
    with pytest.raises(WanDistriFusionError) as caught:
        run_job(running_group, make_job(height=16))  # one token row for two ranks
    assert not isinstance(caught.value, workers.WorkerFailed), str(caught.value)
    assert_clear(caught.value, "split mode")
    assert running_group.alive and running_group.status()["pids"] == pids


# --- property: any widget combination is refused up front or runs exactly --------------------------------------

MODEL_SEED = 0


def run_widgets_on_rank(rank: int, world_size: int, parallel_kwargs: dict, job_kwargs: dict):
    """One rank of the property test's run (in a forked gloo process)."""
    from tiny_wan import sample_on_rank as run_job

    model = tiny_model(MODEL_SEED)
    latent = run_job(model, ParallelConfig(**parallel_kwargs), rank, "cpu", make_job(**job_kwargs))
    return tuple(latent.shape), latent.numpy().tobytes()  # a tensor would travel as shared memory


@pytest.fixture(scope="module")
def property_model(tmp_path_factory):
    model = tiny_model(MODEL_SEED)
    path = write_checkpoint(tmp_path_factory.mktemp("property") / "tiny.safetensors", model)
    return model, path


widget_space = st.fixed_dictionaries(
    {
        "world_size": st.integers(2, 4),  # 1 runs the plain model: nothing to compare
        "split_mode": st.sampled_from(["spatial", "temporal", "spatiotemporal"]),
        "patch_size": st.sampled_from([16, 32, 48, 64]),
        "patch_overlap": st.sampled_from([0, 16, 32]),  # 32 > a 16 px patch: refused
        "mode": st.sampled_from(["sync", "ulysses", "displaced"]),  # displaced: all steps in the warm-up
        "cfg_parallel": st.booleans(),
    }
)
job_space = st.fixed_dictionaries(
    {
        "width": st.sampled_from([64, 48, 32, 16]),
        "height": st.sampled_from([128, 96, 64, 48, 32, 16]),
        "length": st.sampled_from([13, 9, 5, 1]),
        "cfg": st.sampled_from([1.0, 5.0]),
    }
)
OUTCOMES: list[str] = []


@pytest.mark.slow
@settings(
    max_examples=30,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(widgets=widget_space, job_kwargs=job_space)
def test_any_widgets_are_refused_up_front_or_run_exactly(property_model, widgets, job_kwargs):
    model, path = property_model
    # displaced is exact while synchronous: keep every step in the warm-up
    parallel_kwargs = {**widgets, "warmup_steps": 2}
    try:
        topology = ParallelConfig(**parallel_kwargs)
        config = check_before_start(path, topology, device="cpu")
        check_job(config, topology, make_job(**job_kwargs))
    except WanDistriFusionError as error:
        assert_clear(error)
        OUTCOMES.append("refused")
        return
    from tiny_wan import sample_on_rank as run_job

    reference = run_job(model, ParallelConfig(), 0, "cpu", make_job(**job_kwargs))
    latents = run_ranks("test_bad_input", "run_widgets_on_rank", topology.world_size, parallel_kwargs, job_kwargs)
    for rank, (shape, data) in enumerate(latents):
        latent = torch.frombuffer(bytearray(data), dtype=torch.float32).view(shape)
        assert rel_err(latent, reference) < 1e-5, (rank, parallel_kwargs, job_kwargs)
    OUTCOMES.append("ran")


def test_the_property_saw_both_outcomes():
    """The examples above are deterministic (derandomize): both refusals and runs must be among them."""
    if not OUTCOMES:
        pytest.skip("the property test did not run (deselected)")
    assert OUTCOMES.count("ran") >= 5 and "refused" in OUTCOMES, OUTCOMES
