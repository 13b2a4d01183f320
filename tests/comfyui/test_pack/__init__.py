"""Test-only ComfyUI nodes, linked into the test server's custom_nodes (never shipped).

The real umT5 text encoder (5.7 B) cannot be made tiny through ``CLIPLoader``, so the tests feed the
Sampler random CONDITIONING of the right shape instead; and a random non-empty Wan LATENT.
"""

import torch

CATEGORY = "testing/DistriFusion"


def random_context(seed: int, tokens: int, width: int, text_len: int = 512) -> torch.Tensor:
    """Like the umT5 ``wan`` CLIP output: ``tokens`` real embeddings, zero-padded to ``text_len``."""
    generator = torch.Generator().manual_seed(seed)
    context = torch.zeros(1, max(text_len, tokens), width)
    context[:, :tokens] = torch.randn(1, tokens, width, generator=generator)
    return context


class DistriFusionTestConditioning:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "seed": ("INT", {"default": 0, "min": 0, "max": 2**31}),
                "tokens": ("INT", {"default": 12, "min": 1, "max": 512}),
                "width": ("INT", {"default": 4096, "min": 1, "max": 8192}),
            }
        }

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "make"
    CATEGORY = CATEGORY

    def make(self, seed, tokens, width):
        return ([[random_context(seed, tokens, width), {}]],)


class DistriFusionTestLatent:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "seed": ("INT", {"default": 0, "min": 0, "max": 2**31}),
                "width": ("INT", {"default": 128, "min": 16, "max": 4096, "step": 16}),
                "height": ("INT", {"default": 128, "min": 16, "max": 4096, "step": 16}),
                "length": ("INT", {"default": 5, "min": 1, "max": 1025, "step": 4}),
            }
        }

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "make"
    CATEGORY = CATEGORY

    def make(self, seed, width, height, length):
        generator = torch.Generator().manual_seed(seed)
        shape = (1, 16, (length - 1) // 4 + 1, height // 8, width // 8)
        return ({"samples": torch.randn(shape, generator=generator) * 1.5 + 0.25},)


class DistriFusionTestSaveImage:
    """An IMAGE saved exactly (float32 safetensors in the output folder), for comparisons beyond 8-bit PNG."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"images": ("IMAGE",), "filename": ("STRING", {"default": "images.safetensors"})}}

    RETURN_TYPES = ()
    FUNCTION = "save"
    OUTPUT_NODE = True
    CATEGORY = CATEGORY

    def save(self, images, filename):
        import folder_paths
        from safetensors.torch import save_file

        save_file({"images": images.float().contiguous()}, f"{folder_paths.get_output_directory()}/{filename}")
        return {"ui": {"tensors": [{"filename": filename, "subfolder": "", "type": "output"}]}}


class DistriFusionTestClipVision:
    """Stands in for CLIP Vision Encode (clip_vision_h is 632 M): random penultimate hidden states [1, tokens, 1280]."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "seed": ("INT", {"default": 0, "min": 0, "max": 2**31}),
                "tokens": ("INT", {"default": 257, "min": 1, "max": 1024}),
            }
        }

    RETURN_TYPES = ("CLIP_VISION_OUTPUT",)
    FUNCTION = "make"
    CATEGORY = CATEGORY

    def make(self, seed, tokens):
        import comfy.clip_vision

        output = comfy.clip_vision.Output()
        generator = torch.Generator().manual_seed(seed)
        output.penultimate_hidden_states = torch.randn(1, tokens, 1280, generator=generator)
        return (output,)


