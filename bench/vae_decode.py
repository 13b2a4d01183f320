"""The Wan 2.1 VAE decode on one GPU: ours vs diffusers' ``AutoencoderKLWan`` (the peer) with the same random
weights, time and peak memory, ratios in one run; then one rank's share of the split decode (our decoder on the
largest slab of rows for N = 2, 4, 8, the halos as zeros: the same shapes and memory as a rank of the split)
against the memory plan. One command:

    python bench/vae_decode.py --out $OUT          # 832x480x81 and 1280x720x81, bf16, on cuda
    python bench/vae_decode.py --tiny              # CPU check of every code path at toy size (no timings worth reading)
    python bench/vae_decode.py --meta              # no GPU: both decoders' peak live tensors, counted on ``meta``

diffusers' weights are drawn at random (seeded) in its own layout and renamed to the Wan checkpoint's names for
ours (``to_wan_names``); outputs must agree to bf16 round-off (relative error < --tol) after diffusers' clamp.
Peak memory is ``torch.cuda.max_memory_allocated`` over the decode (weights included), the frames left on the GPU
for both (diffusers returns them there).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402

SIZES = {"832x480x81": (16, 21, 60, 104), "1280x720x81": (16, 21, 90, 160), "tiny": (16, 3, 6, 5)}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="CPU, base width 8, latent 3x6x5")
    p.add_argument(
        "--meta",
        action="store_true",
        help="no GPU: peak live tensor bytes of both decoders at --sizes, counted on the meta device (bf16)",
    )
    p.add_argument("--sizes", nargs="*", default=["832x480x81", "1280x720x81"], choices=list(SIZES))
    p.add_argument("--shares", nargs="*", type=int, default=[2, 4, 8], help="world sizes of the slab shares")
    p.add_argument("--reps", type=int, default=2, help="timed decodes per model (after one warm-up)")
    p.add_argument("--tol", type=float, default=2e-2, help="bf16 agreement of ours vs diffusers")
    p.add_argument("--out", type=Path, help="folder for vae_decode.json")
    return p.parse_args(argv)


def to_wan_names(diffusers_sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers' ``AutoencoderKLWan`` decoder names -> the Wan checkpoint's (``wan_2.1_vae.safetensors``)."""
    out = {}
    resnet = {"norm1": "residual.0", "conv1": "residual.2", "norm2": "residual.3", "conv2": "residual.6"}
    for name, tensor in diffusers_sd.items():
        if name.startswith("post_quant_conv."):
            out["conv2." + name.split(".", 1)[1]] = tensor
            continue
        if not name.startswith("decoder."):
            continue
        key = name
        if ".resnets." in key:  # inside a residual block (before conv_in becomes conv1)
            key = key.replace(".conv_shortcut.", ".shortcut.")
            for old, new in resnet.items():
                key = key.replace(f".{old}.", f".{new}.")
        key = key.replace("decoder.conv_in.", "decoder.conv1.").replace("decoder.conv_out.", "decoder.head.2.")
        key = key.replace("decoder.norm_out.", "decoder.head.0.")
        key = key.replace("mid_block.resnets.0.", "middle.0.").replace("mid_block.attentions.0.", "middle.1.")
        key = key.replace("mid_block.resnets.1.", "middle.2.")
        match = re.match(r"decoder\.up_blocks\.(\d+)\.(resnets|upsamplers)\.(\d+)\.(.*)", key)
        if match:
            block, kind, index, rest = int(match[1]), match[2], int(match[3]), match[4]
            position = 4 * block + (index if kind == "resnets" else 3)
            key = f"decoder.upsamples.{position}.{rest}"
        out[key] = tensor
    return out


def build_models(dim: int, device, dtype):
    from diffusers import AutoencoderKLWan

    vae = pkg_vae()
    peer = AutoencoderKLWan(base_dim=dim, z_dim=16).eval().requires_grad_(False)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in peer.named_parameters():
            if "gamma" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            elif p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) / p[0].numel() ** 0.5)
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    ours = vae.load_vae_decoder(to_wan_names(peer.state_dict()), dtype, device)
    peer.encoder = None  # only the decoder is measured: the encoder's weights would count in the peer's peak
    return ours, peer.to(device, dtype)


def pkg_vae():
    return C.pkg("wanvideo.vae")


def measure(fn, device, reps: int) -> tuple[float, float, torch.Tensor]:
    """(median seconds, peak GiB over one decode, the output)."""
    out = fn()  # warm-up (cuDNN algorithm choice)
    del out
    C.free()
    C.reset_peak(device)
    times = []
    for _ in range(reps):
        C.synchronize(device)
        began = time.perf_counter()
        out = fn()
        C.synchronize(device)
        times.append(time.perf_counter() - began)
    return C.median(times), C.peak_memory_gib(device), out


