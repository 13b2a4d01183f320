"""Real multi-GPU runs, ours vs diffusers' context parallelism, one command per machine kind:

    python bench/multi_gpu.py --gpus 4 --out $OUT              # 4-GPU machine: N = 4 then 2, NVLink and P2P off
    python bench/multi_gpu.py --gpus 2 --out $OUT              # 2-GPU machine: N = 2
    python bench/multi_gpu.py --tiny                           # CPU check (gloo, 2 ranks, toy model)

The launcher (this process, no CUDA) runs *phases*: one phase = one process group of N ranks with one link
setting (``nvlink`` = NCCL defaults, ``p2p-off`` = ``NCCL_P2P_DISABLE=1``: traffic through host memory, as
on PCIe boxes without peer-to-peer). Each phase spawns N fresh processes (RANK/WORLD_SIZE/MASTER_ADDR/PORT,
NVLink multicast kept off in every one). Every rank draws the same random weights on its GPU (seeded per
tensor, bf16) for Wan 1.3B (480p x 81) and 14B (720p x 81), and runs, per model:

- ``single``: the one-GPU forward (every rank at once, on its own GPU: our baseline);
- ours: ``displaced`` (1.3B bf16 and fp8 K/V; 14B fp8 K/V, as the memory plan needs on 80 GB), ``displaced``
  with CFG parallel (batch 2 = cond + uncond split over two rank groups), ``sync``, ``ulysses``;
- ``bound``: this rank's tokens with stale K/V already in place and no exchange (the compute bound);
- ``peer``: diffusers ``enable_parallelism(ContextParallelConfig(ulysses_degree=N))``, same weights, eager at
  batch 1, then compiled as diffusers documents it (``compile_repeated_blocks(fullgraph=True)``, the Ulysses
  all-to-alls traced as functional collectives) at batch 1 and 2: the reference of every ``/peer`` ratio;
- ``fidelity`` (first phase): a few-step CFG sample in every mode vs the one-GPU sample (rel err, PSNR).

``--budget-s`` orders every (phase, case) by priority, keeps what fits its estimate, recalibrates from
measured times after each phase, and skips the rest; the tables print at the end (and go to --out).
Per 50-step clip (with CFG): displaced = warm-up steps x sync step + the rest x stale step; batch-1
modes count a CFG step as two batch-1 forwards (marked "2xb1").
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402

CLIP_STEPS = 50
PRODUCT_WARMUP = 4  # ParallelConfig.warmup_steps default: synchronous steps at the start of a clip
SINGLE_S = {"1.3B": 0.65, "14B": 12.7, "tiny": 0.01}  # one H100, bf16, batch 1 (design notes): for estimates
SETUP_S = {"1.3B": 6.0, "14B": 25.0, "tiny": 1.0}
COMPILE_S = {"1.3B": 40.0, "14B": 45.0, "tiny": 40.0}  # one compile (tiny: inductor on a busy CPU)
PHASE_OVERHEAD_S = 30.0
MODEL_SHAPE = {"1.3B": "480p81", "14B": "720p81", "tiny": "tiny"}


# ============================================================================================================
# the plan: phases, cases, priorities, estimates
# ============================================================================================================
@dataclass
class Case:
    name: str
    model: str
    kind: str  # single | ours | bound | peer | fidelity
    batch: int = 1
    mode: str = ""
    kv_dtype: str = "auto"
    cfg_parallel: bool = False
    calls: int = 3
    priority: float = 0.0
    est_s: float = 0.0
    extra: dict = field(default_factory=dict)


@dataclass
class Phase:
    n: int
    link: str  # nvlink | p2p-off
    baseline: bool  # runs the single-GPU baseline and the fidelity samples
    cases: list = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"N={self.n} {self.link}"


def per_rank_estimate(model: str, n: int, link: str, kind: str, batch: int, cfg_parallel: bool) -> float:
    single = SINGLE_S[model] * batch
    if kind == "single":
        return single
    degree = n // 2 if cfg_parallel else n
    work = single / (2 if cfg_parallel else 1) / degree
    slow = 1.25 if link == "nvlink" else (1.9 if model != "14B" else 1.45)
    return work * (1.1 if kind == "bound" else slow)


def build_cases(model: str, phase: Phase, args) -> list[Case]:
    """Cases of one model in one phase, with priorities (lower runs first / is kept first)."""
    big = model == "14B"
    heads = C.PRESETS[model]["num_heads"]
    base = {"1.3B": 0, "14B": 10, "tiny": 0}[model] + (0 if phase.n == args.max_n else 40)
    base += 0 if phase.link == "nvlink" else 5
    kv = "fp8_e4m3fn" if big else "auto"
    # Calls per case: one untimed warm-up, then timed ones (displaced: a synchronous warm-up step, one timed
    # synchronous step, then timed stale steps). 14B steps take seconds: fewer repetitions.
    reps = 1 if big else 3
    later = 10 if phase.link != "nvlink" else 0
    cases = []
    if phase.baseline:
        cases.append(Case("single b1", model, "single", 1, calls=1 + reps, priority=base))
        if not big:  # 14B: a CFG step on one GPU is taken as two batch-1 forwards (the report marks it ~)
            cases.append(Case("single b2", model, "single", 2, calls=1 + reps, priority=base + 20.2))
    cases += [
        Case(
            f"displaced{' fp8kv' if big else ''}",
            model,
            "ours",
            1,
            "displaced",
            kv,
            calls=3 + reps,
            priority=base + 0.1,
        ),
        Case("ulysses", model, "ours", 1, "ulysses", calls=1 + reps, priority=base + 0.2),
        Case("peer ulysses", model, "peer", 1, "ulysses", calls=1 + reps, priority=base + 0.3),
        Case("sync", model, "ours", 1, "sync", calls=1 + reps, priority=base + 0.4),
        Case("bound", model, "bound", 1, "displaced", kv, calls=1 + reps, priority=base + 0.5),
    ]
    if not big:
        cases.append(
            Case("displaced fp8kv", model, "ours", 1, "displaced", "fp8_e4m3fn", calls=3 + reps, priority=base + 0.6)
        )
    if "compiled" in args.peer_variants:  # after the eager peer: compiling is in place
        cases.append(
            Case(
                "peer ulysses compiled",
                model,
                "peer",
                1,
                "ulysses",
                calls=1 + reps,
                priority=base + 0.25,
                extra={"compiled": True},
            )
        )
        cases.append(
            Case(
                "peer ulysses compiled b2",
                model,
                "peer",
                2,
                "ulysses",
                calls=1 + reps,
                priority=base + 20.15 + later,
                extra={"compiled": True},
            )
        )
    if phase.n % 2 == 0:
        cases.append(
            Case(
                "displaced cfg-par b2",
                model,
                "ours",
                2,
                "displaced",
                kv,
                True,
                calls=3 + reps,
                priority=base + 20.1 + later,
            )
        )
    if phase.baseline:
        fid_steps = args.fidelity_steps
        cases.append(Case("fidelity", model, "fidelity", 2, calls=fid_steps, priority=base + (60 if big else 8.3)))
    for case in cases:
        if case.mode == "ulysses" and heads % (phase.n // (2 if case.cfg_parallel else 1)):
            case.extra["skip"] = f"{heads} heads do not split over {phase.n}"
        if case.kind == "fidelity":
            single_b2 = per_rank_estimate(model, phase.n, phase.link, "single", 2, False)
            per_mode = per_rank_estimate(model, phase.n, phase.link, "ours", 2, False)
            case.est_s = case.calls * (single_b2 + 7 * per_mode) + 8 * 2.0
        else:
            step = per_rank_estimate(model, phase.n, phase.link, case.kind, case.batch, case.cfg_parallel)
            case.est_s = case.calls * step + (6.0 if case.kind == "peer" else 1.0)
            if case.extra.get("compiled"):  # one compile per batch size
                case.est_s += COMPILE_S[model]
    return cases


def make_phases(args) -> list[Phase]:
    if args.phases:
        phases = []
        for i, item in enumerate(args.phases.split(",")):
            n, link = item.split(":")
            phases.append(Phase(int(n), link, baseline=i == 0))
    else:
        ns = [args.gpus] + ([2] if args.gpus >= 4 else [])
        phases = [
            Phase(n, link, baseline=(n == ns[0] and link == "nvlink")) for n in ns for link in ("nvlink", "p2p-off")
        ]
    args.max_n = max(p.n for p in phases)
    for phase in phases:
        for model in args.models:
            phase.cases += build_cases(model, phase, args)
    return phases


def setup_s(model: str, compile_blocks: bool) -> float:
    return SETUP_S[model] + (COMPILE_S[model] if compile_blocks else 0.0)


def select(phases: list[Phase], budget: float, scale: float, compile_blocks: bool = False) -> float:
    """Greedy by priority: mark cases ``chosen`` while the estimated total fits; returns the estimate."""
    everything = sorted((c.priority, i, j) for i, p in enumerate(phases) for j, c in enumerate(p.cases))
    total, used_phases, used_models = 0.0, set(), set()
    for case_list in (p.cases for p in phases):
        for c in case_list:
            c.extra.pop("chosen", None)
    for _, i, j in everything:
        case = phases[i].cases[j]
        if case.extra.get("done") or "skip" in case.extra:
            continue
        cost = case.est_s * scale
        if i not in used_phases:
            cost += PHASE_OVERHEAD_S
        if (i, case.model) not in used_models:
            cost += setup_s(case.model, compile_blocks)
        if total + cost <= budget:
            total += cost
            case.extra["chosen"] = True
            used_phases.add(i)
            used_models.add((i, case.model))
    return total


# ============================================================================================================
# launcher
# ============================================================================================================
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args) -> int:
    began = time.monotonic()
    end = began + args.budget_s
    rec = C.Recorder(args.out, "multi_gpu")
    rec.results["meta"] = C.environment(cuda=False)
    rec.results.update(args={k: v for k, v in vars(args).items()}, phases=[], rows=[], fidelity=[], skipped=[])
    phases = make_phases(args)
    scale = 1.0
    estimate = select(phases, args.budget_s, scale, args.compile)
    rec.say(f"multi_gpu: {len(phases)} phases, budget {args.budget_s:.0f} s, planned ~{estimate:.0f} s")
    for phase in phases:
        chosen = [f"{c.model} {c.name} ~{c.est_s:.0f}s" for c in phase.cases if c.extra.get("chosen")]
        rec.say(f"  plan {phase.label}: {', '.join(chosen) or 'nothing'}")
    if args.dry_run:
        return 0
    work = Path(tempfile.mkdtemp(prefix="wdf-multi-"))
    for index, phase in enumerate(phases):
        remaining = end - time.monotonic()
        select(phases[index:], remaining, scale, args.compile)
        chosen = [c for c in phase.cases if c.extra.get("chosen")]
        if not chosen:
            rec.say(f"-- {phase.label}: skipped (nothing fits the {remaining:.0f} s left)")
            continue
        allot = (
            PHASE_OVERHEAD_S
            + sum(setup_s(m, args.compile) for m in {c.model for c in chosen})
            + sum(c.est_s for c in chosen) * scale
        )
        deadline = time.monotonic() + min(remaining, allot * 1.3 + 20)
        rec.say(
            f"-- {phase.label}: {len(chosen)} cases, ~{allot:.0f} s (deadline in {deadline - time.monotonic():.0f} s)"
        )
        result = run_phase(args, phase, chosen, work, index, deadline, rec)
        rec.results["phases"].append(result["summary"])
        rec.results["rows"] += result["rows"]
        rec.results["fidelity"] += result["fidelity"]
        for c in phase.cases:
            if c in chosen:
                c.extra["done"] = True
        scale = calibrate(rec.results["rows"], scale)
        rec.save()
    rec.results["skipped"] += [
        f"{p.label} {c.model} {c.name}"
        for p in phases
        for c in p.cases
        if not c.extra.get("done") and "skip" not in c.extra
    ]
    report(rec, final=True)
    rec.say(f"multi_gpu done in {time.monotonic() - began:.0f} s")
    rec.save()
    return 0


def calibrate(rows: list[dict], scale: float) -> float:
    ratios = [r["step_s"] / r["est_step_s"] for r in rows if r.get("step_s") and r.get("est_step_s")]
    if not ratios:
        return scale
    return min(2.0, max(0.5, sorted(ratios)[len(ratios) // 2]))


def run_phase(args, phase: Phase, chosen: list[Case], work: Path, index: int, deadline: float, rec) -> dict:
    spec = dict(
        n=phase.n,
        link=phase.link,
        baseline=phase.baseline,
        deadline_unix=time.time() + (deadline - time.monotonic()),
        tiny=args.tiny,
        seed=args.seed,
        split_mode=args.split_mode,
        patch_size=args.patch_size,
        fidelity_steps=args.fidelity_steps,
        fidelity_warmup=args.fidelity_warmup,
        attention=args.attention,
        compile=args.compile,
        ours_attention=args.ours_attention,
        models=[m for m in args.models if any(c.model == m for c in chosen)],
        cases=[dict(c.__dict__, extra={k: v for k, v in c.extra.items() if k != "chosen"}) for c in chosen],
        results=str(work / f"phase{index}.jsonl"),
        refs=str(work),
    )
    spec_path = work / f"phase{index}.json"
    spec_path.write_text(json.dumps(spec))
    port = free_port()
    procs, logs = [], []
    for rank in range(phase.n):
        env = dict(os.environ, **C.SAFE_NCCL_ENV)
        env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(phase.n), MASTER_ADDR="127.0.0.1")
        env.update(MASTER_PORT=str(port), PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1" if args.tiny else "4")
        if phase.link == "p2p-off":
            env["NCCL_P2P_DISABLE"] = "1"
        else:
            env.pop("NCCL_P2P_DISABLE", None)
        log = open(work / f"phase{index}.rank{rank}.log", "w")
        logs.append(log)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(spec_path)]
        stdout = None if rank == 0 else log
        procs.append(subprocess.Popen(cmd, env=env, stdout=stdout, stderr=log))
    timed_out = False
    while any(p.poll() is None for p in procs):
        if time.monotonic() > deadline + args.grace_s:
            timed_out = True
            for p in procs:
                if p.poll() is None:
                    p.kill()
            break
        if any(p.poll() not in (None, 0) for p in procs):  # one rank died: give the others a moment, then stop
            time.sleep(min(20.0, max(0.0, deadline + args.grace_s - time.monotonic())))
            for p in procs:
                if p.poll() is None:
                    p.kill()
            break
        time.sleep(0.5)
    for p in procs:
        p.wait()
    for log in logs:
        log.close()
    codes = [p.returncode for p in procs]
    rows, fidelity = [], []
    path = Path(spec["results"])
    if path.exists():
        for line in path.read_text().splitlines():
            item = json.loads(line)
            (fidelity if item.get("kind") == "fidelity" else rows).append(item)
    tails = {}
    for rank in range(phase.n):
        text = (work / f"phase{index}.rank{rank}.log").read_text(errors="replace")
        tails[rank] = text[-3000:]
        if rec.out:
            with open(rec.out / "multi_gpu_ranks.log", "a") as f:
                f.write(f"\n===== {phase.label} rank {rank} (exit {codes[rank]}) =====\n{text[-60000:]}")
    if timed_out or any(codes):
        rec.say(f"   {phase.label}: exit codes {codes}{' (killed at the deadline)' if timed_out else ''}")
        for rank, tail in tails.items():
            if codes[rank]:
                rec.say(f"   rank {rank} log tail:\n" + "\n".join(tail.splitlines()[-15:]))
    summary = dict(label=phase.label, n=phase.n, link=phase.link, codes=codes, timed_out=timed_out, cases=len(rows))
    return dict(summary=summary, rows=rows, fidelity=fidelity)


# ============================================================================================================
# worker (one rank of a phase)
# ============================================================================================================
class Worker:
    def __init__(self, spec: dict):
        import torch.distributed as dist

        self.spec = spec
        self.rank = int(os.environ["RANK"])
        self.n = int(os.environ["WORLD_SIZE"])
        self.tiny = spec["tiny"]
        self.device = torch.device("cpu") if self.tiny else torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        self.dtype = torch.float32 if self.tiny else torch.bfloat16
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        else:
            torch.set_num_threads(1)
            torch.accelerator.device_count = lambda: 1  # diffusers maps rank -> device by count; CPU has none
        cfg_mod = C.pkg("distrifusion.config")
        C.init_process_group(
            cfg_mod.ParallelConfig(world_size=self.n),
            self.rank,
            self.device,
            master_addr=os.environ["MASTER_ADDR"],
            master_port=int(os.environ["MASTER_PORT"]),
            timeout_s=180,
        )
        self.dist = dist
        self.deadline = spec["deadline_unix"]
        self.out = open(spec["results"], "a") if self.rank == 0 else None
        self.scale = 1.0

    def say(self, *parts) -> None:
        if self.rank == 0:
            print(f"   [{self.spec['n']} {self.spec['link']}]", *parts, flush=True)

    # -- collectives helpers ---------------------------------------------------------------------------
    def barrier(self) -> None:
        C.synchronize(self.device)
        flag = torch.zeros(1, device=self.device)
        self.dist.all_reduce(flag)
        C.synchronize(self.device)

    def max_all(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        self.dist.all_reduce(t, op=self.dist.ReduceOp.MAX)
        return t.tolist()

    def all_ok(self, ok: bool) -> bool:
        t = torch.tensor([0.0 if ok else 1.0], device=self.device)
        self.dist.all_reduce(t, op=self.dist.ReduceOp.MAX)
        return float(t) == 0.0

    def decide(self, case: dict) -> str | None:
        """Rank 0 decides whether a case still fits the deadline and the memory plan; everyone follows."""
        reason = 0.0
        if time.time() + case["est_s"] * self.scale > self.deadline:
            reason = 1.0
        elif case["kind"] == "ours" and self.device.type == "cuda":
            plan = self.plan_gib(self.parallel_config(case, 2), case["batch"])
            total = torch.cuda.mem_get_info(self.device)[1] / 2**30
            if plan is not None and plan > total:
                reason = 2.0
        go = torch.tensor([reason], device=self.device)
        self.dist.broadcast(go, 0)
        return {0.0: None, 1.0: "deadline", 2.0: "memory plan exceeds the card"}[float(go.item())]

    def timed_calls(self, fn, calls: int) -> tuple[list[float], float]:
        """Back-to-back calls after an aligned start: per-call seconds (rank 0's events) and max wall/call."""
        self.barrier()
        t0 = time.perf_counter()
        if self.device.type == "cuda":
            events = [torch.cuda.Event(enable_timing=True) for _ in range(calls + 1)]
            events[0].record()
            for i in range(calls):
                fn()
                events[i + 1].record()
            torch.cuda.synchronize(self.device)
            per_call = [events[i].elapsed_time(events[i + 1]) / 1000 for i in range(calls)]
        else:
            per_call = []
            for _ in range(calls):
                s = time.perf_counter()
                fn()
                per_call.append(time.perf_counter() - s)
        wall = (time.perf_counter() - t0) / calls
        per_call = self.max_all(per_call)
        return per_call, self.max_all([wall])[0]

    def peak_gib(self) -> list[float]:
        if self.device.type != "cuda":
            return [float("nan")] * self.n
        mine = torch.tensor([torch.cuda.max_memory_allocated(self.device) / 2**30], device=self.device)
        rows = [torch.empty_like(mine) for _ in range(self.n)]
        self.dist.all_gather(rows, mine)
        return [float(r) for r in rows]

    def emit(self, row: dict) -> None:
        if self.out:
            self.out.write(json.dumps(row, default=str) + "\n")
            self.out.flush()

    # -- one model -------------------------------------------------------------------------------------
    def run_model(self, model_name: str, cases: list[dict]) -> None:
        self.cfg = C.wan_config(model_name)
        self.model_name = model_name
        self.shape = MODEL_SHAPE[model_name]
        t0 = time.monotonic()
        self.sd = C.random_state_dict(self.cfg, seed=self.spec["seed"], device=self.device, dtype=self.dtype)
        self.ours = C.build_ours(self.cfg, self.sd, self.device, self.dtype)
        self.ours.set_attention_backend(self.spec["ours_attention"])
        if self.spec["compile"]:
            self.ours.compile_blocks()
        self.peer = self.peer_model = None
        self.inputs = {b: C.make_inputs(self.cfg, self.shape, b, device=self.device, dtype=self.dtype) for b in (1, 2)}
        C.synchronize(self.device)
        self.say(f"{model_name}: built in {time.monotonic() - t0:.1f} s")
        self.refs = {}
        for case in cases:
            if case["model"] != model_name:
                continue
            why = self.decide(case)
            if why:
                self.say(f"{model_name} {case['name']}: skipped ({why})")
                self.emit(dict(self.row_base(case), skipped=why))
                continue
            began = time.monotonic()
            try:
                row = getattr(self, f"case_{case['kind']}")(case)
                ok = True
            except Exception as exc:  # noqa: BLE001 - recorded; the phase goes on if the ranks still agree
                row = dict(self.row_base(case), error=f"{type(exc).__name__}: {exc}")
                traceback.print_exc()
                ok = False
            for obj in ("pw",):
                if hasattr(self, obj):
                    delattr(self, obj)
            C.free()
            if not self.all_ok(ok) and ok:
                row["error"] = "another rank failed"
            row["case_s"] = time.monotonic() - began
            if row.get("step_s") and case["est_s"]:
                est_step = per_rank_estimate(
                    model_name, self.n, self.spec["link"], case["kind"], case["batch"], case["cfg_parallel"]
                )
                row["est_step_s"] = est_step
                self.scale = min(2.0, max(0.5, row["step_s"] / est_step))
            self.emit(row)
            self.say(summarize(row))
        del self.ours, self.sd, self.inputs, self.refs
        self.peer = self.peer_model = None
        C.free()

    def row_base(self, case: dict) -> dict:
        return dict(
            model=self.model_name,
            shape=self.shape,
            n=self.n,
            link=self.spec["link"],
            case=case["name"],
            kind=case["kind"],
            mode=case["mode"],
            batch=case["batch"],
            kv_dtype=case["kv_dtype"],
            cfg_parallel=case["cfg_parallel"],
        )

    def parallel_config(self, case: dict, warmup_steps: int):
        cfg_mod = C.pkg("distrifusion.config")
        return cfg_mod.ParallelConfig(
            world_size=self.n,
            split_mode=self.spec["split_mode"],
            patch_size=self.spec["patch_size"],
            mode=case["mode"],
            cfg_parallel=case["cfg_parallel"],
            warmup_steps=warmup_steps,
            kv_dtype=case["kv_dtype"],
        )

    def plan_gib(self, pconfig, batch: int) -> float:
        plan_mod = C.pkg("distrifusion.memory_plan")
        c, f, h, w = C.SHAPES[self.shape]
        plan = plan_mod.plan_memory(
            self.cfg, pconfig, (1, c, f, h, w), "bf16", "disabled", None, guidance_batch=batch, check=False
        )
        return plan.total_bytes / 2**30

    def check_against_ref(self, row: dict, batch: int, out: torch.Tensor) -> None:
        ref = self.reference(batch)
        if ref is not None:
            row["rel_err_vs_single"] = C.rel_err(out, ref)

    def reference(self, batch: int):
        """The single-GPU output for the timing inputs (computed in the baseline phase, kept on disk)."""
        if batch in self.refs:
            return self.refs[batch]
        path = Path(self.spec["refs"]) / f"ref_{self.model_name}_b{batch}.pt"
        self.refs[batch] = torch.load(path) if path.exists() else None
        return self.refs[batch]

    # -- cases -----------------------------------------------------------------------------------------
    def case_single(self, case: dict) -> dict:
        x, t, ctx = self.inputs[case["batch"]]
        C.reset_peak(self.device)
        with torch.no_grad(), C.sdpa_backend(self.spec["attention"]):
            out = self.ours(x, t, ctx)  # warm-up, and the reference of every other mode
            per_call, wall = self.timed_calls(lambda: self.ours(x, t, ctx), case["calls"] - 1)
        if self.rank == 0:
            torch.save(out.float().cpu(), Path(self.spec["refs"]) / f"ref_{self.model_name}_b{case['batch']}.pt")
        self.refs[case["batch"]] = out.float().cpu()
        row = dict(self.row_base(case), step_s=C.median(per_call), per_call_s=per_call, wall_s=wall)
        row.update(peak_gib=self.peak_gib(), clip_s=CLIP_STEPS * C.median(per_call) * (2 if case["batch"] == 1 else 1))
        row["clip_note"] = "2xb1" if case["batch"] == 1 else ""
        return row

    def case_ours(self, case: dict) -> dict:
        pm = C.pkg("distrifusion.parallel_model")
        displaced = case["mode"] == "displaced"
        pconfig = self.parallel_config(case, warmup_steps=2 if displaced else 0)
        x, t, ctx = self.inputs[case["batch"]]
        C.reset_peak(self.device)
        self.pw = pw = pm.ParallelWan(self.ours, pconfig, self.rank, self.device)
        try:
            pw.begin_job(pconfig.schedule(0))
            with torch.no_grad(), C.sdpa_backend(self.spec["attention"]):
                if displaced:
                    pw(x, t, ctx)  # synchronous warm-up step (first call: allocations, plans)
                    sync_calls, _ = self.timed_calls(lambda: pw(x, t, ctx), 1)  # synchronous step 2
                    per_call, wall = self.timed_calls(lambda: pw(x, t, ctx), case["calls"] - 2)  # stale steps
                    sync_s = sync_calls[0]
                else:
                    pw(x, t, ctx)
                    per_call, wall = self.timed_calls(lambda: pw(x, t, ctx), case["calls"] - 1)
                    sync_s = None
                out = pw(x, t, ctx)
            stats = dict(pw.stats)
        finally:
            pw.close()
        step = C.median(per_call)
        row = dict(self.row_base(case), step_s=step, per_call_s=per_call, wall_s=wall, sync_step_s=sync_s)
        row.update(peak_gib=self.peak_gib(), plan_gib=self.plan_gib(pconfig, case["batch"]))
        row["stats"] = {k: v for k, v in stats.items() if k != "partition"}
        row["partition"] = stats.get("partition")
        if displaced:
            row["clip_s"] = PRODUCT_WARMUP * sync_s + (CLIP_STEPS - PRODUCT_WARMUP) * step
        else:
            row["clip_s"] = CLIP_STEPS * step
        if case["batch"] == 1:
            row["clip_s"] *= 2
            row["clip_note"] = "2xb1"
        self.check_against_ref(row, case["batch"], out)
        return row

    def case_bound(self, case: dict) -> dict:
        """This rank's share with stale K/V in place and no exchange: the compute every mode starts from."""
        partition = C.pkg("distrifusion.partition")
        pconfig = self.parallel_config(case, warmup_steps=0)
        x, t, ctx = self.inputs[case["batch"]]
        grid = self.ours.token_grid(x)
        parts = partition.partition_tokens(
            grid, pconfig.split_mode, pconfig.patch_size, pconfig.patch_parallel_degree, 0
        )
        index = parts[self.rank % len(parts)].computed_index.to(self.device)
        kv_dtype = torch.float8_e4m3fn if case["kv_dtype"] == "fp8_e4m3fn" else self.dtype
        cfg = self.cfg
        attn = C.StaleKVAttention(
            self.ours.blocks[0].self_attn.attention_fn,
            total_tokens=math.prod(grid),
            batch=case["batch"],
            heads=cfg.num_heads,
            head_dim=cfg.dim // cfg.num_heads,
            dtype=self.dtype,
            kv_dtype=kv_dtype,
            device=self.device,
        )
        C.reset_peak(self.device)
        with C.swapped_attention(self.ours, lambda layer, inner: attn), torch.no_grad():
            with C.sdpa_backend(self.spec["attention"]):
                self.ours(x, t, ctx, token_index=index)
                per_call, wall = self.timed_calls(lambda: self.ours(x, t, ctx, token_index=index), case["calls"] - 1)
        row = dict(self.row_base(case), step_s=C.median(per_call), per_call_s=per_call, wall_s=wall)
        row.update(peak_gib=self.peak_gib(), tokens=int(index.numel()))
        return row

    def build_peer(self, compiled: bool = False):
        """diffusers with context parallelism; ``compiled`` compiles its blocks in place (from then on, for good)."""
        if self.peer is None:
            from diffusers import ContextParallelConfig

            C.patch_diffusers_logger()
            model = C.build_diffusers(self.cfg, C.to_diffusers_layout(self.sd), self.device, self.dtype)
            model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=self.n))
            self.peer_model, self.peer = model, C.diffusers_callable(model)
        if compiled and not getattr(self.peer_model, "_bench_compiled", False):
            C.compile_diffusers(self.peer_model)
            self.peer_model._bench_compiled = True
        return self.peer

    def case_peer(self, case: dict) -> dict:
        x, t, ctx = self.inputs[case["batch"]]
        C.reset_peak(self.device)
        compiled = bool(case["extra"].get("compiled"))
        peer = self.build_peer(compiled)
        with torch.no_grad(), C.sdpa_backend(self.spec["attention"]):
            began = time.perf_counter()
            out = peer(x, t, ctx)  # warm-up (compiled: compiles for this shape)
            first_call_s = time.perf_counter() - began
            per_call, wall = self.timed_calls(lambda: peer(x, t, ctx), case["calls"] - 1)
        step = C.median(per_call)
        row = dict(self.row_base(case), step_s=step, per_call_s=per_call, wall_s=wall, peak_gib=self.peak_gib())
        row.update(compiled=compiled, first_call_s=first_call_s)
        row["clip_s"] = CLIP_STEPS * step * (2 if case["batch"] == 1 else 1)
        row["clip_note"] = "2xb1" if case["batch"] == 1 else ""
        self.check_against_ref(row, case["batch"], out)
        return row

    def case_fidelity(self, case: dict) -> dict:
        """A short CFG sample per mode vs the one-GPU sample (every rank samples the reference at once)."""
        pm, sampling = C.pkg("distrifusion.parallel_model"), C.pkg("wanvideo.sampling")
        gen = torch.Generator("cpu").manual_seed(11)
        text_len = 16 if self.tiny else C.TEXT_LEN
        positive = torch.randn(1, text_len // 4, self.cfg.text_dim, generator=gen)
        negative = torch.randn(1, text_len // 4, self.cfg.text_dim, generator=gen)
        c, f, h, w = C.SHAPES[self.shape]
        steps, warm = case["calls"], self.spec["fidelity_warmup"]
        kw = dict(latent_shape=(1, c, f, h, w), seed=3, steps=steps, cfg=5.0, shift=5.0, device=self.device)
        kw["text_len"] = text_len
        kv = "fp8_e4m3fn" if self.model_name == "14B" else "auto"
        runs = [("single", None, 0)]
        runs += [
            ("displaced", dict(mode="displaced", kv_dtype=kv), 0),
            ("displaced", dict(mode="displaced", kv_dtype=kv), 2),
        ]
        if kv == "auto":
            runs.append(("displaced fp8kv", dict(mode="displaced", kv_dtype="fp8_e4m3fn"), 0))
        if self.n % 2 == 0:
            runs.append(("displaced cfg-par", dict(mode="displaced", kv_dtype=kv, cfg_parallel=True), 0))
        runs += [("sync", dict(mode="sync"), 0)]
        if self.cfg.num_heads % self.n == 0:
            runs += [("ulysses", dict(mode="ulysses"), 0), ("peer ulysses", "peer", 0)]
        results, ref = [], None
        for name, settings, sync_frequency in runs:
            if time.time() > self.deadline:
                break
            began = time.monotonic()
            with torch.no_grad(), C.sdpa_backend(self.spec["attention"]):
                if settings is None:
                    latent = sampling.sample(self.ours, positive, negative, **kw)
                elif settings == "peer":
                    latent = sampling.sample(self.build_peer(), positive, negative, **kw)
                else:
                    full = dict(mode="displaced", kv_dtype="auto", cfg_parallel=False, calls=0)
                    full.update(settings)
                    pconfig = self.parallel_config(full, warmup_steps=warm)
                    pw = pm.ParallelWan(self.ours, pconfig, self.rank, self.device)
                    try:
                        pw.begin_job(pconfig.schedule(sync_frequency))
                        latent = sampling.sample(pw, positive, negative, **kw)
                    finally:
                        pw.close()
                        del pw
            C.free()
            if ref is None:
                ref = latent
            item = dict(
                kind="fidelity",
                model=self.model_name,
                n=self.n,
                link=self.spec["link"],
                mode=name,
                sync_frequency=sync_frequency,
                steps=steps,
                warmup_steps=warm,
                rel_err=C.rel_err(latent, ref),
                psnr_db=C.psnr(latent, ref),
                seconds=time.monotonic() - began,
            )
            results.append(item)
            self.emit(item)
        return dict(self.row_base(case), kind="fidelity_done", fidelity_runs=len(results))


def summarize(row: dict) -> str:
    if "error" in row:
        return f"{row['model']} {row['case']}: ERROR {row['error']}"
    if "skipped" in row:
        return f"{row['model']} {row['case']}: skipped ({row['skipped']})"
    if row["kind"] == "fidelity_done":
        return f"{row['model']} fidelity: {row.get('fidelity_runs')} runs in {row.get('case_s', 0):.0f} s"
    text = f"{row['model']} {row['case']}: {row['step_s']:.4f} s/step"
    if row.get("sync_step_s"):
        text += f" (sync step {row['sync_step_s']:.4f})"
    if row.get("peak_gib"):
        text += f", peak {max(row['peak_gib']):.1f} GiB"
    if row.get("plan_gib"):
        text += f" (plan {row['plan_gib']:.1f})"
    if "rel_err_vs_single" in row:
        text += f", err vs 1 GPU {row['rel_err_vs_single']:.1e}"
    return text


def worker_main(spec_path: str) -> int:
    C.safe_env()
    spec = json.loads(Path(spec_path).read_text())
    worker = Worker(spec)
    try:
        for model in spec["models"]:
            worker.run_model(model, spec["cases"])
    finally:
        worker.barrier()
        worker.dist.destroy_process_group()
    return 0


# ============================================================================================================
# tables
# ============================================================================================================
def report(rec, final: bool = True) -> None:
    rows = [r for r in rec.results["rows"] if "step_s" in r]
    if not rows:
        return
    singles = {(r["model"], r["batch"]): r["step_s"] for r in rows if r["kind"] == "single"}
    estimated = {(m, 2) for (m, b) in singles if b == 1 and (m, 2) not in singles}
    singles.update({key: 2 * singles[(key[0], 1)] for key in estimated})  # batch 2 ~ two batch-1 forwards
    peers = reference_peers(rows)
    bounds = {(r["model"], r["n"], r["link"], r["batch"]): r["step_s"] for r in rows if r["kind"] == "bound"}
    table = []
    kinds = {"single": 0, "bound": 1, "ours": 2, "peer": 3}

    def order(r):
        return (
            r["model"] != "14B",
            r["model"],
            r["kind"] != "single",
            -r["n"],
            r["link"],
            kinds[r["kind"]],
            r["case"],
        )

    for r in sorted(rows, key=order):
        single = singles.get((r["model"], r["batch"]))
        peer = peers.get((r["model"], r["n"], r["link"], r["batch"]))
        bound = bounds.get((r["model"], r["n"], r["link"], 1)) if r["batch"] == 1 else None
        exposed = r["step_s"] - bound if bound and r["kind"] in ("ours", "peer") else None
        peak = C.fmt(max(r["peak_gib"]) if r.get("peak_gib") else None, ".1f")
        table.append(
            [
                r["model"],
                r["link"] if r["kind"] != "single" else "-",
                r["n"] if r["kind"] != "single" else 1,
                r["case"],
                r["batch"],
                C.fmt(r["step_s"], ".3f"),
                C.fmt(single / r["step_s"] if single else None, ".2f")
                + ("~" if (r["model"], r["batch"]) in estimated and r["kind"] != "single" else ""),
                C.fmt(r["step_s"] / peer if peer and r["kind"] in ("ours", "peer") else None, ".3f"),
                C.fmt(exposed, ".3f"),
                peak + ("/" + C.fmt(r["plan_gib"], ".1f") if r.get("plan_gib") else ""),
                C.fmt(r.get("clip_s"), ".0f"),
                C.fmt(r.get("rel_err_vs_single"), ".0e"),
            ]
        )
    title = (
        "## Multi-GPU (1.3B 480p x81, 14B 720p x81, bf16). step = one forward at batch B; speedup vs our 1 GPU at "
        "that batch (~: batch 2 taken as 2x batch 1); /peer = time / the compiled peer's at that batch (the eager "
        "peer's where the compiled one did not run); exposed = step - no-exchange bound; "
        "peak/plan = max over ranks / memory plan; clip = 50 CFG steps (batch-1 rows x2; displaced: 4 sync steps)"
    )
    rec.say("")
    rec.say(title if final else "(so far)")
    headers = ["model", "link", "N", "case", "B", "step s", "speedup", "/peer", "exposed s", "peak/plan GiB"]
    headers += ["clip s", "err vs 1GPU"]
    rec.say(C.table(headers, table))
    if final and rec.results["fidelity"]:
        rec.say("")
        rec.say("## Fidelity: final latent of a short CFG sample vs the one-GPU sample (same seed)")
        fid = [
            [
                f["model"],
                f["n"],
                f["mode"],
                f["sync_frequency"] if "displaced" in f["mode"] else "-",
                f"{f['steps']}/{f['warmup_steps']}",
                C.fmt(f["rel_err"], ".2e"),
                C.fmt(f["psnr_db"], ".1f"),
            ]
            for f in rec.results["fidelity"]
        ]
        rec.say(C.table(["model", "N", "mode", "sync freq", "steps/warm-up", "rel err", "PSNR dB"], fid))
    if final:
        for line in targets(rows):
            rec.say(line)
        errors = [r for r in rec.results["rows"] if "error" in r]
        for r in errors:
            rec.say(f"ERROR {r['model']} {r['link']} N={r['n']} {r['case']}: {r['error'][:300]}")
        if rec.results["skipped"]:
            rec.say("not run (budget): " + "; ".join(rec.results["skipped"]))


def reference_peers(rows: list[dict]) -> dict[tuple, float]:
    """(model, N, link, batch) -> the peer's step: compiled where it ran, else eager."""
    peers: dict[tuple, float] = {}
    for r in sorted(
        (r for r in rows if r["kind"] == "peer" and r.get("step_s")), key=lambda r: bool(r.get("compiled"))
    ):
        peers[(r["model"], r["n"], r["link"], r["batch"])] = r["step_s"]  # compiled rows sort last and win
    return peers


def targets(rows: list[dict]) -> list[str]:
    """The issue's targets, each with its measured value (only where both sides were measured)."""
    step = {(r["model"], r["n"], r["link"], r["case"]): r["step_s"] for r in rows if r["kind"] != "single"}
    peers = reference_peers(rows)
    for (model, n, link, batch), value in peers.items():  # the targets compare against the best peer
        if batch == 1:
            step[(model, n, link, "peer ulysses")] = value
    single = {r["model"]: r["step_s"] for r in rows if r["kind"] == "single" and r["batch"] == 1}
    lines = ["", "## Targets (issue 10; only those whose inputs were measured)"]

    def line(text: str, value: float | None, limit: float, below: bool) -> None:
        if value is None:
            return
        ok = value <= limit if below else value >= limit
        lines.append(f"- {text}: {value:.3f} ({'<=' if below else '>='} {limit}) {'MET' if ok else 'MISSED'}")

    for (model, n, link, case), _value in sorted(step.items()):
        peer = step.get((model, n, link, "peer ulysses"))
        disp = [
            v
            for (m, k, lk, c), v in step.items()
            if (m, k, lk) == (model, n, link) and c.startswith("displaced") and "b2" not in c
        ]
        ours = [
            v
            for (m, k, lk, c), v in step.items()
            if (m, k, lk) == (model, n, link) and c in ("displaced", "displaced fp8kv", "sync", "ulysses")
        ]
        bound = step.get((model, n, link, "bound"))
        if case != "peer ulysses" or peer is None:
            continue
        tag = f"{model} N={n} {link}"
        if link == "nvlink" and model == "14B":
            line(f"{tag}: best ours / peer", min(ours) / peer if ours else None, 0.85, True)
            line(
                f"{tag}: ulysses / peer",
                step[(model, n, link, "ulysses")] / peer if (model, n, link, "ulysses") in step else None,
                1.0,
                True,
            )
            line(f"{tag}: displaced / its no-exchange bound", min(disp) / bound if disp and bound else None, 1.03, True)
            cfg_parallel = step.get((model, n, link, "displaced cfg-par b2"))
            per_cfg_step = ([2 * min(ours)] if ours else []) + ([cfg_parallel] if cfg_parallel else [])
            peer_cfg_step = peers.get((model, n, link, 2), 2 * peer)  # its batch-2 call, else two batch-1 calls
            line(
                f"{tag}: best ours per CFG step (cond + uncond, CFG parallel counted) / peer's CFG step",
                min(per_cfg_step) / peer_cfg_step if per_cfg_step else None,
                0.85,
                True,
            )
        if link == "p2p-off" and n == 4 and disp:
            want = 3.6 if model == "14B" else 2.8
            line(
                f"{tag}: displaced speedup vs our 1 GPU",
                single[model] / min(disp) if model in single else None,
                want,
                False,
            )
            line(f"{tag}: displaced / peer", min(disp) / peer, 0.75, True)
    for r in rows:
        if r.get("plan_gib") and r.get("peak_gib") and r["model"] != "tiny":
            ratio = max(r["peak_gib"]) / r["plan_gib"]
            if abs(ratio - 1) > 0.10:
                lines.append(
                    f"- peak vs plan off by more than 10%: {r['model']} N={r['n']} {r['link']} {r['case']}: {max(r['peak_gib']):.1f} vs {r['plan_gib']:.1f} GiB"
                )
    return lines


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpus", type=int, default=None, help="GPUs of this machine (N = gpus, and 2 when gpus >= 4)")
    p.add_argument("--out", help="folder for multi_gpu.json, multi_gpu.log and multi_gpu_ranks.log")
    p.add_argument("--budget-s", type=float, default=540.0, help="wall seconds for everything (device call: 600)")
    p.add_argument("--grace-s", type=float, default=20.0, help="past a phase's deadline before its ranks are killed")
    p.add_argument("--tiny", action="store_true", help="CPU check: gloo, 2 ranks, toy model")
    p.add_argument("--models", default=None, help="comma list from 1.3B,14B (default both; tiny: tiny)")
    p.add_argument("--phases", default=None, help="override, e.g. 4:nvlink,4:p2p-off (first = baseline)")
    p.add_argument("--split-mode", default="spatial")
    p.add_argument("--patch-size", type=int, default=None, help="px (default 64; tiny 16)")
    p.add_argument("--fidelity-steps", type=int, default=None, help="sampler steps of the fidelity runs (default 8)")
    p.add_argument("--fidelity-warmup", type=int, default=None, help="synchronous steps first (default 2)")
    p.add_argument("--attention", default="sdpa", choices=["sdpa", "cudnn", "flash", "efficient", "math"])
    p.add_argument("--compile", action="store_true", help="ours with torch.compile'd blocks (the Loader's compile)")
    p.add_argument(
        "--peer-variants",
        default="eager,compiled",
        help="diffusers' configurations: eager (batch 1), compiled (compile_repeated_blocks(fullgraph=True), batch 1 "
        "and 2: the reference of the ratios when it ran); 'eager' alone skips compiling the peer",
    )
    p.add_argument("--ours-attention", default="sdpa", help="our attention backend (auto, sdpa, flash4, ...)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dry-run", action="store_true", help="print the plan (what fits the budget) and exit")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return args
    if args.tiny:
        args.gpus = args.gpus or 2
        args.models = ["tiny"]
        args.patch_size = args.patch_size or 16
        args.fidelity_steps = args.fidelity_steps or 4
        args.fidelity_warmup = 1 if args.fidelity_warmup is None else args.fidelity_warmup
    else:
        if not args.gpus:
            args.gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if args.gpus < 2:
            p.error("needs --gpus >= 2 (or --tiny)")
        args.models = (args.models or "1.3B,14B").split(",")
        args.patch_size = args.patch_size or 64
        args.fidelity_steps = args.fidelity_steps or 8
        args.fidelity_warmup = 2 if args.fidelity_warmup is None else args.fidelity_warmup
    if isinstance(args.models, str):
        args.models = args.models.split(",")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker_main(args.worker)
    C.safe_env()
    return launch(args)


if __name__ == "__main__":
    sys.exit(main())
