"""🎯 Official DistriFusion LoRA: one link of a LoRA chain (file from ComfyUI's ``loras`` folder, strength) that the
Model Loader merges on every rank; chain several through ``previous``."""

from __future__ import annotations

from dataclasses import replace

from ..wanvideo.errors import WanDistriFusionError
from ..wanvideo.loading import inspect_wan_checkpoint
from ..wanvideo.lora import LoraFile, plan_loras
from ._widgets import combo_widget, float_widget, socket
from .runtime import RuntimeSettings

CATEGORY = "WanVideoWrapper/Official DistriFusion"
LORA_CHAIN_TYPE = "DISTRIFUSION_LORA_CHAIN"
"""Socket type of a LoRA chain: a tuple of ``LoraFile`` (path, strength), first link first."""

TOOLTIPS = {
    "lora_name": "LoRA file from ComfyUI/models/loras, for this Wan model (ComfyUI's diffusion_model. / kohya lora_unet_ "
    "/ diffusers transformer. names; up/down + alpha, lora_A/lora_B, diff / diff_b such as the lightx2v files).",
    "strength": "How strongly the LoRA changes the model, as LoraLoaderModelOnly's strength_model (0 = off, negative "
    "inverts). Changing it re-merges on the running workers without restarting them.",
    "previous": "Optional: the chain so far (another DistriFusion LoRA node); this LoRA is added after it.",
}


class OfficialDistriFusionLora:
    """One LoRA (file + strength) added to a chain the Model Loader merges into the weights on every rank."""

    @classmethod
    def INPUT_TYPES(cls):
        from . import _comfy

        return {
            "required": {
                "lora_name": combo_widget(_lora_files(_comfy), None, TOOLTIPS["lora_name"]),
                "strength": float_widget(1.0, -100.0, 100.0, 0.01, TOOLTIPS["strength"]),
            },
            "optional": {"previous": socket(LORA_CHAIN_TYPE, TOOLTIPS["previous"])},
        }

    RETURN_TYPES = (LORA_CHAIN_TYPE,)
    RETURN_NAMES = ("lora",)
    OUTPUT_TOOLTIPS = (
        "The LoRA chain; connect it to the DistriFusion Model Loader's lora input (its second_lora input for Wan 2.2 "
        "A14B's low-noise expert), or to another LoRA node.",
    )
    FUNCTION = "chain"
    CATEGORY = CATEGORY
    DESCRIPTION = (
        "Applies a LoRA to the DistriFusion Wan model on every GPU, like LoraLoaderModelOnly. Chain several; "
        "a new LoRA or strength re-merges on the running workers between prompts (no restart)."
    )

    def chain(self, lora_name: str, strength: float, previous: tuple[LoraFile, ...] | None = None):
        return ((*(previous or ()), LoraFile(lora_path(lora_name), strength)),)


def lora_path(name: str) -> str:
    import folder_paths

    path = folder_paths.get_full_path("loras", name)
    if path is None:
        raise WanDistriFusionError(
            f"lora name: {name!r} is not in ComfyUI's loras folder; put the LoRA .safetensors in ComfyUI/models/loras "
            "and press R (refresh) in the graph editor."
        )
    return path


def with_loras(
    settings: RuntimeSettings,
    chain: tuple[LoraFile, ...] | None,
    second_chain: tuple[LoraFile, ...] | None = None,
) -> RuntimeSettings:
    """``settings`` with the LoRA chain of its model and ``second_chain`` of its second model (Wan 2.2 A14B's
    low-noise expert), each checked against its checkpoint's shapes (headers only) before any worker starts or
    changes a weight; raises naming the file and the mismatch."""
    chain, second_chain = tuple(chain or ()), tuple(second_chain or ())
    if second_chain and settings.spec.second_model_path is None:
        raise WanDistriFusionError(
            "second lora: a LoRA chain is connected for the second model, but second model is none; pick the "
            "low-noise expert there (Wan 2.2 A14B) or connect the chain to the lora input instead."
        )
    for links, path in ((chain, settings.spec.model_path), (second_chain, settings.spec.second_model_path)):
        if links:
            plan_loras(links, inspect_wan_checkpoint(path).config)
    return replace(settings, spec=settings.spec.with_changes(loras=chain, second_loras=second_chain))


def _lora_files(comfy) -> list[str]:
    if not comfy.comfy_available():
        return []
    import folder_paths

    return folder_paths.get_filename_list("loras")
