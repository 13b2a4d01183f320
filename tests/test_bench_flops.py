"""The FLOP counts ``bench/kernel_breakdown.py`` divides by kernel time, against PyTorch's own FLOP counter."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _breakdown():
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location("kernel_breakdown", BENCH / "kernel_breakdown.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH))


@pytest.mark.parametrize("batch", [1, 2])
def test_gemm_and_attention_flops_match_torch_flop_counter(batch):
    breakdown = _breakdown()
    common = sys.modules["common"]
    cfg = common.wan_config("tiny")
    model = common.build_ours(
        cfg, common.random_state_dict(cfg, seed=0, device="cpu", dtype=torch.float32), "cpu", torch.float32
    )
    x, t, context = common.make_inputs(cfg, "tiny_odd", batch, device="cpu", dtype=torch.float32)
    # the math SDPA decomposes into batched matmuls, which the counter sees (CPU's flash kernel it does not)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(x, t, context)
    counts = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    expected = breakdown.flops(cfg, model.token_grid(x), batch, context.shape[1])
    assert counts.get("aten.addmm", 0) + counts.get("aten.mm", 0) == expected["gemm"]
    assert counts["aten.bmm"] == expected["attention"]


def test_kernel_names_fall_in_their_groups():
    classify = _breakdown().classify
    assert classify("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7_64x128x128") == "attention"
    assert classify("kernel_cutlass_kernel_flash_attncuteflash_fwd_sm90FlashAttentionForwardSm90") == "attention"
    assert classify("[attention] void at::native::unrolled_elementwise_kernel") == "attention"
    assert classify("nvjet_tst_256x128_64x4_2x1_v_bz_coopA_TNN") == "gemm"
    assert classify("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64") == "gemm"
    assert classify("triton_red_fused__to_copy_add_mul_native_layer_norm_0") == "elementwise"
    assert classify("triton_poi_fused__scaled_dot_product_cudnn_attention_1") == "elementwise"
    assert classify("void at::native::elementwise_kernel<128, 4>") == "elementwise"
    assert classify("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32") == "other"
    assert classify("Memset (Device)") == "other"
