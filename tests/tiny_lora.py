"""Tiny random LoRA files for a tiny Wan, in every format ComfyUI's loader applies to Wan, and a direct reference merge.

    state = random_lora(config, seed=1)                # original name -> update, ranks and alphas differing per layer
    write_lora(tmp_path / "l.safetensors", state, "kohya")
    merged = reference_merge(model.state_dict(), state, strength=0.7)   # original-layout weights with the LoRA in

Formats: ``comfyui`` (``diffusion_model.`` + lora_up/lora_down/alpha), ``kohya`` (``lora_unet_``), ``peft``
(``diffusion_model.`` + lora_B/lora_A), ``diffusers`` (``transformer.`` + diffusers names + lora_B/lora_A) and
``lightx2v`` (``diffusion_model.`` up/down/alpha plus ``diff`` for norms and modulation and ``diff_b`` for biases).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor
from wan_distrifusion.wanvideo.checkpoint_layout import to_diffusers_key
from wan_distrifusion.wanvideo.model import WanConfig, WanModel

FORMATS = ("comfyui", "kohya", "peft", "diffusers", "lightx2v")
UNMATCHED_KEYS = ("diffusion_model.blocks.0.diff_m", "text_encoder.layers.0.q.lora_up.weight")
"""Keys every written file also carries that match no layer (listed in one warning, never applied)."""


@dataclass
class LowRank:
    up: Tensor
    down: Tensor
    alpha: float | None


def random_lora(
    config: WanConfig, seed: int = 1, with_diffs: bool = False, scale: float = 0.2, modulation: bool = True
) -> dict[str, object]:
    """Original weight name -> ``LowRank`` for every Linear (ranks 1..4 and alphas differing per layer; some layers
    without alpha); with ``with_diffs`` also bias / norm name -> full delta tensor, and modulation tables unless
    ``modulation`` is False (native ComfyUI 0.3.64 skips those: see README, LoRA)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        shapes = {name: tuple(t.shape) for name, t in WanModel(config).state_dict().items()}
    lora: dict[str, object] = {}
    for index, (name, shape) in enumerate(shapes.items()):
        if name.endswith(".weight") and len(shape) == 2 and "norm" not in name:
            rank = 1 + index % 4
            alpha = None if index % 3 == 0 else float(1 + index % 5)
            up = torch.randn(shape[0], rank, generator=generator) * scale
            down = torch.randn(rank, shape[1], generator=generator) * scale
            lora[name] = LowRank(up, down, alpha)
        elif with_diffs and (name.endswith(".bias") or "norm" in name or (modulation and name.endswith("modulation"))):
            if name.startswith("blocks.") or name.startswith("head."):
                lora[name] = torch.randn(shape, generator=generator) * scale * 0.1
    return lora


def write_lora(path: str | Path, lora: dict[str, object], fmt: str, dtype: torch.dtype = torch.float32) -> Path:
    """Write ``lora`` in format ``fmt`` (``FORMATS``), plus ``UNMATCHED_KEYS``."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}")
    tensors: dict[str, Tensor] = {}
    for name, update in lora.items():
        if isinstance(update, LowRank):
            base = name.removesuffix(".weight")
            stem, up, down = {
                "comfyui": (f"diffusion_model.{base}", ".lora_up.weight", ".lora_down.weight"),
                "lightx2v": (f"diffusion_model.{base}", ".lora_up.weight", ".lora_down.weight"),
                "kohya": (f"lora_unet_{base.replace('.', '_')}", ".lora_up.weight", ".lora_down.weight"),
                "peft": (f"diffusion_model.{base}", ".lora_B.weight", ".lora_A.weight"),
                "diffusers": (f"transformer.{to_diffusers_key(base)}", ".lora_B.weight", ".lora_A.weight"),
            }[fmt]
            tensors[stem + up] = update.up.to(dtype)
            tensors[stem + down] = update.down.to(dtype)
            if update.alpha is not None:
                tensors[stem + ".alpha"] = torch.tensor(update.alpha)
        else:
            if fmt != "lightx2v":
                raise ValueError("full deltas (diff / diff_b) are written in the lightx2v format only")
            if name.endswith(".bias"):
                tensors[f"diffusion_model.{name.removesuffix('.bias')}.diff_b"] = update.to(dtype)
            elif name.endswith(".weight"):
                tensors[f"diffusion_model.{name.removesuffix('.weight')}.diff"] = update.to(dtype)
            else:
                tensors[f"diffusion_model.{name}.diff"] = update.to(dtype)
    for key in UNMATCHED_KEYS:
        tensors[key] = torch.zeros(2, 2)
    path = Path(path)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


def reference_merge(state: dict[str, Tensor], lora: dict[str, object], strength: float) -> dict[str, Tensor]:
    """Original-layout ``state`` with ``lora`` merged directly: ``W + strength * alpha / rank * up @ down`` (fp64)."""
    merged = {name: tensor.clone() for name, tensor in state.items()}
    for name, update in lora.items():
        weight = merged[name].double()
        if isinstance(update, LowRank):
            rank = update.down.shape[0]
            scale = 1.0 if update.alpha is None else update.alpha / rank
            weight = weight + strength * scale * (update.up.double() @ update.down.double())
        else:
            weight = weight + strength * update.double().reshape(weight.shape)
        merged[name] = weight.to(state[name].dtype)
    return merged
