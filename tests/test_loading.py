"""``load_wan_model``: layouts, config detection, dtypes, fp8 storage, memory mapping and every error message."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_wan import random_model, relative_error, tiny_config, write_checkpoint
from wan_distrifusion.wanvideo import WanDistriFusionError, loading
from wan_distrifusion.wanvideo.checkpoint_layout import COMFYUI_PREFIX, to_diffusers_key
from wan_distrifusion.wanvideo.fp8 import Fp8Linear
from wan_distrifusion.wanvideo.loading import inspect_wan_checkpoint, load_wan_model, model_from_state_dict

FP8 = {"fp8_e4m3fn": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


@pytest.fixture(scope="module")
def model():
    return random_model(tiny_config(), seed=3)


@pytest.fixture(scope="module")
def inputs():
    generator = torch.Generator().manual_seed(5)
    return {
        "x": torch.randn(1, 4, 3, 6, 10, generator=generator),
        "t": torch.tensor([700.0]),
        "context": torch.randn(1, 6, 32, generator=generator),
    }


@pytest.fixture
def checkpoint(tmp_path, model):
    return write_checkpoint(tmp_path / "wan.safetensors", model)


def _output(model, inputs):
    with torch.no_grad():
        return model(**inputs).float()


def _error(path, **kwargs) -> str:
    with pytest.raises(WanDistriFusionError) as info:
        load_wan_model(path, **kwargs)
    return str(info.value)


# -- layouts, config, dtypes ------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["original", "comfyui", "diffusers"])
def test_every_layout_loads_the_same_weights(tmp_path, model, layout):
    path = write_checkpoint(tmp_path / "wan.safetensors", model, layout)
    loaded = load_wan_model(path)
    assert loaded.config == model.config
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    info = inspect_wan_checkpoint(path)
    assert (info.layout, info.config, info.num_tensors) == (layout, model.config, len(model.state_dict()))


def test_inspection_reads_a_file_once_per_version(tmp_path, model, monkeypatch):
    opened = []
    original_open = loading.Checkpoint.open
    monkeypatch.setattr(
        loading.Checkpoint, "open", lambda path, stack: opened.append(path) or original_open(path, stack)
    )
    path = write_checkpoint(tmp_path / "wan.safetensors", model, metadata=False)
    config_json = tmp_path / "config.json"
    config_json.write_text(json.dumps({"_class_name": "WanModel", "dim": 64, "num_heads": 4}))
    assert inspect_wan_checkpoint(path).config == model.config
    assert inspect_wan_checkpoint(str(path)).config == model.config
    assert len(opened) == 1
    config_json.write_text(json.dumps({"_class_name": "WanModel", "dim": 64, "num_heads": 2}))
    os.utime(config_json, ns=(1, 1))  # a new version, whatever the clock's resolution
    assert inspect_wan_checkpoint(path).config.num_heads == 2
    other = tiny_config(num_layers=3)
    write_checkpoint(path, random_model(other))
    os.utime(path, ns=(1, 1))
    assert inspect_wan_checkpoint(path).config == other
    assert len(opened) == 3


def test_i2v_config_is_detected(tmp_path):
    config = tiny_config(model_type="i2v", num_layers=3, ffn_dim=96, text_dim=24, freq_dim=16)
    loaded = load_wan_model(write_checkpoint(tmp_path / "i2v.safetensors", random_model(config)))
    assert loaded.config == config
    assert loaded.config.in_dim == 12 and loaded.config.image_dim == 32


def test_heads_default_to_wan_head_size_without_metadata(tmp_path):
    config = tiny_config(dim=256, num_heads=2, ffn_dim=64, num_layers=1)
    path = write_checkpoint(tmp_path / "wan.safetensors", random_model(config), metadata=False)
    assert load_wan_model(path).config.num_heads == 2


def test_heads_from_config_json_beside_the_file(tmp_path, model):
    path = write_checkpoint(tmp_path / "wan.safetensors", model, metadata=False)
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "WanModel", "dim": 64, "num_heads": 4}))
    assert load_wan_model(path).config.num_heads == 4


def test_heads_unknown_is_a_clear_error(tmp_path, model):
    path = write_checkpoint(tmp_path / "wan.safetensors", model, metadata=False)
    message = _error(path)
    assert "attention heads" in message and "64" in message and "wan_config" in message


@pytest.mark.parametrize("precision", [torch.bfloat16, "bf16", "fp16", "fp32"])
def test_compute_dtype(checkpoint, inputs, model, precision):
    loaded = load_wan_model(checkpoint, dtype=precision)
    expected = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}.get(precision, precision)
    assert loaded.compute_dtype == expected
    assert loaded.blocks[0].self_attn.q.weight.dtype == expected
    assert loaded.text_embedding[0].weight.dtype == expected
    assert loaded.blocks[0].modulation.dtype == torch.float32  # tiny tables stay fp32
    assert loaded.blocks[0].norm3.weight.dtype == torch.float32
    assert relative_error(_output(loaded, inputs), _output(model, inputs)) < 2e-2


def test_half_precision_file_upcasts_exactly(tmp_path, model):
    loaded = load_wan_model(write_checkpoint(tmp_path / "wan.safetensors", model, dtype=torch.bfloat16))
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor.to(torch.bfloat16).float()), name


def test_loads_memory_mapped_and_matches_file(checkpoint):
    loaded = load_wan_model(checkpoint)
    on_disk = load_file(str(checkpoint))
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, on_disk[name]), name
    assert not any(param.requires_grad for param in loaded.parameters())
    if sys.platform.startswith("linux"):  # same-dtype CPU tensors stay backed by the file's pages, not copies
        with open("/proc/self/maps") as maps:
            assert os.fspath(checkpoint.resolve()) in maps.read()


def test_sharded_file_and_folder(tmp_path, model):
    state = model.state_dict()
    names = list(state)
    folder = tmp_path / "shards"
    folder.mkdir()
    metadata = {"wan_config": json.dumps({"num_heads": 4})}
    for index, part in enumerate((names[: len(names) // 2], names[len(names) // 2 :]), start=1):
        save_file({n: state[n] for n in part}, str(folder / f"wan-0000{index}-of-00002.safetensors"), metadata=metadata)
    for path in (folder / "wan-00001-of-00002.safetensors", folder):
        assert torch.equal(load_wan_model(path).head.head.weight, model.head.head.weight)
    (folder / "wan-00002-of-00002.safetensors").unlink()
    assert "shard" in _error(folder / "wan-00001-of-00002.safetensors")


@pytest.mark.parametrize("layout", ["original", "diffusers"])
def test_model_from_state_dict_shares_tensors(model, inputs, layout):
    state = model.state_dict()
    if layout == "diffusers":
        state = {to_diffusers_key(name): tensor for name, tensor in state.items()}
    built = model_from_state_dict(state, num_heads=4)
    assert built.config == model.config
    assert built.blocks[1].ffn[2].weight.data_ptr() == model.blocks[1].ffn[2].weight.data_ptr()
    assert torch.equal(_output(built, inputs), _output(model, inputs))
    fp8 = model_from_state_dict(state, num_heads=4, dtype="bf16", quantization="fp8_e5m2")
    assert isinstance(fp8.blocks[0].self_attn.v, Fp8Linear) and fp8.compute_dtype == torch.bfloat16
    assert "attention heads" in str(pytest.raises(WanDistriFusionError, model_from_state_dict, state).value)


# -- fp8 storage ------------------------------------------------------------------------------------


FP8_OUTPUT_ERROR = {"fp8_e4m3fn": (5e-3, 0.015), "fp8_e5m2": (1e-2, 0.03)}
"""Bounds on the relative error of the fp8-stored model's output vs fp32: measured 9.9e-3 (e4m3), 2.1e-2 (e5m2)."""


