"""Wan 2.2 on one GPU: the A14B two-expert pair (fp8 storage, 720p x 81) and the TI2V 5B (1280 x 704 x 121).

Random weights of the real shapes, built on the GPU through the loader's state-dict entry point (no files): both
experts stay resident, the first call runs the high-noise expert, the second the low-noise one, CFG batch 2 (cfg
3.5, as ComfyUI's template). The 5B runs image-to-video (first latent frame kept: per-frame timesteps), cfg 5. For
each case: seconds per call, the peak of allocated memory, and the memory plan's estimate
(``distrifusion.memory_plan.plan_memory``) for the same job on one GPU.

    python3 bench/wan22_gpu.py --out results          # ~4 min on one H200
    python3 bench/wan22_gpu.py --tiny                  # CPU check of the code path
"""

from __future__ import annotations

import argparse
import time

import torch
from common import PRESETS, Recorder, build_ours, fmt, free, pkg, random_state_dict, synchronize, table

WAN22_5B = dict(dim=3072, ffn_dim=14336, num_heads=24, num_layers=30, in_dim=48, out_dim=48, version="2.2")
TINY_5B = dict(dim=64, ffn_dim=128, num_heads=4, num_layers=2, text_dim=32, in_dim=48, out_dim=48, version="2.2")
GIB = 1024**3


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="toy models and shapes on the CPU")
    p.add_argument("--cases", default="a14b,5b", help="comma list from a14b, 5b")
    p.add_argument("--calls", type=int, default=1, help="timed calls per expert (after one untimed call)")
    p.add_argument("--out", help="folder for wan22_gpu.json and wan22_gpu.log")
    return p.parse_args()


def case_a14b(args, rec: Recorder, device) -> dict:
    """Both A14B experts resident in fp8, one CFG step on each at 720p x 81."""
    wan = pkg("wanvideo.model")
    sampling = pkg("wanvideo.sampling")
    cfg = wan.WanConfig(**PRESETS["tiny" if args.tiny else "14B"])
    shape = (1, 16, 3, 8, 12) if args.tiny else (1, 16, 21, 90, 160)
    dtype = torch.float32 if args.tiny else torch.bfloat16
    experts = []
    for seed in (0, 1):
        sd = random_state_dict(cfg, seed=seed, device=device, dtype=dtype)
        experts.append(build_ours(cfg, sd, device, dtype=dtype, quantization="fp8_e4m3fn"))
        del sd
        free()
    return run_case(
        args,
        rec,
        device,
        cfg,
        experts,
        shape,
        cfg_scale=3.5,
        quantization="fp8_e4m3fn",
        dtype=dtype,
        sampling=sampling,
        name="Wan 2.2 A14B, two experts, fp8, 720p x 81" if not args.tiny else "tiny pair",
    )


def case_5b(args, rec: Recorder, device) -> dict:
    """TI2V 5B image-to-video at 1280 x 704 x 121: the first latent frame kept (timestep 0)."""
    wan = pkg("wanvideo.model")
    sampling = pkg("wanvideo.sampling")
    cfg = wan.WanConfig(**(TINY_5B if args.tiny else {**WAN22_5B, "text_dim": 4096}))
    shape = (1, 48, 3, 4, 6) if args.tiny else (1, 48, 31, 44, 80)
    dtype = torch.float32 if args.tiny else torch.bfloat16
    sd = random_state_dict(cfg, seed=2, device=device, dtype=dtype)
    model = build_ours(cfg, sd, device, dtype=dtype)
    del sd
    free()
    mask = torch.ones(1, 48, *shape[2:])
    mask[:, :, 0] = 0.0
    return run_case(
        args,
        rec,
        device,
        cfg,
        [model],
        shape,
        cfg_scale=5.0,
        quantization="disabled",
        dtype=dtype,
        sampling=sampling,
        name="Wan 2.2 TI2V 5B, bf16, 1280x704x121" if not args.tiny else "tiny 5B",
        denoise_mask=mask,
    )


def run_case(
    args, rec, device, cfg, models, shape, *, cfg_scale, quantization, dtype, sampling, name, denoise_mask=None
) -> dict:
    memory_plan = pkg("distrifusion.memory_plan")
    config = pkg("distrifusion.config")
    gen = torch.Generator("cpu").manual_seed(0)
    text_len = 16 if args.tiny else 512
    positive = torch.randn(1, text_len, cfg.text_dim, generator=gen)
    negative = torch.randn(1, text_len, cfg.text_dim, generator=gen)
    x = torch.randn(shape, generator=gen).to(device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    weights = sum(t.numel() * t.element_size() for m in models for t in list(m.parameters()) + list(m.buffers()))
    seconds = []
    for expert, model in enumerate(models):
        flow = sampling.GuidedFlow(
            model,
            positive,
            negative,
            cfg=cfg_scale,
            batch=1,
            text_len=text_len,
            device=device,
            denoise_mask=denoise_mask,
        )
        t = 990.0 if expert == 0 else 500.0
        with torch.no_grad():
            for call in range(args.calls + 1):
                synchronize(device)
                start = time.perf_counter()
                v = flow(x, t)
                synchronize(device)
                if call:
                    seconds.append(time.perf_counter() - start)
        x = x - 0.05 * v  # an Euler-like update between the experts, as the sampler makes
    peak = torch.cuda.max_memory_allocated(device) if cuda else None
    plan = memory_plan.plan_memory(
        cfg,
        config.ParallelConfig(),
        shape,
        "fp32" if args.tiny else "bf16",
        quantization,
        None,
        guidance_batch=2,
        check=False,
        models=len(models),
    )
    row = {
        "case": name,
        "seconds_per_call": sum(seconds) / len(seconds),
        "weights_gib": weights / GIB,
        "peak_gib": None if peak is None else peak / GIB,
        "plan_gib": plan.total_bytes / GIB,
        "plan": plan.summary(),
        "finite": bool(torch.isfinite(v).all()),
    }
    rec.say(
        f"{name}: {fmt(row['seconds_per_call'])} s per call, weights {fmt(row['weights_gib'], '.2f')} GiB, "
        f"peak {fmt(row['peak_gib'], '.2f')} GiB, plan {fmt(row['plan_gib'], '.2f')} GiB "
        f"(peak / plan {fmt(None if peak is None else peak / plan.total_bytes, '.3f')}); plan: {plan.summary()}"
    )
    return row


def main() -> None:
    args = parse_args()
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    rec = Recorder(args.out, "wan22_gpu")
    rows = []
    for case in args.cases.split(","):
        rows.append({"a14b": case_a14b, "5b": case_5b}[case](args, rec, device))
    rec.results["cases"] = rows
    rec.say(
        table(
            ["case", "s/call", "weights GiB", "peak GiB", "plan GiB"],
            [
                [
                    r["case"],
                    fmt(r["seconds_per_call"]),
                    fmt(r["weights_gib"], ".2f"),
                    fmt(r["peak_gib"], ".2f"),
                    fmt(r["plan_gib"], ".2f"),
                ]
                for r in rows
            ],
        )
    )
    if not all(r["finite"] for r in rows):
        raise SystemExit("non-finite output")
    rec.save()


if __name__ == "__main__":
    main()
