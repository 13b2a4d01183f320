"""The forward session's latents in shared memory (``distrifusion/shared_latents.py``)."""

import tempfile
from pathlib import Path

import torch
from wan_distrifusion.distrifusion.shared_latents import SharedLatents, shared_folder


def test_both_sides_see_each_others_writes_after_the_name_is_gone():
    controller = SharedLatents.create((1, 4, 2, 6, 8))
    rank0 = SharedLatents(controller.path, (1, 4, 2, 6, 8))
    controller.unlink()
    assert not controller.path.exists()  # nothing left in the folder once rank 0 has mapped it
    x = torch.randn(1, 4, 2, 6, 8)
    controller.x.copy_(x)
    assert torch.equal(rank0.x, x)
    rank0.flow.copy_(2 * x)
    rank0.uncond.copy_(-x)
    assert torch.equal(controller.flow, 2 * x) and torch.equal(controller.uncond, -x)


def test_a_latent_too_large_for_shared_memory_goes_to_the_temp_folder():
    assert shared_folder(1 << 60) == Path(tempfile.gettempdir())
