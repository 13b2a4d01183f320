"""Our Wan DiT against ComfyUI's own ``WanModel`` on the same tiny checkpoints, one per architecture (Wan 2.1 I2V
and FLF2V with ``img_emb``, Wan 2.2 I2V A14B without it, Wan 2.2 TI2V 5B with 48 channels).

ComfyUI (its own python, a subprocess) loads each file the way ``UNETLoader`` does (``comfy.sd.load_diffusion_model``:
its key detection picks WAN21 / WAN22) and runs its diffusion model on inputs we wrote; we load the same file with
``load_wan_model`` and compare in fp32. For the TI2V 5B, our ``frame_timesteps`` must give what ComfyUI's own
``WAN22.process_timestep`` makes of a denoise mask that keeps the first latent frame (``Wan22ImageToVideoLatent``)
or part of a frame.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from comfy_harness import COMFYUI_PATH, COMFYUI_PYTHON
from safetensors.torch import load_file, save_file
from tiny_wan import random_model, relative_error, tiny_config, write_checkpoint
from wan_distrifusion.wanvideo.loading import inspect_wan_checkpoint, load_wan_model
from wan_distrifusion.wanvideo.sampling import frame_timesteps

TOL = 1e-4
COMFY_SHAPES = dict(dim=256, num_heads=2, ffn_dim=320, num_layers=2, text_dim=4096, freq_dim=256, image_dim=1280)
"""Tiny, yet what ComfyUI's Wan detection builds: heads = dim / 128, text 4096, frequencies 256, CLIP 1280."""
ARCHITECTURES = {
    # name: (config overrides, key layout, file name, expected variant)
    "wan21_i2v": (
        dict(model_type="i2v", in_dim=36, out_dim=16),
        "comfyui",
        "wan2.1_i2v_tiny.safetensors",
        "Wan 2.1 I2V",
    ),
    "wan21_flf2v": (
        dict(model_type="i2v", in_dim=36, out_dim=16, image_positions=514),
        "original",
        "wan2.1_flf2v_tiny.safetensors",
        "Wan 2.1 FLF2V",
    ),
    "wan22_i2v_a14b": (
        dict(in_dim=36, out_dim=16),
        "original",
        "i2v_low_noise_tiny.safetensors",
        "Wan 2.2 I2V A14B (low-noise expert)",
    ),
    "wan22_ti2v_5b": (dict(in_dim=48, out_dim=48), "comfyui", "ti2v_tiny.safetensors", "Wan 2.2 TI2V 5B"),
}
LATENT = (3, 6, 8)  # latent frames, rows, cols: a (3, 3, 4) token grid

COMFY_SCRIPT = r"""
import json, sys, torch
from safetensors.torch import load_file, save_file
import comfy.options
cases_file, sys.argv = sys.argv[1], [sys.argv[0], "--cpu"]
comfy.options.enable_args_parsing()
import comfy.sd

results = {}
for case in json.load(open(cases_file)):
    patcher = comfy.sd.load_diffusion_model(case["model"], model_options={"dtype": torch.float32})
    base = patcher.model
    net = base.diffusion_model.float()
    inputs = load_file(case["inputs"])
    results[case["name"] + "/class"] = type(base).__name__
    with torch.no_grad():
        for call in case["calls"]:
            x = inputs[call["x"]]
            t = inputs[call["t"]]
            if call.get("denoise_mask"):
                t = base.process_timestep(t, x=x, denoise_mask=inputs[call["denoise_mask"]])
                save_file({"t": t.contiguous()}, case["inputs"] + "." + call["name"] + ".t")
            if call.get("y"):
                x = torch.cat([x, inputs[call["y"]]], dim=1)
            clip_fea = inputs[call["clip_fea"]] if call.get("clip_fea") else None
            out = net(x, t, inputs[call["context"]], clip_fea=clip_fea)
            save_file({"out": out.float().contiguous()}, case["inputs"] + "." + call["name"] + ".out")
json.dump(results, open(cases_file + ".result", "w"))
"""


