"""LoRA files: every format ComfyUI applies to Wan, mapped onto our fused model and merged, against a direct merge."""

from __future__ import annotations

import logging

import pytest
import torch
from tiny_lora import FORMATS, UNMATCHED_KEYS, random_lora, reference_merge, write_lora
from tiny_wan import random_model, relative_error, tiny_config, write_checkpoint
from wan_distrifusion.wanvideo.errors import WanDistriFusionError
from wan_distrifusion.wanvideo.loading import load_wan_model, model_from_state_dict
from wan_distrifusion.wanvideo.lora import LoraFile, apply_loras, plan_lora

CONFIG = tiny_config()


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    model = random_model(CONFIG, seed=3)
    path = write_checkpoint(tmp_path_factory.mktemp("wan") / "tiny.safetensors", model)
    return model.state_dict(), path


def _inputs():
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(1, 4, 3, 6, 8, generator=generator)
    return x, dict(t=torch.tensor([400.0]), context=torch.randn(1, 6, 32, generator=generator))


def _output(model):
    x, inputs = _inputs()
    with torch.no_grad():
        return model(x, **inputs)


def _loaded(path, **kwargs):
    model = load_wan_model(path, **kwargs)
    model.fuse_projections()
    return model


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_merges_like_the_direct_reference(tmp_path, base, fmt, caplog):
    state, path = base
    lora = random_lora(CONFIG, seed=1, with_diffs=fmt == "lightx2v")
    file = LoraFile(str(write_lora(tmp_path / f"{fmt}.safetensors", lora, fmt)), 0.7)
    model = _loaded(path)
    with caplog.at_level(logging.WARNING):
        summary = apply_loras(model, path, [file])
    assert summary["tensors"] == len(lora)
    warnings = [r.getMessage() for r in caplog.records if "match no layer" in r.getMessage()]
    assert len(warnings) == 1 and all(key in warnings[0] for key in UNMATCHED_KEYS)
    expected = model_from_state_dict(reference_merge(state, lora, 0.7), num_heads=CONFIG.num_heads)
    plain = model_from_state_dict(state, num_heads=CONFIG.num_heads)
    error = relative_error(_output(model), _output(expected))
    change = relative_error(_output(plain), _output(expected))
    print(f"{fmt}: merged vs direct reference {error:.1e} (the LoRA changes the output by {change:.1e})")
    assert change > 1e-2  # the LoRA really changes the model
    assert error < 1e-6


def test_fused_slices_get_the_right_layers(tmp_path, base):
    state, path = base
    lora = {name: update for name, update in random_lora(CONFIG, seed=2).items() if ".self_attn.k." in name}
    lora |= {name: update for name, update in random_lora(CONFIG, seed=3).items() if ".cross_attn.v." in name}
    model = _loaded(path)
    apply_loras(model, path, [LoraFile(str(write_lora(tmp_path / "kv.safetensors", lora, "kohya")))])
    merged = reference_merge(state, lora, 1.0)
    dim = CONFIG.dim
    qkv = model.blocks[1].self_attn.qkv.weight
    kv = model.blocks[1].cross_attn.kv.weight
    assert torch.equal(qkv[:dim], state["blocks.1.self_attn.q.weight"])
    assert torch.allclose(qkv[dim : 2 * dim], merged["blocks.1.self_attn.k.weight"], atol=1e-6)
    assert not torch.equal(qkv[dim : 2 * dim], state["blocks.1.self_attn.k.weight"])
    assert torch.equal(qkv[2 * dim :], state["blocks.1.self_attn.v.weight"])
    assert torch.equal(kv[:dim], state["blocks.1.cross_attn.k.weight"])
    assert torch.allclose(kv[dim:], merged["blocks.1.cross_attn.v.weight"], atol=1e-6)


