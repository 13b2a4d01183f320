"""The ``compile`` setting: a request, resolved on each rank's device (CUDA GPUs with Triton compile, the CPU runs
eager), and reported with the attention kernel ``auto`` picked."""

from __future__ import annotations

import copy
import importlib.util
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from tiny_wan import random_model, tiny_config, write_checkpoint
from wan_distrifusion.distrifusion import rank
from wan_distrifusion.distrifusion.config import ParallelConfig
from wan_distrifusion.distrifusion.in_process import InProcessRunner
from wan_distrifusion.distrifusion.settings import RuntimeSpec
from wan_distrifusion.wanvideo import attention as attention_module
from wan_distrifusion.wanvideo import block_compile
from wan_distrifusion.wanvideo import model as wan_model
from wan_distrifusion.wanvideo.attention import attention_kernel_name

CUDA = torch.device("cuda", 0)


def compiled(model) -> bool:
    """Whether ``compile_blocks`` ran (the blocks get their compiled halves at the first compile)."""
    return model.block_compiler is not None


@pytest.fixture
def checkpoint(tmp_path):
    return write_checkpoint(tmp_path / "tiny.safetensors", random_model(tiny_config(), seed=1))


def fake_cuda(monkeypatch, capability=(9, 0), triton=True, compiler=True):
    """This machine seen as a CUDA GPU of ``capability``, with or without Triton and a C compiler (the device is
    never used)."""
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr(shutil, "which", lambda name: f"/usr/bin/{name}" if compiler else None)
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: (object() if triton else None) if name == "triton" else find_spec(name, *a),
    )


def test_compile_runs_on_cuda_gpus_with_triton_only(monkeypatch):
    fake_cuda(monkeypatch)
    assert block_compile.compile_available(CUDA) == (True, "CUDA GPU with Triton")
    fake_cuda(monkeypatch, triton=False)
    available, reason = block_compile.compile_available(CUDA)
    assert not available and "no Triton for cuda:0" in reason
    fake_cuda(monkeypatch, compiler=False)
    available, reason = block_compile.compile_available(CUDA)
    assert not available and "no C compiler" in reason
    monkeypatch.setenv("CC", "/opt/cc")
    assert block_compile.compile_available(CUDA)[0]
    fake_cuda(monkeypatch, capability=(6, 1))
    available, reason = block_compile.compile_available(CUDA)
    assert not available and "compute capability 6.1" in reason
    available, reason = block_compile.compile_available("cpu")
    assert not available and reason.startswith("runs eager on cpu")


def test_the_request_is_resolved_per_device_and_reported(monkeypatch):
    asked, not_asked = ParallelConfig(compile_blocks=True), ParallelConfig(compile_blocks=False)
    assert rank.compile_choice(not_asked, torch.device("cpu")) == (False, "off")
    now, state = rank.compile_choice(asked, torch.device("cpu"))
    assert not now and state.startswith("off (runs eager on cpu")
    fake_cuda(monkeypatch)
    assert rank.compile_choice(asked, CUDA) == (True, "on")
    assert rank.compile_choice(not_asked, CUDA) == (False, "off")


def test_a_cpu_rank_asked_to_compile_loads_eager_unless_compiling_is_forced(checkpoint, monkeypatch):
    """The Loader's default (compile on) must leave CPU ranks eager; a test that wants the spec path to compile on
    the CPU says so by making ``compile_available`` true there."""
    spec = RuntimeSpec(str(checkpoint), ParallelConfig(compile_blocks=True), device="cpu")
    cpu = torch.device("cpu")
    assert not compiled(rank.load_rank_model(spec, cpu, spec.model_path, ()))
    assert rank.rank_kernels(spec.parallel, cpu)["compile"].startswith("off (runs eager on cpu")
    monkeypatch.setattr(rank, "compile_available", lambda device: (True, "forced"))
    # No import thread left running into the next tests (pytest walks sys.modules while it adds to it).
    monkeypatch.setattr(rank, "preload_compiler", lambda: None)
    loaded = rank.load_rank_model(spec, cpu, spec.model_path, ())
    assert compiled(loaded) and loaded.block_compiler.in_background  # the first steps run eager meanwhile
    assert rank.rank_kernels(spec.parallel, cpu) == {"attention": "sdpa", "compile": "on"}
    monkeypatch.setenv(rank.COMPILE_IN_BACKGROUND_ENV, "0")
    loaded = rank.load_rank_model(spec, cpu, spec.model_path, ())
    assert compiled(loaded) and not loaded.block_compiler.in_background  # the first step compiles
    offloaded = rank.load_rank_model(spec.with_changes(offload=True), cpu, spec.model_path, ())
    assert compiled(offloaded) and not offloaded.block_compiler.in_background  # weights complete only per call
    no_compile = spec.with_changes(parallel=ParallelConfig(compile_blocks=False))
    assert not compiled(rank.load_rank_model(no_compile, cpu, spec.model_path, ()))


