"""Registers the repo root as the package ``wan_distrifusion`` (ComfyUI imports it under its folder name)."""

from pathlib import Path

import pytest
import torch
from parallel_harness import register_package

register_package()

from tiny_wan import random_model, tiny_config, tiny_job, write_checkpoint  # noqa: E402 (needs the package)


@pytest.fixture(autouse=True)
def _deterministic_threads():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny random Wan (seed 3) as ``.safetensors``, one per test module (modules may define their own)."""
    return write_checkpoint(tmp_path_factory.mktemp("wan") / "tiny.safetensors", random_model(tiny_config(), seed=3))


@pytest.fixture(scope="module")
def reference(checkpoint) -> torch.Tensor:
    """``tiny_job()`` sampled in-process on one CPU device: what every parallel run of it must equal."""
    from wan_distrifusion.distrifusion.run import run_job
    from wan_distrifusion.distrifusion.settings import RuntimeSpec
    from wan_distrifusion.distrifusion.workers import InProcessRunner, start_runtime

    runner = start_runtime(RuntimeSpec(checkpoint, device="cpu"))
    assert isinstance(runner, InProcessRunner)
    try:
        return run_job(runner, tiny_job())
    finally:
        runner.close()
