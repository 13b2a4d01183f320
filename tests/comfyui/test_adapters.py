"""The node adapters without a server: the pack imports without ComfyUI, and inside ComfyUI's python its
latent conversion is exactly ComfyUI's Wan21 format (what KSampler and VAE Decode use)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from comfy_harness import COMFYUI_PATH, COMFYUI_PYTHON, REPO_ROOT

PACK_IN_COMFYUI = textwrap.dedent(f"""
    import importlib.util, sys, torch
    from importlib import import_module
    sys.path.insert(0, {COMFYUI_PATH!r})
    import comfy.options
    comfy.options.enable_args_parsing()
    sys.argv = [sys.argv[0], "--cpu"]
    PACK = "ComfyUI-WanVideo-DistriFusion"
    spec = importlib.util.spec_from_file_location(
        PACK, {str(REPO_ROOT / "__init__.py")!r}, submodule_search_locations=[{str(REPO_ROOT)!r}])
    sys.modules[PACK] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sys.modules[PACK])
""")
"""Code that imports ComfyUI (``--cpu``) and then this pack under a hyphenated name, as ComfyUI does."""


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
            "OfficialDistriFusionEasyCache", "OfficialDistriFusionLora", "OfficialDistriFusionModelLoader",
            "OfficialDistriFusionSampler",
            "OfficialDistriFusionSamplerAdvanced", "OfficialDistriFusionStatus", "OfficialDistriFusionVAEDecode"]
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
    code = PACK_IN_COMFYUI + textwrap.dedent("""
        import comfy.latent_formats
        sampler = import_module(PACK + ".nodes.sampler")
        WanConfig = import_module(PACK + ".wanvideo.model").WanConfig
        wan21 = comfy.latent_formats.Wan21()
        t2v = WanConfig()

        def to_model(latent, latent_format=wan21, config=t2v):
            samples, mask = sampler.latent_to_model_space(latent, latent_format, config)
            assert mask is latent.get("noise_mask")
            return samples

        comfy_latent = torch.randn(1, 16, 3, 8, 10) * 2 + 0.5
        model_space = to_model({"samples": comfy_latent})
        assert torch.equal(model_space, wan21.process_in(comfy_latent))
        back = sampler.latent_from_model_space(model_space, wan21)
        assert torch.allclose(back, comfy_latent, atol=1e-5), (back - comfy_latent).abs().max()

        empty = torch.zeros(1, 16, 21, 60, 104)  # EmptyHunyuanLatentVideo 832x480x81: left as zeros
        assert torch.count_nonzero(to_model({"samples": empty})) == 0
        widened = to_model({"samples": torch.zeros(1, 4, 60, 104)})  # image latent
        assert widened.shape == (1, 16, 1, 60, 104) and torch.count_nonzero(widened) == 0
        for bad, needle in (({"samples": torch.ones(1, 4, 2, 8, 8)}, "4 channels"),
                            ({"samples": torch.zeros(2, 16, 2, 8, 8)}, "batch size 2"),
                            ({"samples": torch.zeros(1, 16, 2, 8, 8), "noise_mask": torch.ones(1)}, "noise mask")):
            try:
                to_model(bad)
            except ValueError as error:
                assert needle in str(error) and str(error).startswith("latent:"), error
            else:
                raise AssertionError(needle)
        # Wan 2.2 TI2V 5B: 48 channels through the Wan22 format, its noise mask passed on
        ti2v = WanConfig(in_dim=48, out_dim=48, dim=256, num_heads=2)
        wan22 = comfy.latent_formats.Wan22()
        latent = {"samples": torch.randn(1, 48, 2, 4, 4), "noise_mask": torch.ones(1, 1, 2, 4, 4)}
        assert torch.equal(to_model(latent, wan22, ti2v), wan22.process_in(latent["samples"]))
        try:
            to_model({"samples": torch.randn(1, 16, 2, 4, 4)}, wan22, ti2v)
        except ValueError as error:
            assert "48" in str(error) and "Wan22ImageToVideoLatent" in str(error), error
        else:
            raise AssertionError("16 channels for the 5B")
        print("ok")
    """)
    result = subprocess.run([COMFYUI_PYTHON, "-c", code], capture_output=True, text=True, timeout=180)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


def test_every_ksampler_sampler_runs_through_the_worker_model():
    """Each of KSampler's sampler names (and Wan's unipc / dpm++) integrates through ``WorkerModel`` with a
    stand-in forward session: one callback per step, a finite latent, and the CFG++ samplers get the
    unguided prediction they read."""
    code = PACK_IN_COMFYUI + textwrap.dedent("""
        import comfy.samplers
        cs = import_module(PACK + ".nodes.comfy_sampling")
        nodes_comfy = import_module(PACK + ".nodes._comfy")

        class Session:  # flow of a made-up "model" whose clean latent is target
            def __init__(self, uncond):
                self.last_uncond, self.uncond, self.calls = None, uncond, 0
            def __call__(self, x, t):
                self.calls += 1
                sigma = t / 1000
                flow = (x - target) / max(sigma, 1e-3)
                self.last_uncond = flow * 0.9 if self.uncond else None
                return flow

        target = torch.randn(1, 16, 2, 4, 6, generator=torch.Generator().manual_seed(0))
        names = nodes_comfy.sampler_names(cs.WAN_SOLVERS)
        assert names[: len(comfy.samplers.KSampler.SAMPLERS)] == list(comfy.samplers.KSampler.SAMPLERS)
        failures = []
        for name in names:
            ms = cs.model_sampling_sd3(3.0)
            sigmas = cs.ksampler_sigmas(ms, name, "simple", 4, 1.0)
            latent = torch.zeros_like(target)
            noise = nodes_comfy.prepare_noise(latent, 1)
            steps = []
            session = Session(cs.needs_uncond(name))
            try:
                out = cs.sample(session, model_sampling=ms, sampler=name, sigmas=sigmas, noise=noise,
                                latent_image=latent, cfg=2.0, seed=1,
                                callback=lambda i, x0, x, total: steps.append((i, total)))
            except Exception as error:
                failures.append(f"{name}: {type(error).__name__}: {error}")
                continue
            if out.shape != target.shape or not torch.isfinite(out).all():
                failures.append(f"{name}: bad output")
            total = len(sigmas) - 1
            if name not in ("dpm_adaptive", "dpm_fast") and [i for i, _ in steps] != list(range(total)):
                failures.append(f"{name}: callbacks {steps} for {total} steps")
            if session.calls < total and name != "dpm_adaptive":
                failures.append(f"{name}: {session.calls} model calls for {total} steps")
        assert not failures, failures
        assert len(cs.ksampler_sigmas(cs.model_sampling_sd3(3.0), "uni_pc", "simple", 4, 1.0)) == 5
        print("ok", len(names))
    """)
    result = subprocess.run([COMFYUI_PYTHON, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-4000:] + result.stdout[-2000:]


def test_wan_solvers_hand_the_step_callback_the_x0_of_the_latest_model_call():
    """What the preview decodes for ``unipc`` / ``dpm++``: x0 = x - sigma * v of the step's model call (flow
    matching), computed here from the calls the solver made, as KSampler's samplers pass ``denoised``."""
    code = PACK_IN_COMFYUI + textwrap.dedent("""
        cs = import_module(PACK + ".nodes.comfy_sampling")
        sampling = cs.model_sampling_sd3(3.0)
        for name in ("unipc", "dpm++"):
            calls, seen = [], []
            def forward(x, t):
                v = torch.sin(x * 3 + t / 1000)  # any smooth flow
                calls.append((x.clone(), t / 1000, v.clone()))
                return v
            sigmas = cs.sampler_sigmas(sampling, name, "simple", 4, 3.0, 1.0)
            noise = torch.randn(1, 16, 2, 4, 4, generator=torch.Generator().manual_seed(0))
            cs.sample(forward, model_sampling=sampling, sampler=name, sigmas=sigmas, noise=noise,
                      latent_image=torch.zeros_like(noise), cfg=5.0, seed=0,
                      callback=lambda i, denoised, x, total: seen.append((i, denoised, total)))
            assert [s[0] for s in seen] == [0, 1, 2, 3] and {s[2] for s in seen} == {4}, name
            assert len(calls) == 4, name
            for (i, denoised, _), (x, sigma, v) in zip(seen, calls):
                assert denoised is not None, name
                expected = x - sigma * v
                assert torch.allclose(denoised, expected, rtol=0, atol=1e-6), (name, i)
        print("ok")
    """)
    result = subprocess.run([COMFYUI_PYTHON, "-c", code], capture_output=True, text=True, timeout=180)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


