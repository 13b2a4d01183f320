"""Registers the repo root as the package ``wan_distrifusion`` (ComfyUI imports it under its folder name)."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGE_ALIAS = "wan_distrifusion"


def _register_package() -> None:
    if PACKAGE_ALIAS in sys.modules:
        return
    spec = importlib.util.spec_from_file_location(
        PACKAGE_ALIAS, REPO_ROOT / "__init__.py", submodule_search_locations=[str(REPO_ROOT)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACKAGE_ALIAS] = module
    spec.loader.exec_module(module)


_register_package()


@pytest.fixture(autouse=True)
def _deterministic_threads():
    torch.manual_seed(0)
    yield
