"""The VAE decode on a runtime: in process at world size 1, split over a 2-rank CPU worker group; equal to the
single-process decode, weights posted once, Cancel stops every rank after the same latent frame."""

from __future__ import annotations

import pytest
import torch
from test_vae_split import random_decoder
from tiny_wan import relative_error
from wan_distrifusion.distrifusion.config import ParallelConfig
from wan_distrifusion.distrifusion.session import JobCancelled
from wan_distrifusion.distrifusion.settings import RuntimeSpec
from wan_distrifusion.distrifusion.vae_session import decode_on_runtime
from wan_distrifusion.distrifusion.workers import WorkerGroup, start_runtime
from wan_distrifusion.wanvideo.errors import WanDistriFusionError

TOL = 1e-5


@pytest.fixture(scope="module")
def vae():
    """A tiny random Wan 2.1 VAE decoder's state dict and a latent (3 frames, 7 rows: uneven over 2)."""
    decoder = random_decoder(dim=8, seed=4)
    latent = torch.randn(1, 16, 3, 7, 5, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        reference = decoder.decode(latent)
    return decoder.state_dict(), latent, reference


def test_in_process_runner_decodes(checkpoint, vae):
    state_dict, latent, reference = vae
    runner = start_runtime(RuntimeSpec(checkpoint, device="cpu"))
    seen = []
    pixels = decode_on_runtime(runner, state_dict, latent, progress=lambda done, total: seen.append((done, total)))
    assert seen == [(1, 3), (2, 3), (3, 3)]
    assert relative_error(pixels, reference) < TOL
    with pytest.raises(JobCancelled):
        decode_on_runtime(runner, state_dict, latent, cancelled=lambda: True)
    with pytest.raises(WanDistriFusionError, match="samples: expected a Wan video LATENT"):
        decode_on_runtime(runner, state_dict, latent[:, :4])
    with pytest.raises(WanDistriFusionError, match="not a Wan VAE"):
        decode_on_runtime(runner, {"decoder.conv_in.weight": torch.zeros(1)}, latent)
    runner.close()


@pytest.mark.slow
def test_two_rank_group_decodes_exactly_and_cancels(checkpoint, vae):
    state_dict, latent, reference = vae
    parallel = ParallelConfig(world_size=2, mode="sync", patch_size=16)
    spec = RuntimeSpec(checkpoint, parallel=parallel, device="cpu", step_timeout_s=60, start_timeout_s=120)
    with WorkerGroup(spec) as group:
        seen = []
        pixels = decode_on_runtime(group, state_dict, latent, progress=lambda done, total: seen.append(done))
        assert seen == [1, 2, 3]
        error = relative_error(pixels, reference)
        print(f"2 ranks vs one process: relative error {error:.2e}")
        assert error < TOL
        assert len(group.posted_payloads) == 1

        with pytest.raises(JobCancelled):  # cancelled after the first frame: both ranks stop there
            decode_on_runtime(group, state_dict, latent, cancelled=lambda: True)
        assert group.alive

        def interrupt(done, total):  # ComfyUI's progress bar raises on Cancel
            if done == 2:
                raise KeyboardInterrupt("interrupted")

        with pytest.raises(KeyboardInterrupt):
            decode_on_runtime(group, state_dict, latent, progress=interrupt)
        again = decode_on_runtime(group, state_dict, latent)  # the group still serves, weights not re-posted
        assert relative_error(again, reference) < TOL and len(group.posted_payloads) == 1
        with pytest.raises(WanDistriFusionError, match="lower GPUs"):
            decode_on_runtime(group, state_dict, latent[..., :1, :])
        # another VAE replaces the ranks' decoder (posted once, its store copy dropped); back to the first one
        other = random_decoder(dim=8, seed=5)
        with torch.no_grad():
            other_reference = other.decode(latent)
        assert relative_error(decode_on_runtime(group, other.state_dict(), latent), other_reference) < TOL
        assert len(group.posted_payloads) == 1
        assert relative_error(decode_on_runtime(group, state_dict, latent), reference) < TOL
