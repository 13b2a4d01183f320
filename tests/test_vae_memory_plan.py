"""The VAE decode's memory plan: live bytes counted exactly, per-rank peak falling with the world size."""

from __future__ import annotations

import torch
from test_vae_split import random_decoder
from wan_distrifusion.distrifusion.vae_memory_plan import live_bytes, plan_vae_decode
from wan_distrifusion.wanvideo.vae import RowContext

MIB = 1024**2


def test_live_bytes_counts_what_is_alive():
    with live_bytes() as live:
        a = torch.zeros(MIB // 4)  # 1 MiB
        b = torch.zeros(MIB // 2)  # 2 MiB
        del a
        c = b.view(2, -1)  # a view holds no new storage
        d = torch.zeros(MIB // 4)  # 1 MiB, after a was freed
    assert live.peak == 3 * MIB, live.peak
    del b, c, d


def test_meta_measurement_equals_real_tensors():
    """The plan runs on ``meta``; the same decode on real CPU tensors holds the same bytes at its peak (less the exchange buffers)."""
    decoder = random_decoder(dim=8)
    z = torch.randn(1, 16, 3, 6, 5)
    out = torch.empty(1, 3, 9, 48, 40)
    with torch.no_grad(), live_bytes() as real:
        decoder.decode(z, rows=RowContext(), out=out)
    planned = plan_vae_decode(tuple(z.shape), 1, "fp32", dim=8)
    # the plan adds a split's exchange buffers (gathered edge rows, all rows for attention): under 1 %
    assert real.peak <= planned.activation_bytes < 1.01 * real.peak, (planned.activation_bytes, real.peak)


def test_peak_per_rank_falls_with_world_size():
    shape = (1, 16, 21, 60, 104)  # 832x480, 81 frames
    plans = {n: plan_vae_decode(shape, n) for n in (1, 2, 4)}
    for plan in plans.values():
        print(plan.summary())
    one, two, four = (plans[n].activation_bytes for n in (1, 2, 4))
    assert 1.8 < one / two <= 2.05 and 3.4 < one / four <= 4.1, (one, two, four)
    assert plans[1].weights_bytes == plans[4].weights_bytes > 0
