"""What ``cli.py generate`` shows and writes: the sampling and decoding progress bars, the displaced-mode summary,
the latent file (never half written) and the decoded frames.

Imported by ``cli.py`` as part of the pack (``<alias>.cli_outputs``); no ComfyUI.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from .distrifusion.run import run_job
from .distrifusion.vae_session import decode_on_runtime
from .wanvideo import errors, video_files
from .wanvideo.vae import latent_for_vae


def sample_with_bar(runtime, job):
    """``job``'s final latent, with a tqdm bar of the steps (s/step, memory per rank)."""
    bar = tqdm(total=job.steps, unit="step", desc="sampling", dynamic_ncols=True)

    def progress(event) -> None:
        bar.total = event.total
        memory = "/".join(f"{m / 2**30:.1f}" for m in event.memory_per_rank)
        bar.set_postfix_str(f"{event.seconds_per_step:.2f} s/step, mem {memory} GiB", refresh=False)
        bar.update(event.step - bar.n)

    reports: list[str] = []
    try:
        return run_job(runtime, job, progress=progress, report=reports.append)
    finally:
        bar.close()
        for line in reports:  # the EasyCache summary, below the finished bar
            print(line)


def decode_with_bar(runtime, vae: dict, latent, precision: str):
    """The sampled latent decoded on the runtime's ranks, with a tqdm bar of the latent frames."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    z = latent_for_vae(latent.to(torch.float32))
    bar = tqdm(total=z.shape[2], unit="frame", desc="decoding", dynamic_ncols=True)
    try:
        return decode_on_runtime(runtime, vae, z, dtype=dtype, progress=lambda done, total: bar.update(done - bar.n))
    finally:
        bar.close()


def displaced_share(schedule, calls: int) -> str:
    """How many of the model calls used the previous step's K/V (DistriFusion) rather than a fresh exchange."""
    stale = sum(not schedule.is_synchronous(call) for call in range(calls))
    return (
        f"DistriFusion (displaced): {stale} of {calls} computed steps used the previous step's K/V, "
        f"{calls - stale} exchanged fresh K/V ({schedule.warmup_steps} warm-up steps, "
        f"sync frequency {schedule.sync_frequency})"
    )


def save_latent(latent, out: Path, metadata: dict) -> None:
    """Write beside ``out`` and rename, so ``out`` is never half written; when that fails, keep the latent in
    the temp folder and say where it is."""
    tensors = {"latent": latent.contiguous()}
    partial = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(partial), metadata=metadata)
        os.replace(partial, out)
        return
    except Exception as error:  # OSError, safetensors' SafetensorError: keep the finished job
        problem = getattr(error, "strerror", None) or str(error) or type(error).__name__
    partial.unlink(missing_ok=True)
    try:
        handle, kept = tempfile.mkstemp(prefix=f"{out.stem}-", suffix=".safetensors")
        os.close(handle)
        save_file(tensors, kept, metadata=metadata)
    except Exception as error:
        raise errors.WanDistriFusionError(
            f"out: could not write {out} ({problem}), nor a copy in {tempfile.gettempdir()} ({error}); the latent "
            "is lost: free some disk space or choose another --out and run again."
        ) from error
    raise errors.WanDistriFusionError(
        f"out: could not write {out} ({problem}); the finished latent was saved to {kept} instead: move it where "
        "you want it."
    )


def write_video(pixels, out: Path) -> None:
    """``--decode``'s frames beside ``out``: PNGs in ``<out>_frames/``, and ``<out>.mp4`` when ffmpeg is on PATH."""
    frames = video_files.to_uint8_frames(pixels)
    folder = out.with_name(f"{out.stem}_frames")
    pngs = video_files.write_pngs(frames, folder)
    mp4 = video_files.write_mp4(frames, out.with_suffix(".mp4"))
    print(f"wrote {len(pngs)} frames to {folder}" + (f" and {mp4}" if mp4 else " (no ffmpeg on PATH: no mp4)"))
