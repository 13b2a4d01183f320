"""The Wan 2.1 diffusion transformer (T2V and I2V), with original Wan parameter names.

Self-attention goes through ``WanSelfAttention.attention_fn`` so a parallel runtime can swap it per
block; the model itself never knows it runs on several devices. With ``token_index`` only a subset of
the token grid goes through the blocks, with rotary positions taken from the *global* grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import AttentionFn, resolve_attention, sdpa_attention, sdpa_backend_order
from .fp8 import concat_linears

CLIP_TOKENS = 257


@dataclass(frozen=True)
class WanConfig:
    """Shape of a Wan DiT; ``loading.py`` derives it from the checkpoint's tensors."""

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

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads


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
    pairs = x.float().unflatten(-1, (-1, 2))
    if torch.compiler.is_compiling():  # inductor fuses the real form into one kernel
        real, imag = pairs[..., 0], pairs[..., 1]
        cos, sin = cos[None, :, None, :], sin[None, :, None, :]
        rotated = torch.stack([real * cos - imag * sin, real * sin + imag * cos], dim=-1)
    else:  # eager: one complex multiply instead of six broadcast kernels and a stack
        rotation = torch.complex(cos, sin)[None, :, None, :]
        rotated = torch.view_as_real(torch.view_as_complex(pairs.contiguous()) * rotation)
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

    def project(self, x: Tensor, rope: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """q, k (normed, rotated) and v, ``[B, L, H, D]``."""
        heads = (self.num_heads, self.head_dim)
        if self.qkv is not None:
            q, k, v = self.qkv(x).chunk(3, dim=-1)
        else:
            q, k, v = self.q(x), self.k(x), self.v(x)
        q = apply_rope(self.norm_q(q).unflatten(-1, heads), *rope)
        k = apply_rope(self.norm_k(k).unflatten(-1, heads), *rope)
        return q, k, v.unflatten(-1, heads)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor]) -> Tensor:
        return self.o(self.attention_fn(*self.project(x, rope)).flatten(2))


