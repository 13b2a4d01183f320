"""Load a Wan 2.1/2.2 DiT from ``.safetensors``: three key layouts, config read from the tensors, fp8 storage.

Tensors are read one by one through safetensors' memory map and assigned to a model built on the ``meta``
device, so host RAM never holds a second full copy of the weights (on CPU, tensors whose dtype already
matches stay backed by the file's pages).

Key layouts: the original Wan names (``blocks.N.self_attn.q.weight``), the same under ComfyUI's
``model.diffusion_model.`` prefix, and diffusers' ``WanTransformer3DModel`` names (renames as in diffusers'
``scripts/convert_wan_to_diffusers.py``). Never imports diffusers (the official profile's diffusers has no Wan).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import re
from collections.abc import Iterable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor, nn

from .errors import WanDistriFusionError
from .fp8 import Fp8Linear, enable_fp8_matmul, quantize_fp8
from .model import EXPERTS, VERSIONS, WAN22_LATENT_CHANNELS, WanConfig, WanLayerNorm, WanModel, WanRMSNorm

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
COMFYUI_PREFIX = "model.diffusion_model."
KNOWN_PREFIXES = ("", COMFYUI_PREFIX, "diffusion_model.")
WAN_HEAD_DIM = 128
"""Every released Wan DiT (1.3B: 12 heads, 14B: 40, Wan2.2 5B: 24) uses 128-wide heads."""

# Original -> diffusers renames, applied in order as substring replacements (diffusers' conversion script).
# The norm2/norm3 swap: the original block runs norm1, norm3 (cross-attention, affine), norm2 (FFN).
DIFFUSERS_RENAMES: tuple[tuple[str, str], ...] = (
    ("time_embedding.0", "condition_embedder.time_embedder.linear_1"),
    ("time_embedding.2", "condition_embedder.time_embedder.linear_2"),
    ("text_embedding.0", "condition_embedder.text_embedder.linear_1"),
    ("text_embedding.2", "condition_embedder.text_embedder.linear_2"),
    ("time_projection.1", "condition_embedder.time_proj"),
    ("head.modulation", "scale_shift_table"),
    ("head.head", "proj_out"),
    ("modulation", "scale_shift_table"),
    ("ffn.0", "ffn.net.0.proj"),
    ("ffn.2", "ffn.net.2"),
    ("norm2", "norm__placeholder"),
    ("norm3", "norm2"),
    ("norm__placeholder", "norm3"),
    ("img_emb.proj.0", "condition_embedder.image_embedder.norm1"),
    ("img_emb.proj.1", "condition_embedder.image_embedder.ff.net.0.proj"),
    ("img_emb.proj.3", "condition_embedder.image_embedder.ff.net.2"),
    ("img_emb.proj.4", "condition_embedder.image_embedder.norm2"),
    ("img_emb.emb_pos", "condition_embedder.image_embedder.pos_embed"),
    ("self_attn.q", "attn1.to_q"),
    ("self_attn.k", "attn1.to_k"),
    ("self_attn.v", "attn1.to_v"),
    ("self_attn.o", "attn1.to_out.0"),
    ("self_attn.norm_q", "attn1.norm_q"),
    ("self_attn.norm_k", "attn1.norm_k"),
    ("cross_attn.q", "attn2.to_q"),
    ("cross_attn.k", "attn2.to_k"),
    ("cross_attn.v", "attn2.to_v"),
    ("cross_attn.o", "attn2.to_out.0"),
    ("cross_attn.norm_q", "attn2.norm_q"),
    ("cross_attn.norm_k", "attn2.norm_k"),
    ("attn2.to_k_img", "attn2.add_k_proj"),
    ("attn2.to_v_img", "attn2.add_v_proj"),
    ("attn2.norm_k_img", "attn2.norm_added_k"),
)

# Tensors some files carry that the model does not need: ComfyUI's scaled-fp8 marker and input scales,
# and the q-norm diffusers itself ignores on load.
_IGNORED_KEY = re.compile(r"(^scaled_fp8$|\.scale_input$|\.input_scale$|\.comfy_quant$|\.norm_added_q\.)")
_WEIGHT_SCALE_SUFFIXES = (".scale_weight", ".weight_scale")
_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+)$")
_ORIGINAL_MARKER = re.compile(
    r"^(patch_embedding\.weight|head\.head\.weight|blocks\.\d+\.(self|cross)_attn\.[qkvo]\.weight)$"
)
_DIFFUSERS_MARKER = re.compile(
    r"^(condition_embedder\.time_embedder\.linear_1\.weight|blocks\.\d+\.attn[12]\.to_[qkv]\.weight)$"
)
_WAN_LIKE = re.compile(r"(^|\.)blocks\.\d+\.(self_attn|cross_attn|attn1|attn2)\.")
_SHARD = re.compile(r"^(?P<stem>.+)-(?P<index>\d{5})-of-(?P<count>\d{5})\.safetensors$")
_VERSION_IN_NAME = re.compile(r"wan[\W_]?(2)[\W_]?([12])(?!\d)", re.IGNORECASE)
_GENERIC_NAME = re.compile(r"^(diffusion_pytorch_model|pytorch_model|model|diffusion_model)$", re.IGNORECASE)
_EXPERT_IN_NAME = re.compile(r"(high|low)[\W_]?noise", re.IGNORECASE)
_UNSUPPORTED_VARIANTS = (
    ("vace_", "a Wan VACE model"),
    ("motion_encoder.", "a Wan Animate model"),
    ("face_adapter.", "a Wan Animate model"),
)


def to_diffusers_key(key: str) -> str:
    """Name an original-layout Wan tensor has in diffusers' ``WanTransformer3DModel``."""
    for old, new in DIFFUSERS_RENAMES:
        key = key.replace(old, new)
    return key


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
    compute_dtype = resolve_precision(dtype)
    storage_dtype = resolve_quantization(quantization)
    with ExitStack() as stack:
        checkpoint = _Checkpoint.open(Path(path), stack)
        model = _build_model(checkpoint, checkpoint.config(), compute_dtype, storage_dtype, torch.device(device))
    _log_loaded(checkpoint, model, quantization)
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
    checkpoint = _Checkpoint((), [_StateDictHandle(state)], "state dict")
    config = checkpoint.config(num_heads=num_heads)
    model = _build_model(checkpoint, config, compute_dtype, storage_dtype, torch.device(device))
    _log_loaded(checkpoint, model, quantization)
    return model


