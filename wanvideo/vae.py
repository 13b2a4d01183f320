"""The Wan 2.1 VAE decoder: causal 3D convolutions decoded one latent frame at a time with a cache of the past.

Key names are those of ``wan_2.1_vae.safetensors`` (the file ComfyUI's ``Load VAE`` reads): ``conv2`` and
``decoder.*``; the encoder's keys are ignored. The decoder never knows whether it runs on one device or on
a slab of rows: every 3×3 convolution asks its ``RowContext`` for the rows above and below its slab (zeros
at the frame's edge), and the middle block's attention asks it for the keys and values of all rows.

Decoding follows the original chunking exactly: latent frame 0 gives one video frame, every later latent
frame four; each temporal convolution sees the last two frames of its own input stream (zeros before the
first), and the time upsampling skips the first chunk (its stream starts with latent frame 1).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import WanDistriFusionError

logger = logging.getLogger(__name__)

PAST_FRAMES = 2
"""A temporal kernel of 3 sees two frames before the current one."""
WAN21_LATENT_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
WAN21_LATENT_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip
"""The Wan 2.1 VAE's per-channel latent statistics: the DiT samples ``(z - mean) / std``."""


def latent_for_vae(model_latent: Tensor) -> Tensor:
    """The DiT's normalised latent (what the CLI saves) -> the VAE's own latent (what a ComfyUI LATENT holds)."""
    shape = (1, len(WAN21_LATENT_MEAN), 1, 1, 1)
    mean = torch.tensor(WAN21_LATENT_MEAN, dtype=model_latent.dtype).view(shape)
    std = torch.tensor(WAN21_LATENT_STD, dtype=model_latent.dtype).view(shape)
    return model_latent * std.to(model_latent.device) + mean.to(model_latent.device)


class RowContext:
    """Where rows outside this slab come from: on one device, zeros (the frame's edge) and local attention."""

    def pad_rows(self, x: Tensor, rows: int) -> Tensor:
        """``x`` (rows at dim -2) with ``rows`` rows added above and below."""
        return F.pad(x, (0, 0, rows, rows))

    def all_rows(self, x: Tensor) -> Tensor:
        """``x`` (rows at dim -2) with every row of the frame: here it already is the frame."""
        return x


@dataclass(frozen=True)
class WanVAEConfig:
    """The decoder's shape, read from the weights: base width, latent channels (16 for Wan 2.1)."""

    dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temporal_upsample: tuple[bool, ...] = (True, True, False)

    @property
    def spatial_scale(self) -> int:
        return 2 ** (len(self.dim_mult) - 1)

    def output_frames(self, latent_frames: int) -> int:
        return 1 + 4 * (latent_frames - 1)


class CausalConv3d(nn.Conv3d):
    """A 3D convolution padded with the past in time, with neighbour rows in height, with zeros in width."""

    def __init__(self, in_dim: int, out_dim: int, kernel: int | tuple[int, int, int]):
        kernel = (kernel,) * 3 if isinstance(kernel, int) else kernel
        super().__init__(in_dim, out_dim, kernel, padding=(0, 0, kernel[2] // 2))
        self.past_frames = kernel[0] - 1
        self.halo_rows = kernel[1] // 2

    def forward(self, x: Tensor, past: Tensor | None, rows: RowContext) -> Tensor:
        if self.past_frames:
            if past is None:
                past = x.new_zeros(x.shape[:2] + (self.past_frames,) + x.shape[3:])
            x = torch.cat([past, x], dim=2)
        if self.halo_rows:
            x = rows.pad_rows(x, self.halo_rows)
        return super().forward(x)


class TimeCache:
    """Each temporal convolution's last ``PAST_FRAMES`` input frames, in call order (one decode = one cache)."""

    def __init__(self):
        self.frames: list[Tensor | None] = []
        self.index = 0

    def start_chunk(self) -> None:
        self.index = 0

    def step(self, conv: CausalConv3d, x: Tensor, rows: RowContext, *, skip: bool = False) -> Tensor:
        """Run ``conv`` on ``x`` after the frames it saw last chunk, then remember this chunk's tail."""
        if self.index == len(self.frames):
            self.frames.append(None)
        past = self.frames[self.index]
        tail = x[:, :, -PAST_FRAMES:]
        if tail.shape[2] < PAST_FRAMES:
            before = past[:, :, -(PAST_FRAMES - tail.shape[2]) :] if past is not None else None
            if before is None:
                before = x.new_zeros(x.shape[:2] + (PAST_FRAMES - tail.shape[2],) + x.shape[3:])
            tail = torch.cat([before, tail], dim=2)
        self.index += 1
        if skip:  # this stream starts next chunk: nothing is remembered, nothing is convolved
            return x
        self.frames[self.index - 1] = tail.clone()
        return conv(x, past, rows)


class RMSNorm(nn.Module):
    """Normalise over channels at each position (no statistics across positions), then scale."""

    def __init__(self, dim: int, images: bool = False):
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones((dim, 1, 1) if images else (dim, 1, 1, 1)))

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(x, dim=1) * self.scale * self.gamma.to(x)


class ResidualBlock(nn.Module):
    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.residual = nn.Sequential(
            RMSNorm(in_dim),
            nn.SiLU(),
            CausalConv3d(in_dim, out_dim, 3),
            RMSNorm(out_dim),
            nn.SiLU(),
            nn.Dropout(0.0),
            CausalConv3d(out_dim, out_dim, 3),
        )
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: Tensor, cache: TimeCache, rows: RowContext) -> Tensor:
        shortcut = self.shortcut(x, None, rows) if isinstance(self.shortcut, CausalConv3d) else x
        for layer in self.residual:
            x = cache.step(layer, x, rows) if isinstance(layer, CausalConv3d) else layer(x)
        return x + shortcut


