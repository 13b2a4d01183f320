"""Native ComfyUI against our nodes in ONE real ComfyUI server, as a user runs them (issue: the pack inside ComfyUI).

    python3 bench/comfyui_native.py --comfyui /root/ComfyUI --models 1.3B,14B --variants default,eager,fa4-compile \
        --order native,ours --servers 2 --out results

Per model: one random checkpoint (real shapes, bf16, original key names) in ``models/diffusion_models``; one
ComfyUI server; the native graph (UNETLoader -> ModelSamplingSD3 -> KSampler, euler/simple) and ours (our
Loader with GPUs = ``--gpus`` -> our Sampler) on the same seeded conditioning, seed, size, steps and cfg.
Each graph runs cold (load + sample) and warm (sample only, another seed); times come from ComfyUI's own
prompt history. Variants of our Loader: ``default`` = its widget defaults as the server reports them
(``/object_info``: compile on, attention auto), ``eager`` = the defaults before issue 15 (compile off, attention
auto), ``fa4-compile``, ``sdpa-compile``, ``fp8`` (the defaults with fp8 weights), ``foreground`` (the
defaults, compiled at the first step instead of in a background thread while the first steps run eager),
``background`` (the defaults, background compile asked for explicitly); what each ran with (``auto``
and the compile request resolved) is read from ``/distrifusion/status`` after its prompts and logged. Each model and variant compiles into its own empty
inductor cache (``TORCHINDUCTOR_CACHE_DIR`` under ``--inductor-cache``), so its first server's cold prompt is a
first compile ever; ``--servers 2`` runs it again in a second, fresh server, whose cold prompt reads the cache the
first one wrote (a user's later ComfyUI session). A bench-only node pack (written into the base folder, never
shipped) times every model forward of both (synchronised), records the global torch settings the first forward
of each prompt sees, and with ``--profile`` writes the kernel table of one warm forward of each graph. A thread
samples the GPU's clocks, power and throttle reasons (``nvidia-smi``) per prompt. Before the servers start, the
bytecode of the compiler's and FlashAttention-4's modules is written, as pip writes it for a user
(``cache_bytecode``; ``--no-bytecode-cache`` skips it). ``--cpu --models tiny`` checks the script here without a GPU.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests" / "comfyui")]

from comfy_harness import PACK_FOLDER, REPO_ROOT, start_server, stop_server  # noqa: E402
from common import PRESETS, Recorder, pkg, random_state_dict, table  # noqa: E402

SIZES = {"1.3B": (832, 480, 81), "14B": (1280, 720, 81), "tiny": (64, 48, 5)}
TINY_NATIVE = dict(dim=256, ffn_dim=384, num_heads=2, num_layers=2, text_dim=4096)
"""ComfyUI reads the head count as dim / 128, so the CPU check's model has 2 heads of 128."""
VARIANTS = {
    "default": {},
    "eager": {"compile": False, "attention": "auto"},
    "fa4-compile": {"attention": "flash4", "compile": True},
    "sdpa-compile": {"attention": "sdpa", "compile": True},
    "fp8": {"quantization": "fp8_e4m3fn"},
    "foreground": {},
    "background": {},
}
"""Our Loader's inputs over its widget defaults; ``eager`` = the defaults before compile became one."""
VARIANT_ENVIRONMENT = {
    "foreground": {"WDF_COMPILE_IN_BACKGROUND": "0"},
    "background": {"WDF_COMPILE_IN_BACKGROUND": "1"},
}
"""The server's environment over this process's: ``foreground`` = the defaults with the blocks compiled at the first
step (the default before the background compile, ``distrifusion/rank.py``), ``background`` = the default made explicit
(the blocks compiled in a thread while the first steps run eager, ``wanvideo/block_compile.py``)."""
LOADER = "OfficialDistriFusionModelLoader"
RUNTIME_READY = re.compile(r"DistriFusion runtime ready in ([0-9.]+) s")
"""The pack's log line when its runtime has loaded the model (``nodes/runtime.py``): the load part of a cold prompt."""

