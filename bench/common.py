"""Shared pieces of the GPU benchmarks: package import, Wan presets, seeded random weights, model builders,
timers and tables. Runs on CPU too (``--tiny``) so every code path is exercised before a GPU call.

Weights are drawn per tensor from a generator seeded by (seed, tensor name) on the target device, so any
process (every rank of a multi-GPU run) rebuilds the very same model without files or transfers.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import json
import math
import os
import runpy
import statistics
import sys
import time
import zlib
from collections.abc import Callable, Iterable
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGE_ALIAS = "wan_distrifusion"

# Wan 2.1 T2V shapes (original checkpoints); tiny = the test fixtures' size.
PRESETS: dict[str, dict] = {
    "1.3B": dict(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30, text_dim=4096),
    "14B": dict(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40, text_dim=4096),
    "tiny": dict(dim=64, ffn_dim=128, num_heads=4, num_layers=2, text_dim=32),
}
# Latent shapes [C, F, H, W] (batch added by the caller): 480p/720p x 81 frames; tiny = 3 x 8 x 12.
SHAPES: dict[str, tuple[int, int, int, int]] = {
    "480p81": (16, 21, 60, 104),
    "720p81": (16, 21, 90, 160),
    "tiny": (16, 3, 8, 12),
    "tiny_odd": (16, 3, 10, 12),
}
TEXT_LEN = 512
# Keep NVLink multicast off in every process we start (KINDS.md: it can take the host's GPUs down).
SAFE_NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


# --------------------------------------------------------------------------------------------------------------
# package import (the repo root is a package imported under an alias, like tests/conftest.py does)
# --------------------------------------------------------------------------------------------------------------
def import_package():
    """Register the repo root as ``wan_distrifusion`` (without ComfyUI's node entry point) and return it.

    Same route as the workers and the CLI: ``distrifusion/bootstrap.py`` loaded by path.
    """
    if PACKAGE_ALIAS in sys.modules:
        return sys.modules[PACKAGE_ALIAS]
    return runpy.run_path(str(REPO_ROOT / "distrifusion" / "bootstrap.py"))["entry_point"]()


def pkg(name: str):
    """Import ``wan_distrifusion.<name>`` (the repo root registered under that alias)."""
    import_package()
    return importlib.import_module(f"{PACKAGE_ALIAS}.{name}")


def safe_env() -> None:
    for key, value in SAFE_NCCL_ENV.items():
        os.environ[key] = value


# --------------------------------------------------------------------------------------------------------------
# configs and random weights
# --------------------------------------------------------------------------------------------------------------
def wan_config(preset: str):
    model = pkg("wanvideo.model")
    return model.WanConfig(**PRESETS[preset])


def diffusers_kwargs(cfg) -> dict:
    """``WanTransformer3DModel`` constructor arguments for a ``WanConfig`` (T2V)."""
    return dict(
        patch_size=tuple(cfg.patch_size),
        num_attention_heads=cfg.num_heads,
        attention_head_dim=cfg.dim // cfg.num_heads,
        in_channels=cfg.in_dim,
        out_channels=cfg.out_dim,
        text_dim=cfg.text_dim,
        freq_dim=cfg.freq_dim,
        ffn_dim=cfg.ffn_dim,
        num_layers=cfg.num_layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=cfg.eps,
    )


def _std_for(name: str, shape: tuple[int, ...], dim: int) -> tuple[float, float]:
    """(mean, std) of a tensor: default-Linear-like scale for weights, ~1 for norm weights, small biases."""
    leaf = name.rsplit(".", 1)[-1]
    if name.endswith("modulation"):
        return 0.0, dim**-0.5
    if "norm" in name:
        return (1.0, 0.05) if leaf == "weight" else (0.0, 0.05)
    if leaf == "bias":
        return 0.0, 0.02
    fan_in = math.prod(shape[1:]) if len(shape) > 1 else shape[0]
    return 0.0, (3.0 * fan_in) ** -0.5


def random_tensor(name: str, shape, *, seed: int, dim: int, device, dtype) -> torch.Tensor:
    """Seeded per name: the same (seed, name, shape, device type) always gives the same values."""
    gen = torch.Generator(device=device).manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
    out = torch.empty(tuple(shape), device=device, dtype=dtype)
    mean, std = _std_for(name, tuple(shape), dim)
    out.normal_(mean, std, generator=gen)
    return out


def random_state_dict(cfg, *, seed: int, device, dtype=torch.bfloat16) -> dict[str, torch.Tensor]:
    """Random weights in the original Wan key layout, drawn directly on ``device`` in ``dtype``."""
    wan = pkg("wanvideo.model")
    with torch.device("meta"):
        shapes = {name: tuple(t.shape) for name, t in wan.WanModel(cfg).state_dict().items()}
    return {
        name: random_tensor(name, shape, seed=seed, dim=cfg.dim, device=device, dtype=dtype)
        for name, shape in shapes.items()
    }


def to_diffusers_layout(original_sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original keys -> diffusers keys through the loader's own mapping (same tensors, no copies)."""
    layout = pkg("wanvideo.checkpoint_layout")
    return {layout.to_diffusers_key(name): tensor for name, tensor in original_sd.items()}


# --------------------------------------------------------------------------------------------------------------
# model builders
# --------------------------------------------------------------------------------------------------------------
def build_diffusers(cfg, state_dict: dict[str, torch.Tensor], device, dtype=torch.bfloat16, keep_fp32: bool = True):
    """diffusers' ``WanTransformer3DModel`` holding ``state_dict`` (tensors shared where dtypes match).

    ``keep_fp32`` mirrors ``from_pretrained(torch_dtype=bf16)``: the model's ``_keep_in_fp32_modules`` stay fp32.
    """
    from diffusers import WanTransformer3DModel
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

    with torch.device("meta"):
        model = WanTransformer3DModel(**diffusers_kwargs(cfg))
    keep = set(model._keep_in_fp32_modules or []) if keep_fp32 and dtype != torch.float32 else set()
    tensors = {}
    for name, tensor in state_dict.items():
        want = torch.float32 if keep and keep & set(name.split(".")) else dtype
        tensors[name] = tensor.to(device=device, dtype=want)
    model.load_state_dict(tensors, strict=True, assign=True)
    with torch.device(device):  # non-persistent RoPE tables are not in the state dict: build them for real
        model.rope = WanRotaryPosEmbed(cfg.dim // cfg.num_heads, tuple(cfg.patch_size), 1024)
    leftovers = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftovers:
        raise RuntimeError(f"diffusers model still has meta tensors: {leftovers[:5]}")
    return model.eval().requires_grad_(False)


def patch_diffusers_logger() -> None:
    """diffusers' context-parallel hook warns through ``Logger.warning_once``, which only exists once ``transformers``
    is imported (it adds it to ``logging.Logger``); without it the hook raises on Wan's 1-D timestep. Same shim."""
    import functools
    import logging

    if not hasattr(logging.Logger, "warning_once"):
        logging.Logger.warning_once = functools.lru_cache(None)(logging.Logger.warning)


def compile_diffusers(model) -> None:
    """The peer at its best: diffusers' documented regional compile, each ``WanTransformerBlock`` compiled with
    ``fullgraph=True`` (in place; the embeddings, RoPE tables and head stay eager, like our ``compile_blocks``)."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    model.compile_repeated_blocks(fullgraph=True)


def build_ours(cfg, original_sd: dict[str, torch.Tensor], device, dtype=torch.bfloat16, quantization: str = "disabled"):
    """Our ``WanModel`` through the loader's state-dict entry point (``load_wan_model``'s dtypes, fp8 storage),
    projections fused as the runtime runs it.

    Tensors already in the target dtype and device are shared, not copied, so diffusers' model and ours can
    hold one copy of the weights.
    """
    loading = pkg("wanvideo.loading")
    model = loading.model_from_state_dict(
        original_sd, dtype=dtype, quantization=quantization, device=device, num_heads=cfg.num_heads
    )
    if model.config != cfg:
        raise RuntimeError(f"loader read config {model.config}, expected {cfg}")
    model.fuse_projections()  # as the runtime's ``load_rank_model`` does
    # Point the caller's unfused q/k/v entries at slices of the fused weights, so the originals are freed
    # (peak memory then matches the product's) and a diffusers model built later still shares one copy.
    if quantization == "disabled":
        dim = cfg.dim
        for i, block in enumerate(model.blocks):
            fused = {"self_attn": (block.self_attn.qkv, "qkv"), "cross_attn": (block.cross_attn.kv, "kv")}
            for attn, (linear, names) in fused.items():
                for j, name in enumerate(names):
                    for kind in ("weight", "bias"):
                        original_sd[f"blocks.{i}.{attn}.{name}.{kind}"] = getattr(linear, kind)[j * dim : (j + 1) * dim]
    return model.eval().requires_grad_(False)


def tensor_bytes(module: torch.nn.Module) -> int:
    """Bytes of parameters and buffers (distinct storages once)."""
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        key = (t.untyped_storage().data_ptr(), t.dtype)
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


def diffusers_callable(model):
    """Make diffusers' model callable like ours: ``f(x, t, context) -> prediction``.

    Under the SDPA backend order our own forward states (cuDNN first on Hopper): both models get the same
    attention kernel, also when compiled (inductor picks SDPA's backend when it traces the first call).
    """
    backend_order = pkg("wanvideo.attention").sdpa_backend_order

    def forward(x, t, context, **_):
        dtype = model.proj_out.weight.dtype
        with backend_order(x.device):
            out = model(
                hidden_states=x.to(dtype), timestep=t, encoder_hidden_states=context.to(dtype), return_dict=False
            )
        return out[0]

    return forward


def make_inputs(cfg, shape_name: str, batch: int, *, device, seed: int = 1234, dtype=torch.bfloat16):
    """Latent ``x``, timesteps ``t`` and text context (random, seeded on the CPU then moved)."""
    gen = torch.Generator("cpu").manual_seed(seed)
    c, f, h, w = SHAPES[shape_name]
    x = torch.randn(batch, c, f, h, w, generator=gen).to(device=device, dtype=dtype)
    t = torch.tensor([700.0 - 200.0 * i for i in range(batch)], device=device)
    context = torch.randn(batch, TEXT_LEN if shape_name != "tiny" else 16, cfg.text_dim, generator=gen)
    return x, t, context.to(device=device, dtype=dtype)


def free(*objs) -> None:
    del objs
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------------------------
# one rank's share of a parallel step, on one GPU
# --------------------------------------------------------------------------------------------------------------
class StaleKVAttention:
    """Timing-only displaced attention: local q against [fresh local K/V; preallocated stale remote K/V].

    The remote part is one buffer shared by all layers (the runtime keeps one per layer; the arithmetic and
    the bytes each layer moves are the same). ``kv_dtype`` fp8 stores it narrow and upcasts it per layer.
    """

    def __init__(self, inner, *, total_tokens: int, batch: int, heads: int, head_dim: int, dtype, kv_dtype, device):
        self.inner = inner
        self.total = total_tokens
        shape = (batch, total_tokens, heads, head_dim)
        self.stale_k = torch.randn(shape, device=device, dtype=dtype).to(kv_dtype)
        self.stale_v = torch.randn(shape, device=device, dtype=dtype).to(kv_dtype)

    def __call__(self, q, k, v):
        n = k.shape[1]
        k_full = k.new_empty(k.shape[0], self.total, *k.shape[2:])
        v_full = v.new_empty(k_full.shape)
        k_full[:, :n] = k
        v_full[:, :n] = v
        k_full[:, n:] = self.stale_k[:, : self.total - n]
        v_full[:, n:] = self.stale_v[:, : self.total - n]
        return self.inner(q, k_full, v_full)


class _DoneWork:
    def wait(self, *args, **kwargs):
        return True

    def is_completed(self):
        return True


def _overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    a0, b0 = a.data_ptr(), b.data_ptr()
    return a0 < b0 + b.numel() * b.element_size() and b0 < a0 + a.numel() * a.element_size()


@contextlib.contextmanager
def collectives_as_local_copies():
    """Run the runtime's attention on one process: its collectives become local copies (no communication).

    What is left is exactly the runtime's own local work (packing, padding, concatenation, kernels), i.e. one
    rank's compute bound. Patches ``torch.distributed`` and the runtime modules for the duration only.
    """
    import torch.distributed as dist

    attention, comm = pkg("distrifusion.attention"), pkg("distrifusion.comm")

    def gather_single(output, inp, group=None, async_op=False):
        if not _overlaps(output, inp):
            output.view(-1, inp.numel()).copy_(inp.reshape(1, -1).expand(output.numel() // inp.numel(), -1))
        return _DoneWork() if async_op else None

    def all_gather(tensor_list, tensor, group=None, async_op=False):
        for out in tensor_list:
            if not _overlaps(out, tensor):
                out.copy_(tensor)
        return _DoneWork() if async_op else None

    def all_to_all_single(output, inp, *args, group=None, async_op=False, **kwargs):
        output.copy_(inp)
        return _DoneWork() if async_op else None

    saved = [
        (attention, "_all_gather_single", attention._all_gather_single),
        (comm, "_all_gather_single", comm._all_gather_single),
        (dist, "all_gather", dist.all_gather),
        (dist, "all_to_all_single", dist.all_to_all_single),
    ]
    attention._all_gather_single = gather_single
    comm._all_gather_single = gather_single
    dist.all_gather = all_gather
    dist.all_to_all_single = all_to_all_single
    try:
        yield
    finally:
        for module, name, value in saved:
            setattr(module, name, value)


def local_runtime(mode: str, *, parts, group_rank: int, batch: int, cfg, device, dtype, kv_dtype: str, num_layers: int):
    """The runtime's ``AttentionRuntime`` for one rank of ``len(parts)``, with no process group (see above)."""
    attention = pkg("distrifusion.attention")
    runtime = attention.AttentionRuntime(
        mode,
        group=None,
        kv_group=None,
        group_rank=group_rank,
        group_size=len(parts),
        device=torch.device(device),
        num_layers=num_layers,
        kv_dtype=kv_dtype,
        comm_backend="builtin",
    )
    runtime.set_layout(parts, batch, cfg.num_heads, cfg.dim // cfg.num_heads, dtype)
    manager = getattr(runtime, "manager", None)
    buffer = getattr(manager, "buffer", None)
    if buffer is not None:  # stale K/V must hold numbers, not whatever the allocator left there
        if buffer.dtype.is_floating_point:
            buffer.normal_()
        else:
            buffer.random_(0, 112)  # fp8 e4m3 bit patterns of small finite values
    return runtime


@contextlib.contextmanager
def swapped_attention(model, make_fn: Callable[[int, Callable], Callable]):
    """Give every block ``make_fn(layer, original_attention_fn)`` for the duration."""
    originals = [block.self_attn.attention_fn for block in model.blocks]
    try:
        for layer, block in enumerate(model.blocks):
            block.self_attn.attention_fn = make_fn(layer, originals[layer])
        yield
    finally:
        for block, fn in zip(model.blocks, originals):
            block.self_attn.attention_fn = fn


@contextlib.contextmanager
def first_layers(model, count: int | None):
    """Run only the first ``count`` blocks (every block costs the same; callers scale the time back up)."""
    if not count or count >= len(model.blocks):
        yield len(model.blocks)
        return
    blocks = model.blocks
    model.blocks = torch.nn.ModuleList(list(blocks)[:count])
    try:
        yield count
    finally:
        model.blocks = blocks


# --------------------------------------------------------------------------------------------------------------
# timing and metrics
# --------------------------------------------------------------------------------------------------------------
def synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], object], *, warmup: int, reps: int, device) -> list[float]:
    """Seconds per call: CUDA events on a GPU, the host clock on CPU; ``warmup`` untimed calls first."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(reps):
        if torch.device(device).type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000.0)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return times


def median(values: Iterable[float]) -> float:
    values = list(values)
    return statistics.median(values) if values else float("nan")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ in float64; NaN anywhere gives inf."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return float("inf")
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def psnr(a: torch.Tensor, ref: torch.Tensor) -> float:
    """PSNR of ``a`` against ``ref`` with the reference's peak-to-peak range as the signal."""
    a, ref = a.detach().double().cpu(), ref.detach().double().cpu()
    mse = float(((a - ref) ** 2).mean())
    peak = float(ref.max() - ref.min())
    return float("inf") if mse == 0 else 10 * math.log10(peak * peak / mse)


