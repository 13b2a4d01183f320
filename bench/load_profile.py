"""Where a runtime's start goes: cProfile of ``InProcessRunner.start`` (one rank, this process) on a checkpoint.

    python3 bench/load_profile.py /path/to/wan.safetensors --device cuda > load_profile.txt

Prints the import and CUDA-initialisation times before the start, the start's wall time, then the profile's top
entries by cumulative time, the pack's own functions, and the top entries by own time. The profile sees the
calling thread only: imports a background thread makes (the attention kernel's, the compiler's) show as waits.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from pathlib import Path

started = time.perf_counter()
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from parallel_harness import register_package  # noqa: E402

register_package()
import torch  # noqa: E402
from wan_distrifusion.distrifusion.config import ParallelConfig  # noqa: E402
from wan_distrifusion.distrifusion.in_process import InProcessRunner  # noqa: E402
from wan_distrifusion.distrifusion.settings import RuntimeSpec  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--attention", default="auto")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args()
    print(f"imports {time.perf_counter() - started:.2f} s", flush=True)
    torch.zeros(1, device=args.device)
    print(f"device initialised {time.perf_counter() - started:.2f} s", flush=True)
    parallel = ParallelConfig(compile_blocks=not args.no_compile, attention_backend=args.attention)
    spec = RuntimeSpec(args.checkpoint, parallel, device=args.device, precision=args.precision)
    profile = cProfile.Profile()
    began = time.perf_counter()
    profile.enable()
    runner = InProcessRunner(spec).start()
    profile.disable()
    print(f"start {time.perf_counter() - began:.2f} s")
    runner.close()
    stats = pstats.Stats(profile)
    stats.sort_stats("cumulative").print_stats(args.top)
    stats.print_stats("distrifusion|wanvideo", args.top)
    stats.sort_stats("tottime").print_stats(15)
    return 0


if __name__ == "__main__":
    sys.exit(main())