HOOKS = r'''
"""Bench-only: times every Wan forward (native and the pack's) and profiles one; never shipped."""
import json, os, sys, time
import torch

LOG = os.environ["WDF_BENCH_FORWARD_LOG"]
PROFILE_DIR = os.environ.get("WDF_BENCH_PROFILE_DIR")
STATE = {"tag": "none", "calls": {}, "patched": False}


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _settings():
    b = torch.backends
    info = {
        "inference_mode": torch.is_inference_mode_enabled(), "grad": torch.is_grad_enabled(),
        "tf32_matmul": b.cuda.matmul.allow_tf32, "bf16_reduced": b.cuda.matmul.allow_bf16_reduced_precision_reduction,
        "fp16_reduced": b.cuda.matmul.allow_fp16_reduced_precision_reduction,
        "fp16_accumulation": getattr(b.cuda.matmul, "allow_fp16_accumulation", None),
        "cudnn_benchmark": b.cudnn.benchmark, "cudnn_enabled": b.cudnn.enabled,
        "deterministic": torch.are_deterministic_algorithms_enabled(), "threads": torch.get_num_threads(),
        "sdp": [b.cuda.flash_sdp_enabled(), b.cuda.mem_efficient_sdp_enabled(), b.cuda.math_sdp_enabled(),
                b.cuda.cudnn_sdp_enabled()],
        "autocast": torch.is_autocast_enabled("cuda") if torch.cuda.is_available() else None,
    }
    if torch.cuda.is_available():
        info.update(allocator=torch.cuda.get_allocator_backend(), stream=str(torch.cuda.current_stream()),
                    allocated_gib=torch.cuda.memory_allocated() / 2**30, reserved_gib=torch.cuda.memory_reserved() / 2**30,
                    blas=str(b.cuda.preferred_blas_library()))
    return info


def _wrap(cls, label):
    original = cls.forward
    if getattr(original, "_wdf_bench", False):
        return

    def forward(self, *args, **kwargs):
        key = (STATE["tag"], label)
        n = STATE["calls"][key] = STATE["calls"].get(key, 0) + 1
        record = {"tag": STATE["tag"], "model": label, "call": n,
                  "x": [list(a.shape) + [str(a.dtype)] for a in args[:1] if hasattr(a, "shape")]}
        if n == 1:
            record["settings"] = _settings()
        _sync()
        began = time.perf_counter()
        if PROFILE_DIR and n == 2 and STATE["tag"].endswith("warm"):
            acts = [torch.profiler.ProfilerActivity.CPU] + (
                [torch.profiler.ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            with torch.profiler.profile(activities=acts) as prof:
                out = original(self, *args, **kwargs)
                _sync()
            sort = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
            with open(os.path.join(PROFILE_DIR, f"profile_{STATE['tag']}_{label}.txt"), "w") as f:
                f.write(prof.key_averages().table(sort_by=sort, row_limit=40, max_name_column_width=90))
        else:
            out = original(self, *args, **kwargs)
        _sync()
        record["seconds"] = time.perf_counter() - began
        with open(LOG, "a") as f:
            f.write(json.dumps(record) + "\n")
        return out

    forward._wdf_bench = True
    cls.forward = forward


def _patch():
    for name, module in list(sys.modules.items()):
        model = getattr(module, "WanModel", None)
        if model is None or not isinstance(model, type) or not name.endswith("wan.model") and not name.endswith("wanvideo.model"):
            continue
        _wrap(model, "native" if name.startswith("comfy.") else "ours")


class BenchConditioning:
    """Seeded CONDITIONING like the wan CLIP's ([1, 512, 4096], zero padding); names the prompt for the timers."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 2**31}),
                             "tag": ("STRING", {"default": "none"})}}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "make"
    CATEGORY = "testing/bench"

    def make(self, seed, tag):
        _patch()
        STATE["tag"] = tag
        g = torch.Generator().manual_seed(seed)
        context = torch.zeros(1, 512, 4096)
        context[:, :24] = torch.randn(1, 24, 4096, generator=g)
        return ([[context, {}]],)

    @classmethod
    def IS_CHANGED(cls, seed, tag):
        return f"{seed}-{tag}"


NODE_CLASS_MAPPINGS = {"BenchConditioning": BenchConditioning}
'''


