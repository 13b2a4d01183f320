"""The exact modes reproduce the single-process model: sync, ulysses, CFG parallel, displaced while synchronous.

Every check of one world size runs inside one spawned gloo group (CPU, fp32); each rank computes the
single-process reference itself and returns (relative error, digest of its output) per combination.
"""

from __future__ import annotations

import ast

import pytest
from parallel_harness import digest, rel_err, run_ranks, tiny_model

TOL = 1e-5
SPLITS = ("spatial", "temporal", "spatiotemporal")
# latent [B, C, F, H, W] (tiny Wan: 4 channels, 2x2 patchify) with the patch size it is cut at
SHAPES = (
    ((1, 4, 3, 14, 6), 32),  # token grid (3, 7, 3): 4 patch rows of 2, 1 -> uneven
    ((2, 4, 5, 12, 8), 16),  # (5, 6, 4), batch 2 = [cond; uncond]
    ((2, 4, 2, 18, 10), 32),  # (2, 9, 5): only 2 frames
)


def _inputs(shape, steps, seed=0):
    import torch

    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen)
    context = torch.randn(shape[0], 9, 32, generator=gen)
    out = []
    for step in range(steps):
        x = x + 0.3 * torch.randn(shape, generator=gen)
        out.append((x.clone(), torch.full((shape[0],), 900.0 - 250.0 * step), context))
    return out


def exact_forward_matrix(rank: int, world_size: int) -> dict:
    """Several steps through ParallelWan for every mode x split x CFG-parallel x shape; errors vs the model."""
    import torch
    from wan_distrifusion.distrifusion.config import ParallelConfig
    from wan_distrifusion.distrifusion.parallel_model import ParallelWan
    from wan_distrifusion.wanvideo.errors import WanDistriFusionError

    models = {4: tiny_model(0)}
    if world_size == 3:  # Ulysses over 3 ranks needs heads divisible by 3
        models[6] = tiny_model(0, dim=96, num_heads=6, ffn_dim=192)
    results = {}
    with torch.no_grad():
        references = {}
        for heads, model in models.items():
            for shape, _ in SHAPES:
                references[heads, shape] = [model(x, t, c) for x, t, c in _inputs(shape, 3)]
        for mode in ("sync", "ulysses", "displaced"):
            for cfg_parallel in (False, True) if world_size % 2 == 0 else (False,):
                heads = 6 if mode == "ulysses" and world_size == 3 else 4
                model = models[heads]
                for split in SPLITS:
                    for shape, patch in SHAPES:
                        key = f"{mode}/{split}/cfgp={cfg_parallel}/{shape}"
                        config = ParallelConfig(
                            world_size=world_size,
                            split_mode=split,
                            patch_size=patch,
                            mode=mode,
                            cfg_parallel=cfg_parallel,
                            patch_overlap=16 if mode == "displaced" else 0,
                            warmup_steps=1,
                            comm_backend="builtin",
                        )
                        runner = ParallelWan(model, config, rank, "cpu")
                        runner.begin_job(config.schedule(1))  # displaced: warm-up then every step synchronous
                        try:
                            errors, last = [], None
                            for (x, t, c), ref in zip(_inputs(shape, 3), references[heads, shape]):
                                last = runner(x, t, c)
                                errors.append(rel_err(last, ref))
                            stats = runner.stats
                            results[key] = ("ok", max(errors), digest(last), stats["sync_steps"], stats["steps"])
                        except WanDistriFusionError as exc:
                            results[key] = ("error", str(exc))
                        finally:
                            runner.close()
        if world_size == 3:  # 4 heads over 3 ranks: a clear error before any collective
            try:
                ParallelWan(models[4], ParallelConfig(world_size=3, mode="ulysses"), rank, "cpu")
                results["ulysses-heads-error"] = ("no error",)
            except WanDistriFusionError as exc:
                results["ulysses-heads-error"] = ("error", str(exc))
    return results


def expected_refusal(world_size: int, key: str) -> str | None:
    """What the runtime must answer instead of running ``key``, or ``None`` when it must run: a temporal split
    with fewer latent frames than the ranks that share one batch item, and 4 heads over 3 Ulysses ranks."""
    if key == "ulysses-heads-error":
        return "parallel mode 'ulysses': the model's 4 attention heads do not split evenly over the 3 GPUs"
    _, split, cfgp, shape = key.split("/")
    frames = ast.literal_eval(shape)[2]
    ranks_per_item = world_size // 2 if cfgp == "cfgp=True" else world_size
    if split == "temporal" and frames < ranks_per_item:
        return f"split mode 'temporal': the latent has {frames} latent frames"
    return None


