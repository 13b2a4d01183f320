"""Displaced (DistriFusion) mode: exact while synchronous, stale afterwards, with an error that shrinks as
the patch overlap grows and as the sync frequency falls toward 1; plus the builtin comm manager itself.

The measured errors are printed (``pytest -s``) as a table for the README.
"""

from __future__ import annotations

import pytest
from parallel_harness import digest, rel_err, run_ranks, tiny_model

OVERLAPS_PX = (0, 16, 32)
SYNC_FREQUENCIES = (0, 4, 2, 1)  # 0 = never after warm-up ... 1 = every step (exact)
STEPS, WARMUP = 10, 2
PINNED_TABLE = {(0, 0): 4.58e-3, (16, 0): 3.86e-3, (32, 0): 3.08e-3, (0, 4): 2.94e-3, (0, 2): 2.21e-3}
"""Final-latent relative error of the sweep below, (overlap px, sync frequency): measured, CPU fp32."""
PINNED_DTYPES = {("bf16", "sync"): 1.84e-4, ("fp8_e4m3fn", "sync"): 1.25e-3, ("fp8_e4m3fn", "displaced"): 4.77e-3}
"""The same with narrower K/V buffers (overlap 0, sync frequency 0): measured."""
PINNED_RTOL = 0.15


def displaced_sweep(rank: int, world_size: int) -> dict:
    """Full sampling runs (euler, CFG batch 2) for overlap x sync frequency, and K/V dtypes; errors vs exact."""
    import torch
    from tiny_wan import sample_on_rank as run_job
    from wan_distrifusion.distrifusion.config import ParallelConfig, is_synchronous_step
    from wan_distrifusion.distrifusion.job import GenerationJob
    from wan_distrifusion.distrifusion.rank import last_stats

    model = tiny_model(0, sharp=True)
    gen = torch.Generator().manual_seed(3)
    positive, negative = torch.randn(1, 7, 32, generator=gen), torch.randn(1, 5, 32, generator=gen)
    # 128 x 64 px, 9 frames: token grid (3, 8, 4); 2 ranks x 4 token rows; 16 px overlap = 1 row of halo
    base = dict(
        positive=positive,
        negative=negative,
        width=64,
        height=128,
        length=9,
        steps=STEPS,
        cfg=4.0,
        shift=3.0,
        seed=7,
        sampler="euler",
    )

    def trajectory(config: ParallelConfig, sync_frequency: int, use_rank: int):
        xs = []
        job = GenerationJob(sync_frequency=sync_frequency, **base)
        latent = run_job(model, config, use_rank, "cpu", job, callback=lambda i, n, x: xs.append(x.clone()))
        return latent, xs

    exact, exact_xs = trajectory(ParallelConfig(world_size=1), 0, 0)
    results = {"table": {}, "per_step": {}, "dtypes": {}, "digests": {}}
    for overlap in OVERLAPS_PX:
        for frequency in SYNC_FREQUENCIES:
            config = ParallelConfig(
                world_size=world_size,
                split_mode="spatial",
                patch_size=64,
                patch_overlap=overlap,
                mode="displaced",
                warmup_steps=WARMUP,
                comm_backend="builtin",
            )
            latent, xs = trajectory(config, frequency, rank)
            stats = last_stats(model)
            expected_sync = sum(is_synchronous_step(s, WARMUP, frequency) for s in range(STEPS))
            assert stats["sync_steps"] == expected_sync and stats["stale_steps"] == STEPS - expected_sync, stats
            assert stats["comm_backend"] == "builtin" and stats["kv_buffer_bytes"] > 0
            results["table"][overlap, frequency] = rel_err(latent, exact)
            results["per_step"][overlap, frequency] = [rel_err(a, b) for a, b in zip(xs, exact_xs)]
            results["digests"][overlap, frequency] = digest(latent)
    for kv_dtype in ("bf16", "fp8_e4m3fn"):
        for mode in ("sync", "displaced"):
            config = ParallelConfig(
                world_size=world_size,
                split_mode="spatial",
                patch_size=16,
                mode=mode,
                warmup_steps=WARMUP,
                kv_dtype=kv_dtype,
                comm_backend="builtin",
            )
            latent, _ = trajectory(config, 0, rank)
            results["dtypes"][kv_dtype, mode] = rel_err(latent, exact)
    return results


