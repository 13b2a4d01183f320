"""🎯 Official DistriFusion Model Loader: validates the topology and the checkpoint; the Sampler starts (or reuses)
the worker group once it has checked the video size against it."""

from __future__ import annotations

import logging
import os

from ..distrifusion.config import COMM_BACKENDS, KV_DTYPES, PARALLEL_MODES, SPLIT_MODES, ParallelConfig
from ..distrifusion.settings import RuntimeSpec, check_weights
from ..distrifusion.sharded_weights import WEIGHTS
from ..distrifusion.status import warn_if_official_missing
from ..distrifusion.validation import check_spec_before_start
from ..wanvideo.attention import ATTENTION_BACKENDS
from ..wanvideo.errors import WanDistriFusionError
from . import _comfy
from ._widgets import bool_widget, combo_widget, int_widget, socket
from .lora import LORA_CHAIN_TYPE, with_loras
from .runtime import MODEL_TYPE, DistriFusionModel, RuntimeSettings, master_address

logger = logging.getLogger(__name__)

CATEGORY = "WanVideoWrapper/Official DistriFusion"
PRECISIONS = ("bf16", "fp16", "fp32")
QUANTIZATIONS = ("disabled", "fp8_e4m3fn", "fp8_e5m2")
GPU_ONLY_ATTENTION = ("flash4", "flash3", "sage")
MAX_GPUS = 8
NO_SECOND_MODEL = "none"