class WanCrossAttention(nn.Module):
    """Cross-attention to the text tokens, plus (I2V) to the CLIP image tokens that precede them."""

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

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        heads = (self.num_heads, self.head_dim)
        q = self.norm_q(self.q(x)).unflatten(-1, heads)
        if self.image:
            image_context, context = context[:, :CLIP_TOKENS], context[:, CLIP_TOKENS:]
        if self.kv is not None:
            k, v = self.kv(context).chunk(2, dim=-1)
        else:
            k, v = self.k(context), self.v(context)
        k = self.norm_k(k).unflatten(-1, heads)
        v = v.unflatten(-1, heads)
        out = sdpa_attention(q, k, v)
        if self.image:
            k_img = self.norm_k_img(self.k_img(image_context)).unflatten(-1, heads)
            v_img = self.v_img(image_context).unflatten(-1, heads)
            out = out + sdpa_attention(q, k_img, v_img)
        return self.o(out.flatten(2))


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

    def forward(self, x: Tensor, time_modulation: Tensor, context: Tensor, rope: tuple[Tensor, Tensor]) -> Tensor:
        q, k, v, modulation = self.before_attention(x, time_modulation, rope)
        return self.after_attention(x, self.self_attn.attention_fn(q, k, v), modulation, context)

    # The block is split around self-attention so ``compile_blocks`` can fuse everything but the
    # (possibly communicating) attention function.
    def before_attention(
        self, x: Tensor, time_modulation: Tensor, rope: tuple[Tensor, Tensor]
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        modulation = (self.modulation.float() + time_modulation).to(x.dtype)
        shift_msa, scale_msa = modulation[:, 0, None], modulation[:, 1, None]
        q, k, v = self.self_attn.project(torch.addcmul(shift_msa, self.norm1(x), 1 + scale_msa), rope)
        return q, k, v, modulation

    def after_attention(self, x: Tensor, attention: Tensor, modulation: Tensor, context: Tensor) -> Tensor:
        gate_msa, shift_ffn, scale_ffn, gate_ffn = (modulation[:, i, None] for i in range(2, 6))
        x = torch.addcmul(x, self.self_attn.o(attention.flatten(2)), gate_msa)
        x = x + self.cross_attn(self.norm3(x), context)
        return torch.addcmul(x, self.ffn(torch.addcmul(shift_ffn, self.norm2(x), 1 + scale_ffn)), gate_ffn)


class WanHead(nn.Module):
    def __init__(self, config: WanConfig):
        super().__init__()
        self.norm = WanLayerNorm(config.dim, config.eps)
        self.head = nn.Linear(config.dim, config.out_dim * math.prod(config.patch_size))
        self.modulation = nn.Parameter(torch.randn(1, 2, config.dim) / config.dim**0.5)

    def forward(self, x: Tensor, time_embedding: Tensor) -> Tensor:
        shift, scale = (self.modulation.float() + time_embedding.float()[:, None]).to(x.dtype).unbind(1)
        return self.head(torch.addcmul(shift[:, None], self.norm(x), 1 + scale[:, None]))


class WanImageEmbedding(nn.Module):
    def __init__(self, image_dim: int, dim: int):
        super().__init__()
        self.proj = nn.Sequential(
            nn.LayerNorm(image_dim),
            nn.Linear(image_dim, image_dim),
            nn.GELU(),
            nn.Linear(image_dim, dim),
            nn.LayerNorm(dim),
        )

    def forward(self, clip_features: Tensor) -> Tensor:
        return self.proj(clip_features)


class WanModel(nn.Module):
    """Wan 2.1 DiT: ``model(x [B,C,F,H,W], t [B], context [B,L,text_dim]) -> flow prediction like x``."""

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
            self.img_emb = WanImageEmbedding(config.image_dim, dim)
        self.compute_dtype = torch.float32
        """dtype activations run in; ``loading.py`` sets it (weights may be stored narrower, e.g. fp8)."""

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

    def compile_blocks(self, backend: str = "inductor") -> None:
        """``torch.compile`` each block's code before and after self-attention (attention stays eager).

        All blocks share two compiled graphs, but every new latent size or rank slab adds entries to the
        same cache: the recompile limit is raised so a long-lived worker never silently falls back to eager.
        """
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit, 1024)
        for block in self.blocks:
            block.before_attention = torch.compile(block.before_attention, backend=backend)
            block.after_attention = torch.compile(block.after_attention, backend=backend)

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
        """Flow prediction; with ``token_index``, only those tokens' head output ``[B, n, C*p]``."""
        if y is not None:
            x = torch.cat([x, y], dim=1)
        compute_dtype = self.compute_dtype
        grid = self.token_grid(x)
        tokens = self.patch_embedding(x.to(compute_dtype)).flatten(2).transpose(1, 2)
        cos, sin = rope_frequencies(self.config.head_dim, grid, x.device)
        if token_index is not None:
            tokens, cos, sin = tokens[:, token_index], cos[token_index], sin[token_index]

        time_embedding = self.time_embedding(sinusoidal_embedding(self.config.freq_dim, t).to(compute_dtype)).float()
        time_modulation = (
            self.time_projection(time_embedding.to(compute_dtype)).float().unflatten(1, (6, self.config.dim))
        )
        context = self.text_embedding(context.to(compute_dtype))
        if self.config.model_type == "i2v":
            if clip_fea is None:
                clip_fea = torch.zeros(x.shape[0], CLIP_TOKENS, self.config.image_dim, device=x.device)
            context = torch.cat([self.img_emb(clip_fea.to(compute_dtype)), context], dim=1)

        with sdpa_backend_order(x.device):
            for block in self.blocks:
                tokens = block(tokens, time_modulation, context, (cos, sin))
        out = self.head(tokens, time_embedding)
        if token_index is not None:
            return out
        return self.unpatchify(out, grid)
