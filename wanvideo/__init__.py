"""Wan 2.1 video DiT: model, checkpoint loading and flow-matching sampling. Never imports ComfyUI."""

from .errors import WanDistriFusionError
from .loading import load_wan_model
from .model import WanConfig, WanModel
from .sampling import sample

__all__ = ["WanConfig", "WanDistriFusionError", "WanModel", "load_wan_model", "sample"]
