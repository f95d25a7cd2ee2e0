"""What happens once when ComfyUI loads the pack: the start-up auto-patch and the run-history route."""

from __future__ import annotations

import logging

from ..noflash_core.comfy.startup import run_startup
from ..noflash_core.comfy.telemetry import default_history

__all__ = ["on_pack_load", "register_routes"]

logger = logging.getLogger(__name__)


def register_routes() -> bool:
    """``GET /noflash/runs``: the kept runs (the bottom-panel tab reads it after a page reload)."""
    try:
        from aiohttp import web
        from server import PromptServer
    except ImportError:
        return False
    instance = getattr(PromptServer, "instance", None)
    if instance is None:
        return False

    @instance.routes.get("/noflash/runs")
    async def noflash_runs(request):
        return web.json_response({"runs": default_history().runs()})

    return True


def _comfy_device():
    try:
        import comfy.model_management

        return comfy.model_management.get_torch_device()
    except Exception:  # noqa: BLE001 - detection falls back to its own default device
        return None


def on_pack_load():
    """Register the route, then run the auto-detection on ComfyUI's device (logs one line)."""
    register_routes()
    return run_startup(device=_comfy_device())
