"""The ComfyUI nodes: thin adapters between ComfyUI's types and the runtime.

ComfyUI modules are imported only inside the nodes' functions (see ``_comfy``), so this package
imports without ComfyUI.
"""

from .easycache import OfficialDistriFusionEasyCache
from .loader import OfficialDistriFusionModelLoader
from .lora import OfficialDistriFusionLora
from .sampler import OfficialDistriFusionSampler, OfficialDistriFusionSamplerAdvanced
from .status import OfficialDistriFusionStatus
from .vae_decode import OfficialDistriFusionVAEDecode

NODE_CLASS_MAPPINGS = {
    "OfficialDistriFusionModelLoader": OfficialDistriFusionModelLoader,
    "OfficialDistriFusionSampler": OfficialDistriFusionSampler,
    "OfficialDistriFusionSamplerAdvanced": OfficialDistriFusionSamplerAdvanced,
    "OfficialDistriFusionStatus": OfficialDistriFusionStatus,
    "OfficialDistriFusionVAEDecode": OfficialDistriFusionVAEDecode,
    "OfficialDistriFusionLora": OfficialDistriFusionLora,
    "OfficialDistriFusionEasyCache": OfficialDistriFusionEasyCache,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "OfficialDistriFusionModelLoader": "🎯 Official DistriFusion Model Loader",
    "OfficialDistriFusionSampler": "🎯 Official DistriFusion Sampler",
    "OfficialDistriFusionSamplerAdvanced": "🎯 Official DistriFusion Sampler (Advanced)",
    "OfficialDistriFusionStatus": "🎯 Official DistriFusion Status",
    "OfficialDistriFusionVAEDecode": "🎯 Official DistriFusion VAE Decode",
    "OfficialDistriFusionLora": "🎯 Official DistriFusion LoRA",
    "OfficialDistriFusionEasyCache": "🎯 Official DistriFusion EasyCache",
}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
