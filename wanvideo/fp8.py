"""fp8 weight storage for the transformer blocks' Linear layers.

Weights are stored as fp8 with a scale (one per tensor as loaded, one per output row once q/k/v are fused).
On GPUs with fp8 tensor cores (compute capability 8.9+: Ada, Hopper, Blackwell) ``fp8_e4m3fn`` weights
multiply in fp8 through ``torch._scaled_mm`` with each token's activations scaled into fp8 on the fly;
everywhere else the weight is upcast to the compute dtype per call.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

FP8_MATMUL_DTYPES = (torch.bfloat16, torch.float16)
"""Compute dtypes the scaled fp8 matmul can write its output in."""


def quantize_fp8(value: Tensor, storage_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Per-tensor scaled fp8: ``value ≈ fp8 * scale`` with the largest magnitude mapped to the format's max."""
    value = value.float()
    fp8_max = torch.finfo(storage_dtype).max
    amax = value.abs().amax()
    scale = torch.where(amax > 0, amax / fp8_max, torch.ones_like(amax))
    return (value / scale).clamp(-fp8_max, fp8_max).to(storage_dtype), scale


def has_fp8_matmul(device: torch.device | str) -> bool:
    """Whether ``device`` is a GPU with fp8 tensor cores on which this PyTorch runs ``scaled_fp8_linear``."""
    device = torch.device(device)
    if device.type != "cuda" or not hasattr(torch, "_scaled_mm"):
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9) and rowwise_scaled_mm_works(str(device))


@functools.cache
def rowwise_scaled_mm_works(device: str) -> bool:
    """One tiny row-wise scaled fp8 matmul on ``device``: some GPU / PyTorch pairs with fp8 tensor cores
    support only per-tensor scales, and they then keep the upcast path instead of failing mid-job."""
    try:
        a = torch.ones(16, 16, device=device).to(torch.float8_e4m3fn)
        ones = torch.ones(16, 1, device=device)
        torch._scaled_mm(a, a.t(), scale_a=ones, scale_b=ones.t().contiguous(), out_dtype=torch.bfloat16)
    except (RuntimeError, ValueError, NotImplementedError):
        return False
    return True


def scaled_fp8_linear(x: Tensor, weight: Tensor, weight_scale: Tensor, bias: Tensor | None) -> Tensor:
    """``x @ (weight * weight_scale).T + bias`` computed in fp8: ``weight`` is ``float8_e4m3fn [out, in]``,
    ``weight_scale`` a scalar or one value per output row; each row of ``x`` is scaled into e4m3 by its
    own absolute maximum. Output in ``x.dtype`` (bf16 or fp16)."""
    out_features = weight.shape[0]
    rows = x.reshape(-1, x.shape[-1])
    fp8_max = torch.finfo(torch.float8_e4m3fn).max
    row_scale = (rows.abs().amax(dim=-1, keepdim=True).float() / fp8_max).clamp(min=1e-12)
    rows_fp8 = (rows.float() / row_scale).clamp(-fp8_max, fp8_max).to(torch.float8_e4m3fn)
    column_scale = weight_scale.float().reshape(1, -1).expand(1, out_features).contiguous()
    out = torch._scaled_mm(
        rows_fp8,
        weight.t(),
        scale_a=row_scale,
        scale_b=column_scale,
        bias=None if bias is None else bias.to(x.dtype),
        out_dtype=x.dtype,
    )
    return out.reshape(*x.shape[:-1], out_features)


class Fp8Linear(nn.Linear):
    """``nn.Linear`` whose weight is stored in fp8 with a ``scale_weight`` (scalar, or one per output row).

    ``use_fp8_matmul`` (set by ``enable_fp8_matmul``) runs ``scaled_fp8_linear``; otherwise the weight is
    upcast to the input dtype per call.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.register_buffer("scale_weight", torch.ones((), device=device))
        self.use_fp8_matmul = False

    def forward(self, x: Tensor) -> Tensor:
        if self.use_fp8_matmul and x.dtype in FP8_MATMUL_DTYPES:
            return scaled_fp8_linear(x, self.weight, self.scale_weight, self.bias)
        weight = self.weight.to(x.dtype) * self.scale_weight.to(x.dtype).reshape(-1, 1)
        return F.linear(x, weight, None if self.bias is None else self.bias.to(x.dtype))


def enable_fp8_matmul(model: nn.Module, device: torch.device | str | None = None) -> int:
    """Let every ``float8_e4m3fn`` ``Fp8Linear`` of ``model`` multiply in fp8 when the device it runs on (``device``,
    default where its weight is) has fp8 tensor cores (capability 8.9+). Returns how many layers will; 0 on CPU,
    older GPUs or ``fp8_e5m2`` weights."""
    count = 0
    for module in model.modules():
        if isinstance(module, Fp8Linear):
            where = module.weight.device if device is None else device
            module.use_fp8_matmul = module.weight.dtype == torch.float8_e4m3fn and has_fp8_matmul(where)
            count += module.use_fp8_matmul
    return count


@torch.no_grad()
def concat_linears(linears: Sequence[nn.Linear]) -> nn.Linear:
    """One Linear computing ``torch.cat([linear(x) for linear in linears], -1)`` (same input size, all
    plain or all ``Fp8Linear``); fp8 weights are concatenated as stored, each keeping its scale per row."""
    first = linears[0]
    in_features = first.in_features
    out_features = sum(linear.out_features for linear in linears)
    has_bias = first.bias is not None
    if any(linear.in_features != in_features or (linear.bias is not None) != has_bias for linear in linears):
        raise ValueError("concat_linears needs layers with the same input size and all with or all without bias")
    if isinstance(first, Fp8Linear):
        fused = Fp8Linear(in_features, out_features, has_bias, device="meta")
        fused.scale_weight = torch.cat(
            [linear.scale_weight.float().reshape(-1).expand(linear.out_features) for linear in linears]
        )
        fused.use_fp8_matmul = all(linear.use_fp8_matmul for linear in linears)
    else:
        fused = nn.Linear(in_features, out_features, has_bias, device="meta")
    fused.weight = nn.Parameter(torch.cat([linear.weight for linear in linears]), requires_grad=False)
    if has_bias:
        fused.bias = nn.Parameter(torch.cat([linear.bias for linear in linears]), requires_grad=False)
    return fused
