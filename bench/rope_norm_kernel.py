"""The q/k RMSNorm + RoPE kernel of one compiled block, alone: how fast each way of writing RoPE compiles.

    python bench/rope_norm_kernel.py --out $OUT          # 1.3B 480p x81, batch 2 (one ComfyUI cfg step), GPU
    python bench/rope_norm_kernel.py --cpu --out /tmp/r  # the tiny preset on the CPU (a check of the script)

Inside ComfyUI (``comfyui_native.py --profile``) the kernel inductor made of ``WanSelfAttention.project``'s
norm + RoPE (the ``stack`` form) took 0.86 ms per block at 1.3B batch 2, moving ~0.4 GB: about 0.5 TB/s of the
H200's ~4.8. This compiles ``WanBlock.before_attention`` of one 1.3B block with each ``--variants`` form of
``apply_rope`` patched in, times the call (CUDA-event median), sums its kernels (profiler), compares q/k with the
first variant's (relative error) and writes inductor's generated code per variant:

- ``model``: ``wanvideo.model.apply_rope`` as it is (traced: ``x * cos + flip_pairs(x) * (sign * sin)``, cos/sin
  widened to the head dim: every load unconditional);
- ``stack``: the form before it, real/imag pairs rotated and re-interleaved by ``stack``;
- ``swap``: as ``model``, the partner made by ``stack`` and the signed sin by ``stack`` too;
- ``halves``: the rotation written on the pairs' two views, each output half assigned by ``cat`` of the last dim;
- ``matrix``: ComfyUI's form, a 2x2 rotation per pair applied by broadcasting (table built in the graph);
  ``matrix-pre``: the same table made once outside the compiled graph;
- ``no-rope``: the norm alone (a lower bound, not the same math).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402
import kernel_breakdown as KB  # noqa: E402

wan_model = C.pkg("wanvideo.model")


def _rope_swap(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    xf = x.float()
    pairs = xf.unflatten(-1, (-1, 2))
    swapped = torch.stack([pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
    cos_wide = cos.repeat_interleave(2, dim=-1)[None, :, None, :]
    sin_signed = torch.stack([-sin, sin], dim=-1).flatten(-2)[None, :, None, :]
    return (xf * cos_wide + swapped * sin_signed).type_as(x)


def _rope_halves(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    pairs = x.float().unflatten(-1, (-1, 2))
    real, imag = pairs[..., 0:1], pairs[..., 1:2]
    cos, sin = cos[None, :, None, :, None], sin[None, :, None, :, None]
    return torch.cat([real * cos - imag * sin, real * sin + imag * cos], dim=-1).flatten(-2).type_as(x)


def _rope_stack(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    pairs = x.float().unflatten(-1, (-1, 2))
    real, imag = pairs[..., 0], pairs[..., 1]
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    return torch.stack([real * cos - imag * sin, real * sin + imag * cos], dim=-1).flatten(-2).type_as(x)


def _rope_matrix(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    pairs = x.float().unflatten(-1, (-1, 1, 2))
    rotation = torch.stack([cos, -sin, sin, cos], dim=-1).unflatten(-1, (2, 2))[None, :, None]
    return (rotation[..., 0] * pairs[..., 0] + rotation[..., 1] * pairs[..., 1]).flatten(-2).type_as(x)


_TABLES: dict = {}


def _rope_matrix_pre(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    pairs = x.float().unflatten(-1, (-1, 1, 2))
    rotation = _TABLES["matrix"][None, :, None]
    return (rotation[..., 0] * pairs[..., 0] + rotation[..., 1] * pairs[..., 1]).flatten(-2).type_as(x)


def _no_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    return x


VARIANTS = {
    "model": wan_model.apply_rope,
    "stack": _rope_stack,
    "swap": _rope_swap,
    "halves": _rope_halves,
    "matrix": _rope_matrix,
    "matrix-pre": _rope_matrix_pre,
    "no-rope": _no_rope,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--shape", default="480p81", choices=C.SHAPES, help="latent shape (its tokens: the grid)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--cpu", action="store_true", help="the tiny preset and shape on the CPU")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    device = torch.device("cpu" if args.cpu else "cuda")
    config = C.wan_config("tiny" if args.cpu else "1.3B")
    latent_grid = C.SHAPES["tiny" if args.cpu else args.shape][1:]
    grid = tuple(size // patch for size, patch in zip(latent_grid, config.patch_size))
    dtype = torch.float32 if args.cpu else torch.bfloat16
    torch.manual_seed(0)
    block = wan_model.WanBlock(config).to(device, dtype)
    block.self_attn.fuse_projections()
    tokens = grid[0] * grid[1] * grid[2]
    x = torch.randn(args.batch, tokens, config.dim, device=device, dtype=dtype)
    time_modulation = torch.randn(args.batch, 1, 6, config.dim, device=device)
    rope = wan_model.rope_frequencies(config.head_dim, grid, device)
    call_args = (x, time_modulation, rope, None, "tokens_first")
    cos, sin = rope
    _TABLES["matrix"] = torch.stack([cos, -sin, sin, cos], dim=-1).unflatten(-1, (2, 2))
    moved = 4 * x.numel() * x.element_size()  # q and k read from the qkv output and written back
    print(f"block dim {config.dim}, heads {config.num_heads}, tokens {tokens}, batch {args.batch}, {dtype}, {device}")

    from torch._inductor.utils import run_and_get_code

    results: dict[str, dict] = {}
    reference = None
    original = wan_model.apply_rope
    try:
        for name in args.variants.split(","):
            wan_model.apply_rope = VARIANTS[name]
            torch._dynamo.reset()
            compiled = torch.compile(block.before_attention, fullgraph=True, dynamic=False)
            with torch.no_grad():
                (q, k, _, _), codes = run_and_get_code(compiled, *call_args)
                (out / f"code_{name}.py").write_text("\n\n# ----\n\n".join(codes))
                if reference is None:
                    reference = (q, k)
                call = functools.partial(compiled, *call_args)
                times = C.time_calls(call, warmup=3, reps=args.reps, device=device)
                kernels = KB.profile_call(call, device)["kernels"]
            kernels_ms = {
                kernel: round(us / 1000, 4) for kernel, (us, _) in sorted(kernels.items(), key=lambda i: -i[1][0])
            }
            norm_ms = sum(ms for kernel, ms in kernels_ms.items() if "rms_norm" in kernel)
            results[name] = {
                "rel_error_vs_first": max(C.rel_err(a, b) for a, b in zip((q, k), reference)),
                "call_ms": round(C.median(times) * 1000, 4),
                "kernels_ms": kernels_ms,
                "norm_kernels_ms": round(norm_ms, 4),
                "norm_kernels_tb_per_s": round(moved / (norm_ms / 1000) / 1e12, 3) if norm_ms else None,
            }
            print(name, json.dumps(results[name], indent=1)[:1500], flush=True)
    finally:
        wan_model.apply_rope = original
    (out / "rope_norm_kernel.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