class AttentionBlock(nn.Module):
    """Single-head self-attention over the positions of each frame."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: Tensor, rows: RowContext) -> Tensor:
        b, c, t, h, w = x.shape
        frames = x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
        q, k, v = self.to_qkv(self.norm(frames)).chunk(3, dim=1)
        k, v = rows.all_rows(k), rows.all_rows(v)

        def tokens(y: Tensor) -> Tensor:  # [bt, c, rows, w] -> [bt, 1, rows * w, c]
            return y.reshape(b * t, 1, c, -1).transpose(2, 3)

        out = F.scaled_dot_product_attention(tokens(q), tokens(k), tokens(v))
        out = self.proj(out.transpose(2, 3).reshape(b * t, c, h, w))
        return x + out.reshape(b, t, c, h, w).permute(0, 2, 1, 3, 4)


class Resample(nn.Module):
    """Nearest 2× in space then a 3×3 convolution halving the channels; ``upsample3d`` doubles time first."""

    def __init__(self, dim: int, mode: str):
        super().__init__()
        self.mode = mode
        self.resample = nn.Sequential(
            nn.Upsample(scale_factor=(2.0, 2.0), mode="nearest-exact"), nn.Conv2d(dim, dim // 2, 3)
        )
        if mode == "upsample3d":
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1))

    def forward(self, x: Tensor, cache: TimeCache, rows: RowContext, first_chunk: bool) -> Tensor:
        if self.mode == "upsample3d":
            b, c, t, h, w = x.shape
            doubled = cache.step(self.time_conv, x, rows, skip=first_chunk)
            if not first_chunk:  # [b, (2 c), t] -> [b, c, (t 2)]: the two outputs of a frame become two frames
                x = doubled.reshape(b, 2, c, t, h, w).permute(0, 2, 3, 1, 4, 5).reshape(b, c, t * 2, h, w)
        b, c, t, h, w = x.shape
        frames = x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
        upsample, conv = self.resample
        frames = rows.pad_rows(upsample(frames), 1)
        frames = F.conv2d(frames, conv.weight, conv.bias, padding=(0, 1))
        return frames.reshape(b, t, c // 2, 2 * h, 2 * w).permute(0, 2, 1, 3, 4)


class Decoder3d(nn.Module):
    def __init__(self, config: WanVAEConfig):
        super().__init__()
        dim, mult = config.dim, config.dim_mult
        dims = [dim * u for u in (mult[-1], *mult[::-1])]
        self.conv1 = CausalConv3d(config.z_dim, dims[0], 3)
        self.middle = nn.Sequential(
            ResidualBlock(dims[0], dims[0]), AttentionBlock(dims[0]), ResidualBlock(dims[0], dims[0])
        )
        upsamples = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            if i > 0:  # the previous resample halved the channels
                in_dim //= 2
            for _ in range(config.num_res_blocks + 1):
                upsamples.append(ResidualBlock(in_dim, out_dim))
                in_dim = out_dim
            if i != len(mult) - 1:
                upsamples.append(Resample(out_dim, "upsample3d" if config.temporal_upsample[i] else "upsample2d"))
        self.upsamples = nn.Sequential(*upsamples)
        self.head = nn.Sequential(RMSNorm(dims[-1]), nn.SiLU(), CausalConv3d(dims[-1], 3, 3))

    def forward(self, x: Tensor, cache: TimeCache, rows: RowContext, first_chunk: bool) -> Tensor:
        cache.start_chunk()
        x = cache.step(self.conv1, x, rows)
        for layer in self.middle:
            x = layer(x, rows) if isinstance(layer, AttentionBlock) else layer(x, cache, rows)
        for layer in self.upsamples:
            x = layer(x, cache, rows, first_chunk) if isinstance(layer, Resample) else layer(x, cache, rows)
        norm, silu, conv = self.head
        return cache.step(conv, silu(norm(x)), rows)


class WanVAEDecoder(nn.Module):
    """``conv2`` then the decoder, one latent frame at a time; ``decode`` returns pixels in [-1, 1] (unclamped)."""

    def __init__(self, config: WanVAEConfig = WanVAEConfig()):
        super().__init__()
        self.config = config
        self.conv2 = CausalConv3d(config.z_dim, config.z_dim, 1)
        self.decoder = Decoder3d(config)

    def decode(
        self,
        z: Tensor,
        rows: RowContext | None = None,
        on_chunk: Callable[[int, int], None] | None = None,
        out: Tensor | None = None,
    ) -> Tensor:
        """Decode ``z`` [B, C, F, H, W] (un-normalised Wan latents, as in a ComfyUI LATENT) to [B, 3, 1 + 4 (F-1), 8H, 8W].

        ``on_chunk(done, total)`` is called after each latent frame (it may raise to cancel); ``out`` receives the
        frames as they come (any device or dtype), so the whole video never sits on the decoding device.
        """
        rows = rows or RowContext()
        if z.ndim != 5 or z.shape[1] != self.config.z_dim:
            raise WanDistriFusionError(
                f"VAE decode: expected a video latent [batch, {self.config.z_dim}, frames, rows, cols], got "
                f"{list(z.shape)}; connect the LATENT of a Wan {'2.1' if self.config.z_dim == 16 else '2.2'} model."
            )
        b, _, frames, h, w = z.shape
        scale = self.config.spatial_scale
        shape = (b, 3, self.config.output_frames(frames), h * scale, w * scale)
        if out is None:
            out = z.new_empty(shape)
        elif tuple(out.shape) != shape:
            raise WanDistriFusionError(f"VAE decode: output buffer {list(out.shape)} is not {list(shape)}")
        cache = TimeCache()
        x = self.conv2(z, None, rows)
        written = 0
        for i in range(frames):
            chunk = self.decoder(x[:, :, i : i + 1], cache, rows, first_chunk=i == 0)
            out[:, :, written : written + chunk.shape[2]] = chunk.to(out)
            written += chunk.shape[2]
            del chunk
            if on_chunk is not None:
                on_chunk(i + 1, frames)
        return out


def is_wan21_vae(state_dict: dict[str, Tensor]) -> bool:
    return "decoder.middle.0.residual.0.gamma" in state_dict and (
        "decoder.upsamples.0.upsamples.0.residual.2.weight" not in state_dict
    )


def vae_config_from_state_dict(state_dict: dict[str, Tensor]) -> WanVAEConfig:
    """The decoder's widths from its tensors; a Wan 2.2 or non-Wan VAE is refused with what to load instead."""
    if "decoder.upsamples.0.upsamples.0.residual.2.weight" in state_dict:
        raise WanDistriFusionError(
            "VAE: this is the Wan 2.2 VAE (48 channels, 16x); the DistriFusion VAE Decode handles the Wan 2.1 VAE "
            "(wan_2.1_vae.safetensors) so far: use ComfyUI's VAE Decode for this one."
        )
    if not is_wan21_vae(state_dict):
        raise WanDistriFusionError(
            "VAE: not a Wan VAE (no decoder.middle.0.residual.0.gamma): load wan_2.1_vae.safetensors in Load VAE."
        )
    head = state_dict["decoder.head.2.weight"]
    z_dim = state_dict["conv2.weight"].shape[0]
    return WanVAEConfig(dim=head.shape[1], z_dim=z_dim)


