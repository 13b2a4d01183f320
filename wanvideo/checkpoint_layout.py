"""Key layouts of a Wan checkpoint: which one a file uses, and what a file that is not a Wan model is.

The original Wan names (``blocks.N.self_attn.q.weight``), the same under ComfyUI's ``model.diffusion_model.``
prefix, and diffusers' ``WanTransformer3DModel`` names (renames as in diffusers'
``scripts/convert_wan_to_diffusers.py``). Never imports diffusers (the official profile's diffusers has no Wan).
"""

from __future__ import annotations

import re

import torch

from .errors import WanDistriFusionError, first_few
from .model import WanConfig, WanModel

COMFYUI_PREFIX = "model.diffusion_model."
KNOWN_PREFIXES = ("", COMFYUI_PREFIX, "diffusion_model.")

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
IGNORED_KEY = re.compile(r"(^scaled_fp8$|\.scale_input$|\.input_scale$|\.comfy_quant$|\.norm_added_q\.)")
WEIGHT_SCALE_SUFFIXES = (".scale_weight", ".weight_scale")
BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+)$")
_ORIGINAL_MARKER = re.compile(
    r"^(patch_embedding\.weight|head\.head\.weight|blocks\.\d+\.(self|cross)_attn\.[qkvo]\.weight)$"
)
_DIFFUSERS_MARKER = re.compile(
    r"^(condition_embedder\.time_embedder\.linear_1\.weight|blocks\.\d+\.attn[12]\.to_[qkv]\.weight)$"
)
_WAN_LIKE = re.compile(r"(^|\.)blocks\.\d+\.(self_attn|cross_attn|attn1|attn2)\.")


def to_diffusers_key(key: str) -> str:
    """Name an original-layout Wan tensor has in diffusers' ``WanTransformer3DModel``."""
    for old, new in DIFFUSERS_RENAMES:
        key = key.replace(old, new)
    return key


def detect_layout(keys: list[str], display_name: str) -> tuple[str, str]:
    """(layout, prefix) of a file's keys; a clear error for a LoRA, an unknown prefix or another model."""
    lora = [key for key in keys if re.search(r"lora_|\.lora\.|\.alpha$|\.diff$|\.diff_b$", key)]
    if lora:
        raise _not_wan(display_name, keys, "a LoRA (a patch for a model, not a model); load it with a LoRA loader")
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
            f"{display_name} has Wan-like tensors but a key layout this loader does not know "
            f"(prefix {prefix!r}; {len(keys)} tensors, first keys: {first_few(keys)}). Supported: original Wan names "
            f"(blocks.N.self_attn.q.weight), the same under ComfyUI's '{COMFYUI_PREFIX}' prefix, and diffusers' "
            "WanTransformer3DModel names. Re-save the file in one of them or pick another file in the model widget."
        )
    raise _not_wan(display_name, keys, _describe_checkpoint(keys))


def _not_wan(display_name: str, keys: list[str], what: str) -> WanDistriFusionError:
    return WanDistriFusionError(
        f"{display_name} is not a Wan diffusion model: it looks like {what} ({len(keys)} tensors, first keys: "
        f"{first_few(keys)}). Pick a Wan 2.1/2.2 diffusion model (e.g. wan2.1_t2v_1.3B_fp16.safetensors from "
        "ComfyUI's models/diffusion_models folder) in the model widget."
    )


def map_keys(keys: list[str], layout: str, prefix: str) -> dict[str, str]:
    """Original Wan name -> key in the file, for every tensor under the detected prefix."""
    stripped = {key[len(prefix) :]: key for key in keys if key.startswith(prefix)}
    if layout != "diffusers":
        return {name: key for name, key in stripped.items()}
    from_diffusers = {to_diffusers_key(name): name for name in _original_key_templates()}
    key_of = {}
    for diffusers_name, key in stripped.items():
        match = BLOCK_KEY.match(diffusers_name)
        if match:
            original = from_diffusers.get(f"blocks.0.{match.group(2)}")
            original = original and original.replace("blocks.0.", f"blocks.{match.group(1)}.", 1)
        else:
            original = from_diffusers.get(diffusers_name)
        key_of[original or f"<diffusers>{diffusers_name}"] = key
    return key_of


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
