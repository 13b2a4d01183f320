"""A VAE decode on the runtime: in this process at world size 1, else split by rows over the worker group.

The controller posts the decoder's weights to the rendezvous store once per group and VAE
(``vae/<fingerprint>``, dropped from the store once every rank has read them) and a ``DecodeVAE`` command per
decode; every rank reads the weights the first time, keeps its decoder, decodes
its slab of rows (``vae_split.py``) and writes its pixel rows straight into one shared file, which the
controller reads when every rank has ended. Rank 0 reports each latent frame (``DecodeProgress``) and, between
frames, tells the other ranks whether the controller asked to stop (``End``): all ranks stop after the same frame.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import secrets
import time
import weakref
from collections.abc import Callable

import torch
import torch.distributed as dist

from ..wanvideo.errors import WanDistriFusionError
from ..wanvideo.vae import WanVAEDecoder, decoder_state_dict, load_vae_decoder, vae_config_from_state_dict
from . import wire
from .devices import resolve_device
from .session import JobCancelled
from .shared_latents import FILE_PREFIX, shared_folder
from .store import DecodeVAE, decode_payload, encode_payload, store_take
from .vae_split import decode_slab, split_rows

logger = logging.getLogger(__name__)

ChunkProgress = Callable[[int, int], None]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_local_decoders: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""In-process runner -> (weights key, decoder): the world-size-1 decoder, kept like the ranks keep theirs."""


class _Stopped(Exception):
    """Every rank stops after the same latent frame (the controller asked)."""


def weights_key(state_dict: dict[str, torch.Tensor]) -> str:
    """A fingerprint of the decoder's tensors (names, shapes, dtypes, a strided sample of values)."""
    digest = hashlib.sha1()
    for name, tensor in sorted(decoder_state_dict(state_dict).items()):
        flat = tensor.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 256)].to("cpu", torch.float32)
        digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        digest.update(sample.numpy().tobytes())
    return "vae/" + digest.hexdigest()[:20]


def decode_on_runtime(
    runtime,
    state_dict: dict[str, torch.Tensor],
    latent: torch.Tensor,
    dtype: torch.dtype = torch.float32,
    progress: ChunkProgress | None = None,
    cancelled: Callable[[], bool] | None = None,
) -> torch.Tensor:
    """Pixels [B, 3, 1 + 4 (F-1), 8H, 8W] in [-1, 1] (float32, CPU) of the un-normalised Wan latent ``latent``.

    Bad input (not a Wan 2.1 VAE, a latent of the wrong shape, fewer latent rows than ranks) is refused before
    any work; ``cancelled()`` is polled after every latent frame and ``progress(done, total)`` called; either
    raising stops every rank after the same frame, and the exception (``JobCancelled`` for ``cancelled``) is raised.
    """
    from .in_process import InProcessRunner

    config = vae_config_from_state_dict(state_dict)
    if latent.ndim != 5 or latent.shape[1] != config.z_dim:
        raise WanDistriFusionError(
            f"samples: expected a Wan video LATENT [batch, {config.z_dim}, frames, rows, cols], got {list(latent.shape)}; "
            "connect the Sampler's LATENT (or a Wan latent) to samples."
        )
    if dtype not in DTYPES.values():
        raise WanDistriFusionError(
            f"vae: weights of dtype {dtype} cannot be decoded; use float32, bfloat16 or float16."
        )
    b, _, frames, rows, cols = latent.shape
    scale = config.spatial_scale
    shape = (b, 3, config.output_frames(frames), rows * scale, cols * scale)
    key = weights_key(state_dict)
    if isinstance(runtime, InProcessRunner):
        return _decode_in_process(runtime, key, state_dict, latent, dtype, shape, progress, cancelled)
    split_rows(rows, runtime.spec.world_size)
    if len(runtime.spec.local_rank_ids) != runtime.spec.world_size:
        raise WanDistriFusionError(
            "VAE decode: the ranks run on several hosts; the split decode writes into memory shared by the ranks of "
            "one host, so it needs every rank on this host (decode with ComfyUI's VAE Decode instead)."
        )
    return _decode_on_group(runtime, key, state_dict, latent, dtype, shape, progress, cancelled)


def _decode_in_process(runner, key, state_dict, latent, dtype, shape, progress, cancelled) -> torch.Tensor:
    index = torch.cuda.current_device() if runner.spec.device == "cuda" and torch.cuda.is_available() else 0
    device = resolve_device(runner.spec.device, index)
    held = _local_decoders.get(runner)
    if held is None or held[0] != key:
        _local_decoders[runner] = held = (key, load_vae_decoder(state_dict, dtype, device))
    decoder: WanVAEDecoder = held[1]

    def on_chunk(done: int, total: int) -> None:
        if progress is not None:
            progress(done, total)
        if cancelled is not None and done < total and cancelled():
            raise JobCancelled(f"VAE decode cancelled after latent frame {done} of {total}", done, total)

    out = torch.empty(shape, dtype=torch.float32)
    with torch.no_grad():
        decoder.to(dtype).decode(latent.to(device, dtype), on_chunk=on_chunk, out=out)
    return out