def _calls(name: str, config, gen: torch.Generator) -> tuple[dict, list[dict]]:
    """Inputs (tensors) and the calls made with them for one architecture."""
    frames, rows, cols = LATENT
    inputs = {
        "x2": torch.randn(2, config.out_dim, frames, rows, cols, generator=gen),
        "t2": torch.tensor([930.0, 410.0]),
        "context2": torch.randn(2, 11, config.text_dim, generator=gen),
    }
    calls = []
    if config.concat_channels:
        # y = [4 mask channels (1 where the frame is given), image latents], as ComfyUI's concat_cond builds it
        mask = torch.zeros(2, 4, frames, rows, cols)
        mask[:, :, 0] = 1.0
        inputs["y2"] = torch.cat([mask, torch.randn(2, config.out_dim, frames, rows, cols, generator=gen)], dim=1)
        calls.append(dict(name="y", x="x2", t="t2", context="context2", y="y2"))
    if config.clip_image:
        inputs["clip2"] = torch.randn(2, 257, config.image_dim, generator=gen)
        inputs["clip_two_images"] = torch.randn(2, 514, config.image_dim, generator=gen)
        calls.append(dict(name="y_clip", x="x2", t="t2", context="context2", y="y2", clip_fea="clip2"))
        calls.append(dict(name="y_clip514", x="x2", t="t2", context="context2", y="y2", clip_fea="clip_two_images"))
    if config.per_frame_timesteps:
        calls.append(dict(name="scalar_t", x="x2", t="t2", context="context2"))
        keep_first = torch.ones(2, 1, frames, rows, cols)
        keep_first[:, :, 0] = 0.0  # Wan22ImageToVideoLatent's noise_mask: the image frame is kept
        inputs["keep_first"] = keep_first
        calls.append(dict(name="per_frame", x="x2", t="t2", context="context2", denoise_mask="keep_first"))
        partly = keep_first.clone()
        partly[0, :, 2, : rows // 2] = 0.25  # a frame partly kept: ComfyUI averages the mask over the frame
        inputs["partly_kept"] = partly
        calls.append(dict(name="partly_kept", x="x2", t="t2", context="context2", denoise_mask="partly_kept"))
        tokens = frames * (rows // 2) * (cols // 2)
        inputs["t_tokens"] = torch.rand(2, tokens, generator=gen) * 1000
        calls.append(dict(name="per_token", x="x2", t="t_tokens", context="context2"))
    return inputs, calls


@pytest.fixture(scope="module")
def comfy_outputs(tmp_path_factory):
    """Write every tiny checkpoint and its inputs, run ComfyUI once over all of them."""
    root = tmp_path_factory.mktemp("wan-vs-comfy")
    gen = torch.Generator().manual_seed(21)
    cases = []
    for seed, (name, (overrides, layout, file_name, _)) in enumerate(ARCHITECTURES.items()):
        config = tiny_config(**{**COMFY_SHAPES, **overrides})
        model_path = write_checkpoint(
            root / file_name, random_model(config, seed=seed), layout=layout, dtype=torch.float32, metadata=False
        )
        inputs, calls = _calls(name, config, gen)
        inputs_path = root / f"{name}.inputs.safetensors"
        save_file(inputs, str(inputs_path))
        cases.append(dict(name=name, model=str(model_path), inputs=str(inputs_path), calls=calls))
    cases_file = root / "cases.json"
    cases_file.write_text(json.dumps(cases))
    run = subprocess.run(
        [COMFYUI_PYTHON, "-c", COMFY_SCRIPT, str(cases_file)],
        cwd=COMFYUI_PATH,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    return root, json.loads(Path(str(cases_file) + ".result").read_text()), {c["name"]: c for c in cases}


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_same_forward_as_comfyui(comfy_outputs, name):
    root, classes, cases = comfy_outputs
    case = cases[name]
    _, _, _, variant = ARCHITECTURES[name]
    assert classes[f"{name}/class"] == ("WAN22" if name == "wan22_ti2v_5b" else "WAN21")
    info = inspect_wan_checkpoint(case["model"])
    assert info.config.variant == variant
    model = load_wan_model(case["model"])
    inputs = load_file(case["inputs"])
    errors = {}
    with torch.no_grad():
        for call in case["calls"]:
            t = inputs[call["t"]]
            if call.get("denoise_mask"):
                t = frame_timesteps(t, inputs[call["denoise_mask"]])
                comfy_t = load_file(f"{case['inputs']}.{call['name']}.t")["t"]
                assert t.shape == comfy_t.shape == (2, LATENT[0]) and (t[:, 0] == 0).all()
                torch.testing.assert_close(t, comfy_t, rtol=1e-6, atol=1e-4)
            ours = model(
                inputs[call["x"]],
                t,
                inputs[call["context"]],
                clip_fea=inputs[call["clip_fea"]] if call.get("clip_fea") else None,
                y=inputs[call["y"]] if call.get("y") else None,
            )
            theirs = load_file(f"{case['inputs']}.{call['name']}.out")["out"]
            assert ours.shape == theirs.shape
            errors[call["name"]] = relative_error(ours, theirs)
    print(f"{name}: relative error vs ComfyUI {errors}")
    assert max(errors.values()) < TOL, errors
