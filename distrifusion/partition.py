"""Which tokens of Wan's (frames, rows, cols) token grid each rank owns and computes.

Slabs are cut on patch boundaries (``patch_size_px / 16`` token rows) or on latent frames, balanced by
token count; uneven slabs are the normal case (480p has 30 token rows and 21 latent frames). A spatial
split whose row slabs differ in size hands the larger slabs to different ranks frame by frame, so token
counts even out over the frames (720p: 45 token rows over 4 ranks is 12/11/11/11 rows per frame, but
237/236/236/236 row-frames per rank over 21 frames). In the displaced mode a rank also computes a halo of its
neighbours' tokens fresh (``overlap_tokens``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..wanvideo.errors import WanDistriFusionError
from .config import PIXELS_PER_TOKEN, SPLIT_MODES


@dataclass(frozen=True)
class RankTokens:
    """One rank's share of the token grid; flat ids are ``f * rows * cols + h * cols + w``."""

    rank: int
    frames: tuple[int, int]
    """Own latent frames ``[start, stop)``."""
    rows_per_frame: tuple[tuple[int, int], ...]
    """Own token rows ``[start, stop)`` (all columns) in each own frame, in frame order."""
    own_index: Tensor
    """Flat ids of the tokens this rank owns (its output), ascending."""
    computed_index: Tensor
    """``own_index`` followed by the halo ids (neighbours' tokens recomputed fresh), ascending each."""

    @property
    def rows(self) -> tuple[int, int]:
        """Own token rows of the first own frame (the same in every frame unless slabs rotate)."""
        return self.rows_per_frame[0]

    @property
    def num_own(self) -> int:
        return self.own_index.numel()

    @property
    def num_computed(self) -> int:
        return self.computed_index.numel()

    @property
    def num_halo(self) -> int:
        return self.num_computed - self.num_own


