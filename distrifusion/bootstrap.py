"""Make the repo importable as a package in a fresh process, whatever its folder is called.

ComfyUI imports the pack under its folder name (``ComfyUI-WanVideo-DistriFusion``), which no child
process can ``import``. Every entry point (``cli.py``, ``distrifusion/worker_main.py``, ``bench/``, the
tests' fault worker) runs this file by path before any package exists, with one line::

    package = runpy.run_path(str(REPO / "distrifusion" / "bootstrap.py"))["entry_point"](__file__)

:func:`entry_point` registers the repo root under a fixed alias; everything else is then imported
relatively from that package. This module imports nothing of ours and has no side effects at import.
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


def entry_point(script: str | None = None) -> ModuleType:
    """The pack for an entry-point script: its folder dropped from ``sys.path`` when it runs as ``__main__``
    (so our module files never shadow top-level ones), then :func:`register_package`."""
    main = sys.modules.get("__main__")
    if (
        script is not None
        and getattr(main, "__file__", None)
        and Path(main.__file__).resolve() == Path(script).resolve()
    ):
        drop_script_dir(script)
    return register_package()
