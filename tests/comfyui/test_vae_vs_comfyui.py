"""Our Wan 2.1 and Wan 2.2 VAE decoders against ComfyUI's own (``comfy/ldm/wan/vae.py``, ``vae2_2.py``) on
random weights, fp32.

ComfyUI (its own python, a subprocess) builds its ``WanVAE`` with random weights (gammas and biases too),
saves the state dict and decodes random latents: a tiny VAE (width 8) straight through ``WanVAE.decode``,
a tiny Wan 2.2 VAE (48 channels, 16x) through its ``WanVAE.decode``, and the real Wan 2.1 architecture (width 96)
through ``comfy.sd.VAE`` — what ``Load VAE`` + ``VAE Decode`` run,
clamp to [0, 1] and channels last included. We load the same state dict and decode the same latents.
"""

from __future__ import annotations

import subprocess

import torch
from comfy_harness import COMFYUI_PATH, COMFYUI_PYTHON
from safetensors.torch import load_file, save_file
from tiny_wan import relative_error
from wan_distrifusion.wanvideo.vae import latent_for_vae, load_vae_decoder

TOL = 1e-5

COMFY_SCRIPT = r"""
import sys, torch
from safetensors.torch import load_file, save_file
import comfy.options
root, sys.argv = sys.argv[1], [sys.argv[0], "--cpu"]
comfy.options.enable_args_parsing()
import comfy.sd
from comfy.ldm.wan.vae import WanVAE
from comfy.ldm.wan import vae2_2

def random_vae(dim, seed, wan22=False):
    if wan22:  # as comfy.sd.VAE builds the Wan 2.2 VAE, narrower (decoder width dec_dim)
        vae = vae2_2.WanVAE(dim=8, dec_dim=dim, z_dim=48, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                            temperal_downsample=[False, True, True], dropout=0.0)
    else:
        vae = WanVAE(dim=dim, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                     temperal_downsample=[False, True, True], dropout=0.0)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # comfy's ops skip weight init: initialise every tensor ourselves
        for name, p in vae.named_parameters():
            if "gamma" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            elif p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) / p[0].numel() ** 0.5)
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    return vae.float().eval()

latents = load_file(root + "/latents.safetensors")
tiny = random_vae(8, 0)
save_file({k: v.contiguous() for k, v in tiny.state_dict().items()}, root + "/tiny_vae.safetensors")
wan22 = random_vae(16, 2, wan22=True)
save_file({k: v.contiguous() for k, v in wan22.state_dict().items()}, root + "/wan22_vae.safetensors")
outputs = {}
with torch.no_grad():
    outputs["tiny"] = tiny.decode(latents["tiny"]).contiguous()
    outputs["wan22"] = wan22.decode(latents["wan22"]).contiguous()
    full = random_vae(96, 1)
    sd = {k: v.contiguous() for k, v in full.state_dict().items()}
    save_file(sd, root + "/full_vae.safetensors")
    vae = comfy.sd.VAE(sd=sd)
    assert vae.vae_dtype == torch.float32, vae.vae_dtype
    outputs["full"] = vae.decode(latents["full"]).contiguous()
import comfy.latent_formats
outputs["wan21_out"] = comfy.latent_formats.Wan21().process_out(latents["model21"])
outputs["wan22_out"] = comfy.latent_formats.Wan22().process_out(latents["model22"])
save_file(outputs, root + "/outputs.safetensors")
"""


def test_decode_equals_comfyui(tmp_path):
    gen = torch.Generator().manual_seed(5)
    latents = {
        "tiny": torch.randn(2, 16, 4, 7, 5, generator=gen),  # batch 2, 4 chunks, odd rows and cols
        "full": torch.randn(1, 16, 3, 5, 4, generator=gen),
        "wan22": torch.randn(1, 48, 3, 5, 3, generator=gen),
        "model21": torch.randn(1, 16, 2, 3, 3, generator=gen),
        "model22": torch.randn(1, 48, 2, 3, 3, generator=gen),
    }
    save_file(latents, str(tmp_path / "latents.safetensors"))
    run = subprocess.run(
        [COMFYUI_PYTHON, "-c", COMFY_SCRIPT, str(tmp_path)],
        cwd=COMFYUI_PATH,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    theirs = load_file(str(tmp_path / "outputs.safetensors"))
    errors = {}
    with torch.no_grad():
        tiny = load_vae_decoder(load_file(str(tmp_path / "tiny_vae.safetensors")))
        ours = tiny.decode(latents["tiny"])
        assert ours.shape == theirs["tiny"].shape == (2, 3, 13, 56, 40)
        errors["tiny"] = relative_error(ours, theirs["tiny"])
        full = load_vae_decoder(load_file(str(tmp_path / "full_vae.safetensors")))
        pixels = full.decode(latents["full"]).add(1.0).div(2.0).clamp(0.0, 1.0).movedim(1, -1)
        assert pixels.shape == theirs["full"].shape == (1, 9, 40, 32, 3)
        errors["full"] = relative_error(pixels, theirs["full"])
        wan22 = load_vae_decoder(load_file(str(tmp_path / "wan22_vae.safetensors")))
        assert wan22.config.version == "2.2" and wan22.config.spatial_scale == 16
        ours = wan22.decode(latents["wan22"])
        assert ours.shape == theirs["wan22"].shape == (1, 3, 9, 80, 48)
        errors["wan22"] = relative_error(ours, theirs["wan22"])
    print(f"relative error vs ComfyUI's Wan VAE decode: {errors}")
    assert max(errors.values()) < TOL, errors
    # the CLI's model-space latent -> the VAE's: ComfyUI's Wan21 / Wan22 latent formats' process_out
    for name, model in (("wan21_out", "model21"), ("wan22_out", "model22")):
        torch.testing.assert_close(latent_for_vae(latents[model]), theirs[name], rtol=1e-6, atol=1e-6)
