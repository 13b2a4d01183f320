"""ComfyUI entry point of ComfyUI-WanVideo-DistriFusion: node mappings, web directory, server routes.

Importing this package has no side effects beyond defining the mappings: no CUDA, no processes. The
``/distrifusion/*`` routes are registered only when ComfyUI's server is already running this import.
"""

import sys

WEB_DIRECTORY = "./web"


def _register_routes() -> None:
    server = sys.modules.get("server")
    prompt_server = getattr(getattr(server, "PromptServer", None), "instance", None)
    if prompt_server is None:
        return
    from .nodes.routes import register

    register(prompt_server.routes)


if __package__:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

    _register_routes()
else:
    # Imported bare as ``__init__``: pytest does that to the repo root when the clone's folder name is not an
    # identifier (ComfyUI-WanVideo-DistriFusion). The pack only works as a package; the tests use an alias.
    NODE_CLASS_MAPPINGS: dict = {}
    NODE_DISPLAY_NAME_MAPPINGS: dict = {}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
