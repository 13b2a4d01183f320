"""Registers the repo root as the package ``wan_distrifusion`` (ComfyUI imports it under its folder name)."""

import pytest
import torch
from parallel_harness import register_package

register_package()


@pytest.fixture(autouse=True)
def _deterministic_threads():
    torch.manual_seed(0)
    yield
