"""Per-rank memory of the VAE decode split by rows (``vae_split``), measured on the ``meta`` device, not modelled."""

from __future__ import annotations

import functools
from dataclasses import dataclass

from ..wanvideo.loading import DTYPES, PRECISIONS
from .memory_plan import format_bytes


@dataclass(frozen=True)
class VAEDecodePlan:
    """One rank's memory for a split VAE decode: the decoder's weights and the peak of live activations."""

    world_size: int
    latent_rows: int
    weights_bytes: int
    activation_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.activation_bytes

    def summary(self) -> str:
        return (
            f"VAE decode: {format_bytes(self.total_bytes)} per rank (weights {format_bytes(self.weights_bytes)} + activations "
            f"{format_bytes(self.activation_bytes)}), {self.latent_rows} latent rows on the largest of {self.world_size} ranks"
        )


@functools.lru_cache(maxsize=32)
def plan_vae_decode(
    latent_shape: tuple[int, ...], world_size: int, dtype_name: str = "bf16", dim: int | None = None
) -> VAEDecodePlan:
    """Per-rank memory of decoding ``latent_shape`` [B, C, F, H, W] split over ``world_size`` ranks.

    Measured, not modelled: the decoder runs on the ``meta`` device (no memory, no arithmetic) over the largest
    rank's slab for three latent frames (every cache is full from the second one on), and every tensor it
    creates is counted while alive; the frames leave for the host as they are decoded, so they are not counted.
    """
    import torch

    from ..wanvideo.vae import RowContext, WanVAEConfig, WanVAEDecoder
    from .vae_split import split_rows

    dtype = DTYPES[dtype_name] if dtype_name in DTYPES else PRECISIONS[dtype_name]
    b, c, frames, rows, cols = latent_shape
    slab_rows = split_rows(rows, world_size)[0]
    version = "2.2" if c == 48 else "2.1"  # the real decoders' widths unless ``dim`` is given
    config = WanVAEConfig(dim=dim or (256 if version == "2.2" else 96), z_dim=c, version=version)
    scale = config.spatial_scale
    with torch.device("meta"):
        decoder = WanVAEDecoder(config).to(dtype)
        z = torch.empty(b, c, min(frames, 3), slab_rows, cols, dtype=dtype)
        out = torch.empty(b, 3, config.output_frames(z.shape[2]), slab_rows * scale, cols * scale, dtype=dtype)
    weights = sum(p.numel() * p.element_size() for p in decoder.parameters())

    class SlabOfMany(RowContext):  # the shapes a rank of the split sees: halos, gathered edges, all rows
        def pad_rows(self, x, n):
            edges = [x.new_empty(x.shape[:-2] + (2 * n, x.shape[-1])) for _ in range(world_size)]
            padded = super().pad_rows(x, n)
            del edges
            return padded

        def all_rows(self, x):
            return x.new_empty(x.shape[:-2] + (x.shape[-2] * rows // slab_rows + 1, x.shape[-1]))[..., :-1, :]

    with torch.no_grad(), live_bytes() as live:
        decoder.decode(z, rows=SlabOfMany(), out=out)
    return VAEDecodePlan(world_size, slab_rows, weights, live.peak)


def live_bytes():
    """A dispatch mode whose ``peak`` is the most bytes held at once by tensors created inside it."""
    from torch.multiprocessing.reductions import StorageWeakRef
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    class LiveBytes(TorchDispatchMode):
        """The peak of the bytes held by tensors created inside it, sampled after every operation."""

        def __init__(self):
            super().__init__()
            self.storages: dict[int, tuple[StorageWeakRef, int]] = {}
            self.peak = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for key, (ref, _) in list(self.storages.items()):
                if ref.expired():
                    del self.storages[key]
            for tensor in tree_flatten(out)[0]:
                if hasattr(tensor, "untyped_storage"):
                    storage = tensor.untyped_storage()
                    self.storages.setdefault(storage._cdata, (StorageWeakRef(storage), storage.nbytes()))
            self.peak = max(self.peak, sum(size for _, size in self.storages.values()))
            return out

    return LiveBytes()
