"""LoRA files merged into a loaded ``WanModel``: the formats ComfyUI's ``LoraLoaderModelOnly`` applies to Wan.

Key names: ComfyUI's ``diffusion_model.<name>``, kohya's ``lora_unet_<name with _>`` (and Wan Fun's
``lora_unet__``), diffusers' ``transformer.<diffusers name>``. Tensors per layer: up/down (+ ``alpha``) in the
kohya, peft (``lora_B``/``lora_A``) and the other spellings ComfyUI reads; ``diff`` / ``diff_b`` full deltas
(norms, biases, modulation: the lightx2v files). ``W' = W + strength * alpha / rank * up @ down`` in fp32.

Merging starts from the unmodified weights, read again from the checkpoint's memory map (no kept copy), so a
new chain or strength re-merges without reloading the model. Everything a chain changes is planned from the
files' headers first: a LoRA for another model fails naming the file and the mismatch before any weight changes.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor

from .checkpoint import Checkpoint
from .checkpoint_layout import to_diffusers_key
from .errors import WanDistriFusionError, first_few
from .fp8 import Fp8Linear, quantize_fp8
from .model import WanConfig, WanModel

logger = logging.getLogger(__name__)

# (up suffix, down suffix) per spelling, in the order ComfyUI's LoRA adapter tries them.
_UP_DOWN = (
    (".lora_up.weight", ".lora_down.weight"),
    ("_lora.up.weight", "_lora.down.weight"),
    (".lora_B.weight", ".lora_A.weight"),
    (".lora.up.weight", ".lora.down.weight"),
    (".lora_B", ".lora_A"),
    (".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight"),
    (".lora_B.default.weight", ".lora_A.default.weight"),
)
_UNSUPPORTED = re.compile(r"\.(hada_w1_a|lokr_w1|lokr_w1_a|oft_blocks|oft_R|a1\.weight|dora_scale)$")
_BLOCK_INDEX = re.compile(r"blocks[._](\d+)[._]")
_FUSED = {"self_attn": ("qkv", ("q", "k", "v")), "cross_attn": ("kv", ("k", "v"))}


@dataclass(frozen=True)
class LoraFile:
    """One link of a LoRA chain: a ``.safetensors`` file and its strength (as ``LoraLoaderModelOnly``)."""

    path: str
    strength: float = 1.0

    def __post_init__(self) -> None:
        path = Path(self.path).expanduser()
        if not path.is_file():
            raise WanDistriFusionError(
                f"lora: {path} does not exist; pick an existing LoRA .safetensors (in ComfyUI: models/loras)."
            )
        if path.suffix.lower() != ".safetensors":
            raise WanDistriFusionError(
                f"lora: {path.name} is not a .safetensors file; convert the LoRA to safetensors."
            )
        strength = float(self.strength)
        if not math.isfinite(strength):
            raise WanDistriFusionError(
                f"strength: {self.strength!r} for {path.name} is not a finite number; use e.g. 1.0."
            )
        object.__setattr__(self, "path", str(path.resolve()))
        object.__setattr__(self, "strength", strength)

    @property
    def name(self) -> str:
        return Path(self.path).name


@dataclass(frozen=True)
class LoraUpdate:
    """One change a LoRA file makes to one tensor of the original Wan layout."""

    target: str
    """Original Wan name, e.g. ``blocks.0.self_attn.q.weight``."""
    keys: tuple[str, ...]
    """``(up, down)`` for a low-rank pair, ``(diff,)`` for a full delta."""
    shape: tuple[int, ...]
    """The target's shape in the model."""
    scale: float = 1.0
    """``alpha / rank`` of a low-rank pair (1 without alpha), 1 for a full delta."""


@dataclass(frozen=True)
class LoraPlan:
    """What one LoRA file changes (read from its header) and the keys that match nothing."""

    file: LoraFile
    updates: tuple[LoraUpdate, ...]
    unmatched: tuple[str, ...]


def lora_key_map(config: WanConfig) -> dict[str, str]:
    """Layer name as LoRA files spell it -> original Wan tensor name, for a model of ``config`` (as ComfyUI maps
    Wan: generic ``diffusion_model.`` names, kohya ``lora_unet_`` names; plus diffusers' ``transformer.``)."""
    with torch.device("meta"):
        names = list(WanModel(config).state_dict())
    key_map = {}
    for name in names:
        if name.endswith(".weight"):
            base = name.removesuffix(".weight")
            key_map[f"diffusion_model.{base}"] = name
            key_map[f"lora_unet_{base.replace('.', '_')}"] = name
            key_map[f"transformer.{to_diffusers_key(base)}"] = name
        else:
            key_map[f"diffusion_model.{name}"] = name
    return key_map


