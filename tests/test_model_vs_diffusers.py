"""Our Wan DiT, loaded from each key layout, against diffusers' own ``WanTransformer3DModel``.

The reference gets its weights through diffusers' own converter (``convert_wan_transformer_to_diffusers``)
and the diffusers-layout file is written by diffusers' ``save_pretrained``, so a naming or math slip on
our side cannot hide behind a mapping we wrote ourselves.
"""

from __future__ import annotations

import functools

import pytest
import torch
from tiny_wan import random_model, relative_error, tiny_config, write_checkpoint
from wan_distrifusion.wanvideo.checkpoint_layout import to_diffusers_key
from wan_distrifusion.wanvideo.loading import load_wan_model

_SKIP = "diffusers has no WanTransformer3DModel here (the official distrifuser profile pins diffusers 0.24); runs in the compatible profile"
transformer_wan = pytest.importorskip(
    "diffusers.models.transformers.transformer_wan", reason=_SKIP, exc_type=ImportError
)
single_file_utils = pytest.importorskip("diffusers.loaders.single_file_utils", reason=_SKIP, exc_type=ImportError)
if not hasattr(single_file_utils, "convert_wan_transformer_to_diffusers"):
    pytest.skip(_SKIP, allow_module_level=True)

TEXT_TOKENS_I2V = 512  # diffusers' I2V attention takes the last 512 context tokens as text, the rest as image
CASES = {
    # name: (config, latent shape [B, C, F, H, W], text tokens)
    "t2v-4heads-odd-grid": (tiny_config(), (1, 4, 3, 6, 10), 7),
    "t2v-2heads-1layer-batch2": (tiny_config(dim=96, num_heads=2, ffn_dim=160, num_layers=1), (2, 4, 2, 8, 4), 5),
    "t2v-8heads-3layers-patch112": (
        tiny_config(dim=128, num_heads=8, num_layers=3, in_dim=3, out_dim=3, text_dim=24, patch_size=(1, 1, 2)),
        (1, 3, 1, 5, 6),
        9,
    ),
    "i2v-clip-y": (tiny_config(model_type="i2v"), (1, 4, 3, 6, 10), TEXT_TOKENS_I2V),
}


@functools.cache
def _case(name: str):
    """Our random model, diffusers' model with the same weights, inputs, and diffusers' fp32 output."""
    config, shape, text_tokens = CASES[name]
    model = random_model(config, seed=len(name))
    i2v = config.model_type == "i2v"
    reference = transformer_wan.WanTransformer3DModel(
        patch_size=config.patch_size,
        num_attention_heads=config.num_heads,
        attention_head_dim=config.head_dim,
        in_channels=config.in_dim,
        out_channels=config.out_dim,
        text_dim=config.text_dim,
        freq_dim=config.freq_dim,
        ffn_dim=config.ffn_dim,
        num_layers=config.num_layers,
        cross_attn_norm=True,
        eps=config.eps,
        image_dim=config.image_dim if i2v else None,
        added_kv_proj_dim=config.dim if i2v else None,
    )
    converted = single_file_utils.convert_wan_transformer_to_diffusers(dict(model.state_dict()))
    reference.load_state_dict(converted, strict=True)
    reference.eval().requires_grad_(False)

    generator = torch.Generator().manual_seed(1)
    batch = shape[0]
    inputs = {
        "x": torch.randn(shape, generator=generator),
        "t": torch.tensor([999.0, 250.5][:batch]) if batch > 1 else torch.tensor([437.25]),
        "context": torch.randn(batch, text_tokens, config.text_dim, generator=generator),
    }
    reference_kwargs = {}
    hidden = inputs["x"]
    if i2v:
        inputs["y"] = torch.randn(batch, config.in_dim - config.out_dim, *shape[2:], generator=generator)
        inputs["clip_fea"] = torch.randn(batch, 257, config.image_dim, generator=generator)
        hidden = torch.cat([inputs["x"], inputs["y"]], dim=1)
        reference_kwargs["encoder_hidden_states_image"] = inputs["clip_fea"]
    with torch.no_grad():
        expected = reference(hidden, inputs["t"], inputs["context"], **reference_kwargs).sample
    return model, reference, inputs, expected


def _run(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).float()


@pytest.mark.parametrize("name", CASES)
def test_key_mapping_matches_diffusers_converter(name):
    model, reference, _, _ = _case(name)
    state = model.state_dict()
    converted = single_file_utils.convert_wan_transformer_to_diffusers(dict(state))
    assert {to_diffusers_key(key): key for key in state}.keys() == converted.keys() == reference.state_dict().keys()
    for key, tensor in state.items():
        assert converted[to_diffusers_key(key)] is tensor


@pytest.mark.parametrize("layout", ["original", "comfyui", "diffusers"])
@pytest.mark.parametrize("name", CASES)
def test_loaded_model_matches_diffusers_fp32(name, layout, tmp_path):
    model, reference, inputs, expected = _case(name)
    if layout == "diffusers":
        reference.save_pretrained(tmp_path, safe_serialization=True)  # diffusers' own file + config.json
        path = tmp_path / "diffusion_pytorch_model.safetensors"
    else:
        path = write_checkpoint(tmp_path / "wan.safetensors", model, layout)
    loaded = load_wan_model(path)
    assert loaded.config == model.config
    output = _run(loaded, inputs)
    assert output.shape == expected.shape
    assert relative_error(output, expected) < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["t2v-4heads-odd-grid", "i2v-clip-y"])
def test_half_precision_close_to_diffusers_fp32(name, dtype, tmp_path):
    model, _, inputs, expected = _case(name)
    loaded = load_wan_model(write_checkpoint(tmp_path / "wan.safetensors", model), dtype=dtype)
    assert loaded.compute_dtype == dtype
    assert loaded.patch_embedding.weight.dtype == dtype
    assert relative_error(_run(loaded, inputs), expected) < 2e-2
