"""🎯 Official DistriFusion VAE Decode in a real ComfyUI: the same frames as native VAE Decode of the same VAE
(Load VAE, a random Wan 2.1 VAE of the real architecture) at 1 rank (in process) and 2 CPU ranks (workers),
progress per latent frame, and a Wan 2.2-shaped misuse refused with the widget named."""

from __future__ import annotations

import pytest
from comfy_harness import RANDOM_VAE, TWO_RANKS, loader_inputs
from safetensors.torch import load_file
from tiny_wan import relative_error

TOL = 1e-4
VAE_DECODE = "OfficialDistriFusionVAEDecode"
LATENT = {"seed": 3, "width": 32, "height": 40, "length": 9}  # 3 latent frames, 5 rows (odd), 4 cols


def decode_prompt(loader: dict, tag: str) -> dict:
    return {
        "loader": {"class_type": "OfficialDistriFusionModelLoader", "inputs": loader},
        "latent": {"class_type": "DistriFusionTestLatent", "inputs": LATENT},
        "vae": {"class_type": "VAELoader", "inputs": {"vae_name": RANDOM_VAE}},
        "native": {"class_type": "VAEDecode", "inputs": {"samples": ["latent", 0], "vae": ["vae", 0]}},
        "ours": {
            "class_type": VAE_DECODE,
            "inputs": {"samples": ["latent", 0], "vae": ["vae", 0], "model": ["loader", 0]},
        },
        "save_native": {
            "class_type": "DistriFusionTestSaveImage",
            "inputs": {"images": ["native", 0], "filename": f"native_{tag}.safetensors"},
        },
        "save_ours": {
            "class_type": "DistriFusionTestSaveImage",
            "inputs": {"images": ["ours", 0], "filename": f"ours_{tag}.safetensors"},
        },
    }


def test_node_is_listed(comfy):
    info = comfy.get(f"/object_info/{VAE_DECODE}").json()[VAE_DECODE]
    assert info["display_name"] == "🎯 Official DistriFusion VAE Decode"
    assert info["category"] == "WanVideoWrapper/Official DistriFusion"
    assert list(info["input"]["required"]) == ["samples", "vae", "model"] and info["output"] == ["IMAGE"]


@pytest.mark.parametrize("ranks", [1, 2])
def test_same_frames_as_native_vae_decode(comfy, ranks):
    loader = loader_inputs(**(TWO_RANKS if ranks == 2 else {}))
    ws = comfy.connect_ws()
    prompt_id = comfy.queue(decode_prompt(loader, f"{ranks}"))
    entry = comfy.wait(prompt_id)
    assert entry["status"]["status_str"] == "success", entry["status"]
    out = comfy.base / "output"
    native = load_file(str(out / f"native_{ranks}.safetensors"))["images"]
    ours = load_file(str(out / f"ours_{ranks}.safetensors"))["images"]
    assert ours.shape == native.shape == (9, 40, 32, 3)
    error = relative_error(ours, native)
    print(f"{ranks} rank(s): relative error vs native VAE Decode {error:.2e}")
    assert error < TOL
    progress = [
        m["data"]["value"]
        for m in ws.received
        if m["type"] == "progress" and m["data"].get("prompt_id") == prompt_id and m["data"]["node"] == "ours"
    ]
    assert progress == [1, 2, 3], ws.received[-20:]


def test_cancel_stops_the_ranks_and_the_next_decode_runs(comfy):
    """Cancel during a long 2-rank decode interrupts the prompt; the same ranks then decode the next one."""
    ws = comfy.connect_ws()
    prompt = decode_prompt(loader_inputs(**TWO_RANKS), "cancelled")
    prompt["latent"]["inputs"] = {**LATENT, "length": 161}  # 41 latent frames
    for name in ("native", "save_native"):
        del prompt[name]
    pids = comfy.get("/distrifusion/status").json()["runtime"]["pids"]
    prompt_id = comfy.queue(prompt)
    ws.wait_for(
        lambda m: (
            m["type"] == "progress"
            and m["data"].get("prompt_id") == prompt_id
            and m["data"]["node"] == "ours"
            and m["data"]["value"] >= 2
        ),
        timeout=180,
    )
    assert comfy.post("/interrupt").status_code == 200
    entry = comfy.wait(prompt_id, timeout=120)
    assert entry["status"]["status_str"] == "error"
    assert "execution_interrupted" in [m[0] for m in entry["status"]["messages"]]
    values = [
        m["data"]["value"]
        for m in ws.received
        if m["type"] == "progress" and m["data"].get("prompt_id") == prompt_id and m["data"]["node"] == "ours"
    ]
    assert max(values) < 41, values  # stopped before the end
    test_same_frames_as_native_vae_decode(comfy, 2)  # the group still serves
    assert comfy.get("/distrifusion/status").json()["runtime"]["pids"] == pids


def test_image_latent_is_refused_naming_the_input(comfy):
    prompt = decode_prompt(loader_inputs(), "bad")
    prompt["latent"] = {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}
    for name in ("native", "save_native"):  # only our node sees the image latent
        del prompt[name]
    entry = comfy.wait(comfy.queue(prompt))
    assert entry["status"]["status_str"] == "error"
    messages = [m for m in entry["status"]["messages"] if m[0] == "execution_error"]
    assert "samples:" in messages[0][1]["exception_message"], messages