def inspect_wan_checkpoint(path: str | Path) -> WanCheckpointInfo:
    """Layout and config of a Wan checkpoint from its headers, with the same checks and errors as loading.

    Read once per version of the file(s): checking every tensor against a Wan model of the config takes 0.1-0.2 s
    for 1.3B/14B, and the Sampler asks for each prompt. A replaced file (another size or mtime), or a config.json
    beside it that appeared or changed (it can name the heads), is read again."""
    path = Path(path)
    files = _checkpoint_files(path)
    config_json = files[0].parent / "config.json"
    sources = [*files, config_json] if config_json.is_file() else files
    stamps = tuple((str(file), stat.st_size, stat.st_mtime_ns) for file in sources for stat in (file.stat(),))
    return _inspect_files(path, stamps)


@functools.lru_cache(maxsize=16)
def _inspect_files(path: Path, stamps: tuple[tuple[str, int, int], ...]) -> WanCheckpointInfo:
    """``inspect_wan_checkpoint`` for the files as ``stamps`` (name, size, mtime_ns) found them (the cache key)."""
    with ExitStack() as stack:
        checkpoint = _Checkpoint.open(path, stack)
        config = checkpoint.config()
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
    checkpoint: _Checkpoint,
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


def _log_loaded(checkpoint: _Checkpoint, model: WanModel, quantization: str) -> None:
    config = model.config
    logger.info(
        "loaded %s (%s layout): %s, %d layers, dim %d, %d heads, compute %s, weights %s",
        checkpoint.display_name,
        checkpoint.layout,
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


class _Checkpoint:
    """Open safetensors file(s) plus the mapping from original Wan names to the keys in the files."""

    def __init__(self, files: tuple[Path, ...], handles: list, display_name: str):
        self.files = files
        self.display_name = display_name
        self.handles = handles
        self._handle_of: dict[str, int] = {}
        for index, handle in enumerate(handles):
            for key in handle.keys():
                self._handle_of.setdefault(key, index)
        self.file_keys = list(self._handle_of)
        self.metadata: dict[str, str] = {}
        for handle in handles:
            self.metadata.update(handle.metadata() or {})
        self.layout, self.prefix = self._detect_layout()
        self.key_of = self._map_keys()

    @classmethod
    def open(cls, path: Path, stack: ExitStack) -> _Checkpoint:
        files = _checkpoint_files(path)
        handles = []
        for file in files:
            try:
                handles.append(stack.enter_context(safe_open(str(file), framework="pt", device="cpu")))
            except Exception as error:  # safetensors raises its own SafetensorError, or OSError
                raise WanDistriFusionError(_unreadable_message(file, error)) from error
        return cls(files, handles, path.name)

    def handle(self, file_key: str):
        return self.handles[self._handle_of[file_key]]

    # -- layout -------------------------------------------------------------------------------------
    def _detect_layout(self) -> tuple[str, str]:
        keys = self.file_keys
        lora = [key for key in keys if re.search(r"lora_|\.lora\.|\.alpha$|\.diff$|\.diff_b$", key)]
        if lora:
            raise self._not_wan("a LoRA (a patch for a model, not a model); load it with a LoRA loader")
        for prefix in KNOWN_PREFIXES:
            stripped = [key[len(prefix) :] for key in keys if key.startswith(prefix)]
            if any(_DIFFUSERS_MARKER.match(key) for key in stripped):  # first: patch_embedding is in both
                return "diffusers", prefix
            if any(_ORIGINAL_MARKER.match(key) for key in stripped):
                return ("comfyui" if prefix == COMFYUI_PREFIX else "original"), prefix
        wan_like = [key for key in keys if _WAN_LIKE.search(key)]
        if wan_like:
            example = wan_like[0]
            prefix = example[: _WAN_LIKE.search(example).start()].rstrip(".")
            raise WanDistriFusionError(
                f"{self.display_name} has Wan-like tensors but a key layout this loader does not know "
                f"(prefix {prefix!r}; {len(keys)} tensors, first keys: {_first(keys)}). Supported: original Wan names "
                f"(blocks.N.self_attn.q.weight), the same under ComfyUI's '{COMFYUI_PREFIX}' prefix, and diffusers' "
                "WanTransformer3DModel names. Re-save the file in one of them or pick another file in the model widget."
            )
        raise self._not_wan(_describe_checkpoint(keys))

    def _not_wan(self, what: str) -> WanDistriFusionError:
        keys = self.file_keys
        return WanDistriFusionError(
            f"{self.display_name} is not a Wan diffusion model: it looks like {what} ({len(keys)} tensors, first keys: "
            f"{_first(keys)}). Pick a Wan 2.1/2.2 diffusion model (e.g. wan2.1_t2v_1.3B_fp16.safetensors from "
            "ComfyUI's models/diffusion_models folder) in the model widget."
        )

    def _map_keys(self) -> dict[str, str]:
        """Original Wan name -> key in the file, for every tensor under the detected prefix."""
        stripped = {key[len(self.prefix) :]: key for key in self.file_keys if key.startswith(self.prefix)}
        if self.layout != "diffusers":
            return {name: key for name, key in stripped.items()}
        from_diffusers = {to_diffusers_key(name): name for name in _original_key_templates()}
        key_of = {}
        for diffusers_name, key in stripped.items():
            match = _BLOCK_KEY.match(diffusers_name)
            if match:
                original = from_diffusers.get(f"blocks.0.{match.group(2)}")
                original = original and original.replace("blocks.0.", f"blocks.{match.group(1)}.", 1)
            else:
                original = from_diffusers.get(diffusers_name)
            key_of[original or f"<diffusers>{diffusers_name}"] = key
        return key_of

    # -- config -------------------------------------------------------------------------------------
    def shape(self, name: str) -> tuple[int, ...]:
        key = self.key_of[name]
        return tuple(self.handle(key).get_slice(key).get_shape())

    def config(self, num_heads: int | None = None) -> WanConfig:
        names = self.key_of
        for fragment, variant in _UNSUPPORTED_VARIANTS:
            if any(fragment in name or fragment in key for name, key in names.items()):
                raise WanDistriFusionError(
                    f"{self.display_name} is {variant}, which this pack does not run yet. Supported: Wan 2.1/2.2 "
                    "text-to-video and image-to-video diffusion models; pick one in the model widget."
                )
        core = [
            "patch_embedding.weight",
            "text_embedding.0.weight",
            "time_embedding.0.weight",
            "head.head.weight",
            "blocks.0.ffn.0.weight",
        ]
        self._raise_missing([name for name in core if name not in names])
        patch_shape = self.shape("patch_embedding.weight")
        if len(patch_shape) != 5:
            raise WanDistriFusionError(
                f"{self.display_name}: patch_embedding.weight has shape {list(patch_shape)}, expected a 3D convolution (5 dims); this is not a Wan video model."
            )
        dim, in_dim, *patch = patch_shape
        patch_size = tuple(patch)
        layers = {int(m.group(1)) for name in names if (m := _BLOCK_KEY.match(name))}
        i2v = "img_emb.proj.1.weight" in names or any(name.endswith("cross_attn.k_img.weight") for name in names)
        heads, eps = (num_heads, WanConfig.eps) if num_heads else self._heads_and_eps(dim)
        if dim % heads:
            raise WanDistriFusionError(f"{self.display_name}: {heads} attention heads do not divide the width {dim}.")
        out_dim = self.shape("head.head.weight")[0] // math.prod(patch_size)
        version, expert = self._release(in_dim, out_dim, i2v)
        config = WanConfig(
            dim=dim,
            ffn_dim=self.shape("blocks.0.ffn.0.weight")[0],
            num_heads=heads,
            num_layers=max(layers) + 1,
            in_dim=in_dim,
            out_dim=out_dim,
            text_dim=self.shape("text_embedding.0.weight")[1],
            freq_dim=self.shape("time_embedding.0.weight")[1],
            patch_size=patch_size,
            model_type="i2v" if i2v else "t2v",
            eps=eps,
            image_dim=self.shape("img_emb.proj.1.weight")[1]
            if "img_emb.proj.1.weight" in names
            else WanConfig.image_dim,
            image_positions=self.shape("img_emb.emb_pos")[1] if "img_emb.emb_pos" in names else 0,
            version=version,
            expert=expert,
        )
        self._check_tensors(config)
        return config

    def _release(self, in_dim: int, out_dim: int, clip_image: bool) -> tuple[str, str]:
        """(Wan version, A14B expert): the shapes where they tell (48 channels: TI2V 5B), else the file's
        ``wan_config`` metadata, else its name or folder (``wan2.2_t2v_high_noise_14B...``, ``high_noise_model/``),
        else image channels without ``img_emb`` (I2V A14B). The A14B T2V experts have Wan 2.1 14B shapes."""
        stated = self._wan_config_metadata()
        version = stated.get("version") if stated.get("version") in VERSIONS else None
        expert = stated.get("expert") if stated.get("expert") in EXPERTS else None
        names = " ".join(self._naming_parts())
        if version is None and (match := _VERSION_IN_NAME.search(names)):
            version = f"{match.group(1)}.{match.group(2)}"
        if expert is None:
            match = _EXPERT_IN_NAME.search(names)
            expert = f"{match.group(1).lower()}_noise" if match else ""
        if out_dim == WAN22_LATENT_CHANNELS or (version is None and (expert or (in_dim > out_dim and not clip_image))):
            version = "2.2"
        return version or "2.1", expert if version == "2.2" else ""

    def _naming_parts(self) -> list[str]:
        """The file's name, and its folders when the name says nothing (the original releases'
        ``Wan2.2-T2V-A14B/high_noise_model/diffusion_pytorch_model-00001-of-00006.safetensors``)."""
        if not self.files:
            return []
        file = self.files[0]
        stem = _SHARD.sub(r"\g<stem>", file.name).removesuffix(".safetensors")
        return list(file.parts[-3:]) if _GENERIC_NAME.match(stem) else [file.name]

    def _wan_config_metadata(self) -> dict:
        try:
            values = json.loads(self.metadata.get("wan_config", "{}"))
        except json.JSONDecodeError:
            return {}
        return values if isinstance(values, dict) else {}

    def _heads_and_eps(self, dim: int) -> tuple[int, float]:
        """Heads are not visible in the shapes: file metadata, then a config.json beside it, then 128-wide heads."""
        eps = WanConfig.eps
        sources = []
        if "wan_config" in self.metadata:
            try:
                sources.append(("the file's wan_config metadata", json.loads(self.metadata["wan_config"])))
            except json.JSONDecodeError:
                logger.warning("%s: ignoring unreadable wan_config metadata", self.display_name)
        config_json = self.files[0].parent / "config.json" if self.files else None
        if config_json is not None and config_json.is_file():
            try:
                sources.append((str(config_json), json.loads(config_json.read_text())))
            except (OSError, ValueError):
                logger.warning("ignoring unreadable %s", config_json)
        for source, values in sources:
            if not isinstance(values, dict):
                continue
            heads = values.get("num_heads") or values.get("num_attention_heads")
            head_dim = values.get("attention_head_dim")
            if (
                isinstance(heads, int)
                and heads > 0
                and dim % heads == 0
                and (head_dim is None or head_dim * heads == dim)
            ):
                if values.get("dim", dim) == dim:
                    return heads, float(values.get("eps", eps))
            logger.warning("%s: %s does not describe this model (dim %d); ignoring it", self.display_name, source, dim)
        if dim % WAN_HEAD_DIM == 0:
            return dim // WAN_HEAD_DIM, eps
        raise WanDistriFusionError(
            f"{self.display_name}: cannot tell the number of attention heads: width {dim} is not a multiple of Wan's "
            f"head size {WAN_HEAD_DIM} and neither the file's 'wan_config' metadata nor a config.json beside it gives "
            "num_heads. Add one of them (e.g. metadata wan_config='{\"num_heads\": N}')."
        )

    def _check_tensors(self, config: WanConfig) -> None:
        with torch.device("meta"):
            expected = WanModel(config).state_dict()
        missing = [name for name in expected if name not in self.key_of]
        self._raise_missing(missing)
        for name, tensor in expected.items():
            if self.shape(name) != tuple(tensor.shape):
                raise WanDistriFusionError(
                    f"{self.display_name}: tensor {self.key_of[name]} has shape {list(self.shape(name))} but this Wan "
                    f"model (dim {config.dim}, ffn {config.ffn_dim}, {config.num_layers} layers) needs {list(tensor.shape)}. "
                    "The file mixes tensors of different models or is damaged; download it again."
                )
        used = set(expected)
        consumed = {
            name.removesuffix(".weight") + suffix
            for name in expected
            if name.endswith(".weight")
            for suffix in _WEIGHT_SCALE_SUFFIXES
        }
        unexpected = [
            self.key_of[name]
            for name in self.key_of
            if name not in used and name not in consumed and not _IGNORED_KEY.search(name)
        ]
        if unexpected:
            raise WanDistriFusionError(
                f"{self.display_name} has {len(unexpected)} tensors a {config.variant} model does not use "
                f"({_first(unexpected)}): it is a Wan variant this pack does not run, or a merge of several models. "
                "Pick a plain Wan 2.1/2.2 diffusion model in the model widget."
            )

    def _raise_missing(self, missing: list[str]) -> None:
        if missing:
            shown = [self.prefix + (to_diffusers_key(name) if self.layout == "diffusers" else name) for name in missing]
            raise WanDistriFusionError(
                f"{self.display_name} ({self.layout} layout) is missing {len(missing)} tensors a Wan model needs: "
                f"{_first(shown, 6)}. The file is incomplete (an interrupted download, or one shard of several) "
                "or not a full Wan diffusion model; download it again or pick another file in the model widget."
            )

    # -- tensors ------------------------------------------------------------------------------------
    def _raw(self, name: str) -> tuple[Tensor, Tensor | None]:
        """Tensor as stored (memory-mapped) and its dequantization scale if the file has one."""
        key = self.key_of[name]
        tensor = self.handle(key).get_tensor(key)
        scale = None
        base = name[: -len(".weight")] if name.endswith(".weight") else None
        for suffix in _WEIGHT_SCALE_SUFFIXES:
            if base is not None and base + suffix in self.key_of:
                scale_key = self.key_of[base + suffix]
                scale = self.handle(scale_key).get_tensor(scale_key).float()
                if scale.numel() != 1:
                    raise WanDistriFusionError(
                        f"{self.display_name}: {scale_key} holds {scale.numel()} scales; only per-tensor scaled fp8 "
                        "checkpoints are supported. Use an unquantized file and the quantization widget instead."
                    )
                scale = scale.reshape(())
        return tensor, scale

    def read(self, name: str, dtype: torch.dtype, device: torch.device) -> Tensor:
        tensor, scale = self._raw(name)
        tensor = tensor.to(device)  # the stored bytes travel (half of fp32); the conversion runs on the device
        if scale is not None:
            return (tensor.to(torch.float32) * scale.to(device)).to(dtype)
        return tensor.to(dtype)

    def read_fp8(self, name: str, storage_dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
        tensor, scale = self._raw(name)
        if tensor.dtype == storage_dtype:  # already in this fp8 format: keep the bits, no second rounding
            scale = torch.ones(()) if scale is None else scale
            return tensor.to(device), scale.to(device)
        value = tensor.to(device).to(torch.float32)
        if scale is not None:
            value = value * scale.to(device)
        return quantize_fp8(value, storage_dtype)


class _StateDictHandle:
    """The slice of safetensors' ``safe_open`` interface ``_Checkpoint`` uses, over an in-memory state dict."""

    def __init__(self, state: dict[str, Tensor]):
        self.state = state

    def keys(self) -> list[str]:
        return sorted(self.state)

    def metadata(self) -> dict[str, str]:
        return {}

    def get_tensor(self, key: str) -> Tensor:
        return self.state[key]

    def get_slice(self, key: str) -> _StateDictHandle._Slice:
        return self._Slice(self.state[key])

    class _Slice:
        def __init__(self, tensor: Tensor):
            self.tensor = tensor

        def get_shape(self) -> list[int]:
            return list(self.tensor.shape)

        def get_dtype(self) -> str:
            return str(self.tensor.dtype).removeprefix("torch.")


def _checkpoint_files(path: Path) -> tuple[Path, ...]:
    """The file(s) to read: the file itself, all shards of a sharded file, or the .safetensors in a folder."""
    if not path.exists():
        raise WanDistriFusionError(
            f"model file not found: {path}. Put the Wan diffusion model in ComfyUI's models/diffusion_models folder "
            "and pick it in the model widget."
        )
    if path.is_dir():
        files = tuple(sorted(path.glob("*.safetensors")))
        if not files:
            raise WanDistriFusionError(
                f"{path} is a folder without .safetensors files; pick a Wan .safetensors model file in the model widget."
            )
        return files
    if path.suffix.lower() != ".safetensors":
        hint = {
            ".gguf": "GGUF files are not supported; use a .safetensors model and the quantization widget for fp8",
            ".json": "that is an index or config file; pick the .safetensors weights",
        }.get(
            path.suffix.lower(),
            "pickled checkpoints (.ckpt/.pt/.pth/.bin) are not loaded, as they can run code; convert to .safetensors",
        )
        raise WanDistriFusionError(
            f"unsupported model file extension {path.suffix or '(none)'!r} for {path.name}: the model widget needs a "
            f".safetensors file ({hint})."
        )
    shard = _SHARD.match(path.name)
    if not shard:
        return (path,)
    count = int(shard["count"])
    files = tuple(
        path.with_name(f"{shard['stem']}-{index:05d}-of-{count:05d}.safetensors") for index in range(1, count + 1)
    )
    absent = [file.name for file in files if not file.exists()]
    if absent:
        raise WanDistriFusionError(
            f"{path.name} is one shard of {count}; missing beside it: {_first(absent)}. Download all shards into the same folder."
        )
    return files


def _unreadable_message(file: Path, error: Exception) -> str:
    size = file.stat().st_size if file.exists() else 0
    with open(file, "rb") as handle:
        start = handle.read(64)
    if start.startswith(b"version https://git-lfs"):
        cause = "it is a Git LFS pointer, not the weights; fetch them with `git lfs pull` or download the file directly"
    elif start.lstrip().lower().startswith((b"<!doctype", b"<html")):
        cause = "it is an HTML page (a failed download); download the file again"
    elif size < 8:
        cause = "it is empty or truncated; download it again"
    else:
        cause = "it is corrupt or not a safetensors file; download it again"
        expected = _expected_size(file)
        if expected is not None and expected > size:
            cause = f"it is truncated ({size} bytes, its header describes {expected}); download it again"
        elif expected is not None and expected < size:
            cause = f"it has {size - expected} bytes more than its header describes (corrupt); download it again"
    return f"cannot read model file {file.name} ({size} bytes): {cause}. (safetensors said: {error})"


def _expected_size(file: Path) -> int | None:
    """File size a safetensors header promises, or None if the header itself is unreadable."""
    try:
        with open(file, "rb") as handle:
            header_len = int.from_bytes(handle.read(8), "little")
            if header_len > 100_000_000:
                return None
            header = json.loads(handle.read(header_len))
        ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
        return 8 + header_len + max(ends, default=0)
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None


def _original_key_templates() -> list[str]:
    """Every original-layout name a one-block FLF2V Wan has (block names stand for all blocks)."""
    config = WanConfig(
        dim=8,
        ffn_dim=8,
        num_heads=1,
        num_layers=1,
        text_dim=8,
        freq_dim=8,
        model_type="i2v",
        image_dim=8,
        image_positions=2,
    )
    with torch.device("meta"):
        return list(WanModel(config).state_dict())


def _first(items: Iterable[str], count: int = 5) -> str:
    items = list(items)
    shown = ", ".join(items[:count])
    return shown + (f", ... ({len(items) - count} more)" if len(items) > count else "")


def _describe_checkpoint(keys: list[str]) -> str:
    """A best guess at what a non-Wan safetensors file is, from its key names."""
    joined = "\n".join(keys)

    def has(pattern: str) -> bool:
        return re.search(pattern, joined, re.MULTILINE) is not None

    if has(r"(^|\.)(label_emb\.0\.0|add_embedding\.linear_1)\.weight$"):
        return "an SDXL UNet"
    if has(r"(^|\.)input_blocks\.0\.0\.weight$") or (
        has(r"(^|\.)down_blocks\.\d+\.resnets\.") and has(r"(^|\.)conv_in\.weight$")
    ):
        return "a Stable Diffusion UNet"
    if has(r"(^|\.)double_blocks\.\d+\."):
        return "a Flux or HunyuanVideo model (double_blocks)"
    if has(r"(^|\.)joint_blocks\.\d+\."):
        return "a Stable Diffusion 3 MMDiT"
    if has(r"(^|\.)decoder\.middle\.0\.residual\.") or has(r"(^|\.)encoder\.downsamples\."):
        return "the Wan VAE (it goes in a VAE loader)"
    if (
        has(r"^first_stage_model\.")
        or has(r"(^|\.)(decoder\.up_blocks|decoder\.up)\.\d+\.")
        or has(r"(^|\.)post_quant_conv\.")
    ):
        return "a VAE (it goes in a VAE loader)"
    if has(r"(^|\.)encoder\.block\.\d+\.layer\.\d+\.SelfAttention\.") or has(r"^(shared|token_embd)\.weight$"):
        return "a T5/UMT5 text encoder (it goes in a text encoder / CLIP loader)"
    if has(r"(^|\.)(vision_model|visual)\.") or has(r"(^|\.)vision_tower\."):
        return "a CLIP vision (image) encoder (it goes in a CLIP vision loader)"
    if has(r"(^|\.)text_model\.encoder\.layers\.") or has(r"(^|\.)token_embedding\.weight$"):
        return "a CLIP text encoder"
    if has(r"(^|\.)model\.layers\.\d+\.self_attn\."):
        return "a language-model text encoder"
    if has(r"(^|\.)transformer_blocks\.\d+\."):
        return "a different diffusion transformer (transformer_blocks: PixArt, LTX-Video, CogVideoX, ...)"
    return "an unrecognised model"
