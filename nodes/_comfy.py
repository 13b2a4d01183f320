"""The few ComfyUI APIs the nodes use, imported lazily so the pack imports without ComfyUI."""

from __future__ import annotations

import importlib.util

import torch

from ..wanvideo.errors import WanDistriFusionError


def comfy_available() -> bool:
    """Whether this process runs inside ComfyUI (its ``comfy`` and ``folder_paths`` modules import)."""
    return importlib.util.find_spec("comfy") is not None and importlib.util.find_spec("folder_paths") is not None


def diffusion_model_files() -> list[str]:
    """File names in ComfyUI's ``diffusion_models`` folder(s); empty outside ComfyUI."""
    if not comfy_available():
        return []
    import folder_paths

    return folder_paths.get_filename_list("diffusion_models")


def diffusion_model_path(name: str) -> str:
    import folder_paths

    path = folder_paths.get_full_path("diffusion_models", name)
    if path is None:
        raise WanDistriFusionError(
            f"model: {name!r} is not in ComfyUI's diffusion_models folder; put the Wan 2.1 .safetensors file in "
            "ComfyUI/models/diffusion_models and press R (refresh) in the graph editor."
        )
    return path


def comfy_device_type() -> str:
    """``cuda`` or ``cpu``: what ComfyUI itself computes on (``--cpu`` gives ``cpu``)."""
    import comfy.model_management as mm

    return "cpu" if mm.get_torch_device().type == "cpu" else "cuda"


def local_cuda_devices() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def model_management():
    import comfy.model_management

    return comfy.model_management


def progress_bar(total: int, node_id: str | None = None):
    import comfy.utils

    return comfy.utils.ProgressBar(total, node_id=node_id)


def wan_latent_format(channels: int = 16):
    """ComfyUI's latent format of a Wan model's latents: ``Wan21`` (16 channels) or ``Wan22`` (48, TI2V 5B)."""
    import comfy.latent_formats

    return comfy.latent_formats.Wan22() if channels == 48 else comfy.latent_formats.Wan21()


def sampler_names(extra: tuple[str, ...] = ()) -> list[str]:
    """KSampler's sampler names (then ``extra``); outside ComfyUI, the core's own solver names."""
    if not comfy_available():
        from ..wanvideo.sampling import SAMPLERS

        return list(dict.fromkeys([*SAMPLERS, *extra]))
    import comfy.samplers

    return list(dict.fromkeys([*comfy.samplers.KSampler.SAMPLERS, *extra]))


def scheduler_names() -> list[str]:
    """KSampler's scheduler names; outside ComfyUI, the core's own schedule names."""
    if not comfy_available():
        from ..wanvideo.sampling import SCHEDULERS

        return list(SCHEDULERS)
    import comfy.samplers

    return list(comfy.samplers.KSampler.SCHEDULERS)


def prepare_noise(latent: torch.Tensor, seed: int) -> torch.Tensor:
    """KSampler's starting noise for ``latent`` (CPU, seeded as ComfyUI seeds it)."""
    import comfy.sample

    return comfy.sample.prepare_noise(latent, seed)


def previewer(latent_format, device: torch.device | str = "cpu"):
    """ComfyUI's latent previewer for the server's ``--preview-method`` (``None`` when previews are off), decoding
    latents on ``device`` (where the sampler keeps them)."""
    try:
        import latent_preview

        return latent_preview.get_previewer(device, latent_format)
    except Exception:  # previews are a nicety: never fail a run for them
        return None
