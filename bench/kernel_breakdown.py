"""Where a forward's time goes, kernel by kernel: ours (bf16, compiled, best attention) against the compiled peer
(diffusers' ``WanTransformer3DModel``, ``compile_repeated_blocks(fullgraph=True)``, PyTorch SDPA), same weights.

    python bench/kernel_breakdown.py --out $OUT     # 1.3B 480p x81 batch 1 and 2, 14B 720p x81 batch 1 (8 of 40 layers)
    python bench/kernel_breakdown.py --variants base,old-v,gelu-epilogue,cdt,sdpa,fp8 --cases 1.3B:1
    python bench/kernel_breakdown.py --tiny         # CPU check of every code path (operators instead of kernels)

Each model is warmed up (compiled for the shape), timed (CUDA-event median of ``--reps`` calls), then one call is
profiled; its GPU kernels are summed into attention, GEMM, elementwise (RoPE, modulation, norms, GELU, residuals,
layout copies: inductor's fused triton kernels and PyTorch's own) and other (convolution, memset/memcpy, ...), and
"idle" = the call's time minus its busy kernels (launch and Python gaps). Achieved TFLOP/s of the GEMMs and the
attention use the exact FLOPs of the shapes (multiply-adds x 2) against the H200's practical limits. Ours' variants
(``--variants``, on the ``--variant-cases`` only; ``base`` always runs):

- ``base``: compiled blocks, ``auto`` attention (FlashAttention-4 when importable, else SDPA), inputs in the
  kernel's ``input_layout`` (FlashAttention-4: dense v made inside the compiled block);
- ``old-v``: the same kernel without ``input_layout`` (v copied in eager by the kernel wrapper: the code before);
- ``gelu-epilogue``: ``WanModel.set_fusions(gelu_epilogue=True)`` (FFN bias + tanh-GELU in cuBLASLt's epilogue);
- ``cdt``: inductor's ``coordinate_descent_tuning`` for the blocks' kernels (longer compile);
- ``sdpa``: ours compiled on SDPA (the peer's kernel); ``sdpa-heads-first``: the same with q/k/v made in
  ``[B, H, L, D]`` memory (SDPA's own layout) inside the compiled block; ``fp8``: fp8_e4m3fn weights.

Each variant's output is compared with ``base`` (relative error, bf16 round-off expected).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402

CATEGORIES = ("attention", "gemm", "elementwise", "other")
LIMITS_TFLOPS = {"gemm": 790.0, "attention": 700.0}  # H200 bf16: dense GEMM in practice, FlashAttention-4
CASES = {
    "1.3B:1": dict(preset="1.3B", shape="480p81", batch=1, layers=None),
    "1.3B:2": dict(preset="1.3B", shape="480p81", batch=2, layers=None),
    "14B:1": dict(preset="14B", shape="720p81", batch=1, layers=8),
    "tiny:1": dict(preset="tiny", shape="tiny_odd", batch=1, layers=None),
    "tiny:2": dict(preset="tiny", shape="tiny_odd", batch=2, layers=None),
}
VARIANTS = ("base", "old-v", "gelu-epilogue", "cdt", "mk", "sdpa", "sdpa-heads-first", "fp8", "fp8-cdt", "fp8-mk")
COMPILE_OPTIONS = {"cdt": {"coordinate_descent_tuning": True}, "mk": {"triton.multi_kernel": 1}}
"""Inductor options of the variants that only recompile: ``mk`` lets reductions up to 16384 wide (the FFN hidden
row that fp8 quantizes, 14B's 5120-wide norms) run persistent, benchmarking that against the looped kernel."""
_CONV = ("conv", "fprop", "implicit_gemm", "im2col")
_ATTENTION = ("flash", "fmha", "sdpa", "attention", "attn", "scaled_dot_product")
_GEMM = ("gemm", "nvjet", "xmma", "cublas", "matmul", "aten::mm", "aten::addmm", "aten::bmm", "aten::linear")
_GEMM += ("_scaled_mm", "splitk", "cutlass", "aten::_addmm_activation", "mkl", "dnnl")
_ELEMENTWISE = ("elementwise", "vectorized", "reduce", "norm", "copy", "cat", "index", "gelu", "silu", "mul", "add")
_ELEMENTWISE += ("softmax", "unrolled", "transpose", "permute", "fill", "where", "pow", "cos", "sin", "exp", "aten::")


def classify(name: str) -> str:
    """Kernel (or, on CPU, operator) name -> attention | gemm | elementwise | other."""
    n = name.lower()
    if n.startswith("[attention] "):  # launched inside our attention function (see ``annotated``)
        return "attention"
    if "triton_tem" in n:  # inductor's GEMM templates (max-autotune)
        return "gemm"
    if n.startswith("triton_") or "cpp_fused" in n:  # inductor's fused pointwise / reduction kernels
        return "elementwise"
    if any(k in n for k in _ATTENTION):  # before convolutions: cuDNN's attention kernels are "..._fprop_..." too
        return "attention"
    if any(k in n for k in _CONV):
        return "other"
    if any(k in n for k in _GEMM):
        return "gemm"
    if "memset" in n or "memcpy" in n:
        return "other"
    if any(k in n for k in _ELEMENTWISE):
        return "elementwise"
    return "other"


def flops(cfg, grid: tuple[int, int, int], batch: int, text_len: int) -> dict[str, float]:
    """FLOPs (2 x multiply-adds) of one forward (T2V, one timestep per item): GEMMs (blocks, text and time embedding,
    head) and attention (self + cross); ``tests/test_bench_flops.py`` checks them against PyTorch's FLOP counter."""
    tokens, dim, ffn = math.prod(grid), cfg.dim, cfg.ffn_dim
    per_layer = 2 * batch * tokens * dim * (3 * dim + dim + dim + dim + 2 * ffn)  # qkv, o, cross q, cross o, FFN
    per_layer += 2 * batch * text_len * dim * 2 * dim  # cross k/v of the text tokens
    outside = 2 * batch * text_len * (cfg.text_dim * dim + dim * dim)  # text embedding
    outside += 2 * batch * tokens * dim * cfg.out_dim * math.prod(cfg.patch_size)  # head
    outside += 2 * batch * (cfg.freq_dim * dim + dim * dim + dim * 6 * dim)  # time embedding and projection
    attention = 4 * batch * tokens * dim * (tokens + text_len)  # QK^T and PV, self and cross
    return {"gemm": per_layer * cfg.num_layers + outside, "attention": attention * cfg.num_layers}


ATTENTION_RANGE = "wan_self_attention"


def annotated(kernel):
    """``kernel`` inside a profiler range: every GPU kernel it launches counts as attention whatever its name."""

    def attention(q, k, v):
        with torch.profiler.record_function(ATTENTION_RANGE):
            return kernel(q, k, v)

    attention.input_layout = getattr(kernel, "input_layout", None)
    return attention


def profile_call(fn, device: torch.device) -> dict:
    """Kernels of one call: name -> (total us, count), per category, busy time and span. Kernels launched inside an
    ``annotated`` attention are attention; the others (and the peer's, whose attention is inside its compiled
    graph) go by name (``classify``)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        fn()
        C.synchronize(device)
    kernels: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    if device.type == "cuda":
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "trace.json"
            prof.export_chrome_trace(str(path))
            events = json.loads(path.read_text()).get("traceEvents", [])
        ranges = [
            (float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0)))
            for e in events
            if e.get("cat") == "user_annotation" and e.get("name") == ATTENTION_RANGE
        ]
        launched = {
            e.get("args", {}).get("correlation"): float(e["ts"])
            for e in events
            if e.get("cat") in ("cuda_runtime", "cuda_driver")
        }
        spans = []
        for event in events:
            if event.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in event:
                at = launched.get(event.get("args", {}).get("correlation"))
                inside = at is not None and any(a <= at <= b for a, b in ranges)
                item = kernels[("[attention] " if inside else "") + event["name"]]
                item[0] += float(event["dur"])
                item[1] += 1
                spans.append((float(event["ts"]), float(event["ts"]) + float(event["dur"])))
        span_us = (max(e for _, e in spans) - min(s for s, _ in spans)) if spans else 0.0
    else:  # CPU: operators' self time (a check of the code path; inductor's C++ kernels are not broken out)
        for avg in prof.key_averages():
            if avg.self_cpu_time_total > 0:
                item = kernels[avg.key]
                item[0] += float(avg.self_cpu_time_total)
                item[1] += int(avg.count)
        span_us = sum(t for t, _ in kernels.values())
    by_category = dict.fromkeys(CATEGORIES, 0.0)
    for name, (us, _) in kernels.items():
        by_category[classify(name)] += us / 1000.0
    busy_ms = sum(by_category.values())
    return dict(
        kernels={k: tuple(v) for k, v in kernels.items()}, ms=by_category, busy_ms=busy_ms, span_ms=span_us / 1e3
    )


def top_kernels(kernels: dict, category: str, count: int) -> list[tuple[str, float, int]]:
    rows = [(name, us / 1e3, n) for name, (us, n) in kernels.items() if classify(name) == category]
    return sorted(rows, key=lambda r: -r[1])[:count]


def uncompile(model) -> None:
    """Drop ``compile_blocks``' wrappers (the class methods show through again)."""
    for block in model.blocks:
        block.__dict__.pop("before_attention", None)
        block.__dict__.pop("after_attention", None)


class Breakdown:
    def __init__(self, args):
        self.args = args
        self.device = torch.device(args.device)
        self.dtype = torch.bfloat16
        self.rec = C.Recorder(args.out, "kernel_breakdown")
        self.rec.results.update(args=vars(args), cases=[], failures=[])
        self.peer_out: torch.Tensor | None = None

    def over_time(self, what: str) -> bool:
        return self.rec.over_time(what, self.args.time_limit)

    def measure(
        self, name: str, fn, result: dict, reference: torch.Tensor | None = None, peer: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        """Warm up (compiles), time, profile one call; record it under ``result[name]``."""
        try:
            began = time.perf_counter()
            with torch.no_grad():
                out = fn()
                C.synchronize(self.device)
                first_s = time.perf_counter() - began
                times = C.time_calls(fn, warmup=1, reps=self.args.reps, device=self.device)
                prof = profile_call(fn, self.device)
        except Exception as error:  # noqa: BLE001 - one variant failing (a missing kernel) must not stop the rest
            result[name] = dict(error=f"{type(error).__name__}: {error}")
            self.rec.say(f"   {name}: failed ({result[name]['error'][:300]})")
            return None
        call_ms = C.median(times) * 1e3
        entry = dict(prof, call_ms=call_ms, times_s=times, first_call_s=first_s)
        entry["idle_ms"] = max(0.0, call_ms - prof["busy_ms"]) if self.device.type == "cuda" else float("nan")
        if reference is not None:
            entry["rel_err_vs_base"] = C.rel_err(out, reference)
        if peer is not None:
            entry["rel_err_vs_peer"] = C.rel_err(out, peer)
        result[name] = entry
        err = f", rel err vs ours {entry['rel_err_vs_base']:.1e}" if reference is not None else ""
        err += f", vs peer {entry['rel_err_vs_peer']:.1e}" if peer is not None else ""
        self.rec.say(
            f"   {name}: {call_ms:.2f} ms per call (first call {first_s:.1f} s), kernels "
            + ", ".join(f"{c} {prof['ms'][c]:.1f}" for c in CATEGORIES)
            + err
        )
        return out

    def run_case(self, key: str) -> None:
        args, rec, device = self.args, self.rec, self.device
        spec = CASES[key]
        cfg = C.wan_config(spec["preset"])
        if spec["layers"] and not args.all_layers:
            cfg = dataclasses.replace(cfg, num_layers=spec["layers"])
        label = f"{spec['preset']} {spec['shape']} batch {spec['batch']} ({cfg.num_layers} layers)"
        rec.say(f"== {label}")
        sd = C.random_state_dict(cfg, seed=args.seed, device=device, dtype=self.dtype)
        x, t, ctx = C.make_inputs(cfg, spec["shape"], spec["batch"], device=device, dtype=self.dtype)
        result: dict = dict(case=key, label=label, layers=cfg.num_layers, models={})
        models = result["models"]
        grid = tuple(s // p for s, p in zip(x.shape[2:], cfg.patch_size))
        result["flops"] = flops(cfg, grid, spec["batch"], ctx.shape[1])

        # the compiled peer first: its weights share storage with ours (built after it)
        peer = C.build_diffusers(cfg, C.to_diffusers_layout(sd), device, self.dtype)
        if not args.peer_eager:
            C.compile_diffusers(peer)
        run_peer = C.diffusers_callable(peer)
        with C.sdpa_backend(args.attention):
            self.peer_out = self.measure("peer", functools.partial(run_peer, x, t, ctx), models)
        del peer, run_peer
        C.free()

        ours = C.build_ours(cfg, sd, device, self.dtype)
        resolved = pkg_attention().resolve_attention(args.ours_attention, device)
        result["ours_attention"] = getattr(resolved, "__name__", str(resolved))
        kernel = annotated(resolved)
        for block in ours.blocks:
            block.self_attn.attention_fn = kernel
        compile_ours = not args.no_compile
        if compile_ours:
            ours.compile_blocks()
        base = self.measure("ours", functools.partial(ours, x, t, ctx), models, peer=self.peer_out)
        variants = [v for v in args.variants.split(",") if v and v != "base"] if key in args.variant_cases else []
        for variant in variants:
            if self.over_time(f"{label} {variant}"):
                break
            self.variant(variant, ours, cfg, sd, kernel, compile_ours, (x, t, ctx), base, models)
        rec.results["cases"].append(result)
        self.report_case(result)
        rec.save()
        self.peer_out = None
        del ours, sd, base
        C.free()

    def variant(self, variant, ours, cfg, sd, kernel, compile_ours, inputs, base, models) -> None:
        """One of ours' variants, measured, then ``ours`` put back to its base setup."""
        x, t, ctx = inputs
        name = f"ours {variant}"
        if variant == "old-v":
            plain = annotated(kernel)
            plain.input_layout = None  # v stays a view of qkv; the kernel's wrapper copies it in eager
            for block in ours.blocks:
                block.self_attn.attention_fn = plain
            self.measure(name, lambda: ours(x, t, ctx), models, base, self.peer_out)
            for block in ours.blocks:
                block.self_attn.attention_fn = kernel
        elif variant == "gelu-epilogue":
            ours.set_fusions(gelu_epilogue=True)
            self.measure(name, lambda: ours(x, t, ctx), models, base, self.peer_out)
            ours.set_fusions(gelu_epilogue=False)
        elif variant in COMPILE_OPTIONS:
            if not compile_ours:
                return
            uncompile(ours)
            ours.compile_blocks(options=COMPILE_OPTIONS[variant])
            self.measure(name, lambda: ours(x, t, ctx), models, base, self.peer_out)
            uncompile(ours)
            ours.compile_blocks()
        elif variant in ("sdpa", "sdpa-heads-first"):
            sdpa = annotated(pkg_attention().sdpa_attention)
            sdpa.input_layout = "heads_first" if variant == "sdpa-heads-first" else None
            for block in ours.blocks:
                block.self_attn.attention_fn = sdpa
            self.measure(name, lambda: ours(x, t, ctx), models, base, self.peer_out)
            for block in ours.blocks:
                block.self_attn.attention_fn = kernel
        elif variant == "fp8" or variant.startswith("fp8-") and variant[4:] in COMPILE_OPTIONS:
            quantized = C.build_ours(cfg, sd, self.device, self.dtype, quantization="fp8_e4m3fn")
            for block in quantized.blocks:
                block.self_attn.attention_fn = kernel
            if compile_ours:
                quantized.compile_blocks(options=COMPILE_OPTIONS.get(variant[4:]))
            self.measure(name, lambda: quantized(x, t, ctx), models, base, self.peer_out)
            del quantized
            C.free()
        else:
            self.rec.results["failures"].append(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")

    # ------------------------------------------------------------------------------------------------------
    def report_case(self, result: dict) -> None:
        rec, models = self.rec, result["models"]
        names = [n for n, m in models.items() if "ms" in m]
        if not names:
            return
        peer = models.get("peer", {})
        rec.say("")
        rec.say(
            f"## {result['label']}: ms per call by kernel category (ours attention: {result['ours_attention']}; "
            f"peer: compiled diffusers on SDPA); last column = ours / peer"
        )
        rows = []
        for category in CATEGORIES:
            row = [category] + [C.fmt(models[n]["ms"][category], ".1f") for n in names]
            rows.append(
                row + [ratio(models.get("ours", {}).get("ms", {}).get(category), peer.get("ms", {}).get(category))]
            )
        rows.append(["idle (call - kernels)"] + [C.fmt(models[n]["idle_ms"], ".1f") for n in names] + ["-"])
        rows.append(
            ["call (median)"]
            + [C.fmt(models[n]["call_ms"], ".1f") for n in names]
            + [ratio(models.get("ours", {}).get("call_ms"), peer.get("call_ms"))]
        )
        for category in ("gemm", "attention"):
            limit = LIMITS_TFLOPS[category]
            cells = []
            for n in names:
                ms = models[n]["ms"][category]
                tflops = result["flops"][category] / (ms * 1e-3) / 1e12 if ms > 0 else float("nan")
                cells.append(f"{C.fmt(tflops, '.0f')} ({C.fmt(tflops / limit, '.0%')})")
            rows.append([f"{category} TFLOP/s (of {limit:.0f})"] + cells + ["-"])
        for n in names:
            if "rel_err_vs_base" in models[n]:
                models[n]["_err"] = C.fmt(models[n]["rel_err_vs_base"], ".1e")
        rows.append(["rel err vs ours"] + [models[n].get("_err", "-") for n in names] + ["-"])
        rows.append(["rel err vs peer"] + [C.fmt(models[n].get("rel_err_vs_peer"), ".1e") for n in names] + ["-"])
        rec.say(C.table(["category"] + names + ["ours/peer"], rows))
        for n in ("ours", "peer"):
            if n not in names:
                continue
            for category in CATEGORIES:
                top = top_kernels(models[n]["kernels"], category, self.args.top)
                if not top:
                    continue
                rec.say(f"   top {category} kernels of {n}:")
                for kernel_name, ms, count in top:
                    rec.say(f"     {ms:8.2f} ms  x{count:<4d} {kernel_name[:150]}")
        for m in models.values():
            m.pop("_err", None)


def ratio(a, b) -> str:
    return C.fmt(a / b, ".3f") if a and b else "-"


def pkg_attention():
    return C.pkg("wanvideo.attention")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default=None, help=f"comma list from {', '.join(CASES)} (default 1.3B:1,1.3B:2,14B:1)")
    p.add_argument("--variants", default="base", help=f"ours' variants, from {', '.join(VARIANTS)}")
    p.add_argument("--variant-cases", default=None, help="cases the variants run on (default: the first case)")
    p.add_argument("--tiny", action="store_true", help="toy model on the CPU (operators instead of kernels)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--ours-attention", default="auto", help="our attention backend (auto = FA4 when installed)")
    p.add_argument("--attention", default="sdpa", choices=["sdpa", "cudnn", "flash", "efficient", "math"])
    p.add_argument("--no-compile", action="store_true", help="ours eager (the peer stays compiled)")
    p.add_argument("--peer-eager", action="store_true", help="the peer eager (e.g. a quick --tiny run)")
    p.add_argument("--all-layers", action="store_true", help="14B with all 40 layers (default: 8, same per layer)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--top", type=int, default=6, help="kernels listed per category")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time-limit", type=float, default=270.0, help="seconds; later cases and variants are skipped")
    p.add_argument("--out", help="folder for kernel_breakdown.json and .log")
    args = p.parse_args(argv)
    if args.tiny:
        args.device = "cpu"
        args.cases = args.cases or "tiny:1,tiny:2"
    args.cases = args.cases or "1.3B:1,1.3B:2,14B:1"
    unknown = [c for c in args.cases.split(",") if c not in CASES]
    if unknown:
        p.error(f"--cases: unknown {unknown}; choose from {', '.join(CASES)}")
    args.variant_cases = (args.variant_cases or args.cases.split(",")[0]).split(",")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    C.safe_env()
    torch.manual_seed(args.seed)
    bench = Breakdown(args)
    bench.rec.say(f"kernel_breakdown on {args.device}: {bench.rec.results['meta']}")
    for key in args.cases.split(","):
        if bench.over_time(key):
            break
        try:
            bench.run_case(key)
        except Exception as exc:  # noqa: BLE001 - the cases that ran still print
            import traceback

            traceback.print_exc()
            bench.rec.results["failures"].append(f"{key}: {type(exc).__name__}: {exc}")
            C.free()
    for failure in bench.rec.results["failures"]:
        bench.rec.say(f"FAILURE: {failure}")
    bench.rec.say(f"total {time.monotonic() - bench.rec.started:.0f} s")
    bench.rec.save()
    return 1 if any(not f.startswith("skipped") for f in bench.rec.results["failures"]) else 0


if __name__ == "__main__":
    sys.exit(main())
