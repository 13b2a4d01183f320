"""What the Status node and the ``/distrifusion/status`` route report: package, GPUs, topology, progress.

Core module: never imports ComfyUI. ``status_report`` gathers a JSON-able dict, ``format_report`` turns
it into the text shown on the Status node. ``RunActivity`` is written by whoever drives a job (the
Sampler node, the CLI) and read concurrently by the report.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from ..wanvideo.errors import WanDistriFusionError
from .comm import resolve_comm_backend
from .config import ParallelConfig
from .settings import RuntimeSpec

logger = logging.getLogger(__name__)

INSTALL_COMMANDS = (
    "pip install -r requirements_official_distrifusion.txt",
    "pip install diffusers==0.24.0 distrifuser==0.0.1b1 huggingface_hub==0.25.2 transformers==4.44.2",
)
"""The guide's troubleshooting fixes, pinned as our official profile pins them (run with ComfyUI's python)."""

_warned_official = False
_warn_lock = threading.Lock()


@functools.lru_cache(maxsize=1)
def official_package_status() -> dict:
    """Whether MIT-HAN-Lab's ``distrifuser`` imports here, its version, or the exact import error (cached)."""
    from .comm import official_status

    available, detail = official_status()
    if available:
        return {"available": True, "version": detail, "error": None, "install": []}
    return {"available": False, "version": None, "error": detail, "install": list(INSTALL_COMMANDS)}


def official_warning_lines(official: dict) -> list[str]:
    """The guide's "not available" warning with the install commands, or nothing when it imports."""
    if official.get("available"):
        return []
    return [
        f"⚠️ Official DistriFusion not available: {official.get('error')}",
        f"   Install with: {INSTALL_COMMANDS[0]}",
        f"   (or: {INSTALL_COMMANDS[1]})",
        "   Until then the pack runs the same algorithm on its built-in comm layer.",
    ]


def warn_if_official_missing() -> dict:
    """Log the official-package warning once per process (first Loader use or status), return the check."""
    global _warned_official
    official = official_package_status()
    with _warn_lock:
        if not official["available"] and not _warned_official:
            _warned_official = True
            logger.warning("\n".join(official_warning_lines(official)))
    return official