def _format_table(table: dict) -> str:
    head = (
        "| patch overlap \\ sync frequency | "
        + " | ".join("never (0)" if f == 0 else f"every {f}" for f in SYNC_FREQUENCIES)
        + " |"
    )
    lines = [head, "|" + " --- |" * (len(SYNC_FREQUENCIES) + 1)]
    for overlap in OVERLAPS_PX:
        cells = " | ".join(f"{table[overlap, f]:.2e}" for f in SYNC_FREQUENCIES)
        lines.append(f"| {overlap} px | {cells} |")
    return "\n".join(lines)


@pytest.mark.slow
def test_displaced_error_shrinks_with_overlap_and_sync_frequency():
    per_rank = run_ranks("test_displaced", "displaced_sweep", 2)
    result = per_rank[0]
    for key in result["digests"]:
        assert per_rank[1]["digests"][key] == result["digests"][key], f"{key}: ranks disagree"
    table = result["table"]
    print(
        f"\nDisplaced mode, final-latent relative error vs single GPU (2 ranks, {STEPS} euler steps, "
        f"{WARMUP} warm-up, CFG batch 2, tiny Wan):\n{_format_table(table)}"
    )
    print(
        "K/V buffer dtype (overlap 0, sync frequency 0):",
        {f"{k[0]}/{k[1]}": f"{v:.2e}" for k, v in result["dtypes"].items()},
    )
    # warm-up steps are synchronous: identical to the single-GPU trajectory
    for key, errors in result["per_step"].items():
        assert max(errors[:WARMUP]) < 1e-5, f"{key}: warm-up differs from exact: {errors[:WARMUP]}"
    for overlap in OVERLAPS_PX:
        assert table[overlap, 1] < 1e-5, "sync frequency 1 must be exact"
        first_stale = result["per_step"][overlap, 0][WARMUP]
        assert first_stale > 1e-5, "after warm-up the stale K/V must actually be used"
        row = [table[overlap, f] for f in SYNC_FREQUENCIES]
        assert row == sorted(row, reverse=True), f"overlap {overlap} px: error must fall toward sync frequency 1: {row}"
    for frequency in (0, 4, 2):
        column = [table[o, frequency] for o in OVERLAPS_PX]
        assert column == sorted(column, reverse=True) and column[-1] < column[0], (
            f"sync frequency {frequency}: error must shrink as the overlap grows: {column}"
        )
    # narrower K/V buffers: small, finite quantisation error; fp8 coarser than bf16
    dtypes = result["dtypes"]
    assert 0 < dtypes["bf16", "sync"] < dtypes["fp8_e4m3fn", "sync"] < 0.1
    # pinned: the errors of this fixed case as measured (fp32 on CPU, deterministic); a real regression of the
    # stale K/V (older K/V, wrong halo, wrong ranks' K/V) moves them far more than PINNED_RTOL
    for (overlap, frequency), value in PINNED_TABLE.items():
        assert abs(table[overlap, frequency] - value) < PINNED_RTOL * value, (overlap, frequency, table)
    for key, value in PINNED_DTYPES.items():
        assert abs(dtypes[key] - value) < PINNED_RTOL * value, (key, dtypes)


def stale_repeat_checks(rank: int, world_size: int, comm_backend: str = "builtin") -> dict:
    """Same inputs every step: stale K/V equal fresh K/V, so stale steps must be exact (padding, halos, chunks)."""
    import torch
    from wan_distrifusion.distrifusion.config import ParallelConfig
    from wan_distrifusion.distrifusion.parallel_model import ParallelWan

    model = tiny_model(0, sharp=True)
    gen = torch.Generator().manual_seed(1)
    results = {}
    shapes = [((1, 4, 3, 14, 6), 16), ((2, 4, 5, 10, 8), 16), ((2, 4, 4, 18, 4), 32)]
    with torch.no_grad():
        for split in ("spatial", "temporal", "spatiotemporal"):
            for cfg_parallel in (False, True) if world_size % 2 == 0 else (False,):
                for (shape, patch), overlap in zip(shapes, (0, 16, 32)):
                    group = world_size // 2 if cfg_parallel else world_size
                    if split == "temporal" and shape[2] < group:
                        continue
                    x, context = torch.randn(shape, generator=gen), torch.randn(shape[0], 6, 32, generator=gen)
                    t = torch.full((shape[0],), 600.0)
                    exact = model(x, t, context)
                    config = ParallelConfig(
                        world_size=world_size,
                        split_mode=split,
                        patch_size=patch,
                        patch_overlap=overlap,
                        mode="displaced",
                        cfg_parallel=cfg_parallel,
                        warmup_steps=1,
                        comm_backend=comm_backend,
                    )
                    for checkpoint in (1, 3):
                        runner = ParallelWan(model, config, rank, "cpu", comm_checkpoint=checkpoint)
                        runner.begin_job(config.schedule(0))
                        errors = [rel_err(runner(x, t, context), exact) for _ in range(4)]
                        # a different input now: stale K/V of the old one must show
                        moved = runner(x + 0.5 * torch.randn(shape, generator=gen), t, context)
                        stats = runner.stats
                        runner.close()
                        key = f"{split}/cfgp={cfg_parallel}/{shape}/overlap={overlap}/checkpoint={checkpoint}"
                        results[key] = (
                            errors,
                            stats["sync_steps"],
                            stats["stale_steps"],
                            stats["comm_backend"],
                            digest(moved),
                        )
    return results


