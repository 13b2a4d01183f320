"""ComfyUI entry point of ComfyUI-WanVideo-DistriFusion: node mappings, web directory, server routes.

Importing this package has no side effects beyond defining the mappings: no CUDA, no processes. The
``/distrifusion/*`` routes are registered only when ComfyUI's server is already running this import.
"""

import sys

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

WEB_DIRECTORY = "./web"


def _register_routes() -> None:
    server = sys.modules.get("server")
    prompt_server = getattr(getattr(server, "PromptServer", None), "instance", None)
    if prompt_server is None:
        return
    from .nodes.routes import register

    register(prompt_server.routes)


_register_routes()

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
