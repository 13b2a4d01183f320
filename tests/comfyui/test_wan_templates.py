"""ComfyUI's own Wan template graphs against the same graphs with our Loader and Sampler, in real ComfyUI.

Each architecture gets a tiny random checkpoint that ComfyUI's ``UNETLoader`` reads (dim 256 = 2 heads of 128, text
4096, frequencies 256, CLIP 1280). The native graph is the template's: ``UNETLoader`` -> ``ModelSamplingSD3`` ->
``KSampler``, fed by native ``WanImageToVideo`` (start image through the tiny random Wan VAE, CLIP vision output from
a stand-in node) or, for the TI2V 5B, a stand-in for ``Wan22ImageToVideoLatent`` (the Wan 2.2 VAE is not tiny here).
Our graph swaps in the DistriFusion Loader and Sampler on the same conditioning and latent; the final latents must
agree to fp32 round-off, at 1 rank and at 2 ranks.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from comfy_harness import LOADER, RANDOM_VAE, SAMPLER, STATUS, loader_inputs
from test_nodes_api import load_latent, output_files, relative_error
from tiny_wan import random_model, tiny_config, write_checkpoint

SAMPLER_ADVANCED = "OfficialDistriFusionSamplerAdvanced"
LORA_NODE = "OfficialDistriFusionLora"
VAE_DECODE = "OfficialDistriFusionVAEDecode"
TOL = 1e-4
COMFY_SHAPES = dict(dim=256, num_heads=2, ffn_dim=320, num_layers=2, text_dim=4096, freq_dim=256, image_dim=1280)
"""Tiny, yet what ComfyUI's Wan detection builds: heads = dim / 128, text 4096, frequencies 256, CLIP 1280."""
MODELS = {
    # file name: (config overrides, key layout)
    "wan2.1_i2v_480p_tiny.safetensors": (dict(model_type="i2v", in_dim=36, out_dim=16), "comfyui"),
    "wan2.2_i2v_high_noise_14B_tiny.safetensors": (dict(in_dim=36, out_dim=16), "original"),
    "wan2.2_ti2v_5B_tiny.safetensors": (dict(in_dim=48, out_dim=48), "comfyui"),
    "wan2.2_i2v_low_noise_14B_tiny.safetensors": (dict(in_dim=36, out_dim=16), "comfyui"),
    "wan2.2_t2v_high_noise_14B_tiny.safetensors": (dict(in_dim=16, out_dim=16), "comfyui"),
    "wan2.2_t2v_low_noise_14B_tiny.safetensors": (dict(in_dim=16, out_dim=16), "original"),
    "wan2.1_flf2v_720p_tiny.safetensors": (
        dict(model_type="i2v", in_dim=36, out_dim=16, image_positions=514),
        "comfyui",
    ),
}
I2V_MODEL, A14B_I2V_HIGH, TI2V_MODEL, A14B_I2V_LOW, A14B_T2V_HIGH, A14B_T2V_LOW, FLF2V_MODEL = MODELS
I2V_SIZE = {"width": 32, "height": 32, "length": 5}
"""Latent [1, 16, 2, 4, 4]: a (2, 2, 2) token grid, two token rows for two ranks; small for the random VAE."""
TI2V_SIZE = {"width": 64, "height": 64, "length": 5}
"""Latent [1, 48, 2, 4, 4] (the Wan 2.2 VAE is 16x): the same (2, 2, 2) token grid."""
SETTINGS = {"seed": 11, "steps": 3, "cfg": 3.5, "scheduler": "simple", "denoise": 1.0}
SHIFT = 8.0
MODES = {
    "1 rank": {},
    "2 ranks sync": {"gpus": 2, "parallel_mode": "sync"},
    "2 ranks ulysses": {"gpus": 2, "parallel_mode": "ulysses"},
    "2 ranks displaced warm-up": {"gpus": 2, "parallel_mode": "displaced", "warmup_steps": 10},
}
"""Loader settings; the patch size is one token row (16 px for Wan 2.1 / A14B, 32 px for the 5B) so two ranks
split the two token rows."""


