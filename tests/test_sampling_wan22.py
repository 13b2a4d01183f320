"""Per-frame timesteps for the Wan 2.2 TI2V 5B in the sampling layer: ``frame_timesteps`` (ComfyUI's
``WAN22.process_timestep``; checked against ComfyUI itself in ``tests/comfyui/test_wan_model_vs_comfyui.py``)
and ``GuidedFlow`` with a denoise mask."""

from __future__ import annotations

import torch
from tiny_wan import random_model, relative_error, tiny_config
from wan_distrifusion.wanvideo.sampling import GuidedFlow, frame_timesteps


def _keep_first_frame(batch=1, frames=3, rows=6, cols=8) -> torch.Tensor:
    mask = torch.ones(batch, 1, frames, rows, cols)
    mask[:, :, 0] = 0.0
    return mask


def test_frame_timesteps_scale_each_frame_by_its_mean_mask():
    mask = _keep_first_frame(batch=2)
    mask[1, :, 2, :3] = 0.5  # half of frame 2's rows half kept: mean 0.75
    t = frame_timesteps(torch.tensor([800.0, 400.0]), mask)
    assert t.tolist() == [[0.0, 800.0, 800.0], [0.0, 400.0, 300.0]]
    assert frame_timesteps(torch.tensor([500.0, 500.0]), _keep_first_frame()).shape == (2, 3)  # mask batch 1


def test_guided_flow_gives_cond_and_uncond_the_per_frame_timesteps():
    model = random_model(tiny_config(in_dim=48, out_dim=48, version="2.2"), seed=5)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, 48, 3, 6, 8, generator=gen)
    positive, negative = torch.randn(1, 5, 32, generator=gen), torch.randn(1, 4, 32, generator=gen)
    mask = _keep_first_frame()
    seen = []

    def recording(x, t, context, **kwargs):
        seen.append(t.clone())
        return model(x, t, context, **kwargs)

    flow = GuidedFlow(recording, positive, negative, cfg=4.0, text_len=6, denoise_mask=mask)
    with torch.no_grad():
        guided = flow(x, 700.0)
        assert seen[0].tolist() == [[0.0, 700.0, 700.0]] * 2
        context = flow.context
        t = torch.tensor([[0.0, 700.0, 700.0]] * 2)
        cond, uncond = model(torch.cat([x, x]), t, context).chunk(2)
        assert relative_error(guided, uncond + 4.0 * (cond - uncond)) < 1e-6
        plain = GuidedFlow(model, positive, negative, cfg=4.0, text_len=6)(x, 700.0)
    assert relative_error(plain, guided) > 1e-3  # the kept frame's timestep 0 matters
