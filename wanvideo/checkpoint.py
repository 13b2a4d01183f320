"""A Wan checkpoint open for reading: its safetensors file(s), memory-mapped, or a state dict already in memory,
the mapping from original Wan names to the keys in them, and tensors read and converted one at a time."""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor

from .checkpoint_files import checkpoint_files, unreadable_message
from .checkpoint_layout import WEIGHT_SCALE_SUFFIXES, detect_layout, map_keys
from .errors import WanDistriFusionError
from .fp8 import quantize_fp8


class Checkpoint:
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
        self.layout, self.prefix = detect_layout(self.file_keys, display_name)
        self.key_of = map_keys(self.file_keys, self.layout, self.prefix)

    @classmethod
    def open(cls, path: Path, stack: ExitStack) -> Checkpoint:
        files = checkpoint_files(path)
        handles = []
        for file in files:
            try:
                handles.append(stack.enter_context(safe_open(str(file), framework="pt", device="cpu")))
            except Exception as error:  # safetensors raises its own SafetensorError, or OSError
                raise WanDistriFusionError(unreadable_message(file, error)) from error
        return cls(files, handles, path.name)

    def handle(self, file_key: str):
        return self.handles[self._handle_of[file_key]]

    def shape(self, name: str) -> tuple[int, ...]:
        key = self.key_of[name]
        return tuple(self.handle(key).get_slice(key).get_shape())

    def _raw(self, name: str) -> tuple[Tensor, Tensor | None]:
        """Tensor as stored (memory-mapped) and its dequantization scale if the file has one."""
        key = self.key_of[name]
        tensor = self.handle(key).get_tensor(key)
        scale = None
        base = name[: -len(".weight")] if name.endswith(".weight") else None
        for suffix in WEIGHT_SCALE_SUFFIXES:
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


class StateDictHandle:
    """The slice of safetensors' ``safe_open`` interface ``Checkpoint`` uses, over an in-memory state dict."""

    def __init__(self, state: dict[str, Tensor]):
        self.state = state

    def keys(self) -> list[str]:
        return sorted(self.state)

    def metadata(self) -> dict[str, str]:
        return {}

    def get_tensor(self, key: str) -> Tensor:
        return self.state[key]

    def get_slice(self, key: str) -> StateDictHandle._Slice:
        return self._Slice(self.state[key])

    class _Slice:
        def __init__(self, tensor: Tensor):
            self.tensor = tensor

        def get_shape(self) -> list[int]:
            return list(self.tensor.shape)

        def get_dtype(self) -> str:
            return str(self.tensor.dtype).removeprefix("torch.")