TOOLTIPS = {
    "model": "Wan checkpoint from ComfyUI/models/diffusion_models: Wan 2.1 T2V 1.3B/14B, I2V, FLF2V; Wan 2.2 TI2V 5B; "
    "Wan 2.2 A14B T2V/I2V (here the high-noise expert, the low-noise one in second_model). Original, ComfyUI-repackaged "
    "and diffusers key layouts load; the size is read from the weights.",
    "precision": "Compute dtype on every rank. bf16 is the usual choice on recent GPUs; fp32 is exact but twice the "
    "memory and much slower.",
    "quantization": "Weight storage. fp8 halves the weights' memory (14B: ~14 GB instead of ~28 GB per rank). "
    "fp8_e4m3fn on GPUs with fp8 tensor cores (RTX 40xx, L40, H100/H200, Blackwell) multiplies in fp8 (scaled matmul, "
    "activations scaled per token; checked once per GPU), faster than bf16; elsewhere, and for fp8_e5m2, each layer "
    "is upcast to the compute dtype when it runs.",
    "gpus": "Local GPUs to use, one worker process each (GPUs 0..N-1 of this machine). 1 runs in the ComfyUI process "
    "without workers. With ComfyUI started with --cpu: this many CPU processes (gloo).",
    "patch_size": "Granularity of the split in pixels: the video is cut into slabs on multiples of this and the slabs "
    "are balanced over the ranks. A multiple of 16 for Wan (8x VAE x 2x2 patchify). When the slabs of a frame differ "
    "in size (720p has 45 token rows), the larger ones go to different ranks frame by frame, so every rank gets "
    "about the same number of tokens.",
    "patch_overlap": "Displaced mode only: pixels of each neighbouring slab a rank also recomputes fresh, so attention "
    "to the nearest tokens is never stale. Rounded up to whole 16 px tokens. 0 is pure DistriFusion (fastest).",
    "split_mode": "How the token grid is cut across ranks: spatial = by token rows (high resolution), temporal = by "
    "latent frames (long clips), spatiotemporal = a grid of both.",
    "world_size": "Total ranks across all hosts; 0 = same as GPUs. Larger than GPUs means the other ranks run on other "
    "hosts, started there with `python cli.py worker` (set MASTER_ADDR / MASTER_PORT in ComfyUI's environment to an "
    "address of this machine they can reach).",
    "rank": "First rank of this host's GPUs: keep 0 on the machine that runs ComfyUI (it drives the job); other hosts "
    "take the ranks after it.",
    "parallel_mode": "displaced = DistriFusion: other ranks' K/V from the previous step, exchanged while computing "
    "(fastest, slightly approximate). sync = exact, gathers all K/V every layer. ulysses = exact head-parallel "
    "all-to-all (heads must divide by the ranks: 12 for 1.3B, 40 for 14B). auto = per job: exact when fewer than 8 steps "
    "would use stale K/V (few-step / distilled runs: the stale steps' error would save ~2%), else displaced if its stale "
    "K/V fits the GPUs' free memory; the exact mode is sync, or ulysses where only it fits. The Status node says what "
    "it picked and why.",
    "cfg_parallel": "Run the positive and the negative prompt on two halves of the ranks at once (exact; needs an even "
    "world size); each half splits the video over its ranks. Needs a Sampler cfg other than 1: at cfg 1 there is no "
    "negative prompt to run, and the Sampler refuses rather than leave half the ranks idle (turn this off there).",
    "warmup_steps": "Displaced mode: the first steps run fully synchronous (exact) before stale K/V is used, as in "
    "DistriFusion. More = closer to the single-GPU result, slower.",
    "attention": "Self-attention kernel on every rank. auto = FlashAttention-4 on Hopper/Blackwell GPUs when it is "
    "installed (pip install -r requirements_flash4.txt; the fastest kernel there), else sdpa; the Status node shows "
    "which one runs. sdpa = PyTorch scaled_dot_product_attention (picks cuDNN / Flash / memory-efficient kernels "
    "itself; works everywhere, CPU included). flash4 = FlashAttention-4 (pip install -r requirements_flash4.txt; "
    "Hopper or Blackwell). flash3 = FlashAttention-3 (built from its hopper/ folder; Hopper). sage = SageAttention "
    "(pip install sageattention; 8-bit Q/K, slightly approximate). The last three need CUDA GPUs.",
    "kv_dtype": "dtype of the stale K/V buffers the displaced mode keeps and exchanges. auto = compute dtype; "
    "fp8_e4m3fn halves their memory and traffic (14B 720p on 80 GB cards needs it).",
    "comm_backend": "Who exchanges the K/V: official = MIT-HAN-Lab distrifuser's PatchParallelismCommManager (needs "
    "requirements_official_distrifusion.txt), builtin = the pack's own, auto = official when it imports, else "
    "builtin. Same algorithm and results.",
    "second_model": "Wan 2.2 A14B only: the low-noise expert, loaded beside the model widget's high-noise expert on the "
    "same GPUs (both stay loaded: 2 x 14 GB per GPU in fp8), so switching costs no reload. The second output runs it: "
    "as in ComfyUI's template, the first Sampler (Advanced) runs the high-noise expert for steps 0-10 and returns "
    "with leftover noise, the second continues with the low-noise expert from step 10. none for every other model.",
    "weights": "Where the model's weights live. replicated = every GPU holds the whole model (fastest; 14B: ~28 GB "
    "per GPU in bf16). sharded = each of the N GPUs stores 1/N of every transformer block, the block gathered from "
    "all GPUs just before it runs while the previous one computes (14B on 2 x 24 GB cards; exact, same result; costs "
    "the gathers' traffic, small over NVLink). auto = sharded when a full copy would take more than 70% of the "
    "smallest GPU's free memory, else replicated (the Status node says which). Needs GPUs >= 2 for sharded.",
    "offload": "Keep the transformer blocks in pinned host (CPU) memory and copy each to the GPU just before it runs, "
    "the next one in flight while the current one computes: each GPU then holds two blocks instead of the whole model "
    "(14B bf16: ~1.7 GB instead of ~27 GB), so the 14B model runs on 24 GB cards. Needs the blocks' size in free RAM "
    "per GPU (14B: 26 GB bf16, 13 GB fp8). Off: every GPU holds the whole model (fastest when it fits).",
    "compile": "torch.compile the transformer blocks around attention on every rank that can: CUDA GPUs with Triton "
    "(Linux CUDA builds of torch ship it) and a C compiler. On the CPU, or without them, the ranks run eager and the "
    "Status node says so (compile off (why)). On by default: measured in ComfyUI on one H200 with FlashAttention-4, "
    "later prompts take 0.76-0.81x the time of ComfyUI's own Wan nodes (eager: 0.81-0.84x). Each new model and video "
    "size compiles in the background while its first steps run eager (the console says when it is done; 14B 720p: "
    "about one step, 1.3B 480p: 9-15 s), so the first prompt is not held up by it; steps then switch to the "
    "compiled blocks, which round differently from eager (bf16 round-off), so a rerun with the same seed can differ "
    "from the first prompt at that level. Set WDF_COMPILE_IN_BACKGROUND=0 before starting ComfyUI to compile at the "
    "first step instead. Turn it off when compiling fails.",
}