class DistriFusionTestImage:
    """A random RGB IMAGE batch [frames, height, width, 3] in [0, 1] (a start / end frame for the Wan image nodes)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "seed": ("INT", {"default": 0, "min": 0, "max": 2**31}),
                "width": ("INT", {"default": 32, "min": 8, "max": 4096}),
                "height": ("INT", {"default": 32, "min": 8, "max": 4096}),
                "frames": ("INT", {"default": 1, "min": 1, "max": 1025}),
            }
        }

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "make"
    CATEGORY = CATEGORY

    def make(self, seed, width, height, frames):
        generator = torch.Generator().manual_seed(seed)
        return (torch.rand(frames, height, width, 3, generator=generator),)


class DistriFusionTestTI2VLatent:
    """Stands in for Wan22ImageToVideoLatent with a start image (which needs the Wan 2.2 VAE): its LATENT, the first
    latent frame a random encoded image, the rest what that node leaves (process_out of zeros), noise_mask 0 there."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "seed": ("INT", {"default": 0, "min": 0, "max": 2**31}),
                "width": ("INT", {"default": 64, "min": 32, "max": 4096, "step": 32}),
                "height": ("INT", {"default": 64, "min": 32, "max": 4096, "step": 32}),
                "length": ("INT", {"default": 5, "min": 1, "max": 1025, "step": 4}),
            }
        }

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "make"
    CATEGORY = CATEGORY

    def make(self, seed, width, height, length):
        import comfy.latent_formats

        generator = torch.Generator().manual_seed(seed)
        latent = torch.zeros(1, 48, (length - 1) // 4 + 1, height // 16, width // 16)
        latent[:, :, :1] = torch.randn(1, 48, 1, height // 16, width // 16, generator=generator)
        mask = torch.ones(1, 1, latent.shape[2], latent.shape[3], latent.shape[4])
        mask[:, :, :1] = 0.0
        latent = comfy.latent_formats.Wan22().process_out(latent) * mask + latent * (1.0 - mask)
        return ({"samples": latent, "noise_mask": mask},)


class DistriFusionTestModelCalls:
    """MODEL in, MODEL out: logs the sigma of every diffusion-model call that reaches this point of the wrapper chain.
    Put before native EasyCache (tag "all": every call) and after it (tag "ran": the calls EasyCache let through)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "tag": ("STRING", {"default": "all"})}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"
    CATEGORY = CATEGORY

    def patch(self, model, tag):
        import logging

        import comfy.patcher_extension

        def record(executor, *args, **kwargs):
            options = args[-1] if isinstance(args[-1], dict) else kwargs.get("transformer_options") or args[-2]
            logging.info("distrifusion-test model call %s sigma=%r", tag, float(options["sigmas"][0]))
            return executor(*args, **kwargs)

        model = model.clone()
        model.add_wrapper_with_key(
            comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, f"distrifusion_test_calls_{tag}", record
        )
        return (model,)


class DistriFusionTestEasyCachePerCond:
    """Native EasyCache with one method changed: a skipped call returns ``x + diff`` per conditioning, out of place.

    ComfyUI 0.3.64's ``EasyCacheHolder.apply_cache_diff`` (1) adds every conditioning's cached difference to the
    whole batch, so with cond and uncond in one batch a skipped call returns ``x + diff_uncond + diff_cond`` for
    both (later ComfyUI adds each to its own item), and (2) adds in place to the model's input, which for a model
    run in fp32 is the very tensor ``calculate_denoised`` then reads (``xc = x.to(dtype)`` copies only for another
    dtype), so a skipped call's x0 becomes ``x'(1 - sigma)``. A bf16/fp16 model at cfg 1 behaves as this node does.
    Every decision and cache stays native's code."""

    @classmethod
    def INPUT_TYPES(cls):
        number = ("FLOAT", {"default": 0.2, "min": 0.0, "max": 3.0, "step": 0.01})
        return {
            "required": {
                "model": ("MODEL",),
                "reuse_threshold": number,
                "start_percent": number,
                "end_percent": number,
                "verbose": ("BOOLEAN", {"default": False}),
            }
        }

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"
    CATEGORY = CATEGORY

    def patch(self, model, reuse_threshold, start_percent, end_percent, verbose):
        import comfy.patcher_extension
        from comfy_extras import nodes_easycache as native

        class PerCondHolder(native.EasyCacheHolder):
            def apply_cache_diff(self, x, uuids):
                if self.first_cond_uuid in uuids:
                    self.total_steps_skipped += 1
                per_item = x.shape[0] // len(uuids)
                items = [x[i * per_item : (i + 1) * per_item] for i in range(len(uuids))]
                return torch.cat([item + self.uuid_cache_diffs[uuid].to(x.device) for item, uuid in zip(items, uuids)])

            def clone(self):
                copy = PerCondHolder(*self.settings)
                copy.settings = self.settings
                return copy

        holder = PerCondHolder(reuse_threshold, start_percent, end_percent, 8, False, verbose)
        holder.settings = (reuse_threshold, start_percent, end_percent, 8, False, verbose)
        model = model.clone()
        model.model_options["transformer_options"]["easycache"] = holder
        kinds = comfy.patcher_extension.WrappersMP
        model.add_wrapper_with_key(kinds.OUTER_SAMPLE, "easycache", native.easycache_sample_wrapper)
        model.add_wrapper_with_key(kinds.CALC_COND_BATCH, "easycache", native.easycache_calc_cond_batch_wrapper)
        model.add_wrapper_with_key(kinds.DIFFUSION_MODEL, "easycache", native.easycache_forward_wrapper)
        return (model,)


NODE_CLASS_MAPPINGS = {
    "DistriFusionTestEasyCachePerCond": DistriFusionTestEasyCachePerCond,
    "DistriFusionTestModelCalls": DistriFusionTestModelCalls,
    "DistriFusionTestConditioning": DistriFusionTestConditioning,
    "DistriFusionTestLatent": DistriFusionTestLatent,
    "DistriFusionTestSaveImage": DistriFusionTestSaveImage,
    "DistriFusionTestClipVision": DistriFusionTestClipVision,
    "DistriFusionTestImage": DistriFusionTestImage,
    "DistriFusionTestTI2VLatent": DistriFusionTestTI2VLatent,
}