class GpuSampler:
    """``nvidia-smi`` every 0.5 s in a thread: SM clock, power, temperature, active throttle reasons."""

    FIELDS = "clocks.sm,power.draw,temperature.gpu,clocks_event_reasons.active,utilization.gpu"

    def __init__(self, enabled: bool):
        self.enabled = enabled and shutil.which("nvidia-smi") is not None
        self.samples: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        if self.enabled:
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()

    def _run(self):
        while not self._stop.wait(0.5):
            out = subprocess.run(
                ["nvidia-smi", "-i", "0", f"--query-gpu={self.FIELDS}", "--format=csv,noheader,nounits"],
                capture_output=True,
                text=True,
            ).stdout.strip()
            self.samples.append((time.time(), out))

    def summary(self, start: float, end: float) -> dict:
        rows = [s.split(", ") for t, s in self.samples if start <= t <= end and s]
        if not rows:
            return {}
        busy = [r for r in rows if len(r) == 5 and r[4].strip().isdigit() and int(r[4]) > 50] or rows
        clocks = [float(r[0]) for r in busy if r[0].replace(".", "").isdigit()]
        power = [float(r[1]) for r in busy if r[1].replace(".", "").isdigit()]
        return {
            "sm_mhz_median": statistics.median(clocks) if clocks else None,
            "power_w_median": statistics.median(power) if power else None,
            "temp_c_max": max(float(r[2]) for r in rows if r[2].isdigit())
            if any(r[2].isdigit() for r in rows)
            else None,
            "throttle_reasons": sorted({r[3] for r in busy}),
        }


def write_checkpoint(path: Path, preset: str, device: str) -> None:
    import torch
    from safetensors.torch import save_file

    shape = PRESETS[preset] if preset != "tiny" else TINY_NATIVE
    cfg = pkg("wanvideo.model").WanConfig(**shape)
    state = random_state_dict(cfg, seed=0, device=device, dtype=torch.bfloat16)
    save_file({k: v.cpu().contiguous() for k, v in state.items()}, str(path))


def loader_defaults(server) -> dict:
    """Our Loader's required widgets with their defaults, as this server's ``/object_info`` reports them."""
    required = server.get(f"/object_info/{LOADER}").json()[LOADER]["input"]["required"]
    return {name: spec[1]["default"] for name, spec in required.items() if "default" in spec[1]}


def graphs(checkpoint: str, size, steps: int, cfg: float, shift: float, gpus: int, loader: dict):
    """Native and our graph; ``loader`` = our Loader's inputs apart from the model and GPUs."""
    width, height, length = size

    def conditioning(tag):
        return {
            "pos": {"class_type": "BenchConditioning", "inputs": {"seed": 1, "tag": tag}},
            "neg": {"class_type": "BenchConditioning", "inputs": {"seed": 2, "tag": tag}},
        }

    def native(seed, tag):
        return {
            **conditioning(tag),
            "unet": {"class_type": "UNETLoader", "inputs": {"unet_name": checkpoint, "weight_dtype": "default"}},
            "ms": {"class_type": "ModelSamplingSD3", "inputs": {"model": ["unet", 0], "shift": shift}},
            "lat": {
                "class_type": "EmptyHunyuanLatentVideo",
                "inputs": {"width": width, "height": height, "length": length, "batch_size": 1},
            },
            "ks": {
                "class_type": "KSampler",
                "inputs": {
                    "model": ["ms", 0],
                    "positive": ["pos", 0],
                    "negative": ["neg", 0],
                    "latent_image": ["lat", 0],
                    "seed": seed,
                    "steps": steps,
                    "cfg": cfg,
                    "sampler_name": "euler",
                    "scheduler": "simple",
                    "denoise": 1.0,
                },
            },
            "save": {"class_type": "SaveLatent", "inputs": {"samples": ["ks", 0], "filename_prefix": f"{tag}"}},
        }

    def ours(seed, tag):
        return {
            **conditioning(tag),
            "load": {"class_type": LOADER, "inputs": {**loader, "model": checkpoint, "gpus": gpus}},
            "samp": {
                "class_type": "OfficialDistriFusionSampler",
                "inputs": {
                    "model": ["load", 0],
                    "positive": ["pos", 0],
                    "negative": ["neg", 0],
                    "steps": steps,
                    "cfg": cfg,
                    "shift": shift,
                    "seed": seed,
                    "sampler": "euler",
                    "scheduler": "simple",
                    "denoise": 1.0,
                    "width": width,
                    "height": height,
                    "length": length,
                    "sync_frequency": 0,
                },
            },
            "save": {"class_type": "SaveLatent", "inputs": {"samples": ["samp", 0], "filename_prefix": f"{tag}"}},
        }

    return {"native": native, "ours": ours}