def _decode_on_group(group, key, state_dict, latent, dtype, shape, progress, cancelled) -> torch.Tensor:
    numel = math.prod(shape)
    path = shared_folder(4 * numel) / f"{FILE_PREFIX}{os.getpid()}-{secrets.token_hex(6)}.pixels"
    with group.run_lock:
        number = group.reserve_command()
        try:
            if key not in group.posted_payloads:  # the ranks keep one decoder: a new VAE replaces the last
                group.posted_payloads.difference_update([k for k in group.posted_payloads if k.startswith("vae/")])
                began = time.perf_counter()
                group.post_payload(key, encode_payload({"kind": "vae"}, decoder_state_dict(state_dict)))
                logger.info("VAE weights posted to the workers in %.1f s", time.perf_counter() - began)
            with open(path, "xb") as file:
                file.truncate(4 * numel)
            pixels = torch.from_file(str(path), shared=True, size=numel, dtype=torch.float32).view(shape)
            dtype_name = next(name for name, value in DTYPES.items() if value == dtype)
            command = DecodeVAE(number, key, dtype_name, latent.detach().to("cpu", torch.float32), str(path))
            group.post_command(number, command)
            stop = _wait_for_decode(group, number, latent.shape[2], progress, cancelled)
            group.drop_payload(key)  # every rank has read the weights before its first frame: free the store's copy
            if stop is not None:
                raise stop
            return pixels.clone()
        finally:
            path.unlink(missing_ok=True)
            group.end_command(number)


def _wait_for_decode(group, number: int, total: int, progress, cancelled) -> BaseException | None:
    """Follow rank 0's progress until every local rank ended; what to raise when the decode was stopped."""
    ended: dict[int, int] = {}
    done = [0]
    stop: list[BaseException] = []

    def ask_to_stop(reason: BaseException) -> None:
        if not stop:
            stop.append(reason)
            group.processes.send(0, wire.End(number))

    def take(rank: int, message: wire.Message) -> None:
        match message:
            case wire.DecodeProgress(session=session, chunk=chunk, total=frames) if session == number:
                done[0] = chunk
                try:
                    if progress is not None:
                        progress(chunk, frames)
                    if cancelled is not None and chunk < frames and cancelled():
                        raise JobCancelled(
                            f"VAE decode cancelled after latent frame {chunk} of {frames}", chunk, frames
                        )
                except BaseException as error:  # stop the ranks first, then raise it
                    ask_to_stop(error)
            case wire.SessionEnded(session=session, calls=chunks) if session == number:
                ended[rank] = chunks

    local = len(group.spec.local_rank_ids)
    while len(ended) < local:
        seen = done[0]
        group.supervisor.wait(
            take,
            lambda seen=seen: len(ended) >= local or done[0] != seen,
            doing="a VAE decode was running",
            phase=f"while decoding latent frame {seen + 1} of {total}",
            timeout_s=group.step_timeout_s,
            on_timeout=lambda: (
                None,
                f"no progress from the workers' VAE decode for step_timeout_s = {group.step_timeout_s:.0f} s "
                f"({group.processes.states()})",
            ),
        )
    if len(set(ended.values())) > 1:
        group.supervisor.fail(None, f"the ranks left the VAE decode after different frames {ended}")
    if not stop and min(ended.values()) < total:
        return JobCancelled(f"VAE decode stopped after latent frame {min(ended.values())} of {total}")
    return stop[0] if stop else None


# -- on a rank ------------------------------------------------------------------------------------


def serve_decode(rank, command: DecodeVAE) -> bool:
    """Decode this rank's rows of ``command``; False when it failed (reported; the controller stops the group)."""
    chunks = 0
    total = command.latent.shape[2]
    try:
        dtype = DTYPES[command.dtype]
        held = rank.vae_decoder
        if held is None or held[0] != command.weights:
            rank.vae_decoder = None  # the previous decoder's memory goes before the next one loads
            _, tensors = decode_payload(store_take(rank.store, command.weights))
            rank.vae_decoder = held = (command.weights, load_vae_decoder(tensors, dtype, rank.device))
            del tensors
        decoder: WanVAEDecoder = held[1].to(dtype)
        z = command.latent.to(rank.device, dtype)
        b, _, frames, rows, cols = z.shape
        scale = decoder.config.spatial_scale
        shape = (b, 3, decoder.config.output_frames(frames), rows * scale, cols * scale)
        pixels = torch.from_file(command.output, shared=True, size=math.prod(shape), dtype=torch.float32).view(shape)
        latent_rows = split_rows(rows, rank.world_size)
        start = sum(latent_rows[: rank.rank]) * scale
        out = pixels[..., start : start + latent_rows[rank.rank] * scale, :]
        began = [time.perf_counter()]

        def on_chunk(done: int, frames_total: int) -> None:
            nonlocal chunks
            chunks = done
            stop = 0.0
            if rank.rank == 0:
                now = time.perf_counter()
                rank.send(wire.DecodeProgress(command.session, done, frames_total, now - began[0]))
                began[0] = now
                if done < frames_total:
                    rank.pull_control()
                    for message in list(rank.inbox):
                        if isinstance(message, wire.End) and message.session == command.session:
                            rank.inbox.remove(message)
                            stop = 1.0
                        elif isinstance(message, wire.ControllerGone | wire.Shutdown):
                            stop = 1.0  # left in the inbox: the serve loop acts on it
            if rank.world_size > 1 and done < frames_total:
                flag = torch.tensor([stop], dtype=torch.float64, device=rank.device)
                dist.broadcast(flag, 0)
                stop = float(flag.item())
            if stop:
                raise _Stopped

        with torch.no_grad():
            decode_slab(decoder, z, rank.rank, rank.world_size, on_chunk=on_chunk, out=out)
    except _Stopped:
        logger.info("VAE decode %d stopped after latent frame %d of %d", command.session, chunks, total)
    except BaseException as error:  # everything goes back to the controller
        rank.report_error(error, "session", chunks + 1, total)
        return False
    rank.send(wire.SessionEnded(command.session, rank.rank, chunks, {}))
    return True