LORA_TOOLTIP = (
    "Optional LoRA chain (🎯 Official DistriFusion LoRA nodes) for the model widget's file (Wan 2.2 A14B: the "
    "high-noise expert): merged into the weights on every rank; a changed chain or strength re-merges on the running "
    "workers without restarting them."
)
SECOND_LORA_TOOLTIP = (
    "Optional LoRA chain for the second model (Wan 2.2 A14B's low-noise expert), e.g. the low-noise twin of a 4-step "
    "LoRA; each expert keeps its own chain, and a change re-merges only that expert on the running workers."
)


class OfficialDistriFusionModelLoader:
    """Loads a Wan 2.1 / 2.2 checkpoint (or Wan 2.2 A14B's two experts) on a group of worker processes, one per GPU, kept alive between prompts."""

    @classmethod
    def INPUT_TYPES(cls):
        tip = TOOLTIPS
        return {
            "required": {
                "model": combo_widget(_comfy.diffusion_model_files(), None, tip["model"]),
                "precision": combo_widget(PRECISIONS, "bf16", tip["precision"]),
                "quantization": combo_widget(QUANTIZATIONS, "disabled", tip["quantization"]),
                "gpus": int_widget(1, 1, MAX_GPUS, tip["gpus"]),
                "patch_size": int_widget(64, 16, 128, tip["patch_size"], step=16),
                "patch_overlap": int_widget(0, 0, 32, tip["patch_overlap"], step=4),
                "split_mode": combo_widget(SPLIT_MODES, "spatial", tip["split_mode"]),
                "world_size": int_widget(0, 0, 64, tip["world_size"]),
                "rank": int_widget(0, 0, 63, tip["rank"]),
                "parallel_mode": combo_widget(PARALLEL_MODES, "auto", tip["parallel_mode"]),
                "cfg_parallel": bool_widget(False, tip["cfg_parallel"]),
                "warmup_steps": int_widget(4, 0, 100, tip["warmup_steps"]),
                "attention": combo_widget(ATTENTION_BACKENDS, "auto", tip["attention"]),
                "kv_dtype": combo_widget(KV_DTYPES, "auto", tip["kv_dtype"]),
                "comm_backend": combo_widget(COMM_BACKENDS, "auto", tip["comm_backend"]),
                "compile": bool_widget(True, tip["compile"]),
            },
            "optional": {
                "lora": socket(LORA_CHAIN_TYPE, LORA_TOOLTIP),
                "second_lora": socket(LORA_CHAIN_TYPE, SECOND_LORA_TOOLTIP),
                "second_model": combo_widget(
                    [NO_SECOND_MODEL, *_comfy.diffusion_model_files()], NO_SECOND_MODEL, tip["second_model"]
                ),
                "weights": combo_widget(WEIGHTS, "auto", tip["weights"]),
                "offload": bool_widget(False, tip["offload"]),
            },
        }

    RETURN_TYPES = (MODEL_TYPE, MODEL_TYPE)
    RETURN_NAMES = ("model", "second model")
    OUTPUT_TOOLTIPS = (
        "Handle of the running worker group with the model widget's file; connect it to a DistriFusion Sampler.",
        "The same worker group running the second model (Wan 2.2 A14B's low-noise expert): connect it to the second "
        "Sampler (Advanced). No reload between the two.",
    )
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = (
        "Loads a Wan 2.1 / 2.2 model (or Wan 2.2 A14B's two experts) on several GPUs with DistriFusion patch parallelism. The workers stay "
        "loaded between prompts and are released by Unload Models."
    )

    @classmethod
    def IS_CHANGED(cls, model, second_model=NO_SECOND_MODEL, **kwargs):
        stamps = []
        for name in (model, second_model):
            if name == NO_SECOND_MODEL:
                continue
            try:
                stat = os.stat(_comfy.diffusion_model_path(name))
            except (OSError, WanDistriFusionError):
                return ""
            stamps.append(f"{stat.st_size}-{stat.st_mtime_ns}")
        return "/".join(stamps)

    def load(self, compile=True, lora=None, second_lora=None, **widgets):
        """``widgets``: the inputs above by name (ComfyUI passes each as a keyword argument)."""
        warn_if_official_missing()
        settings = with_loras(build_settings(**widgets, compile_blocks=compile), lora, second_lora)
        spec = settings.spec
        check_spec_before_start(spec)
        # the Sampler starts the workers, after its checks of the video size
        return (DistriFusionModel(settings, 0), DistriFusionModel(settings, 1))


