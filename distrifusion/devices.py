"""Device facts a rank reports and the memory plan reads: which device, how much memory is in use and free."""

from __future__ import annotations

import platform
import sys

import torch

from ..wanvideo.errors import WanDistriFusionError


def resolve_device(kind: str, local_index: int = 0) -> torch.device:
    if kind == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise WanDistriFusionError(
            "device: CUDA is not available in this Python; choose device cpu or install a CUDA build of torch."
        )
    count = torch.cuda.device_count()
    if local_index >= count:
        raise WanDistriFusionError(
            f"GPUs: local rank {local_index} needs GPU {local_index} but only {count} are visible; lower GPUs/world size."
        )
    return torch.device("cuda", local_index)


def memory_in_use(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.memory_allocated(device))
    import psutil

    return int(psutil.Process().memory_info().rss)


def memory_peak(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        import resource
    except ImportError:  # Windows
        return memory_in_use(device)
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * scale


def device_memory(device: torch.device) -> tuple[int, int]:
    """(free, total) bytes of the device (CPU: available and total system memory)."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return int(free), int(total)
    import psutil

    vm = psutil.virtual_memory()
    return int(vm.available), int(vm.total)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or "CPU"
