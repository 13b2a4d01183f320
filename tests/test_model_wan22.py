"""Wan 2.2 in the model: the TI2V 5B's per-frame / per-token timesteps, I2V inputs, and the released shapes.

ComfyUI gives the TI2V 5B one timestep per latent frame (``WAN22.process_timestep``: the kept image frame of
``Wan22ImageToVideoLatent`` gets 0) and spreads T timesteps over the tokens in order; ``token_index`` must pick
each computed token's own. (Agreement with ComfyUI's own model: ``tests/comfyui/test_wan_model_vs_comfyui.py``.)
"""

from __future__ import annotations

import pytest
import torch
from tiny_wan import random_model, relative_error, tiny_config
from wan_distrifusion.wanvideo.model import WanConfig, WanModel, timestep_of_tokens

TI2V = dict(in_dim=48, out_dim=48, version="2.2")
FP32_ROUNDOFF = 1e-6


def _inputs(config, frames=3, rows=6, cols=8, batch=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, config.out_dim, frames, rows, cols, generator=gen)
    context = torch.randn(batch, 7, config.text_dim, generator=gen)
    return x, context


@torch.no_grad()
def test_per_frame_timesteps_equal_the_same_timesteps_per_token():
    model = random_model(tiny_config(**TI2V), seed=1)
    x, context = _inputs(model.config)
    per_frame = torch.tensor([[0.0, 700.0, 700.0], [0.0, 300.0, 300.0]])
    tokens_per_frame = 3 * 4
    per_token = per_frame.repeat_interleave(tokens_per_frame, dim=1)
    out = model(x, per_frame, context)
    assert relative_error(model(x, per_token, context), out) < FP32_ROUNDOFF
    # timestep 0 on the kept frame changes every token's output (attention mixes the frames)
    scalar = model(x, torch.tensor([700.0, 300.0]), context)
    assert out.shape == scalar.shape == x.shape and relative_error(out, scalar) > 1e-3


@torch.no_grad()
def test_one_timestep_in_any_form_is_the_scalar_call():
    model = random_model(tiny_config(**TI2V), seed=2)
    x, context = _inputs(model.config)
    reference = model(x, torch.tensor([600.0, 250.0]), context)
    for t in (torch.tensor([[600.0], [250.0]]), torch.tensor([[600.0] * 3, [250.0] * 3])):
        assert relative_error(model(x, t, context), reference) < FP32_ROUNDOFF


@torch.no_grad()
def test_token_index_picks_each_tokens_own_timestep():
    model = random_model(tiny_config(**TI2V), seed=3)
    x, context = _inputs(model.config, frames=4)
    full = model(x, torch.tensor([[0.0, 800.0, 800.0, 800.0]] * 2), context)
    grid = model.token_grid(x)
    # the same call with all tokens through token_index, in a scrambled order, then put back
    order = torch.randperm(grid[0] * grid[1] * grid[2], generator=torch.Generator().manual_seed(0))
    head = model(x, torch.tensor([[0.0, 800.0, 800.0, 800.0]] * 2), context, token_index=order)
    unscrambled = torch.empty_like(head)
    unscrambled[:, order] = head
    assert relative_error(model.unpatchify(unscrambled, grid), full) < FP32_ROUNDOFF


def test_timesteps_spread_over_tokens_like_comfyui():
    """T timesteps cover ceil(L / T) consecutive tokens each (ComfyUI's ``repeat_e``)."""
    assert timestep_of_tokens(1, 12, None, "cpu") is None
    assert timestep_of_tokens(3, 12, None, "cpu").tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert timestep_of_tokens(12, 12, None, "cpu").tolist() == list(range(12))
    assert timestep_of_tokens(3, 12, torch.tensor([11, 0, 5]), "cpu").tolist() == [2, 0, 1]
    assert timestep_of_tokens(5, 12, None, "cpu").tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    with pytest.raises(ValueError, match="at most one per token"):
        timestep_of_tokens(13, 12, None, "cpu")


@torch.no_grad()
def test_i2v_inputs_are_checked_and_split_per_item():
    model = random_model(tiny_config(model_type="i2v"), seed=4)
    x, context = _inputs(model.config)
    y = torch.randn(2, model.config.concat_channels, *x.shape[2:])
    clip = torch.randn(2, 257, model.config.image_dim)
    with pytest.raises(ValueError, match=r"takes 12 input channels \(latents \+ 8 of y\), got 4"):
        model(x, torch.tensor([500.0, 500.0]), context)
    both = model(x, torch.tensor([500.0, 500.0]), context, clip_fea=clip, y=y)
    first = model(x[:1], torch.tensor([500.0]), context[:1], clip_fea=clip[:1], y=y[:1])
    assert relative_error(both[:1], first) < FP32_ROUNDOFF
    # without CLIP tokens the image attention reads the text tokens (ComfyUI's behaviour): a different output
    assert relative_error(model(x, torch.tensor([500.0, 500.0]), context, y=y), both) > 1e-3


def test_config_names_the_variant_and_checks_release_fields():
    assert tiny_config(**TI2V).variant == "Wan 2.2 TI2V 5B" and tiny_config(**TI2V).per_frame_timesteps
    assert tiny_config(model_type="i2v").variant == "Wan 2.1 I2V"
    assert tiny_config(in_dim=12, version="2.2", expert="high_noise").variant == "Wan 2.2 I2V A14B (high-noise expert)"
    assert tiny_config(version="2.2").variant == "Wan 2.2 T2V A14B" and tiny_config().variant == "Wan 2.1 T2V"
    assert tiny_config(in_dim=12).concat_channels == 8 and not tiny_config(in_dim=12).clip_image
    with pytest.raises(ValueError, match="version"):
        tiny_config(version="2.3")
    with pytest.raises(ValueError, match="expert"):
        tiny_config(expert="medium_noise")


@pytest.mark.parametrize(
    "config, billions",
    [
        # Wan 2.2 TI2V 5B as ComfyUI detects it: dim 3072 -> 24 heads of 128, ffn 14336, 30 layers, 48 channels
        (WanConfig(dim=3072, ffn_dim=14336, num_heads=24, num_layers=30, in_dim=48, out_dim=48, version="2.2"), 5.00),
        # Wan 2.2 I2V A14B expert: the 14B's shapes with 36 input channels and no img_emb
        (WanConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40, in_dim=36, version="2.2"), 14.29),
        # Wan 2.1 I2V 14B: with the CLIP image embedding and the image cross-attention
        (WanConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40, in_dim=36, model_type="i2v"), 16.39),
    ],
)
def test_released_shapes_have_the_released_sizes(config, billions):
    with torch.device("meta"):
        model = WanModel(config)
    assert sum(p.numel() for p in model.parameters()) / 1e9 == pytest.approx(billions, abs=0.01)


@torch.no_grad()
def test_compiled_blocks_take_per_frame_timesteps_and_image_context():
    for overrides, kwargs in (
        (TI2V, {}),
        (dict(model_type="i2v"), dict(y=torch.randn(2, 8, 3, 6, 8), clip_fea=torch.randn(2, 257, 32))),
    ):
        model = random_model(tiny_config(**overrides), seed=6)
        x, context = _inputs(model.config)
        t = torch.tensor([[0.0, 500.0, 500.0]] * 2) if model.config.per_frame_timesteps else torch.tensor([500.0] * 2)
        eager = model(x, t, context, **kwargs)
        model.compile_blocks(backend="aot_eager")
        assert relative_error(model(x, t, context, **kwargs), eager) < FP32_ROUNDOFF
