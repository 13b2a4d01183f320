"""EasyCache in real ComfyUI: our Loader -> DistriFusion EasyCache -> Sampler against native UNETLoader ->
ModelSamplingSD3 -> EasyCache -> KSampler with the same settings on the tiny 2-head checkpoint: the same steps
skipped and the same final latent, at 1 rank and at 2 ranks in sync mode.

The reference is native EasyCache with one method changed (``DistriFusionTestEasyCachePerCond`` in the test pack):
ComfyUI 0.3.64 adds the cached differences to the model input in place and, with cond and uncond in one batch,
adds both to every item; for this fp32 model the in-place add also changes the x that ComfyUI's x0 is computed from.
The node adds each conditioning's difference to its own item, out of place (what native does for a bf16/fp16 model
at cfg 1, and later ComfyUI per item); every decision (sigma bounds, subsampling, rates, threshold) is native's code.

Which native steps ran is recorded by a test node on each side of native EasyCache's wrapper (tag "all" sees every
model call, "ran" the ones EasyCache let through); ours come from the Sampler's closing line. On random weights the
number of skipped steps says nothing about real clips: the threshold is chosen so that this tiny model skips some
steps and computes others, which checks the mechanics only.
"""

from __future__ import annotations

import ast
import re

import pytest
from comfy_harness import SIZE, TINY_MODEL, base_prompt, loader_inputs, sampler_inputs
from test_nodes_api import load_latent, output_files, relative_error

TOLERANCE = 1e-4
"""Relative error of our latent vs native KSampler's with the same EasyCache settings (fp32)."""
SETTINGS = {"seed": 5, "steps": 14, "scheduler": "simple", "denoise": 1.0}
CACHE = {"reuse_threshold": 0.88, "start_percent": 0.1, "end_percent": 0.9, "verbose": True}
"""Reuse threshold where the tiny model (drawn anew each test session) skipped 5-6 of the 14 steps in every session
tried, two in a row too (the accumulated change), and computed the others; the accumulated changes seen were at least
0.036 away from it (round-off is ~1e-6). start/end inside the run, so both bounds matter."""

OURS = re.compile(r"EasyCache - skipped (\d+)/(\d+) steps \([^)]*\); skipped calls (\[[\d, ]*\])")
NATIVE_SUMMARY = re.compile(r"EasyCache - skipped (\d+)/(\d+) steps \([\d.]+x speedup\)\.")
NATIVE_CALL = re.compile(r"distrifusion-test model call (all|ran) sigma=([\d.e+-]+)")


