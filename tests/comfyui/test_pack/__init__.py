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


NODE_CLASS_MAPPINGS = {
    "DistriFusionTestConditioning": DistriFusionTestConditioning,
    "DistriFusionTestLatent": DistriFusionTestLatent,
    "DistriFusionTestSaveImage": DistriFusionTestSaveImage,
}