@pytest.mark.parametrize("quantization", FP8)
def test_fp8_storage_runs_within_fp8_error(checkpoint, inputs, model, quantization):
    loaded = load_wan_model(checkpoint, quantization=quantization)
    linear = loaded.blocks[1].ffn[0]
    assert isinstance(linear, Fp8Linear) and linear.weight.dtype == FP8[quantization]
    assert loaded.blocks[0].cross_attn.o.weight.dtype == FP8[quantization]
    assert loaded.head.head.weight.dtype == torch.float32  # only the blocks' Linear weights are fp8
    assert loaded.blocks[0].ffn[0].bias.dtype == torch.float32
    error = relative_error(_output(loaded, inputs), _output(model, inputs))
    low, high = FP8_OUTPUT_ERROR[quantization]
    assert low < error < high  # really quantized, still close


def _block_linear_bytes(model) -> int:
    return sum(
        m.weight.numel() * m.weight.element_size() for m in model.blocks.modules() if isinstance(m, torch.nn.Linear)
    )


def test_fp8_weights_take_half_the_bytes_of_bf16(checkpoint):
    bf16 = load_wan_model(checkpoint, dtype=torch.bfloat16)
    fp8 = load_wan_model(checkpoint, dtype=torch.bfloat16, quantization="fp8_e4m3fn")
    assert _block_linear_bytes(fp8) * 2 == _block_linear_bytes(bf16)
    total = lambda m: sum(t.numel() * t.element_size() for t in m.state_dict().values())  # noqa: E731
    assert total(fp8) < total(bf16)


