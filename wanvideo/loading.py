"""Load a Wan 2.1/2.2 DiT from ``.safetensors`` (or tensors in memory): the dtype tables, config read from the
tensors, fp8 storage.

Tensors are read one by one through safetensors' memory map and assigned to a model built on the ``meta``
device, so host RAM never holds a second full copy of the weights (on CPU, tensors whose dtype already
matches stay backed by the file's pages). Which files, which key layout, which config and how a tensor is read:
``checkpoint_files``, ``checkpoint_layout``, ``checkpoint_config`` and ``checkpoint``.
"""

from __future__ import annotations

import functools
import logging
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from .checkpoint import Checkpoint, StateDictHandle
from .checkpoint_config import read_wan_config
from .checkpoint_files import checkpoint_files
from .errors import WanDistriFusionError
from .fp8 import Fp8Linear, enable_fp8_matmul
from .model import WanConfig, WanLayerNorm, WanModel, WanRMSNorm

logger = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp8_e4m3fn": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
}
"""THE table of dtype names: compute precisions, fp8 weight storage, K/V buffers."""
PRECISIONS: dict[str, torch.dtype] = {name: DTYPES[name] for name in ("fp32", "bf16", "fp16")}
QUANTIZATIONS: dict[str, torch.dtype | None] = {"disabled": None, **{n: DTYPES[n] for n in ("fp8_e4m3fn", "fp8_e5m2")}}


@dataclass(frozen=True)
class WanCheckpointInfo:
    """What a checkpoint holds, read from its header only (no tensor data)."""

    config: WanConfig
    layout: str
    """``original``, ``comfyui`` (``model.diffusion_model.`` prefix) or ``diffusers``."""
    files: tuple[Path, ...]
    num_tensors: int
    file_dtypes: tuple[str, ...]


def load_wan_model(
    path: str | Path,
    *,
    dtype: torch.dtype | str = torch.float32,
    quantization: str = "disabled",
    device: str | torch.device = "cpu",
) -> WanModel:
    """Build a ``WanModel`` from a Wan ``.safetensors`` file (or a folder of shards), ready for inference.

    ``dtype`` is the compute dtype (``torch.float32``/``bfloat16``/``float16`` or "fp32"/"bf16"/"fp16");
    ``quantization`` stores the blocks' Linear weights in fp8 (``fp8_e4m3fn``/``fp8_e5m2``): multiplied in fp8 on
    GPUs with fp8 tensor cores (``fp8_e4m3fn``; see ``fp8.enable_fp8_matmul``), else upcast per layer.
    """
    started = time.perf_counter()
    compute_dtype = resolve_precision(dtype)
    storage_dtype = resolve_quantization(quantization)
    with ExitStack() as stack:
        checkpoint = Checkpoint.open(Path(path), stack)
        config = read_wan_config(checkpoint)
        model = _build_model(checkpoint, config, compute_dtype, storage_dtype, torch.device(device))
    _log_loaded(checkpoint, model, quantization, time.perf_counter() - started)
    return model


def model_from_state_dict(
    state: dict[str, Tensor],
    *,
    dtype: torch.dtype | str = torch.float32,
    quantization: str = "disabled",
    device: str | torch.device = "cpu",
    num_heads: int | None = None,
) -> WanModel:
    """Like ``load_wan_model`` for tensors already in memory (any key layout); tensors already in the
    wanted dtype and device are shared, not copied. ``num_heads`` is needed unless heads are 128 wide."""
    compute_dtype = resolve_precision(dtype)
    storage_dtype = resolve_quantization(quantization)
    checkpoint = Checkpoint((), [StateDictHandle(state)], "state dict")
    config = read_wan_config(checkpoint, num_heads=num_heads)
    model = _build_model(checkpoint, config, compute_dtype, storage_dtype, torch.device(device))
    _log_loaded(checkpoint, model, quantization, None)
    return model


def inspect_wan_checkpoint(path: str | Path) -> WanCheckpointInfo:
    """Layout and config of a Wan checkpoint from its headers, with the same checks and errors as loading.

    Read once per version of the file(s): checking every tensor against a Wan model of the config takes 0.1-0.2 s
    for 1.3B/14B, and the Sampler asks for each prompt. A replaced file (another size or mtime), or a config.json
    beside it that appeared or changed (it can name the heads), is read again."""
    path = Path(path)
    files = checkpoint_files(path)
    config_json = files[0].parent / "config.json"
    sources = [*files, config_json] if config_json.is_file() else files
    stamps = tuple((str(file), stat.st_size, stat.st_mtime_ns) for file in sources for stat in (file.stat(),))
    return _inspect_files(path, stamps)