def meta_peaks(size: str) -> tuple[float, float]:
    """(ours, diffusers) GiB of live tensors at the peak of a bf16 decode of ``size`` with the frames kept on the
    device (as diffusers returns them), weights not counted; the ``meta`` device does no arithmetic."""
    from diffusers import AutoencoderKLWan

    vae, vae_memory_plan = pkg_vae(), C.pkg("distrifusion.vae_memory_plan")
    with torch.device("meta"):
        peer = AutoencoderKLWan(base_dim=96, z_dim=16).to(torch.bfloat16).eval()
        peer.encoder = None
        ours = vae.WanVAEDecoder(vae.WanVAEConfig()).to(torch.bfloat16).eval()
        z = torch.empty(1, *SIZES[size], dtype=torch.bfloat16)
    peaks = []
    with torch.no_grad():
        for decode in (ours.decode, lambda z: peer.decode(z).sample):
            with vae_memory_plan.live_bytes() as live:
                out = decode(z)
            del out
            peaks.append(live.peak / 2**30)
    return peaks[0], peaks[1]


def main(argv=None) -> int:
    args = parse_args(argv)
    C.safe_env()
    if args.meta:
        rows = []
        for size in args.sizes:
            ours, theirs = meta_peaks(size)
            rows.append([size, C.fmt(ours, ".2f"), C.fmt(theirs, ".2f"), C.fmt(ours / theirs, ".2f")])
        print(C.table(["size", "ours GiB", "diffusers GiB", "ratio"], rows))
        return 0
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    dim = 8 if args.tiny else 96
    sizes = ["tiny"] if args.tiny else args.sizes
    vae_memory_plan = C.pkg("distrifusion.vae_memory_plan")
    ours, peer = build_models(dim, device, dtype)
    results, rows = {"environment": C.environment(cuda=device.type == "cuda"), "sizes": {}}, []
    for size in sizes:
        c, f, h, w = SIZES[size]
        z = torch.randn(1, c, f, h, w, generator=torch.Generator().manual_seed(1)).to(device, dtype)
        with torch.no_grad():
            theirs_s, theirs_gib, theirs = measure(lambda z=z: peer.decode(z).sample, device, args.reps)
            theirs = theirs.float().cpu()
            C.free()
            ours_s, ours_gib, mine = measure(lambda z=z: ours.decode(z).clamp(-1.0, 1.0), device, args.reps)
            error = C.rel_err(mine.float().cpu(), theirs)
            del mine
            C.free()
            entry = {
                "ours_s": ours_s,
                "diffusers_s": theirs_s,
                "ours_peak_gib": ours_gib,
                "diffusers_peak_gib": theirs_gib,
                "time_ratio": ours_s / theirs_s,
                "memory_ratio": ours_gib / theirs_gib if theirs_gib else None,
                "rel_err": error,
                "shares": {},
            }
            rows.append([size, "1 (whole)", C.fmt(ours_s), C.fmt(theirs_s), C.fmt(ours_gib), C.fmt(theirs_gib)])
            for n in args.shares:
                rows_n = vae_split_rows(h, n)[0]
                slab = z[..., :rows_n, :]
                share_s, share_gib, out = measure(lambda slab=slab: ours.decode(slab), device, 1)
                del out
                C.free()
                plan = vae_memory_plan.plan_vae_decode(
                    (1, c, f, h, w), n, "fp32" if dtype == torch.float32 else "bf16", dim
                )
                entry["shares"][n] = {"seconds": share_s, "peak_gib": share_gib, "plan_gib": plan.total_bytes / 2**30}
                rows.append(
                    [
                        size,
                        f"share of {n}",
                        C.fmt(share_s),
                        "",
                        C.fmt(share_gib),
                        f"plan {plan.total_bytes / 2**30:.2f}",
                    ]
                )
        results["sizes"][size] = entry
        print(f"{size}: ours vs diffusers relative error {error:.2e} (tol {args.tol})", flush=True)
        if error > args.tol:
            print(json.dumps(results, indent=1))
            raise SystemExit(f"{size}: our decode differs from diffusers' by {error:.2e} > {args.tol}")
    print(C.table(["size", "decode", "ours s", "diffusers s", "ours GiB", "diffusers GiB"], rows))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "vae_decode.json").write_text(json.dumps(results, indent=1))
    return 0


def vae_split_rows(rows: int, n: int) -> list[int]:
    return C.pkg("distrifusion.vae_split").split_rows(rows, n)


if __name__ == "__main__":
    raise SystemExit(main())