def test_auto_attention_names_the_kernel_it_runs():
    assert attention_kernel_name("auto", "cpu") == "sdpa"
    assert attention_kernel_name("sdpa", "cpu") == "sdpa"


def test_the_in_process_status_reports_what_the_rank_runs(checkpoint):
    runner = InProcessRunner(RuntimeSpec(str(checkpoint), ParallelConfig(compile_blocks=True), device="cpu"))
    assert runner.status()["compile"] is None  # not loaded yet
    runner.start()
    try:
        status = runner.status()
        assert status["attention"] == "sdpa" and status["compile"].startswith("off (runs eager on cpu")
    finally:
        runner.close()


def test_a_rank_imports_its_kernels_while_its_checkpoint_loads(checkpoint, monkeypatch):
    """The attention kernel always; the compiler when the rank compiles, in the background or not (a background
    compile's first call traces inductor's scaffold in the caller's thread, which needs the import done)."""
    compiler, attention = [], []
    monkeypatch.setattr(rank, "compile_available", lambda device: (True, "forced"))
    monkeypatch.setattr(rank, "preload_compiler", lambda: compiler.append(True))
    monkeypatch.setattr(rank, "preload_attention", lambda backend, device: attention.append((backend, str(device))))
    spec = RuntimeSpec(str(checkpoint), ParallelConfig(compile_blocks=True, attention_backend="sdpa"), device="cpu")
    cpu = torch.device("cpu")
    rank.load_rank_model(spec, cpu, spec.model_path, ())  # the default: compiled in the background
    assert compiler == [True] and attention == [("sdpa", "cpu")]
    rank.load_rank_model(spec.with_changes(parallel=ParallelConfig(compile_blocks=False)), cpu, spec.model_path, ())
    assert compiler == [True] and len(attention) == 2
    monkeypatch.setenv(rank.COMPILE_IN_BACKGROUND_ENV, "0")
    rank.load_rank_model(spec, cpu, spec.model_path, ())
    assert compiler == [True, True]


def test_the_attention_preload_resolves_the_kernel_in_a_thread(monkeypatch):
    resolved = []
    monkeypatch.setattr(attention_module, "resolve_attention", lambda backend, device: resolved.append(backend))
    attention_module.preload_attention("flash4", "cpu").join()
    assert resolved == ["flash4"]

    def broken(backend, device):
        raise ImportError("not installed")

    monkeypatch.setattr(attention_module, "resolve_attention", broken)
    attention_module.preload_attention("flash4", "cpu").join()  # the later resolve reports it, not the preload


def test_the_compiler_preload_imports_what_the_first_compiled_call_needs():
    code = (
        "import sys, torch\n"
        "from parallel_harness import register_package\n"
        "register_package()\n"
        "from wan_distrifusion.wanvideo.block_compile import preload_compiler\n"
        "assert 'torch._inductor.compile_fx' not in sys.modules\n"
        "preload_compiler().join()\n"
        "print(sorted(m for m in ('torch._dynamo.convert_frame', 'torch._inductor.compile_fx') if m in sys.modules))\n"
    )
    tests = str(Path(__file__).parent)
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tests, capture_output=True, text=True, timeout=300, check=True
    )
    assert out.stdout.split("\n")[-2] == "['torch._dynamo.convert_frame', 'torch._inductor.compile_fx']"


