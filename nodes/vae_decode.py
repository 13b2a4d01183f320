"""🎯 Official DistriFusion VAE Decode: ComfyUI's Wan VAE, decoded exactly with its rows split over the workers."""

from __future__ import annotations

import torch

from ..wanvideo.errors import WanDistriFusionError
from . import _comfy
from ._widgets import socket
from .loader import CATEGORY
from .runtime import MODEL_TYPE


class OfficialDistriFusionVAEDecode:
    """LATENT + ComfyUI's VAE + our model (its worker group) -> IMAGE, equal to VAE Decode."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "samples": socket("LATENT", "The Wan video latent to decode (the Sampler's output)."),
                "vae": socket(
                    "VAE",
                    "The Wan VAE from Load VAE (wan_2.1_vae.safetensors, or wan2.2_vae.safetensors for the TI2V 5B); its weights go to the workers once.",
                ),
                "model": socket(
                    MODEL_TYPE, "The Loader's model: its GPUs decode the video, each a slab of rows (exact, no tiles)."
                ),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    RETURN_TYPES = ("IMAGE",)
    OUTPUT_TOOLTIPS = ("The decoded frames, as VAE Decode gives them.",)
    FUNCTION = "decode"
    CATEGORY = CATEGORY
    DESCRIPTION = (
        "Decodes a Wan 2.1 or Wan 2.2 video latent on the Loader's GPUs: each GPU decodes a slab of rows and exchanges one "
        "row with its neighbours per convolution, so the frames equal ComfyUI's VAE Decode (not tiles blended at "
        "seams) while each GPU holds about 1/N of the decoder's activations. At GPUs = 1 it decodes here."
    )

    def decode(self, samples, vae, model, unique_id=None):
        from ..distrifusion.session import JobCancelled
        from ..distrifusion.vae_session import decode_on_runtime
        from ..wanvideo.vae import vae_config_from_state_dict

        mm = _comfy.model_management()
        state_dict = getattr(vae, "first_stage_model", None)
        if state_dict is None:
            raise WanDistriFusionError("vae: this VAE has no weights; connect Load VAE with a Wan VAE file.")
        state_dict = state_dict.state_dict()
        try:  # a non-Wan VAE is refused here, before any work
            vae_config_from_state_dict(state_dict)
        except WanDistriFusionError as error:
            raise WanDistriFusionError(f"vae: {error}") from error
        latent = samples["samples"]
        if latent.ndim != 5:
            raise WanDistriFusionError(
                f"samples: a {latent.ndim}-D LATENT {list(latent.shape)} is not a video latent; connect the Sampler's "
                "LATENT (or another Wan latent [batch, 16, frames, rows, cols])."
            )
        dtype = getattr(vae, "vae_dtype", torch.float32)
        bar = _comfy.progress_bar(latent.shape[2], node_id=unique_id)
        runtime = model.runtime()
        try:
            pixels = decode_on_runtime(
                runtime,
                state_dict,
                latent,
                dtype=dtype,
                progress=lambda done, total: bar.update_absolute(done, total),  # also ComfyUI's Cancel check
                cancelled=mm.processing_interrupted,
            )
        except JobCancelled as exc:
            mm.interrupt_current_processing(False)
            raise mm.InterruptProcessingException() from exc
        images = pixels.add_(1.0).div_(2.0).clamp_(0.0, 1.0).movedim(1, -1)  # VAE Decode's process_output
        return (images.reshape(-1, *images.shape[-3:]),)
