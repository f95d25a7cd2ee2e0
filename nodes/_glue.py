"""Shared glue between ComfyUI ``ModelPatcher`` clones and ``noflash_core``: install the override, wire telemetry.

Everything stateful lives in closures: ``clone()`` deep-copies ``model_options`` but keeps plain functions, and
copies the callback lists while sharing the callables, so each clone of a patched model reports to the same monitor.
"""

from __future__ import annotations

import dataclasses
import logging
import weakref
from typing import Any, Callable, Dict, List, Optional, Sequence

from comfy.patcher_extension import CallbacksMP, WrappersMP

from ..noflash_core.comfy.memory import planned_memory
from ..noflash_core.comfy.module_swap import ModuleAttentionRouter
from ..noflash_core.comfy.override import (
    OverrideConfig,
    is_noflash_override,
    make_attention_override,
    override_config,
    override_name,
    override_previous,
    override_recorder,
)
from ..noflash_core.comfy.telemetry import STATUS_EVENT, RunMonitor, StatusMonitor

__all__ = [
    "OVERRIDE_KEY",
    "CALLBACK_KEY",
    "attach_run_callbacks",
    "current_override",
    "install_override",
    "patch_attention",
    "repin_attention",
    "publish_status",
    "run_context",
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


def _workflow_id(prompt_id: str) -> Optional[str]:
    """The ``id`` of the workflow the running prompt ``prompt_id`` was queued from (the frontend sends the graph as
    ``extra_data.extra_pnginfo.workflow``), or None (queued through the API, or no server)."""
    try:
        from server import PromptServer
    except ImportError:
        return None
    queue = getattr(getattr(PromptServer, "instance", None), "prompt_queue", None)
    if queue is None:
        return None
    running, _ = queue.get_current_queue_volatile()
    for item in running:  # (number, prompt_id, prompt, extra_data, outputs_to_execute, ...)
        if len(item) > 3 and item[1] == prompt_id and isinstance(item[3], dict):
            workflow = (item[3].get("extra_pnginfo") or {}).get("workflow") or {}
            return workflow.get("id") if isinstance(workflow, dict) else None
    return None


def run_context() -> Dict[str, Optional[str]]:
    """Where a run happens: ``prompt_id`` and ``exec_node_id`` from ComfyUI's executing-node context, and the
    ``workflow_id`` of that prompt; empty outside ComfyUI's executor (as in tests that call nodes directly)."""
    try:
        from comfy_execution.utils import get_executing_context
    except ImportError:
        return {}
    ctx = get_executing_context()
    if ctx is None:
        return {}
    return {"prompt_id": ctx.prompt_id, "exec_node_id": ctx.node_id, "workflow_id": _workflow_id(ctx.prompt_id)}


def current_override(model) -> Optional[Callable[..., Any]]:
    """The attention override a ModelPatcher has in its transformer options, or None."""
    return model.model_options.get("transformer_options", {}).get(OVERRIDE_KEY)


def install_override(model, override: Callable[..., Any]) -> None:
    """Store ``override`` in a (cloned) ModelPatcher's transformer options."""
    model.model_options.setdefault("transformer_options", {})[OVERRIDE_KEY] = override


def attach_run_callbacks(model, monitor: StatusMonitor, key: str = CALLBACK_KEY) -> StatusMonitor:
    """``monitor``'s runs start on ``ON_PRE_RUN`` and end on ``ON_CLEANUP`` of ``model`` (replacing the callbacks
    registered under ``key``, if any)."""

    def on_pre_run(patcher) -> None:
        monitor.start(patcher.load_device)

    def on_cleanup(patcher) -> None:
        monitor.finish()

    for call_type in (CallbacksMP.ON_PRE_RUN, CallbacksMP.ON_CLEANUP):
        model.remove_callbacks_with_key(call_type, key)
    model.add_callback_with_key(CallbacksMP.ON_PRE_RUN, key, on_pre_run)
    model.add_callback_with_key(CallbacksMP.ON_CLEANUP, key, on_cleanup)
    return monitor


def _attach_monitor(model, label: str, node_ids: Sequence[Optional[str]]) -> RunMonitor:
    """A fresh attention monitor on ``model``'s runs, tagged with the producing nodes."""
    monitor = RunMonitor(label=label, publish=publish_status, node_ids=node_ids, context=run_context)
    attach_run_callbacks(model, monitor)
    return monitor


def _free_memory_reader(model) -> Optional[Callable[[Any], Optional[int]]]:
    """``ModelPatcher.get_free_memory`` of ``model`` (held weakly) while comfy-aimdo's dynamic VRAM is on (ComfyUI
    0.33+: it counts the weight memory aimdo can give back, which the device's own reading does not); None from
    the reader otherwise, and no reader where the version lacks the method: the planner then reads free memory
    itself (on ROCm from sysfs, which ``mem_get_info`` can over-report)."""
    if not callable(getattr(model, "get_free_memory", None)):
        return None
    ref = weakref.ref(model)

    def free_memory(device) -> Optional[int]:
        import comfy.memory_management

        patcher = ref()
        if patcher is None or not getattr(comfy.memory_management, "aimdo_enabled", False):
            return None
        return patcher.get_free_memory(device)

    return free_memory


def _sampling_wrapper(monitor: RunMonitor) -> Callable[..., Any]:
    """An ``OUTER_SAMPLE`` wrapper: at the start of each sampling run, check that the model's attention override
    is still noflash's (a ``ModelAttentionBackend`` node or another pack placed after ours replaces it: one warning
    per run, and ``replaced_by`` in the status), and while noflash computes attention let ComfyUI plan memory for
    it (:func:`~noflash_core.comfy.memory.planned_memory`, this clone's run only)."""

    def outer_sample(executor, *args, **kwargs):
        guider = executor.class_obj
        options = getattr(guider, "model_options", {}).get("transformer_options", {})
        active = options.get(OVERRIDE_KEY)
        if not is_noflash_override(active):
            name = override_name(active)
            monitor.set_replaced_by(name)
            logger.warning("noflash: this model's attention override was replaced after the NoFlash node (by %s, "
                           "e.g. a ModelAttentionBackend node placed after it); noflash computes no attention in "
                           "this run", name)
            return executor(*args, **kwargs)
        monitor.set_replaced_by(None)
        if not override_config(active).enabled:
            return executor(*args, **kwargs)
        with planned_memory(guider.model_patcher.model):
            return executor(*args, **kwargs)

    return outer_sample


def patch_attention(model, config: OverrideConfig, node_id: Optional[str] = None):
    """A clone of ``model`` whose attention runs the noflash override with ``config``.

    An override another pack installed is chained: calls we do not compute go to it. A noflash override already
    on the model is replaced, keeping whatever it chained. ``node_id`` tags the runs' status for the browser.
    The clone also gets an ``OUTER_SAMPLE`` wrapper (:func:`_sampling_wrapper`): ComfyUI's memory planning for
    noflash's attention, and a warning when a later node replaced the override.
    """
    m = model.clone()
    existing = current_override(m)
    previous = override_previous(existing) if is_noflash_override(existing) else existing
    return _install(m, config, previous, [node_id])


def _install(m, config: OverrideConfig, previous, node_ids: Sequence[Optional[str]]):
    monitor = _attach_monitor(m, type(m.model).__name__, node_ids)
    install_override(m, make_attention_override(config, previous=previous, recorder=monitor.record,
                                                free_memory=_free_memory_reader(m)))
    m.remove_wrappers_with_key(WrappersMP.OUTER_SAMPLE, CALLBACK_KEY)
    m.add_wrapper_with_key(WrappersMP.OUTER_SAMPLE, CALLBACK_KEY, _sampling_wrapper(monitor))
    m.remove_wrappers_with_key(WrappersMP.APPLY_MODEL, CALLBACK_KEY)
    m.add_wrapper_with_key(WrappersMP.APPLY_MODEL, CALLBACK_KEY, _module_attention_wrapper)
    return m


_MODULE_ATTENTION = ModuleAttentionRouter()


def _module_attention_wrapper(executor, *args, **kwargs):
    """An ``APPLY_MODEL`` wrapper: during this clone's model call, attention that its diffusion model calls through
    the module-level function without ``transformer_options`` goes to the clone's noflash override too
    (``module_swap``); only while the override in the call's options is noflash's and enabled (a later
    ``ModelAttentionBackend`` wins). ComfyUI passes ``(x, t, c_concat, c_crossattn, control, transformer_options)``."""
    options = args[5] if len(args) > 5 else kwargs.get("transformer_options")
    override = (options or {}).get(OVERRIDE_KEY)
    model = getattr(executor.class_obj, "diffusion_model", None)
    if model is None or not is_noflash_override(override) or not override_config(override).enabled:
        return executor(*args, **kwargs)
    with _MODULE_ATTENTION.routing(model, override):
        return executor(*args, **kwargs)


def _producers(override) -> List[str]:
    """The node ids the runs of a noflash override are tagged with (its monitor's)."""
    monitor = getattr(override_recorder(override), "__self__", None)
    return list(getattr(monitor, "node_ids", []))


def repin_attention(model, node_id: Optional[str] = None, **changes: Any):
    """A clone of ``model`` whose noflash override has some config fields changed (tier, blocks).

    When the model has no noflash override yet, one is installed with default settings plus ``changes``. The
    clone's runs are tagged with the nodes that patched it before and ``node_id``.
    """
    existing = current_override(model)
    if not is_noflash_override(existing):
        return patch_attention(model, OverrideConfig(**changes), node_id)
    m = model.clone()
    config = dataclasses.replace(override_config(existing), **changes)
    return _install(m, config, override_previous(existing), [*_producers(existing), node_id])
