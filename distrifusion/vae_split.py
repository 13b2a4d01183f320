"""The VAE decode split by rows over a process group, exact: each rank decodes a slab of latent rows.

Every 3×3 convolution of the decoder takes one row from each neighbour's slab edge (exchanged per
convolution, so the halo never grows with upsampling: nearest 2× upsampling of a slab is the slab of the
upsampled frame); the middle block's attention gathers every rank's keys and values (it runs at the
latent resolution, the smallest); the norms are per position and the temporal caches are per rank, so
nothing else crosses ranks. The result equals the single-device decode to fp32 round-off.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor

from ..wanvideo.errors import WanDistriFusionError
from ..wanvideo.vae import RowContext, WanVAEDecoder


def split_rows(rows: int, world_size: int) -> list[int]:
    """Latent rows per rank, the first ``rows % world_size`` ranks one more; every rank at least one."""
    if rows < world_size:
        raise WanDistriFusionError(
            f"VAE decode: {rows} latent rows cannot be split over {world_size} GPUs (each needs at least one latent "
            "row): lower GPUs or decode a taller video."
        )
    base, extra = divmod(rows, world_size)
    return [base + (1 if r < extra else 0) for r in range(world_size)]


class SlabRows(RowContext):
    """This rank's slab of rows: halos from the neighbours' edges, all rows gathered for attention."""

    def __init__(self, latent_rows: list[int], rank: int, group: dist.ProcessGroup | None = None):
        self.latent_rows = latent_rows
        self.rank = rank
        self.group = group

    def _rows_at(self, x: Tensor) -> list[int]:
        """Every rank's row count at ``x``'s resolution (a whole multiple of the latent slab)."""
        scale = x.shape[-2] // self.latent_rows[self.rank]
        return [rows * scale for rows in self.latent_rows]

    def pad_rows(self, x: Tensor, rows: int) -> Tensor:
        edges = torch.cat([x[..., :rows, :], x[..., -rows:, :]], dim=-2).contiguous()
        gathered = [torch.empty_like(edges) for _ in self.latent_rows]
        dist.all_gather(gathered, edges, group=self.group)
        zeros = x.new_zeros(x.shape[:-2] + (rows, x.shape[-1]))
        above = gathered[self.rank - 1][..., rows:, :] if self.rank > 0 else zeros
        below = gathered[self.rank + 1][..., :rows, :] if self.rank + 1 < len(self.latent_rows) else zeros
        return torch.cat([above, x, below], dim=-2)

    def all_rows(self, x: Tensor) -> Tensor:
        return gather_rows(x, self._rows_at(x), self.group)


def gather_rows(x: Tensor, rows: list[int], group: dist.ProcessGroup | None = None) -> Tensor:
    """Every rank's slab (rows at dim -2, ``rows[r]`` on rank r) joined in rank order, on every rank."""
    most = max(rows)
    padded = torch.nn.functional.pad(x, (0, 0, 0, most - x.shape[-2])).contiguous()
    gathered = [torch.empty_like(padded) for _ in rows]
    dist.all_gather(gathered, padded, group=group)
    return torch.cat([part[..., :n, :] for part, n in zip(gathered, rows)], dim=-2)


def decode_slab(
    decoder: WanVAEDecoder,
    z: Tensor,
    rank: int,
    world_size: int,
    group: dist.ProcessGroup | None = None,
    on_chunk: Callable[[int, int], None] | None = None,
    out: Tensor | None = None,
) -> tuple[Tensor, list[int]]:
    """This rank's pixel rows of ``decoder.decode(z)`` and every rank's pixel row count.

    ``z`` is the whole latent (every rank holds it: it is small); the rank decodes its slab of rows.
    """
    latent_rows = split_rows(z.shape[-2], world_size)
    start = sum(latent_rows[:rank])
    slab = z[..., start : start + latent_rows[rank], :]
    rows = SlabRows(latent_rows, rank, group)
    pixels = decoder.decode(slab, rows=rows, on_chunk=on_chunk, out=out)
    scale = decoder.config.spatial_scale
    return pixels, [n * scale for n in latent_rows]
