"""The node adapters without a server: the pack imports without ComfyUI, and inside ComfyUI's python its
latent conversion is exactly ComfyUI's Wan21 format (what KSampler and VAE Decode use)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from comfy_harness import COMFYUI_PATH, COMFYUI_PYTHON, REPO_ROOT


def test_pack_imports_without_comfyui_and_without_side_effects():
    code = textwrap.dedent(f"""
        import importlib.util, sys, threading
        spec = importlib.util.spec_from_file_location(
            "ComfyUI-WanVideo-DistriFusion", {str(REPO_ROOT / "__init__.py")!r},
            submodule_search_locations=[{str(REPO_ROOT)!r}])
        pack = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = pack
        spec.loader.exec_module(pack)
        assert sorted(pack.NODE_CLASS_MAPPINGS) == [
            "OfficialDistriFusionModelLoader", "OfficialDistriFusionSampler", "OfficialDistriFusionStatus"]
        assert pack.WEB_DIRECTORY == "./web"
        leaked = [m for m in sys.modules if m.split(".")[0] in ("comfy", "folder_paths", "server", "nodes", "execution")]
        assert not leaked, leaked
        assert threading.active_count() == 1, threading.enumerate()
        import torch
        assert not torch.cuda.is_initialized()
        loader = pack.NODE_CLASS_MAPPINGS["OfficialDistriFusionModelLoader"]
        assert loader.INPUT_TYPES()["required"]["model"][0] == []  # no ComfyUI, no model folder
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


def test_latent_conversion_is_comfyuis_wan21_format():
    code = textwrap.dedent(f"""
        import importlib.util, sys, torch
        sys.path.insert(0, {COMFYUI_PATH!r})
        import comfy.options
        comfy.options.enable_args_parsing()
        sys.argv = [sys.argv[0], "--cpu"]
        import comfy.latent_formats
        spec = importlib.util.spec_from_file_location(
            "ComfyUI-WanVideo-DistriFusion", {str(REPO_ROOT / "__init__.py")!r},
            submodule_search_locations=[{str(REPO_ROOT)!r}])
        pack = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = pack
        spec.loader.exec_module(pack)
        from importlib import import_module
        sampler = import_module(spec.name + ".nodes.sampler")
        wan21 = comfy.latent_formats.Wan21()

        comfy_latent = torch.randn(1, 16, 3, 8, 10) * 2 + 0.5
        model_space = sampler.latent_to_model_space({{"samples": comfy_latent}}, wan21)
        assert torch.equal(model_space, wan21.process_in(comfy_latent))
        back = sampler.latent_from_model_space(model_space, wan21)
        assert torch.allclose(back, comfy_latent, atol=1e-5), (back - comfy_latent).abs().max()

        empty = torch.zeros(1, 16, 21, 60, 104)  # EmptyHunyuanLatentVideo 832x480x81: left as zeros
        assert torch.count_nonzero(sampler.latent_to_model_space({{"samples": empty}}, wan21)) == 0
        widened = sampler.latent_to_model_space({{"samples": torch.zeros(1, 4, 60, 104)}}, wan21)  # image latent
        assert widened.shape == (1, 16, 1, 60, 104) and torch.count_nonzero(widened) == 0
        for bad, needle in (({{"samples": torch.ones(1, 4, 2, 8, 8)}}, "4 channels"),
                            ({{"samples": torch.zeros(2, 16, 2, 8, 8)}}, "batch size 2"),
                            ({{"samples": torch.zeros(1, 16, 2, 8, 8), "noise_mask": torch.ones(1)}}, "noise mask")):
            try:
                sampler.latent_to_model_space(bad, wan21)
            except ValueError as error:
                assert needle in str(error) and str(error).startswith("latent:"), error
            else:
                raise AssertionError(needle)
        print("ok")
    """)
    result = subprocess.run([COMFYUI_PYTHON, "-c", code], capture_output=True, text=True, timeout=180)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]