def plan_lora(file: LoraFile, config: WanConfig) -> LoraPlan:
    """Which tensors ``file`` changes in a model of ``config``, from its header; raises naming the file when it
    was made for another model (shapes or layers that do not fit) or uses an adapter this merge does not know."""
    shapes = expected_shapes(config)
    with safe_open(file.path, framework="pt", device="cpu") as handle:
        keys = {_canonical(key): key for key in handle.keys()}
        shape = {key: tuple(handle.get_slice(original).get_shape()) for key, original in keys.items()}
        alphas = {key: handle.get_tensor(original).item() for key, original in keys.items() if key.endswith(".alpha")}
    if unsupported := [keys[key] for key in keys if _UNSUPPORTED.search(key)]:
        raise WanDistriFusionError(
            f"lora: {file.name} is a LyCORIS/DoRA file ({first_few(unsupported, 3)}); only plain LoRA (up/down, A/B) and "
            "diff files merge here. Use a plain LoRA of the same model."
        )
    updates, used = [], set()
    for stem, target in lora_key_map(config).items():
        for up_suffix, down_suffix in _UP_DOWN:
            up, down = stem + up_suffix, stem + down_suffix
            if up in shape and down in shape:
                rank = shape[down][0]
                alpha = alphas.get(f"{stem}.alpha")
                used.update((up, down, f"{stem}.alpha"))
                _check_pair(file, keys, up, down, shape, target, shapes[target], config)
                scale = 1.0 if alpha is None else alpha / rank
                updates.append(LoraUpdate(target, (keys[up], keys[down]), shapes[target], scale))
                break
        for suffix, kind in ((".diff", "weight"), (".w_norm", "weight"), (".diff_b", "bias"), (".b_norm", "bias")):
            key = stem + suffix
            if key not in shape:
                continue
            tensor_name = target if kind == "weight" else target.removesuffix(".weight") + ".bias"
            if tensor_name not in shapes:
                continue  # e.g. a bias on a layer without one: listed below as unmatched
            if math.prod(shape[key]) != math.prod(shapes[tensor_name]):
                raise _size_mismatch(file, keys[key], shape[key], tensor_name, shapes[tensor_name], config)
            used.add(key)
            updates.append(LoraUpdate(tensor_name, (keys[key],), shapes[tensor_name]))
    unmatched = [keys[key] for key in keys if key not in used]
    _check_layers(file, unmatched, config)
    return LoraPlan(file, tuple(updates), tuple(unmatched))


def plan_loras(files: Sequence[LoraFile], config: WanConfig) -> list[LoraPlan]:
    """``plan_lora`` for a chain, with one warning per file listing the keys that match nothing (as ComfyUI)."""
    plans = [plan_lora(file, config) for file in files]
    for plan in plans:
        if plan.unmatched:
            logger.warning(
                "lora %s: %d keys match no layer of this %s model and are not applied: %s",
                plan.file.name,
                len(plan.unmatched),
                config.variant,
                ", ".join(plan.unmatched),
            )
    return plans


def expected_shapes(config: WanConfig) -> dict[str, tuple[int, ...]]:
    """Original Wan tensor name -> shape, for a model of ``config``."""
    with torch.device("meta"):
        return {name: tuple(t.shape) for name, t in WanModel(config).state_dict().items()}


class ChainDeltas:
    """The chain's summed change of each original tensor, fp32 on ``device``, computed one tensor at a time (so a
    merge holds one full-size delta at once, never the whole chain's): ``strength * scale * up @ down`` or
    ``strength * diff`` per update. Keeps the LoRA files open; use as a context manager."""

    def __init__(self, plans: Sequence[LoraPlan], device: torch.device | str = "cpu"):
        self.device = device
        self._stack = ExitStack()
        self.sources: dict[str, list[tuple[object, LoraUpdate, float]]] = {}
        for plan in plans:
            if plan.file.strength == 0:
                continue
            handle = self._stack.enter_context(safe_open(plan.file.path, framework="pt", device="cpu"))
            for update in plan.updates:
                self.sources.setdefault(update.target, []).append((handle, update, plan.file.strength))

    def __enter__(self) -> ChainDeltas:
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def delta(self, target: str) -> Tensor:
        total = None
        for handle, update, strength in self.sources[target]:
            tensors = [handle.get_tensor(key).to(device=self.device, dtype=torch.float32) for key in update.keys]
            if len(tensors) == 2:
                up, down = tensors
                change = (up.flatten(1) @ down.flatten(1)).mul_(strength * update.scale)
            else:
                change = tensors[0].mul_(strength)
            change = change.reshape(update.shape)
            total = change if total is None else total.add_(change)
        return total


# -- merging into a model ------------------------------------------------------------------------------------


def apply_loras(
    model: WanModel, checkpoint_path: str | Path, files: Sequence[LoraFile], *, assign: AssignRows | None = None
) -> dict:
    """Merge ``files`` into ``model`` (loaded from ``checkpoint_path``) from its unmodified weights: tensors the
    previous chain changed are read again from the checkpoint, so applying ``[]`` restores the loaded model.
    Everything is planned (and checked) before any weight changes. Returns a summary (tensors changed, seconds).
    ``assign(tensor, rows, value)`` writes a tensor's rows (default ``tensor.data[rows] = value``): a caller whose
    weights are stored otherwise (e.g. sharded) writes them its way."""
    began = time.perf_counter()
    plans = plan_loras(files, model.config)
    device = next(model.parameters()).device
    previous: set[str] = getattr(model, "_lora_targets", set())
    with ChainDeltas(plans, device) as deltas, ExitStack() as stack:
        changed = set(deltas.sources)
        checkpoint = Checkpoint.open(Path(checkpoint_path), stack)
        for name in sorted(changed | previous):
            delta = deltas.delta(name) if name in changed else None
            _write_tensor(model, checkpoint, name, delta, device, assign or _assign_rows)
    model._lora_targets = changed
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - began
    summary = {"files": [plan.file.name for plan in plans], "tensors": len(changed), "seconds": seconds}
    logger.info(
        "lora chain %s merged: %d tensors changed, %d restored, %.2f s",
        ", ".join(f"{p.file.name}:{p.file.strength:g}" for p in plans) or "(none)",
        len(changed),
        len(previous - changed),
        seconds,
    )
    return summary


