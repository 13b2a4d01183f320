"""Drives a real ComfyUI server in tests: HTTP API, a small RFC 6455 websocket client, model fixtures.

The websocket client is our own (standard library) because neither the test venv nor ComfyUI's venv
ships one; ComfyUI's ``/ws`` sends unfragmented text frames (JSON) and binary frames (previews).
"""

from __future__ import annotations

import base64
import json
import os
import queue
import socket
import struct
import subprocess
import threading
import time
import uuid
from pathlib import Path

import requests

REPO_ROOT = Path(__file__).resolve().parents[2]
COMFYUI_PATH = os.environ.get("COMFYUI_PATH")
COMFYUI_PYTHON = os.environ.get("COMFYUI_PYTHON")
PACK_FOLDER = "ComfyUI-WanVideo-DistriFusion"
TEST_PACK_FOLDER = "distrifusion-test-nodes"
TINY_MODEL = "wan21_tiny_t2v.safetensors"
TINY_MODEL_4_HEADS = "wan21_tiny_t2v_4heads.safetensors"
RANDOM_VAE = "wan_2.1_vae_random_fp16.safetensors"
LOADER, SAMPLER, STATUS = "OfficialDistriFusionModelLoader", "OfficialDistriFusionSampler", "OfficialDistriFusionStatus"

VAE_SCRIPT = """
import sys, torch
from safetensors.torch import save_file
import comfy.options
target, sys.argv = sys.argv[1], [sys.argv[0], "--cpu"]
comfy.options.enable_args_parsing()  # so comfy.cli_args sees --cpu (no GPU here)
from comfy.ldm.wan.vae import WanVAE
vae = WanVAE(dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
             temperal_downsample=[False, True, True], dropout=0.0)
generator = torch.Generator().manual_seed(0)
with torch.no_grad():  # comfy's ops skip weight init (torch.empty): initialise every tensor ourselves
    for name, p in vae.named_parameters():
        if "gamma" in name:
            p.fill_(1.0)
        elif p.dim() >= 2:
            p.copy_(torch.randn(p.shape, generator=generator) / p[0].numel() ** 0.5)
        else:
            p.zero_()
save_file({k: v.half().contiguous() for k, v in vae.state_dict().items()}, target)
"""