def test_the_first_compiled_call_of_each_size_says_it_compiles(caplog):
    model = random_model(tiny_config(), seed=2).eval()
    model.compile_blocks(backend="eager")  # dynamo traces, no inductor: the announcement is what is checked
    context = torch.randn(1, 8, tiny_config().text_dim)

    def call(frames: int) -> list[str]:
        caplog.clear()
        with caplog.at_level("INFO", logger=wan_model.__name__), torch.no_grad():
            model(torch.randn(1, model.config.in_dim, frames, 8, 8), torch.tensor([500.0]), context)
        return [r.getMessage() for r in caplog.records if r.name == wan_model.__name__]

    first = call(frames=3)
    assert len(first) == 2 and first[0].startswith("compiling the transformer blocks for 48 tokens")
    assert first[1].startswith("compiled in ")
    assert call(frames=3) == []
    assert call(frames=5)[0].startswith("compiling the transformer blocks for 80 tokens")
    eager = random_model(tiny_config(), seed=2).eval()
    with caplog.at_level("INFO", logger=wan_model.__name__), torch.no_grad():
        caplog.clear()
        eager(torch.randn(1, eager.config.in_dim, 3, 8, 8), torch.tensor([500.0]), context)
    assert not [r for r in caplog.records if r.name == wan_model.__name__]


class CountingBackend:
    """A dynamo backend that runs the traced graph as is and records which thread compiled and ran it."""

    def __init__(self, fail: bool = False):
        self.compiled, self.ran, self.fail = [], [], fail

    def __call__(self, graph, example_inputs):
        self.compiled.append(threading.current_thread().name)
        if self.fail:
            raise RuntimeError("no compiler here")

        def run(*args):
            self.ran.append(threading.current_thread().name)
            return graph(*args)

        return run


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_in_the_background_the_first_calls_run_eager_and_later_ones_compiled(mode, caplog):
    model = random_model(tiny_config(), seed=3).eval()
    reference = copy.deepcopy(model)
    backend = CountingBackend()
    model.compile_blocks(backend=backend, in_background=True)
    context, x = torch.randn(1, 8, tiny_config().text_dim), torch.randn(1, model.config.in_dim, 3, 8, 8)
    grad_mode = torch.no_grad if mode == "no_grad" else torch.inference_mode
    caplog.set_level("INFO", logger=wan_model.__name__)  # the compile thread logs after the call returns

    def call(net):
        with grad_mode():
            return net(x, torch.tensor([500.0]), context)

    expected = call(reference)
    assert all(block.compiled_parts is None for block in model.blocks)  # torch.compile (dynamo's import) not at load
    first = call(model)
    model.block_compiler.wait()
    assert all(block.compiled_parts is not None for block in model.blocks)
    main = threading.current_thread().name
    assert set(backend.compiled) == {"compile-blocks"}  # compiled beside the eager call
    assert backend.ran == []  # and not run there: a first run may synchronise the device (inductor's autotuning)
    assert len(backend.compiled) == 2  # both halves, once: every block shares their graphs
    torch.testing.assert_close(first, expected, rtol=0, atol=0)  # eager meanwhile
    compiles = len(backend.compiled)
    later = call(model)
    assert backend.ran == [main] * 2 * model.config.num_layers and len(backend.compiled) == compiles  # no recompile
    torch.testing.assert_close(later, expected)
    messages = [r.getMessage() for r in caplog.records if r.name == wan_model.__name__]
    assert messages[0].startswith("compiling the transformer blocks for 48 tokens in the background")
    assert messages[1].startswith("compiled in the background in ")


def test_while_a_background_compile_runs_the_launching_thread_gets_the_gil_back_quickly():
    """The compile shortens Python's switch interval (a thread launching kernels waits for it at every op) and puts
    the caller's back when it ends, also when it fails."""
    before = sys.getswitchinterval()
    seen = []

    class RecordingBackend(CountingBackend):
        def __call__(self, graph, example_inputs):
            seen.append(sys.getswitchinterval())
            return super().__call__(graph, example_inputs)

    for fail in (False, True):
        model = random_model(tiny_config(), seed=5).eval()
        model.compile_blocks(backend=RecordingBackend(fail=fail), in_background=True)
        context, x = torch.randn(1, 8, tiny_config().text_dim), torch.randn(1, model.config.in_dim, 3, 8, 8)
        with torch.no_grad():
            model(x, torch.tensor([500.0]), context)
        model.block_compiler.wait()
        assert seen and max(seen) <= block_compile.ShortSwitchInterval.INTERVAL < before
        assert sys.getswitchinterval() == before
        seen.clear()