def prompt_seconds(entry: dict) -> float:
    """Execution time from ComfyUI's own history timestamps (execution_start -> success/error)."""
    messages = {m[0]: m[1] for m in entry["status"].get("messages", [])}
    end = messages.get("execution_success", messages.get("execution_error", {})).get("timestamp", 0)
    return (end - messages.get("execution_start", {}).get("timestamp", 0)) / 1e3


def run_model(args, rec: Recorder, preset: str, variant: str, label: str) -> dict:
    """One server: native and ours (``variant``) cold and warm; ``label`` names its prompts and files."""
    from safetensors.torch import load_file

    base = Path(args.base or tempfile.mkdtemp(prefix="wdf-native-")) / preset
    for folder in ("custom_nodes", "models/diffusion_models", "input", "output", "user", "temp"):
        (base / folder).mkdir(parents=True, exist_ok=True)
    link = base / "custom_nodes" / PACK_FOLDER
    if not link.exists():
        link.symlink_to(REPO_ROOT, target_is_directory=True)
    hooks = base / "custom_nodes" / "wdf_bench_hooks"
    hooks.mkdir(exist_ok=True)
    (hooks / "__init__.py").write_text(HOOKS)
    checkpoint = f"wan_random_{preset}.safetensors"
    path = base / "models" / "diffusion_models" / checkpoint
    if not path.exists():
        began = time.monotonic()
        write_checkpoint(path, preset, "cpu" if args.cpu else "cuda")
        rec.say(
            f"[{preset}] random checkpoint written in {time.monotonic() - began:.0f} s ({path.stat().st_size / 2**30:.1f} GiB)"
        )
    log = base / f"forwards_{label}.jsonl"
    log.unlink(missing_ok=True)
    profile_dir = Path(args.out or base) / f"profiles_{preset}_{label}"
    if args.profile:
        profile_dir.mkdir(parents=True, exist_ok=True)
    os.environ["WDF_BENCH_FORWARD_LOG"] = str(log)
    if args.profile:
        os.environ["WDF_BENCH_PROFILE_DIR"] = str(profile_dir)
    results: dict = {"prompts": {}}
    # start_server passes this process's environment on to ComfyUI (and so to the workers)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = results["inductor_cache"] = str(
        Path(args.inductor_cache) / f"{preset}-{variant}"
    )
    for name in {name for environment in VARIANT_ENVIRONMENT.values() for name in environment}:
        os.environ.pop(name, None)
    os.environ.update(VARIANT_ENVIRONMENT.get(variant, {}))
    began = time.monotonic()
    server = start_server(args.python, args.comfyui, base, cpu=args.cpu, timeout=300)
    rec.say(f"[{preset} {label}] ComfyUI up in {time.monotonic() - began:.0f} s")
    try:
        # parallel_mode sync: at GPUs = 1 the same as auto; with --gpus N the exact mode, comparable with native
        loader = {**loader_defaults(server), "parallel_mode": "sync", **VARIANTS[variant]}
        results["loader"] = {name: loader[name] for name in ("attention", "compile")}
        make = graphs(checkpoint, SIZES[preset], args.steps, args.cfg, args.shift, args.gpus, loader)
        with GpuSampler(not args.cpu) as gpu:
            for name in args.order.split(","):
                for seed, phase in enumerate(phases(args.warm_prompts)):
                    tag = f"{name}-{label}-{phase}"
                    t0 = time.time()
                    prompt_id = server.queue(make[name](seed, tag))
                    entry = server.wait(prompt_id, timeout=args.limit)
                    ok = entry["status"]["status_str"] == "success"
                    seconds = prompt_seconds(entry)
                    results["prompts"][tag] = {"ok": ok, "seconds": seconds, "gpu": gpu.summary(t0, time.time())}
                    rec.say(
                        f"[{preset}] {tag}: {'ok' if ok else 'FAILED'} {seconds:.2f} s  gpu {results['prompts'][tag]['gpu']}"
                    )
                    if not ok:
                        rec.say(json.dumps(entry["status"])[:2000])
                if name == "ours":
                    runtime = server.get("/distrifusion/status").json()["runtime"]
                    results["ours_ran"] = {key: runtime.get(key) for key in ("attention_kernel", "compile")}
                    rec.say(
                        f"[{preset}] ours-{label}: Loader attention {loader['attention']}, compile {loader['compile']}"
                        f" -> ran attention {runtime.get('attention_kernel')}, compile {runtime.get('compile')}"
                    )
                if name == "native" and args.free_between:
                    server.post("/free", {"unload_models": True, "free_memory": True})
    finally:
        server_log = server.log()
        stop_server(server)
        if args.out:
            (Path(args.out) / f"comfyui_native_{preset}_{label}_server.log").write_text(server_log[-200_000:])
    ready = RUNTIME_READY.search(server_log)  # the cold prompt's: one runtime per server
    results["ours_load_s"] = float(ready.group(1)) if ready else None
    forwards = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    for tag, info in results["prompts"].items():
        calls = [f for f in forwards if f["tag"] == tag]
        info["forward_s"] = [round(f["seconds"], 4) for f in calls]
        info["forward_median_s"] = statistics.median(info["forward_s"][1:] or info["forward_s"] or [float("nan")])
        info["settings"] = next((f.get("settings") for f in calls if f.get("settings")), None)
    for phase in phases(args.warm_prompts):
        try:
            native = load_file(str(sorted((base / "output").glob(f"native-{label}-{phase}_*.latent"))[-1]))
            ours = load_file(str(sorted((base / "output").glob(f"ours-{label}-{phase}_*.latent"))[-1]))
            n, o = native["latent_tensor"].float(), ours["latent_tensor"].float()
            results[f"rel_diff_{phase}"] = ((o - n).norm() / n.norm()).item()
        except (IndexError, KeyError):
            pass
    return results


