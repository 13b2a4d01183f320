#!/usr/bin/env python3
"""Headless WanVideo DistriFusion: the nodes' runtime from a shell.

    python cli.py generate --model wan2.1_t2v_1.3B.safetensors --world-size 2 --out clip.safetensors
    python cli.py worker --rank 2 --world-size 4 --master-addr 10.0.0.1 --master-port 29500 --model PATH

``generate`` runs one clip through ``distrifusion.workers`` (the code the ComfyUI nodes use) and
writes the final latent (key ``latent``, Wan model space) to a safetensors file. ``worker`` hosts
ranks of a group whose rank 0 runs on another host (its ``generate`` or ComfyUI): those ranks join
through torch.distributed's ``MASTER_ADDR``/``MASTER_PORT`` rendezvous and take their jobs from it.
Works from any working directory; the repo is imported under a fixed alias, never by folder name.
What ``generate`` reads and checks up front is in ``cli_inputs.py``, what it shows and writes in ``cli_outputs.py``.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import logging
import os
import runpy
import sys
import tempfile
import time
from pathlib import Path

REAL_DEFAULTS = {"width": 832, "height": 480, "length": 81, "steps": 30, "warmup_steps": 4}
TINY_DEFAULTS = {"width": 128, "height": 128, "length": 9, "steps": 8, "warmup_steps": 2}
"""The tiny demo runs more steps than warm-up, so its displaced mode does use the stale K/V."""


@functools.cache
def _package():
    """The repo root registered under its alias by ``distrifusion/bootstrap.py`` (run by path)."""
    return runpy.run_path(str(Path(__file__).resolve().parent / "distrifusion" / "bootstrap.py"))["entry_point"](
        __file__
    )


def _module(name: str):
    return importlib.import_module(f"{_package().__name__}.{name}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cli.py", description="WanVideo DistriFusion without ComfyUI.")
    commands = parser.add_subparsers(dest="command", required=True)

    gen = commands.add_parser(
        "generate", help="generate one clip's latent", description="Generate one clip's final latent."
    )
    gen.add_argument("--model", help="Wan DiT .safetensors (default: a tiny random model, to try the pipeline)")
    gen.add_argument("--width", type=int, help="pixels, multiple of 16 (default 832; 128 with the tiny model)")
    gen.add_argument("--height", type=int, help="pixels, multiple of 16 (default 480; 128 with the tiny model)")
    gen.add_argument("--length", type=int, help="frames, 4k+1 (default 81; 9 with the tiny model)")
    gen.add_argument("--steps", type=int, help="sampler steps (default 30; 8 with the tiny model)")
    gen.add_argument("--cfg", type=float, default=5.0, help="classifier-free guidance scale (default 5.0)")
    gen.add_argument("--shift", type=float, default=5.0, help="flow-matching sigma shift (default 5.0)")
    gen.add_argument("--seed", type=int, default=0, help="noise seed (also seeds the random context)")
    gen.add_argument("--sampler", default="unipc", help="euler, unipc or dpm++ (default unipc)")
    gen.add_argument("--scheduler", default="simple", help="sigma schedule (default simple)")
    gen.add_argument("--denoise", type=float, default=1.0, help="fraction of the schedule to run, (0, 1]")
    gen.add_argument("--latent", help="starting latent .safetensors (key 'latent', [1, 16, F, H, W]) for denoise < 1")
    gen.add_argument("--world-size", type=int, default=1, help="total ranks (default 1: in-process, no workers)")
    gen.add_argument("--local-ranks", type=int, help="ranks on this host (default: the world size)")
    gen.add_argument("--device", choices=("cpu", "cuda"), help="default cuda when available, else cpu")
    gen.add_argument("--mode", default="displaced", help="displaced, sync, ulysses or auto (default displaced)")
    gen.add_argument("--split", default="spatial", help="spatial, temporal or spatiotemporal (default spatial)")
    gen.add_argument(
        "--cfg-parallel", action="store_true", help="cond and uncond on two rank groups (needs --cfg other than 1)"
    )
    gen.add_argument(
        "--warmup-steps", type=int, help="displaced mode: synchronous steps first (default 4; 2 with the tiny model)"
    )
    gen.add_argument(
        "--easycache",
        metavar="THRESHOLD[,START,END]",
        help="ComfyUI's EasyCache: skip steps whose output barely changes (reuse threshold, e.g. 0.2; start and end "
        "percent, default 0.15,0.95); every rank skips the same steps; with -v every decision is logged",
    )
    gen.add_argument("--sync-frequency", type=int, default=0, help="displaced: every k-th step exact (0 = never)")
    gen.add_argument("--patch-size", type=int, default=64, help="partition granularity in pixels (default 64)")
    gen.add_argument("--patch-overlap", type=int, default=0, help="displaced: fresh halo in pixels (default 0)")
    gen.add_argument(
        "--attention-backend", default="auto", help="auto (FlashAttention-4 when installed), sdpa, flash4, flash3, sage"
    )
    gen.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="torch.compile the blocks around attention where a CUDA GPU has Triton (default; eager elsewhere, the "
        "ready line says which); --no-compile runs eager everywhere",
    )
    gen.add_argument("--kv-dtype", default="auto", help="stale K/V buffers: auto, bf16, fp16, fp32, fp8_e4m3fn")
    gen.add_argument("--comm-backend", default="auto", help="auto, builtin or official")
    gen.add_argument(
        "--precision", choices=("fp32", "bf16", "fp16"), help="compute dtype (default bf16 on cuda, fp32 on cpu)"
    )
    gen.add_argument("--quantization", default="disabled", help="weights: disabled, fp8_e4m3fn or fp8_e5m2")
    gen.add_argument(
        "--weights",
        default="auto",
        help="replicated (a full copy per GPU), sharded (1/N of each block per GPU, gathered around the block) or "
        "auto (sharded when a copy does not fit; default)",
    )
    gen.add_argument(
        "--offload",
        action="store_true",
        help="keep the transformer blocks in pinned host memory, streamed to the GPU ahead of use (14B on 24 GB)",
    )
    gen.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="FILE[:STRENGTH]",
        help="LoRA .safetensors merged on every rank, strength default 1.0 (repeat for a chain)",
    )
    gen.add_argument("--context", help="text context .safetensors: 'positive' [1, L, text_dim], optional 'negative'")
    gen.add_argument("--master-addr", default="127.0.0.1", help="rendezvous address other hosts reach (multi-host)")
    gen.add_argument("--master-port", type=int, help="rendezvous port (default: a free one)")
    gen.add_argument("--step-timeout", type=float, default=600.0, help="seconds without progress before giving up")
    gen.add_argument("--start-timeout", type=float, default=600.0, help="seconds for every rank to be ready")
    gen.add_argument("--out", required=True, help="output .safetensors (key 'latent')")
    gen.add_argument(
        "--decode",
        metavar="VAE_FILE",
        help="also decode with this Wan VAE (wan_2.1_vae.safetensors; wan2.2_vae.safetensors for the TI2V 5B) on the "
        "same ranks, rows split over them: "
        "PNG frames in <out>_frames/, and <out>.mp4 when ffmpeg is on PATH",
    )
    gen.add_argument("-v", "--verbose", action="store_true", help="log the runtime's steps (workers, memory plan)")

    work = commands.add_parser(
        "worker",
        help="host ranks of a group whose rank 0 runs on another host",
        description="Join a group whose rank 0 runs elsewhere (cli.py generate or ComfyUI) and serve its jobs.",
    )
    work.add_argument("--rank", type=int, required=True, help="first rank hosted here")
    work.add_argument("--local-ranks", type=int, default=1, help="ranks hosted here: rank..rank+N-1 on GPUs 0..N-1")
    work.add_argument("--world-size", type=int, required=True)
    work.add_argument("--master-addr", required=True, help="address of the host that runs rank 0")
    work.add_argument("--master-port", type=int, required=True)
    work.add_argument("--model", required=True, help="the same checkpoint as rank 0, as a path on this host")
    work.add_argument(
        "--second-model", help="Wan 2.2 A14B: the same low-noise expert as rank 0's Loader, as a path on this host"
    )
    work.add_argument("--device", choices=("cpu", "cuda"), help="default cuda when available, else cpu")
    work.add_argument("--start-timeout", type=float, default=600.0, help="seconds to wait for the controller")
    work.add_argument("--once", action="store_true", help="exit when the group ends instead of waiting for the next")
    work.add_argument("-v", "--verbose", action="store_true", help="log the runtime's steps")
    return parser


JOB_FLAGS = (
    "width",
    "height",
    "length",
    "steps",
    "cfg",
    "shift",
    "seed",
    "sampler",
    "scheduler",
    "denoise",
    "sync_frequency",
)
"""``GenerationJob`` fields, each the flag of the same name."""
PARALLEL_FLAGS = {
    "world_size": "world_size",
    "split_mode": "split",
    "patch_size": "patch_size",
    "patch_overlap": "patch_overlap",
    "mode": "mode",
    "cfg_parallel": "cfg_parallel",
    "warmup_steps": "warmup_steps",
    "kv_dtype": "kv_dtype",
    "comm_backend": "comm_backend",
    "attention_backend": "attention_backend",
    "compile_blocks": "compile",
}
"""``ParallelConfig`` field -> the flag that sets it (``--split``, ``--compile``: the short names of the CLI)."""


def generate(args: argparse.Namespace) -> int:
    import torch

    validation = _module("distrifusion.validation")
    processes = _module("distrifusion.processes")
    inputs = _module("cli_inputs")
    outputs = _module("cli_outputs")

    began = time.perf_counter()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    precision = args.precision or ("bf16" if device == "cuda" else "fp32")
    given_size = {name: getattr(args, name) for name in ("width", "height", "length")}
    defaults = REAL_DEFAULTS if args.model else TINY_DEFAULTS
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    parallel = _module("distrifusion.config").ParallelConfig(
        **{field: getattr(args, flag) for field, flag in PARALLEL_FLAGS.items()}
    )
    job = _module("distrifusion.job").GenerationJob(
        positive=torch.zeros(1, 1, 1), negative=None, **{name: getattr(args, name) for name in JOB_FLAGS}
    )
    if args.easycache:
        cache = _module("wanvideo.step_cache").EasyCacheSettings.parse(args.easycache, verbose=args.verbose)
        job = job.with_changes(step_cache=cache)
    validation.check_solver(job)  # settings first (the job checked itself): a bad flag fails before anything starts
    _module("distrifusion.settings").check_weights(args.weights, args.world_size)
    if args.latent:
        job = inputs.take_latent_size(job.with_changes(latent=inputs.load_latent(args.latent)), given_size)
    out = inputs.check_out(args.out)
    vae = inputs.load_vae(args.decode) if args.decode else None
    loras = inputs.parse_loras(args.lora)
    processes.remove_orphaned_log_dirs()  # e.g. the scratch folder of a killed `cli.py generate`

    with tempfile.TemporaryDirectory(prefix=f"{processes.LOG_DIR_PREFIX}cli-{os.getpid()}-") as scratch:
        model_path, config, job = inputs.model_and_context(args, job, Path(scratch))
        inputs.check_before_starting(args, job, parallel, config, device, precision)
        if vae is not None:
            inputs.check_vae_fits(vae, config, job, args.world_size)
        _module("wanvideo.lora").plan_loras(loras, config)  # a LoRA for another model fails here, naming it
        where = f"{args.world_size} ranks ({parallel.mode}, {parallel.split_mode} split)" if args.world_size > 1 else ""
        print(f"starting {where or 'in-process'} on {device}, {precision} ...", flush=True)
        spec = _module("distrifusion.settings").RuntimeSpec(
            str(model_path),
            parallel,
            precision=precision,
            quantization=args.quantization,
            weights=args.weights,
            device=device,
            local_ranks=args.local_ranks,
            master_addr=args.master_addr,
            master_port=args.master_port,
            step_timeout_s=args.step_timeout,
            start_timeout_s=args.start_timeout,
            loras=loras,
            offload=args.offload,
        )
        runtime = _module("distrifusion.workers").start_runtime(spec)
        try:
            started = time.perf_counter()
            kernels = runtime.status()
            print(
                f"ready in {started - began:.1f} s (attention {kernels.get('attention')}, compile "
                f"{kernels.get('compile')})",
                flush=True,
            )
            latent = outputs.sample_with_bar(runtime, job)
            sampled = time.perf_counter()
            status = runtime.status()
            pixels = outputs.decode_with_bar(runtime, vae, latent, precision) if vae is not None else None
        finally:
            runtime.close()

    outputs.save_latent(latent, out, _metadata(args, job, spec))
    if pixels is not None:
        outputs.write_video(pixels, out)
    if parallel.mode == "auto" and spec.world_size > 1 and status.get("mode_choice"):
        print(f"parallel mode auto: {status['mode_choice']['mode']} ({status['mode_choice']['reason']})")
    stats = status.get("last_job_stats") or {}
    if stats.get("mode") == "displaced":
        calls = stats.get("steps", job.steps)  # EasyCache: the computed steps
        print(outputs.displaced_share(parallel.schedule(job.sync_frequency), calls))
    print(
        f"wrote latent {list(latent.shape)} to {out}; total {time.perf_counter() - began:.1f} s "
        f"(start {started - began:.1f} s, sampling {sampled - started:.1f} s, "
        f"{(sampled - started) / max(job.steps, 1):.2f} s/step, comm {status.get('comm_backend')})"
    )
    return 0


def _metadata(args: argparse.Namespace, job, spec) -> dict:
    """The output's metadata: the model and every setting the clip was made with."""
    settings = {name: getattr(job, name) for name in JOB_FLAGS}
    settings.update(precision=spec.precision, quantization=spec.quantization, device=spec.device, offload=spec.offload)
    settings["parallel"] = spec.parallel.to_dict()
    settings["loras"] = [{"file": lora.name, "strength": lora.strength} for lora in spec.loras]
    if job.step_cache is not None:
        settings["easycache"] = job.step_cache.to_dict()
    return {"model": str(args.model or "tiny random Wan"), "settings": json.dumps(settings)}