def parameter_slot(model: WanModel, name: str) -> tuple[torch.nn.Module, str, slice | None]:
    """Where original tensor ``name`` lives in ``model``: (module, parameter name, row slice of a fused ``qkv``/
    ``kv`` Linear or None)."""
    module_name, _, param = name.rpartition(".")
    parts = module_name.split(".")
    if len(parts) == 4 and parts[0] == "blocks" and parts[2] in _FUSED:
        attention = model.get_submodule(".".join(parts[:3]))
        fused_name, members = _FUSED[parts[2]]
        fused = getattr(attention, fused_name, None)
        if fused is not None and parts[3] in members:
            rows = fused.out_features // len(members)
            index = members.index(parts[3])
            return fused, param, slice(index * rows, (index + 1) * rows)
    return model.get_submodule(module_name), param, None


AssignRows = Callable[[Tensor, slice, Tensor], None]


def _assign_rows(target: Tensor, rows: slice, value: Tensor) -> None:
    target.data[rows] = value.reshape(target.data[rows].shape)


@torch.no_grad()
def _write_tensor(
    model: WanModel, checkpoint: Checkpoint, name: str, delta: Tensor | None, device, assign: AssignRows
) -> None:
    """Set original tensor ``name`` to its loaded value plus ``delta`` (None: the loaded value itself)."""
    module, param, rows = parameter_slot(model, name)
    target = getattr(module, param)
    where = slice(None) if rows is None else rows
    if isinstance(module, Fp8Linear) and param == "weight":
        storage = target.dtype
        if delta is None:
            value, scale = checkpoint.read_fp8(name, storage, device)
        else:  # merge in fp32, re-quantize this tensor with its own scale
            value, scale = quantize_fp8(checkpoint.read(name, torch.float32, device) + delta, storage)
        assign(target, where, value)
        scales = module.scale_weight
        if scales.dim() == 0:
            scales.copy_(scale.reshape(()))
        else:
            scales[where] = scale.reshape(()).to(scales.dtype)
        return
    dtype = target.dtype  # as loaded: fp32 for norms and modulation, else the compute dtype
    if delta is None:
        value = checkpoint.read(name, dtype, device)
    else:
        value = (checkpoint.read(name, torch.float32, device) + delta).to(dtype)
    assign(target, where, value)


# -- checks ----------------------------------------------------------------------------------------------------


def _canonical(key: str) -> str:
    """Wan Fun's ``lora_unet__blocks_0_...`` as ComfyUI reads it (``lora_unet_blocks_0_...``)."""
    return "lora_unet_" + key[len("lora_unet__") :] if key.startswith("lora_unet__") else key


def _check_pair(file, keys, up, down, shape, target, expected, config) -> None:
    up_shape, down_shape = shape[up], shape[down]
    fits = (
        len(up_shape) >= 2
        and len(down_shape) >= 2
        and up_shape[1] == down_shape[0]
        and up_shape[0] == expected[0]
        and math.prod(down_shape[1:]) == math.prod(expected[1:])
    )
    if not fits:
        raise WanDistriFusionError(
            f"lora: {file.name} does not fit this model: {keys[up]} {list(up_shape)} @ {keys[down]} {list(down_shape)} "
            f"cannot change {target} {list(expected)} of the loaded {config.variant} (width {config.dim}, "
            f"{config.num_layers} layers). It was made for another Wan size or variant; pick a LoRA for this model."
        )


def _size_mismatch(file, key, got, name, expected, config) -> WanDistriFusionError:
    return WanDistriFusionError(
        f"lora: {file.name} does not fit this model: {key} has shape {list(got)} but {name} of the loaded "
        f"{config.variant} (width {config.dim}, {config.num_layers} layers) is {list(expected)}. It was made for "
        "another Wan size or variant; pick a LoRA for this model."
    )


def _check_layers(file: LoraFile, unmatched: Iterable[str], config: WanConfig) -> None:
    deeper = sorted({int(m.group(1)) for key in unmatched if (m := _BLOCK_INDEX.search(key))})
    if deeper and deeper[-1] >= config.num_layers:
        raise WanDistriFusionError(
            f"lora: {file.name} changes block {deeper[-1]} but the loaded {config.variant} has {config.num_layers} "
            "blocks (0.."
            f"{config.num_layers - 1}). It was made for another Wan size; pick a LoRA for this model."
        )
