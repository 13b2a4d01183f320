"""What ``cli.py generate`` reads, and the checks that refuse bad input before a rank starts.

The model (``--model`` or a tiny random one) and its text context, a starting latent, LoRA and VAE files, the
``--out`` path, and the job checked against the model, the topology and this host's RAM. Imported by ``cli.py``
as part of the pack (``<alias>.cli_inputs``); no ComfyUI.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .distrifusion import memory_plan, validation
from .distrifusion.vae_split import split_rows
from .wanvideo import errors, lora
from .wanvideo.loading import inspect_wan_checkpoint
from .wanvideo.model import WanConfig, WanModel
from .wanvideo.vae import vae_config_from_state_dict

TINY_NOTICE = (
    "no --model given: built a tiny random Wan (2 layers, dim 64) — output is noise, this only shows the pipeline"
)


def model_and_context(args: argparse.Namespace, job, scratch: Path):
    """The checkpoint (``--model``, or a tiny random one in ``scratch``), its config, and ``job`` with the text
    context (``--context``, or a seeded random one) checked against it."""
    if args.model:
        model_path = Path(args.model).expanduser()
    else:
        print(TINY_NOTICE, flush=True)
        model_path = build_tiny_checkpoint(scratch, seed=0)
    config = inspect_wan_checkpoint(model_path).config
    if args.context:
        positive, negative = _load_context(args.context)
    else:
        positive, negative = random_context(config.text_dim, args.seed)
        print(
            f"no --context given: seeded random text context ({positive.shape[1]} tokens x {config.text_dim}, "
            f"seed {args.seed})"
        )
    job = job.with_changes(positive=positive, negative=negative)
    job.check_text_dim(config.text_dim)
    return model_path, config, job


def build_tiny_checkpoint(folder: Path, seed: int = 0) -> Path:
    """A random 2-layer, 64-wide Wan (16 latent channels, umT5-wide text) as safetensors; noise in, noise out."""
    config = WanConfig(dim=64, ffn_dim=128, num_heads=4, num_layers=2)
    torch.manual_seed(seed)
    model = WanModel(config)
    path = folder / "tiny_random_wan.safetensors"
    state = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}
    save_file(state, str(path), metadata={"wan_config": json.dumps({"num_heads": config.num_heads, "dim": config.dim})})
    return path


def random_context(text_dim: int, seed: int, tokens: int = 16):
    """Seeded stand-in for encoded prompts: (positive, negative), each ``[1, tokens, text_dim]``."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(1, tokens, text_dim, generator=generator), torch.randn(1, tokens, text_dim, generator=generator)


def _load_context(path: str):
    try:
        tensors = load_file(path)
    except Exception as error:
        raise errors.WanDistriFusionError(
            f"context: cannot read {path} ({error}); give a .safetensors with 'positive'."
        ) from error
    positive = tensors.get("positive", tensors.get("context"))
    if positive is None:
        raise errors.WanDistriFusionError(
            f"context: {path} has no 'positive' tensor (keys: {', '.join(tensors) or 'none'})."
        )

    def batched(tensor):
        return None if tensor is None else (tensor if tensor.dim() == 3 else tensor.unsqueeze(0)).float()

    return batched(positive), batched(tensors.get("negative"))


def load_latent(path: str):
    """``--latent``'s starting latent (key ``latent``), as float32."""
    try:
        tensors = load_file(path)
    except Exception as error:
        raise errors.WanDistriFusionError(f"latent: cannot read {path} ({error}).") from error
    if "latent" not in tensors:
        raise errors.WanDistriFusionError(f"latent: {path} has no 'latent' tensor.")
    return tensors["latent"].float()


def take_latent_size(job, given: dict):
    """The job with ``job.latent``'s size; a ``--width/--height/--length`` that differs is refused."""
    if job.latent.dim() != 5:
        return job  # the runtime's check names the shape it expects
    _, _, frames, rows, cols = job.latent.shape
    real = {"width": cols * 8, "height": rows * 8, "length": (frames - 1) * 4 + 1}
    conflicts = [f"--{name} {given[name]}" for name in real if given[name] is not None and given[name] != real[name]]
    if conflicts:
        raise errors.WanDistriFusionError(
            f"latent: {list(job.latent.shape)} is {real['width']}x{real['height']} px, {real['length']} frames, "
            f"but {', '.join(conflicts)} was given; drop --width/--height/--length (the latent sets the size) or "
            f"set them to {real['width']}, {real['height']} and {real['length']}."
        )
    return job.with_changes(**real)


