"""Wan 2.2 TI2V 5B (48 channels, per-frame and per-token timesteps) and image-to-video (``y`` + CLIP tokens: Wan 2.1
I2V and FLF2V; ``y`` only: Wan 2.2 A14B) through ``ParallelWan``: the exact modes equal the single process at 2, 3 and 4 ranks.

Every mode (sync, ulysses, displaced during its warm-up) x split mode x CFG parallel x uneven token grid runs
inside one gloo group per world size; each rank computes the single-process reference itself. In the temporal
splits some ranks hold the kept image frame (timestep 0) and some do not: they must still agree.
"""

from __future__ import annotations

import pytest
from parallel_harness import digest, rel_err, run_ranks, tiny_model
from wan_distrifusion.distrifusion.job import pixels_per_token

TOL = 1e-5
STEPS = 2
SPLITS = ("spatial", "temporal", "spatiotemporal")
# (frames, rows, cols) of the latent with the patch size it is cut at; batch 2 = [cond; uncond]
GRIDS = (  # patch sizes in px of 16-px tokens (doubled for the 5B's 32-px tokens)
    ((3, 14, 6), 32),  # token grid (3, 7, 3): 4 patch rows of 2, 1 -> uneven; 3 frames over 2 or 4 ranks: uneven
    ((5, 12, 8), 16),  # (5, 6, 4)
)
# name: (model overrides, what the calls carry)
CASES = {
    "ti2v-per-frame": (dict(in_dim=48, out_dim=48), "per_frame"),
    "ti2v-per-token": (dict(in_dim=48, out_dim=48), "per_token"),
    "wan21-i2v-y-clip": (dict(model_type="i2v"), "y_clip"),
    "wan21-flf2v-y-clip": (dict(model_type="i2v", image_positions=514), "y_clip"),
    "wan22-i2v-a14b-y": (dict(in_dim=12), "y"),
}


def _heads(world_size: int) -> dict:
    """Ulysses over 3 ranks needs heads divisible by 3."""
    return dict(dim=96, num_heads=6, ffn_dim=192) if world_size == 3 else {}


def _calls(config, kind: str, grid: tuple[int, int, int], seed: int = 0) -> list[tuple[tuple, dict]]:
    """``STEPS`` (args, kwargs) model calls for batch 2, different per item, as a sampler makes them."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    frames, rows, cols = grid
    shape = (2, config.out_dim, frames, rows, cols)
    x = torch.randn(shape, generator=gen)
    context = torch.randn(2, 9, config.text_dim, generator=gen)
    extra = {}
    if kind in ("y", "y_clip"):
        mask = torch.zeros(2, 4, frames, rows, cols)
        mask[:, :, 0] = 1.0
        image = torch.randn(2, config.concat_channels - 4, frames, rows, cols, generator=gen)
        extra["y"] = torch.cat([mask, image], dim=1)
    if kind == "y_clip":
        tokens = 2 * 257 if config.image_positions else 257  # FLF2V: the first and the last frame's
        extra["clip_fea"] = torch.randn(2, tokens, config.image_dim, generator=gen)
    calls = []
    for step in range(STEPS):
        x = x + 0.3 * torch.randn(shape, generator=gen)
        level = 900.0 - 300.0 * step
        if kind == "per_frame":  # Wan22ImageToVideoLatent: the first latent frame is kept, timestep 0
            t = torch.full((2, frames), level)
            t[:, 0] = 0.0
        elif kind == "per_token":
            tokens = frames * (rows // 2) * (cols // 2)
            t = torch.rand(2, tokens, generator=gen) * level
        else:
            t = torch.tensor([level, level - 50.0])
        calls.append(((x.clone(), t, context), extra))
    return calls


def wan22_forward_matrix(rank: int, world_size: int) -> dict:
    """Every case x mode x split x CFG parallel x grid: (status, max error, digest, sync steps, image-frame holders)."""
    import torch
    from wan_distrifusion.distrifusion.config import ParallelConfig
    from wan_distrifusion.distrifusion.parallel_model import ParallelWan
    from wan_distrifusion.wanvideo.errors import WanDistriFusionError

    results = {}
    with torch.no_grad():
        for case, (overrides, kind) in CASES.items():
            model = tiny_model(0, **overrides, **_heads(world_size))
            token_px = pixels_per_token(model.config)  # 32 px for the 5B (16x VAE), 16 for the others
            for (frames, rows, cols), patch_tokens in GRIDS:
                grid = (frames, rows, cols)
                patch = patch_tokens * token_px // 16
                calls = _calls(model.config, kind, grid)
                references = [model(*args, **kwargs) for args, kwargs in calls]
                for mode in ("sync", "ulysses", "displaced"):
                    for cfg_parallel in (False, True) if world_size % 2 == 0 else (False,):
                        for split in SPLITS:
                            config = ParallelConfig(
                                world_size=world_size,
                                split_mode=split,
                                patch_size=patch,
                                mode=mode,
                                cfg_parallel=cfg_parallel,
                                patch_overlap=token_px if mode == "displaced" else 0,
                                warmup_steps=STEPS,  # displaced: the whole run is its synchronous warm-up
                                comm_backend="builtin",
                            )
                            key = f"{case}/{mode}/{split}/cfgp={cfg_parallel}/{grid}"
                            runner = ParallelWan(model, config, rank, "cpu")
                            runner.begin_job()
                            try:
                                errors, last = [], None
                                for (args, kwargs), reference in zip(calls, references):
                                    last = runner(*args, **kwargs)
                                    errors.append(rel_err(last, reference))
                                token_grid = tuple(int(s) for s in model.token_grid(args[0]))
                                parts = runner.partition(token_grid)
                                per_frame = token_grid[1] * token_grid[2]
                                holders = [bool((p.computed_index < per_frame).any()) for p in parts]
                                results[key] = ("ok", max(errors), digest(last), runner.stats["sync_steps"], holders)
                            except WanDistriFusionError as exc:  # more ranks than latent frames (temporal)
                                results[key] = ("error", str(exc))
                            finally:
                                runner.close()
    return results


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_wan22_and_i2v_exact_modes_match_single_process(world_size):
    per_rank = run_ranks("test_parallel_wan22", "wan22_forward_matrix", world_size, timeout=600)
    worst = 0.0
    split_image_frame = 0
    ran = 0
    for key in per_rank[0]:
        outcomes = [r[key] for r in per_rank]
        if outcomes[0][0] == "error":
            assert all(o == outcomes[0] for o in outcomes), f"{key}: ranks disagree on the error"
            assert "/temporal/" in key and "latent frames" in outcomes[0][1], (key, outcomes[0][1])
            continue
        ran += 1
        assert all(o[0] == "ok" for o in outcomes), (key, outcomes[0])
        errors = [o[1] for o in outcomes]
        assert max(errors) < TOL, f"{key}: relative error {max(errors):.2e} per rank {errors}"
        assert len({o[2] for o in outcomes}) == 1, f"{key}: ranks returned different outputs"
        assert outcomes[0][3] == STEPS, f"{key}: every step must have been synchronous"
        holders = outcomes[0][4]
        split_image_frame += any(holders) and not all(holders)
        worst = max(worst, max(errors))
    assert split_image_frame > 0, "no partition had a rank without the image frame"
    assert ran >= len(per_rank[0]) * 3 // 4
    print(f"world size {world_size}: {ran} combinations, worst relative error {worst:.2e}")
