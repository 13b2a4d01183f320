"""Loading Wan 2.2 files: the TI2V 5B and the A14B experts in every key layout, what the config records about the
release (version, expert, variant) so callers can check a file against its slot, and clear errors for the Wan 2.2
VAE and the other files that sit beside the models."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from tiny_wan import random_model, relative_error, tiny_config, write_checkpoint
from wan_distrifusion.wanvideo import WanDistriFusionError
from wan_distrifusion.wanvideo.loading import inspect_wan_checkpoint, load_wan_model

WIDE = dict(dim=256, num_heads=2, ffn_dim=64, num_layers=1, text_dim=32, freq_dim=32)
"""Heads of 128 like the released models, so the loader needs no metadata to count them (name-only tests)."""
ARCHITECTURES = {
    "ti2v-5b": (dict(in_dim=48, out_dim=48), "Wan 2.2 TI2V 5B"),
    "i2v-a14b": (dict(in_dim=36, out_dim=16), "Wan 2.2 I2V A14B"),
    "i2v-wan21": (dict(in_dim=36, out_dim=16, model_type="i2v", image_dim=32), "Wan 2.1 I2V"),
    "flf2v-wan21": (dict(in_dim=36, out_dim=16, model_type="i2v", image_dim=32, image_positions=514), "Wan 2.1 FLF2V"),
}


def _inputs(config, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, config.out_dim, 2, 4, 6, generator=gen)
    kwargs = {}
    if config.concat_channels:
        kwargs["y"] = torch.randn(1, config.concat_channels, 2, 4, 6, generator=gen)
    if config.clip_image:
        kwargs["clip_fea"] = torch.randn(1, 2 * 257 if config.image_positions else 257, config.image_dim, generator=gen)
    t = torch.tensor([[0.0, 600.0]]) if config.per_frame_timesteps else torch.tensor([600.0])
    return (x, t, torch.randn(1, 5, config.text_dim, generator=gen)), kwargs


@pytest.mark.parametrize("layout", ["original", "comfyui", "diffusers"])
@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_wan22_architectures_load_in_every_layout(tmp_path, name, layout):
    overrides, variant = ARCHITECTURES[name]
    model = random_model(tiny_config(**WIDE, **overrides), seed=1)
    path = write_checkpoint(tmp_path / "tiny.safetensors", model, layout, metadata=False)
    info = inspect_wan_checkpoint(path)
    assert info.layout == layout and info.config.variant == variant
    assert (info.config.in_dim, info.config.out_dim, info.config.num_heads) == (
        model.config.in_dim,
        model.config.out_dim,
        2,
    )
    assert info.config.version == ("2.1" if name.endswith("wan21") else "2.2") and info.config.expert == ""
    loaded = load_wan_model(path)
    args, kwargs = _inputs(model.config)
    with torch.no_grad():
        assert relative_error(loaded(*args, **kwargs), model(*args, **kwargs)) < 1e-6


@pytest.mark.parametrize(
    "relative_path, version, expert",
    [
        # Comfy-Org repackaged names
        ("wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors", "2.2", "high_noise"),
        ("wan2.2_i2v_low_noise_14B_fp16.safetensors", "2.2", "low_noise"),
        ("wan2.1_t2v_14B_bf16.safetensors", "2.1", ""),
        ("wan_2.2_t2v_14B.safetensors", "2.2", ""),
        # the original release: Wan2.2-T2V-A14B/low_noise_model/diffusion_pytorch_model-0000N-of-0000M.safetensors
        ("Wan2.2-T2V-A14B/low_noise_model/diffusion_pytorch_model-00001-of-00001.safetensors", "2.2", "low_noise"),
        ("my_finetune.safetensors", "2.1", ""),
        ("high_noise.safetensors", "2.2", "high_noise"),
    ],
)
def test_release_and_expert_from_the_file_name(tmp_path, relative_path, version, expert):
    """The A14B T2V experts have the Wan 2.1 14B's shapes: only the name (or metadata) tells them apart."""
    path = tmp_path / relative_path
    path.parent.mkdir(parents=True, exist_ok=True)
    write_checkpoint(path, random_model(tiny_config(**WIDE), seed=2), metadata=False)
    config = inspect_wan_checkpoint(path).config
    assert (config.version, config.expert) == (version, expert)
    assert config.variant == ("Wan 2.1 T2V" if version == "2.1" else "Wan 2.2 T2V A14B") + (
        f" ({expert.replace('_', '-')} expert)" if expert else ""
    )


def test_metadata_wins_over_the_name_and_shapes_over_both(tmp_path):
    model = random_model(tiny_config(**WIDE), seed=3)
    state = model.state_dict()
    path = tmp_path / "wan2.1_t2v_high_noise.safetensors"
    save_file(state, str(path), metadata={"wan_config": json.dumps({"version": "2.2", "expert": "low_noise"})})
    config = inspect_wan_checkpoint(path).config
    assert (config.version, config.expert) == ("2.2", "low_noise")
    ti2v = random_model(tiny_config(**WIDE, in_dim=48, out_dim=48), seed=3)
    path = tmp_path / "wan2.1_named_wrongly.safetensors"
    save_file(ti2v.state_dict(), str(path), metadata={"wan_config": json.dumps({"version": "2.1"})})
    assert inspect_wan_checkpoint(path).config.version == "2.2"


def test_scaled_fp8_ti2v_file_loads(tmp_path):
    """ComfyUI's fp8-scaled form (``scaled_fp8`` marker, per-tensor ``scale_weight``) of a 48-channel model."""
    model = random_model(tiny_config(in_dim=48, out_dim=48), seed=4)
    state = {}
    for key, tensor in model.state_dict().items():
        if key.startswith("blocks.") and key.endswith(".weight") and tensor.dim() == 2:
            scale = tensor.abs().max() / 448.0
            state[key] = (tensor / scale).to(torch.float8_e4m3fn)
            state[key.removesuffix(".weight") + ".scale_weight"] = scale.reshape(())
        else:
            state[key] = tensor
    state["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    path = write_checkpoint(tmp_path / "wan2.2_ti2v_5B_fp8_scaled.safetensors", state, "comfyui", config=model.config)
    loaded = load_wan_model(path, quantization="fp8_e4m3fn")
    assert loaded.config.variant == "Wan 2.2 TI2V 5B"
    args, kwargs = _inputs(model.config)
    with torch.no_grad():
        assert relative_error(loaded(*args, **kwargs), model(*args, **kwargs)) < 0.1


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        # the Wan 2.2 VAE (wan2.2_vae.safetensors): residual down/up blocks
        (
            [
                "encoder.conv1.weight",
                "encoder.downsamples.0.downsamples.0.residual.0.gamma",
                "decoder.middle.0.residual.0.gamma",
                "decoder.upsamples.0.upsamples.0.residual.2.weight",
            ],
            "the Wan VAE",
        ),
        (["umt5xxl.transformer.shared.weight", "encoder.block.0.layer.0.SelfAttention.q.weight"], "a T5/UMT5"),
        (
            ["vision_model.encoder.layers.0.self_attn.q_proj.weight", "vision_model.embeddings.class_embedding"],
            "a CLIP vision",
        ),
    ],
)
def test_files_beside_the_models_fail_with_what_they_are(tmp_path, keys, expected):
    path = tmp_path / "wan2.2_other.safetensors"
    save_file({key: torch.zeros(2, 2) for key in keys}, str(path))
    with pytest.raises(WanDistriFusionError) as info:
        load_wan_model(path)
    assert f"not a Wan diffusion model: it looks like {expected}" in str(info.value)
