"""fp8 Linear layers (scaled fp8 matmul, upcast path) and fused projections, against plain-precision references."""

from __future__ import annotations

import pytest
import torch
from tiny_wan import random_model, relative_error, tiny_config
from wan_distrifusion.wanvideo import fp8
from wan_distrifusion.wanvideo.fp8 import Fp8Linear, concat_linears, enable_fp8_matmul, scaled_fp8_linear
from wan_distrifusion.wanvideo.loading import model_from_state_dict

E4M3 = torch.float8_e4m3fn


def _fp8_linear(weight: torch.Tensor, bias: torch.Tensor, storage=E4M3) -> Fp8Linear:
    linear = Fp8Linear(weight.shape[1], weight.shape[0])
    stored, scale = fp8.quantize_fp8(weight, storage)
    linear.weight = torch.nn.Parameter(stored, requires_grad=False)
    linear.scale_weight = scale
    linear.bias = torch.nn.Parameter(bias, requires_grad=False)
    return linear


def test_scaled_fp8_linear_equals_the_dequantized_product():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 40, 64, generator=generator).bfloat16()
    weight = torch.randn(48, 64, generator=generator)
    bias = torch.randn(48, generator=generator).bfloat16()
    stored, scale = fp8.quantize_fp8(weight, E4M3)
    out = scaled_fp8_linear(x, stored, scale, bias)
    assert out.shape == (3, 40, 48) and out.dtype == torch.bfloat16

    # Reference: each row of x rounded to e4m3 at its own scale, fp32 matmul with the dequantized weight.
    rows = x.float().reshape(-1, 64)
    row_scale = rows.abs().amax(-1, keepdim=True) / torch.finfo(E4M3).max
    rows_fp8 = (rows / row_scale).to(E4M3).float() * row_scale
    reference = (rows_fp8 @ (stored.float() * scale).t() + bias.float()).reshape(3, 40, 48)
    assert relative_error(out.float(), reference) < 5e-3  # bf16 output rounding only
    exact = x.float() @ weight.t() + bias.float()
    assert 1e-3 < relative_error(out.float(), exact) < 0.06  # really fp8, still close


def test_fp8_linear_uses_the_scaled_matmul_only_when_enabled():
    generator = torch.Generator().manual_seed(1)
    linear = _fp8_linear(torch.randn(32, 64, generator=generator), torch.randn(32, generator=generator))
    x = torch.randn(5, 64, generator=generator).bfloat16()
    upcast = linear(x)
    linear.use_fp8_matmul = True
    scaled = linear(x)
    assert not torch.equal(upcast, scaled)
    # Independent references: the weight dequantized in fp32, F.linear in fp32; the scaled path also rounds each
    # row of x to e4m3 at its own scale first.
    weight = linear.weight.float() * linear.scale_weight.float().reshape(-1, 1)
    reference = torch.nn.functional.linear(x.float(), weight, linear.bias.float())
    row_scale = x.float().abs().amax(-1, keepdim=True) / torch.finfo(E4M3).max
    x_fp8 = (x.float() / row_scale).to(E4M3).float() * row_scale
    scaled_reference = torch.nn.functional.linear(x_fp8, weight, linear.bias.float())
    assert relative_error(upcast.float(), reference) < 4e-3  # bf16 compute: measured 2.5e-3
    assert relative_error(scaled.float(), scaled_reference) < 3e-3  # bf16 output: measured 1.6e-3
    assert relative_error(scaled.float(), reference) > 1e-2  # x really went through e4m3: measured 2.5e-2
    assert relative_error(linear(x.float()), reference) < 1e-6  # fp32 input: upcast path in fp32 (measured 0)


def test_the_row_wise_probe_runs_where_scaled_matmul_exists():
    assert fp8.rowwise_scaled_mm_works("cpu")  # PyTorch's CPU kernel has row-wise scales
    assert not fp8.has_fp8_matmul("cpu")  # but only GPUs with fp8 tensor cores use it