def phases(warm_prompts: int) -> list[str]:
    """Prompt phases of one graph, one seed each: ``cold``, ``warm``, then ``warm2`` ... (``--warm-prompts``)."""
    return ["cold", "warm"] + [f"warm{n}" for n in range(2, warm_prompts + 1)]


PRIMED_MODULES = ("torch._dynamo.convert_frame", "torch._inductor.compile_fx", "triton", "flash_attn.cute")
"""What our cold prompt imports beyond native ComfyUI: the compiler, FlashAttention-4 (when installed)."""


def cache_bytecode(args, rec: Recorder) -> None:
    """Let the servers' Python write and read bytecode (in ``<base>/pycache``), and write it for the compiler's and
    FlashAttention-4's modules first, as ``pip install`` does for a user's packages. The GPU machines run with
    ``PYTHONDONTWRITEBYTECODE=1`` and a torch that ships no bytecode: there every server compiled the compiler's
    Python from source (importing dynamo took 8.4 s; 5.3 s once torch's bytecode was written), which made our cold
    prompts' load 7.5-9.8 s where a user's takes about 4-6 s."""
    prefix = Path(args.base) / "pycache"
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    os.environ["PYTHONPYCACHEPREFIX"] = str(prefix)
    code = (
        "import importlib, contextlib\n"
        f"for name in {PRIMED_MODULES!r}:\n"
        "    with contextlib.suppress(ImportError):\n"
        "        importlib.import_module(name)\n"
    )
    started = time.perf_counter()
    subprocess.run([args.python, "-c", code], check=False)  # with the environment set above
    rec.say(f"bytecode written to {prefix} for {', '.join(PRIMED_MODULES)} in {time.perf_counter() - started:.0f} s")