@pytest.fixture(scope="module")
def wan_models(comfy_base) -> None:
    folder = comfy_base / "models" / "diffusion_models"
    for seed, (name, (overrides, layout)) in enumerate(MODELS.items()):
        if not (folder / name).exists():
            model = random_model(tiny_config(**{**COMFY_SHAPES, **overrides}), seed=30 + seed)
            write_checkpoint(folder / name, model, layout=layout, dtype=torch.float32, metadata=False)


FOUR_STEP_LORAS = {
    "t2v": ("wan2.2_t2v_4steps_lora_tiny_high_noise.safetensors", "wan2.2_t2v_4steps_lora_tiny_low_noise.safetensors"),
    "i2v": ("wan2.2_i2v_4steps_lora_tiny_high_noise.safetensors", "wan2.2_i2v_4steps_lora_tiny_low_noise.safetensors"),
}
"""Tiny stand-ins of the lightx2v 4-step LoRAs, one per expert: up/down + alpha for every Linear, ``diff`` /
``diff_b`` for norms and biases, ranks and alphas differing per layer (the A14B stand-ins' shapes; both tasks' tiny
experts share them, as Wan 2.2 I2V has no CLIP layers)."""


@pytest.fixture(scope="module")
def wan_loras(comfy_base) -> None:
    from tiny_lora import random_lora, write_lora

    config = tiny_config(**{**COMFY_SHAPES, "in_dim": 16, "out_dim": 16})
    files = [file for pair in FOUR_STEP_LORAS.values() for file in pair]
    for seed, name in enumerate(files, start=40):
        if not (comfy_base / "models" / "loras" / name).exists():
            # native ComfyUI 0.3.64 leaves modulation deltas out (see README, LoRA): none here either
            lora = random_lora(config, seed=seed, with_diffs=True, scale=0.05, modulation=False)
            write_lora(comfy_base / "models" / "loras" / name, lora, "lightx2v")


def i2v_nodes(clip_vision: bool) -> dict:
    """Test prompts -> native WanImageToVideo (random start image, tiny random VAE, optional CLIP vision)."""
    inputs = {"positive": ["pos", 0], "negative": ["neg", 0], "vae": ["vae", 0], "start_image": ["image", 0]}
    nodes = {
        "pos": {"class_type": "DistriFusionTestConditioning", "inputs": {"seed": 1, "tokens": 12, "width": 4096}},
        "neg": {"class_type": "DistriFusionTestConditioning", "inputs": {"seed": 2, "tokens": 5, "width": 4096}},
        "vae": {"class_type": "VAELoader", "inputs": {"vae_name": RANDOM_VAE}},
        "image": {"class_type": "DistriFusionTestImage", "inputs": {"seed": 4, "width": 48, "height": 40, "frames": 1}},
        "clipv": {"class_type": "DistriFusionTestClipVision", "inputs": {"seed": 3, "tokens": 257}},
        "cond": {"class_type": "WanImageToVideo", "inputs": {**inputs, **I2V_SIZE, "batch_size": 1}},
    }
    if clip_vision:
        nodes["cond"]["inputs"]["clip_vision_output"] = ["clipv", 0]
    return nodes


def ti2v_nodes() -> dict:
    return {
        "pos": {"class_type": "DistriFusionTestConditioning", "inputs": {"seed": 1, "tokens": 12, "width": 4096}},
        "neg": {"class_type": "DistriFusionTestConditioning", "inputs": {"seed": 2, "tokens": 5, "width": 4096}},
        "cond": {"class_type": "DistriFusionTestTI2VLatent", "inputs": {"seed": 6, **TI2V_SIZE}},
    }


