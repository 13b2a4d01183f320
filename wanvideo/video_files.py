"""Decoded frames to files: numbered PNGs (Pillow), and an H.264 mp4 when an ``ffmpeg`` is on PATH."""

from __future__ import annotations

import logging
import shutil
import subprocess
from pathlib import Path

import torch

from .errors import WanDistriFusionError

logger = logging.getLogger(__name__)


def to_uint8_frames(pixels: torch.Tensor) -> torch.Tensor:
    """[B, 3, T, H, W] in [-1, 1] -> [B*T, H, W, 3] uint8 (VAE Decode's clamp, rounded)."""
    images = pixels.float().add(1.0).div(2.0).clamp(0.0, 1.0).movedim(1, -1)
    return images.reshape(-1, *images.shape[-3:]).mul(255.0).round().to(torch.uint8)


def write_pngs(frames: torch.Tensor, folder: Path) -> list[Path]:
    """``frame_00000.png``... in ``folder`` (made if missing)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, frame in enumerate(frames.numpy()):
        path = folder / f"frame_{index:05d}.png"
        Image.fromarray(frame).save(path)
        paths.append(path)
    return paths


def write_mp4(frames: torch.Tensor, path: Path, fps: float = 16.0) -> Path | None:
    """An mp4 through ``ffmpeg`` (raw RGB on its stdin); ``None`` when no ffmpeg is on PATH."""
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        return None
    _, height, width, _ = frames.shape
    command = [ffmpeg, "-y", "-loglevel", "error", "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}"]
    command += ["-r", str(fps), "-i", "-", "-c:v", "libx264", "-pix_fmt", "yuv420p", "-crf", "17", str(path)]
    run = subprocess.run(command, input=frames.numpy().tobytes(), capture_output=True)
    if run.returncode != 0:
        raise WanDistriFusionError(f"decode: ffmpeg could not write {path}: {run.stderr.decode()[-500:]}")
    return path
