"""🎯 Official DistriFusion Status: the runtime's report as a STRING, also shown on the node."""

from __future__ import annotations

from ..distrifusion.status import format_report, status_report
from ._widgets import socket
from .loader import CATEGORY
from .runtime import MODEL_TYPE, RUNTIMES


class OfficialDistriFusionStatus:
    """Package check, GPUs, topology, partition, last step and per-step time, memory per rank, last error."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {},
            "optional": {
                "model": socket(
                    MODEL_TYPE, "Report this Loader's settings (and its group when that is the one running)."
                ),
                "latent": socket(
                    "LATENT", "Connect the Sampler's output to take the report after sampling (step times, memory)."
                ),
            },
        }

    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("report",)
    OUTPUT_TOOLTIPS = ("The status report as text.",)
    FUNCTION = "report"
    OUTPUT_NODE = True
    CATEGORY = CATEGORY
    DESCRIPTION = (
        "Shows whether the official distrifuser package is usable, the GPUs, world size, ranks, split, "
        "patch settings, current step, seconds per step, memory per rank and the last error. The same "
        "report is live at GET /distrifusion/status."
    )

    @classmethod
    def IS_CHANGED(cls, **kwargs):
        return float("nan")  # always re-run: the report is live

    def report(self, model=None, latent=None):
        text = format_report(current_report(model))
        return {"ui": {"text": [text]}, "result": (text,)}


def current_report(model=None) -> dict:
    """The report of the running group, or of ``model``'s settings when another (or none) runs."""
    runtime, settings = RUNTIMES.current()
    starting = None
    if runtime is None and RUNTIMES.starting() is not None:
        starting, settings = RUNTIMES.starting()
    if model is not None and settings != model.settings:
        runtime, starting, settings = None, None, model.settings
    if settings is None:
        return status_report(runtime, RUNTIMES.activity)
    names = settings.model + (f" + {settings.second_model} (second model)" if settings.second_model else "")
    return status_report(runtime, RUNTIMES.activity, settings.spec, model=names, starting=starting)