def test_chain_strength_change_and_removal_start_from_the_unmodified_weights(tmp_path, base):
    state, path = base
    first, second = random_lora(CONFIG, seed=4), random_lora(CONFIG, seed=5, with_diffs=True)
    a = str(write_lora(tmp_path / "a.safetensors", first, "comfyui"))
    b = str(write_lora(tmp_path / "b.safetensors", second, "lightx2v"))
    model = _loaded(path)
    apply_loras(model, path, [LoraFile(a, 1.0)])
    apply_loras(model, path, [LoraFile(a, 0.5), LoraFile(b, -0.8)])  # re-merge, not on top of the first merge
    expected = model_from_state_dict(
        reference_merge(reference_merge(state, first, 0.5), second, -0.8), num_heads=CONFIG.num_heads
    )
    assert relative_error(_output(model), _output(expected)) < 1e-6
    apply_loras(model, path, [])
    plain = _loaded(path)  # loaded alike: CPU GEMMs may round differently on differently aligned (mapped) weights
    plain_weights = plain.state_dict()
    assert all(torch.equal(tensor, plain_weights[name]) for name, tensor in model.state_dict().items())
    assert torch.equal(_output(model), _output(plain))


def test_another_model_size_fails_naming_the_file_before_any_weight_changes(tmp_path, base):
    state, path = base
    wider = random_lora(tiny_config(dim=128, num_heads=4, ffn_dim=128), seed=6)
    good = str(write_lora(tmp_path / "good.safetensors", random_lora(CONFIG, seed=7), "comfyui"))
    bad = str(write_lora(tmp_path / "wan14b_style.safetensors", wider, "comfyui"))
    model = _loaded(path)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with pytest.raises(WanDistriFusionError, match=r"wan14b_style\.safetensors does not fit.*width 64"):
        apply_loras(model, path, [LoraFile(good), LoraFile(bad)])
    assert all(torch.equal(before[name], tensor) for name, tensor in model.state_dict().items())
    deeper = random_lora(tiny_config(num_layers=3), seed=8)
    deep = LoraFile(str(write_lora(tmp_path / "deep.safetensors", deeper, "kohya")))
    with pytest.raises(WanDistriFusionError, match=r"deep\.safetensors changes block 2 but .* has 2 blocks"):
        plan_lora(deep, CONFIG)


def test_lycoris_files_are_refused(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "loha.safetensors"
    save_file({"diffusion_model.blocks.0.self_attn.q.hada_w1_a": torch.zeros(2, 2)}, str(path))
    with pytest.raises(WanDistriFusionError, match="LyCORIS"):
        plan_lora(LoraFile(str(path)), CONFIG)


def test_bad_lora_inputs_name_the_fix(tmp_path):
    with pytest.raises(WanDistriFusionError, match="lora: .* does not exist"):
        LoraFile(str(tmp_path / "missing.safetensors"))
    (tmp_path / "x.ckpt").write_bytes(b"0")
    with pytest.raises(WanDistriFusionError, match="not a .safetensors"):
        LoraFile(str(tmp_path / "x.ckpt"))
    (tmp_path / "y.safetensors").write_bytes(b"0")
    with pytest.raises(WanDistriFusionError, match="strength"):
        LoraFile(str(tmp_path / "y.safetensors"), float("nan"))


@pytest.mark.parametrize("quantization", ["fp8_e4m3fn", "fp8_e5m2"])
def test_fp8_merge_requantizes_per_tensor_close_to_a_bf16_merge(tmp_path, base, quantization):
    state, path = base
    lora = random_lora(CONFIG, seed=9, with_diffs=True)
    file = LoraFile(str(write_lora(tmp_path / "l.safetensors", lora, "lightx2v")))
    quantized = _loaded(path, dtype="bf16", quantization=quantization)
    apply_loras(quantized, path, [file])
    bf16 = _loaded(path, dtype="bf16")
    apply_loras(bf16, path, [file])
    # The best fp8 can do: the merged weights (direct reference) quantized per tensor at load.
    ideal = model_from_state_dict(
        reference_merge(state, lora, 1.0), dtype="bf16", quantization=quantization, num_heads=CONFIG.num_heads
    )
    ideal.fuse_projections()
    unmerged = _loaded(path, dtype="bf16", quantization=quantization)
    error = relative_error(_output(quantized).float(), _output(bf16).float())
    best = relative_error(_output(ideal).float(), _output(bf16).float())
    lost = relative_error(_output(unmerged).float(), _output(bf16).float())
    print(
        f"{quantization}: merged into fp8 vs merged in bf16 {error:.1e}; the merged weights quantized at load "
        f"{best:.1e}; fp8 with the LoRA dropped {lost:.1e}"
    )
    assert error < 1.5 * best  # re-quantizing per tensor after an fp32 merge is as good as quantizing merged weights
    assert error < lost / 3  # and the LoRA is not lost
