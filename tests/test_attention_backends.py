import pytest
import torch
from tiny_wan import random_model, relative_error, tiny_config
from wan_distrifusion.wanvideo.attention import resolve_attention, sdpa_attention
from wan_distrifusion.wanvideo.errors import WanDistriFusionError


def _inputs(config):
    x = torch.randn(1, config.in_dim, 2, 4, 6)
    return x, torch.tensor([500.0]), torch.randn(1, 7, config.text_dim)


def test_unknown_backend_names_the_widget():
    with pytest.raises(WanDistriFusionError, match="attention backend"):
        resolve_attention("flash9")


def test_gpu_only_backend_on_cpu_is_a_clear_error():
    with pytest.raises(WanDistriFusionError, match="needs a CUDA GPU"):
        resolve_attention("flash4", "cpu")


def test_auto_on_cpu_is_sdpa():
    assert resolve_attention("auto", "cpu") is sdpa_attention


def test_sdpa_matches_explicit_softmax():
    q, k, v = (torch.randn(2, 5, 3, 8, dtype=torch.float64) for _ in range(3))
    weights = torch.softmax(torch.einsum("blhd,bmhd->bhlm", q, k) / 8**0.5, dim=-1)
    expected = torch.einsum("bhlm,bmhd->blhd", weights, v)
    assert relative_error(sdpa_attention(q, k, v), expected) < 1e-12


def test_compiled_blocks_match_eager():
    config = tiny_config()
    model = random_model(config, seed=3)
    inputs = _inputs(config)
    with torch.no_grad():
        eager = model(*inputs)
        model.set_attention_backend("sdpa")
        model.compile_blocks(backend="aot_eager")
        compiled = model(*inputs)
    assert relative_error(compiled, eager) < 1e-6