def parse_loras(values: list[str]) -> tuple:
    """``--lora FILE[:STRENGTH]`` values as ``LoraFile``s (a trailing ``:number`` is the strength, default 1.0)."""
    chain = []
    for value in values:
        path, _, tail = value.rpartition(":")
        try:
            strength = float(tail) if path else 1.0
        except ValueError:
            path, strength = value, 1.0  # a colon inside the path
        if not path:
            path = value
        try:
            chain.append(lora.LoraFile(path, strength))
        except errors.WanDistriFusionError as error:
            reason = str(error).split(": ", 1)[-1]  # without the widget's name
            raise errors.WanDistriFusionError(f"lora: --lora {value}: {reason} (--lora FILE[:STRENGTH])") from error
    return tuple(chain)


def load_vae(path: str) -> dict:
    """``--decode``'s VAE weights, checked (a Wan 2.1 or 2.2 VAE) before anything starts."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise errors.WanDistriFusionError(f"decode: {file} is not a file; give the path of wan_2.1_vae.safetensors.")
    try:
        state_dict = load_file(str(file))
    except Exception as error:
        raise errors.WanDistriFusionError(f"decode: cannot read {file} as safetensors ({error}).") from error
    try:
        vae_config_from_state_dict(state_dict)
    except errors.WanDistriFusionError as error:
        raise errors.WanDistriFusionError(f"decode: {file}: {error}") from error
    return state_dict


def check_vae_fits(vae: dict, config, job, world_size: int) -> None:
    """The VAE's latent channels are the model's, and its rows split over the ranks (before anything starts)."""
    z_dim = vae_config_from_state_dict(vae).z_dim
    if z_dim != config.out_dim:
        raise errors.WanDistriFusionError(
            f"decode: the VAE takes {z_dim}-channel latents but the model makes {config.out_dim}: use "
            f"{'wan2.2_vae.safetensors' if config.out_dim == 48 else 'wan_2.1_vae.safetensors'} with this model."
        )
    split_rows(job.latent_shape(config.out_dim)[-2], world_size)


def check_out(path: str) -> Path:
    """``--out`` is a file path in a folder this process can write (made when the job is done if missing)."""
    out = Path(path).expanduser()
    if out.is_dir():
        raise errors.WanDistriFusionError(
            f"out: {out} is a folder; give a file path such as {out / 'clip.safetensors'}."
        )
    existing = out.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        problem = "not a folder" if existing == out.parent else f"so {out.parent} cannot be a folder"
        raise errors.WanDistriFusionError(f"out: {existing} is a file, {problem}; choose another path for --out.")
    try:
        probe, name = tempfile.mkstemp(dir=existing, prefix=".wan-distrifusion-probe-")
        os.close(probe)
        os.unlink(name)
    except OSError as error:
        raise errors.WanDistriFusionError(
            f"out: cannot write in {existing} ({error.strerror or error}); choose a folder you can write to for --out."
        ) from error
    return out


def check_before_starting(args, job, parallel, config, device: str, precision: str) -> None:
    """What ``generate`` checks once the model's shape is known, before a rank starts: the job against the model
    and the topology, CFG parallel's use, and on the CPU this host's RAM for its ranks."""
    validation.check_job(config, parallel, job)
    validation.check_guidance(parallel, job)
    if device == "cpu":
        ranks = 1 if parallel.world_size == 1 else (args.local_ranks or parallel.world_size)
        _, plan = memory_plan.plan_job(  # the CPU has no free-memory limit: the runtime's choice of mode too
            config,
            parallel,
            job,
            precision,
            args.quantization,
            check=False,
            weights="sharded" if args.weights == "sharded" and parallel.world_size > 1 else "replicated",
            offload=args.offload,
        )
        memory_plan.check_host_memory(plan, ranks)
