"""ComfyUI's memory management before our model loads (GPUs = 1: the model lives in ComfyUI's process): the Sampler
asks ``comfy.model_management.free_memory`` for the planned bytes, so a native model loaded earlier in the graph is
unloaded when the device would otherwise be short. Real ComfyUI (``--cpu``), no server: the Loader and Sampler nodes
called as ComfyUI calls them, on a stand-in 'card' whose free memory is what ComfyUI's models leave of it."""

from __future__ import annotations

import subprocess
import textwrap

from comfy_harness import COMFYUI_PYTHON, TINY_MODEL, loader_inputs
from test_adapters import PACK_IN_COMFYUI


def test_sampler_asks_comfyui_to_free_the_planned_bytes_and_a_native_model_is_unloaded(comfy_base):
    models = comfy_base / "models" / "diffusion_models"
    code = PACK_IN_COMFYUI + textwrap.dedent(f"""
        import comfy.model_management as mm, comfy.sd, folder_paths
        folder_paths.add_model_folder_path("diffusion_models", {str(models)!r})
        loader_mod = import_module(PACK + ".nodes.loader")
        sampler_mod = import_module(PACK + ".nodes.sampler")
        runtime_mod = import_module(PACK + ".nodes.runtime")
        plan_memory = import_module(PACK + ".distrifusion.memory_plan").plan_memory
        inspect = import_module(PACK + ".wanvideo.loading").inspect_wan_checkpoint

        # a native Wan model loaded first, as ComfyUI's own loader and KSampler leave it
        native = comfy.sd.load_diffusion_model({str(models / TINY_MODEL)!r})
        mm.load_models_gpu([native])
        assert any(m.model is native for m in mm.current_loaded_models)
        native_bytes = native.model_size()

        calls = []
        original_free = mm.free_memory
        def recording_free(memory_required, device, keep_loaded=[]):
            calls.append((memory_required, str(device)))
            return original_free(memory_required, device, keep_loaded)
        mm.free_memory = recording_free

        inputs = {loader_inputs()!r}
        model, _ = loader_mod.OfficialDistriFusionModelLoader().load(**inputs)
        spec = model.settings.spec
        config = inspect(spec.model_path).config
        size = dict(width=32, height=32, length=5)
        planned = plan_memory(config, spec.parallel, (1, 16, 2, 4, 4), spec.precision, spec.quantization, check=False)
        assert planned.total_bytes > 0 and planned.weights_bytes > 0
        # the card: what ComfyUI's loaded models leave free, short of our plan while the native model is loaded
        card = native_bytes + planned.total_bytes // 2
        mm.get_free_memory = lambda dev=None, torch_free_too=False: (
            (lambda free: (free, 0) if torch_free_too else free)(
                card - sum(m.model_loaded_memory() for m in mm.current_loaded_models)))

        context = [[torch.randn(1, 12, 4096, generator=torch.Generator().manual_seed(0)), {{}}]]
        settings = dict(steps=2, cfg=5.0, shift=5.0, seed=0, sampler="euler", scheduler="simple", denoise=1.0,
                        sync_frequency=0, **size)
        node = sampler_mod.OfficialDistriFusionSampler()
        (first,) = node.sample(model, context, context, **settings)
        assert calls == [(planned.total_bytes, "cpu")], (calls, planned.total_bytes)
        assert not any(m.model is native for m in mm.current_loaded_models), "the native model is still loaded"
        (second,) = node.sample(model, context, context, **settings)  # loaded: only what a job adds
        assert calls[1] == (planned.total_bytes - planned.weights_bytes, "cpu"), calls
        assert torch.equal(first["samples"], second["samples"])
        runtime_mod.RUNTIMES.release("test done")
        print("ok", calls)
    """)
    result = subprocess.run([COMFYUI_PYTHON, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-4000:] + result.stdout[-2000:]
