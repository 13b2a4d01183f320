"""The VAE decode (Wan 2.1 and Wan 2.2) split by rows over 2, 3 and 4 gloo ranks equals the single-process
decode (fp32 round-off).

Latent row counts that do not divide (7 rows over 2, 3, 4 ranks; 4 rows over 4: one row each, so every
halo is a neighbour's whole slab), several latent frames (the temporal caches), batch 2. Each rank
decodes the reference itself and returns the error of its own slab and of the gathered frame.
"""

from __future__ import annotations

import pytest
from parallel_harness import rel_err, run_ranks

TOL = 1e-5
LATENTS = (("2.1", (1, 16, 3, 7, 5)), ("2.1", (2, 16, 2, 4, 3)), ("2.2", (1, 48, 3, 5, 3)))


def random_decoder(dim: int = 8, seed: int = 0, version: str = "2.1"):
    """A tiny Wan VAE decoder with every tensor random (gammas and biases too), the same on every rank."""
    import torch
    from wan_distrifusion.wanvideo.vae import WanVAEConfig, WanVAEDecoder

    decoder = WanVAEDecoder(WanVAEConfig(dim=dim, z_dim=48 if version == "2.2" else 16, version=version))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in decoder.named_parameters():
            if "gamma" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            elif p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) / p[0].numel() ** 0.5)
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    return decoder.eval()


def split_decode_errors(rank: int, world_size: int) -> dict:
    import torch
    from wan_distrifusion.distrifusion.vae_split import decode_slab, gather_rows

    decoders = {"2.1": random_decoder(), "2.2": random_decoder(version="2.2")}
    errors = {}
    with torch.no_grad():
        for i, (version, shape) in enumerate(LATENTS):
            decoder = decoders[version]
            if shape[3] < world_size:
                continue
            z = torch.randn(shape, generator=torch.Generator().manual_seed(i))
            reference = decoder.decode(z)
            chunks: list[int] = []
            slab, rows = decode_slab(
                decoder, z, rank, world_size, on_chunk=lambda done, total, seen=chunks: seen.append(done)
            )
            assert chunks == list(range(1, shape[2] + 1))
            start = sum(rows[:rank])
            errors[f"{shape}/slab"] = rel_err(slab, reference[..., start : start + rows[rank], :])
            errors[f"{shape}/frame"] = rel_err(gather_rows(slab, rows), reference)
    return errors


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_split_decode_equals_single_process(world_size):
    results = run_ranks("test_vae_split", "split_decode_errors", world_size)
    print(f"world size {world_size}: {results}")
    assert all(len(errors) >= 4 and any("48" in key for key in errors) for errors in results)
    assert max(max(errors.values()) for errors in results) < TOL, results


def test_too_few_rows_is_refused():
    from wan_distrifusion.distrifusion.vae_split import split_rows
    from wan_distrifusion.wanvideo.errors import WanDistriFusionError

    assert split_rows(7, 3) == [3, 2, 2]
    with pytest.raises(WanDistriFusionError, match="lower GPUs"):
        split_rows(3, 4)
