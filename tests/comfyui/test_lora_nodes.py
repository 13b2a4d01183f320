"""LoRA in real ComfyUI: our LoRA chain -> Loader -> Sampler against native LoraLoaderModelOnly -> KSampler on the same
tiny checkpoint and LoRA files (every format, 1 and 2 ranks), a strength change without a worker restart, and a
LoRA for another model size refused before anything starts."""

from __future__ import annotations

import pytest
from comfy_harness import (
    LORA_DIFFUSERS_TWIN,
    LORA_FILES,
    LORA_WIDE,
    SIZE,
    TINY_MODEL,
    base_prompt,
    loader_inputs,
    sampler_inputs,
)
from test_nodes_api import load_latent, output_files, relative_error

LORA_NODE = "OfficialDistriFusionLora"
LORA_TOLERANCE = 1e-4
"""Relative error of our latent vs native KSampler's with the same LoRA chain (fp32)."""
CHAIN = (("comfyui", 0.8), ("kohya", -0.5), ("peft", 1.2), ("diffusers", 0.7), ("lightx2v", 1.0))
"""Every format in one chain, with strengths that differ (negative included)."""


def lora_prompt(chain, loader: dict, prefix: str) -> dict:
    """Ours: a LoRA node per link (chained) -> Loader -> Sampler; native: UNETLoader -> one LoraLoaderModelOnly per
    link -> ModelSamplingSD3 -> KSampler; same conditioning, seed, steps, cfg, shift."""
    settings = {"seed": 5, "steps": 3, "cfg": 4.0, "scheduler": "simple", "denoise": 1.0}
    prompt = base_prompt(
        loader_inputs(**loader), sampler_inputs(sampler="euler", shift=3.0, **settings), f"{prefix}/ours"
    )
    previous, native = None, ["unet", 0]
    for index, (fmt, strength) in enumerate(chain):
        inputs = {"lora_name": LORA_FILES[fmt], "strength": strength}
        if previous is not None:
            inputs["previous"] = [previous, 0]
        previous = f"lora{index}"
        prompt[previous] = {"class_type": LORA_NODE, "inputs": inputs}
        native_name = LORA_DIFFUSERS_TWIN if fmt == "diffusers" else LORA_FILES[fmt]
        prompt[f"native_lora{index}"] = {
            "class_type": "LoraLoaderModelOnly",
            "inputs": {"model": native, "lora_name": native_name, "strength_model": strength},
        }
        native = [f"native_lora{index}", 0]
    if previous is not None:
        prompt["loader"]["inputs"]["lora"] = [previous, 0]
    prompt.update(
        {
            "unet": {"class_type": "UNETLoader", "inputs": {"unet_name": TINY_MODEL, "weight_dtype": "default"}},
            "shift": {"class_type": "ModelSamplingSD3", "inputs": {"model": native, "shift": 3.0}},
            "source": {"class_type": "EmptyHunyuanLatentVideo", "inputs": {**SIZE, "batch_size": 1}},
            "ksampler": {
                "class_type": "KSampler",
                "inputs": {
                    "model": ["shift", 0],
                    "positive": ["pos", 0],
                    "negative": ["neg", 0],
                    "latent_image": ["source", 0],
                    "sampler_name": "euler",
                    **settings,
                },
            },
            "save_native": {
                "class_type": "SaveLatent",
                "inputs": {"samples": ["ksampler", 0], "filename_prefix": f"{prefix}/native"},
            },
        }
    )
    return prompt


def run_against_native(comfy, chain, loader: dict, prefix: str) -> tuple[float, dict]:
    entry = comfy.run(lora_prompt(chain, loader, prefix))
    ours = load_latent(output_files(comfy, entry, "save", "latents")[0])
    native = load_latent(output_files(comfy, entry, "save_native", "latents")[0])
    return relative_error(ours, native), entry


def test_lora_node_is_listed(comfy):
    info = comfy.get("/object_info").json()
    node = info[LORA_NODE]
    assert node["display_name"] == "🎯 Official DistriFusion LoRA"
    assert node["category"] == "WanVideoWrapper/Official DistriFusion"
    assert set(LORA_FILES.values()) <= set(node["input"]["required"]["lora_name"][0])
    assert node["input"]["optional"]["previous"][0] == "DISTRIFUSION_LORA_CHAIN"
    assert info["OfficialDistriFusionModelLoader"]["input"]["optional"]["lora"][0] == "DISTRIFUSION_LORA_CHAIN"


@pytest.mark.parametrize("fmt", list(LORA_FILES))
def test_each_format_equals_native_lora_loader_one_rank(comfy, fmt):
    error, _ = run_against_native(comfy, [(fmt, 0.9)], {}, f"lora/{fmt}")
    print(f"1 rank, {fmt}: relative error vs native {error:.2e}")
    assert error < LORA_TOLERANCE


def test_the_lora_changes_the_result(comfy):
    """Guard for the tests above: the LoRA is strong enough that dropping it fails the tolerance by far."""
    with_lora, _ = run_against_native(comfy, CHAIN, {}, "lora/chain1")
    prompt = lora_prompt(CHAIN, {}, "lora/dropped")
    del prompt["loader"]["inputs"]["lora"]
    entry = comfy.run(prompt)
    ours = load_latent(output_files(comfy, entry, "save", "latents")[0])
    native = load_latent(output_files(comfy, entry, "save_native", "latents")[0])
    dropped = relative_error(ours, native)
    print(f"1 rank, chain of 5: {with_lora:.2e}; without our LoRA {dropped:.2e}")
    assert with_lora < LORA_TOLERANCE and dropped > 100 * LORA_TOLERANCE


@pytest.mark.parametrize("mode", ["sync", "ulysses"])
def test_chain_equals_native_two_ranks(comfy, mode):
    error, _ = run_against_native(comfy, CHAIN, {"gpus": 2, "parallel_mode": mode}, f"lora/two_{mode}")
    print(f"2 ranks {mode}, chain of 5: relative error vs native {error:.2e}")
    assert error < LORA_TOLERANCE


def test_strength_change_re_merges_without_restarting_the_workers(comfy):
    loader = {"gpus": 2, "parallel_mode": "sync"}
    first, _ = run_against_native(comfy, [("lightx2v", 1.0), ("kohya", 0.5)], loader, "lora/switch1")
    before = comfy.get("/distrifusion/status").json()["runtime"]
    second, _ = run_against_native(comfy, [("lightx2v", 0.3), ("kohya", -1.0)], loader, "lora/switch2")
    third, _ = run_against_native(comfy, [], loader, "lora/switch3")
    after = comfy.get("/distrifusion/status").json()["runtime"]
    print(f"2 ranks, strengths switched between prompts: {first:.2e}, {second:.2e}, no LoRA {third:.2e}")
    assert len(before["pids"]) == 2 and after["pids"] == before["pids"]
    assert max(first, second, third) < LORA_TOLERANCE
    assert "LoRA chains of expert(s) [0] re-merged on ranks [0, 1]" in comfy.log()


def test_lora_for_another_model_size_is_refused_naming_the_file(comfy):
    prompt = lora_prompt([("comfyui", 1.0)], {}, "lora/wide")
    prompt["lora0"]["inputs"]["lora_name"] = LORA_WIDE
    entry = comfy.wait(comfy.queue(prompt))
    assert entry["status"]["status_str"] == "error"
    errors = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]
    assert errors and errors[0]["node_id"] == "loader"
    message = errors[0]["exception_message"]
    assert LORA_WIDE in message and "does not fit" in message and "width 256" in message
