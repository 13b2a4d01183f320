"""Speed on one GPU: our Wan DiT vs diffusers' ``WanTransformer3DModel`` with the same weights, one rank's
share of a parallel step for N = 2, 4, 8, and fp8 weights. The peer runs eager and then compiled as diffusers
documents it (``compile_repeated_blocks(fullgraph=True)``), batch 1 and 2 in the same run; every ratio is
against the compiled peer. One command:

    python bench/single_gpu.py --out $OUT            # 1.3B 480p x81 (batch 1, 2) + 14B 720p x81 (batch 1)
    python bench/single_gpu.py --quick               # 1.3B only
    python bench/single_gpu.py --tiny                # CPU check of every code path at toy size

Weights are random (seeded, drawn on the GPU in bf16) and shared by both models; outputs must agree to
bf16 round-off (relative error < --tol). Times are CUDA-event medians after warm-up. A rank's share runs
our model on that rank's tokens (the largest rank of ``partition_tokens``) with the attention of the mode:

- ``displaced``: local q against fresh local + preallocated stale remote K/V (``StaleKVAttention``), bf16 or
  fp8 K/V; ``displaced-rt``: the runtime's own displaced step (``AttentionRuntime``) with its exchange removed;
- ``sync-rt`` / ``ulysses-rt``: the runtime's sync / Ulysses attention with collectives turned into local
  copies (Ulysses: full-length attention over heads/N plus the local-token layers).

The 14B shares run the first ``--share-layers`` blocks and scale by layers/blocks run (all blocks are alike).
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402

SHARE_REPS = 3  # timed calls per share (after one warm-up call)
SHARE_MODES = ("displaced", "displaced-fp8kv", "displaced-rt", "sync-rt", "ulysses-rt")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="1.3B only")
    p.add_argument("--models", default="1.3B,14B", help="comma list, run in this order (1.3B, 14B)")
    p.add_argument("--tiny", action="store_true", help="toy model and shapes (CPU check of all code paths)")
    p.add_argument("--out", help="folder for single_gpu.json and single_gpu.log")
    p.add_argument("--attention", default="sdpa", choices=["sdpa", "cudnn", "flash", "efficient", "math"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--ns", default=None, help="group sizes of the per-rank shares (default 2,4,8; tiny 2,4)")
    p.add_argument("--modes", default=",".join(SHARE_MODES), help=f"share modes, from {','.join(SHARE_MODES)}")
    p.add_argument("--split-mode", default="spatial")
    p.add_argument("--patch-size", type=int, default=None, help="partition granularity in px (default 64; tiny 16)")
    p.add_argument("--share-layers", type=int, default=None, help="blocks run for 14B shares (default 10)")
    p.add_argument("--no-fp8", action="store_true", help="skip the fp8-weights runs")
    p.add_argument(
        "--ours-variants",
        default="eager,compiled,compiled-flash4",
        help="our model's extra configurations timed after eager SDPA: compiled (torch.compile around attention), "
        "compiled-flash4 (plus FlashAttention-4 when installed); the fastest one is used for the per-rank shares",
    )
    p.add_argument(
        "--peer-variants",
        default="eager,compiled",
        help="diffusers' configurations: eager, compiled (compile_repeated_blocks(fullgraph=True), the reference "
        "of the ratios); 'eager' alone skips compiling the peer (e.g. a quick --tiny run)",
    )
    p.add_argument("--tol", type=float, default=3e-2, help="max relative error ours vs diffusers (bf16)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time-limit", type=float, default=540.0, help="seconds; later sections are skipped past it")
    p.add_argument("--nccl-smoke", action="store_true", help="then run bench/gpu_smoke.py in a fresh process")
    args = p.parse_args(argv)
    args.patch_size = args.patch_size or (16 if args.tiny else 64)
    return args


def plan(args) -> list[dict]:
    """What to run: (preset, shape, batches, warm-up, repetitions, share layers)."""
    if args.tiny:
        return [dict(preset="tiny", shape="tiny_odd", batches=[1, 2], warmup=1, reps=2, share_layers=None)]
    cases = {
        "1.3B": dict(preset="1.3B", shape="480p81", batches=[1, 2], warmup=2, reps=5, share_layers=None),
        "14B": dict(preset="14B", shape="720p81", batches=[1], warmup=1, reps=3, share_layers=args.share_layers or 10),
    }
    models = ["1.3B"] if args.quick else [m for m in args.models.split(",") if m]
    unknown = [m for m in models if m not in cases]
    if unknown:
        raise SystemExit(f"--models: unknown {unknown}; choose from {', '.join(cases)}")
    return [cases[m] for m in models]


class Bench:
    def __init__(self, args):
        self.args = args
        self.device = torch.device(args.device)
        self.rec = C.Recorder(args.out, "single_gpu")
        self.rec.results.update(args=vars(args), forwards=[], shares=[], fp8=[], failures=[])
        self.dtype = torch.bfloat16
        self.peer_variants = {v for v in args.peer_variants.split(",") if v}

    def over_time(self, what: str) -> bool:
        return self.rec.over_time(what, self.args.time_limit)

    def timed(self, fn, warmup: int, reps: int) -> dict:
        C.reset_peak(self.device)
        base = torch.cuda.memory_allocated(self.device) / 2**30 if self.device.type == "cuda" else float("nan")
        with torch.no_grad(), C.sdpa_backend(self.args.attention):
            times = C.time_calls(fn, warmup=warmup, reps=reps, device=self.device)
        return dict(median_s=C.median(times), times_s=times, peak_gib=C.peak_memory_gib(self.device), weights_gib=base)

    # ------------------------------------------------------------------------------------------------------
    def run_case(self, case: dict) -> None:
        args, rec, device = self.args, self.rec, self.device
        preset, shape = case["preset"], case["shape"]
        cfg = C.wan_config(preset)
        label = f"{preset} {shape}"
        rec.say(f"== {label}: dim {cfg.dim}, {cfg.num_layers} layers, {cfg.num_heads} heads, {args.attention}")
        t0 = time.monotonic()
        sd = C.random_state_dict(cfg, seed=args.seed, device=device, dtype=self.dtype)
        diffusers_model = C.build_diffusers(cfg, C.to_diffusers_layout(sd), device, self.dtype)
        ours = C.build_ours(cfg, sd, device, self.dtype)
        C.synchronize(device)
        rec.say(
            f"   built in {time.monotonic() - t0:.1f} s; weights ours {C.tensor_bytes(ours) / 2**30:.2f} GiB, "
            f"diffusers {C.tensor_bytes(diffusers_model) / 2**30:.2f} GiB (shared storage)"
        )
        run_diffusers = C.diffusers_callable(diffusers_model)
        batches = [b for b in case["batches"] if not self.over_time(f"{label} batch {b}")]
        inputs = {b: C.make_inputs(cfg, shape, b, device=device, dtype=self.dtype) for b in batches}
        # The peer eager first (its output is every batch's reference), then compiled in place.
        peer: dict[int, dict] = {}
        for batch in batches:
            x, t, ctx = inputs[batch]
            with torch.no_grad(), C.sdpa_backend(args.attention):
                ref = run_diffusers(x, t, ctx)
            eager = self.timed(lambda f=run_diffusers, a=inputs[batch]: f(*a), case["warmup"] - 1, case["reps"])
            peer[batch] = dict(ref=ref, eager=eager)
            rec.say(f"   batch {batch}: diffusers eager {eager['median_s']:.4f} s")
        if "compiled" in self.peer_variants and batches:
            try:
                C.compile_diffusers(diffusers_model)
                for batch in batches:
                    x, t, ctx = inputs[batch]
                    began = time.perf_counter()
                    with torch.no_grad(), C.sdpa_backend(args.attention):
                        err = C.rel_err(run_diffusers(x, t, ctx), peer[batch]["ref"])
                    first_call_s = time.perf_counter() - began
                    compiled = self.timed(lambda f=run_diffusers, a=inputs[batch]: f(*a), case["warmup"], case["reps"])
                    compiled.update(rel_err_vs_eager=err, first_call_s=first_call_s)
                    peer[batch]["compiled"] = compiled
                    rec.say(
                        f"   batch {batch}: diffusers compiled {compiled['median_s']:.4f} s (rel err vs its eager "
                        f"{err:.2e}; first call {first_call_s:.1f} s)"
                    )
            except Exception as error:  # a compile failure must not stop the bench: the eager peer still counts
                rec.results["failures"].append(f"{label}: diffusers compile_repeated_blocks: {error}")
                rec.say(f"   diffusers compiled: failed ({type(error).__name__}: {str(error)[:300]})")
        singles, outputs, eager = {}, {}, {}
        for batch in batches:  # ours eager at every batch before anything compiles it (in place)
            x, t, ctx = inputs[batch]
            with torch.no_grad(), C.sdpa_backend(args.attention):
                outputs[batch] = ours(x, t, ctx)
            eager[batch] = self.timed(lambda f=ours, a=(x, t, ctx): f(*a), case["warmup"] - 1, case["reps"])
        for batch in batches:
            x, t, ctx = inputs[batch]
            ref = peer[batch]["ref"]
            err = C.rel_err(outputs[batch], ref)
            ok = err < args.tol
            if not ok:
                rec.results["failures"].append(f"{label} batch {batch}: rel err {err:.3e} >= {args.tol}")
            theirs, theirs_compiled = peer[batch]["eager"], peer[batch].get("compiled")
            mine = eager[batch]
            variants = self.variants(ours, x, t, ctx, ref, case)
            mine["variants"] = variants
            best = min([mine["median_s"]] + [v["median_s"] for v in variants.values() if "median_s" in v])
            mine["eager_s"], mine["median_s"] = mine["median_s"], best
            singles[batch] = mine["median_s"]
            reference = theirs_compiled or theirs  # ratios against the compiled peer when it compiled
            row = dict(
                model=preset,
                shape=shape,
                batch=batch,
                ours=mine,
                diffusers=theirs,
                diffusers_compiled=theirs_compiled,
                peer_s=reference["median_s"],
                peer_compiled=theirs_compiled is not None,
                ratio=mine["median_s"] / reference["median_s"],
                ratio_vs_eager_peer=mine["median_s"] / theirs["median_s"],
                rel_err=err,
                agree=ok,
            )
            rec.results["forwards"].append(row)
            peer_name = "diffusers compiled" if theirs_compiled else "diffusers eager"
            rec.say(
                f"   batch {batch}: ours {mine['median_s']:.4f} s, {peer_name} {reference['median_s']:.4f} s, "
                f"ratio {row['ratio']:.3f}, rel err {err:.2e} {'OK' if ok else 'FAIL'}, "
                f"peak {mine['peak_gib']:.1f}/{theirs['peak_gib']:.1f} GiB"
            )
            rec.save()
        peer_s = {b: peer[b].get("compiled", peer[b]["eager"])["median_s"] for b in peer}
        del peer, inputs
        C.free()
        del diffusers_model, run_diffusers
        C.free()
        for batch in case["batches"]:
            if batch not in singles:
                continue
            x, t, ctx = C.make_inputs(cfg, shape, batch, device=device, dtype=self.dtype)
            self.shares(cfg, ours, label, preset, shape, batch, x, t, ctx, singles[batch], case)
        if not args.no_fp8 and 1 in outputs and not self.over_time(f"{label} fp8"):
            self.fp8(cfg, sd, ours, label, preset, shape, outputs[1], singles[1], peer_s.get(1), case)
        del ours, sd, outputs
        C.free()

    def variants(self, ours, x, t, ctx, ref, case) -> dict:
        """Time our model compiled, and with FlashAttention-4; leaves ``ours`` in the last working setup."""
        results = {}
        for name in [v for v in self.args.ours_variants.split(",") if v and v != "eager"]:
            try:
                if name == "compiled":
                    if not getattr(ours, "_bench_compiled", False):
                        ours.compile_blocks()
                        ours._bench_compiled = True
                    ours.set_attention_backend("sdpa")  # a previous batch may have left FlashAttention-4 set
                elif name == "compiled-flash4":
                    if not getattr(ours, "_bench_compiled", False):
                        ours.compile_blocks()
                        ours._bench_compiled = True
                    ours.set_attention_backend("flash4")
                began = time.perf_counter()
                with torch.no_grad(), C.sdpa_backend(self.args.attention):
                    err = C.rel_err(ours(x, t, ctx), ref)
                first_call_s = time.perf_counter() - began  # includes compiling for this shape
                results[name] = dict(
                    self.timed(lambda a=(x, t, ctx): ours(*a), case["warmup"], case["reps"]),
                    rel_err=err,
                    first_call_s=first_call_s,
                )
                self.rec.say(
                    f"   ours {name}: {results[name]['median_s']:.4f} s (rel err vs diffusers {err:.2e}; "
                    f"first call {first_call_s:.1f} s)"
                )
            except Exception as error:  # a missing wheel or a compile failure must not stop the bench
                results[name] = dict(error=f"{type(error).__name__}: {error}")
                self.rec.say(f"   ours {name}: skipped ({results[name]['error'][:200]})")
                if name == "compiled-flash4":
                    ours.set_attention_backend("sdpa")
        return results

    # ------------------------------------------------------------------------------------------------------
    def shares(self, cfg, ours, label, preset, shape, batch, x, t, ctx, single_s, case) -> None:
        args, rec, device = self.args, self.rec, self.device
        partition = C.pkg("distrifusion.partition")
        ns = [int(n) for n in (args.ns or ("2,4" if args.tiny else "2,4,8")).split(",")]
        modes = [m for m in args.modes.split(",") if m]
        grid = ours.token_grid(x)
        total = math.prod(grid)
        for n in ns:
            try:
                parts = partition.partition_tokens(grid, args.split_mode, args.patch_size, n, 0)
            except Exception as exc:  # noqa: BLE001 - a partition that cannot exist is a result, not a crash
                rec.say(f"   N={n}: no partition ({exc})")
                continue
            big = max(range(n), key=lambda r: parts[r].num_computed)
            index = parts[big].computed_index.to(device)
            balance = (total / n) / parts[big].num_computed
            for mode in modes:
                if self.over_time(f"{label} share N={n} {mode}"):
                    return
                row = dict(model=preset, shape=shape, batch=batch, n=n, mode=mode, tokens=parts[big].num_computed)
                row.update(total_tokens=total, balance=balance, single_s=single_s, ideal_s=single_s / n)
                try:
                    result = self.share(cfg, ours, mode, parts, big, index, batch, x, t, ctx, case)
                except Exception as exc:  # noqa: BLE001 - record and go on: the other modes still count
                    result = dict(error=f"{type(exc).__name__}: {exc}")
                row.update(result)
                if "per_rank_s" in row:
                    row["efficiency"] = row["ideal_s"] / row["per_rank_s"]
                    rec.say(
                        f"   batch {batch} N={n} {mode:16s} tokens {row['tokens']:6d} per-rank {row['per_rank_s']:.4f} s"
                        f" ideal {row['ideal_s']:.4f} eff {row['efficiency']:.3f} (balance {balance:.3f})"
                    )
                else:
                    rec.say(f"   batch {batch} N={n} {mode}: {row.get('skipped') or row.get('error')}")
                rec.results["shares"].append(row)
                rec.save()
                C.free()

    def share(self, cfg, ours, mode, parts, big, index, batch, x, t, ctx, case) -> dict:
        n = len(parts)
        if mode.startswith("ulysses") and cfg.num_heads % n:
            return dict(skipped=f"{cfg.num_heads} heads do not split over {n} GPUs")
        fp8_kv = mode == "displaced-fp8kv" or (mode == "displaced-rt" and case["preset"] == "14B")
        kv_dtype = torch.float8_e4m3fn if fp8_kv else self.dtype
        with C.first_layers(ours, case["share_layers"]) as layers:
            scale = cfg.num_layers / layers
            if mode in ("displaced", "displaced-fp8kv"):
                attn = None
                total = sum(p.num_own for p in parts)

                def make(layer, inner):
                    nonlocal attn
                    if attn is None:
                        attn = C.StaleKVAttention(
                            inner,
                            total_tokens=total,
                            batch=batch,
                            heads=cfg.num_heads,
                            head_dim=cfg.dim // cfg.num_heads,
                            dtype=self.dtype,
                            kv_dtype=kv_dtype,
                            device=self.device,
                        )
                    return attn

                with C.swapped_attention(ours, make):
                    res = self.timed(lambda: ours(x, t, ctx, token_index=index), 1, SHARE_REPS)
                del attn
            else:
                runtime_mode = mode.removesuffix("-rt")
                runtime = C.local_runtime(
                    runtime_mode,
                    parts=parts,
                    group_rank=big,
                    batch=batch,
                    cfg=cfg,
                    device=self.device,
                    dtype=self.dtype,
                    kv_dtype="fp8_e4m3fn" if fp8_kv else "auto",
                    num_layers=layers,
                )

                def step():
                    runtime.begin_step(False)
                    out = ours(x, t, ctx, token_index=index)
                    runtime.end_step()
                    return out

                with C.collectives_as_local_copies(), C.swapped_attention(ours, runtime.attention_fn):
                    if runtime_mode == "displaced":
                        runtime.begin_step(True)  # fills the stale buffers, as the warm-up steps do
                        ours(x, t, ctx, token_index=index)
                        runtime.end_step()
                    res = self.timed(step, 1, SHARE_REPS)
                    runtime.reset()
                res["kv_buffer_gib"] = runtime.buffer_bytes / 2**30 * scale
                del runtime
        res["per_rank_s"] = res["median_s"] * scale
        res["layers_run"] = layers
        res["kv_dtype"] = str(kv_dtype).removeprefix("torch.")
        return res

    # ------------------------------------------------------------------------------------------------------
    def fp8(self, cfg, sd, ours, label, preset, shape, ref_out, single_s, peer_s, case) -> None:
        rec, device = self.rec, self.device
        bf16_bytes = C.tensor_bytes(ours)
        x, t, ctx = C.make_inputs(cfg, shape, 1, device=device, dtype=self.dtype)
        quantized = C.build_ours(cfg, sd, device, self.dtype, quantization="fp8_e4m3fn")
        fp8_bytes = C.tensor_bytes(quantized)
        # Same setup as the bf16 model it is compared with (compiled or not, same attention kernel).
        kernel = ours.blocks[0].self_attn.attention_fn
        for block in quantized.blocks:
            block.self_attn.attention_fn = kernel
        if getattr(ours, "_bench_compiled", False):
            quantized.compile_blocks()
        fp8_matmul = any(getattr(m, "use_fp8_matmul", False) for m in quantized.modules())
        with torch.no_grad(), C.sdpa_backend(self.args.attention):
            err = C.rel_err(quantized(x, t, ctx), ref_out)
        res = self.timed(lambda f=quantized, a=(x, t, ctx): f(*a), case["warmup"] - 1, case["reps"])
        row = dict(
            model=preset,
            shape=shape,
            weights_bf16_gib=bf16_bytes / 2**30,
            weights_fp8_gib=fp8_bytes / 2**30,
            memory_ratio=fp8_bytes / bf16_bytes,
            bf16_s=single_s,
            fp8=res,
            speed_ratio=res["median_s"] / single_s,
            peer_s=peer_s,
            ratio_vs_peer=res["median_s"] / peer_s if peer_s else None,
            rel_err_vs_bf16=err,
            fp8_matmul=fp8_matmul,
            compiled=getattr(ours, "_bench_compiled", False),
            attention=getattr(kernel, "__name__", str(kernel)),
        )
        rec.results["fp8"].append(row)
        rec.say(
            f"   fp8 weights: {row['weights_fp8_gib']:.2f} GiB vs {row['weights_bf16_gib']:.2f} GiB "
            f"({row['memory_ratio']:.2f}x), {res['median_s']:.4f} s vs {single_s:.4f} s ({row['speed_ratio']:.2f}x), "
            f"rel err vs bf16 {err:.2e}; scaled fp8 matmul {'on' if fp8_matmul else 'off'}, "
            f"compiled {row['compiled']}, attention {row['attention']}"
        )
        rec.save()
        del quantized
        C.free()

    # ------------------------------------------------------------------------------------------------------
    def report(self) -> None:
        rec, res = self.rec, self.rec.results
        rec.say("")
        rec.say(
            f"## Single GPU: ours vs diffusers (bf16, attention {self.args.attention}; {device_name(self.device)}); "
            "(x) = time / the compiled peer (diffusers compile_repeated_blocks(fullgraph=True); eager peer where "
            "it did not compile)"
        )

        def against(seconds, r) -> str:
            if seconds is None or math.isnan(seconds):
                return "-"
            return f"{seconds:.4f} ({seconds / r['peer_s']:.2f}x)"

        rows = []
        for r in res["forwards"]:
            variants = r["ours"].get("variants", {})
            compiled = r.get("diffusers_compiled") or {}
            rows.append(
                [
                    f"{r['model']} {r['shape']}",
                    r["batch"],
                    C.fmt(r["diffusers"]["median_s"], ".4f"),
                    C.fmt(compiled.get("median_s"), ".4f"),
                    against(r["ours"].get("eager_s", r["ours"]["median_s"]), r),
                    *(against(variants.get(name, {}).get("median_s"), r) for name in ("compiled", "compiled-flash4")),
                    C.fmt(r["ratio"], ".3f") + ("" if r.get("peer_compiled") else " (eager peer)"),
                    C.fmt(r["ratio_vs_eager_peer"], ".3f"),
                    C.fmt(r["rel_err"], ".1e") + ("" if r["agree"] else " FAIL"),
                    f"{C.fmt(r['ours']['peak_gib'], '.1f')} / {C.fmt(r['diffusers']['peak_gib'], '.1f')}",
                ]
            )
        headers = ["model, shape", "batch", "peer eager s", "peer compiled s", "ours eager s", "ours compiled s"]
        headers += ["ours compiled+FA4 s", "best/peer compiled", "best/peer eager", "rel err", "peak GiB o/d"]
        rec.say(C.table(headers, rows))
        rec.say("")
        rec.say(
            f"## One rank's share (largest rank; {self.args.split_mode} split, {self.args.patch_size} px patches; "
            "ideal = our single / N; eff = ideal / per-rank; balance = (L/N) / tokens)"
        )
        rows = []
        for r in res["shares"]:
            rows.append(
                [
                    f"{r['model']} {r['shape']}",
                    r["batch"],
                    r["mode"],
                    r["n"],
                    r["tokens"],
                    C.fmt(r.get("per_rank_s"), ".4f") if "per_rank_s" in r else (r.get("skipped") or "error"),
                    C.fmt(r["ideal_s"], ".4f"),
                    C.fmt(r.get("efficiency"), ".3f"),
                    C.fmt(r["balance"], ".3f"),
                ]
            )
        rec.say(
            C.table(["model, shape", "batch", "mode", "N", "tokens", "per-rank s", "ideal s", "eff", "balance"], rows)
        )
        if res["fp8"]:
            rec.say("")
            rec.say("## fp8 weights (fp8_e4m3fn storage, bf16 compute), batch 1; peer = the compiled peer")
            rows = [
                [
                    f"{r['model']} {r['shape']}",
                    C.fmt(r["weights_bf16_gib"], ".2f"),
                    C.fmt(r["weights_fp8_gib"], ".2f"),
                    C.fmt(r["memory_ratio"], ".2f"),
                    C.fmt(r["bf16_s"], ".4f"),
                    C.fmt(r["fp8"]["median_s"], ".4f"),
                    C.fmt(r["speed_ratio"], ".2f"),
                    C.fmt(r.get("ratio_vs_peer"), ".2f"),
                    C.fmt(r["rel_err_vs_bf16"], ".1e"),
                ]
                for r in res["fp8"]
            ]
            headers = ["model, shape", "bf16 GiB", "fp8 GiB", "mem", "bf16 s", "fp8 s", "time", "fp8/peer"]
            rec.say(C.table(headers + ["err vs bf16"], rows))
        for failure in res["failures"]:
            rec.say(f"FAILURE: {failure}")
        rec.say(f"total {time.monotonic() - self.rec.started:.0f} s")
        rec.save()


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"


def main(argv=None) -> int:
    args = parse_args(argv)
    C.safe_env()
    if args.device == "cuda":
        torch.cuda.set_device(0)
    torch.manual_seed(args.seed)
    bench = Bench(args)
    bench.rec.say(f"single_gpu bench on {device_name(bench.device)}: {bench.rec.results['meta']}")
    for case in plan(args):
        if bench.over_time(f"{case['preset']} {case['shape']}"):
            break
        try:
            bench.run_case(case)
        except Exception as exc:  # noqa: BLE001 - the table of what did run still prints
            import traceback

            traceback.print_exc()
            bench.rec.results["failures"].append(f"{case['preset']} {case['shape']}: {type(exc).__name__}: {exc}")
            C.free()
    bench.report()
    code = 1 if any(not f.startswith("skipped") for f in bench.rec.results["failures"]) else 0
    if args.nccl_smoke:
        smoke = [sys.executable, str(Path(__file__).with_name("gpu_smoke.py"))]
        if args.out:
            smoke += ["--out", args.out]
        if args.tiny or args.device == "cpu":
            smoke += ["--device", "cpu"]
        code = subprocess.call(smoke, env=dict(os.environ, **C.SAFE_NCCL_ENV)) or code
    return code


if __name__ == "__main__":
    sys.exit(main())
