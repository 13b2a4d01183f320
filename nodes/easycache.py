"""🎯 Official DistriFusion EasyCache: ComfyUI's EasyCache node for our model link (model in, model out, as
native ``EasyCache`` sits between the model and KSampler); the Samplers run it on every rank as one decision."""

from __future__ import annotations

from dataclasses import replace

from ..wanvideo.step_cache import MAX_REUSE_THRESHOLD, EasyCacheSettings
from ._widgets import bool_widget, float_widget, socket
from .loader import CATEGORY
from .runtime import MODEL_TYPE, DistriFusionModel

TOOLTIPS = {
    "model": "The DistriFusion model link (Model Loader output) to add EasyCache to.",
    "reuse_threshold": "The threshold for reusing cached steps (ComfyUI's EasyCache): a step is skipped while the "
    "predicted relative output change summed since the last computed step stays below it. Higher skips more.",
    "start_percent": "The relative sampling step to begin use of EasyCache (as a sigma, via the Sampler's shift).",
    "end_percent": "The relative sampling step to end use of EasyCache; later steps always run the model.",
    "verbose": "Whether to log verbose information (every decision, from rank 0).",
}


class OfficialDistriFusionEasyCache:
    """ComfyUI's EasyCache on the DistriFusion model: every rank skips the same sampler steps."""

    @classmethod
    def INPUT_TYPES(cls):
        tip = TOOLTIPS
        return {
            "required": {
                "model": socket(MODEL_TYPE, tip["model"]),
                "reuse_threshold": float_widget(0.2, 0.0, MAX_REUSE_THRESHOLD, 0.01, tip["reuse_threshold"]),
                "start_percent": float_widget(0.15, 0.0, 1.0, 0.01, tip["start_percent"]),
                "end_percent": float_widget(0.95, 0.0, 1.0, 0.01, tip["end_percent"]),
                "verbose": bool_widget(False, tip["verbose"]),
            }
        }

    RETURN_TYPES = (MODEL_TYPE,)
    OUTPUT_TOOLTIPS = ("The model with EasyCache: connect a DistriFusion Sampler (or Sampler (Advanced)).",)
    FUNCTION = "apply"
    CATEGORY = CATEGORY
    DESCRIPTION = (
        "ComfyUI's EasyCache for the DistriFusion Wan model: skips model calls whose output barely changes "
        "(training-free), the same steps on every GPU; a skipped step costs no GPU compute."
    )

    def apply(self, model: DistriFusionModel, reuse_threshold, start_percent, end_percent, verbose):
        settings = EasyCacheSettings(float(reuse_threshold), float(start_percent), float(end_percent), bool(verbose))
        return (replace(model, step_cache=settings),)
