"""Make the repo importable as a package in a fresh process, whatever its folder is called.

ComfyUI imports the pack under its folder name (``ComfyUI-WanVideo-DistriFusion``), which no child
process can ``import``. ``cli.py`` and ``distrifusion/worker_main.py`` load this file by path (before
any package exists) and call :func:`register_package`, which registers the repo root under a fixed
alias; everything else is then imported relatively from that package. This module imports nothing
of ours and has no side effects at import.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

PACKAGE_ALIAS = "wan_distrifusion"
REPO_ROOT = Path(__file__).resolve().parents[1]


def register_package(alias: str = PACKAGE_ALIAS, root: Path = REPO_ROOT, *, run_init: bool = False) -> ModuleType:
    """Register ``root`` as package ``alias`` in ``sys.modules`` and return it.

    By default the root ``__init__.py`` (ComfyUI's entry point: node mappings) is *not* executed, so a
    worker or the CLI never touches ComfyUI code; subpackages (``alias.distrifusion``) import normally.
    An alias already registered for the same root (e.g. by the test suite) is reused.
    """
    root = Path(root).resolve()
    existing = sys.modules.get(alias)
    if existing is not None:
        paths = [Path(p).resolve() for p in getattr(existing, "__path__", [])]
        if root in paths:
            return existing
        raise ImportError(f"module name {alias!r} is already taken by {existing!r}; cannot register {root} under it")
    spec = importlib.util.spec_from_file_location(alias, root / "__init__.py", submodule_search_locations=[str(root)])
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load the package at {root}")
    package = importlib.util.module_from_spec(spec)
    sys.modules[alias] = package
    if run_init:
        try:
            spec.loader.exec_module(package)
        except BaseException:
            del sys.modules[alias]
            raise
    return package


def drop_script_dir(script: str) -> None:
    """Remove a script's own folder from ``sys.path[0]`` so our module files never shadow top-level ones."""
    folder = Path(script).resolve().parent
    if sys.path and sys.path[0] and Path(sys.path[0]).resolve() == folder:
        del sys.path[0]