def worker(args: argparse.Namespace) -> int:
    import torch

    workers = _module("distrifusion.workers")
    spec = _module("distrifusion.settings").RuntimeSpec(
        args.model,
        _module("distrifusion.config").ParallelConfig(world_size=args.world_size),
        device=args.device or ("cuda" if torch.cuda.is_available() else "cpu"),
        local_ranks=args.local_ranks,
        first_rank=args.rank,
        master_addr=args.master_addr,
        master_port=args.master_port,
        start_timeout_s=args.start_timeout,
        second_model_path=args.second_model,
    )
    code = workers.serve_remote_ranks(spec, once=args.once, on_event=lambda line: print(line, flush=True))
    if code:
        raise _module("wanvideo.errors").WanDistriFusionError(
            f"master address: could not join the group at {args.master_addr}:{args.master_port} (why above); "
            "start rank 0 there first (`cli.py generate` or ComfyUI), or raise --start-timeout."
        )
    return code


def main(argv: list[str] | None = None) -> int:
    """Run a command; 1 with a one-line ``error:`` message for problems a user can fix."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    errors = _module("wanvideo.errors")
    try:
        return generate(args) if args.command == "generate" else worker(args)
    except errors.WanDistriFusionError as error:
        text = str(error)
        print(f"error: {text}", file=sys.stderr)
        cancelled = getattr(_module("distrifusion.workers"), "JobCancelled", ())
        return 130 if isinstance(error, cancelled) else 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    code = main()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # everything is closed; skip the interpreter's slow teardown of torch (~2 s)
