"""One model call through the worker path against the same call in this process (issue: speed inside ComfyUI).

    python3 bench/worker_forward.py --models 1.3B --calls 6 --out results

Per model: one random checkpoint (real shapes, bf16) on disk; a forward session of the same job (cfg 5, so one
batch-2 call per step) through the in-process runner (what GPUs = 1 runs in ComfyUI's process) and through a
worker group of ONE worker process (the path GPUs >= 2 take, at world size 1 so the work is the same). Each
call is timed by the controller (round trip: latent in, flow back on the CPU) and by the rank (its forward).
``--cpu --models tiny`` checks the script without a GPU.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import PRESETS, SHAPES, Recorder, pkg, random_state_dict, safe_env, table  # noqa: E402

SIZES = {"1.3B": "480p81", "14B": "720p81", "tiny": "tiny"}


def write_checkpoint(path: Path, preset: str, device: str) -> None:
    from safetensors.torch import save_file

    shape = {**PRESETS[preset], "text_dim": 4096}
    if preset == "tiny":  # heads are read as dim / 128 from a file without metadata
        shape.update(dim=256, ffn_dim=384, num_heads=2)
    cfg = pkg("wanvideo.model").WanConfig(**shape)
    state = random_state_dict(cfg, seed=0, device=device, dtype=torch.bfloat16)
    save_file({k: v.cpu().contiguous() for k, v in state.items()}, str(path))


def time_session(runtime, job, calls: int, shape) -> tuple[list[float], list[float]]:
    """(controller round trip per call, rank's own seconds per call) of ``calls`` calls of one session."""
    rank_seconds: list[float] = []
    round_trips: list[float] = []
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=generator)
    with runtime.forward_session(job, progress=lambda event: rank_seconds.append(event.seconds_per_step)) as model:
        for index in range(calls):
            began = time.perf_counter()
            model(x, 1000.0 * (1 - index / calls))
            round_trips.append(time.perf_counter() - began)
    return round_trips, rank_seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="1.3B")
    parser.add_argument("--calls", type=int, default=6)
    parser.add_argument("--attention", default="sdpa")
    parser.add_argument("--cpu", action="store_true")
    parser.add_argument("--out")
    args = parser.parse_args()
    safe_env()
    device = "cpu" if args.cpu else "cuda"
    config = pkg("distrifusion.config")
    job_module = pkg("distrifusion.job")
    workers = pkg("distrifusion.workers")
    in_process = pkg("distrifusion.in_process")
    rec = Recorder(args.out, "worker_forward")
    rec.say(f"bench/worker_forward.py {' '.join(sys.argv[1:])}")
    rows = []
    for preset in args.models.split(","):
        path = Path(tempfile.mkdtemp(prefix="wdf-fwd-")) / f"wan_random_{preset}.safetensors"
        write_checkpoint(path, preset, device)
        channels, frames, rows_, cols = SHAPES[SIZES[preset]]
        shape = (1, channels, frames, rows_, cols)
        generator = torch.Generator().manual_seed(1)
        job = job_module.GenerationJob(
            positive=torch.randn(1, 24, 4096, generator=generator),
            negative=torch.randn(1, 12, 4096, generator=generator),
            width=cols * 8,
            height=rows_ * 8,
            length=(frames - 1) * 4 + 1,
            steps=args.calls,
            cfg=5.0,
            shift=5.0,
            seed=0,
            sampler="euler",
            scheduler="simple",
        )
        parallel = config.ParallelConfig(world_size=1, mode="sync", attention_backend=args.attention)
        precision = "fp32" if args.cpu else "bf16"
        results = {}
        spec = pkg("distrifusion.settings").RuntimeSpec(str(path), parallel, precision, device=device)
        runner = in_process.InProcessRunner(spec).start()
        results["in-process"] = time_session(runner, job, args.calls, shape)
        runner.close()
        del runner
        if device == "cuda":
            torch.cuda.empty_cache()
        group = workers.WorkerGroup(spec).start()
        try:
            results["worker"] = time_session(group, job, args.calls, shape)
        finally:
            group.close()
        base = None
        for name, (round_trips, rank_seconds) in results.items():
            trip = statistics.median(round_trips[1:])
            rank = statistics.median(rank_seconds[1:])
            base = base or rank
            rows.append([preset, name, rank, rank / base, trip, trip - rank])
            rec.results[f"{preset}/{name}"] = {"round_trip_s": round_trips, "rank_s": rank_seconds}
        path.unlink()
    rec.say(table(["model", "path", "rank forward s (median)", "vs in-process", "round trip s", "overhead s"], rows))
    rec.save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
