"""ComfyUI entry point of ComfyUI-WanVideo-DistriFusion: node mappings, web directory, server routes.

Importing this package has no side effects beyond defining the mappings: no CUDA, no processes. The
nodes (and with them ComfyUI) are only imported when ComfyUI itself is present.
"""

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
WEB_DIRECTORY = "./web"
__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
