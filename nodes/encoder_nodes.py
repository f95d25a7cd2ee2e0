"""CLIP Patcher and VAE Patcher: CLIP → CLIP and VAE → VAE clones whose attention runs noflash's exact tiles.

Both only add object patches to a clone's ``ModelPatcher``; ComfyUI applies them while that clone is loaded and
puts the originals back when another clone of the same model loads. The logic lives in
``noflash_core.comfy.clip`` and ``noflash_core.comfy.vae``.
"""

from __future__ import annotations

import copy
import functools
import logging
from typing import Any, Dict, Optional

from comfy_api.latest import io

from ..noflash_core.comfy.clip import EncodeRouter, RouteStats, attention_module_names
from ..noflash_core.comfy.module_swap import global_users
from ..noflash_core.comfy.op_telemetry import EncodeMonitor
from ..noflash_core.comfy.override import OverrideConfig
from ..noflash_core.comfy.vae import (
    GLOBAL_ATTENTION_NAME,
    ROUTED_METHODS,
    VAEAttention,
    VAEGlobalRouter,
    vae_attention_keys,
)
from ..noflash_core.telemetry import CallRecord
from ._glue import publish_status, run_context
from ._schema import node_id, node_schema, routing_config, routing_inputs

__all__ = ["ENCODE_KEY", "NoFlashCLIPPatcher", "NoFlashVAEPatcher", "clone_vae", "patch_clip", "patch_vae"]

logger = logging.getLogger(__name__)

ENCODE_KEY = "encode_token_weights"


def _monitor(label: str, kind: str, producer: Optional[str]) -> EncodeMonitor:
    """The status source of one patcher node's encodes/decodes (the badge on that node)."""
    return EncodeMonitor(label, publish=publish_status, node_id=producer, context=run_context, kind=kind)


class _MonitoredStats(RouteStats):
    """Route statistics that also feed an :class:`EncodeMonitor` (the node's badge)."""

    def __init__(self, monitor: Optional[EncodeMonitor] = None) -> None:
        super().__init__()
        self.monitor = monitor

    def record(self, call: CallRecord) -> None:
        super().record(call)
        if self.monitor is not None:
            self.monitor.record(call)


class _MonitoredRouter(EncodeRouter):
    """An :class:`EncodeRouter` whose encodes are bracketed for the CLIP Patcher's status (one per encode)."""

    monitor: Optional[EncodeMonitor] = None

    def __call__(self, *args, **kwargs):
        if self.monitor is None or not self.config.enabled:
            return super().__call__(*args, **kwargs)
        self.monitor.begin("encode")
        try:
            return super().__call__(*args, **kwargs)
        finally:
            self.monitor.end()


_VAE_OPS = (("decode", "decode"), ("decode_tiled", "decode"), ("encode", "encode"), ("encode_tiled", "encode"))
_MONITORED_VAE: Dict[type, type] = {}


def _bracketed(method, op: str):
    @functools.wraps(method)
    def run(self, *args: Any, **kwargs: Any):
        monitor = self.__dict__.get("noflash_monitor")
        if monitor is None:
            return method(self, *args, **kwargs)
        monitor.begin(op, getattr(self, "device", None))
        try:
            return method(self, *args, **kwargs)
        finally:
            monitor.end()

    return run


def _monitored_vae_class(cls: type) -> type:
    """A subclass of ComfyUI's ``VAE`` class whose public encode/decode methods are bracketed for the VAE Patcher's
    status (the copy the node returns gets it; the input VAE keeps its class)."""
    if getattr(cls, "noflash_monitored", False):
        return cls
    if cls not in _MONITORED_VAE:
        methods = {name: _bracketed(getattr(cls, name), op) for name, op in _VAE_OPS if hasattr(cls, name)}
        _MONITORED_VAE[cls] = type(cls.__name__, (cls,), {**methods, "noflash_monitored": True,
                                                          "__module__": cls.__module__})
    return _MONITORED_VAE[cls]


def _patcher_schema(cls: type, display_name: str, port, name: str, kind: str, min_tokens_tip: str) -> io.Schema:
    """Schema of a ``name`` -> ``name`` patcher: the ``port`` input to clone, the routing settings, its clone."""
    return node_schema(cls, display_name, [
        port.Input(name, tooltip=f"The {kind} to patch (it is cloned, never mutated)."),
        *routing_inputs(f"Off leaves every attention call of the {kind} to ComfyUI's own attention.", min_tokens_tip),
    ], [port.Output(display_name=name, tooltip=f"A clone of the {kind} whose attention runs noflash's tiles.")],
        hidden=[io.Hidden.unique_id])


