"""The one worker group the nodes share: started by the Sampler (once it has checked the job), reused while its
settings hold,
released when ComfyUI unloads models (Unload Models / ``POST /free``) and when ComfyUI exits."""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
from dataclasses import dataclass, replace

from ..distrifusion.settings import RuntimeSpec
from ..distrifusion.status import RunActivity
from ..wanvideo.errors import WanDistriFusionError
from ..wanvideo.step_cache import EasyCacheSettings

logger = logging.getLogger(__name__)

MODEL_TYPE = "DISTRIFUSION_WAN_MODEL"
"""Socket type of the Loader's output: only our Sampler and Status accept it."""


@dataclass(frozen=True)
class RuntimeSettings:
    """Everything that decides whether a running worker group can be reused: the runtime's spec and the file's
    identity."""

    model: str
    """The Loader's model widget (the file's name in ``diffusion_models``)."""
    model_stamp: tuple[int, int]
    """(size, mtime_ns) of the file, so a replaced checkpoint restarts the workers."""
    spec: RuntimeSpec
    second_model: str | None = None
    """The Loader's second model widget (Wan 2.2 A14B's low-noise expert), ``None`` for none."""
    second_model_stamp: tuple[int, int] | None = None

    def same_group(self, other: RuntimeSettings) -> bool:
        """Whether ``other`` runs on the same worker group: equal apart from the LoRA chains, which the running
        ranks re-merge (``Runtime.apply_loras``) instead of restarting."""
        return replace(self, spec=self.spec.with_changes(loras=(), second_loras=())) == replace(
            other, spec=other.spec.with_changes(loras=(), second_loras=())
        )


@dataclass(frozen=True)
class DistriFusionModel:
    """What flows on a ``DISTRIFUSION_WAN_MODEL`` link: the settings, not the group itself, so a group that
    was released (Unload Models) or died is transparently restarted by the next Sampler run."""

    settings: RuntimeSettings
    expert: int = 0
    """Which of the group's models this link runs (``GenerationJob.expert``): 0 = the Loader's model, 1 = its
    second model. Both links of one Loader share one worker group."""
    step_cache: EasyCacheSettings | None = None
    """EasyCache settings from the DistriFusion EasyCache node; the Sampler hands them to the job."""

    def runtime(self):
        return RUNTIMES.acquire(self.settings)

    @property
    def model_name(self) -> str:
        """The file this link runs; raises when it is the second output of a Loader without a second model."""
        if self.expert == 0:
            return self.settings.model
        if self.settings.second_model is None:
            raise WanDistriFusionError(
                "model: this is the Loader's second model output, but its second model is none; pick the low-noise "
                "expert file there (Wan 2.2 A14B) or connect the first output."
            )
        return self.settings.second_model

    @property
    def model_path(self) -> str:
        self.model_name  # noqa: B018 - raises for a missing second model
        return self.settings.spec.model_paths[self.expert]


class RuntimeRegistry:
    """Holds at most one live group (GPUs are exclusive); thread-safe against the status route."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._runtime = None
        self._settings: RuntimeSettings | None = None
        self._starting: tuple | None = None
        self._hooks_installed = False
        self.activity = RunActivity()

    def acquire(self, settings: RuntimeSettings):
        """The running group for ``settings``: the current one when nothing changed, else a new one."""
        with self._lock:
            if self._runtime is not None and self._settings.same_group(settings) and _alive(self._runtime):
                if self._settings.spec.expert_loras != settings.spec.expert_loras:
                    self._runtime.apply_loras(settings.spec.loras, settings.spec.second_loras)
                    self._settings = settings
                return self._runtime
            if self._runtime is not None:
                reason = "settings changed" if self._settings != settings else "its workers stopped"
                self.release(reason)
            self._install_hooks()
            from ..distrifusion.workers import create_runtime

            logger.info(
                "Starting DistriFusion runtime: %s, %d rank(s) here of world size %d, device %s",
                settings.model,
                settings.spec.local_ranks,
                settings.spec.world_size,
                settings.spec.device,
            )
            runtime = create_runtime(settings.spec)
            self._starting = (runtime, settings)
            started = time.perf_counter()
            try:
                runtime.start()
            finally:
                self._starting = None
            logger.info("DistriFusion runtime ready in %.1f s", time.perf_counter() - started)
            self._runtime, self._settings = runtime, settings
            return runtime

    def is_loaded(self, settings: RuntimeSettings) -> bool:
        """Whether the running group is the one ``settings`` would use (its weights already loaded)."""
        with self._lock:
            return self._runtime is not None and self._settings.same_group(settings) and _alive(self._runtime)

    def current(self):
        """``(runtime, settings)`` now, without waiting for a start in progress."""
        return self._runtime, self._settings

    def starting(self):
        """``(runtime, settings)`` of a start in progress (its ranks not all ready yet), or ``None``."""
        return self._starting

    def release(self, reason: str = "released") -> bool:
        """Stop the workers (frees their GPU memory); return whether a group was running."""
        with self._lock:
            runtime, self._runtime = self._runtime, None
            if runtime is None:
                return False
            logger.info("Releasing DistriFusion runtime (%s)", reason)
            try:
                runtime.close()
            except Exception:  # closing a dead group must not take ComfyUI down with it
                logger.exception("Closing the DistriFusion runtime failed")
            return True

    def _install_hooks(self) -> None:
        if self._hooks_installed:
            return
        self._hooks_installed = True
        atexit.register(self.release, "ComfyUI exits")
        install_unload_hook(self)


def install_unload_hook(registry: RuntimeRegistry) -> bool:
    """Release the group whenever ComfyUI unloads all models.

    ComfyUI 0.3.64 has no unload callback for custom nodes; its prompt worker calls
    ``comfy.model_management.unload_all_models()`` for ``POST /free`` (the Unload Models and Free
    model and node cache buttons), so we wrap that function once. Memory-pressure unloads during a
    prompt do not go through it, so the group survives VAE Decode.
    """
    try:
        import comfy.model_management as mm
    except ImportError:
        return False
    original = mm.unload_all_models
    if getattr(original, "_distrifusion_wrapped", False):
        return True

    def unload_all_models(*args, **kwargs):
        registry.release("ComfyUI unloaded models")
        return original(*args, **kwargs)

    unload_all_models._distrifusion_wrapped = True
    unload_all_models.__wrapped__ = original
    mm.unload_all_models = unload_all_models
    return True


def _alive(runtime) -> bool:
    try:
        return bool(getattr(runtime, "alive", True))
    except Exception:
        return False


def master_address() -> tuple[str, int | None]:
    """Rendezvous of the group: torchrun's ``MASTER_ADDR``/``MASTER_PORT`` when set (multi-host), else loopback."""
    port = os.environ.get("MASTER_PORT")
    return os.environ.get("MASTER_ADDR", "127.0.0.1"), int(port) if port and port.isdigit() else None


RUNTIMES = RuntimeRegistry()