def prompt_value(prompts: dict, label: str, tag: str, key: str = "seconds", steady: str = "warm"):
    """``prompts["ours-<label>-<steady>"][key]`` for tag ``ours-warm`` (the last warm prompt), the first warm one's
    for ``ours-warm1``, the cold one's for ``ours-cold``."""
    name, phase = tag.split("-")
    phase = {"warm": steady, "warm1": "warm"}.get(phase, phase)
    return prompts.get(f"{name}-{label}-{phase}", {}).get(key)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--comfyui", required=True, help="ComfyUI checkout (folder with main.py)")
    parser.add_argument("--python", default=sys.executable, help="python that runs ComfyUI")
    parser.add_argument("--models", default="1.3B", help="comma list of 1.3B, 14B, tiny")
    parser.add_argument("--variants", default="default", help=f"comma list of {', '.join(VARIANTS)}")
    parser.add_argument("--order", default="native,ours", help="graphs in the order they run in one server")
    parser.add_argument("--gpus", type=int, default=1)
    parser.add_argument(
        "--servers",
        type=int,
        default=1,
        help="fresh servers per variant, one after the other: from the second on, compiling reads inductor's "
        "on-disk cache the first one wrote",
    )
    parser.add_argument(
        "--inductor-cache",
        help="folder for inductor's on-disk caches, one subfolder per model and variant (default: a new temporary one)",
    )
    parser.add_argument(
        "--warm-prompts",
        type=int,
        default=1,
        help="warm prompts per graph; the table's warm columns are the last one's (a background compile may still "
        "run through the first), and the first's time is a column of its own",
    )
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--cfg", type=float, default=5.0)
    parser.add_argument("--shift", type=float, default=5.0)
    parser.add_argument("--profile", action="store_true", help="kernel table of one warm forward of each graph")
    parser.add_argument("--free-between", action="store_true", help="POST /free after the native graph")
    parser.add_argument("--base", help="base folder (checkpoints are reused from it)")
    parser.add_argument("--limit", type=float, default=900)
    parser.add_argument("--cpu", action="store_true", help="ComfyUI with --cpu (a local check of this script)")
    parser.add_argument(
        "--no-bytecode-cache",
        action="store_true",
        help="run the servers' Python as the machine sets it (the runs before this option: no bytecode on the GPU "
        "machines, so every server compiled torch's compiler from source)",
    )
    parser.add_argument("--out")
    args = parser.parse_args()
    args.base = args.base or tempfile.mkdtemp(prefix="wdf-native-")
    args.inductor_cache = args.inductor_cache or tempfile.mkdtemp(prefix="wdf-inductor-")
    rec = Recorder(args.out, "comfyui_native")
    rec.say(f"bench/comfyui_native.py {' '.join(sys.argv[1:])}")
    if not args.no_bytecode_cache:
        cache_bytecode(args, rec)
    rows = []
    for variant in args.variants.split(","):
        if variant not in VARIANTS:
            parser.error(f"--variants: {variant!r} is unknown; choose from {', '.join(VARIANTS)}")
    runs = itertools.product(args.models.split(","), args.variants.split(","), range(1, args.servers + 1))
    for preset, variant, server in runs:
        label = variant if server == 1 else f"{variant}-server{server}"
        result = run_model(args, rec, preset, variant, label)
        rec.results[f"{preset}/{label}"] = result
        rec.save()
        steady = phases(args.warm_prompts)[-1]
        get = functools.partial(prompt_value, result["prompts"], label, steady=steady)
        ran = result.get("ours_ran") or {}
        ratio = {
            phase: (get(f"ours-{phase}") / get(f"native-{phase}"))
            if get(f"ours-{phase}") and get(f"native-{phase}")
            else None
            for phase in ("cold", "warm")
        }
        outside = {  # a warm prompt's seconds outside the model calls (sampler, copies, checks, bookkeeping)
            graph: round(get(f"{graph}-warm") - sum(get(f"{graph}-warm", "forward_s")), 3)
            if get(f"{graph}-warm") and get(f"{graph}-warm", "forward_s")
            else None
            for graph in ("native", "ours")
        }
        first_forward = {  # the cold prompt's first model call: compiling (inductor, FlashAttention-4's JIT) happens here
            graph: (get(f"{graph}-cold", "forward_s") or [None])[0] for graph in ("native", "ours")
        }
        rows.append(
            [
                preset,
                label,
                f"{ran.get('attention_kernel')}, compile {ran.get('compile')}",
                get("native-cold"),
                get("native-warm"),
                get("ours-cold"),
                get("ours-warm"),
                ratio["cold"],
                ratio["warm"],
                get("native-warm", "forward_median_s"),
                get("ours-warm", "forward_median_s"),
                outside["native"],
                outside["ours"],
                first_forward["native"],
                first_forward["ours"],
                result.get("ours_load_s"),
                get("ours-warm1"),
                result.get(f"rel_diff_{steady}"),
            ]
        )
    rec.say(
        table(
            [
                "model",
                "ours",
                "ours ran",
                "native cold s",
                "native warm s",
                "ours cold s",
                "ours warm s",
                "cold ours/native",
                "warm ours/native",
                "native fwd s",
                "ours fwd s",
                "native outside s",
                "ours outside s",
                "native cold 1st fwd s",
                "ours cold 1st fwd s",
                "ours load s",
                "ours 1st warm s",
                "rel diff",
            ],
            rows,
        )
    )
    rec.save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