@functools.lru_cache(maxsize=16)
def _inspect_files(path: Path, stamps: tuple[tuple[str, int, int], ...]) -> WanCheckpointInfo:
    """``inspect_wan_checkpoint`` for the files as ``stamps`` (name, size, mtime_ns) found them (the cache key)."""
    with ExitStack() as stack:
        checkpoint = Checkpoint.open(path, stack)
        config = read_wan_config(checkpoint)
        dtypes = sorted({checkpoint.handle(key).get_slice(key).get_dtype() for key in checkpoint.file_keys})
        return WanCheckpointInfo(config, checkpoint.layout, checkpoint.files, len(checkpoint.file_keys), tuple(dtypes))


def resolve_precision(dtype: torch.dtype | str) -> torch.dtype:
    """Compute dtype from a ``torch.dtype`` or the precision widget's name."""
    if isinstance(dtype, torch.dtype) and dtype in PRECISIONS.values():
        return dtype
    if isinstance(dtype, str):
        name = dtype.strip().lower().removeprefix("torch.")
        aliases = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float": "fp32"}
        name = aliases.get(name, name)
        if name in PRECISIONS:
            return PRECISIONS[name]
    raise WanDistriFusionError(
        f"precision {dtype!r} is not supported: choose one of {', '.join(PRECISIONS)} in the precision widget."
    )


def resolve_quantization(quantization: str) -> torch.dtype | None:
    """fp8 storage dtype for the quantization widget's value (``None`` for "disabled")."""
    if isinstance(quantization, str) and quantization.strip().lower() in QUANTIZATIONS:
        return QUANTIZATIONS[quantization.strip().lower()]
    raise WanDistriFusionError(
        f"quantization {quantization!r} is not supported: choose one of {', '.join(QUANTIZATIONS)} in the quantization widget."
    )


def _build_model(
    checkpoint: Checkpoint,
    config: WanConfig,
    compute_dtype: torch.dtype,
    storage_dtype: torch.dtype | None,
    device: torch.device,
) -> WanModel:
    """Model on the meta device, then each tensor read, converted and assigned once."""
    with torch.device("meta"):
        model = WanModel(config)
    if storage_dtype is not None:
        _use_fp8_linears(model)
    model.requires_grad_(False)
    state = {}
    for name in model.state_dict(keep_vars=True):
        if name.endswith(".scale_weight"):
            continue  # filled together with its weight
        module_name, _, param_name = name.rpartition(".")
        module = model.get_submodule(module_name)
        if isinstance(module, Fp8Linear) and param_name == "weight":
            state[name], state[f"{module_name}.scale_weight"] = checkpoint.read_fp8(name, storage_dtype, device)
        else:
            value_dtype = torch.float32 if _keeps_fp32(name, module) else compute_dtype
            state[name] = checkpoint.read(name, value_dtype, device)
    model.load_state_dict(state, strict=True, assign=True)
    model.compute_dtype = compute_dtype
    if storage_dtype is not None:
        enable_fp8_matmul(model)
    return model.eval()


def _log_loaded(checkpoint: Checkpoint, model: WanModel, quantization: str, seconds: float | None) -> None:
    config = model.config
    logger.info(
        "loaded %s (%s layout)%s: %s, %d layers, dim %d, %d heads, compute %s, weights %s",
        checkpoint.display_name,
        checkpoint.layout,
        "" if seconds is None else f" in {seconds:.1f} s",
        config.variant,
        config.num_layers,
        config.dim,
        config.num_heads,
        str(model.compute_dtype).removeprefix("torch."),
        quantization,
    )


def _use_fp8_linears(model: WanModel) -> None:
    """Swap every Linear inside the transformer blocks for an ``Fp8Linear`` (still on the meta device)."""
    for block in model.blocks:
        for name, module in list(block.named_modules()):
            if type(module) is nn.Linear:
                parent_name, _, child = name.rpartition(".")
                fp8 = Fp8Linear(module.in_features, module.out_features, module.bias is not None, device="meta")
                setattr(block.get_submodule(parent_name), child, fp8)


def _keeps_fp32(name: str, module: nn.Module) -> bool:
    """Modulation tables and the Wan norms' weights are tiny and kept in fp32 (as diffusers does)."""
    return name.endswith("modulation") or isinstance(module, WanLayerNorm | WanRMSNorm)
