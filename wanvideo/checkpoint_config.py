"""The ``WanConfig`` a checkpoint holds, from its headers: sizes from the tensors' shapes, heads from metadata or a
config.json beside it, Wan version and A14B expert from shapes, metadata or the file's name; then every tensor is
checked against that config (missing, wrong shape, unused), so a bad file fails before any weight is read."""

from __future__ import annotations

import json
import logging
import math
import re

import torch

from .checkpoint import Checkpoint
from .checkpoint_files import SHARD_NAME
from .checkpoint_layout import BLOCK_KEY, IGNORED_KEY, WEIGHT_SCALE_SUFFIXES, to_diffusers_key
from .errors import WanDistriFusionError, first_few
from .model import EXPERTS, VERSIONS, WAN22_LATENT_CHANNELS, WanConfig, WanModel

logger = logging.getLogger(__name__)

WAN_HEAD_DIM = 128
"""Every released Wan DiT (1.3B: 12 heads, 14B: 40, Wan2.2 5B: 24) uses 128-wide heads."""
_VERSION_IN_NAME = re.compile(r"wan[\W_]?(2)[\W_]?([12])(?!\d)", re.IGNORECASE)
_GENERIC_NAME = re.compile(r"^(diffusion_pytorch_model|pytorch_model|model|diffusion_model)$", re.IGNORECASE)
_EXPERT_IN_NAME = re.compile(r"(high|low)[\W_]?noise", re.IGNORECASE)
_UNSUPPORTED_VARIANTS = (
    ("vace_", "a Wan VACE model"),
    ("motion_encoder.", "a Wan Animate model"),
    ("face_adapter.", "a Wan Animate model"),
)


def read_wan_config(checkpoint: Checkpoint, num_heads: int | None = None) -> WanConfig:
    """The config of the Wan model a checkpoint holds, checked against all its tensors; ``num_heads``
    overrides what the metadata, a config.json or 128-wide heads would give."""
    names = checkpoint.key_of
    for fragment, variant in _UNSUPPORTED_VARIANTS:
        if any(fragment in name or fragment in key for name, key in names.items()):
            raise WanDistriFusionError(
                f"{checkpoint.display_name} is {variant}, which this pack does not run yet. Supported: Wan 2.1/2.2 "
                "text-to-video and image-to-video diffusion models; pick one in the model widget."
            )
    core = [
        "patch_embedding.weight",
        "text_embedding.0.weight",
        "time_embedding.0.weight",
        "head.head.weight",
        "blocks.0.ffn.0.weight",
    ]
    _raise_missing(checkpoint, [name for name in core if name not in names])
    patch_shape = checkpoint.shape("patch_embedding.weight")
    if len(patch_shape) != 5:
        raise WanDistriFusionError(
            f"{checkpoint.display_name}: patch_embedding.weight has shape {list(patch_shape)}, expected a 3D convolution (5 dims); this is not a Wan video model."
        )
    dim, in_dim, *patch = patch_shape
    patch_size = tuple(patch)
    layers = {int(m.group(1)) for name in names if (m := BLOCK_KEY.match(name))}
    i2v = "img_emb.proj.1.weight" in names or any(name.endswith("cross_attn.k_img.weight") for name in names)
    heads, eps = (num_heads, WanConfig.eps) if num_heads else _heads_and_eps(checkpoint, dim)
    if dim % heads:
        raise WanDistriFusionError(f"{checkpoint.display_name}: {heads} attention heads do not divide the width {dim}.")
    out_dim = checkpoint.shape("head.head.weight")[0] // math.prod(patch_size)
    version, expert = _release(checkpoint, in_dim, out_dim, i2v)
    config = WanConfig(
        dim=dim,
        ffn_dim=checkpoint.shape("blocks.0.ffn.0.weight")[0],
        num_heads=heads,
        num_layers=max(layers) + 1,
        in_dim=in_dim,
        out_dim=out_dim,
        text_dim=checkpoint.shape("text_embedding.0.weight")[1],
        freq_dim=checkpoint.shape("time_embedding.0.weight")[1],
        patch_size=patch_size,
        model_type="i2v" if i2v else "t2v",
        eps=eps,
        image_dim=checkpoint.shape("img_emb.proj.1.weight")[1]
        if "img_emb.proj.1.weight" in names
        else WanConfig.image_dim,
        image_positions=checkpoint.shape("img_emb.emb_pos")[1] if "img_emb.emb_pos" in names else 0,
        version=version,
        expert=expert,
    )
    _check_tensors(checkpoint, config)
    return config


