"""Compiling the transformer blocks (inductor), where it can run, and in the background of the first steps.

``torch.compile`` compiles at the first call of each new input size: at 14B 720p that first step takes 11-14 s longer,
at 1.3B 480p 12.6 s (H200, empty caches). With ``in_background`` (the ranks' default) the blocks keep running eager
while a thread compiles from the first block's inputs, and the model switches to the compiled halves at its next
call of that size. Eager and compiled blocks round differently (bf16 round-off), so a run that switches midway
differs from one that does not at that level. Measured inside ComfyUI on one H200 (README, issue 15): at 14B 720p
the compile is done about one step in (24 s) and the cold prompt takes 0.82x native's (the foreground compile's
1.02x), the warm ones as compiled; at 1.3B 480p it outlasts a 4-step cold prompt, which runs eager.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import logging
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

logger = logging.getLogger("wan_distrifusion.wanvideo.model")
"""The model's logger: these lines are the model's (``compiling the transformer blocks ...``)."""

COMPILER_MODULES = ("torch._dynamo.convert_frame", "torch._inductor.compile_fx", "torch._inductor.loop_body", "triton")
"""What the first compiled call imports (about 2 s of Python imports on a 2-core CPU) before any tracing starts."""


def compile_available(device: torch.device | str) -> tuple[bool, str]:
    """Whether ``WanModel.compile_blocks`` (inductor) can compile for ``device``, and if not, why (for the status).

    CUDA GPUs of compute capability 7.0 and newer, with Triton installed and a C compiler for the launchers Triton
    builds (``CC``, gcc or clang). Not the CPU: inductor there compiles C++ for minutes and gains little, so a request
    to compile runs eager on the CPU (call ``compile_blocks`` directly to compile there anyway, as the tests do).
    """
    device = torch.device(device)
    if device.type != "cuda":
        return False, f"runs eager on {device.type}: compile needs a CUDA GPU with Triton"
    if importlib.util.find_spec("triton") is None:
        return False, f"no Triton for {device}: pip install triton (triton-windows on Windows)"
    if not (os.environ.get("CC") or shutil.which("gcc") or shutil.which("clang")):
        return False, "no C compiler for Triton's launchers: install gcc or clang, or set CC"
    major, minor = torch.cuda.get_device_capability(device)
    if major < 7:
        return False, f"{device} is compute capability {major}.{minor}; Triton needs 7.0 or newer"
    return True, "CUDA GPU with Triton"


def preload_compiler() -> threading.Thread:
    """Import the compiler's modules and start inductor's pool of compile processes in a background thread, so both
    happen while the checkpoint is read (file reads and host-to-device copies release the GIL) instead of at the
    first compiled call. Returns the thread (daemon; nothing waits for it: a later import of the same module waits
    on Python's import lock, and inductor reuses the pool once it is up)."""

    def load() -> None:
        started = time.perf_counter()
        for name in COMPILER_MODULES:
            try:
                importlib.import_module(name)
            except ImportError:  # the first compiled call reports it; a preload only saves time
                return
        from torch._inductor.async_compile import maybe_warm_pool  # what inductor's backend calls first

        maybe_warm_pool()
        logger.info("compiler imported in the background in %.1f s", time.perf_counter() - started)

    thread = threading.Thread(target=load, name="preload-compiler", daemon=True)
    thread.start()
    return thread


InputSize = tuple
"""What a compiled graph is specialised on, as far as the model's callers vary it: token and context shapes,
dtype, device."""


class BlockCompiler:
    """The blocks' compiled halves (each block's ``compiled_parts``) and the input sizes they are ready for.

    ``WanModel.forward`` asks ``calls`` per forward whether its blocks run compiled. In the foreground (the default)
    they always do and a new size compiles at its first call, announced in the log. ``in_background``: a new size
    runs eager; its first call hands block 0's inputs to a thread that compiles both halves on them without running
    them (``_first_run_left_to_the_caller``), and once that is done the size's next call runs compiled, its first
    run included. A compile that fails leaves that size eager, with a warning. Not for blocks whose weights are only
    complete inside their own call (streamed from host memory, sharded with FSDP2): the thread traces the halves
    outside that call.
    """

    def __init__(
        self,
        blocks: Sequence[nn.Module],
        backend: str | Callable = "inductor",
        options: dict | None = None,
        in_background: bool = False,
    ):
        self.blocks, self.backend, self.options = blocks, backend, options
        self.in_background = in_background
        self.ready: set[InputSize] = set()
        """Sizes whose compiled graphs exist: their calls run compiled."""
        self.failed: dict[InputSize, str] = {}
        """Sizes whose background compile raised (the error): their calls stay eager."""
        self._compiling: set[InputSize] = set()
        self._wrapped = False
        self._lock = threading.Lock()
        self.threads: list[threading.Thread] = []
        """Background compiles started (``join`` them to wait)."""

    def _wrap_blocks(self) -> None:
        """``torch.compile`` each block's halves, at the first compile rather than at load: ``torch.compile`` imports
        dynamo (seconds: 7 s on a machine without cached bytecode), which a background compile does off the critical
        path."""
        with self._lock:
            if self._wrapped:
                return
            # Every new latent size or rank slab adds cache entries to the same two graphs: a long-lived worker must
            # never hit the recompile limit and silently fall back to eager.
            config = torch._dynamo.config
            config.recompile_limit = max(config.recompile_limit, 64)
            config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, 1024)
            if self.in_background:
                compile_options = {"backend": _first_run_left_to_the_caller(self.backend, self.options)}
            else:
                compile_options = {"backend": self.backend, "options": self.options}
            for block in self.blocks:
                block.compiled_parts = (
                    torch.compile(block.before_attention, **compile_options),
                    torch.compile(block.after_attention, **compile_options),
                )
            self._wrapped = True

    @staticmethod
    def input_size(tokens: Tensor, context: Tensor) -> InputSize:
        return (tuple(tokens.shape), tuple(context.shape), tokens.dtype, str(tokens.device))

    @contextlib.contextmanager
    def calls(self, tokens: Tensor, context: Tensor, first_block: nn.Module) -> Iterator[bool]:
        """Around one forward's block loop: yields whether the blocks run compiled (``WanBlock.forward(compiled=)``);
        a first call of a new size logs that it compiles (and, in the foreground, how long it took)."""
        size = self.input_size(tokens, context)
        with self._lock:
            known = size in self.ready or size in self._compiling or size in self.failed
            if not known and self.in_background:
                self._compiling.add(size)
        if size in self.ready:
            yield True
        elif not self.in_background:
            logger.info("compiling the transformer blocks for %d tokens (first call of this size)", tokens.shape[1])
            started = time.perf_counter()
            self._wrap_blocks()
            yield True
            self.ready.add(size)
            logger.info("compiled in %.1f s; later calls of this size reuse it", time.perf_counter() - started)
        elif known:
            yield False
        else:
            logger.info(
                "compiling the transformer blocks for %d tokens in the background; calls of this size run eager "
                "until it is done",
                tokens.shape[1],
            )
            handed = []
            first_block.hand_inputs_to = lambda before, after: handed.append(
                self._start(size, first_block, before, after)
            )
            try:
                yield False
            finally:
                first_block.hand_inputs_to = None
                if not handed:  # the call failed before block 0's attention: the next call of this size tries again
                    with self._lock:
                        self._compiling.discard(size)

    def _start(self, size: InputSize, block: nn.Module, before_args: tuple, after_args: tuple) -> threading.Thread:
        started = time.perf_counter()
        trace_inductors_scaffold_here()  # waits for the compiler's imports if the preload is still at them
        waited = time.perf_counter() - started
        if waited > 0.05:
            logger.info("the compile's start waited %.1f s for the compiler's imports", waited)
        thread = threading.Thread(
            target=self._compile,
            args=(size, block, before_args, after_args),  # traced, never run: no copies
            kwargs={"grad": torch.is_grad_enabled(), "inference": torch.is_inference_mode_enabled()},
            name="compile-blocks",
            daemon=True,
        )
        self.threads.append(thread)
        thread.start()
        return thread

    def _compile(
        self, size: InputSize, block: nn.Module, before_args: tuple, after_args: tuple, grad: bool, inference: bool
    ) -> None:
        started = time.perf_counter()
        device = before_args[0].device
        with LAUNCHES_FIRST:
            try:
                if device.type == "cuda":
                    torch.cuda.set_device(device)  # the current device is per thread
                self._wrap_blocks()
                _compile_only.active = True
                # Grad and inference mode are per thread too, and the graphs are guarded on them: as the caller's.
                with torch.inference_mode(inference), torch.set_grad_enabled(grad):
                    for half, args in zip(block.compiled_parts, (before_args, after_args)):
                        with contextlib.suppress(CompiledOnly):
                            half(*args)
            except Exception as error:  # noqa: BLE001 - any compile failure leaves the model eager, which still works
                with self._lock:
                    self.failed[size] = f"{type(error).__name__}: {error}"
                logger.warning(
                    "compiling the transformer blocks for %d tokens failed (%s); calls of this size stay eager",
                    size[0][1],
                    self.failed[size],
                )
            else:
                with self._lock:
                    self.ready.add(size)
                logger.info(
                    "compiled in the background in %.1f s; the next call of this size runs compiled",
                    time.perf_counter() - started,
                )
            finally:
                with self._lock:
                    self._compiling.discard(size)

    def pacer(self, device: torch.device) -> Callable[[], None] | None:
        """For one forward: called after each block while a background compile runs on a CUDA device, else None."""
        return OneBlockAhead() if self._compiling and device.type == "cuda" else None

    def wait(self, timeout: float | None = None) -> None:
        """Wait for the background compiles started so far (tests, benchmarks)."""
        for thread in list(self.threads):
            thread.join(timeout)


