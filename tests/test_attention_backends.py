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


def _spy_kernel(layout: str | None, seen: list):
    """SDPA that records the memory layout q/k/v arrive in; ``input_layout`` as a kernel wrapper declares it."""

    def kernel(q, k, v):
        seen.append(
            (
                v.is_contiguous(),
                all(t.transpose(1, 2).is_contiguous() for t in (q, k, v)),
            )
        )
        return sdpa_attention(q, k, v)

    kernel.input_layout = layout
    return kernel


@pytest.mark.parametrize("compiled", [False, True])
def test_kernels_get_their_input_layout_and_the_same_result(compiled):
    """The fused qkv's v is a strided view. A kernel that copies it anyway (``tokens_first``, FlashAttention-4) gets it
    dense, one that wants ``heads_first`` gets q/k/v in [B, H, L, D] memory, both made by the block (inside the
    compiled code when compiled), with bit-identical results; other kernels keep the view."""
    config = tiny_config()
    model = random_model(config, seed=5)
    model.fuse_projections()
    inputs = _inputs(config)
    if compiled:
        model.compile_blocks(backend="aot_eager")
    outputs, seen = {}, {}
    with torch.no_grad():
        for layout in (None, "tokens_first", "heads_first"):
            seen[layout] = []
            kernel = _spy_kernel(layout, seen[layout])
            for block in model.blocks:
                block.self_attn.attention_fn = kernel
            outputs[layout] = model(*inputs)
    layers = config.num_layers
    assert seen[None] == [(False, False)] * layers  # v: a slice of qkv's rows
    assert seen["tokens_first"] == [(True, False)] * layers
    assert seen["heads_first"] == [(False, True)] * layers
    assert torch.equal(outputs["tokens_first"], outputs[None])
    assert torch.equal(outputs["heads_first"], outputs[None])


def test_gelu_epilogue_is_cuda_only_and_leaves_cpu_results_untouched():
    """``set_fusions(gelu_epilogue=True)`` asks for cuBLASLt's tanh-GELU epilogue; on the CPU PyTorch's fused op
    would use the erf GELU (not Wan's tanh), so the CPU must keep the plain FFN: bit-identical output."""
    config = tiny_config()
    model = random_model(config, seed=6)
    inputs = _inputs(config)
    with torch.no_grad():
        plain = model(*inputs)
        model.set_fusions(gelu_epilogue=True)
        assert all(block.gelu_epilogue for block in model.blocks)
        fused = model(*inputs)
        model.set_fusions()
    assert torch.equal(fused, plain)
    assert not any(block.gelu_epilogue for block in model.blocks)


def test_addmm_gelu_on_cpu_is_not_wans_gelu():
    """Why the epilogue is CUDA-only: the same op on the CPU computes the erf GELU, measurably not the tanh one."""
    x, weight, bias = (
        torch.randn(64, 16, dtype=torch.float64),
        torch.randn(32, 16, dtype=torch.float64),
        torch.randn(32, dtype=torch.float64),
    )
    tanh_gelu = torch.nn.functional.gelu(torch.addmm(bias, x, weight.t()), approximate="tanh")
    fused = torch._addmm_activation(bias, x, weight.t(), use_gelu=True)
    assert relative_error(fused, tanh_gelu) > 1e-5