def _scaled_fp8_state(model, fp8_dtype):
    """ComfyUI's scaled-fp8 format: fp8 block Linear weights, a per-tensor ``scale_weight``, a marker tensor."""
    state = dict(model.state_dict())
    for name, module in model.blocks.named_modules():
        if isinstance(module, torch.nn.Linear):
            key = f"blocks.{name}"
            scale = state[f"{key}.weight"].abs().max() / torch.finfo(fp8_dtype).max
            state[f"{key}.weight"] = (state[f"{key}.weight"] / scale).to(fp8_dtype)
            state[f"{key}.scale_weight"] = scale.reshape(())
    state["scaled_fp8"] = torch.empty(0, dtype=fp8_dtype)
    return state


def test_scaled_fp8_checkpoint(tmp_path, model):
    state = _scaled_fp8_state(model, torch.float8_e4m3fn)
    path = write_checkpoint(tmp_path / "wan_fp8_scaled.safetensors", state, "comfyui", config=model.config)
    name = "blocks.0.self_attn.q"
    dequantized = load_wan_model(path).get_submodule(name).weight
    assert torch.equal(dequantized, state[f"{name}.weight"].float() * state[f"{name}.scale_weight"])
    kept = load_wan_model(path, quantization="fp8_e4m3fn").get_submodule(name)
    assert torch.equal(kept.weight.view(torch.uint8), state[f"{name}.weight"].view(torch.uint8))  # no re-rounding
    assert torch.equal(kept.scale_weight, state[f"{name}.scale_weight"])
    requantized = load_wan_model(path, quantization="fp8_e5m2").get_submodule(name)
    assert requantized.weight.dtype == torch.float8_e5m2


def test_plain_fp8_checkpoint_keeps_its_bits(tmp_path, model):
    path = write_checkpoint(tmp_path / "wan_fp8.safetensors", model, dtype=torch.float8_e4m3fn)
    loaded = load_wan_model(path, quantization="fp8_e4m3fn")
    weight = model.blocks[0].self_attn.k.weight.to(torch.float8_e4m3fn)
    assert torch.equal(loaded.blocks[0].self_attn.k.weight.view(torch.uint8), weight.view(torch.uint8))
    assert loaded.blocks[0].self_attn.k.scale_weight.item() == 1.0
    assert torch.equal(load_wan_model(path).blocks[0].self_attn.k.weight, weight.float())


# -- errors -----------------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    message = _error(tmp_path / "nowhere.safetensors")
    assert "not found" in message and "nowhere.safetensors" in message and "model widget" in message


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".gguf", ""])
def test_unsupported_extension(tmp_path, suffix):
    path = tmp_path / f"wan{suffix}"
    path.write_bytes(b"\0" * 16)
    message = _error(path)
    assert "extension" in message and ".safetensors" in message
    if suffix == ".gguf":
        assert "GGUF" in message


def test_truncated_file(checkpoint):
    data = checkpoint.read_bytes()
    checkpoint.write_bytes(data[:-1000])
    message = _error(checkpoint)
    assert "truncated" in message and f"{len(data) - 1000} bytes" in message and str(len(data)) in message


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"", "empty or truncated"),
        (bytes(range(256)) * 8, "corrupt"),
        (b"version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 10\n", "Git LFS pointer"),
        (b"<!DOCTYPE html><html><body>rate limited</body></html>", "HTML page"),
    ],
)
def test_corrupt_file(tmp_path, content, expected):
    path = tmp_path / "wan.safetensors"
    path.write_bytes(content)
    message = _error(path)
    assert expected in message and "cannot read model file wan.safetensors" in message


