"""What ComfyUI's Wan model makes of a CONDITIONING's image entries and a LATENT's noise mask, for our ranks.

Native ``WanImageToVideo`` / ``WanFirstLastFrameToVideo`` put ``concat_latent_image``, ``concat_mask`` and
``clip_vision_output`` into the conditioning; ComfyUI's ``WAN21.concat_cond`` turns the first two into the channels
``y`` concatenated to the latent, and ``extra_conds`` the last into ``clip_fea``. ``Wan22ImageToVideoLatent``'s
``noise_mask`` becomes per-frame timesteps (``WAN22.process_timestep``). We build the same tensors here, in the
ComfyUI process, with ComfyUI's own resampling (``comfy.utils``), and send them to the ranks with the job.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..wanvideo.errors import WanDistriFusionError
from ..wanvideo.model import WanConfig

MASK_CHANNELS = 4
"""Wan I2V's mask channels in front of the image latents (one per frame of a 4-frame latent)."""


def image_channels(
    options: dict, config: WanConfig, latent_shape: tuple[int, ...], latent_format, name: str
) -> Tensor | None:
    """``y`` ``[1, concat_channels, F, H, W]`` of one conditioning's ``options`` for a latent of ``latent_shape``;
    ``None`` for a model without concatenated channels (ComfyUI ignores the image there too)."""
    import comfy.utils

    extra = config.concat_channels
    if extra == 0:
        return None
    frames, rows, cols = latent_shape[2:]
    image = options.get("concat_latent_image")
    if image is None:
        return torch.zeros(1, extra, frames, rows, cols)
    image = image.detach().to("cpu", torch.float32)
    if image.dim() != 5:
        raise WanDistriFusionError(
            f"{name}: concat_latent_image is {list(image.shape)}, not a video latent [B, C, frames, h, w]; make it "
            "with WanImageToVideo or WanFirstLastFrameToVideo."
        )
    image = comfy.utils.common_upscale(image, cols, rows, "bilinear", "center")
    step = latent_format.latent_channels
    image = torch.cat([latent_format.process_in(image[:, i : i + step]) for i in range(0, image.shape[1], step)], 1)
    image = comfy.utils.resize_to_batch_size(image, 1)
    if extra != image.shape[1] + MASK_CHANNELS and (not config.clip_image or extra == image.shape[1]):
        return _fit_channels(image, extra, name)
    image = image[:, : extra - MASK_CHANNELS]
    mask = options.get("concat_mask")
    if mask is None:
        mask = torch.zeros(1, MASK_CHANNELS, frames, rows, cols)
    else:
        mask = mask.detach().to("cpu", torch.float32)
        if mask.shape[1] != MASK_CHANNELS:
            mask = mask.mean(dim=1, keepdim=True)
        mask = comfy.utils.common_upscale(1.0 - mask, cols, rows, "bilinear", "center")
        if mask.shape[2] < frames:
            mask = torch.nn.functional.pad(mask, (0, 0, 0, 0, 0, frames - mask.shape[2]), value=0.0)
        if mask.shape[1] == 1:
            mask = mask.repeat(1, MASK_CHANNELS, 1, 1, 1)
        mask = comfy.utils.resize_to_batch_size(mask, 1)
    return _fit_channels(torch.cat([mask, image], dim=1), extra, name)


def _fit_channels(y: Tensor, extra: int, name: str) -> Tensor:
    if y.shape[1] != extra:
        raise WanDistriFusionError(
            f"{name}: the image conditioning has {y.shape[1]} channels but this model concatenates {extra}; make it "
            "with the Wan image-to-video node of this model's family (Wan 2.1/2.2 I2V: WanImageToVideo)."
        )
    return y.contiguous()


def clip_features(options: dict, config: WanConfig) -> Tensor | None:
    """``clip_fea`` ``[1, N, 1280]``: CLIP Vision Encode's penultimate hidden states, for models with ``img_emb``."""
    output = options.get("clip_vision_output")
    if output is None or not config.clip_image:
        return None
    return output.penultimate_hidden_states.detach().to("cpu", torch.float32)[:1].contiguous()


def frame_denoise(noise_mask: Tensor, latent_shape: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """A LATENT's ``noise_mask`` as KSampler prepares it (``[1, C, F, H, W]``, for keeping the masked latents) and
    each latent frame's mean of it ``[1, 1, F, 1, 1]`` (what ``WAN22.process_timestep`` scales ``t`` by)."""
    import comfy.sampler_helpers

    mask = comfy.sampler_helpers.prepare_mask(noise_mask.to(torch.float32), latent_shape, "cpu")
    return mask, mask.mean(dim=(1, 3, 4), keepdim=True).contiguous()