def load_vae_decoder(
    state_dict: dict[str, Tensor], dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> WanVAEDecoder:
    """Our decoder from a Wan 2.1 VAE state dict (the encoder's tensors are left out)."""
    config = vae_config_from_state_dict(state_dict)
    with torch.device("meta"):
        model = WanVAEDecoder(config)
    wanted = model.state_dict().keys()
    missing = [key for key in wanted if key not in state_dict]
    if missing:
        raise WanDistriFusionError(
            f"VAE: the file lacks {len(missing)} decoder tensors (first: {missing[:3]}); is it a complete "
            "wan_2.1_vae.safetensors?"
        )
    tensors = {key: state_dict[key].to(device=device, dtype=dtype) for key in wanted}
    model.load_state_dict(tensors, assign=True)
    logger.info("Wan VAE decoder: dim %d, %d latent channels, %s", config.dim, config.z_dim, dtype)
    return model.eval().requires_grad_(False)


def decoder_state_dict(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Only the tensors the decoder uses (what is sent to the ranks)."""
    return {k: v for k, v in state_dict.items() if k.startswith(("decoder.", "conv2."))}


def peak_activation_bytes(config: WanVAEConfig, rows: int, cols: int, element_size: int = 4) -> int:
    """The largest live activations of one chunk at the full-resolution stage (a rough upper figure)."""
    scale = config.spatial_scale
    # At the last stage: 4 frames x dim channels x (8 rows x 8 cols), a few tensors alive at once
    # (input, normed, padded copy with the past and the halo, output), plus the time caches of every level.
    last = 4 * config.dim * rows * scale * cols * scale
    return int(math.ceil(6 * last * element_size))
