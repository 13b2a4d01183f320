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


def test_sdpa_order_is_stated_per_forward_whatever_the_process_left(monkeypatch):
    """ComfyUI's attention leaves SDPA's global priority changed (cuDNN no longer first on Hopper); inside our
    forward the order is ours again, and the caller's order is back afterwards."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from wan_distrifusion.wanvideo import attention

    attention._sdpa_order.cache_clear()
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (9, 0))
    left_by_others = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    try:
        with sdpa_kernel(left_by_others + [SDPBackend.CUDNN_ATTENTION], set_priority=True):
            before = torch._C._get_sdp_priority_order()
            with attention.sdpa_backend_order(torch.device("cuda", 0)):
                assert torch._C._get_sdp_priority_order()[0] == int(SDPBackend.CUDNN_ATTENTION)
            assert torch._C._get_sdp_priority_order() == before
            monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (8, 0))
            attention._sdpa_order.cache_clear()
            with attention.sdpa_backend_order(torch.device("cuda", 0)):
                assert torch._C._get_sdp_priority_order()[0] == int(SDPBackend.FLASH_ATTENTION)
    finally:
        attention._sdpa_order.cache_clear()


def test_model_forward_runs_its_blocks_under_the_sdpa_order(monkeypatch):
    import contextlib

    from wan_distrifusion.wanvideo import model as model_module

    entered = []

    @contextlib.contextmanager
    def spy(device):
        entered.append(device)
        yield

    monkeypatch.setattr(model_module, "sdpa_backend_order", spy)
    config = tiny_config()
    with torch.no_grad():
        random_model(config, seed=3)(*_inputs(config))
    assert entered == [torch.device("cpu")]