class WebSocket:
    """Minimal websocket client: handshake, unmasked server frames in, masked pong/close out."""

    def __init__(self, host: str, port: int, path: str, timeout: float = 10.0):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        request = (
            f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        self.sock.sendall(request.encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError("websocket handshake: connection closed")
            head += chunk
        header, self._buffer = head.split(b"\r\n\r\n", 1)
        if b" 101 " not in header.split(b"\r\n", 1)[0]:
            raise ConnectionError(f"websocket handshake refused: {header[:200]!r}")
        self.messages: queue.Queue = queue.Queue()
        self.received: list[dict] = []
        self._closed = False
        self._thread = threading.Thread(target=self._reader, daemon=True)
        self.sock.settimeout(None)
        self._thread.start()

    def _read_exact(self, n: int) -> bytes:
        while len(self._buffer) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("websocket closed")
            self._buffer += chunk
        data, self._buffer = self._buffer[:n], self._buffer[n:]
        return data

    def _send(self, opcode: int, payload: bytes = b"") -> None:
        mask = os.urandom(4)
        header = bytes([0x80 | opcode, 0x80 | len(payload)])  # control frames only: payload < 126
        self.sock.sendall(header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))

    def _reader(self) -> None:
        try:
            while not self._closed:
                first, second = self._read_exact(2)
                opcode, length = first & 0x0F, second & 0x7F
                if length == 126:
                    length = struct.unpack(">H", self._read_exact(2))[0]
                elif length == 127:
                    length = struct.unpack(">Q", self._read_exact(8))[0]
                payload = self._read_exact(length)
                if opcode == 0x1:
                    message = json.loads(payload.decode())
                    self.received.append(message)
                    self.messages.put(message)
                elif opcode == 0x2 and length >= 4:
                    # a binary frame: 4-byte event type (1 = preview image), then the payload
                    event = struct.unpack(">I", payload[:4])[0]
                    message = {"type": "binary", "event": event, "bytes": length - 4, "data": {}}
                    self.received.append(message)
                    self.messages.put(message)
                elif opcode == 0x9:
                    self._send(0xA, payload)
                elif opcode == 0x8:
                    break
        except (OSError, ConnectionError, ValueError):
            pass

    def wait_for(self, predicate, timeout: float = 120.0) -> dict:
        """The first message (from now on) that satisfies ``predicate``."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no matching websocket message within {timeout} s")
            try:
                message = self.messages.get(timeout=remaining)
            except queue.Empty as exc:
                raise TimeoutError(f"no matching websocket message within {timeout} s") from exc
            if predicate(message):
                return message

    def close(self) -> None:
        self._closed = True
        try:
            self._send(0x8)
            self.sock.close()
        except OSError:
            pass


class ComfyServer:
    """A running ComfyUI (our process) and helpers for its HTTP API."""

    def __init__(self, process: subprocess.Popen, port: int, base: Path, log_path: Path):
        self.process, self.port, self.base, self.log_path = process, port, base, log_path
        self.url = f"http://127.0.0.1:{port}"
        self.client_id = uuid.uuid4().hex
        self.ws: WebSocket | None = None

    def get(self, path: str, **kwargs) -> requests.Response:
        return requests.get(self.url + path, timeout=kwargs.pop("timeout", 30), **kwargs)

    def post(self, path: str, payload=None, **kwargs) -> requests.Response:
        return requests.post(self.url + path, json=payload, timeout=kwargs.pop("timeout", 30), **kwargs)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def connect_ws(self) -> WebSocket:
        if self.ws is None:
            self.ws = WebSocket("127.0.0.1", self.port, f"/ws?clientId={self.client_id}")
        return self.ws

    def queue(self, prompt: dict) -> str:
        """POST the API-format prompt; return its id (fails the test with ComfyUI's node errors)."""
        response = self.post("/prompt", {"prompt": prompt, "client_id": self.client_id})
        assert response.status_code == 200, f"prompt rejected: {response.status_code} {response.text[:2000]}"
        return response.json()["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 240.0) -> dict:
        """The history entry of a finished prompt."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            history = self.get(f"/history/{prompt_id}").json()
            entry = history.get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None:
                if entry["status"].get("status_str") in ("success", "error"):
                    return entry
            time.sleep(0.2)
        raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout} s\n{self.log()[-4000:]}")

    def run(self, prompt: dict, timeout: float = 240.0) -> dict:
        """Queue, wait, and assert success (with ComfyUI's error and log tail on failure)."""
        entry = self.wait(self.queue(prompt), timeout)
        assert entry["status"]["status_str"] == "success", _failure_text(entry, self.log())
        return entry


def _failure_text(entry: dict, log: str) -> str:
    errors = [m for m in entry["status"].get("messages", []) if m[0] in ("execution_error", "execution_interrupted")]
    detail = json.dumps(errors, indent=1)[:4000]
    return f"prompt failed: {detail}\n--- server log tail ---\n{log[-3000:]}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def random_vae(python: str, comfy_path: str, target: Path, cache_dir: Path) -> None:
    """A random-weight Wan 2.1 VAE (real architecture, fp16) built with ComfyUI's own class, cached."""
    cached = cache_dir / RANDOM_VAE
    if not cached.exists():
        cache_dir.mkdir(parents=True, exist_ok=True)
        partial = cached.with_suffix(".partial")
        subprocess.run([python, "-c", VAE_SCRIPT, str(partial)], cwd=comfy_path, check=True, timeout=300)
        partial.rename(cached)
    target.symlink_to(cached)


def start_server(python: str, comfy_path: str, base: Path, timeout: float = 180.0, cpu: bool = True) -> ComfyServer:
    """ComfyUI on loopback with its own base directory; ``--cpu`` unless ``cpu`` is False (GPU machines)."""
    port = free_port()
    log_path = base / "comfyui.log"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    command = [python, str(Path(comfy_path) / "main.py"), "--listen", "127.0.0.1", "--port", str(port)]
    command += ["--base-directory", str(base), "--disable-auto-launch"] + (["--cpu"] if cpu else [])
    command += ["--preview-method", "auto"]  # live previews on, as a user who wants to see them sets it
    log = open(log_path, "w")
    process = subprocess.Popen(command, cwd=base, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    server = ComfyServer(process, port, base, log_path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"ComfyUI exited with {process.returncode}:\n{server.log()[-4000:]}")
        try:
            if server.get("/system_stats", timeout=2).status_code == 200:
                return server
        except requests.RequestException:
            pass
        time.sleep(0.5)
    stop_server(server)
    raise RuntimeError(f"ComfyUI did not answer /system_stats within {timeout} s:\n{server.log()[-4000:]}")


def stop_server(server: ComfyServer) -> None:
    """Ctrl-C (ComfyUI exits cleanly and its atexit hooks stop our workers), then kill what is left of its group."""
    if server.ws is not None:
        server.ws.close()
    process = server.process
    if process.poll() is None:
        process.send_signal(2)  # SIGINT
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
    try:
        os.killpg(process.pid, 9)  # leftovers of the session we started (workers), by its id
    except (ProcessLookupError, PermissionError):
        pass


def load_by_path(name: str, path: Path):
    """Import one file as a module (ComfyUI's ``latent_formats.py`` needs only torch; our test pack too)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def reference_latent(base: Path, wan21, sampler: dict, *, latent_seed: int | None, size: dict):
    """What the Sampler should return for ``sampler``'s settings, computed here in one process (world size 1)
    with the conditioning/latent the test nodes make, converted with ComfyUI's Wan21 latent format."""
    import torch
    from wan_distrifusion.distrifusion.job import GenerationJob
    from wan_distrifusion.wanvideo.loading import load_wan_model
    from wan_distrifusion.wanvideo.sampling import sample

    test_nodes = load_by_path("distrifusion_test_nodes", Path(__file__).resolve().parent / "test_pack" / "__init__.py")
    model = load_wan_model(base / "models" / "diffusion_models" / TINY_MODEL, dtype=torch.float32)
    job = GenerationJob(
        positive=test_nodes.random_context(1, 12, 4096),
        negative=test_nodes.random_context(2, 5, 4096),
        steps=sampler["steps"],
        cfg=sampler["cfg"],
        shift=sampler["shift"],
        seed=sampler["seed"],
        sampler=sampler["sampler"],
        scheduler=sampler["scheduler"],
        denoise=sampler["denoise"],
        **size,
    )
    if latent_seed is not None:
        comfy_latent = test_nodes.DistriFusionTestLatent().make(latent_seed, **size)[0]["samples"]
        job = job.with_changes(latent=wan21.process_in(comfy_latent))
    latent = sample(
        model,
        job.positive,
        job.negative,
        latent_shape=job.latent_shape(model.config.out_dim),
        latent=job.latent,
        **{name: getattr(job, name) for name in ("seed", "steps", "cfg", "shift", "sampler", "scheduler", "denoise")},
    )
    return wan21.process_out(latent)


# --- prompts -----------------------------------------------------------------------------------------
# Shapes kept tiny: 128 x 128 px, 5 frames -> latent [1, 16, 2, 16, 16], 128 tokens. The random Wan VAE is
# slow on a CPU (~16 s per 64 x 64 clip), so prompts that decode use 32 x 32 px.
SIZE = {"width": 128, "height": 128, "length": 5}
DECODE_SIZE = {"width": 32, "height": 32, "length": 5}
TWO_RANKS = {"gpus": 2, "parallel_mode": "sync"}


def loader_inputs(**overrides) -> dict:
    inputs = {
        "model": TINY_MODEL,
        "precision": "fp32",
        "quantization": "disabled",
        "gpus": 1,
        "patch_size": 32,
        "patch_overlap": 0,
        "split_mode": "spatial",
        "world_size": 0,
        "rank": 0,
        "parallel_mode": "sync",
        "cfg_parallel": False,
        "warmup_steps": 1,
        "attention": "auto",
        "kv_dtype": "auto",
        "comm_backend": "auto",
        "compile": True,  # the Loader's default: on the CPU the ranks run eager
        "second_model": "none",
    }
    inputs.update(overrides)
    return inputs


def sampler_inputs(**overrides) -> dict:
    inputs = {
        "model": ["loader", 0],
        "positive": ["pos", 0],
        "negative": ["neg", 0],
        "steps": 3,
        "cfg": 4.0,
        "shift": 3.0,
        "seed": 7,
        "sampler": "euler",
        "scheduler": "simple",
        "denoise": 1.0,
        "sync_frequency": 0,
        **SIZE,
    }
    inputs.update(overrides)
    return inputs


def base_prompt(loader: dict | None = None, sampler: dict | None = None, prefix: str = "distrifusion/latent") -> dict:
    """Test conditioning x2 -> our Loader -> our Sampler -> core SaveLatent."""
    return {
        "pos": {"class_type": "DistriFusionTestConditioning", "inputs": {"seed": 1, "tokens": 12, "width": 4096}},
        "neg": {"class_type": "DistriFusionTestConditioning", "inputs": {"seed": 2, "tokens": 5, "width": 4096}},
        "loader": {"class_type": LOADER, "inputs": loader or loader_inputs()},
        "sampler": {"class_type": SAMPLER, "inputs": sampler or sampler_inputs()},
        "save": {"class_type": "SaveLatent", "inputs": {"samples": ["sampler", 0], "filename_prefix": prefix}},
    }


def stand_in_prompt(prompt: dict, prefix: str, *, width: int, height: int, length: int) -> dict:
    """A bundled API-format workflow as shipped, with stand-ins only where the real files cannot be had here: the
    umT5 text encoder (test conditioning node, same node id), the Wan weights (tiny), the VAE (random), a tiny clip
    size (2 steps) and ``prefix`` for the saved files. Node ids stay those of the UI workflow."""
    prompt = json.loads(json.dumps(prompt))
    for node_id, node in list(prompt.items()):
        kind, inputs = node["class_type"], node["inputs"]
        if kind == "CLIPLoader":
            del prompt[node_id]
        elif kind == "CLIPTextEncode":
            prompt[node_id] = {
                "class_type": "DistriFusionTestConditioning",
                "inputs": {"seed": int(node_id), "tokens": 8, "width": 4096},
            }
        elif kind == LOADER:
            # one 16 px token row per rank at least; Ulysses needs heads divisible by the ranks
            model = TINY_MODEL_4_HEADS if inputs["parallel_mode"] == "ulysses" else TINY_MODEL
            inputs.update(model=model, patch_size=16)
        elif kind == SAMPLER:
            inputs.update(steps=2, width=width, height=height, length=length)
        elif kind == "VAELoader":
            inputs["vae_name"] = RANDOM_VAE
        elif kind in ("SaveVideo", "SaveAnimatedWEBP"):
            inputs["filename_prefix"] = prefix
    return prompt


# --- LoRA files -------------------------------------------------------------------------------------------
LORA_FILES = {
    "comfyui": "wan_tiny_lora_comfyui.safetensors",
    "kohya": "wan_tiny_lora_kohya.safetensors",
    "peft": "wan_tiny_lora_peft.safetensors",
    "diffusers": "wan_tiny_lora_diffusers.safetensors",
    "lightx2v": "wan_tiny_lora_lightx2v.safetensors",
}
"""One tiny random LoRA per format for the tiny checkpoint (ranks 1-4 and alphas differing per layer)."""
LORA_DIFFUSERS_TWIN = "wan_tiny_lora_diffusers_as_comfyui.safetensors"
"""The diffusers-named LoRA's tensors under ComfyUI's names: ComfyUI 0.3.64 maps no ``transformer.`` names for Wan,
so native KSampler gets this twin wherever ours gets the diffusers file."""
LORA_WIDE = "wan_wide_lora.safetensors"
"""A LoRA made for a wider Wan (dim 512): the Loader refuses it naming the file."""


def write_tiny_loras(folder: Path, config: dict) -> None:
    from tiny_lora import random_lora, write_lora
    from tiny_wan import tiny_config

    wan = tiny_config(**config)
    for seed, (fmt, name) in enumerate(LORA_FILES.items(), start=11):
        # modulation deltas travel as ``diff_m`` in real lightx2v files, which native ComfyUI leaves out (listed)
        lora = random_lora(wan, seed=seed, with_diffs=fmt == "lightx2v", scale=0.05, modulation=False)
        write_lora(folder / name, lora, fmt)
        if fmt == "diffusers":
            write_lora(folder / LORA_DIFFUSERS_TWIN, lora, "comfyui")
    write_lora(folder / LORA_WIDE, random_lora(tiny_config(**{**config, "dim": 512, "ffn_dim": 512}), seed=9), "kohya")