def test_a_background_compile_that_fails_leaves_that_size_eager(caplog):
    model = random_model(tiny_config(), seed=4).eval()
    reference = copy.deepcopy(model)
    model.compile_blocks(backend=CountingBackend(fail=True), in_background=True)
    context, x = torch.randn(1, 8, tiny_config().text_dim), torch.randn(1, model.config.in_dim, 3, 8, 8)
    with torch.no_grad(), caplog.at_level("INFO", logger=wan_model.__name__):
        model(x, torch.tensor([500.0]), context)
        model.block_compiler.wait()
        outputs = [model(x, torch.tensor([500.0]), context) for _ in range(2)]
        expected = reference(x, torch.tensor([500.0]), context)
    assert len(model.block_compiler.failed) == 1 and "no compiler here" in next(
        iter(model.block_compiler.failed.values())
    )
    assert len(model.block_compiler.threads) == 1  # not tried again at every call
    assert any("failed" in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)
    for output in outputs:
        torch.testing.assert_close(output, expected, rtol=0, atol=0)


class FakeEvent:
    """``torch.cuda.Event`` stand-in: records which event waited on which."""

    log: list[str] = []

    def __init__(self):
        self.number = len([entry for entry in self.log if entry.startswith("record")])

    def record(self):
        self.log.append(f"record {self.number}")

    def synchronize(self):
        self.log.append(f"wait {self.number}")


def test_while_a_compile_runs_beside_the_gpu_stays_one_block_ahead(monkeypatch):
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    FakeEvent.log = []
    compiler = block_compile.BlockCompiler([], in_background=True)
    assert compiler.pacer(torch.device("cuda", 0)) is None  # nothing compiling: the launch queue runs free
    compiler._compiling.add(("size",))
    assert compiler.pacer(torch.device("cpu")) is None
    pace = compiler.pacer(torch.device("cuda", 0))
    for _ in range(3):
        pace()
    assert FakeEvent.log == ["record 0", "record 1", "wait 0", "record 2", "wait 1"]


def test_inductor_compiles_in_the_background_beside_eager_calls_and_its_graphs_run_at_the_models_next_call(
    monkeypatch,
):
    """The GPU's backend, on the CPU (inductor compiles C++ here, ~45 s on 2 cores): ``options`` reach it; eager
    calls of other modules keep working while it compiles; the compiled graphs, first run in the model's thread, give
    the eager result to fp32 round-off.

    ``torch.fx.Tracer.trace`` patches ``nn.Module.__call__`` for the whole process while it runs, and a plain
    ``Tracer`` fails every other thread's module call meanwhile (seen inside ComfyUI on the H200: ``module is not
    installed as a submodule``). The compile thread must only run make_fx's tracers, which let such calls through."""
    from torch._inductor.loop_body import InterpreterShim

    InterpreterShim._dummy_gm.cache_clear()  # traced afresh, as in a new process
    traces = []
    original_trace = torch.fx.Tracer.trace

    def recording_trace(self, *args, **kwargs):
        traces.append((threading.current_thread().name, type(self)))
        return original_trace(self, *args, **kwargs)

    monkeypatch.setattr(torch.fx.Tracer, "trace", recording_trace)
    model = random_model(tiny_config(), seed=5).eval()
    reference = copy.deepcopy(model)
    # No cache: the thread traces and lowers everything, as a first compile ever does.
    model.compile_blocks(options={"fallback_random": True, "force_disable_caches": True}, in_background=True)
    context, x = torch.randn(1, 8, tiny_config().text_dim), torch.randn(1, model.config.in_dim, 3, 8, 8)
    with torch.inference_mode():
        expected = reference(x, torch.tensor([500.0]), context)
        first = model(x, torch.tensor([500.0]), context)
        beside = 0
        while any(thread.is_alive() for thread in model.block_compiler.threads):
            torch.testing.assert_close(reference(x, torch.tensor([500.0]), context), expected, rtol=0, atol=0)
            beside += 1
        assert model.block_compiler.failed == {} and len(model.block_compiler.ready) == 1
        compiled_output = model(x, torch.tensor([500.0]), context)
    in_thread = [tracer for thread, tracer in traces if thread == "compile-blocks"]
    assert in_thread and torch.fx.Tracer not in in_thread, traces  # AOTAutograd's make_fx traced there, nothing plain
    assert beside > 0
    torch.testing.assert_close(first, expected, rtol=0, atol=0)
    assert not torch.equal(compiled_output, expected)  # inductor's kernels ran, not the eager halves
    torch.testing.assert_close(compiled_output, expected, rtol=1e-5, atol=1e-5)