def _release(checkpoint: Checkpoint, in_dim: int, out_dim: int, clip_image: bool) -> tuple[str, str]:
    """(Wan version, A14B expert): the shapes where they tell (48 channels: TI2V 5B), else the file's
    ``wan_config`` metadata, else its name or folder (``wan2.2_t2v_high_noise_14B...``, ``high_noise_model/``),
    else image channels without ``img_emb`` (I2V A14B). The A14B T2V experts have Wan 2.1 14B shapes."""
    stated = _wan_config_metadata(checkpoint)
    version = stated.get("version") if stated.get("version") in VERSIONS else None
    expert = stated.get("expert") if stated.get("expert") in EXPERTS else None
    names = " ".join(_naming_parts(checkpoint))
    if version is None and (match := _VERSION_IN_NAME.search(names)):
        version = f"{match.group(1)}.{match.group(2)}"
    if expert is None:
        match = _EXPERT_IN_NAME.search(names)
        expert = f"{match.group(1).lower()}_noise" if match else ""
    if out_dim == WAN22_LATENT_CHANNELS or (version is None and (expert or (in_dim > out_dim and not clip_image))):
        version = "2.2"
    return version or "2.1", expert if version == "2.2" else ""


def _naming_parts(checkpoint: Checkpoint) -> list[str]:
    """The file's name, and its folders when the name says nothing (the original releases'
    ``Wan2.2-T2V-A14B/high_noise_model/diffusion_pytorch_model-00001-of-00006.safetensors``)."""
    if not checkpoint.files:
        return []
    file = checkpoint.files[0]
    stem = SHARD_NAME.sub(r"\g<stem>", file.name).removesuffix(".safetensors")
    return list(file.parts[-3:]) if _GENERIC_NAME.match(stem) else [file.name]


def _wan_config_metadata(checkpoint: Checkpoint) -> dict:
    try:
        values = json.loads(checkpoint.metadata.get("wan_config", "{}"))
    except json.JSONDecodeError:
        return {}
    return values if isinstance(values, dict) else {}


def _heads_and_eps(checkpoint: Checkpoint, dim: int) -> tuple[int, float]:
    """Heads are not visible in the shapes: file metadata, then a config.json beside it, then 128-wide heads."""
    eps = WanConfig.eps
    sources = []
    if "wan_config" in checkpoint.metadata:
        try:
            sources.append(("the file's wan_config metadata", json.loads(checkpoint.metadata["wan_config"])))
        except json.JSONDecodeError:
            logger.warning("%s: ignoring unreadable wan_config metadata", checkpoint.display_name)
    config_json = checkpoint.files[0].parent / "config.json" if checkpoint.files else None
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
        if isinstance(heads, int) and heads > 0 and dim % heads == 0 and (head_dim is None or head_dim * heads == dim):
            if values.get("dim", dim) == dim:
                return heads, float(values.get("eps", eps))
        logger.warning(
            "%s: %s does not describe this model (dim %d); ignoring it", checkpoint.display_name, source, dim
        )
    if dim % WAN_HEAD_DIM == 0:
        return dim // WAN_HEAD_DIM, eps
    raise WanDistriFusionError(
        f"{checkpoint.display_name}: cannot tell the number of attention heads: width {dim} is not a multiple of Wan's "
        f"head size {WAN_HEAD_DIM} and neither the file's 'wan_config' metadata nor a config.json beside it gives "
        "num_heads. Add one of them (e.g. metadata wan_config='{\"num_heads\": N}')."
    )


def _check_tensors(checkpoint: Checkpoint, config: WanConfig) -> None:
    with torch.device("meta"):
        expected = WanModel(config).state_dict()
    missing = [name for name in expected if name not in checkpoint.key_of]
    _raise_missing(checkpoint, missing)
    for name, tensor in expected.items():
        if checkpoint.shape(name) != tuple(tensor.shape):
            raise WanDistriFusionError(
                f"{checkpoint.display_name}: tensor {checkpoint.key_of[name]} has shape {list(checkpoint.shape(name))} but this Wan "
                f"model (dim {config.dim}, ffn {config.ffn_dim}, {config.num_layers} layers) needs {list(tensor.shape)}. "
                "The file mixes tensors of different models or is damaged; download it again."
            )
    used = set(expected)
    consumed = {
        name.removesuffix(".weight") + suffix
        for name in expected
        if name.endswith(".weight")
        for suffix in WEIGHT_SCALE_SUFFIXES
    }
    unexpected = [
        checkpoint.key_of[name]
        for name in checkpoint.key_of
        if name not in used and name not in consumed and not IGNORED_KEY.search(name)
    ]
    if unexpected:
        raise WanDistriFusionError(
            f"{checkpoint.display_name} has {len(unexpected)} tensors a {config.variant} model does not use "
            f"({first_few(unexpected)}): it is a Wan variant this pack does not run, or a merge of several models. "
            "Pick a plain Wan 2.1/2.2 diffusion model in the model widget."
        )


def _raise_missing(checkpoint: Checkpoint, missing: list[str]) -> None:
    if missing:
        shown = [
            checkpoint.prefix + (to_diffusers_key(name) if checkpoint.layout == "diffusers" else name)
            for name in missing
        ]
        raise WanDistriFusionError(
            f"{checkpoint.display_name} ({checkpoint.layout} layout) is missing {len(missing)} tensors a Wan model needs: "
            f"{first_few(shown, 6)}. The file is incomplete (an interrupted download, or one shard of several) "
            "or not a full Wan diffusion model; download it again or pick another file in the model widget."
        )