def run_native_and_ours(comfy, model: str, nodes: dict, links: dict, loader: dict, sampler: str, tag: str):
    """The conditioning ``nodes``, then native UNETLoader + ModelSamplingSD3 + KSampler beside our Loader + Sampler;
    ``links``: the positive/negative/latent sockets. Both final latents."""
    size = TI2V_SIZE if model == TI2V_MODEL else I2V_SIZE
    prompt = dict(nodes)
    prompt.update(
        {
            "unet": {"class_type": "UNETLoader", "inputs": {"unet_name": model, "weight_dtype": "default"}},
            "shift": {"class_type": "ModelSamplingSD3", "inputs": {"model": ["unet", 0], "shift": SHIFT}},
            "ksampler": {
                "class_type": "KSampler",
                "inputs": {
                    "model": ["shift", 0],
                    "positive": links["positive"],
                    "negative": links["negative"],
                    "latent_image": links["latent"],
                    "sampler_name": sampler,
                    **SETTINGS,
                },
            },
            "save_native": {
                "class_type": "SaveLatent",
                "inputs": {"samples": ["ksampler", 0], "filename_prefix": f"templates/native_{tag}"},
            },
            "loader": {"class_type": LOADER, "inputs": loader_inputs(model=model, **loader)},
            "sampler": {
                "class_type": SAMPLER,
                "inputs": {
                    "model": ["loader", 0],
                    "positive": links["positive"],
                    "negative": links["negative"],
                    "latent": links["latent"],
                    "shift": SHIFT,
                    "sampler": sampler,
                    "sync_frequency": 0,
                    **SETTINGS,
                    **size,
                },
            },
            "save": {
                "class_type": "SaveLatent",
                "inputs": {"samples": ["sampler", 0], "filename_prefix": f"templates/ours_{tag}"},
            },
        }
    )
    entry = comfy.run(prompt)
    ours = load_latent(output_files(comfy, entry, "save", "latents")[-1])
    native = load_latent(output_files(comfy, entry, "save_native", "latents")[-1])
    return ours, native


I2V_LINKS = {"positive": ["cond", 0], "negative": ["cond", 1], "latent": ["cond", 2]}


@pytest.mark.parametrize("mode", list(MODES))
def test_wan21_i2v_template_equals_native(comfy, wan_models, mode):
    """Wan 2.1 I2V (image_to_video_wan.json): WanImageToVideo with a start image and CLIP vision output."""
    ours, native = run_native_and_ours(
        comfy,
        I2V_MODEL,
        i2v_nodes(clip_vision=True),
        I2V_LINKS,
        {**MODES[mode], "patch_size": 16},
        "uni_pc",
        f"i2v_{mode.replace(' ', '_')}",
    )
    assert ours.shape == native.shape == (1, 16, 2, 4, 4)
    error = relative_error(ours, native)
    print(f"Wan 2.1 I2V, {mode}: relative error {error:.2e}")
    assert error < TOL


@pytest.mark.parametrize("mode", ["1 rank", "2 ranks sync", "2 ranks ulysses"])
def test_wan21_flf2v_template_equals_native(comfy, wan_models, mode):
    """Wan 2.1 FLF2V (wan2.1_flf2v_720_f16.json): WanFirstLastFrameToVideo with a start and an end image and both
    CLIP vision outputs (2 x 257 tokens with learned positions)."""
    nodes = i2v_nodes(clip_vision=False)
    nodes["end"] = {
        "class_type": "DistriFusionTestImage",
        "inputs": {"seed": 8, "width": 32, "height": 32, "frames": 1},
    }
    nodes["clipv_end"] = {"class_type": "DistriFusionTestClipVision", "inputs": {"seed": 9, "tokens": 257}}
    inputs = dict(nodes["cond"]["inputs"])
    inputs.update(end_image=["end", 0], clip_vision_start_image=["clipv", 0], clip_vision_end_image=["clipv_end", 0])
    nodes["cond"] = {"class_type": "WanFirstLastFrameToVideo", "inputs": inputs}
    ours, native = run_native_and_ours(
        comfy,
        FLF2V_MODEL,
        nodes,
        I2V_LINKS,
        {**MODES[mode], "patch_size": 16},
        "euler",
        f"flf2v_{mode.replace(' ', '_')}",
    )
    error = relative_error(ours, native)
    print(f"Wan 2.1 FLF2V, {mode}: relative error {error:.2e}")
    assert error < TOL


