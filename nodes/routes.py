"""Routes the pack adds to ComfyUI's server (registered by the root ``__init__`` only inside ComfyUI)."""

from __future__ import annotations

import asyncio
import logging

from ..distrifusion.status import format_report
from .runtime import RUNTIMES
from .status import current_report

logger = logging.getLogger(__name__)


def register(routes) -> None:
    """Add ``GET /distrifusion/status`` (live JSON report, plus its text) and ``POST /distrifusion/release``
    (stop the workers now, e.g. to free the GPUs for another pack) to ComfyUI's route table."""
    from aiohttp import web

    @routes.get("/distrifusion/status")
    async def distrifusion_status(request):
        # Off the event loop: the GPU and package checks may block for a moment while a prompt runs.
        report = await asyncio.get_running_loop().run_in_executor(None, current_report)
        report["text"] = format_report(report)
        return web.json_response(report)

    @routes.post("/distrifusion/release")
    async def distrifusion_release(request):
        if RUNTIMES.activity.running:
            return web.json_response({"released": False, "reason": "a job is running; press Cancel first"}, status=409)
        released = await asyncio.get_running_loop().run_in_executor(None, RUNTIMES.release, "released from the UI")
        return web.json_response({"released": released})
