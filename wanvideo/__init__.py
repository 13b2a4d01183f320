"""Wan 2.1 video DiT: model, checkpoint loading and flow-matching sampling. Never imports ComfyUI.

The public names are resolved on first use (PEP 562), so importing one submodule, e.g.
``wanvideo.loading`` in a worker, does not import the others.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .errors import WanDistriFusionError

if TYPE_CHECKING:
    from .loading import load_wan_model
    from .model import WanConfig, WanModel
    from .sampling import sample

_EXPORTS = {"load_wan_model": "loading", "WanConfig": "model", "WanModel": "model", "sample": "sampling"}

__all__ = ["WanConfig", "WanDistriFusionError", "WanModel", "load_wan_model", "sample"]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