def _check_matrix(world_size: int, per_rank: list[dict]) -> None:
    keys = per_rank[0].keys()
    refused = {key: expected_refusal(world_size, key) for key in keys}
    refused = {key: needle for key, needle in refused.items() if needle is not None}
    for key in keys:
        outcomes = [r[key] for r in per_rank]
        assert all(o == outcomes[0] for o in outcomes) or outcomes[0][0] == "ok", f"{key}: ranks disagree"
        if key in refused:
            assert outcomes[0][0] == "error" and refused[key] in outcomes[0][1], (
                f"{key}: expected a refusal, {outcomes[0]}"
            )
            continue
        assert outcomes[0][0] == "ok", (key, outcomes[0])
        errors = [o[1] for o in outcomes]
        assert max(errors) < TOL, f"{key}: relative error {max(errors):.2e} per rank {errors}"
        assert len({o[2] for o in outcomes}) == 1, f"{key}: ranks returned different outputs"
        assert outcomes[0][3] == outcomes[0][4] == 3, f"{key}: every step must have been synchronous"
    # what is refused, per world size (3 ranks: 2 latent frames x 3 modes + the heads; 4 ranks: 2 shapes x 3 modes)
    assert len(refused) == {2: 0, 3: 4, 4: 6}[world_size], sorted(refused)


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_exact_modes_match_single_process(world_size):
    per_rank = run_ranks("test_parallel_exact", "exact_forward_matrix", world_size)
    _check_matrix(world_size, per_rank)


# (parallel settings, job settings) of full sampling runs; every one exact
RUN_JOB_CASES = {
    2: [
        (dict(mode="sync", split_mode="spatial"), dict(sampler="euler")),
        (dict(mode="ulysses", split_mode="temporal"), dict(sampler="unipc")),
        (dict(mode="displaced", split_mode="spatiotemporal", patch_overlap=16, warmup_steps=4), dict(sampler="dpm++")),
        (dict(mode="displaced", split_mode="spatial", warmup_steps=0), dict(sync_frequency=1)),
        (dict(mode="sync", cfg_parallel=True), dict(sampler="unipc")),
        (dict(mode="sync", cfg_parallel=True), dict(cfg=1.0)),
        (dict(mode="sync", cfg_parallel=True, model="i2v"), dict(sampler="euler")),
    ],
    3: [
        (dict(mode="sync", split_mode="spatial"), dict(sampler="unipc")),
        (dict(mode="displaced", split_mode="spatiotemporal", warmup_steps=1), dict(sync_frequency=1)),
        (dict(mode="ulysses", split_mode="temporal", model="heads6"), dict(sampler="euler")),
    ],
    4: [
        (dict(mode="ulysses", split_mode="spatial", cfg_parallel=True), dict(sampler="unipc")),
        (dict(mode="sync", split_mode="spatiotemporal"), dict(sampler="dpm++")),
        (dict(mode="displaced", split_mode="temporal", cfg_parallel=True, warmup_steps=2), dict(sync_frequency=1)),
        (dict(mode="ulysses", split_mode="spatiotemporal", model="i2v"), dict(cfg=1.0)),
    ],
}


def run_job_matrix(rank: int, world_size: int) -> list:
    """Full sampling runs with the sampler on every rank (``sample_on_rank``): parallel vs ``world_size=1`` on the same rank."""
    import torch
    from tiny_wan import sample_on_rank as run_job
    from wan_distrifusion.distrifusion.config import ParallelConfig
    from wan_distrifusion.distrifusion.job import GenerationJob
    from wan_distrifusion.distrifusion.rank import last_stats

    models = {
        "t2v": tiny_model(0),
        "heads6": tiny_model(0, dim=96, num_heads=6, ffn_dim=192),
        "i2v": tiny_model(0, model_type="i2v"),
    }
    gen = torch.Generator().manual_seed(5)
    positive, negative = torch.randn(1, 7, 32, generator=gen), torch.randn(1, 5, 32, generator=gen)
    image_inputs = {
        "y": torch.randn(1, 8, 3, 14, 12, generator=gen),
        "clip_fea": torch.randn(1, 257, 32, generator=gen),
    }
    results = []
    for parallel, settings in RUN_JOB_CASES[world_size]:
        label = f"{parallel} {settings}"
        parallel, settings = dict(parallel), dict(settings)
        model = models[parallel.pop("model", "t2v")]
        extra = {"model_kwargs": image_inputs} if model.config.model_type == "i2v" else {}
        job = GenerationJob(
            positive=positive,
            negative=negative,
            width=96,
            height=112,
            length=9,
            steps=4,
            cfg=settings.pop("cfg", 5.0),
            seed=11,
            extra=extra,
            **settings,
        )
        reference = run_job(model, ParallelConfig(world_size=1), 0, "cpu", job)
        steps_seen = []
        config = ParallelConfig(world_size=world_size, patch_size=16, comm_backend="builtin", **parallel)
        latent = run_job(model, config, rank, "cpu", job, callback=lambda i, n, x, seen=steps_seen: seen.append(i))
        stats = last_stats(model)
        results.append(
            (
                label,
                rel_err(latent, reference),
                digest(latent),
                steps_seen,
                stats["steps"],
                stats["sync_steps"],
                stats["comm_backend"],
            )
        )
    return results


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_run_job_matches_single_process(world_size):
    per_rank = run_ranks("test_parallel_exact", "run_job_matrix", world_size)
    for case in zip(*per_rank):
        name = case[0][0]
        errors = [c[1] for c in case]
        assert max(errors) < TOL, f"{name}: relative error of the final latent {max(errors):.2e}"
        assert len({c[2] for c in case}) == 1, f"{name}: ranks returned different latents"
        assert all(c[3] == [0, 1, 2, 3] for c in case), f"{name}: callback steps {case[0][3]}"
        assert case[0][4] == case[0][5] == 4, f"{name}: all 4 steps synchronous, got {case[0][4:6]}"