def test_image_channels_are_comfyuis_wan21_concat_cond():
    """The I2V channels ``y`` the Sampler sends equal what ComfyUI's own ``WAN21.concat_cond`` builds from a
    conditioning's ``concat_latent_image`` / ``concat_mask`` (resized and centre-cropped to the latent, per-chunk
    ``process_latent_in``, 1 - mask, channel mean, frame padding, no image, no mask, a wider image)."""
    code = PACK_IN_COMFYUI + textwrap.dedent("""
        import types
        import comfy.latent_formats, comfy.model_base
        conditioning = import_module(PACK + ".nodes.wan_conditioning")
        WanConfig = import_module(PACK + ".wanvideo.model").WanConfig
        wan21 = comfy.latent_formats.Wan21()
        gen = torch.Generator().manual_seed(0)

        def comfy_concat(config, shape, options):
            model = types.SimpleNamespace(
                diffusion_model=types.SimpleNamespace(patch_embedding=types.SimpleNamespace(
                    weight=torch.zeros(8, config.in_dim, 1, 2, 2))),
                latent_format=wan21, process_latent_in=wan21.process_in, image_to_video=config.model_type == "i2v")
            return comfy.model_base.WAN21.concat_cond(model, noise=torch.zeros(shape), device="cpu", **options)

        i2v = WanConfig(in_dim=36, out_dim=16, model_type="i2v", dim=256, num_heads=2)
        a14b = WanConfig(in_dim=36, out_dim=16, version="2.2", dim=256, num_heads=2)
        shape = (1, 16, 3, 6, 8)
        cases = {
            "start image, 1-channel mask (WanImageToVideo)": dict(
                concat_latent_image=torch.randn(1, 16, 3, 6, 8, generator=gen),
                concat_mask=torch.cat([torch.zeros(1, 1, 1, 6, 8), torch.ones(1, 1, 2, 6, 8)], dim=2)),
            "other size, fewer mask frames, 4-channel mask": dict(
                concat_latent_image=torch.randn(1, 16, 3, 9, 10, generator=gen) * 3,
                concat_mask=torch.rand(1, 4, 2, 9, 10, generator=gen)),
            "3-channel mask averaged": dict(
                concat_latent_image=torch.randn(1, 16, 3, 6, 8, generator=gen),
                concat_mask=torch.rand(1, 3, 3, 6, 8, generator=gen)),
            "image without a mask": dict(concat_latent_image=torch.randn(1, 16, 3, 3, 4, generator=gen)),
            "no image": dict(),
            "wider image cut to 32 channels": dict(
                concat_latent_image=torch.randn(1, 32, 3, 6, 8, generator=gen),
                concat_mask=torch.rand(1, 1, 3, 6, 8, generator=gen)),
        }
        for config in (i2v, a14b):
            for name, options in cases.items():
                theirs = comfy_concat(config, shape, options)
                if config is a14b and name.startswith("wider"):  # ComfyUI passes 32 channels on; the model fails
                    assert theirs.shape[1] == 32
                    try:
                        conditioning.image_channels(options, config, shape, wan21, "positive")
                    except ValueError as error:
                        assert str(error).startswith("positive:") and "WanImageToVideo" in str(error), error
                        continue
                    raise AssertionError("a 32-channel image for a 20-channel model")
                ours = conditioning.image_channels(options, config, shape, wan21, "positive")
                assert ours.shape == theirs.shape == (1, 20, 3, 6, 8), (name, ours.shape, theirs.shape)
                assert torch.equal(ours, theirs), (config.variant, name, (ours - theirs).abs().max())
        t2v = WanConfig(dim=256, num_heads=2)
        assert conditioning.image_channels(cases["no image"], t2v, shape, wan21, "positive") is None
        assert comfy_concat(t2v, shape, {}) is None
        print("ok")
    """)
    result = subprocess.run([COMFYUI_PYTHON, "-c", code], capture_output=True, text=True, timeout=180)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]