def _write(path, keys):
    save_file({key: torch.zeros(2, 2) for key in keys}, str(path))
    return path


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        (
            ["model.diffusion_model.input_blocks.0.0.weight", "model.diffusion_model.label_emb.0.0.weight"],
            "an SDXL UNet",
        ),
        (["encoder.conv1.weight", "decoder.middle.0.residual.0.gamma"], "the Wan VAE"),
        (["shared.weight", "encoder.block.0.layer.0.SelfAttention.q.weight"], "a T5/UMT5 text encoder"),
        (["double_blocks.0.img_attn.qkv.weight", "img_in.weight"], "a Flux"),
        (
            ["diffusion_model.blocks.0.self_attn.q.lora_down.weight", "diffusion_model.blocks.0.self_attn.q.alpha"],
            "a LoRA",
        ),
        (["something.weight"], "an unrecognised model"),
    ],
)
def test_not_a_wan_checkpoint(tmp_path, keys, expected):
    message = _error(_write(tmp_path / "other.safetensors", keys))
    assert f"not a Wan diffusion model: it looks like {expected}" in message
    assert f"{len(keys)} tensors" in message and sorted(keys)[0] in message


def test_unknown_layout(tmp_path, model):
    state = {f"net.backbone.{name}": tensor for name, tensor in model.state_dict().items()}
    message = _error(write_checkpoint(tmp_path / "wan.safetensors", state, config=model.config))
    assert "key layout" in message and "'net.backbone'" in message and COMFYUI_PREFIX in message


@pytest.mark.parametrize("layout", ["original", "diffusers"])
def test_missing_tensors_are_listed(tmp_path, model, layout):
    dropped = ["blocks.1.ffn.2.weight", "blocks.1.ffn.2.bias", "head.modulation"]
    state = {name: tensor for name, tensor in model.state_dict().items() if name not in dropped}
    message = _error(write_checkpoint(tmp_path / "wan.safetensors", state, layout, config=model.config))
    assert "missing 3 tensors" in message and f"({layout} layout)" in message
    for name in dropped:
        assert (to_diffusers_key(name) if layout == "diffusers" else name) in message


def test_missing_core_tensor(tmp_path, model):
    state = {name: tensor for name, tensor in model.state_dict().items() if name != "patch_embedding.weight"}
    assert "patch_embedding.weight" in _error(
        write_checkpoint(tmp_path / "wan.safetensors", state, config=model.config)
    )


def test_shape_mismatch(tmp_path, model):
    state = dict(model.state_dict())
    state["blocks.1.self_attn.q.weight"] = torch.zeros(64, 32)
    message = _error(write_checkpoint(tmp_path / "wan.safetensors", state, config=model.config))
    assert "blocks.1.self_attn.q.weight" in message and "[64, 32]" in message and "[64, 64]" in message


def test_unexpected_tensors(tmp_path, model):
    state = dict(model.state_dict(), **{"blocks.0.adapter.weight": torch.zeros(3)})
    message = _error(write_checkpoint(tmp_path / "wan.safetensors", state, config=model.config))
    assert "blocks.0.adapter.weight" in message and "does not use" in message


def test_unsupported_wan_variant(tmp_path):
    config = tiny_config(num_layers=1)
    state = dict(random_model(config).state_dict(), **{"vace_blocks.0.before_proj.weight": torch.zeros(64, 64)})
    message = _error(write_checkpoint(tmp_path / "vace.safetensors", state, config=config))
    assert "a Wan VACE model" in message


@pytest.mark.parametrize("quantization", ["fp4", "int8", "FP8"])
def test_bad_quantization_names_the_widget(checkpoint, quantization):
    message = _error(checkpoint, quantization=quantization)
    assert "quantization widget" in message and "fp8_e4m3fn" in message and repr(quantization) in message


@pytest.mark.parametrize("precision", ["int8", torch.float64, "fp64"])
def test_bad_precision_names_the_widget(checkpoint, precision):
    message = _error(checkpoint, dtype=precision)
    assert "precision widget" in message and "bf16" in message