@pytest.mark.parametrize("mode", ["1 rank", "2 ranks sync"])
def test_wan22_a14b_i2v_template_equals_native(comfy, wan_models, mode):
    """Wan 2.2 I2V A14B (video_wan2_2_14B_i2v.json): image channels, no CLIP vision."""
    ours, native = run_native_and_ours(
        comfy,
        A14B_I2V_HIGH,
        i2v_nodes(clip_vision=False),
        I2V_LINKS,
        {**MODES[mode], "patch_size": 16},
        "euler",
        f"a14b_{mode.replace(' ', '_')}",
    )
    error = relative_error(ours, native)
    print(f"Wan 2.2 I2V A14B, {mode}: relative error {error:.2e}")
    assert error < TOL


@pytest.mark.parametrize("mode", list(MODES))
def test_wan22_ti2v_5b_template_equals_native(comfy, wan_models, mode):
    """Wan 2.2 TI2V 5B (video_wan2_2_5B_ti2v.json): 48 channels, the first latent frame kept (noise mask) with
    timestep 0, 32 px tokens."""
    loader = {**MODES[mode], "patch_size": 32}
    links = {"positive": ["pos", 0], "negative": ["neg", 0], "latent": ["cond", 0]}
    ours, native = run_native_and_ours(
        comfy, TI2V_MODEL, ti2v_nodes(), links, loader, "uni_pc", f"ti2v_{mode.replace(' ', '_')}"
    )
    assert ours.shape == native.shape == (1, 48, 2, 4, 4)
    error = relative_error(ours, native)
    print(f"Wan 2.2 TI2V 5B, {mode}: relative error {error:.2e}")
    assert error < TOL


def two_expert_prompt(
    high: str,
    low: str,
    nodes: dict,
    links: dict,
    split: int,
    steps: int,
    loader: dict,
    *,
    cfg: float = 3.5,
    shift: float = SHIFT,
    loras: tuple[str, str] | None = None,
    strengths: tuple[float, float] = (1.0, 1.0),
) -> dict:
    """The Wan 2.2 A14B templates' graph: two KSamplerAdvanced (high-noise expert steps 0..split returning with
    leftover noise, low-noise expert split..end without new noise), natively and with our Loader's two outputs.
    ``loras``: one LoRA file per expert (the 4-step form): native LoraLoaderModelOnly after each UNETLoader, ours one
    LoRA node into the Loader's lora and one into its second_lora."""
    common = {"noise_seed": 13, "steps": steps, "cfg": cfg, "sampler_name": "euler", "scheduler": "simple"}
    first = {"add_noise": "enable", "start_at_step": 0, "end_at_step": split, "return_with_leftover_noise": "enable"}
    second = {"add_noise": "disable", "start_at_step": split, "end_at_step": 10000}
    second["return_with_leftover_noise"] = "disable"
    conds = {"positive": links["positive"], "negative": links["negative"]}
    prompt = dict(nodes)
    for index, (name, file) in enumerate((("high", high), ("low", low))):
        prompt[f"unet_{name}"] = {"class_type": "UNETLoader", "inputs": {"unet_name": file, "weight_dtype": "default"}}
        model = [f"unet_{name}", 0]
        if loras is not None:
            prompt[f"native_lora_{name}"] = {
                "class_type": "LoraLoaderModelOnly",
                "inputs": {"model": model, "lora_name": loras[index], "strength_model": strengths[index]},
            }
            model = [f"native_lora_{name}", 0]
        prompt[f"shift_{name}"] = {"class_type": "ModelSamplingSD3", "inputs": {"model": model, "shift": shift}}
    prompt["native_1"] = {
        "class_type": "KSamplerAdvanced",
        "inputs": {"model": ["shift_high", 0], **conds, "latent_image": links["latent"], **common, **first},
    }
    prompt["native_2"] = {
        "class_type": "KSamplerAdvanced",
        "inputs": {"model": ["shift_low", 0], **conds, "latent_image": ["native_1", 0], **common, **second},
    }
    prompt["loader"] = {"class_type": LOADER, "inputs": loader_inputs(model=high, second_model=low, **loader)}
    if loras is not None:
        for socket, file, strength in zip(("lora", "second_lora"), loras, strengths):
            prompt[f"{socket}_node"] = {"class_type": LORA_NODE, "inputs": {"lora_name": file, "strength": strength}}
            prompt["loader"]["inputs"][socket] = [f"{socket}_node", 0]
    ours = {**common, "shift": shift, "sync_frequency": 0}
    prompt["ours_1"] = {
        "class_type": SAMPLER_ADVANCED,
        "inputs": {"model": ["loader", 0], **conds, "latent_image": links["latent"], **ours, **first},
    }
    prompt["ours_2"] = {
        "class_type": SAMPLER_ADVANCED,
        "inputs": {"model": ["loader", 1], **conds, "latent_image": ["ours_1", 0], **ours, **second},
    }
    for name in ("native_1", "native_2", "ours_1", "ours_2"):
        prompt[f"save_{name}"] = {
            "class_type": "SaveLatent",
            "inputs": {"samples": [name, 0], "filename_prefix": f"templates/experts_{name}"},
        }
    return prompt


