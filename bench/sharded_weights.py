"""Sharded weights (FSDP2 per block, next block prefetched) against replicated weights: step time and peak memory per
rank, each rank capped at a small card's memory (``torch.cuda.set_per_process_memory_fraction``).

    python3 bench/sharded_weights.py --gpus 1 --model 1.3B            # smoke: the hooks' cost on one GPU
    python3 bench/sharded_weights.py --gpus 2 --model 14B --budget-gib 24
    python3 bench/sharded_weights.py --gpus 4 --model 14B --budget-gib 24 --mode ulysses
    python3 bench/sharded_weights.py --tiny                            # CPU check of the script (gloo, 2 ranks)

Every rank builds the same seeded random weights one block at a time (bf16, or fp8 storage with
``--quantization``), then either keeps the whole model on its GPU (replicated) or hands each block to
``sharded_weights.shard_blocks`` (FSDP2: 1/N per rank). One "step" is one ``ParallelWan`` call of the given mode at
the given shape, batch 1 (cfg 1, as the 4-step LoRAs run). A replicated model that does not fit the budget is
reported as OOM and then timed without the cap (the reference the sharded time is compared with). Prints a table,
the ratios sharded / replicated, and the memory plan's estimate of the sharded run's peak.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import SHAPES, environment, make_inputs, pkg, random_tensor, safe_env, table, wan_config  # noqa: E402

SIZES = {"1.3B": "480p81", "14B": "480p81", "tiny": "tiny"}


def build_model(cfg, device, quantization: str, on_cpu_blocks: bool):
    """Seeded random ``WanModel`` (projections fused), non-block modules on ``device``; blocks on ``device`` or, for
    sharding, on the CPU (as the product loads them)."""
    model_mod, fp8 = pkg("wanvideo.model"), pkg("wanvideo.fp8")
    with torch.device("meta"):
        model = model_mod.WanModel(cfg)
    model.requires_grad_(False)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    def fill(module, prefix: str, where) -> None:
        module.to_empty(device=where)
        with torch.no_grad():
            for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
                keep = name.endswith("modulation") or "norm" in name
                value = random_tensor(
                    prefix + name, tensor.shape, seed=0, dim=cfg.dim, device=device, dtype=torch.float32
                )
                tensor.data = value.to(where, torch.float32 if keep else dtype)

    for name, child in model.named_children():
        if name != "blocks":
            fill(child, name + ".", device)
    for index, block in enumerate(model.blocks):
        fill(block, f"blocks.{index}.", device)
        if quantization != "disabled":
            for name, linear in list(block.named_modules()):
                if type(linear) is torch.nn.Linear:
                    q = fp8.Fp8Linear(linear.in_features, linear.out_features, device="meta")
                    weight, scale = fp8.quantize_fp8(linear.weight, torch.float8_e4m3fn)
                    q.weight = torch.nn.Parameter(weight, requires_grad=False)
                    q.scale_weight, q.bias = scale, linear.bias
                    parent, _, child = name.rpartition(".")
                    setattr(block.get_submodule(parent), child, q)
        block.self_attn.fuse_projections()
        block.cross_attn.fuse_projections()
        if on_cpu_blocks:
            block.to("cpu")
    model.compute_dtype = dtype
    return model.eval()


def run_rank(rank: int, args, port: int, out_file: str) -> None:
    safe_env()
    cuda = not args.tiny
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.budget_gib * 2**30 / total), device)
    dist.init_process_group(
        "nccl" if cuda else "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=args.gpus,
        timeout=timedelta(seconds=180),  # a rank out of memory mid-collective fails the others, not hangs them
    )
    sharded_weights = pkg("distrifusion.sharded_weights")
    config_mod, parallel_mod = pkg("distrifusion.config"), pkg("distrifusion.parallel_model")
    fp8 = pkg("wanvideo.fp8")
    cfg = wan_config("tiny" if args.tiny else args.model)
    shape = SIZES["tiny" if args.tiny else args.model]
    x, t, context = make_inputs(cfg, shape, 1, device=device, dtype=torch.bfloat16 if cuda else torch.float32)
    mesh = sharded_weights.weights_mesh(device)
    rows = {}
    for weights in ("replicated", "sharded"):
        for capped in (True, False):
            if not capped and (weights == "sharded" or rows[weights]["status"] == "ok") or not cuda and not capped:
                continue
            if cuda and not capped:
                torch.cuda.set_per_process_memory_fraction(1.0, device)
            row = {"status": "ok", "budget_gib": args.budget_gib if capped and cuda else None}
            model = None
            try:
                began = time.perf_counter()
                model = build_model(cfg, device, args.quantization, on_cpu_blocks=weights == "sharded")
                if weights == "sharded":
                    sharded_weights.shard_blocks(model, device, mesh)
                fp8.enable_fp8_matmul(model)
                model.set_attention_backend(args.attention)
                row["build_s"] = time.perf_counter() - began
                row["weights_gib"] = sharded_weights.resident_weight_bytes(model) / 2**30
                if args.gpus > 1:
                    parallel = config_mod.ParallelConfig(
                        world_size=args.gpus, mode=args.mode, patch_size=16 if args.tiny else 64, warmup_steps=0
                    )
                    runner = parallel_mod.ParallelWan(model, parallel, rank, device)
                    runner.begin_job()
                else:
                    runner = model
                if cuda:
                    torch.cuda.reset_peak_memory_stats(device)
                times = []
                with torch.no_grad():
                    for call in range(args.warmup + args.steps):
                        if cuda:
                            torch.cuda.synchronize(device)
                        dist.barrier()
                        start = time.perf_counter()
                        runner(x, t, context)
                        if cuda:
                            torch.cuda.synchronize(device)
                        if call >= args.warmup:
                            times.append(time.perf_counter() - start)
                row["step_s"] = sorted(times)[len(times) // 2]
                row["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None
                if args.gpus > 1:
                    runner.close()
            except torch.OutOfMemoryError as error:
                row = {"status": "OOM", "budget_gib": row["budget_gib"], "error": str(error).splitlines()[0][:160]}
            finally:
                del model
                if cuda:
                    torch.cuda.empty_cache()
            # every rank must agree whether it ran (one OOM rank leaves the others' collectives unmatched)
            ok = torch.tensor([row["status"] == "ok"], dtype=torch.int32, device=device)
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
            if not ok.item() and row["status"] == "ok":
                row = {"status": "OOM on another rank", "budget_gib": row["budget_gib"]}
            rows[weights if capped else weights + " (no cap)"] = row
            if cuda and not capped:
                torch.cuda.set_per_process_memory_fraction(min(1.0, args.budget_gib * 2**30 / total), device)
    if rank == 0:
        memory_plan = pkg("distrifusion.memory_plan")
        precision = "bf16" if cuda else "fp32"
        parallel = config_mod.ParallelConfig(world_size=args.gpus, mode=args.mode if args.gpus > 1 else "sync")
        plan = memory_plan.plan_memory(
            cfg, parallel, (1, *SHAPES[shape]), precision, args.quantization, guidance_batch=1, weights="sharded"
        )
        Path(out_file).write_text(json.dumps({"rows": rows, "plan_sharded_total_gib": plan.total_bytes / 2**30}))
    dist.destroy_process_group()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", type=int, default=2)
    parser.add_argument("--model", default="14B", choices=("1.3B", "14B"))
    parser.add_argument("--quantization", default="disabled", choices=("disabled", "fp8_e4m3fn"))
    parser.add_argument("--mode", default="sync", choices=("sync", "ulysses", "displaced"))
    parser.add_argument("--attention", default="sdpa")
    parser.add_argument("--budget-gib", type=float, default=24.0, help="memory cap per GPU (a 24 GB card: 24)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="CPU check: tiny model, gloo, the --gpus ranks on the CPU")
    parser.add_argument("--out", default=None, help="folder for sharded_weights_<...>.json")
    args = parser.parse_args()
    if args.tiny:
        args.model, args.budget_gib = "tiny", float("inf")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    out_file = f"/tmp/sharded_weights_bench_{os.getpid()}.json"
    mp.spawn(run_rank, args=(args, port, out_file), nprocs=args.gpus, join=True)
    result = json.loads(Path(out_file).read_text())
    os.unlink(out_file)
    rows = result["rows"]
    headers = ["weights", "status", "budget GiB", "weights GiB/rank", "step s", "peak GiB", "build s"]
    lines = [
        [
            name,
            row["status"],
            row.get("budget_gib"),
            *(
                None if row.get(k) is None else f"{row[k]:.3f}"
                for k in ("weights_gib", "step_s", "peak_gib", "build_s")
            ),
        ]
        for name, row in rows.items()
    ]
    what = f"{args.model} {SIZES[args.model]} {args.quantization}, {args.gpus} rank(s), {args.mode}"
    print(f"sharded vs replicated weights: {what}")
    print(table(headers, lines))
    sharded = rows["sharded"]
    reference = rows["replicated"] if rows["replicated"]["status"] == "ok" else rows.get("replicated (no cap)", {})
    if sharded["status"] == "ok" and reference.get("status") == "ok":
        print(f"step time sharded / replicated: {sharded['step_s'] / reference['step_s']:.3f}")
        if sharded.get("peak_gib"):
            print(f"peak memory sharded / replicated: {sharded['peak_gib'] / reference['peak_gib']:.3f}")
            print(f"peak memory sharded / memory plan: {sharded['peak_gib'] / result['plan_sharded_total_gib']:.3f}")
    print(f"replicated under the {args.budget_gib:g} GiB budget: {rows['replicated']['status']}")
    if args.out:
        folder = Path(args.out)
        folder.mkdir(parents=True, exist_ok=True)
        name = f"sharded_weights_{args.model}_{args.gpus}gpu_{args.mode}_{args.quantization}.json"
        payload = {"args": vars(args), "env": environment(not args.tiny), **result}
        (folder / name).write_text(json.dumps(payload, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