def peak_memory_gib(device) -> float:
    if torch.device(device).type != "cuda":
        return float("nan")
    return torch.cuda.max_memory_allocated(device) / 2**30


def reset_peak(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


@contextlib.contextmanager
def sdpa_backend(name: str):
    """Force one SDPA backend for both models (``sdpa`` = PyTorch's own choice)."""
    if name in ("sdpa", "auto", None):
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "math": SDPBackend.MATH,
    }[name]
    with sdpa_kernel(backend):
        yield


# --------------------------------------------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------------------------------------------
def fmt(value, spec: str = ".3f") -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return "inf" if value == float("inf") else "-"
    if isinstance(value, (int, float)):
        return format(value, spec)
    return str(value)


def table(headers: list[str], rows: list[list]) -> str:
    """Markdown table (pastes into the README as is)."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = lambda row: "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |"  # noqa: E731
    return "\n".join([line(headers), "| " + " | ".join("-" * w for w in widths) + " |", *map(line, cells)])


class Recorder:
    """Collects results; writes ``results.json`` and mirrors every printed line to ``log.txt`` under ``--out``."""

    def __init__(self, out_dir: str | None, name: str):
        self.started = time.monotonic()
        self.out = Path(out_dir) if out_dir else None
        self.name = name
        self.results: dict = {"meta": environment()}
        if self.out:
            self.out.mkdir(parents=True, exist_ok=True)
            self._log = open(self.out / f"{name}.log", "a", buffering=1)
        else:
            self._log = None

    def say(self, *parts) -> None:
        text = " ".join(str(p) for p in parts)
        print(text, flush=True)
        if self._log:
            self._log.write(text + "\n")

    def over_time(self, what: str, limit_s: float) -> bool:
        """Whether the run has spent its ``--time-limit`` (seconds since this recorder began); if so, ``what`` is
        said and recorded as skipped."""
        spent = time.monotonic() - self.started
        if spent > limit_s:
            self.say(f"SKIP {what}: {spent:.0f} s spent, over --time-limit {limit_s:.0f} s")
            self.results.setdefault("failures", []).append(f"skipped {what} (time limit)")
            return True
        return False

    def save(self) -> None:
        if self.out:
            (self.out / f"{self.name}.json").write_text(json.dumps(self.results, indent=1, default=str))


def environment(cuda: bool = True) -> dict:
    info = {"torch": torch.__version__, "python": sys.version.split()[0], "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    try:
        import diffusers

        info["diffusers"] = diffusers.__version__
    except ImportError:
        info["diffusers"] = None
    if cuda and torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        info["cuda"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version()
    return info


# --------------------------------------------------------------------------------------------------------------
# process groups (the product's ranks join through the worker group; the benchmarks start their own)
# --------------------------------------------------------------------------------------------------------------
def init_process_group(
    config,
    rank: int,
    device: str | torch.device,
    *,
    init_method: str | None = None,
    master_addr: str = "127.0.0.1",
    master_port: int | None = None,
    timeout_s: float = 600.0,
) -> str:
    """Join the default process group (NCCL on CUDA, gloo on CPU); returns the backend name.

    ``init_method`` wins; else ``master_addr:master_port`` over TCP; else torchrun's ``env://``
    (``MASTER_ADDR``/``MASTER_PORT``). Collectives that wait longer than ``timeout_s`` fail.
    """
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    backend = "nccl" if device.type == "cuda" else "gloo"
    if dist.is_initialized():
        if dist.get_world_size() != config.world_size or dist.get_rank() != rank:
            raise RuntimeError(
                f"world size: this process already joined a group as rank {dist.get_rank()} of "
                f"{dist.get_world_size()}, not rank {rank} of {config.world_size}; restart the workers."
            )
        return dist.get_backend()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if init_method is None:
        init_method = f"tcp://{master_addr}:{master_port}" if master_port is not None else "env://"
    dist.init_process_group(
        backend,
        init_method=init_method,
        rank=rank,
        world_size=config.world_size,
        timeout=timedelta(seconds=timeout_s),
    )
    return backend