T2V_NODES = {
    "pos": {"class_type": "DistriFusionTestConditioning", "inputs": {"seed": 1, "tokens": 12, "width": 4096}},
    "neg": {"class_type": "DistriFusionTestConditioning", "inputs": {"seed": 2, "tokens": 5, "width": 4096}},
    "empty": {"class_type": "EmptyHunyuanLatentVideo", "inputs": {**I2V_SIZE, "batch_size": 1}},
}
T2V_LINKS = {"positive": ["pos", 0], "negative": ["neg", 0], "latent": ["empty", 0]}


@pytest.mark.parametrize(
    ("task", "split", "steps", "mode"),
    [
        ("t2v", 2, 4, "1 rank"),  # the 4-step LoRA form: 0-2 / 2-4
        ("t2v", 2, 4, "2 ranks sync"),
        ("i2v", 3, 5, "2 ranks sync"),
        ("t2v", 2, 4, "2 ranks ulysses"),
    ],
)
def test_wan22_a14b_two_experts_equal_two_ksampler_advanced(comfy, wan_models, task, split, steps, mode):
    """video_wan2_2_14B_t2v.json / _i2v.json: both stages' latents (the first with its leftover noise) equal the
    native KSamplerAdvanced pair's; both experts on one worker group."""
    if task == "t2v":
        high, low, nodes, links = A14B_T2V_HIGH, A14B_T2V_LOW, T2V_NODES, T2V_LINKS
    else:
        high, low, nodes, links = A14B_I2V_HIGH, A14B_I2V_LOW, i2v_nodes(clip_vision=False), I2V_LINKS
    loader = {**MODES[mode], "patch_size": 16}
    entry = comfy.run(two_expert_prompt(high, low, nodes, links, split, steps, loader))
    latents = {
        name: load_latent(output_files(comfy, entry, f"save_{name}", "latents")[-1])
        for name in ("native_1", "native_2", "ours_1", "ours_2")
    }
    leftover = relative_error(latents["ours_1"], latents["native_1"])
    final = relative_error(latents["ours_2"], latents["native_2"])
    print(f"Wan 2.2 A14B {task} two experts, {mode}: stage 1 {leftover:.2e}, final {final:.2e}")
    assert relative_error(latents["native_2"], latents["native_1"]) > 0.05  # the second stage did work
    assert leftover < TOL and final < TOL
    status = comfy.get("/distrifusion/status").json()
    assert "low-noise expert" in status["step"]["model"] and low in status["step"]["model"], status["step"]


