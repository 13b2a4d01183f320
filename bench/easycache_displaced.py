"""What EasyCache does to the displaced mode's error, on CPU (gloo) with the CLI's tiny random Wan: a skipped step
refreshes no stale K/V, so the next computed step attends to K/V that are as old as the skipped steps plus one.

    python bench/easycache_displaced.py [--world-size 2] [--steps 20] [--easycache 0.3,0.1,0.9]

Runs ``cli.py generate`` six times (sync and displaced, with and without EasyCache; displaced with sync frequency 2
too) on the same seed and prints each final latent's relative error against the exact (``sync``) run with the same
EasyCache setting, plus EasyCache's own effect on the exact run. Error, not time: no GPU needed.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO_ROOT = Path(__file__).resolve().parents[1]
SKIPPED = re.compile(r"EasyCache - skipped \d+/\d+ steps \([^)]*\); skipped calls (\[[\d, ]*\])")


def generate(out: Path, args: argparse.Namespace, mode: str, cache: bool, sync_frequency: int = 0) -> tuple:
    command = [sys.executable, str(REPO_ROOT / "cli.py"), "generate", "--out", str(out), "--device", "cpu"]
    command += ["--world-size", str(args.world_size), "--mode", mode, "--steps", str(args.steps)]
    command += ["--sampler", "euler", "--shift", "3", "--warmup-steps", "2", "--sync-frequency", str(sync_frequency)]
    command += ["--width", "128", "--height", "128", "--length", "9", "--seed", "3", "--patch-size", "16"]
    if cache:
        command += ["--easycache", args.easycache]
    result = subprocess.run(command, capture_output=True, text=True, check=True, timeout=600)
    skipped = SKIPPED.search(result.stdout)
    return load_file(str(out))["latent"].double(), (skipped.group(1) if skipped else "[]")


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--easycache", default="0.3,0.1,0.9", help="THRESHOLD,START,END as cli.py takes it")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        runs = {}
        for name, mode, cache, frequency in (
            ("sync", "sync", False, 0),
            ("sync+cache", "sync", True, 0),
            ("displaced", "displaced", False, 0),
            ("displaced+cache", "displaced", True, 0),
            ("displaced/2", "displaced", False, 2),
            ("displaced/2+cache", "displaced", True, 2),
        ):
            runs[name] = generate(Path(folder) / f"{name.replace('/', '_')}.safetensors", args, mode, cache, frequency)
            print(f"{name:18s} skipped calls {runs[name][1]}", flush=True)
    print(f"\n{args.world_size} ranks, {args.steps} euler steps, 2 warm-up steps, --easycache {args.easycache}")
    print("| run | relative error vs sync (same EasyCache setting) |")
    print("| --- | --- |")
    for name, reference in (
        ("displaced", "sync"),
        ("displaced+cache", "sync+cache"),
        ("displaced/2", "sync"),
        ("displaced/2+cache", "sync+cache"),
        ("sync+cache", "sync"),
    ):
        print(f"| {name} vs {reference} | {relative_error(runs[name][0], runs[reference][0]):.2e} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