def check_stale_repeat(per_rank: list[dict], backend: str) -> None:
    for key, value in per_rank[0].items():
        errors, sync_steps, stale_steps, name, _ = value
        assert (sync_steps, stale_steps) == (1, 4), key
        assert name == backend, key
        for other in per_rank:
            assert max(other[key][0]) < 1e-5, f"{key}: stale step with unchanged inputs not exact: {other[key][0]}"
            assert other[key][4] == value[4], f"{key}: ranks disagree"


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [3, 4])
def test_stale_steps_are_exact_when_nothing_changed(world_size):
    check_stale_repeat(run_ranks("test_displaced", "stale_repeat_checks", world_size), "builtin")


def comm_manager_checks(rank: int, world_size: int) -> dict:
    """BuiltinCommManager alone: chunked async gathers, blocking gathers, fp8 as bytes."""
    import torch
    import torch.distributed as dist
    from wan_distrifusion.distrifusion.comm import BuiltinCommManager, transfer_dtype

    out = {}
    manager = BuiltinCommManager(group=None, group_rank=rank, group_size=world_size, device="cpu", comm_checkpoint=2)
    shapes = [(2, 3), (2, 3), (4,), (1, 5), (3,)]  # chunks [0, 1], [2, 3], [4]
    for shape in shapes:
        manager.register_tensor(shape, torch.float32)
    manager.create_buffer()
    for idx, shape in enumerate(shapes):
        manager.enqueue(idx, torch.full(shape, 100.0 * rank + idx))
    manager.flush()
    ok = True
    for idx, shape in enumerate(shapes):
        manager.wait(idx)
        for src, slab in enumerate(manager.get_buffer_list(idx)):
            ok &= bool((slab == 100.0 * src + idx).all()) and tuple(slab.shape) == shape
    out["async"] = ok
    manager.gather_now(3, torch.full((1, 5), -1.0 - rank))
    out["blocking"] = all(bool((s == -1.0 - src).all()) for src, s in enumerate(manager.get_buffer_list(3)))
    out["others untouched"] = bool((manager.get_buffer_list(2)[0] == 2.0).all())
    manager.clear()
    assert all(h is None for h in manager.handles)

    fp8 = BuiltinCommManager(group=None, group_rank=rank, group_size=world_size, device="cpu")
    fp8.register_tensor((4,), transfer_dtype(torch.float8_e4m3fn))
    fp8.create_buffer()
    values = torch.tensor([0.5, -2.0, 3.0, 448.0]) * (rank + 1)
    fp8.enqueue(0, values.to(torch.float8_e4m3fn).view(torch.uint8))
    fp8.clear()
    got = [s.view(torch.float8_e4m3fn).float() for s in fp8.get_buffer_list(0)]
    out["fp8"] = all(
        torch.equal(g, (torch.tensor([0.5, -2.0, 3.0, 448.0]) * (src + 1)).to(torch.float8_e4m3fn).float())
        for src, g in enumerate(got)
    )
    dist.barrier()
    return out


def test_builtin_comm_manager():
    for result in run_ranks("test_displaced", "comm_manager_checks", 3):
        assert result == {"async": True, "blocking": True, "others untouched": True, "fp8": True}
