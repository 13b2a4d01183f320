"""Run a function on N CPU ranks (gloo) in spawned processes, for the parallel-runtime tests.

``run_ranks("test_module", "function", world_size, *args)`` starts one process per rank, joins a gloo
group through a FileStore, calls ``test_module.function(rank, world_size, *args)`` and returns every
rank's result; an exception or a hang on any rank fails the test with that rank's traceback. Groups
of checks run inside one spawn, so the suite stays fast on 2 cores.
"""

from __future__ import annotations

import importlib
import importlib.util
import multiprocessing as mp
import os
import queue
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
START_METHOD = os.environ.get("WAN_TEST_START_METHOD", "fork" if sys.platform == "linux" else "spawn")
"""fork starts a rank in milliseconds (torch is already imported); spawn re-imports torch per rank (seconds)."""
PACKAGE_ALIAS = "wan_distrifusion"


def register_package() -> None:
    """The repo root as package ``wan_distrifusion`` (tests/conftest.py calls it for the test session)."""
    if PACKAGE_ALIAS in sys.modules:
        return
    spec = importlib.util.spec_from_file_location(
        PACKAGE_ALIAS, REPO_ROOT / "__init__.py", submodule_search_locations=[str(REPO_ROOT)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACKAGE_ALIAS] = module
    spec.loader.exec_module(module)


def tiny_model(seed: int = 0, *, sharp: bool = False, **overrides):
    """The suite's random tiny Wan (``tests/tiny_wan.py``), the same weights on every rank.

    ``sharp`` scales the self-attention's q/k norms so attention is far from uniform (stale K/V matters).
    """
    import torch

    register_package()
    from tiny_wan import random_model, tiny_config

    torch.manual_seed(seed)  # WanModel's own init draws from the global generator
    model = random_model(tiny_config(**overrides), seed=seed)
    if sharp:
        with torch.no_grad():
            for block in model.blocks:
                block.self_attn.norm_q.weight.mul_(2.0)
                block.self_attn.norm_k.weight.mul_(2.0)
    return model


def rel_err(a, b) -> float:
    """‖a − b‖ / ‖b‖ in float64."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def digest(tensor) -> str:
    """Hash of a tensor's bytes: equal on every rank means bit-identical results."""
    import hashlib

    return hashlib.sha1(tensor.detach().contiguous().cpu().numpy().tobytes()).hexdigest()[:16]


def _child(rank: int, world_size: int, init_file: str, module: str, function: str, args: tuple, results) -> None:
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        register_package()
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
        try:
            fn = getattr(importlib.import_module(module), function)
            results.put((rank, True, fn(rank, world_size, *args)))
        finally:
            dist.destroy_process_group()
    except BaseException:
        results.put((rank, False, traceback.format_exc()))


def run_ranks(module: str, function: str, world_size: int, *args, timeout: float = 150.0) -> list:
    """Results of ``module.function(rank, world_size, *args)`` on every rank, in rank order."""
    ctx = mp.get_context(START_METHOD)
    results = ctx.Queue()
    fd, init_file = tempfile.mkstemp(prefix="wan-dist-store-")
    os.close(fd)
    os.unlink(init_file)  # the FileStore creates it
    procs = [
        ctx.Process(target=_child, args=(rank, world_size, init_file, module, function, args, results), daemon=True)
        for rank in range(world_size)
    ]
    for proc in procs:
        proc.start()
    collected: dict[int, object] = {}
    failures: list[str] = []
    deadline = time.monotonic() + timeout
    try:
        while len(collected) < world_size and not failures:
            try:
                rank, ok, value = results.get(timeout=0.2)
            except queue.Empty:
                missing = sorted(set(range(world_size)) - set(collected))
                dead = [r for r in missing if procs[r].exitcode is not None]
                if dead:
                    failures.append(f"ranks {dead} exited (codes {[procs[r].exitcode for r in dead]}) without a result")
                elif time.monotonic() > deadline:
                    failures.append(f"timed out after {timeout:.0f} s waiting for ranks {missing}")
                continue
            if ok:
                collected[rank] = value
            else:
                failures.append(f"rank {rank} failed:\n{value}")
    finally:
        for proc in procs:
            proc.join(timeout=10 if not failures else 1)
        for proc in procs:
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)
        if os.path.exists(init_file):
            os.unlink(init_file)
    if failures:
        raise AssertionError("\n".join(failures))
    return [collected[rank] for rank in range(world_size)]
