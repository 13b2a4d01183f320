"""The Wan 2.1/2.2 diffusion transformer (T2V, I2V, TI2V 5B), with original Wan parameter names.

Self-attention goes through ``WanSelfAttention.attention_fn`` so a parallel runtime can swap it per
block; the model itself never knows it runs on several devices. With ``token_index`` only a subset of
the token grid goes through the blocks, with rotary positions and per-token timesteps taken from the
*global* grid.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import AttentionFn, resolve_attention, sdpa_attention, sdpa_backend_order
from .block_compile import BlockCompiler, HandInputs
from .fp8 import concat_linears

logger = logging.getLogger(__name__)

WAN22_LATENT_CHANNELS = 48
"""Latent channels of the Wan 2.2 VAE (TI2V 5B); Wan 2.1 and Wan 2.2 A14B use 16."""
VERSIONS = ("2.1", "2.2")
EXPERTS = ("", "high_noise", "low_noise")


@dataclass(frozen=True)
class WanConfig:
    """Shape of a Wan DiT; ``checkpoint_config.py`` derives it from the checkpoint's tensors."""

    dim: int = 1536
    ffn_dim: int = 8960
    num_heads: int = 12
    num_layers: int = 30
    in_dim: int = 16
    out_dim: int = 16
    text_dim: int = 4096
    freq_dim: int = 256
    patch_size: tuple[int, int, int] = (1, 2, 2)
    model_type: str = "t2v"
    eps: float = 1e-6
    image_dim: int = 1280
    image_positions: int = 0
    """Wan 2.1 FLF2V: learned positions of the first and last frame's CLIP tokens (2 x 257); 0 for other models."""
    version: str = "2.1"
    """Wan release the weights come from: the loader reads "2.2" from the shapes (48-channel TI2V 5B, image
    channels without ``img_emb``: I2V A14B) or, for the A14B T2V experts (Wan 2.1 14B shapes), from the file."""
    expert: str = ""
    """Wan 2.2 A14B expert the file says it is ("high_noise" / "low_noise"), or "" when it does not say."""

    def __post_init__(self) -> None:
        if self.version not in VERSIONS:
            raise ValueError(f"WanConfig.version must be one of {VERSIONS}, not {self.version!r}")
        if self.expert not in EXPERTS:
            raise ValueError(f"WanConfig.expert must be one of {EXPERTS}, not {self.expert!r}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def concat_channels(self) -> int:
        """Channels of ``y`` concatenated to the latents (I2V: 4 mask + the image latents; 0 for T2V and TI2V)."""
        return self.in_dim - self.out_dim

    @property
    def clip_image(self) -> bool:
        """Whether the model reads CLIP vision features (``img_emb``: Wan 2.1 I2V; not Wan 2.2 I2V A14B)."""
        return self.model_type == "i2v"

    @property
    def per_frame_timesteps(self) -> bool:
        """TI2V 5B: ComfyUI gives each latent frame its own timestep (a kept image frame gets 0)."""
        return self.out_dim == WAN22_LATENT_CHANNELS

    @property
    def variant(self) -> str:
        """What a user calls this model, for messages and the Status node."""
        if self.per_frame_timesteps:
            return "Wan 2.2 TI2V 5B"
        if self.clip_image:
            return f"Wan {self.version} " + ("FLF2V" if self.image_positions else "I2V")
        task = "I2V" if self.concat_channels else "T2V"
        name = f"Wan {self.version} {task}"
        if self.version == "2.2":
            name += " A14B" + (f" ({self.expert.replace('_', '-')} expert)" if self.expert else "")
        return name


def sinusoidal_embedding(dim: int, position: Tensor) -> Tensor:
    half = dim // 2
    position = position.to(torch.float64)
    freqs = torch.pow(10000, -torch.arange(half, dtype=torch.float64, device=position.device) / half)
    angles = torch.outer(position, freqs)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1).float()


