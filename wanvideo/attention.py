"""Softmax attention kernels the model can run on, chosen by the Loader's ``attention backend`` widget.

Every kernel takes and returns ``[batch, tokens, heads, head_dim]``. Optional kernels are imported only
when chosen, so a missing wheel never breaks import.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from .errors import WanDistriFusionError

AttentionFn = Callable[[Tensor, Tensor, Tensor], Tensor]
"""``attention_fn(q, k, v) -> out``, all ``[batch, tokens, heads, head_dim]``. A kernel that wants its inputs in one
memory layout says so in an ``input_layout`` attribute (one of ``INPUT_LAYOUTS``): the model then produces q/k/v in
it (``WanSelfAttention.project``)."""
INPUT_LAYOUTS = ("tokens_first", "heads_first")
"""``tokens_first``: dense ``[B, L, H, D]`` (FlashAttention, Sage); ``heads_first``: ``[B, H, L, D]`` in memory."""

ATTENTION_BACKENDS = ("auto", "sdpa", "flash4", "flash3", "sage")


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """PyTorch SDPA, which picks its fastest backend (cuDNN on Hopper)."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


SDPA_ORDER_HOPPER = [
    SDPBackend.CUDNN_ATTENTION,
    SDPBackend.FLASH_ATTENTION,
    SDPBackend.EFFICIENT_ATTENTION,
    SDPBackend.MATH,
]
"""cuDNN first on Hopper and newer: 1.6x FlashAttention-2 at Wan's head size (measured on an H200)."""
SDPA_ORDER_OLDER = [
    SDPBackend.FLASH_ATTENTION,
    SDPBackend.EFFICIENT_ATTENTION,
    SDPBackend.MATH,
    SDPBackend.CUDNN_ATTENTION,
]


@functools.cache
def _sdpa_order(device_index: int) -> tuple[SDPBackend, ...]:
    major = torch.cuda.get_device_capability(device_index)[0]
    return tuple(SDPA_ORDER_HOPPER if major >= 9 else SDPA_ORDER_OLDER)


def sdpa_backend_order(device: torch.device) -> contextlib.AbstractContextManager:
    """Fix SDPA's backend priority for one model call on a CUDA ``device``.

    SDPA's priority is process-global state. ComfyUI's own attention sets it with ``sdpa_kernel(...,
    set_priority=True)``, and after a native model has run, SDPA no longer picks cuDNN on Hopper but
    FlashAttention-2: our 1.3B step went from 1.35 s to 1.77 s inside ComfyUI. So every forward states its
    own order instead of inheriting whatever the last caller left.
    """
    if device.type != "cuda":
        return contextlib.nullcontext()
    index = device.index if device.index is not None else torch.cuda.current_device()
    return sdpa_kernel(list(_sdpa_order(index)), set_priority=True)


def _flash4() -> AttentionFn:
    # FlashAttention-4 JIT-compiles its kernel per shape at the first call of every process (~5 s at Wan's
    # shapes inside ComfyUI); its own on-disk cache (keyed by its source and versions) is off unless asked for.
    os.environ.setdefault("FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED", "1")
    from flash_attn.cute import flash_attn_func

    def flash4_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        # v may be a strided view of the fused qkv projection; the CuTe kernels expect dense tensors.
        out = flash_attn_func(q.contiguous(), k.contiguous(), v.contiguous())
        return out[0] if isinstance(out, tuple) else out

    flash4_attention.input_layout = "tokens_first"
    return flash4_attention


def _flash3() -> AttentionFn:
    from flash_attn_interface import flash_attn_func

    def flash3_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        out = flash_attn_func(q.contiguous(), k.contiguous(), v.contiguous())
        return out[0] if isinstance(out, tuple) else out

    flash3_attention.input_layout = "tokens_first"
    return flash3_attention


def _sage() -> AttentionFn:
    from sageattention import sageattn

    def sage_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return sageattn(q.contiguous(), k.contiguous(), v.contiguous(), tensor_layout="NHD")

    sage_attention.input_layout = "tokens_first"
    return sage_attention


_OPTIONAL = {"flash4": _flash4, "flash3": _flash3, "sage": _sage}
_INSTALL_HINT = {
    "flash4": "pip install -r requirements_flash4.txt, i.e. flash-attn-4 (Hopper or Blackwell GPUs)",
    "flash3": "build FlashAttention-3 from its hopper/ folder (Hopper GPUs)",
    "sage": "pip install sageattention",
}


def resolve_attention(backend: str, device: torch.device | str = "cpu") -> AttentionFn:
    """The kernel for ``backend``; ``auto`` = FlashAttention-4 on a Hopper+ GPU when installed, else SDPA."""
    if backend not in ATTENTION_BACKENDS:
        raise WanDistriFusionError(
            f"attention backend: {backend!r} is unknown; choose one of {', '.join(ATTENTION_BACKENDS)}."
        )
    device = torch.device(device)
    if backend == "sdpa" or (backend == "auto" and device.type != "cuda"):
        return sdpa_attention
    if backend == "auto":
        if torch.cuda.get_device_capability(device)[0] < 9:
            return sdpa_attention
        try:
            return _flash4()
        except ImportError:
            return sdpa_attention
    if device.type != "cuda":
        raise WanDistriFusionError(f"attention backend: {backend} needs a CUDA GPU; choose sdpa or auto on CPU.")
    try:
        return _OPTIONAL[backend]()
    except ImportError as error:
        raise WanDistriFusionError(
            f"attention backend: {backend} is not installed ({error}); {_INSTALL_HINT[backend]}, or choose auto/sdpa."
        ) from error


def preload_attention(backend: str, device: torch.device | str) -> threading.Thread:
    """Resolve ``backend`` in a background thread (daemon), so an optional kernel's imports (FlashAttention-4's CuTe
    DSL takes seconds) run while the checkpoint loads; the later ``resolve_attention`` finds the module imported (or
    waits on Python's import lock) and reports any error itself."""

    def load() -> None:
        with contextlib.suppress(Exception):
            resolve_attention(backend, device)

    thread = threading.Thread(target=load, name="preload-attention", daemon=True)
    thread.start()
    return thread


def attention_kernel_name(backend: str, device: torch.device | str = "cpu") -> str:
    """The kernel ``backend`` runs on ``device`` (``auto`` resolved: ``flash4`` or ``sdpa``), as the status shows it."""
    return resolve_attention(backend, device).__name__.removesuffix("_attention")
