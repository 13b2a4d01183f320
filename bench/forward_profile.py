"""Kernel tables of one model call on the two paths the product uses, to find where a step's time goes.

    python3 bench/forward_profile.py --models 1.3B --out results

``direct``: our model built in the bench (random weights, bf16, fused projections) called on a bf16 batch of 2,
as ``single_gpu.py`` times it. ``session``: the same weights written to a file, loaded as the nodes load them
(``InProcessRunner``) and called through a forward session (fp32 latent in, cfg 5 = one batch-2 call).
Prints the median call time of each and writes each one's kernel table (by CUDA time) under ``--out``.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import PRESETS, SHAPES, Recorder, build_ours, make_inputs, pkg, random_state_dict, table, time_calls  # noqa: E402
from worker_forward import SIZES  # noqa: E402


def profile(fn, out: Path, name: str) -> None:
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        fn()
        torch.cuda.synchronize()
    text = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=45, max_name_column_width=110)
    (out / f"profile_{name}.txt").write_text(text)


def time_direct(model, cfg, preset: str, reps: int, out: Path) -> list[float]:
    x, t, context = make_inputs(cfg, SIZES[preset], 2, device="cuda")
    with torch.inference_mode():
        times = time_calls(lambda: model(x, t, context), warmup=1, reps=reps, device="cuda")
        profile(lambda: model(x, t, context), out, f"{preset}_direct")
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="1.3B")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", default=".")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rec = Recorder(args.out, "forward_profile")
    device = torch.device("cuda")
    rows = []
    for preset in args.models.split(","):
        cfg = pkg("wanvideo.model").WanConfig(**PRESETS[preset])
        state = random_state_dict(cfg, seed=0, device=device)
        direct = time_direct(build_ours(cfg, state, device), cfg, preset, args.reps, out)
        path = Path(tempfile.mkdtemp()) / "wan.safetensors"
        from safetensors.torch import save_file

        save_file({k: v.cpu().contiguous() for k, v in state.items()}, str(path))
        del state
        torch.cuda.empty_cache()
        runner = (
            pkg("distrifusion.in_process")
            .InProcessRunner(
                pkg("distrifusion.settings").RuntimeSpec(
                    str(path),
                    pkg("distrifusion.config").ParallelConfig(world_size=1, mode="sync"),
                    "bf16",
                    device="cuda",
                )
            )
            .start()
        )
        channels, frames, rows_, cols = SHAPES[SIZES[preset]]
        generator = torch.Generator().manual_seed(1)
        job = pkg("distrifusion.job").GenerationJob(
            positive=torch.randn(1, 24, 4096, generator=generator),
            negative=torch.randn(1, 12, 4096, generator=generator),
            width=cols * 8,
            height=rows_ * 8,
            length=(frames - 1) * 4 + 1,
            steps=args.reps + 2,
            cfg=5.0,
        )
        latent = torch.randn(1, channels, frames, rows_, cols, generator=generator)
        session = []
        with torch.inference_mode(), runner.forward_session(job) as call:
            for index in range(args.reps + 1):
                torch.cuda.synchronize()
                began = time.perf_counter()
                if index == args.reps:
                    profile(functools.partial(call, latent, 500.0), out, f"{preset}_session")
                else:
                    call(latent, 900.0 - index)
                torch.cuda.synchronize()
                session.append(time.perf_counter() - began)
        runner.close()
        rows.append([preset, statistics.median(direct), statistics.median(session[1:-1])])
    rec.say(table(["model", "direct bf16 batch 2 s", "session s"], rows))
    rec.save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
