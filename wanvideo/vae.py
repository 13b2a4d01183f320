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
WAN22_LATENT_MEAN = (
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557,
    -0.1382, 0.0542, 0.2813, 0.0891, 0.1570, -0.0098, 0.0375, -0.1825,
    -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
    -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230,
    -0.0313, -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.0520, 0.3748,
    0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667,
)  # fmt: skip
WAN22_LATENT_STD = (
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013,
    0.8158, 1.0344, 0.5894, 1.0901, 0.6885, 0.6165, 0.8454, 0.4978,
    0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093,
    0.5709, 0.6065, 0.6415, 0.4944, 0.5726, 1.2042, 0.5458, 1.6887,
    0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
)  # fmt: skip
"""The Wan VAEs' per-channel latent statistics: the DiT samples ``(z - mean) / std``."""
LATENT_STATISTICS = {16: (WAN21_LATENT_MEAN, WAN21_LATENT_STD), 48: (WAN22_LATENT_MEAN, WAN22_LATENT_STD)}


def latent_for_vae(model_latent: Tensor) -> Tensor:
    """The DiT's normalised latent (what the CLI saves) -> the VAE's own latent (what a ComfyUI LATENT holds)."""
    channels = model_latent.shape[1]
    if channels not in LATENT_STATISTICS:
        raise WanDistriFusionError(f"VAE: a latent of {channels} channels is neither Wan 2.1 (16) nor Wan 2.2 (48).")
    mean, std = (
        torch.tensor(v, dtype=model_latent.dtype, device=model_latent.device) for v in LATENT_STATISTICS[channels]
    )
    return model_latent * std.view(1, channels, 1, 1, 1) + mean.view(1, channels, 1, 1, 1)


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
    """The decoder's shape, read from the weights: base width, latent channels (16 for Wan 2.1, 48 for Wan 2.2).

    Wan 2.2's decoder (``version="2.2"``) keeps the channels through each upsampling, adds a parameter-free
    shortcut around every up block and ends in 12 channels that unfold into 2×2 pixels: 16× in all."""

    dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temporal_upsample: tuple[bool, ...] = (True, True, False)
    version: str = "2.1"

    def __post_init__(self):
        if self.version not in ("2.1", "2.2"):
            raise WanDistriFusionError(f"VAE: version {self.version!r} is not 2.1 or 2.2.")

    @property
    def patch(self) -> int:
        """Pixels per side that one output position of the decoder unfolds into (Wan 2.2: 2)."""
        return 2 if self.version == "2.2" else 1

    @property
    def spatial_scale(self) -> int:
        return 2 ** (len(self.dim_mult) - 1) * self.patch

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
    """Nearest 2× in space then a 3×3 convolution (Wan 2.1: halving the channels); ``upsample3d`` doubles time first."""

    def __init__(self, dim: int, mode: str, out_dim: int | None = None):
        super().__init__()
        self.mode = mode
        out_dim = dim // 2 if out_dim is None else out_dim
        self.resample = nn.Sequential(
            nn.Upsample(scale_factor=(2.0, 2.0), mode="nearest-exact"), nn.Conv2d(dim, out_dim, 3)
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
        return frames.reshape(b, t, conv.out_channels, 2 * h, 2 * w).permute(0, 2, 1, 3, 4)


class DupUp3D(nn.Module):
    """Wan 2.2's parameter-free shortcut of an up block: channels repeated, then unfolded into 2× rows and
    columns (and 2× frames, less the first chunk's first); each output row comes from one input row."""

    def __init__(self, in_dim: int, out_dim: int, factor_t: int, factor_s: int):
        super().__init__()
        self.out_dim, self.factor_t, self.factor_s = out_dim, factor_t, factor_s
        self.repeats = out_dim * factor_t * factor_s * factor_s // in_dim

    def forward(self, x: Tensor, first_chunk: bool) -> Tensor:
        b, _, t, h, w = x.shape
        ft, fs = self.factor_t, self.factor_s
        x = x.repeat_interleave(self.repeats, dim=1).view(b, self.out_dim, ft, fs, fs, t, h, w)
        x = x.permute(0, 1, 5, 2, 6, 3, 7, 4).reshape(b, self.out_dim, t * ft, h * fs, w * fs)
        return x[:, :, ft - 1 :] if first_chunk else x


class UpBlock(nn.Module):
    """Wan 2.2: residual blocks then a resample (``upsamples``), plus the ``DupUp3D`` shortcut around them."""

    def __init__(self, in_dim: int, out_dim: int, blocks: int, temporal: bool, upsample: bool):
        super().__init__()
        layers = [ResidualBlock(in_dim if i == 0 else out_dim, out_dim) for i in range(blocks)]
        if upsample:
            layers.append(Resample(out_dim, "upsample3d" if temporal else "upsample2d", out_dim=out_dim))
        self.upsamples = nn.Sequential(*layers)
        self.shortcut = DupUp3D(in_dim, out_dim, 2 if temporal else 1, 2) if upsample else None

    def forward(self, x: Tensor, cache: TimeCache, rows: RowContext, first_chunk: bool) -> Tensor:
        main = x
        for layer in self.upsamples:
            main = layer(main, cache, rows, first_chunk) if isinstance(layer, Resample) else layer(main, cache, rows)
        return main if self.shortcut is None else main + self.shortcut(x, first_chunk)


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
            temporal = i < len(config.temporal_upsample) and config.temporal_upsample[i]
            if config.version == "2.2":
                upsamples.append(UpBlock(in_dim, out_dim, config.num_res_blocks + 1, temporal, i != len(mult) - 1))
                continue
            if i > 0:  # the previous resample halved the channels
                in_dim //= 2
            for _ in range(config.num_res_blocks + 1):
                upsamples.append(ResidualBlock(in_dim, out_dim))
                in_dim = out_dim
            if i != len(mult) - 1:
                upsamples.append(Resample(out_dim, "upsample3d" if temporal else "upsample2d"))
        self.upsamples = nn.Sequential(*upsamples)
        self.head = nn.Sequential(RMSNorm(dims[-1]), nn.SiLU(), CausalConv3d(dims[-1], 3 * config.patch**2, 3))

    def forward(self, x: Tensor, cache: TimeCache, rows: RowContext, first_chunk: bool) -> Tensor:
        cache.start_chunk()
        x = cache.step(self.conv1, x, rows)
        for layer in self.middle:
            x = layer(x, rows) if isinstance(layer, AttentionBlock) else layer(x, cache, rows)
        for layer in self.upsamples:
            if isinstance(layer, Resample | UpBlock):
                x = layer(x, cache, rows, first_chunk)
            else:
                x = layer(x, cache, rows)
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
            chunk = unpatchify(self.decoder(x[:, :, i : i + 1], cache, rows, first_chunk=i == 0), self.config.patch)
            out[:, :, written : written + chunk.shape[2]] = chunk.to(out)
            written += chunk.shape[2]
            del chunk
            if on_chunk is not None:
                on_chunk(i + 1, frames)
        return out


def unpatchify(x: Tensor, patch: int) -> Tensor:
    """[B, 3 * patch², T, H, W] -> [B, 3, T, H * patch, W * patch], channel ``c * patch² + col * patch + row``."""
    if patch == 1:
        return x
    b, c, t, h, w = x.shape
    x = x.view(b, c // patch**2, patch, patch, t, h, w)  # (c, col, row)
    return x.permute(0, 1, 4, 5, 3, 6, 2).reshape(b, c // patch**2, t, h * patch, w * patch)


def is_wan21_vae(state_dict: dict[str, Tensor]) -> bool:
    return "decoder.middle.0.residual.0.gamma" in state_dict and (
        "decoder.upsamples.0.upsamples.0.residual.2.weight" not in state_dict
    )


def vae_config_from_state_dict(state_dict: dict[str, Tensor]) -> WanVAEConfig:
    """The decoder's widths from its tensors (Wan 2.1 or Wan 2.2); another VAE is refused with what to load."""
    if "decoder.middle.0.residual.0.gamma" not in state_dict or "conv2.weight" not in state_dict:
        raise WanDistriFusionError(
            "VAE: not a Wan VAE (no decoder.middle.0.residual.0.gamma): load wan_2.1_vae.safetensors (or "
            "wan2.2_vae.safetensors for the Wan 2.2 TI2V 5B) in Load VAE."
        )
    head = state_dict["decoder.head.2.weight"]
    z_dim = state_dict["conv2.weight"].shape[0]
    version = "2.1" if is_wan21_vae(state_dict) else "2.2"
    return WanVAEConfig(dim=head.shape[1], z_dim=z_dim, version=version)


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