def test_enable_fp8_matmul_only_for_e4m3_on_gpus_with_fp8_tensor_cores(monkeypatch):
    generator = torch.Generator().manual_seed(2)
    layers = torch.nn.ModuleList(
        [
            _fp8_linear(torch.randn(16, 16, generator=generator), torch.zeros(16)),
            _fp8_linear(torch.randn(16, 16, generator=generator), torch.zeros(16), storage=torch.float8_e5m2),
            torch.nn.Linear(16, 16),
        ]
    )
    assert enable_fp8_matmul(layers) == 0  # CPU
    monkeypatch.setattr(fp8, "has_fp8_matmul", lambda device: True)
    assert enable_fp8_matmul(layers) == 1
    assert layers[0].use_fp8_matmul and not layers[1].use_fp8_matmul


@pytest.mark.parametrize("kind", ["plain", "fp8"])
def test_concat_linears_equals_the_separate_layers(kind):
    generator = torch.Generator().manual_seed(3)
    weights = [torch.randn(24, 64, generator=generator) * scale for scale in (1.0, 5.0, 0.1)]
    biases = [torch.randn(24, generator=generator) for _ in weights]
    if kind == "fp8":
        layers = [_fp8_linear(w, b) for w, b in zip(weights, biases)]
    else:
        layers = [torch.nn.Linear(64, 24) for _ in weights]
        for layer, w, b in zip(layers, weights, biases):
            layer.weight.data, layer.bias.data = w, b
    fused = concat_linears(layers)
    assert type(fused) is type(layers[0]) and fused.weight.shape == (72, 64)
    x = torch.randn(7, 64, generator=generator)
    with torch.no_grad():
        expected = torch.cat([layer(x) for layer in layers], dim=-1)
        assert relative_error(fused(x), expected) < 1e-6
        if kind == "fp8":  # per-row scales in the scaled matmul too
            for layer in layers:
                layer.use_fp8_matmul = True
            fused = concat_linears(layers)
            assert fused.use_fp8_matmul
            expected = torch.cat([layer(x.bfloat16()) for layer in layers], dim=-1)
            assert torch.allclose(fused(x.bfloat16()).float(), expected.float(), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("model_type", ["t2v", "i2v"])
def test_fused_projections_give_the_same_output(model_type):
    config = tiny_config(model_type=model_type)
    model = random_model(config, seed=4)
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(1, config.in_dim, 3, 6, 8, generator=generator)
    inputs = dict(t=torch.tensor([500.0]), context=torch.randn(1, 6, config.text_dim, generator=generator))
    if model_type == "i2v":
        inputs["clip_fea"] = torch.randn(1, 257, config.image_dim, generator=generator)
    with torch.no_grad():
        reference = model(x, **inputs)
        model.fuse_projections()
        model.fuse_projections()  # idempotent
        fused = model(x, **inputs)
    keys = model.state_dict()
    assert "blocks.0.self_attn.qkv.weight" in keys and "blocks.0.cross_attn.kv.weight" in keys
    assert "blocks.0.self_attn.q.weight" not in keys and "blocks.0.cross_attn.q.weight" in keys
    assert relative_error(fused, reference) < 1e-6


def test_fused_fp8_model_with_scaled_matmul_stays_close_to_bf16():
    model = random_model(tiny_config(), seed=6)
    state = model.state_dict()
    bf16 = model_from_state_dict(state, dtype=torch.bfloat16, num_heads=4)
    quantized = model_from_state_dict(state, dtype=torch.bfloat16, quantization="fp8_e4m3fn", num_heads=4)
    for module in quantized.modules():
        if isinstance(module, Fp8Linear):
            module.use_fp8_matmul = True
    quantized.fuse_projections()
    assert quantized.blocks[0].self_attn.qkv.use_fp8_matmul
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(1, 4, 3, 6, 8, generator=generator)
    inputs = dict(t=torch.tensor([300.0]), context=torch.randn(1, 6, 32, generator=generator))
    with torch.no_grad():
        error = relative_error(quantized(x, **inputs).float(), bf16(x, **inputs).float())
    assert 5e-3 < error < 0.025  # really fp8, and close: measured 1.5e-2