def patch_clip(clip, config: OverrideConfig, producer: Optional[str] = None):
    """A clone of ``clip`` whose encodes run the text encoder's attention on noflash's tiles; each encode is
    published as a ``"clip"`` status tagged with ``producer`` (the node id)."""
    c = clip.clone()
    encode = c.patcher.get_model_object(ENCODE_KEY)
    if isinstance(encode, EncodeRouter):
        encode = encode.encode  # replace an earlier CLIP Patcher's settings, keep what it wrapped
    monitor = _monitor(type(c.cond_stage_model).__name__, "clip", producer)
    router = _MonitoredRouter(encode, c.cond_stage_model, config, stats=_MonitoredStats(monitor))
    router.monitor = monitor
    c.patcher.add_object_patch(ENCODE_KEY, router)
    return c


def clone_vae(vae):
    """A copy of a ComfyUI ``VAE`` that shares the model and has its own ``ModelPatcher`` clone.

    ComfyUI 0.3.64's ``VAE`` has no ``clone()``; every attribute but ``patcher`` is shared read-only state.
    """
    n = copy.copy(vae)
    n.patcher = vae.patcher.clone()
    return n


def patch_vae(vae, config: OverrideConfig, producer: Optional[str] = None):
    """A clone of ``vae`` whose attention blocks run on noflash's tiles (``(clone, number of blocks)``); each
    encode/decode is published as a ``"vae"`` status tagged with ``producer`` (the node id)."""
    n = clone_vae(vae)
    monitor = _monitor(type(n.first_stage_model).__name__, "vae", producer)
    n.__class__ = _monitored_vae_class(type(n))
    n.noflash_monitor = monitor
    stats = _MonitoredStats(monitor)
    keys = vae_attention_keys(n.first_stage_model)
    for key in keys:
        previous = n.patcher.get_model_object(key)
        if isinstance(previous, VAEAttention):
            previous = previous.previous
        n.patcher.add_object_patch(key, VAEAttention(previous, config, stats))
    routed = len(global_users(n.first_stage_model, GLOBAL_ATTENTION_NAME))  # modules calling the global function
    for method in (m for m in ROUTED_METHODS if routed and callable(getattr(n.first_stage_model, m, None))):
        previous = n.patcher.get_model_object(method)
        if isinstance(previous, VAEGlobalRouter):
            previous = previous.call
        n.patcher.add_object_patch(method, VAEGlobalRouter(previous, n.first_stage_model, config, stats))
    n.noflash_stats = stats
    return n, len(keys) + routed


class NoFlashCLIPPatcher(io.ComfyNode):
    """Returns a clone of the CLIP whose text-encoder attention (CLIP-L/G, T5/UMT5, BERT, the
    Llama/Qwen/Gemma encoders, the Qwen-VL vision tower) runs noflash's exact O(N)-memory tiles instead
    of attention_basic's full score matrix. The patch exists only while the clone encodes; the input
    CLIP and its other clones are not changed."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return _patcher_schema(
            cls, "NoFlash CLIP Patcher", io.Clip, "clip", "text encoder", "Calls whose longer side (query or key "
            "tokens) is below this use ComfyUI's own attention. CLIP's 77 tokens are below the default; set 0 to "
            "route every call.",
        )

    @classmethod
    def execute(cls, clip, enabled: bool, min_tokens: int, budget_mb: int) -> io.NodeOutput:
        patched = patch_clip(clip, routing_config(enabled, min_tokens, budget_mb), node_id(cls))
        logger.info("noflash: CLIP Patcher routes %d text-encoder attention modules (min_tokens=%d)",
                    len(attention_module_names(patched.cond_stage_model)), min_tokens)
        return io.NodeOutput(patched)


class NoFlashVAEPatcher(io.ComfyNode):
    """Returns a clone of the VAE whose attention blocks (the AttnBlock of SD/SDXL/Flux/Flux 2/Z-Image/
    HunyuanVideo/HunyuanVideo 1.5 VAEs, the per-frame AttentionBlock of Wan and Qwen-Image VAEs, SeedVR2's,
    and the MiniMax H3 and Mochi VAEs' transformer blocks) run
    noflash's exact tiles instead of split attention's N x N score slices. Tiled decode works as before. The
    input VAE is not changed."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return _patcher_schema(
            cls, "NoFlash VAE Patcher", io.Vae, "vae", "VAE", "Attention blocks with fewer tokens (latent pixels "
            "per frame at the block) use ComfyUI's own attention. 1536x1536 has 36,864 at the mid-block.",
        )

    @classmethod
    def execute(cls, vae, enabled: bool, min_tokens: int, budget_mb: int) -> io.NodeOutput:
        patched, blocks = patch_vae(vae, routing_config(enabled, min_tokens, budget_mb), node_id(cls))
        if blocks == 0:
            logger.info("noflash: VAE Patcher found no attention block in %s; the VAE is unchanged",
                        type(vae.first_stage_model).__name__)
        else:
            logger.info("noflash: VAE Patcher routes %d VAE attention blocks (min_tokens=%d)", blocks, min_tokens)
        return io.NodeOutput(patched)