def partition_tokens(
    grid: tuple[int, int, int],
    split_mode: str,
    patch_size_px: int,
    world_size: int,
    overlap_tokens: int = 0,
    pixels_per_token: int = PIXELS_PER_TOKEN,
) -> list[RankTokens]:
    """Split the token grid over ``world_size`` ranks (the GPUs that share one batch item).

    ``spatial`` cuts token rows on patch boundaries, ``temporal`` cuts latent frames, ``spatiotemporal``
    a grid of both (frames x rows, factorising ``world_size``; a 1-D split when it is prime).
    """
    frames, rows, cols = (int(size) for size in grid)
    if min(frames, rows, cols) < 1:
        raise WanDistriFusionError(f"latent: the token grid {tuple(grid)} is empty; use a non-empty latent.")
    if world_size < 1:
        raise WanDistriFusionError(f"GPUs: world size {world_size} must be at least 1.")
    if split_mode not in SPLIT_MODES:
        raise WanDistriFusionError(f"split mode: {split_mode!r} is unknown; choose one of {', '.join(SPLIT_MODES)}.")
    if patch_size_px < pixels_per_token or patch_size_px % pixels_per_token:
        examples = ", ".join(str(n * pixels_per_token) for n in (2, 3, 4))
        raise WanDistriFusionError(
            f"patch size: {patch_size_px} px is not a positive multiple of {pixels_per_token} px, this model's token "
            f"size; use e.g. {examples}."
        )
    if overlap_tokens < 0:
        raise WanDistriFusionError(f"patch overlap: {overlap_tokens} tokens must be 0 or more.")
    patch_rows = patch_size_px // pixels_per_token
    row_slabs = math.ceil(rows / patch_rows)
    too_many = (grid, split_mode, patch_size_px, world_size, pixels_per_token)

    if split_mode == "spatial":
        if row_slabs < world_size:
            _too_many_ranks(*too_many)
        frame_parts, row_parts = 1, world_size
    elif split_mode == "temporal":
        if frames < world_size:
            _too_many_ranks(*too_many)
        frame_parts, row_parts = world_size, 1
    else:
        frame_parts, row_parts = _factorise(frames, rows, patch_rows, world_size)
        if frame_parts == 0:
            _too_many_ranks(*too_many)

    frame_ranges = _split_axis(frames, 1, frame_parts)
    row_ranges = _split_axis(rows, patch_rows, row_parts)
    if frame_parts == 1:
        slab_of_rank = _rotate_slabs([stop - start for start, stop in row_ranges], frames)
    else:
        slab_of_rank = [list(range(row_parts))] * frames
    ids = torch.arange(frames * rows * cols).view(frames, rows, cols)
    halo_frames = overlap_tokens if frame_parts > 1 else 0
    halo_rows = overlap_tokens if row_parts > 1 else 0
    parts = []
    for rank in range(world_size):
        f0, f1 = frame_ranges[rank // row_parts]
        rows_per_frame = tuple(row_ranges[slab_of_rank[f][rank % row_parts]] for f in range(f0, f1))
        mine = torch.zeros(frames, rows, dtype=torch.bool)
        box = torch.zeros(frames, rows, dtype=torch.bool)
        for f, (r0, r1) in zip(range(f0, f1), rows_per_frame):
            mine[f, r0:r1] = True
            box[max(0, f - halo_frames) : f + halo_frames + 1, max(0, r0 - halo_rows) : r1 + halo_rows] = True
        box &= ~mine
        own = ids[mine].reshape(-1)
        halo = ids[box].reshape(-1)
        parts.append(RankTokens(rank, (f0, f1), rows_per_frame, own, torch.cat([own, halo])))
    return parts


def _rotate_slabs(sizes: list[int], frames: int) -> list[list[int]]:
    """For each frame, the row slab each rank owns: larger slabs go to the ranks with the fewest rows so far
    (ties keep rank order, so equal slabs never move)."""
    totals = [0] * len(sizes)
    largest_first = sorted(range(len(sizes)), key=lambda slab: -sizes[slab])
    plan = []
    for _ in range(frames):
        slab_of_rank = [0] * len(sizes)
        for slab, rank in zip(largest_first, sorted(range(len(sizes)), key=lambda r: totals[r])):
            slab_of_rank[rank] = slab
            totals[rank] += sizes[slab]
        plan.append(slab_of_rank)
    return plan


def partition_summary(parts: list[RankTokens]) -> list[dict]:
    """Per-rank sizes for the Status node and logs."""
    return [
        {
            "rank": p.rank,
            "frames": list(p.frames),
            "rows": list(p.rows),
            "rows_rotate_over_frames": len(set(p.rows_per_frame)) > 1,
            "own_tokens": p.num_own,
            "halo_tokens": p.num_halo,
        }
        for p in parts
    ]


def _split_axis(length: int, unit: int, parts: int) -> list[tuple[int, int]]:
    """Cut ``[0, length)`` into ``parts`` non-empty ranges at multiples of ``unit``, smallest largest part first."""
    blocks = math.ceil(length / unit)
    assert 1 <= parts <= blocks
    cuts = [min(i * unit, length) for i in range(blocks + 1)]
    # best[j][i]: (max part, sum of squares) splitting cuts[0..i] into j parts; exact, the sizes are tiny.
    inf = (math.inf, math.inf)
    best = [[inf] * (blocks + 1) for _ in range(parts + 1)]
    choice = [[0] * (blocks + 1) for _ in range(parts + 1)]
    best[0][0] = (0, 0)
    for j in range(1, parts + 1):
        for i in range(j, blocks - (parts - j) + 1):
            for k in range(j - 1, i):
                prev = best[j - 1][k]
                if prev[0] == math.inf:
                    continue
                size = cuts[i] - cuts[k]
                cand = (max(prev[0], size), prev[1] + size * size)
                if cand < best[j][i]:
                    best[j][i], choice[j][i] = cand, k
    ranges, i = [], blocks
    for j in range(parts, 0, -1):
        k = choice[j][i]
        ranges.append((cuts[k], cuts[i]))
        i = k
    return ranges[::-1]


def _factorise(frames: int, rows: int, patch_rows: int, world_size: int) -> tuple[int, int]:
    """(frame parts, row parts) for a spatiotemporal grid; (0, 0) when none gives every rank tokens.

    A true grid (both factors > 1) is preferred when one fits; among those the smallest largest slab wins.
    """
    row_slabs = math.ceil(rows / patch_rows)
    options = []
    for frame_parts in range(1, world_size + 1):
        if world_size % frame_parts:
            continue
        row_parts = world_size // frame_parts
        if frame_parts > frames or row_parts > row_slabs:
            continue
        frame_sizes = [b - a for a, b in _split_axis(frames, 1, frame_parts)]
        row_sizes = [b - a for a, b in _split_axis(rows, patch_rows, row_parts)]
        largest = max(frame_sizes) * max(row_sizes)
        spread = sum(f * r * f * r for f in frame_sizes for r in row_sizes)
        is_grid = frame_parts > 1 and row_parts > 1
        options.append((not is_grid, largest, spread, -row_parts, frame_parts, row_parts))
    if not options:
        return 0, 0
    best = min(options)
    return best[4], best[5]


def _too_many_ranks(
    grid: tuple[int, int, int], split_mode: str, patch_size_px: int, world_size: int, pixels_per_token: int
) -> None:
    frames, rows, _ = grid
    patch_rows = patch_size_px // pixels_per_token
    row_slabs = math.ceil(rows / patch_rows)
    if split_mode == "spatial":
        problem = (
            f"patch size {patch_size_px} px cuts the {rows} token rows ({rows * pixels_per_token} px) into "
            f"{row_slabs} patch rows"
        )
        limit = row_slabs
    elif split_mode == "temporal":
        problem = f"the latent has {frames} latent frames (patch size does not apply to temporal splits)"
        limit = frames
    else:
        problem = (
            f"{frames} latent frames x {row_slabs} patch rows of {patch_size_px} px admit no grid of "
            f"{world_size} non-empty slabs"
        )
        limit = max(n for n in range(1, world_size) if _factorise(frames, rows, patch_rows, n)[0])
    fixes = [f"use at most {limit} GPUs per batch item with this split mode"]
    if split_mode != "temporal" and patch_size_px > pixels_per_token:
        fixes.append(f"a smaller patch size ({pixels_per_token} px gives {rows} patch rows)")
    if split_mode != "spatiotemporal":
        fixes.append(f"split mode 'spatiotemporal' (up to {frames * row_slabs} GPUs at {patch_size_px} px)")
    if split_mode == "spatial" and frames >= world_size:
        fixes.append("split mode 'temporal'")
    raise WanDistriFusionError(
        f"split mode {split_mode!r}: {problem}, fewer than the {world_size} GPUs that share one batch item, so "
        f"some GPU would get no tokens; {', or '.join(fixes)}."
    )
