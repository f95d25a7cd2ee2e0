"""Shared glue between ComfyUI ``ModelPatcher`` clones and ``noflash_core``: install the override, wire telemetry.

Everything stateful lives in closures: ``clone()`` deep-copies ``model_options`` but keeps plain functions, and
copies the callback lists while sharing the callables, so each clone of a patched model reports to the same monitor.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Dict, Optional

from comfy.patcher_extension import CallbacksMP

from ..noflash_core.comfy.override import (
    OverrideConfig,
    is_noflash_override,
    make_attention_override,
    override_previous,
    rebuild_override,
)
from ..noflash_core.comfy.telemetry import STATUS_EVENT, RunMonitor

__all__ = [
    "OVERRIDE_KEY",
    "CALLBACK_KEY",
    "current_override",
    "install_override",
    "patch_attention",
    "repin_attention",
    "publish_status",
]

logger = logging.getLogger(__name__)

OVERRIDE_KEY = "optimized_attention_override"
CALLBACK_KEY = "noflash"


def publish_status(payload: Dict[str, Any]) -> None:
    """Send a status dict to every browser as a ``noflash.status`` event (no-op without a server)."""
    try:
        from server import PromptServer
    except ImportError:
        return
    instance = getattr(PromptServer, "instance", None)
    if instance is None:
        return
    try:
        instance.send_sync(STATUS_EVENT, payload)
    except Exception as exc:  # noqa: BLE001 - telemetry must never break a sampling run
        logger.debug("noflash: could not publish status: %s", exc)


def current_override(model) -> Optional[Callable[..., Any]]:
    """The attention override a ModelPatcher has in its transformer options, or None."""
    return model.model_options.get("transformer_options", {}).get(OVERRIDE_KEY)


def install_override(model, override: Callable[..., Any]) -> None:
    """Store ``override`` in a (cloned) ModelPatcher's transformer options."""
    model.model_options.setdefault("transformer_options", {})[OVERRIDE_KEY] = override


def _attach_monitor(model, label: str, node_id: Optional[str]) -> RunMonitor:
    """A fresh monitor whose runs start on ``ON_PRE_RUN`` and end on ``ON_CLEANUP`` (replacing ours, if any)."""
    monitor = RunMonitor(label=label, publish=publish_status, node_id=node_id)

    def on_pre_run(patcher) -> None:
        monitor.start(patcher.load_device)

    def on_cleanup(patcher) -> None:
        monitor.finish()

    for call_type in (CallbacksMP.ON_PRE_RUN, CallbacksMP.ON_CLEANUP):
        model.remove_callbacks_with_key(call_type, CALLBACK_KEY)
    model.add_callback_with_key(CallbacksMP.ON_PRE_RUN, CALLBACK_KEY, on_pre_run)
    model.add_callback_with_key(CallbacksMP.ON_CLEANUP, CALLBACK_KEY, on_cleanup)
    return monitor


def patch_attention(model, config: OverrideConfig, node_id: Optional[str] = None):
    """A clone of ``model`` whose attention runs the noflash override with ``config``.

    An override another pack installed is chained: calls we do not compute go to it. A noflash override already
    on the model is replaced, keeping whatever it chained. ``node_id`` tags the runs' status for the browser.
    """
    m = model.clone()
    existing = current_override(m)
    previous = override_previous(existing) if is_noflash_override(existing) else existing
    label = type(m.model).__name__
    monitor = _attach_monitor(m, label, node_id)
    install_override(m, make_attention_override(config, previous=previous, recorder=monitor.record))
    return m


def repin_attention(model, node_id: Optional[str] = None, **changes: Any):
    """A clone of ``model`` whose noflash override has some config fields changed (tier, blocks).

    When the model has no noflash override yet, one is installed with default settings plus ``changes``.
    """
    existing = current_override(model)
    if not is_noflash_override(existing):
        return patch_attention(model, OverrideConfig(**changes), node_id)
    m = model.clone()
    install_override(m, rebuild_override(existing, **changes))
    return m
