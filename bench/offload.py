"""Blocks streamed from pinned host memory (``wanvideo/offload.py``) on a 24 GB card vs the all-resident model.

    python3 bench/offload.py --out results          # one H200: Wan 14B bf16, 1280x720x81, batch 1 (~3 min)
    python3 bench/offload.py --tiny                 # CPU: the tiny model, every code path, seconds

Builds 14B-shaped random weights on the GPU (no file), times the all-resident forward without a cap, then moves
the blocks to pinned host memory, caps this process at a 24 GB card's memory
(``torch.cuda.set_per_process_memory_fraction``: 24 GiB of the device's total) and times the offloaded forward
on the same weights and inputs. Prints both times, their ratio (target <= 1.10x), the peaks, the host->device
copy rate and whether the outputs are identical.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    Recorder,
    build_ours,
    fmt,
    free,
    make_inputs,
    median,
    peak_memory_gib,
    pkg,
    random_state_dict,
    rel_err,
    reset_peak,
    table,
    time_calls,
    wan_config,
)

GIB = 2**30
TARGET_RATIO = 1.10


def copy_rate(streamer, device, reps: int = 3) -> float:
    """GB/s of one block's host->device copy into a ring slot (what each block waits for if it is not hidden)."""
    if device.type != "cuda":
        return float("nan")
    hosts = next(iter(streamer._host.values()))
    nbytes = sum(t.numel() * t.element_size() for t in hosts)
    streamer._copy_in(hosts, 1)  # warm-up
    torch.cuda.synchronize(device)
    began = time.perf_counter()
    for _ in range(reps):
        streamer._copy_in(hosts, 1)  # on the side stream: timed by the host clock around a device sync
    torch.cuda.synchronize(device)
    return reps * nbytes / (time.perf_counter() - began) / 1e9


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="CPU, tiny model: exercise every code path")
    parser.add_argument("--preset", default="14B")
    parser.add_argument("--shape", default="720p81")
    parser.add_argument("--cap-gib", type=float, default=24.0, help="memory of the card to emulate (GiB)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.tiny:
        args.preset, args.shape, device = "tiny", "tiny", torch.device("cpu")
    else:
        device = torch.device("cuda")
    rec = Recorder(args.out, "offload")
    offload = pkg("wanvideo.offload")
    cfg = wan_config(args.preset)
    dtype = torch.bfloat16

    state = random_state_dict(cfg, seed=0, device=device, dtype=dtype)
    model = build_ours(cfg, state, device, dtype)
    del state  # its entries share the model's device tensors: they would stay on the GPU after the move
    free()
    x, t, context = make_inputs(cfg, args.shape, 1, device=device, dtype=dtype)
    outputs = {}

    def forward(name):
        def call():
            outputs[name] = model(x, t, context)

        return call

    with torch.inference_mode():
        reset_peak(device)
        resident = time_calls(forward("resident"), warmup=args.warmup, reps=args.reps, device=device)
        resident_peak = peak_memory_gib(device)
        rec.say(f"resident: {fmt(median(resident))} s per forward, peak {fmt(resident_peak, '.1f')} GiB")

    streamer = offload.stream_blocks_from_host(model, device)
    free()
    cap_note = "no cap (CPU)"
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.cap_gib * GIB / total), torch.cuda.current_device())
        cap_note = f"capped at {args.cap_gib:g} GiB of {total / GIB:.0f}"
    rate = copy_rate(streamer, device)
    with torch.inference_mode():
        reset_peak(device)
        streamed = time_calls(forward("offload"), warmup=args.warmup, reps=args.reps, device=device)
        streamed_peak = peak_memory_gib(device)
    ratio = median(streamed) / median(resident)
    identical = torch.equal(outputs["offload"], outputs["resident"])
    same = "identical" if identical else f"differ, rel err {rel_err(outputs['offload'], outputs['resident']):.2e}"
    block_gib = streamer.host_bytes / GIB
    rows = [
        ["all resident (no cap)", fmt(median(resident)), "1.00", fmt(resident_peak, ".1f"), "-"],
        [
            f"offload ({cap_note})",
            fmt(median(streamed)),
            fmt(ratio, ".3f"),
            fmt(streamed_peak, ".1f"),
            fmt(block_gib, ".1f"),
        ],
    ]
    rec.say(f"\nWan {args.preset} bf16, {args.shape}, batch 1, {len(model.blocks)} blocks, device {device}")
    rec.say(table(["forward", "seconds", "ratio", "peak GiB on the GPU", "pinned host GiB"], rows))
    rec.say(
        f"ring of {streamer.ring} blocks on the device: {streamer.device_bytes / GIB:.2f} GiB; host->device copy "
        f"{fmt(rate, '.1f')} GB/s ({streamer.host_bytes / 1e9 / rate if rate == rate else float('nan'):.2f} s of "
        "copies per forward, hidden under compute when streamed)"
    )
    rec.say(
        f"ratio {ratio:.3f}x (target <= {TARGET_RATIO:.2f}x: {'met' if ratio <= TARGET_RATIO else 'MISSED'}); "
        f"outputs {same}; "
        f"fits the cap: {'yes' if device.type != 'cuda' or streamed_peak <= args.cap_gib else 'NO'}"
    )
    rec.results.update(
        preset=args.preset,
        shape=args.shape,
        resident_s=resident,
        offload_s=streamed,
        ratio=ratio,
        resident_peak_gib=resident_peak,
        offload_peak_gib=streamed_peak,
        cap_gib=args.cap_gib if device.type == "cuda" else None,
        host_gib=block_gib,
        ring_gib=streamer.device_bytes / GIB,
        copy_gb_s=rate,
        identical=identical,
    )
    rec.save()
    return 0 if identical or rel_err(outputs["offload"], outputs["resident"]) < 1e-3 else 1


if __name__ == "__main__":
    raise SystemExit(main())