def gpu_inventory() -> list[dict]:
    """Name, total and free memory (MiB) of each visible CUDA device; empty without CUDA.

    Free memory comes from NVML when ``nvidia-ml-py`` is installed; otherwise only for devices this
    process already holds a context on (asking the driver would create a context on every GPU).
    """
    if not torch.cuda.is_available():
        return []
    nvml = _nvml_memory()
    gpus = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        gpu = {"index": index, "name": props.name, "total_mib": props.total_memory // 2**20, "free_mib": None}
        if nvml is not None and index < len(nvml):
            gpu["free_mib"] = nvml[index]
        elif torch.cuda.is_initialized() and index == torch.cuda.current_device():
            gpu["free_mib"] = torch.cuda.mem_get_info(index)[0] // 2**20
        gpus.append(gpu)
    return gpus


def _nvml_memory() -> list[int] | None:
    try:
        import pynvml  # nvidia-ml-py, optional
    except ImportError:
        return None
    try:
        import os

        pynvml.nvmlInit()
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible:
            order = [int(v) for v in visible.split(",") if v.strip().isdigit()]
            handles = [handles[i] for i in order if i < len(handles)]
        return [pynvml.nvmlDeviceGetMemoryInfo(h).free // 2**20 for h in handles]
    except Exception:  # NVML missing or denied: report free memory as unknown
        return None


@dataclass
class RunActivity:
    """Progress of the current (or last) job, updated by the driver, read by status reports."""

    running: bool = False
    step: int = 0
    total_steps: int = 0
    seconds_per_step: float | None = None
    memory_per_rank: list[int | None] = field(default_factory=list)
    """Bytes in use per rank (index = rank), from the last step."""
    latent_shape: tuple[int, ...] | None = None
    model: str | None = None
    """What the current (or last) job runs: the variant and file (Wan 2.2 A14B: which expert)."""
    started_at: float | None = None
    finished_at: float | None = None
    last_error: str | None = None
    """The last failure, until the next successful run."""
    last_error_at: float | None = None
    cancelled_at: float | None = None
    """When the last run was cancelled by the user, if it was (a cancel is not an error)."""
    jobs_done: int = 0
    easycache: str | None = None
    """EasyCache's closing line of the current (or last) job, ``None`` without EasyCache."""
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def begin(self, total_steps: int, latent_shape: tuple[int, ...] | None = None, model: str | None = None) -> None:
        with self._lock:
            self.running, self.step, self.total_steps = True, 0, total_steps
            self.model = model
            self.seconds_per_step, self.memory_per_rank = None, []
            self.latent_shape = tuple(latent_shape) if latent_shape is not None else None
            self.started_at, self.finished_at = time.time(), None
            self.easycache = None

    def note_easycache(self, summary: str | None) -> None:
        """Which steps the job's EasyCache skipped (its closing line)."""
        with self._lock:
            self.easycache = summary

    def update(self, step: int, total: int, seconds_per_step: float | None = None, memory_per_rank=None) -> None:
        with self._lock:
            self.step, self.total_steps = step, total
            if seconds_per_step is not None:
                self.seconds_per_step = float(seconds_per_step)
            if memory_per_rank is not None:
                self.memory_per_rank = [None if m is None else int(m) for m in memory_per_rank]

    def finish(self, error: BaseException | str | None = None) -> None:
        """The run ended: successfully (clears the last error) or with ``error``."""
        with self._lock:
            self.running, self.finished_at, self.cancelled_at = False, time.time(), None
            if error is None:
                self.jobs_done += 1
                self.last_error = self.last_error_at = None
            else:
                self.last_error = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
                self.last_error_at = self.finished_at

    def cancel(self) -> None:
        """The user cancelled the run: no error, and an earlier error stays until a run succeeds."""
        with self._lock:
            self.running, self.finished_at = False, time.time()
            self.cancelled_at = self.finished_at

    def snapshot(self) -> dict:
        with self._lock:
            return {
                "running": self.running,
                "current": self.step,
                "total": self.total_steps,
                "seconds_per_step": self.seconds_per_step,
                "latent_shape": list(self.latent_shape) if self.latent_shape else None,
                "model": self.model,
                "started_at": self.started_at,
                "finished_at": self.finished_at,
                "jobs_done": self.jobs_done,
                "memory_per_rank": list(self.memory_per_rank),
                "last_error": self.last_error,
                "last_error_at": self.last_error_at,
                "cancelled_at": self.cancelled_at,
                "easycache": self.easycache,
            }


def status_report(
    runtime: Any = None,
    activity: RunActivity | None = None,
    spec: RuntimeSpec | None = None,
    model: str | None = None,
    starting: Any = None,
) -> dict:
    """Everything the Status node shows, as JSON-able data.

    ``runtime`` is a running ``WorkerGroup``/``InProcessRunner`` (or ``None``), ``starting`` one whose ranks are
    still starting; ``spec`` the Loader's settings of it (else the runtime's own), ``model`` the Loader's model
    name; ``activity`` the progress the driver recorded.
    """
    runtime_status = _runtime_status(runtime)
    spec = spec or getattr(runtime or starting, "spec", None)
    parallel = spec.parallel if spec is not None else None
    official = warn_if_official_missing()
    progress = (activity or RunActivity()).snapshot()

    world_size = spec.world_size if spec is not None else 1
    first_rank = spec.first_rank if spec is not None else 0
    local_ranks = spec.local_ranks if spec is not None else 1
    device = spec.device if spec is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    memory = progress["memory_per_rank"] or runtime_status.get("memory_per_rank")
    step = {
        "running": progress["running"],
        "current": progress["current"] or runtime_status.get("current_step") or 0,
        "total": progress["total"] or runtime_status.get("total_steps") or 0,
        "seconds_per_step": progress["seconds_per_step"] or runtime_status.get("seconds_per_step"),
        "jobs_done": progress["jobs_done"],
        "latent_shape": progress["latent_shape"],
        "model": progress["model"],
        "easycache": progress["easycache"],
    }

    state = _runtime_state(runtime, starting, progress["running"])
    return {
        "official": official,
        "comm_backend": _comm_backend(runtime_status, parallel, device),
        "device": device,
        "gpus": gpu_inventory(),
        "runtime": {
            "state": state,
            "model": model,
            "precision": spec.precision if spec is not None else None,
            "quantization": spec.quantization if spec is not None else None,
            "offload": spec.offload if spec is not None else None,
            "loras": [[lora.name, lora.strength] for lora in spec.loras] if spec is not None else [],
            "second_loras": [[lora.name, lora.strength] for lora in spec.second_loras] if spec is not None else [],
            "attention": parallel.attention_backend if parallel is not None else None,
            "attention_kernel": runtime_status.get("attention"),
            "compile": runtime_status.get("compile") or _compile_setting(parallel),
            "weights": runtime_status.get("weights") or _weights_setting(spec),
            "pids": runtime_status.get("pids") or [],
            "memory_plan": runtime_status.get("memory_plan"),
        },
        "world_size": world_size,
        "ranks": {
            "local": list(range(first_rank, first_rank + local_ranks)),
            "remote": max(0, world_size - local_ranks),
            "devices": runtime_status.get("device_names") or [],
        },
        **_parallel_report(parallel, progress["latent_shape"]),
        "auto_mode": runtime_status.get("mode_choice") if parallel and parallel.mode == "auto" else None,
        "step": step,
        "memory_per_rank_mib": [None if m is None else round(float(m) / 2**20, 1) for m in memory or []],
        "last_error": progress["last_error"],
        "last_error_at": progress["last_error_at"],
        "cancelled_at": progress["cancelled_at"],
        "runtime_status": _jsonable(runtime_status),
    }


def _compile_setting(parallel: ParallelConfig | None) -> str | None:
    """The ``compile`` setting before the ranks have resolved it on their devices."""
    if parallel is None:
        return None
    return "on where a CUDA GPU has Triton (resolved when the model loads)" if parallel.compile_blocks else "off"


def _weights_setting(spec: RuntimeSpec | None) -> str | None:
    """What the ranks will load before they report it: one rank always holds the whole model."""
    if spec is None:
        return None
    return "replicated" if spec.world_size == 1 else spec.weights


def _runtime_state(runtime: Any, starting: Any, running: bool) -> str:
    if runtime is None and starting is not None:
        ready, total = starting.ranks_ready()
        return f"starting workers: {ready} of {total} ready"
    if runtime is None:
        return "not started"
    if _is_alive(runtime):
        return "running a job" if running else "ready"
    return "stopped"


def _runtime_status(runtime: Any) -> dict:
    if runtime is None:
        return {}
    try:
        status = runtime.status()
    except Exception as exc:  # a dead group may fail to answer; the report must still render
        return {"last_error": f"status unavailable: {type(exc).__name__}: {exc}"}
    return dict(status) if isinstance(status, dict) else {}


def _is_alive(runtime: Any) -> bool:
    try:
        return bool(getattr(runtime, "alive", True))
    except Exception:
        return False


def _parallel_report(parallel: ParallelConfig | None, latent_shape: list | None) -> dict:
    if parallel is None:
        return {"parallel_mode": None, "cfg_parallel": None, "warmup_steps": None, "kv_dtype": None,
                "split_mode": None, "partition_tokens": None, "patch": {"size_px": None, "overlap_px": None},
                "comm_backend_setting": None}  # fmt: skip
    return {
        "comm_backend_setting": parallel.comm_backend,
        "parallel_mode": parallel.mode,
        "cfg_parallel": parallel.cfg_parallel,
        "warmup_steps": parallel.warmup_steps,
        "kv_dtype": parallel.kv_dtype,
        "split_mode": parallel.split_mode,
        "partition_tokens": _partition_sizes(parallel, latent_shape),
        "patch": {"size_px": parallel.patch_size, "overlap_px": parallel.patch_overlap},
    }


def _comm_backend(runtime_status: dict, parallel: ParallelConfig | None, device: str) -> str:
    """Which comm manager exchanges the K/V (official distrifuser or builtin) and over which transport."""
    if parallel is None:
        return "not chosen yet (no Model Loader has run)"
    if parallel.world_size == 1:
        return "none (one rank, in-process)"
    wire = runtime_status.get("comm_backend")
    if not wire or wire == "none":
        wire = "nccl" if device == "cuda" else "gloo"
    try:
        manager = resolve_comm_backend(parallel.comm_backend)
    except WanDistriFusionError:  # 'official' without the package: the start reports it
        manager = "official"
    if manager == "official":
        return f"official (distrifuser PatchParallelismCommManager) over {wire}"
    return f"builtin over {wire}"


def _partition_sizes(parallel: ParallelConfig, latent_shape: list | None) -> list[int] | None:
    """Tokens each rank owns for the last job's latent (none before the first job)."""
    if not latent_shape:
        return None
    try:
        from .job import vae_stride
        from .partition import partition_tokens

        grid = (int(latent_shape[2]), int(latent_shape[3]) // 2, int(latent_shape[4]) // 2)
        degree = parallel.patch_parallel_degree
        token_px = 2 * vae_stride(int(latent_shape[1]))  # 32 px for the 5B's 48-channel latents
        ranks = partition_tokens(grid, parallel.split_mode, parallel.patch_size, degree, 0, token_px)
        return [int(r.own_index.numel()) for r in ranks]
    except Exception:  # the partition itself reports its errors when a job runs
        return None


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    return str(value)


def format_report(report: dict) -> str:
    """The report as the text the Status node shows (guide's emoji headings)."""
    lines = ["🎯 Official DistriFusion Status"]
    official = report.get("official") or {}
    if official.get("available"):
        lines.append(f"✅ Official DistriFusion available: distrifuser {official.get('version')}")
        lines.append(f"🔌 Comm backend: {report.get('comm_backend')}")
    elif report.get("comm_backend_setting") == "official":  # asked for it: the guide's warning and fix
        lines.extend(official_warning_lines(official))
        lines.append(f"🔌 Comm backend: {report.get('comm_backend')}")
    else:
        lines.append(f"🔌 Comm: {report.get('comm_backend')} (same algorithm; official package optional, see README)")

    gpus = report.get("gpus") or []
    if gpus:
        lines.append(f"🎮 CUDA devices: {len(gpus)}")
        for gpu in gpus:
            free = "free unknown" if gpu.get("free_mib") is None else f"{gpu['free_mib'] / 1024:.1f} GiB free"
            lines.append(f"   GPU {gpu['index']}: {gpu['name']}, {gpu['total_mib'] / 1024:.1f} GiB, {free}")
    else:
        lines.append(f"🎮 No CUDA device: ranks run on {report.get('device', 'cpu')} (gloo)")

    runtime = report.get("runtime") or {}
    lines.append(f"📦 Runtime: {runtime.get('state')}" + (f" — {runtime['model']}" if runtime.get("model") else ""))
    if not report.get("parallel_mode"):
        lines.append("   No Model Loader has run yet: its settings show here once it has.")
    else:
        lines.extend(_topology_lines(report, runtime))

    step = report.get("step") or {}
    if step.get("total"):
        state = "running" if step.get("running") else "last run"
        per_step = step.get("seconds_per_step")
        per_step_text = f", {per_step:.3f} s/step" if per_step else ""
        lines.append(f"🔄 Step {step.get('current')}/{step.get('total')} ({state}){per_step_text}")
        if step.get("model"):
            lines.append(f"   Model: {step['model']}")
        if step.get("easycache"):
            lines.append(f"⏩ {step['easycache']}")
    else:
        lines.append("🔄 No step run yet")
    memory = report.get("memory_per_rank_mib") or []
    if memory:
        lines.append(
            "💾 Memory per rank: "
            + ", ".join(f"rank {i}: {'?' if m is None else f'{m / 1024:.2f} GiB'}" for i, m in enumerate(memory))
        )
    if report.get("cancelled_at"):
        lines.append(f"⏹ Last run cancelled by the user at {_clock(report['cancelled_at'])}")
    if report.get("last_error"):
        lines.append(f"❌ Last error at {_clock(report.get('last_error_at'))}: {report['last_error']}")
    return "\n".join(lines)


def _clock(timestamp: float | None) -> str:
    return time.strftime("%H:%M:%S", time.localtime(timestamp)) if timestamp else "?"


def _attention_text(runtime: dict) -> str:
    """The attention setting, with the kernel the ranks picked when it differs (``auto → flash4``)."""
    setting, kernel = runtime.get("attention"), runtime.get("attention_kernel")
    return f"{setting} → {kernel}" if kernel and kernel != setting else str(setting)


def _topology_lines(report: dict, runtime: dict) -> list[str]:
    """The Loader's settings part of the report: precision, ranks, mode, patches, partition, memory plan."""
    lines = []
    lines.append(
        f"   precision {runtime.get('precision')}, quantization {runtime.get('quantization')}, "
        f"attention {_attention_text(runtime)}, compile {runtime.get('compile')}"
        + (f", weights {runtime['weights']}" if runtime.get("weights") else "")
        + (", blocks streamed from host memory (offload)" if runtime.get("offload") else "")
    )
    for key, label in (("loras", "LoRA"), ("second_loras", "LoRA of the second model")):
        if runtime.get(key):
            lines.append(f"   {label}: " + ", ".join(f"{name} at {strength:g}" for name, strength in runtime[key]))
    ranks = report.get("ranks") or {}
    local = ranks.get("local") or []
    local_text = f"{local[0]}-{local[-1]}" if len(local) > 1 else (str(local[0]) if local else "none")
    devices = [d for d in ranks.get("devices") or [] if d]
    lines.append(
        f"📊 World size {report.get('world_size')}: ranks {local_text} on this host, "
        f"{ranks.get('remote', 0)} on other hosts" + (f" ({', '.join(devices)})" if devices else "")
    )
    if report.get("auto_mode"):
        choice = report["auto_mode"]
        lines.append(f"   auto picked {choice['mode']} for the last job: {choice['reason']}")
    lines.append(
        f"   mode {report['parallel_mode']}, CFG parallel {'on' if report.get('cfg_parallel') else 'off'}, "
        f"warm-up {report.get('warmup_steps')} steps, K/V {report.get('kv_dtype')}"
    )
    patch = report.get("patch") or {}
    lines.append(
        f"🔲 Patch size {patch.get('size_px')} px, overlap {patch.get('overlap_px')} px, "
        f"split mode {report.get('split_mode')}"
    )
    partition = report.get("partition_tokens")
    if partition:
        lines.append(f"   tokens per rank (last clip): {', '.join(str(n) for n in partition)}")
    if runtime.get("memory_plan"):
        lines.append(f"   memory plan: {runtime['memory_plan']}")
    return lines