@pytest.mark.parametrize("task", ["t2v", "i2v"])
@pytest.mark.parametrize("mode", ["1 rank", "2 ranks sync"])
def test_wan22_four_step_lora_template_equals_native(comfy, wan_models, wan_loras, task, mode):
    """The 4-step form of video_wan2_2_14B_t2v.json / _i2v.json: each expert with its own LoRA (native: UNETLoader ->
    LoraLoaderModelOnly -> ModelSamplingSD3 -> KSamplerAdvanced; ours: a LoRA node into the Loader's lora and one
    into its second_lora), euler / simple, cfg 1, shift 5, 4 steps split 2 + 2."""
    if task == "t2v":
        high, low, nodes, links = A14B_T2V_HIGH, A14B_T2V_LOW, T2V_NODES, T2V_LINKS
    else:
        high, low, nodes, links = A14B_I2V_HIGH, A14B_I2V_LOW, i2v_nodes(clip_vision=False), I2V_LINKS
    loader = {**MODES[mode], "patch_size": 16}
    loras = FOUR_STEP_LORAS[task]
    prompt = two_expert_prompt(high, low, nodes, links, 2, 4, loader, cfg=1.0, shift=5.0, loras=loras)
    entry = comfy.run(prompt)
    latents = {
        name: load_latent(output_files(comfy, entry, f"save_{name}", "latents")[-1])
        for name in ("native_1", "native_2", "ours_1", "ours_2")
    }
    leftover = relative_error(latents["ours_1"], latents["native_1"])
    final = relative_error(latents["ours_2"], latents["native_2"])
    print(f"Wan 2.2 A14B {task} 4 steps with two LoRAs, {mode}: stage 1 {leftover:.2e}, final {final:.2e}")
    assert relative_error(latents["native_2"], latents["native_1"]) > 0.05  # the second stage did work
    assert leftover < TOL and final < TOL
    # the LoRAs changed the result: the same graph without them differs
    plain = two_expert_prompt(high, low, nodes, links, 2, 4, loader, cfg=1.0, shift=5.0)
    plain = {k: v for k, v in plain.items() if not k.startswith(("ours", "save_ours", "loader"))}
    entry = comfy.run(plain)
    without = load_latent(output_files(comfy, entry, "save_native_2", "latents")[-1])
    assert relative_error(without, latents["native_2"]) > 1e-2
    status = comfy.get("/distrifusion/status").json()
    runtime = status["runtime"]
    assert [name for name, _ in runtime["loras"]] == [loras[0]], runtime
    assert [name for name, _ in runtime["second_loras"]] == [loras[1]], runtime


def test_one_experts_lora_change_re_merges_that_expert_on_the_running_workers(comfy, wan_models, wan_loras):
    """Between two prompts only the low-noise expert's LoRA strength changes: the same worker processes re-merge
    that expert alone, and both stages still equal the native graph at the new strength."""
    loader = {**MODES["2 ranks sync"], "patch_size": 16}
    loras = FOUR_STEP_LORAS["t2v"]
    errors, pids = [], []
    for strengths in ((1.0, 1.0), (1.0, -0.6)):
        prompt = two_expert_prompt(
            A14B_T2V_HIGH,
            A14B_T2V_LOW,
            T2V_NODES,
            T2V_LINKS,
            2,
            4,
            loader,
            cfg=1.0,
            shift=5.0,
            loras=loras,
            strengths=strengths,
        )
        entry = comfy.run(prompt)
        latents = {
            name: load_latent(output_files(comfy, entry, f"save_{name}", "latents")[-1])
            for name in ("native_1", "native_2", "ours_1", "ours_2")
        }
        errors += [
            relative_error(latents["ours_1"], latents["native_1"]),
            relative_error(latents["ours_2"], latents["native_2"]),
        ]
        pids.append(comfy.get("/distrifusion/status").json()["runtime"]["pids"])
    print(f"low-noise LoRA strength 1.0 -> -0.6 between prompts, 2 ranks: {errors}")
    assert len(pids[0]) == 2 and pids[1] == pids[0]  # no restart
    assert max(errors) < TOL
    assert "LoRA chains of expert(s) [1] re-merged on ranks [0, 1]" in comfy.log()


