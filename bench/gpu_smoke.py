"""GPU smoke test of the real code paths at world size 1 (one GPU): NCCL process group, the parallel
attention's collectives on a one-rank NCCL group, ``ParallelWan`` under the sampler, and a worker group
started, used, cancelled and stopped on CUDA. Tiny model, seconds.

    python bench/gpu_smoke.py [--out DIR] [--device cuda|cpu] [--workers 1]

Prints one PASS/FAIL line per check and exits 1 if any failed (``--device cpu`` uses gloo: a local check).
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Smoke:
    def __init__(self, args):
        self.args = args
        self.device = torch.device(args.device)
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.rec = C.Recorder(args.out, "gpu_smoke")
        self.rec.results["checks"] = []
        self.cfg = C.wan_config("tiny")
        self.sd = C.random_state_dict(self.cfg, seed=3, device=self.device, dtype=self.dtype)
        self.model = C.build_ours(self.cfg, self.sd, self.device, self.dtype)

    def check(self, name: str, fn) -> None:
        began = time.monotonic()
        try:
            detail = fn() or ""
            ok = True
        except Exception as exc:  # noqa: BLE001 - every check reports, none stops the others
            detail = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()[-2000:]}"
            ok = False
        seconds = time.monotonic() - began
        self.rec.results["checks"].append(dict(name=name, ok=ok, detail=detail, seconds=seconds))
        self.rec.say(f"{'PASS' if ok else 'FAIL'} {name} ({seconds:.1f} s) {detail}")
        self.rec.save()

    # ------------------------------------------------------------------------------------------------------
    def process_group(self) -> str:
        import torch.distributed as dist

        config = C.pkg("distrifusion.config").ParallelConfig(world_size=1)
        backend = C.init_process_group(config, 0, self.device, master_port=free_port(), timeout_s=120)
        value = torch.ones(4, device=self.device)
        dist.all_reduce(value)
        gathered = torch.empty(4, device=self.device)
        dist.all_gather_into_tensor(gathered, value)
        assert backend == ("nccl" if self.device.type == "cuda" else "gloo"), backend
        assert float(gathered.sum()) == 4.0
        return f"backend {backend}, world {dist.get_world_size()}"

    def runtime_on_one_rank(self) -> str:
        """Each mode's attention on a one-rank group: real collectives, and outputs equal to the plain model."""
        import torch.distributed as dist

        partition = C.pkg("distrifusion.partition")
        attention = C.pkg("distrifusion.attention")
        x, t, ctx = C.make_inputs(self.cfg, "tiny", 1, device=self.device, dtype=self.dtype)
        grid = self.model.token_grid(x)
        parts = partition.partition_tokens(grid, "spatial", 16, 1, 0)
        index = parts[0].computed_index.to(self.device)
        with torch.no_grad():
            ref = self.model(x, t, ctx)
        errs = []
        for mode, kv in (("sync", "auto"), ("ulysses", "auto"), ("displaced", "auto"), ("displaced", "fp8_e4m3fn")):
            runtime = attention.AttentionRuntime(
                mode,
                group=None,
                kv_group=dist.new_group([0]) if mode == "displaced" else None,
                group_rank=0,
                group_size=1,
                device=self.device,
                num_layers=len(self.model.blocks),
                kv_dtype=kv,
                comm_backend="builtin",
            )
            runtime.set_layout(parts, 1, self.cfg.num_heads, self.cfg.dim // self.cfg.num_heads, self.dtype)
            with C.swapped_attention(self.model, runtime.attention_fn), torch.no_grad():
                for step in range(3):  # synchronous, then (displaced) two stale steps
                    runtime.begin_step(step == 0)
                    tokens = self.model(x, t, ctx, token_index=index)
                    runtime.end_step()
                    out = self.model.unpatchify(tokens[:, : parts[0].num_own], grid)
                    err = C.rel_err(out, ref)
                    assert err < 1e-2, f"{mode}/{kv} step {step}: rel err {err:.2e}"
                runtime.reset()
            errs.append(f"{mode}/{kv} {err:.1e}")
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return "; ".join(errs)

    def small_job(self, steps: int):
        """A seeded 96x64x9 CFG job with euler (cheap on any GPU)."""
        gen = torch.Generator().manual_seed(5)
        return C.pkg("distrifusion.job").GenerationJob(
            positive=torch.randn(1, 8, self.cfg.text_dim, generator=gen),
            negative=torch.randn(1, 8, self.cfg.text_dim, generator=gen),
            width=96,
            height=64,
            length=9,
            steps=steps,
            cfg=5.0,
            seed=7,
            sampler="euler",
        )

    def parallel_wan_world1(self) -> str:
        """The sampler over ``rank.job_model`` at world size 1 in sync mode (2 steps, CFG) and ``ParallelWan`` with ``begin_job``."""
        config_mod = C.pkg("distrifusion.config")
        rank_mod, pm = C.pkg("distrifusion.rank"), C.pkg("distrifusion.parallel_model")
        config = config_mod.ParallelConfig(world_size=1, mode="sync")
        job = self.small_job(steps=2)
        steps = []
        latent = C.pkg("wanvideo.sampling").sample(
            rank_mod.job_model(self.model, config, 0, self.device, job),
            job.positive,
            job.negative,
            latent_shape=job.latent_shape(self.model.config.out_dim),
            seed=job.seed,
            steps=job.steps,
            cfg=job.cfg,
            sampler=job.sampler,
            callback=lambda i, n, x: steps.append(i),
            device=self.device,
        )
        assert steps == [0, 1], steps
        assert torch.isfinite(latent).all()
        wrapped = pm.ParallelWan(self.model, config, 0, self.device)
        wrapped.begin_job(config.schedule(0))
        x, t, ctx = C.make_inputs(self.cfg, "tiny", 2, device=self.device, dtype=self.dtype)
        with torch.no_grad():
            assert C.rel_err(wrapped(x, t, ctx), self.model(x, t, ctx)) == 0.0
        wrapped.close()
        return f"latent {tuple(latent.shape)}, steps {steps}, stats {wrapped.stats.get('comm_backend')}"

    def workers(self) -> str:
        """A worker group on this device: start, one job with progress, a cancelled job, status, close."""
        from safetensors.torch import save_file

        workers = C.pkg("distrifusion.workers")
        run_job = C.pkg("distrifusion.run").run_job
        config_mod = C.pkg("distrifusion.config")
        folder = Path(tempfile.mkdtemp(prefix="wdf-smoke-"))
        path = folder / "wan_tiny.safetensors"
        meta = {"wan_config": json.dumps({"num_heads": self.cfg.num_heads, "dim": self.cfg.dim})}
        save_file({k: v.detach().to("cpu", torch.float32).contiguous() for k, v in self.sd.items()}, str(path), meta)
        world = self.args.workers
        parallel = config_mod.ParallelConfig(world_size=world, mode="sync", patch_size=16)
        group = workers.WorkerGroup(
            C.pkg("distrifusion.settings").RuntimeSpec(
                model_path=str(path),
                precision="bf16" if self.device.type == "cuda" else "fp32",
                quantization="disabled",
                parallel=parallel,
                device=self.device.type,
                master_port=free_port(),
            )
        )
        events = []
        began = time.monotonic()
        group.start()
        started = time.monotonic() - began
        try:
            assert group.alive
            job = self.small_job(steps=3)
            latent = run_job(group, job, progress=events.append)
            assert torch.isfinite(latent).all() and len(events) == 3, (latent.shape, events)
            status = group.status()
            cancelled = False
            try:
                run_job(group, job, progress=None, cancelled=lambda: True)
            except workers.JobCancelled:
                cancelled = True
            assert cancelled, "a cancelled job must raise JobCancelled"
            again = run_job(group, job)  # the group is still usable after a cancel
            assert C.rel_err(again, latent) < 1e-3, C.rel_err(again, latent)
        finally:
            group.close()
        assert not group.alive
        return f"world {world}, started in {started:.1f} s, status keys {sorted(status)[:8]}, progress {events[-1]}"

    def finish(self) -> str:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
        return "destroyed"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--workers", type=int, default=1, help="ranks of the worker-group check (GPUs it uses)")
    args = p.parse_args(argv)
    C.safe_env()
    smoke = Smoke(args)
    smoke.rec.say(f"gpu_smoke on {args.device}: {smoke.rec.results['meta']}")
    smoke.check("process group (one rank)", smoke.process_group)
    smoke.check("parallel attention collectives on a one-rank group", smoke.runtime_on_one_rank)
    smoke.check("ParallelWan / job_model at world size 1", smoke.parallel_wan_world1)
    smoke.check("worker group start / run / cancel / close", smoke.workers)
    smoke.check("destroy process group", smoke.finish)
    failed = [c["name"] for c in smoke.rec.results["checks"] if not c["ok"]]
    smoke.rec.say(f"gpu_smoke: {len(smoke.rec.results['checks']) - len(failed)} passed, {len(failed)} failed {failed}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
