"""LoRA switch time on a 14B-shaped Wan (random bf16 weights on disk) with a rank-64 LoRA in the lightx2v layout
(up/down + alpha on every block Linear, diff_b on their biases, diff on the norms), on one GPU.

    python bench/lora_switch.py [--preset 14B] [--rank 64] [--folder /tmp/lora_bench] [--out DIR]

Times: the first merge after loading, a strength change (re-merge from the unmodified weights read again from
the checkpoint), removing the chain, and the same strength change with the checkpoint's pages dropped from the
page cache (a cold read); bf16 and fp8_e4m3fn weights; the GPU memory a merge adds at its peak.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402


def write_model(config, path: Path, device: str) -> None:
    model_module = C.pkg("wanvideo.model")
    with torch.device("meta"):
        shapes = {name: tuple(t.shape) for name, t in model_module.WanModel(config).state_dict().items()}
    generator = torch.Generator(device).manual_seed(0)
    tensors = {}
    for name, shape in shapes.items():
        std = 0.02 if len(shape) >= 2 else 0.1
        value = torch.randn(shape, generator=generator, device=device) * std
        if "norm" in name and name.endswith("weight"):
            value += 1
        tensors[name] = value.to(torch.bfloat16).cpu()
    save_file(tensors, str(path), metadata={"wan_config": json.dumps({"num_heads": config.num_heads})})


def write_lora(config, path: Path, rank: int, device: str) -> int:
    model_module = C.pkg("wanvideo.model")
    with torch.device("meta"):
        shapes = {name: tuple(t.shape) for name, t in model_module.WanModel(config).state_dict().items()}
    generator = torch.Generator(device).manual_seed(1)
    tensors = {}
    for name, shape in shapes.items():
        if not name.startswith("blocks."):
            continue
        base = name.rsplit(".", 1)[0]
        if name.endswith(".weight") and len(shape) == 2:
            tensors[f"diffusion_model.{base}.lora_up.weight"] = (
                torch.randn(shape[0], rank, generator=generator, device=device).mul(0.01).bfloat16().cpu()
            )
            tensors[f"diffusion_model.{base}.lora_down.weight"] = (
                torch.randn(rank, shape[1], generator=generator, device=device).mul(0.01).bfloat16().cpu()
            )
            tensors[f"diffusion_model.{base}.alpha"] = torch.tensor(float(rank))
        elif name.endswith(".bias"):
            tensors[f"diffusion_model.{base}.diff_b"] = (
                torch.randn(shape, generator=generator, device=device).mul(1e-3).bfloat16().cpu()
            )
        elif "norm" in name:
            tensors[f"diffusion_model.{base}.diff"] = (
                torch.randn(shape, generator=generator, device=device).mul(1e-3).bfloat16().cpu()
            )
    save_file(tensors, str(path))
    return sum(t.numel() * t.element_size() for t in tensors.values())


def drop_page_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="14B")
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--folder", default="/tmp/lora_bench")
    parser.add_argument("--out", default=None)
    parser.add_argument("--quantizations", default="disabled,fp8_e4m3fn")
    parser.add_argument("--layers", type=int, default=None, help="fewer blocks than the preset (time scales with them)")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    loading, lora = C.pkg("wanvideo.loading"), C.pkg("wanvideo.lora")
    config = C.wan_config(args.preset)
    if args.layers:
        config = dataclasses.replace(config, num_layers=args.layers)
    folder = Path(args.folder)
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"{args.preset}_{config.num_layers}layers"
    checkpoint, lora_path = folder / f"wan_{stem}.safetensors", folder / f"lora_{stem}_r{args.rank}.safetensors"
    began = time.perf_counter()
    if not checkpoint.exists():
        write_model(config, checkpoint, device)
    lora_bytes = write_lora(config, lora_path, args.rank, device)
    print(f"files written in {time.perf_counter() - began:.1f} s; LoRA {lora_bytes / 2**20:.0f} MiB", flush=True)
    results = {
        "preset": args.preset,
        "rank": args.rank,
        "lora_mib": lora_bytes / 2**20,
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
    }
    for quantization in args.quantizations.split(","):
        began = time.perf_counter()
        model = loading.load_wan_model(checkpoint, dtype="bf16", quantization=quantization, device=device)
        model.fuse_projections()
        load_s = time.perf_counter() - began
        row = {"load_s": load_s}
        base = torch.cuda.memory_allocated() if device == "cuda" else 0
        for label, chain, cold in (
            ("first merge", [lora.LoraFile(str(lora_path), 1.0)], False),
            ("strength change", [lora.LoraFile(str(lora_path), 0.5)], False),
            ("remove", [], False),
            ("strength change, cold page cache", [lora.LoraFile(str(lora_path), 0.8)], True),
        ):
            if cold:
                drop_page_cache(checkpoint)
                drop_page_cache(lora_path)
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            summary = lora.apply_loras(model, checkpoint, chain)
            peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if device == "cuda" else 0
            row[label] = {
                "seconds": round(summary["seconds"], 3),
                "tensors": summary["tensors"],
                "peak_extra_mib": round(peak),
            }
            print(
                f"{args.preset} {quantization}: {label}: {summary['seconds']:.2f} s, {summary['tensors']} tensors, peak +{peak:.0f} MiB",
                flush=True,
            )
        results[quantization] = row
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
    print(json.dumps(results, indent=1))
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / f"lora_switch_{args.preset}.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