def trace_inductors_scaffold_here() -> None:
    """Make inductor's one plain ``torch.fx`` trace in this thread, before a compile thread would make it.

    While ``torch.fx.Tracer.trace`` runs it patches ``nn.Module.__call__`` for the whole process, and the plain
    ``Tracer`` fails every other thread's module call meanwhile (``NameError: module is not installed as a submodule``:
    a cold prompt's eager step beside the background compile, inside ComfyUI on the H200, torch 2.11). make_fx's
    tracers, which AOTAutograd and inductor's pattern matcher run in the compile thread, let such calls through; the
    plain one inductor runs is a cached identity graph (``loop_body.InterpreterShim``), so tracing it once here, where
    no other module call runs, keeps it out of the compile thread. Imports inductor if ``preload_compiler`` has not
    (seconds), then takes milliseconds."""
    try:
        from torch._inductor.loop_body import InterpreterShim
    except ImportError:  # no inductor here: the compile thread reports it
        return
    dummy_graph = getattr(InterpreterShim, "_dummy_gm", None)
    if dummy_graph is not None:
        dummy_graph()


class ShortSwitchInterval:
    """Python's GIL switch interval, shortened while one or more background compiles run (each compile thread
    enters it), restored after the last.

    Many torch ops release the GIL while they run, and a thread that wants it back while another thread
    computes in Python (dynamo tracing, inductor lowering) waits for that thread's switch interval: 5 ms by default,
    per op. The eager blocks beside a compile took 3-4x their time (1.3B 480p forwards of 3.3-4.0 s instead of 1.1 s,
    H200); on the CPU, 120 small ops followed by a 20 ms wait (a block's launches, then the pacer's) launch in 338 ms
    beside a busy thread at 5 ms, 6 ms at 0.2 ms, while the busy thread keeps 96% of its pace (``INTERVAL``)."""

    INTERVAL = 2e-4

    def __init__(self):
        self._lock = threading.Lock()
        self._active = 0
        self._saved = sys.getswitchinterval()

    def __enter__(self) -> None:
        with self._lock:
            if self._active == 0:
                self._saved = sys.getswitchinterval()
                sys.setswitchinterval(min(self._saved, self.INTERVAL))
            self._active += 1

    def __exit__(self, *exc_info) -> None:
        with self._lock:
            self._active -= 1
            if self._active == 0:
                sys.setswitchinterval(self._saved)