def test_expert_in_the_wrong_slot_is_refused(comfy, wan_models):
    prompt = two_expert_prompt(A14B_T2V_LOW, A14B_T2V_HIGH, T2V_NODES, T2V_LINKS, 2, 4, {})
    prompt = {k: v for k, v in prompt.items() if not k.startswith(("native", "save_native", "unet", "shift"))}
    entry = comfy.wait(comfy.queue(prompt))
    errors = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]
    assert errors and errors[0]["node_id"] == "loader", entry["status"]
    message = errors[0]["exception_message"]
    assert message.startswith("model: this file is Wan 2.2 T2V A14B (low-noise expert); swap the files"), message


API_DIR = Path(__file__).resolve().parents[2] / "example_workflows" / "api"
TINY_BY_NAME = {
    "t2v_high_noise": A14B_T2V_HIGH,
    "t2v_low_noise": A14B_T2V_LOW,
    "i2v_high_noise": A14B_I2V_HIGH,
    "i2v_low_noise": A14B_I2V_LOW,
    "ti2v_5B": TI2V_MODEL,
    "wan2.1_i2v": I2V_MODEL,
    "flf2v": FLF2V_MODEL,
}


def tiny_stand_in(file_name: str) -> str:
    return next(tiny for key, tiny in TINY_BY_NAME.items() if key in file_name)


@pytest.mark.parametrize("name", sorted(p.stem for p in API_DIR.glob("*.json") if not p.stem.startswith("Wan 2.1 T2V")))
def test_bundled_wan_templates_run_with_tiny_stand_ins(comfy, wan_models, wan_loras, name):
    """Each bundled Wan 2.2 / image-to-video API twin as shipped, on 2 CPU ranks, with stand-ins only where the real
    files cannot be had here: umT5 and CLIP vision (test nodes), the Wan weights (tiny, same architecture), the
    images (random), the VAE (random Wan 2.1; the 5B's latent from the Wan22ImageToVideoLatent stand-in, saved
    as a latent since there is no tiny Wan 2.2 VAE), and a tiny clip."""
    prompt = json.loads((API_DIR / f"{name}.json").read_text())
    kinds = [node["class_type"] for node in prompt.values()]
    assert "UNETLoader" not in kinds and "KSampler" not in kinds and "KSamplerAdvanced" not in kinds
    assert "VAEDecode" not in kinds and kinds.count(VAE_DECODE) == 1  # decoded on the worker group
    assert kinds.count(LOADER) == kinds.count("OfficialDistriFusionStatus") == 1
    ti2v = "Wan22ImageToVideoLatent" in kinds
    for node_id, node in list(prompt.items()):
        kind, inputs = node["class_type"], node["inputs"]
        if kind in ("CLIPLoader", "CLIPVisionLoader") or (ti2v and kind in (VAE_DECODE, "CreateVideo")):
            del prompt[node_id]
        elif kind == "CLIPTextEncode":
            prompt[node_id] = {
                "class_type": "DistriFusionTestConditioning",
                "inputs": {"seed": int(node_id), "tokens": 8, "width": 4096},
            }
        elif kind == "CLIPVisionEncode":
            prompt[node_id] = {
                "class_type": "DistriFusionTestClipVision",
                "inputs": {"seed": int(node_id), "tokens": 257},
            }
        elif kind == "LoadImage":
            prompt[node_id] = {
                "class_type": "DistriFusionTestImage",
                "inputs": {"seed": int(node_id), "width": 32, "height": 32, "frames": 1},
            }
        elif kind == "Wan22ImageToVideoLatent":
            prompt[node_id] = {"class_type": "DistriFusionTestTI2VLatent", "inputs": {"seed": 6, **TI2V_SIZE}}
        elif kind in ("EmptyHunyuanLatentVideo", "WanImageToVideo", "WanFirstLastFrameToVideo"):
            inputs.update(I2V_SIZE)
        elif kind == LOADER:
            inputs.update(model=tiny_stand_in(inputs["model"]), gpus=2, precision="fp32", quantization="disabled")
            inputs.update(kv_dtype="auto", patch_size=32 if ti2v else 16)
            if inputs.get("second_model", "none") != "none":
                inputs["second_model"] = tiny_stand_in(inputs["second_model"])
        elif kind == SAMPLER:
            inputs.update(steps=2)
        elif kind == SAMPLER_ADVANCED:
            inputs.update(steps=2, **({"end_at_step": 1} if inputs["start_at_step"] == 0 else {"start_at_step": 1}))
        elif kind == "VAELoader":
            inputs["vae_name"] = RANDOM_VAE
        elif kind == LORA_NODE:
            pair = FOUR_STEP_LORAS["i2v" if "i2v" in inputs["lora_name"] else "t2v"]
            inputs["lora_name"] = pair[0] if "high_noise" in inputs["lora_name"] else pair[1]
        elif kind == "SaveVideo" and ti2v:
            prompt[node_id] = {
                "class_type": "SaveLatent",
                "inputs": {"samples": prompt["23"]["inputs"]["latent"], "filename_prefix": f"examples/{name}"},
            }
        elif kind == "SaveVideo":
            inputs["filename_prefix"] = f"examples/{name}"
    entry = comfy.run(prompt, timeout=300)
    saved = list((comfy.base / "output" / "examples").glob(f"{name}*"))
    assert saved and all(f.stat().st_size > 0 for f in saved), entry["outputs"]
    status = next(out for node_id, out in entry["outputs"].items() if prompt[node_id]["class_type"] == STATUS)
    text = status["text"][0]
    assert ("Step 1/1" if SAMPLER_ADVANCED in kinds else "Step 2/2") in text, text  # the last stage's steps
    if SAMPLER_ADVANCED in kinds:
        assert "low-noise expert" in text, text
    if "4-step" in name:  # one LoRA per expert, cfg 1 and shift 5 as ComfyUI's 4-step form
        assert kinds.count(LORA_NODE) == 2, kinds
        assert "LoRA: wan2.2_" in text and "LoRA of the second model: wan2.2_" in text, text