def rope_frequencies(head_dim: int, grid: tuple[int, int, int], device: torch.device) -> tuple[Tensor, Tensor]:
    """cos/sin ``[F*H*W, head_dim // 2]`` of Wan's 3D RoPE for every token of the grid, in f,h,w order."""
    half = head_dim // 2
    sizes = (half - 2 * (half // 3), half // 3, half // 3)
    angles = []
    for axis, (length, size) in enumerate(zip(grid, sizes)):
        inv = 1.0 / torch.pow(10000.0, torch.arange(0, 2 * size, 2, dtype=torch.float64, device=device) / (2 * size))
        axis_angles = torch.outer(torch.arange(length, dtype=torch.float64, device=device), inv)
        shape = [1, 1, 1, size]
        shape[axis] = length
        angles.append(axis_angles.view(shape).expand(*grid, size))
    table = torch.cat(angles, dim=-1).reshape(-1, half)
    return torch.cos(table).float(), torch.sin(table).float()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate adjacent channel pairs of ``x`` ``[B, L, H, D]`` by per-token angles ``[L, D/2]`` (in fp32)."""
    # Traced by dynamo: inductor fuses this real form with the q/k norm into one kernel. Each channel reads itself
    # and its pair partner (``flip``) unconditionally: the same rotation written with ``stack`` made inductor read
    # both through masked loads, and took 0.72 ms instead of 0.47 ms per block (1.3B, batch 2, H200:
    # ``bench/rope_norm_kernel.py``). Not ``is_compiling()``: a compile running in another thread
    # (``block_compile``) sets that for this thread too.
    if torch.compiler.is_dynamo_compiling():
        x32 = x.float()
        partner = x32.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
        sign = torch.tensor([-1.0, 1.0], device=x.device).repeat(cos.shape[-1])
        cos_wide = cos.repeat_interleave(2, dim=-1)[None, :, None, :]
        sin_wide = (sin.repeat_interleave(2, dim=-1) * sign)[None, :, None, :]
        return (x32 * cos_wide + partner * sin_wide).type_as(x)
    # eager: one complex multiply instead of six broadcast kernels and a stack
    pairs = x.float().unflatten(-1, (-1, 2)).contiguous()
    rotated = torch.view_as_real(torch.view_as_complex(pairs) * torch.complex(cos, sin)[None, :, None, :])
    return rotated.flatten(-2).type_as(x)


class WanRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # One fused kernel on GPUs (statistics in fp32), like Wan's ``x.float()`` normalisation rounded back.
        return F.rms_norm(x, x.shape[-1:], eps=self.eps) * self.weight.type_as(x)


class WanLayerNorm(nn.LayerNorm):
    def __init__(self, dim: int, eps: float = 1e-6, elementwise_affine: bool = False):
        super().__init__(dim, eps=eps, elementwise_affine=elementwise_affine)

    def forward(self, x: Tensor) -> Tensor:
        # Statistics in fp32 either way: PyTorch's half-precision kernel accumulates in fp32 and rounds once,
        # as Wan's ``x.float()`` form does, without two extra passes over the activations.
        dtype = x.dtype if x.dtype in (torch.bfloat16, torch.float16) else torch.float32
        weight = None if self.weight is None else self.weight.to(dtype)
        bias = None if self.bias is None else self.bias.to(dtype)
        return F.layer_norm(x.to(dtype), self.normalized_shape, weight, bias, self.eps).type_as(x)


class WanSelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, eps: float = 1e-6):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = WanRMSNorm(dim, eps=eps)
        self.norm_k = WanRMSNorm(dim, eps=eps)
        self.attention_fn: AttentionFn = sdpa_attention
        self.qkv: nn.Linear | None = None

    def fuse_projections(self) -> None:
        """Replace ``q``/``k``/``v`` by one ``qkv`` Linear (one GEMM reading ``x`` once instead of three)."""
        self.qkv = concat_linears([self.q, self.k, self.v])
        del self.q, self.k, self.v

    def project(
        self, x: Tensor, rope: tuple[Tensor, Tensor], layout: str | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """q, k (normed, rotated) and v, ``[B, L, H, D]``, in memory as ``layout`` asks (``attention.INPUT_LAYOUTS``;
        None: as produced, v a strided view of the fused qkv output)."""
        heads = (self.num_heads, self.head_dim)
        if self.qkv is not None:
            q, k, v = self.qkv(x).chunk(3, dim=-1)
        else:
            q, k, v = self.q(x), self.k(x), self.v(x)
        q = apply_rope(self.norm_q(q).unflatten(-1, heads), *rope)
        k = apply_rope(self.norm_k(k).unflatten(-1, heads), *rope)
        v = v.unflatten(-1, heads)
        if layout == "tokens_first":
            v = v.contiguous()
        elif layout == "heads_first":  # [B, H, L, D] in memory, still indexed [B, L, H, D]
            q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
        return q, k, v

    def input_layout(self) -> str | None:
        """The memory layout the attention kernel wants its inputs in (its ``input_layout``, e.g. FlashAttention-4's
        dense ``tokens_first``). Made where q/k/v are produced, inside the compiled block (fused with the q/k norm
        kernels), instead of a copy in eager; read outside the compiled code, so swapping kernels never recompiles."""
        return getattr(self.attention_fn, "input_layout", None)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor]) -> Tensor:
        return self.o(self.attention_fn(*self.project(x, rope, self.input_layout())).flatten(2))


class WanCrossAttention(nn.Module):
    """Cross-attention to the text tokens, plus (Wan 2.1 I2V) a second attention to the CLIP image tokens."""

    def __init__(self, dim: int, num_heads: int, eps: float = 1e-6, image: bool = False):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = WanRMSNorm(dim, eps=eps)
        self.norm_k = WanRMSNorm(dim, eps=eps)
        self.image = image
        if image:
            self.k_img = nn.Linear(dim, dim)
            self.v_img = nn.Linear(dim, dim)
            self.norm_k_img = WanRMSNorm(dim, eps=eps)
        self.kv: nn.Linear | None = None

    def fuse_projections(self) -> None:
        """Replace the text ``k``/``v`` by one ``kv`` Linear."""
        self.kv = concat_linears([self.k, self.v])
        del self.k, self.v

    def forward(self, x: Tensor, context: Tensor, image_context: Tensor | None = None) -> Tensor:
        heads = (self.num_heads, self.head_dim)
        q = self.norm_q(self.q(x)).unflatten(-1, heads)
        if self.kv is not None:
            k, v = self.kv(context).chunk(2, dim=-1)
        else:
            k, v = self.k(context), self.v(context)
        k = self.norm_k(k).unflatten(-1, heads)
        v = v.unflatten(-1, heads)
        out = sdpa_attention(q, k, v)
        if self.image:
            image_context = context if image_context is None else image_context  # no CLIP tokens: as ComfyUI
            k_img = self.norm_k_img(self.k_img(image_context)).unflatten(-1, heads)
            v_img = self.v_img(image_context).unflatten(-1, heads)
            out = out + sdpa_attention(q, k_img, v_img)
        return self.o(out.flatten(2))


def per_token(values: Tensor, timestep_of_token: Tensor | None) -> Tensor:
    """``[B, T, dim]`` per-timestep values as ``[B, tokens, dim]`` (T == 1 stays as is and broadcasts)."""
    return values if timestep_of_token is None else values[:, timestep_of_token]


def timestep_of_tokens(num_timesteps: int, num_tokens: int, token_index: Tensor | None, device) -> Tensor | None:
    """Which of ``num_timesteps`` timesteps each computed token takes, as ComfyUI's Wan spreads them.

    T timesteps over L tokens (in f,h,w order) cover ``ceil(L / T)`` consecutive tokens each: one per token,
    one per latent frame (TI2V's per-frame timesteps), or one for all (None).
    """
    if num_timesteps == 1:
        return None
    if num_timesteps > num_tokens:
        raise ValueError(f"{num_timesteps} timesteps per item for {num_tokens} tokens: at most one per token")
    tokens = torch.arange(num_tokens, device=device) if token_index is None else token_index.to(device)
    return tokens // -(-num_tokens // num_timesteps)


class WanBlock(nn.Module):
    def __init__(self, config: WanConfig):
        super().__init__()
        dim = config.dim
        self.norm1 = WanLayerNorm(dim, config.eps)
        self.self_attn = WanSelfAttention(dim, config.num_heads, config.eps)
        self.norm3 = WanLayerNorm(dim, config.eps, elementwise_affine=True)
        self.cross_attn = WanCrossAttention(dim, config.num_heads, config.eps, image=config.model_type == "i2v")
        self.norm2 = WanLayerNorm(dim, config.eps)
        self.ffn = nn.Sequential(
            nn.Linear(dim, config.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(config.ffn_dim, dim)
        )
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)
        self.gelu_epilogue = False
        """Run the FFN's first GEMM with its bias and tanh-GELU in cuBLASLt's epilogue on CUDA (``WanModel.set_fusions``)."""
        self.compiled_parts: tuple[Callable, Callable] | None = None
        """``before_attention`` and ``after_attention`` compiled (``WanModel.compile_blocks``)."""
        self.hand_inputs_to: HandInputs | None = None
        """Set for one call by ``BlockCompiler``: gets this call's inputs of both halves, to compile on."""

    def feed_forward(self, x: Tensor) -> Tensor:
        """``ffn(x)``; with ``gelu_epilogue`` on a CUDA bf16/fp16 Linear, the hidden activations are written once
        (GELU applied to the fp32 accumulator) instead of written, read, activated and written again."""
        up, _, down = self.ffn
        fusable = type(up) is nn.Linear and up.bias is not None and up.weight.dtype == x.dtype
        if self.gelu_epilogue and x.is_cuda and fusable:
            hidden = torch._addmm_activation(up.bias, x.flatten(0, -2), up.weight.t(), use_gelu=True)
            return down(hidden.unflatten(0, x.shape[:-1]))
        return self.ffn(x)

    def forward(
        self,
        x: Tensor,
        time_modulation: Tensor,
        context: Tensor,
        rope: tuple[Tensor, Tensor],
        image_context: Tensor | None = None,
        timestep_of_token: Tensor | None = None,
        compiled: bool = False,
    ) -> Tensor:
        """``compiled``: run the ``compiled_parts`` (``WanModel.compile_blocks``) instead of the eager halves."""
        before, after = self.compiled_parts if compiled else (self.before_attention, self.after_attention)
        before_args = (x, time_modulation, rope, timestep_of_token, self.self_attn.input_layout())
        q, k, v, modulation = before(*before_args)
        attention = self.self_attn.attention_fn(q, k, v)
        del q, k, v  # else they (and the fused qkv output behind v) live through the FFN, the block's peak
        after_args = (x, attention, modulation, context, image_context, timestep_of_token)
        if self.hand_inputs_to is not None:
            self.hand_inputs_to(before_args, after_args)
        return after(*after_args)

    # The block is split around self-attention so ``compile_blocks`` can fuse everything but the
    # (possibly communicating) attention function. ``time_modulation`` is ``[B, T, 6, dim]`` for T
    # timesteps per item; ``timestep_of_token`` (None when T is 1) picks each computed token's one.
    def before_attention(
        self,
        x: Tensor,
        time_modulation: Tensor,
        rope: tuple[Tensor, Tensor],
        timestep_of_token: Tensor | None = None,
        layout: str | None = None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        modulation = (self.modulation.float() + time_modulation).to(x.dtype)
        shift_msa, scale_msa = (per_token(modulation[:, :, i], timestep_of_token) for i in range(2))
        q, k, v = self.self_attn.project(torch.addcmul(shift_msa, self.norm1(x), 1 + scale_msa), rope, layout)
        return q, k, v, modulation

    def after_attention(
        self,
        x: Tensor,
        attention: Tensor,
        modulation: Tensor,
        context: Tensor,
        image_context: Tensor | None = None,
        timestep_of_token: Tensor | None = None,
    ) -> Tensor:
        gate_msa, shift_ffn, scale_ffn, gate_ffn = (
            per_token(modulation[:, :, i], timestep_of_token) for i in range(2, 6)
        )
        x = torch.addcmul(x, self.self_attn.o(attention.flatten(2)), gate_msa)
        x = x + self.cross_attn(self.norm3(x), context, image_context)
        return torch.addcmul(x, self.feed_forward(torch.addcmul(shift_ffn, self.norm2(x), 1 + scale_ffn)), gate_ffn)


class WanHead(nn.Module):
    def __init__(self, config: WanConfig):
        super().__init__()
        self.norm = WanLayerNorm(config.dim, config.eps)
        self.head = nn.Linear(config.dim, config.out_dim * math.prod(config.patch_size))
        self.modulation = nn.Parameter(torch.randn(1, 2, config.dim) / config.dim**0.5)

    def forward(self, x: Tensor, time_embedding: Tensor, timestep_of_token: Tensor | None = None) -> Tensor:
        """``time_embedding`` ``[B, T, dim]``: one row per timestep, picked per token like the blocks' modulation."""
        modulation = (self.modulation.float() + time_embedding.float()[:, :, None]).to(x.dtype)
        shift, scale = (per_token(modulation[:, :, i], timestep_of_token) for i in range(2))
        return self.head(torch.addcmul(shift, self.norm(x), 1 + scale))


class WanImageEmbedding(nn.Module):
    """CLIP vision tokens to the model width; FLF2V adds learned positions to the first and last frame's tokens."""

    def __init__(self, image_dim: int, dim: int, positions: int = 0):
        super().__init__()
        self.proj = nn.Sequential(
            nn.LayerNorm(image_dim),
            nn.Linear(image_dim, image_dim),
            nn.GELU(),
            nn.Linear(image_dim, dim),
            nn.LayerNorm(dim),
        )
        if positions:
            self.emb_pos = nn.Parameter(torch.zeros(1, positions, image_dim))

    def forward(self, clip_features: Tensor) -> Tensor:
        if hasattr(self, "emb_pos"):  # as many tokens as both: one image gets the first image's positions
            positions = self.emb_pos.shape[1]
            clip_features = clip_features[:, :positions] + self.emb_pos[:, : clip_features.shape[1]].to(clip_features)
        return self.proj(clip_features)


class WanModel(nn.Module):
    """Wan DiT: ``model(x [B,C,F,H,W], t [B] | [B,T], context [B,L,text_dim]) -> flow prediction like x``.

    ``t`` ``[B, T]`` gives T timesteps per item spread over the tokens in order (``timestep_of_tokens``): T = latent
    frames is Wan 2.2 TI2V's per-frame form. I2V: ``y`` ``[B, in_dim - out_dim, F, H, W]`` (mask channels, then
    image latents) is concatenated to ``x``; ``clip_fea`` ``[B, N, image_dim]`` are CLIP vision tokens (Wan 2.1 I2V).
    """

    def __init__(self, config: WanConfig):
        super().__init__()
        self.config = config
        dim = config.dim
        self.patch_embedding = nn.Conv3d(config.in_dim, dim, kernel_size=config.patch_size, stride=config.patch_size)
        self.text_embedding = nn.Sequential(
            nn.Linear(config.text_dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim)
        )
        self.time_embedding = nn.Sequential(nn.Linear(config.freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, dim * 6))
        self.blocks = nn.ModuleList(WanBlock(config) for _ in range(config.num_layers))
        self.head = WanHead(config)
        if config.model_type == "i2v":
            self.img_emb = WanImageEmbedding(config.image_dim, dim, config.image_positions)
        self.compute_dtype = torch.float32
        """dtype activations run in; ``loading.py`` sets it (weights may be stored narrower, e.g. fp8)."""
        self.block_streamer = None
        """``offload.BlockStreamer`` when the blocks' weights live in host memory and are streamed in per forward."""
        self.block_compiler: BlockCompiler | None = None
        """Set by ``compile_blocks``: which input sizes run compiled."""

    def set_attention_backend(self, backend: str) -> None:
        """Run self-attention on ``backend`` (see ``attention.ATTENTION_BACKENDS``)."""
        kernel = resolve_attention(backend, self.patch_embedding.weight.device)
        for block in self.blocks:
            block.self_attn.attention_fn = kernel

    def fuse_projections(self) -> None:
        """Fuse each block's self-attention q/k/v and cross-attention k/v Linears (fewer, larger GEMMs).

        For inference after loading: the state dict then has ``qkv``/``kv`` keys instead of the original names.
        """
        for block in self.blocks:
            if block.self_attn.qkv is None:
                block.self_attn.fuse_projections()
                block.cross_attn.fuse_projections()

    def set_fusions(self, gelu_epilogue: bool = False) -> None:
        """Opt-in kernel fusions that change rounding at bf16 round-off (off by default; ``bench/kernel_breakdown.py``
        measures them): ``gelu_epilogue`` = the FFN's bias + tanh-GELU in the first GEMM's cuBLASLt epilogue."""
        for block in self.blocks:
            block.gelu_epilogue = gelu_epilogue

    def compile_blocks(
        self, backend: str | Callable = "inductor", options: dict | None = None, in_background: bool = False
    ) -> None:
        """``torch.compile`` each block's code before and after self-attention (attention stays eager).

        All blocks share two compiled graphs. A new input size compiles at its first call; ``in_background``, in a
        thread while that call and the next ones run eager (``block_compile.BlockCompiler``: not with blocks streamed
        from host memory or sharded). ``options`` go to inductor (e.g. ``{"coordinate_descent_tuning": True}``).
        Compiles on any device; whether a rank should is ``block_compile.compile_available``. Inductor's on-disk
        caches stay on (``TORCHINDUCTOR_CACHE_DIR``, default ``<tmp>/torchinductor_<user>``), so a later process
        compiling the same shapes mostly reads them.
        """
        self.block_compiler = BlockCompiler(self.blocks, backend, options, in_background)

    def blocks_on_device(self) -> contextlib.AbstractContextManager[Iterable[WanBlock]]:
        """The blocks in order, each with its weights on the compute device while it runs (``offload.py``)."""
        if self.block_streamer is None:
            return contextlib.nullcontext(self.blocks)
        return self.block_streamer.streaming(self.blocks)

    def token_grid(self, x: Tensor) -> tuple[int, int, int]:
        """Token grid (frames, rows, cols) that latents of this shape patchify into."""
        return tuple(size // patch for size, patch in zip(x.shape[2:], self.config.patch_size))

    def unpatchify(self, tokens: Tensor, grid: tuple[int, int, int]) -> Tensor:
        """``[B, F*H*W, C*p]`` head output back to latents ``[B, C, F*pf, H*ph, W*pw]``."""
        pf, ph, pw = self.config.patch_size
        frames, rows, cols = grid
        x = tokens.reshape(tokens.shape[0], frames, rows, cols, pf, ph, pw, self.config.out_dim)
        x = torch.einsum("bfhwpqrc->bcfphqwr", x)
        return x.reshape(tokens.shape[0], self.config.out_dim, frames * pf, rows * ph, cols * pw)

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        context: Tensor,
        clip_fea: Tensor | None = None,
        y: Tensor | None = None,
        token_index: Tensor | None = None,
    ) -> Tensor:
        """Flow prediction; with ``token_index``, only those tokens' head output ``[B, n, C*p]``.

        Without ``clip_fea`` a Wan 2.1 I2V model's image attention reads the text tokens, as ComfyUI's does.
        """
        if y is not None:
            x = torch.cat([x, y.to(x.dtype)], dim=1)
        if x.shape[1] != self.config.in_dim:
            raise ValueError(
                f"{self.config.variant} takes {self.config.in_dim} input channels (latents"
                + (f" + {self.config.concat_channels} of y" if self.config.concat_channels else "")
                + f"), got {x.shape[1]}"
            )
        compute_dtype = self.compute_dtype
        grid = self.token_grid(x)
        tokens = self.patch_embedding(x.to(compute_dtype)).flatten(2).transpose(1, 2)
        cos, sin = rope_frequencies(self.config.head_dim, grid, x.device)
        if token_index is not None:  # the gather makes a rank's tokens row-major
            tokens, cos, sin = tokens[:, token_index], cos[token_index], sin[token_index]
        else:
            # Row-major tokens: the transposed conv output would otherwise stay the residual stream's layout through
            # every block (elementwise ops keep their first input's strides), and each norm would read a token's
            # features strided by the sequence length.
            tokens = tokens.contiguous()

        t = t.reshape(t.shape[0] if t.dim() else 1, -1)  # [B, T]
        timestep_of_token = timestep_of_tokens(t.shape[1], math.prod(grid), token_index, x.device)
        time_embedding = self.time_embedding(
            sinusoidal_embedding(self.config.freq_dim, t.flatten()).to(compute_dtype)
        ).float()
        time_modulation = self.time_projection(time_embedding.to(compute_dtype)).float()
        time_embedding = time_embedding.unflatten(0, t.shape)  # [B, T, dim]
        time_modulation = time_modulation.unflatten(0, t.shape).unflatten(2, (6, self.config.dim))
        context = self.text_embedding(context.to(compute_dtype))
        image_context = None
        if self.config.clip_image and clip_fea is not None:
            image_context = self.img_emb(clip_fea.to(compute_dtype))

        compiler = self.block_compiler
        run_compiled = compiler.calls(tokens, context, self.blocks[0]) if compiler else contextlib.nullcontext(False)
        with sdpa_backend_order(x.device), self.blocks_on_device() as blocks, run_compiled as compiled:
            pace = compiler.pacer(x.device) if compiler else None
            for block in blocks:
                tokens = block(tokens, time_modulation, context, (cos, sin), image_context, timestep_of_token, compiled)
                if pace:
                    pace()
        out = self.head(tokens, time_embedding, timestep_of_token)
        if token_index is not None:
            return out
        return self.unpatchify(out, grid)
