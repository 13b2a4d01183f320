"""A forward session's latents in shared memory: the controller writes ``x``, rank 0 writes the flow back, and
the control messages of a call carry no tensor (measured in ``bench/session_roundtrip.py``)."""

from __future__ import annotations

import math
import os
import secrets
import tempfile
from pathlib import Path

import torch

FILE_PREFIX = "wan-distrifusion-"
"""``<shm>/wan-distrifusion-<controller pid>-<random>.latents``; removed once rank 0 mapped it, and by the next
group's start when a controller died before that (as its log folders)."""


def shared_folder(need_bytes: int = 0) -> Path:
    """``/dev/shm`` where it exists with room for ``need_bytes`` twice over (memory, not disk; a container's is
    often only 64 MiB, and writing past it would kill the process), else the temp folder."""
    shm = Path("/dev/shm")
    try:
        usable = shm.is_dir() and os.access(shm, os.W_OK)
        if usable and need_bytes:
            stats = os.statvfs(shm)
            usable = stats.f_bavail * stats.f_frsize >= 2 * need_bytes
    except OSError:
        usable = False
    return shm if usable else Path(tempfile.gettempdir())


class SharedLatents:
    """Three float32 tensors of one latent shape, ``x``, ``flow`` and ``uncond``, mapped from one file."""

    def __init__(self, path: str | os.PathLike, shape: tuple[int, ...], *, create: bool = False):
        self.path = Path(path)
        self.shape = tuple(int(n) for n in shape)
        numel = math.prod(self.shape)
        if create:
            with open(self.path, "xb") as file:
                file.truncate(3 * numel * 4)
        storage = torch.from_file(str(self.path), shared=True, size=3 * numel, dtype=torch.float32)
        self.x, self.flow, self.uncond = (part.view(self.shape) for part in storage.split(numel))

    @classmethod
    def create(cls, shape: tuple[int, ...]) -> SharedLatents:
        """A new file for ``shape`` (controller side)."""
        name = f"{FILE_PREFIX}{os.getpid()}-{secrets.token_hex(6)}.latents"
        return cls(shared_folder(3 * 4 * math.prod(shape)) / name, shape, create=True)

    def unlink(self) -> None:
        """Remove the file's name; the mappings stay valid until both sides drop them."""
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
