"""Worker entry point for the fault tests: ``distrifusion/worker_main.py`` plus one injected fault.

``tests/test_faults.py`` points ``processes.WORKER_MAIN`` at this file, so the controller starts it exactly as it
starts the real entry point (same arguments, same environment). ``WDF_FAULT=oom:<rank>:<call>`` makes that
rank's ``WanModel.forward`` raise ``torch.OutOfMemoryError`` on its ``<call>``-th call (one call per sampler
step), as a CUDA allocation failure would mid-step; the other ranks are then inside or entering the step's
collectives. Before raising, the wall-clock time is written to ``WDF_FAULT_STAMP`` (when set), so the test can
measure how long the controller takes to notice. Without ``WDF_FAULT`` this is the plain worker.
"""

import importlib
import logging
import os
import runpy
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def _argument(name: str) -> str | None:
    argv = sys.argv[1:]
    return argv[argv.index(name) + 1] if name in argv else None


def _inject(package_name: str) -> None:
    spec = os.environ.get("WDF_FAULT", "")
    if not spec:
        return
    kind, rank, call = spec.split(":")
    if kind != "oom" or _argument("--rank") != rank:
        return
    import torch

    model_module = importlib.import_module(f"{package_name}.wanvideo.model")
    original = model_module.WanModel.forward
    calls = [0]

    def forward(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] == int(call):
            stamp = os.environ.get("WDF_FAULT_STAMP")
            if stamp:
                Path(stamp).write_text(repr(time.time()))
            raise torch.OutOfMemoryError(
                "CUDA out of memory. Tried to allocate 20.00 GiB (injected by tests/fault_worker.py)"
            )
        return original(self, *args, **kwargs)

    model_module.WanModel.forward = forward


if __name__ == "__main__":
    package = runpy.run_path(str(REPO_ROOT / "distrifusion" / "bootstrap.py"))["entry_point"](__file__)
    _inject(package.__name__)
    worker = importlib.import_module(f"{package.__name__}.distrifusion.rank_main")
    code = worker.main(sys.argv[1:])
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
