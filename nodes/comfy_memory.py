"""Room on ComfyUI's device before our model loads or runs: with GPUs = 1 the model lives in ComfyUI's process (and
rank 0 of several shares GPU 0 with it), where ComfyUI's own models (text encoder, VAE, a native Wan model) may
still sit. Before a Sampler run we ask ComfyUI's model management to unload as many of them as our memory plan
needs, as its own loaders do before loading a model (``comfy.model_management.free_memory``)."""

from __future__ import annotations

import logging

from ..distrifusion.memory_plan import plan_job
from . import _comfy

logger = logging.getLogger(__name__)


def bytes_needed_on_comfy_device(settings, config, job, loaded: bool, comfy_device) -> int:
    """What the runtime for ``settings`` still needs on ComfyUI's device for ``job``: the memory plan of each local
    rank there, less the weights when they are already loaded. 0 when no rank runs on that device. ``auto`` is
    planned by the steps alone (what the runtime picks with ample free memory): the runtime chooses after this
    room is made, from the free memory it then finds."""
    spec = settings.spec
    _, plan = plan_job(
        config,
        spec.parallel,
        job,
        spec.precision,
        spec.quantization,
        check=False,
        models=len(spec.model_paths),
        offload=spec.offload,
    )
    per_rank = plan.total_bytes - (plan.weights_bytes if loaded else 0)
    if comfy_device.type == "cpu":  # every local rank (and its offloaded blocks) in this host's RAM
        if spec.device != "cpu":
            return 0
        return spec.local_ranks * (per_rank + (0 if loaded else plan.host_bytes))
    if spec.device != "cuda":
        return 0
    index = comfy_device.index or 0  # local rank i runs on GPU i
    return per_rank if index < spec.local_ranks else 0


def make_room(settings, config, job, loaded: bool) -> int:
    """Ask ComfyUI to unload its models until the bytes our runtime needs are free on its device; returns them."""
    mm = _comfy.model_management()
    device = mm.get_torch_device()
    needed = bytes_needed_on_comfy_device(settings, config, job, loaded, device)
    if needed:
        unloaded = mm.free_memory(needed, device)
        logger.info(
            "asked ComfyUI for %.2f GiB on %s before %s: %d of its models unloaded",
            needed / 1024**3,
            device,
            "running" if loaded else "loading",
            len(unloaded or ()),
        )
    return needed
