"""One API prompt through our nodes in a real ComfyUI started on a GPU machine (a script, not a test module):

    python3 tests/comfyui/gpu_prompt.py --comfyui /root/ComfyUI [--gpus N] [--out DIR]

Builds a base directory (our pack and the test-only conditioning nodes linked in, a tiny random Wan),
starts ComfyUI without ``--cpu``, queues test conditioning -> our Loader (``gpus`` = N, bf16) -> our Sampler
(832 x 480 x 81, 4 steps) -> core SaveLatent over ``/prompt``, follows ``/ws`` progress, checks the saved
latent, reads the status route, stops ComfyUI and checks that none of its processes is left on the GPUs.
Exits 1 on any failure.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

from comfy_harness import (  # noqa: E402
    PACK_FOLDER,
    REPO_ROOT,
    TEST_PACK_FOLDER,
    TINY_MODEL,
    base_prompt,
    loader_inputs,
    sampler_inputs,
    start_server,
    stop_server,
)
from parallel_harness import register_package  # noqa: E402


def gpu_processes() -> list[str]:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-compute-apps=pid,process_name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
        )
    except FileNotFoundError:  # --cpu check on a machine without NVIDIA tools
        return []
    return [line for line in out.stdout.splitlines() if line.strip()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--comfyui", required=True, help="the ComfyUI checkout (folder with main.py)")
    parser.add_argument("--python", default=sys.executable, help="python that runs ComfyUI")
    parser.add_argument("--gpus", type=int, default=1)
    parser.add_argument("--out", help="folder for the server log and a JSON summary")
    parser.add_argument("--cpu", action="store_true", help="ComfyUI with --cpu (a local check of this script)")
    args = parser.parse_args()

    register_package()
    from conftest import write_tiny_model

    base = Path(tempfile.mkdtemp(prefix="comfy-gpu-"))
    for folder in ("custom_nodes", "models/diffusion_models", "input", "output", "user", "temp"):
        (base / folder).mkdir(parents=True, exist_ok=True)
    (base / "custom_nodes" / PACK_FOLDER).symlink_to(REPO_ROOT, target_is_directory=True)
    (base / "custom_nodes" / TEST_PACK_FOLDER).symlink_to(HERE / "test_pack", target_is_directory=True)
    write_tiny_model(base / "models" / "diffusion_models" / TINY_MODEL)

    summary: dict = {"gpus": args.gpus}
    began = time.monotonic()
    server = start_server(args.python, args.comfyui, base, cpu=args.cpu)
    summary["server_start_s"] = time.monotonic() - began
    ok = False
    try:
        ws = server.connect_ws()
        loader = loader_inputs(gpus=args.gpus, precision="bf16", parallel_mode="displaced" if args.gpus > 1 else "sync")
        size = {"width": 128, "height": 128, "length": 5} if args.cpu else {"width": 832, "height": 480, "length": 81}
        prompt = base_prompt(loader, sampler_inputs(steps=4, **size), prefix="gpu/latent")
        began = time.monotonic()
        prompt_id = server.queue(prompt)
        steps = []

        def finished(message: dict) -> bool:
            if message.get("type") == "progress":
                steps.append(message["data"]["value"])
            data = message.get("data", {})
            return (
                message.get("type") == "executing" and data.get("node") is None and data.get("prompt_id") == prompt_id
            )

        done = ws.wait_for(finished, timeout=300)
        entry = server.wait(prompt_id, timeout=60)
        summary["prompt_s"] = time.monotonic() - began
        summary["status"] = entry["status"]["status_str"]
        summary["progress_values"] = steps
        files = entry.get("outputs", {}).get("save", {}).get("latents", [])
        summary["saved"] = [f["filename"] for f in files]
        summary["device_status"] = server.get("/distrifusion/status").json() if done else None
        ok = summary["status"] == "success" and bool(files) and 4 in steps
    finally:
        log = server.log()
        stop_server(server)
        time.sleep(2)
        summary["gpu_processes_after_stop"] = gpu_processes()
        ok = ok and not summary["gpu_processes_after_stop"]
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / "comfyui_gpu.log").write_text(log)
            (Path(args.out) / "comfyui_gpu.json").write_text(json.dumps(summary, indent=1, default=str))
    status_text = (summary.pop("device_status", None) or {}).get("text", "")
    print(json.dumps(summary, indent=1, default=str))
    print(status_text)
    print("comfyui gpu prompt:", "PASS" if ok else "FAIL")
    if not ok:
        print(log[-4000:])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