LAUNCHES_FIRST = ShortSwitchInterval()
"""The process's one: the switch interval is process-wide."""


class CompiledOnly(Exception):
    """What a graph compiled ``in_background`` raises when the compile thread would run it."""


_compile_only = threading.local()
"""``active`` in the compile thread: graphs compile there, their first run is the model's own."""


def _first_run_left_to_the_caller(backend: str | Callable, options: dict | None) -> Callable:
    """A dynamo backend that compiles as ``backend`` (with inductor's ``options``) and returns a graph that raises
    ``CompiledOnly`` when the compile thread calls it. Inductor's first run of a graph times its kernels' variants on
    the device, each timing synchronising the whole device behind the eager steps' queued work (half a second per
    block at 14B 720p): a compile thread that ran its graphs had not finished after 97 s at 14B, where the same
    graphs took 17 s at 1.3B. The model's first compiled call runs them instead, as a foreground compile's first
    call does: with this backend the 14B compile finished in 24 s (H200, inside ComfyUI)."""
    if backend == "inductor":
        from torch._inductor.compile_fx import compile_fx

        inner = functools.partial(compile_fx, config_patches=options or {})
    elif isinstance(backend, str):
        inner = torch._dynamo.lookup_backend(backend)
    else:
        inner = backend

    def compile_graph(graph, example_inputs):
        compiled = inner(graph, example_inputs)

        def run(*args):
            if getattr(_compile_only, "active", False):
                raise CompiledOnly
            return compiled(*args)

        return run

    return compile_graph


class OneBlockAhead:
    """Keeps the launching thread one block ahead of the GPU while a compile runs beside it.

    Eager blocks launch faster than the GPU runs them, so the launching thread soon blocks in a kernel launch on
    CUDA's full queue, holding the GIL the compile thread needs. Called after each block, this waits for the block
    before to finish with the GIL released; the GPU still has a whole block queued. (With it, a 1.3B compile beside
    the eager steps took 17 s; at 14B the compile thread's device synchronisations were what kept it from finishing,
    see ``_first_run_left_to_the_caller``.)"""

    def __init__(self):
        self._previous: torch.cuda.Event | None = None

    def __call__(self) -> None:
        event = torch.cuda.Event()
        event.record()
        if self._previous is not None:
            self._previous.synchronize()  # releases the GIL while it waits
        self._previous = event


HandInputs = Callable[[tuple, tuple], None]
"""``WanBlock.hand_inputs_to``: called with the block's ``before_attention`` and ``after_attention`` arguments."""
