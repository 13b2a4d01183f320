"""Bytes of a Wan transformer's weights as loaded, per block and per rank, and what ``weights auto`` resolves to.

Counted from the model's shapes, not from a checkpoint, so the memory plan (``memory_plan``), the offload host-memory
check and the ranks' choice of sharded weights (``rank.resolve_weights``) agree before anything is loaded.
"""

from __future__ import annotations

import functools
import math

from ..wanvideo.loading import PRECISIONS
from ..wanvideo.model import WanConfig

PRECISION_BYTES = {name: dtype.itemsize for name, dtype in PRECISIONS.items()}


@functools.lru_cache(maxsize=32)
def parameter_counts(config: WanConfig) -> tuple[int, int]:
    """(block matrix parameters, which fp8 quantization stores in one byte; all other parameters).

    Counted from the shapes of ``WanModel`` (``tests/test_memory_plan.py`` checks it against the module).
    """
    block_matrices, block_rest = block_parameter_counts(config)
    return config.num_layers * block_matrices, config.num_layers * block_rest + outside_block_parameters(config)


@functools.lru_cache(maxsize=32)
def block_parameter_counts(config: WanConfig) -> tuple[int, int]:
    """One block's (matrix parameters, other parameters): what sharded weights split and gather per block."""
    d, f = config.dim, config.ffn_dim
    image = config.model_type == "i2v"
    block_matrices = 8 * d * d + 2 * d * f + (2 * d * d if image else 0)
    block_rest = (
        4 * d
        + 2 * d  # self-attention biases, q/k norms
        + 4 * d
        + 2 * d  # cross-attention biases, q/k norms
        + (2 * d + d if image else 0)  # image k/v biases, k norm
        + 2 * d  # norm3 (affine)
        + f
        + d  # FFN biases
        + 6 * d  # modulation
    )
    return block_matrices, block_rest


def outside_block_parameters(config: WanConfig) -> int:
    """Parameters of the embeddings and the head (replicated even with sharded weights)."""
    d, patch = config.dim, math.prod(config.patch_size)
    rest = (
        config.in_dim * patch * d
        + d  # patch_embedding
        + config.text_dim * d
        + d
        + d * d
        + d  # text_embedding
        + config.freq_dim * d
        + d
        + d * d
        + d  # time_embedding
        + d * 6 * d
        + 6 * d  # time_projection
        + d * config.out_dim * patch
        + config.out_dim * patch
        + 2 * d  # head
    )
    if config.model_type == "i2v":
        i = config.image_dim
        rest += 2 * i + i * i + i + i * d + d + 2 * d  # img_emb
    return rest


def block_bytes(config: WanConfig, precision: str, quantization: str) -> int:
    """One transformer block's weights as loaded: what sharded weights split and gather per block, and what offload
    keeps in host memory and streams per forward."""
    act = PRECISION_BYTES[precision]
    matrices, rest = block_parameter_counts(config)
    return matrices * (1 if "fp8" in quantization else act) + rest * act


def weight_bytes(
    config: WanConfig, precision: str, quantization: str, world_size: int = 1, weights: str = "replicated"
) -> tuple[int, int]:
    """(bytes one rank holds between forwards, bytes of full blocks gathered during a forward) for one model.

    Sharded: each rank stores 1/N of every block (rounded up per block) plus the embeddings and head; during a
    forward the running block and the prefetched next one are held whole.
    """
    block = block_bytes(config, precision, quantization)
    outside = outside_block_parameters(config) * PRECISION_BYTES[precision]
    if weights != "sharded" or world_size < 2:
        return config.num_layers * block + outside, 0
    return config.num_layers * -(-block // world_size) + outside, GATHERED_BLOCKS * block


GATHERED_BLOCKS = 2
"""Full blocks held at once with sharded weights: the running block and the next one's gather in flight."""
WEIGHTS_SHARE = 0.7
"""``weights auto`` replicates only when a full copy of the weights takes at most this share of a GPU's free memory
(the rest is for activations, K/V and buffers); otherwise it shards."""


def choose_weights(
    config: WanConfig, precision: str, quantization: str, world_size: int, free_bytes: int | None, models: int = 1
) -> str:
    """What ``weights auto`` resolves to: ``sharded`` when several GPUs cannot each hold a full copy comfortably
    (``WEIGHTS_SHARE`` of the smallest free memory), else ``replicated`` (also on the CPU and with one rank)."""
    if world_size < 2 or free_bytes is None:
        return "replicated"
    resident, _ = weight_bytes(config, precision, quantization)
    return "sharded" if models * resident > WEIGHTS_SHARE * free_bytes else "replicated"
