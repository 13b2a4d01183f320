"""The file(s) a Wan checkpoint path stands for (a file, all shards of a sharded file, a folder's
``.safetensors``), and what is wrong with a file safetensors cannot open (Git LFS pointer, HTML page, truncated)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from .errors import WanDistriFusionError, first_few

SHARD_NAME = re.compile(r"^(?P<stem>.+)-(?P<index>\d{5})-of-(?P<count>\d{5})\.safetensors$")


def checkpoint_files(path: Path) -> tuple[Path, ...]:
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
    shard = SHARD_NAME.match(path.name)
    if not shard:
        return (path,)
    count = int(shard["count"])
    files = tuple(
        path.with_name(f"{shard['stem']}-{index:05d}-of-{count:05d}.safetensors") for index in range(1, count + 1)
    )
    absent = [file.name for file in files if not file.exists()]
    if absent:
        raise WanDistriFusionError(
            f"{path.name} is one shard of {count}; missing beside it: {first_few(absent)}. Download all shards into the same folder."
        )
    return files


def unreadable_message(file: Path, error: Exception) -> str:
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
