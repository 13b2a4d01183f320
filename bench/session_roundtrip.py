"""Per-call round trip of the forward session: what one model call costs beyond the ranks' own compute.

A worker group of ``--world-size`` CPU ranks (gloo) serves a tiny random Wan; the controller calls the session
``--calls`` times. Each call's round trip is the controller's wall time of ``session(x, t)`` minus the ranks'
time for it (``ProgressEvent.seconds_per_step``: rank 0's model call and the per-call memory table). The latent
is sent to rank 0 and broadcast, so the cost grows with its size: ``--sizes`` gives ``WxHxL`` clips.

    python bench/session_roundtrip.py --world-size 2 --calls 40 --sizes 64x48x5,832x480x9
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
from common import pkg  # noqa: E402

STEP_S_1_3B_480P_N2 = 0.279
"""The README's 1.3B 480p x 81 displaced step at N = 2 (2x H200, NVLink)."""


def tiny_checkpoint(folder: Path) -> Path:
    from safetensors.torch import save_file

    model_module = pkg("wanvideo.model")
    config = model_module.WanConfig(dim=64, ffn_dim=128, num_heads=4, num_layers=1, text_dim=32, freq_dim=32)
    torch.manual_seed(0)
    model = model_module.WanModel(config)
    path = folder / "tiny.safetensors"
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        str(path),
        metadata={"wan_config": '{"num_heads": 4}'},
    )
    return path


def measure(runtime, size: str, calls: int) -> dict:
    width, height, length = (int(n) for n in size.split("x"))
    generator = torch.Generator().manual_seed(0)
    job = pkg("distrifusion.job").GenerationJob(
        positive=torch.randn(1, 8, 32, generator=generator),
        negative=torch.randn(1, 8, 32, generator=generator),
        width=width,
        height=height,
        length=length,
        steps=calls,
        cfg=5.0,
    )
    events = []
    walls, computes = [], []
    with runtime.forward_session(job, progress=events.append) as model:
        x = torch.randn(model.shape, generator=generator)
        for call in range(calls):
            began = time.perf_counter()
            model(x, 900.0 - call)
            walls.append(time.perf_counter() - began)
            computes.append(events[-1].seconds_per_step)
    trips = [w - c for w, c in zip(walls, computes)][3:]  # the first calls build buffers
    buffer, copies = torch.empty_like(x), []
    for _ in range(20):  # what the controller itself copies per call: x into shared memory, the flow out of it
        began = time.perf_counter()
        buffer.copy_(x)
        buffer.clone()
        copies.append(time.perf_counter() - began)
    return {
        "size": size,
        "latent_mib": x.numel() * 4 / 2**20,
        "call_ms": 1e3 * statistics.median(walls[3:]),
        "compute_ms": 1e3 * statistics.median(computes[3:]),
        "round_trip_ms": 1e3 * statistics.median(trips),
        "round_trip_p90_ms": 1e3 * sorted(trips)[int(0.9 * len(trips))],
        "copies_ms": 1e3 * statistics.median(copies),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--calls", type=int, default=40)
    parser.add_argument("--sizes", default="64x48x5,832x480x9")
    args = parser.parse_args(argv)
    start_runtime = pkg("distrifusion.workers").start_runtime
    config = pkg("distrifusion.config")
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = tiny_checkpoint(Path(folder))
        parallel = config.ParallelConfig(world_size=args.world_size, mode="sync", patch_size=16)
        runtime = start_runtime(
            pkg("distrifusion.settings").RuntimeSpec(
                checkpoint, parallel=parallel, device="cpu", start_timeout_s=120, step_timeout_s=120
            )
        )
        try:
            for size in args.sizes.split(","):
                row = measure(runtime, size, args.calls)
                share = row["round_trip_ms"] / 1e3 / STEP_S_1_3B_480P_N2
                print(
                    f"world size {args.world_size}, {row['size']} ({row['latent_mib']:.2f} MiB latent): call "
                    f"{row['call_ms']:.2f} ms, ranks' compute {row['compute_ms']:.2f} ms, round trip "
                    f"{row['round_trip_ms']:.2f} ms (p90 {row['round_trip_p90_ms']:.2f}) = {100 * share:.2f}% of a "
                    f"{STEP_S_1_3B_480P_N2} s 1.3B 480p step at N = 2; of it the controller's two latent copies "
                    f"{row['copies_ms']:.2f} ms",
                    flush=True,
                )
        finally:
            runtime.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