@pytest.mark.parametrize("mode", ["1 rank", "2 ranks sync"])
def test_one_sampler_switches_experts_at_wan22s_boundary(comfy, wan_models, mode):
    """The plain Sampler on a two-expert Loader switches where Wan 2.2 does (t2v: sigma 0.875); with shift 8 and 4
    euler steps the sigmas are 1, 0.96, 0.89, 0.73: 3 high-noise steps, then 1 low-noise, the native 0-3 / 3-4 pair."""
    prompt = two_expert_prompt(
        A14B_T2V_HIGH, A14B_T2V_LOW, T2V_NODES, T2V_LINKS, 3, 4, {**MODES[mode], "patch_size": 16}
    )
    for name in ("ours_1", "ours_2", "save_ours_1", "save_ours_2"):
        del prompt[name]
    prompt["ours"] = {
        "class_type": SAMPLER,
        "inputs": {
            "model": ["loader", 0],
            "positive": T2V_LINKS["positive"],
            "negative": T2V_LINKS["negative"],
            "latent": T2V_LINKS["latent"],
            "steps": 4,
            "cfg": 3.5,
            "shift": SHIFT,
            "seed": 13,
            "sampler": "euler",
            "scheduler": "simple",
            "denoise": 1.0,
            "sync_frequency": 0,
            **I2V_SIZE,
        },
    }
    prompt["save_ours"] = {
        "class_type": "SaveLatent",
        "inputs": {"samples": ["ours", 0], "filename_prefix": "templates/one"},
    }
    entry = comfy.run(prompt)
    ours = load_latent(output_files(comfy, entry, "save_ours", "latents")[-1])
    native = load_latent(output_files(comfy, entry, "save_native_2", "latents")[-1])
    error = relative_error(ours, native)
    print(f"Wan 2.2 A14B t2v one Sampler, {mode}: relative error {error:.2e}")
    assert error < TOL
    status = comfy.get("/distrifusion/status").json()
    assert "low-noise expert" in status["step"]["model"] and status["step"]["total"] == 1, status["step"]
