"""``cli.py generate --decode VAE_FILE``: the sampled latent decoded on the same 2 ranks, written as PNG frames,
equal to decoding the saved latent in this process; a file that is not a Wan 2.1 VAE fails before anything runs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from test_cli import flags, run_cli
from test_vae_split import random_decoder
from wan_distrifusion.wanvideo.vae import latent_for_vae
from wan_distrifusion.wanvideo.video_files import to_uint8_frames

pytestmark = pytest.mark.slow
SETTINGS = dict(width=64, height=48, length=5, steps=2, seed=3, sampler="euler")  # 6 latent rows, 3 per rank


def test_generate_decodes_to_png_frames_on_two_ranks(tmp_path):
    decoder = random_decoder(dim=8, seed=2)
    vae = tmp_path / "wan_2.1_vae_tiny.safetensors"
    save_file({k: v.contiguous() for k, v in decoder.state_dict().items()}, str(vae))
    out = tmp_path / "clip.safetensors"
    args = ["generate", *flags(SETTINGS), "--world-size", "2", "--mode", "sync", "--patch-size", "16"]
    result = run_cli(*args, "--device", "cpu", "--decode", str(vae), "--out", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"wrote 5 frames to {tmp_path / 'clip_frames'}" in result.stdout
    frames = np.stack([np.asarray(Image.open(tmp_path / "clip_frames" / f"frame_{i:05d}.png")) for i in range(5)])
    assert frames.shape == (5, 48, 64, 3)
    with torch.no_grad():
        expected = to_uint8_frames(decoder.decode(latent_for_vae(load_file(str(out))["latent"])))
    difference = np.abs(frames.astype(int) - expected.numpy().astype(int))
    assert difference.max() <= 1 and (difference > 0).mean() < 0.01, difference.max()


def test_decode_with_a_file_that_is_not_a_wan_vae_fails_first(tmp_path):
    bad = tmp_path / "sd_vae.safetensors"
    save_file({"decoder.conv_in.weight": torch.zeros(2)}, str(bad))
    out = tmp_path / "clip.safetensors"
    result = run_cli("generate", "--device", "cpu", "--decode", str(bad), "--out", str(out), cwd=tmp_path)
    assert result.returncode != 0
    assert "decode:" in result.stderr and "not a Wan VAE" in result.stderr, result.stderr[-2000:]
    assert "starting" not in result.stdout and not out.exists()


def test_decode_with_a_vae_of_other_latent_channels_fails_before_the_ranks_start(tmp_path):
    vae = tmp_path / "wan2.2_vae_tiny.safetensors"
    decoder = random_decoder(dim=8, version="2.2")
    save_file({k: v.contiguous() for k, v in decoder.state_dict().items()}, str(vae))
    out = tmp_path / "clip.safetensors"
    result = run_cli("generate", "--device", "cpu", "--decode", str(vae), "--out", str(out), cwd=tmp_path)
    assert result.returncode != 0
    assert "decode: the VAE takes 48-channel latents but the model makes 16" in result.stderr, result.stderr[-2000:]
    assert "starting" not in result.stdout and not out.exists()