def easycache_prompt(loader: dict, cache: dict, cfg: float, native_node: str, prefix: str) -> dict:
    """Ours: Loader -> EasyCache -> Sampler; native: UNETLoader -> recorder(all) -> ModelSamplingSD3 -> EasyCache ->
    recorder(ran) -> KSampler, and native without EasyCache (the guard that caching changed the result)."""
    prompt = base_prompt(
        loader_inputs(**loader), sampler_inputs(sampler="euler", shift=3.0, cfg=cfg, **SETTINGS), f"{prefix}/ours"
    )
    prompt["easycache"] = {"class_type": "OfficialDistriFusionEasyCache", "inputs": {"model": ["loader", 0], **cache}}
    prompt["sampler"]["inputs"]["model"] = ["easycache", 0]

    def ksampler(model: str) -> dict:
        inputs = {"model": [model, 0], "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["source", 0]}
        return {"class_type": "KSampler", "inputs": {**inputs, "sampler_name": "euler", "cfg": cfg, **SETTINGS}}

    def save(node: str, name: str) -> dict:
        return {"class_type": "SaveLatent", "inputs": {"samples": [node, 0], "filename_prefix": f"{prefix}/{name}"}}

    calls = "DistriFusionTestModelCalls"
    prompt.update(
        {
            "unet": {"class_type": "UNETLoader", "inputs": {"unet_name": TINY_MODEL, "weight_dtype": "default"}},
            "record_all": {"class_type": calls, "inputs": {"model": ["unet", 0], "tag": "all"}},
            "shift": {"class_type": "ModelSamplingSD3", "inputs": {"model": ["record_all", 0], "shift": 3.0}},
            "native_easycache": {"class_type": native_node, "inputs": {"model": ["shift", 0], **cache}},
            "record_ran": {"class_type": calls, "inputs": {"model": ["native_easycache", 0], "tag": "ran"}},
            "source": {"class_type": "EmptyHunyuanLatentVideo", "inputs": {**SIZE, "batch_size": 1}},
            "ksampler": ksampler("record_ran"),
            "save_native": save("ksampler", "native"),
            "plain_shift": {"class_type": "ModelSamplingSD3", "inputs": {"model": ["unet", 0], "shift": 3.0}},
            "plain_ksampler": ksampler("plain_shift"),
            "save_plain": save("plain_ksampler", "plain"),
        }
    )
    return prompt


def native_skipped(log: str) -> tuple[list[int], int]:
    """(indices of the calls native EasyCache skipped, calls) from the recorders' lines of one prompt."""
    every, ran = [], set()
    for tag, sigma in NATIVE_CALL.findall(log):
        (every.append if tag == "all" else ran.add)(float(sigma))
    assert len(set(every)) == len(every), "two native calls at one sigma: cannot tell the steps apart"
    return [index for index, sigma in enumerate(every) if sigma not in ran], len(every)


def run_both(comfy, loader: dict, cfg: float, native_node: str, prefix: str) -> dict:
    start = len(comfy.log())
    entry = comfy.run(easycache_prompt(loader, CACHE, cfg, native_node, prefix))
    log = comfy.log()[start:]
    ours = OURS.findall(log)
    assert len(ours) == 1, f"expected one EasyCache line of our Sampler, got {ours}\n{log[-3000:]}"
    count, calls, skipped = ours[0]
    native = NATIVE_SUMMARY.findall(log)
    assert len(native) == 1, f"expected one closing line of native EasyCache, got {native}"
    native_list, native_calls = native_skipped(log)
    status = comfy.get("/distrifusion/status").json()
    latents = {name: load_latent(output_files(comfy, entry, f"save{suffix}", "latents")[0]) for name, suffix in (
        ("ours", ""), ("native", "_native"), ("plain", "_plain"))}  # fmt: skip
    return {
        "ours": ast.literal_eval(skipped),
        "ours_calls": int(calls),
        "ours_count": int(count),
        "native": native_list,
        "native_calls": native_calls,
        "native_count": int(native[0][0]),
        "error": relative_error(latents["ours"], latents["native"]),
        "cache_effect": relative_error(latents["native"], latents["plain"]),
        "status": (status["step"].get("easycache") or "", status["text"]),
    }


@pytest.mark.parametrize(
    ("cfg", "native_node"),
    [(1.0, "DistriFusionTestEasyCachePerCond"), (4.0, "DistriFusionTestEasyCachePerCond")],
    ids=["cfg 1", "cfg 4"],
)
@pytest.mark.parametrize("loader", [{}, {"gpus": 2, "parallel_mode": "sync"}], ids=["1 rank", "2 ranks sync"])
def test_same_steps_skipped_and_same_latent_as_native_easycache(comfy, loader, cfg, native_node):
    ranks = loader.get("gpus", 1)
    result = run_both(comfy, loader, cfg, native_node, f"easycache/{ranks}_{cfg:g}")
    print(
        f"{ranks} rank(s), cfg {cfg:g}: ours skipped {result['ours']} of {result['ours_calls']}, native "
        f"{result['native']} of {result['native_calls']}; relative error vs native {result['error']:.2e} "
        f"(EasyCache vs none: {result['cache_effect']:.2e})"
    )
    steps = SETTINGS["steps"]
    assert result["native_calls"] == result["ours_calls"] == steps
    assert result["native_count"] == len(result["native"]), "the recorders disagree with native EasyCache's count"
    assert result["ours_count"] == len(result["ours"])
    assert 0 < len(result["native"]) < steps - 4, "the threshold must make native skip some steps, not most"
    assert result["ours"] == result["native"]
    summary, text = result["status"]
    assert summary.endswith(f"skipped calls {result['ours']}") and f"⏩ {summary}" in text, result["status"]
    assert result["error"] < TOLERANCE
    assert result["cache_effect"] > 100 * TOLERANCE, "skipping must change the latent, or the check above is empty"


def test_widgets_are_native_easycaches(comfy):
    """Our node offers native EasyCache's widgets with its defaults and ranges, on our model link."""
    info = comfy.get("/object_info").json()
    ours, native = info["OfficialDistriFusionEasyCache"], info["EasyCache"]
    assert ours["display_name"] == "🎯 Official DistriFusion EasyCache"
    assert ours["input"]["required"]["model"][0] == "DISTRIFUSION_WAN_MODEL"
    assert ours["output"] == ["DISTRIFUSION_WAN_MODEL"]
    assert list(ours["input"]["required"]) == list(native["input"]["required"])
    for name in ("reuse_threshold", "start_percent", "end_percent", "verbose"):
        mine, theirs = ours["input"]["required"][name], native["input"]["required"][name]
        assert mine[0] == theirs[0], name
        for key in ("default", "min", "max", "step"):
            assert mine[1].get(key) == theirs[1].get(key), (name, key, mine, theirs)
