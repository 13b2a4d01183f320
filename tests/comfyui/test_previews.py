"""Live previews in real ComfyUI (the test server runs with ``--preview-method auto``): every sampler choice of our
Sampler sends one preview frame on ``/ws`` per progress step, as many as native KSampler sends for the same
sampler; Wan's own solvers (``unipc``, ``dpm++``), which KSampler does not have, send one per step.
"""

from __future__ import annotations

import pytest
from comfy_harness import SAMPLER, TINY_MODEL, base_prompt, loader_inputs, sampler_inputs

STEPS = 3
SIZE = {"width": 32, "height": 32, "length": 1}
PREVIEW_IMAGE = 1
"""ComfyUI's binary event type of a preview frame (``server.BinaryEventTypes.PREVIEW_IMAGE``)."""


@pytest.fixture(scope="module")
def sampler_names(comfy) -> list[str]:
    return comfy.get("/object_info").json()[SAMPLER]["input"]["required"]["sampler"][0]


def finished(message: dict, prompt_id: str) -> bool:
    data = message.get("data") or {}
    return message["type"] == "executing" and data.get("prompt_id") == prompt_id and data.get("node") is None


def frames_per_node(received: list[dict], prompt_id: str) -> dict[str, dict[str, int]]:
    """For each node of the prompt: its progress messages and the preview frames that followed them."""
    counts: dict[str, dict[str, int]] = {}
    node = None
    mine = False
    for message in received:
        data = message.get("data") or {}
        if message["type"] == "progress":
            mine = data.get("prompt_id") == prompt_id
            node = data.get("node") if mine else None
            if mine:
                counts.setdefault(node, {"progress": 0, "previews": 0})["progress"] += 1
        elif message["type"] == "binary" and message["event"] == PREVIEW_IMAGE and mine and node is not None:
            counts[node]["previews"] += 1
    return counts


def test_every_sampler_sends_one_preview_per_step(comfy, sampler_names):
    ws = comfy.connect_ws()
    wan_solvers = {"unipc", "dpm++"}
    assert wan_solvers <= set(sampler_names)
    failures = []
    for name in sampler_names:
        ours = sampler_inputs(sampler=name, steps=STEPS, cfg=1.5, **SIZE)
        prompt = base_prompt(loader_inputs(patch_size=16), ours, f"previews/{name}")
        native = name not in wan_solvers
        if native:
            prompt.update(
                {
                    "unet": {
                        "class_type": "UNETLoader",
                        "inputs": {"unet_name": TINY_MODEL, "weight_dtype": "default"},
                    },
                    "shift": {"class_type": "ModelSamplingSD3", "inputs": {"model": ["unet", 0], "shift": 3.0}},
                    "empty": {"class_type": "EmptyHunyuanLatentVideo", "inputs": {**SIZE, "batch_size": 1}},
                    "ksampler": {
                        "class_type": "KSampler",
                        "inputs": {
                            "model": ["shift", 0],
                            "positive": ["pos", 0],
                            "negative": ["neg", 0],
                            "latent_image": ["empty", 0],
                            "sampler_name": name,
                            "scheduler": "simple",
                            "steps": STEPS,
                            "cfg": 1.5,
                            "seed": 7,
                            "denoise": 1.0,
                        },
                    },
                    "save_native": {
                        "class_type": "SaveLatent",
                        "inputs": {"samples": ["ksampler", 0], "filename_prefix": f"previews/native_{name}"},
                    },
                }
            )
        prompt_id = comfy.queue(prompt)
        entry = comfy.wait(prompt_id)
        if entry["status"]["status_str"] != "success":
            failures.append(f"{name}: {entry['status']['status_str']} {entry['status'].get('messages', [])[-1:]}")
            continue
        ws.wait_for(lambda m, p=prompt_id: finished(m, p), timeout=60)  # every frame of this prompt is in
        counts = frames_per_node(ws.received, prompt_id)
        got = counts.get("sampler", {"progress": 0, "previews": 0})
        expected = counts["ksampler"]["previews"] if native else STEPS
        if got["previews"] != expected or got["previews"] != got["progress"] or expected < 1:
            failures.append(f"{name}: {got}, expected {expected} previews (native: {counts.get('ksampler')})")
    assert failures == [], "\n".join(failures)
