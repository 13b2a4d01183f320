"""Token partition: coverage, balance, patch boundaries, uneven sizes, halos and the errors users see."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from wan_distrifusion.distrifusion.partition import RankTokens, partition_summary, partition_tokens
from wan_distrifusion.wanvideo.errors import WanDistriFusionError

SPLITS = ("spatial", "temporal", "spatiotemporal")


def _coords(grid, index):
    frames, rows, cols = grid
    index = index.tolist()
    return [(i // (rows * cols), (i // cols) % rows, i % cols) for i in index]


def _check_partition(grid, parts: list[RankTokens], patch_rows: int, overlap: int) -> None:
    total = math.prod(grid)
    owner = torch.full((total,), -1)
    for p in parts:
        assert p.num_own > 0
        assert torch.equal(p.own_index, p.own_index.sort().values)
        assert bool((owner[p.own_index] == -1).all()), "own tokens overlap"
        owner[p.own_index] = p.rank
        assert torch.equal(p.computed_index[: p.num_own], p.own_index), "own tokens come first"
        halo = p.computed_index[p.num_own :]
        assert halo.unique().numel() == halo.numel()
        assert not bool(torch.isin(halo, p.own_index).any())
        # in each own frame, own tokens are a slab of rows x all columns, cut on patch boundaries
        (f0, f1), rows_per_frame = p.frames, p.rows_per_frame
        assert len(rows_per_frame) == f1 - f0 and p.rows == rows_per_frame[0]
        grid_ids = torch.arange(total).view(grid)
        ids = torch.cat([grid_ids[f, r0:r1].reshape(-1) for f, (r0, r1) in zip(range(f0, f1), rows_per_frame)])
        assert torch.equal(ids, p.own_index)
        for r0, r1 in rows_per_frame:
            assert r0 % patch_rows == 0 and (r1 % patch_rows == 0 or r1 == grid[1])
        # every halo token lies within `overlap` rows/frames of an own slab
        near = {}
        for f, (r0, r1) in zip(range(f0, f1), rows_per_frame):
            for df in range(-overlap, overlap + 1):
                near.setdefault(f + df, []).append((r0 - overlap, r1 + overlap))
        for f, h, _ in _coords(grid, halo):
            assert any(lo <= h < hi for lo, hi in near.get(f, [])), (f, h)
    assert bool((owner >= 0).all()), "some tokens belong to no rank"


@given(
    frames=st.integers(1, 9),
    rows=st.integers(1, 20),
    cols=st.integers(1, 4),
    patch=st.sampled_from([16, 32, 48, 64]),
    world=st.integers(1, 8),
    split=st.sampled_from(SPLITS),
    overlap=st.integers(0, 2),
)
@settings(max_examples=300, deadline=None)
def test_partition_covers_the_grid_exactly_once(frames, rows, cols, patch, world, split, overlap):
    grid = (frames, rows, cols)
    try:
        parts = partition_tokens(grid, split, patch, world, overlap)
    except WanDistriFusionError as exc:
        text = str(exc)
        assert "GPUs" in text and "split mode" in text
        patch_rows = patch // 16
        capacity = {
            "spatial": math.ceil(rows / patch_rows),
            "temporal": frames,
            "spatiotemporal": frames * math.ceil(rows / patch_rows),
        }[split]
        assert world > 1 and (world > capacity or split == "spatiotemporal")
        return
    assert len(parts) == world
    _check_partition(grid, parts, patch // 16, overlap)


@pytest.mark.parametrize(
    "rows,patch_rows,parts", [(30, 4, 8), (30, 4, 3), (30, 4, 4), (20, 1, 5), (45, 4, 8), (7, 2, 3)]
)
def test_row_split_is_as_balanced_as_patch_boundaries_allow(rows, patch_rows, parts):
    got = partition_tokens((1, rows, 1), "spatial", patch_rows * 16, parts)
    largest = max(p.num_own for p in got)
    # brute force over every set of cut points on patch boundaries
    blocks = math.ceil(rows / patch_rows)
    best = min(
        max(b - a for a, b in zip((0, *cut), (*cut, rows)))
        for cut in itertools.combinations([min(i * patch_rows, rows) for i in range(1, blocks)], parts - 1)
    )
    assert largest == best


def test_480p_uneven_partitions():
    grid = (21, 30, 52)  # 480p x 81 frames: 21 latent frames, 30 token rows, 52 token columns
    spatial = partition_tokens(grid, "spatial", 64, 8)
    assert sorted(p.rows[1] - p.rows[0] for p in spatial) == [2, 4, 4, 4, 4, 4, 4, 4]  # in any one frame
    spatial4 = partition_tokens(grid, "spatial", 64, 4)
    assert sorted(p.rows[1] - p.rows[0] for p in spatial4) == [6, 8, 8, 8]
    assert max(p.num_own for p in spatial4) - min(p.num_own for p in spatial4) <= 2 * 52
    temporal = partition_tokens(grid, "temporal", 64, 8)
    assert sorted(p.frames[1] - p.frames[0] for p in temporal) == [2, 2, 2, 3, 3, 3, 3, 3]
    grid2d = partition_tokens(grid, "spatiotemporal", 64, 4)
    assert len({p.frames for p in grid2d}) == 2 and len({p.rows for p in grid2d}) == 2
    assert sum(p.num_own for p in grid2d) == math.prod(grid)
    summary = partition_summary(grid2d)
    assert [s["own_tokens"] for s in summary] == [p.num_own for p in grid2d]


@pytest.mark.parametrize("world", [2, 4, 8])
def test_unequal_row_slabs_rotate_over_frames_so_ranks_balance(world):
    grid = (21, 45, 80)  # 720p x 81 frames: 45 token rows do not split evenly over 2, 4 or 8 ranks
    parts = partition_tokens(grid, "spatial", 64, world)
    ideal = math.prod(grid) / world
    per_frame_largest = max(r1 - r0 for p in parts for r0, r1 in p.rows_per_frame) * grid[2] * grid[0]
    assert max(p.num_own for p in parts) < per_frame_largest  # better than one fixed cut for all frames
    assert ideal / max(p.num_own for p in parts) > 0.98
    assert any(len(set(p.rows_per_frame)) > 1 for p in parts)
    summary = partition_summary(parts)
    assert [s["own_tokens"] for s in summary] == [p.num_own for p in parts]


def test_equal_row_slabs_stay_put():
    parts = partition_tokens((5, 32, 4), "spatial", 64, 2)
    assert [set(p.rows_per_frame) for p in parts] == [{(0, 16)}, {(16, 32)}]


def test_spatiotemporal_prefers_a_true_grid_and_falls_back_to_1d_for_primes():
    parts = partition_tokens((8, 16, 4), "spatiotemporal", 32, 6)
    assert len({p.frames for p in parts}) > 1 and len({p.rows for p in parts}) > 1
    prime = partition_tokens((8, 16, 4), "spatiotemporal", 32, 3)
    assert len({p.frames for p in prime}) == 1 or len({p.rows for p in prime}) == 1
    # only 1 frame: the grid degenerates to rows
    flat = partition_tokens((1, 16, 4), "spatiotemporal", 16, 4)
    assert len({p.rows for p in flat}) == 4


def test_halos_reach_overlap_rows_into_neighbours():
    grid = (2, 12, 3)
    parts = partition_tokens(grid, "spatial", 16, 3, overlap_tokens=2)
    assert [p.rows for p in parts] == [(0, 4), (4, 8), (8, 12)]
    assert [p.num_halo for p in parts] == [2 * 2 * 3, 4 * 2 * 3, 2 * 2 * 3]  # edges have one neighbour
    middle_halo_rows = {h for _, h, _ in _coords(grid, parts[1].computed_index[parts[1].num_own :])}
    assert middle_halo_rows == {2, 3, 8, 9}
    temporal = partition_tokens((6, 4, 2), "temporal", 16, 2, overlap_tokens=1)
    assert {f for f, _, _ in _coords((6, 4, 2), temporal[0].computed_index[temporal[0].num_own :])} == {3}
    assert partition_tokens(grid, "spatial", 16, 1, overlap_tokens=2)[0].num_halo == 0


def test_errors_name_gpus_patch_size_and_split_mode():
    with pytest.raises(WanDistriFusionError) as exc:
        partition_tokens((21, 30, 52), "spatial", 64, 16)
    text = str(exc.value)
    assert "GPUs" in text and "patch size" in text and "split mode" in text
    assert "at most 8 GPUs" in text and "16 px" in text and "spatiotemporal" in text
    with pytest.raises(WanDistriFusionError, match="at most 21 GPUs") as exc:
        partition_tokens((21, 30, 52), "temporal", 64, 32)
    assert "patch size" in str(exc.value)
    with pytest.raises(WanDistriFusionError, match="split mode 'spatiotemporal'"):
        partition_tokens((1, 4, 4), "spatiotemporal", 64, 3)
    with pytest.raises(WanDistriFusionError, match="patch size"):
        partition_tokens((1, 4, 4), "spatial", 24, 2)
    with pytest.raises(WanDistriFusionError, match="split mode"):
        partition_tokens((1, 4, 4), "diagonal", 16, 2)