def build_settings(
    *,
    model: str,
    precision: str,
    quantization: str,
    gpus: int,
    patch_size: int,
    patch_overlap: int,
    split_mode: str,
    world_size: int,
    rank: int,
    parallel_mode: str,
    cfg_parallel: bool,
    warmup_steps: int,
    attention: str,
    kv_dtype: str,
    comm_backend: str,
    compile_blocks: bool = True,
    second_model: str = "none",
    weights: str = "auto",
    offload: bool = False,
    device: str | None = None,
    cuda_devices: int | None = None,
) -> RuntimeSettings:
    """Check the Loader's widgets against each other and this machine; raise naming the widget to change."""
    for widget, value, choices in (
        ("precision", precision, PRECISIONS),
        ("quantization", quantization, QUANTIZATIONS),
        ("attention", attention, ATTENTION_BACKENDS),
    ):
        if value not in choices:
            raise WanDistriFusionError(f"{widget}: {value!r} is unknown; choose one of {', '.join(choices)}.")
    if not 1 <= gpus <= MAX_GPUS:
        raise WanDistriFusionError(f"GPUs: {gpus} is out of range; use 1 to {MAX_GPUS}.")
    device = device or _comfy.comfy_device_type()
    if device == "cpu" and attention in GPU_ONLY_ATTENTION:
        raise WanDistriFusionError(
            f"attention: {attention} runs on CUDA GPUs only and ComfyUI computes on the CPU here (--cpu); choose auto "
            "or sdpa."
        )
    available = _comfy.local_cuda_devices() if cuda_devices is None else cuda_devices
    if device == "cuda" and gpus > available:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        where = f" (CUDA_VISIBLE_DEVICES={visible})" if visible else ""
        raise WanDistriFusionError(
            f"GPUs: {gpus} requested but this machine shows {available} CUDA device(s){where}; lower GPUs to "
            f"{max(available, 1)} (for more ranks, raise world size above GPUs and start the others on other hosts "
            "with `python cli.py worker`)."
        )
    world = world_size or gpus
    if world < gpus:
        raise WanDistriFusionError(
            f"world size: {world} is smaller than GPUs ({gpus}); set world size to 0 (= GPUs) or at least {gpus}."
        )
    if rank + gpus > world:
        raise WanDistriFusionError(
            f"rank: this host's ranks {rank}..{rank + gpus - 1} do not fit in world size {world}; keep rank 0 on the "
            "ComfyUI machine and raise world size."
        )
    check_weights(weights, world)
    parallel = ParallelConfig(
        world_size=world,
        split_mode=split_mode,
        patch_size=patch_size,
        patch_overlap=patch_overlap,
        mode=parallel_mode,
        cfg_parallel=bool(cfg_parallel),
        warmup_steps=warmup_steps,
        kv_dtype=kv_dtype,
        comm_backend=comm_backend,
        attention_backend=attention,
        compile_blocks=bool(compile_blocks),
    )
    path = _comfy.diffusion_model_path(model)
    addr, port = master_address()
    if world > gpus:
        remote = f"{rank + gpus}..{world - 1}"
        if addr.startswith("127.") or addr == "localhost" or port is None:
            raise WanDistriFusionError(
                f"world size: {world} ranks but {gpus} here, so ranks {remote} join from other hosts, which need an "
                "address of this machine: start ComfyUI with MASTER_ADDR=<this host's IP> MASTER_PORT=29500 in its "
                "environment, then on each other host run `python cli.py worker --rank <its first rank> "
                f"--world-size {world} --master-addr <this host's IP> --master-port 29500 --model <same file>`."
            )
        logger.info(
            "Ranks %s must join from other hosts: python cli.py worker --rank <first rank> --world-size %d "
            "--master-addr %s --master-port %d --model <same checkpoint>",
            remote,
            world,
            addr,
            port,
        )
    stat = os.stat(path)
    second_path = second_stamp = None
    if second_model != NO_SECOND_MODEL:
        second_path = _comfy.diffusion_model_path(second_model)
        second_stat = os.stat(second_path)
        second_stamp = (second_stat.st_size, second_stat.st_mtime_ns)
    spec = RuntimeSpec(
        path,
        parallel,
        precision=precision,
        quantization=quantization,
        device=device,
        local_ranks=gpus,
        first_rank=rank,
        master_addr=addr,
        master_port=port,
        second_model_path=second_path,
        weights=weights,
        offload=bool(offload),
    )
    return RuntimeSettings(
        model=model,
        model_stamp=(stat.st_size, stat.st_mtime_ns),
        spec=spec,
        second_model=None if second_path is None else second_model,
        second_model_stamp=second_stamp,
    )
