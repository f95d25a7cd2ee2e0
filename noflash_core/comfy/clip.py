"""Text-encoder attention through noflash, for one ComfyUI ``CLIP`` clone's encodes only.

ComfyUI's text encoders (``comfy/clip_model.py``, ``comfy/text_encoders/{t5,llama,bert,qwen_vl}.py``) pick their
attention function once per forward with ``optimized_attention_for_device(..., small_input=True)``: that is
``attention_pytorch`` when PyTorch attention is enabled, else ``attention_basic``, which holds the full
``b·heads × L × L`` scores. The function is handed down to every attention module as the ``optimized_attention``
argument of its ``forward`` (``CLIPAttention``, ``BertSelfAttention``, ``T5Attention``, the Llama/Qwen/Gemma
``Attention``, the Qwen-VL ``VisionAttention``), which call it as::

    optimized_attention(q, k, v, heads, mask)                                  # CLIP, BERT, T5 (b, n, h*d)
    optimized_attention(q, k, v, heads, mask=mask, skip_reshape=True)          # Llama family (b, h, n, d)
    optimized_attention(q, k, v, heads, skip_reshape=True)                     # Qwen-VL vision windows

How only one clone is reached (nothing here imports ComfyUI; the node in ``nodes/`` wires it):

1. The node object-patches ``encode_token_weights`` on the clone's ``ModelPatcher`` (the key is relative to
   ``cond_stage_model``) with an :class:`EncodeRouter`. ComfyUI applies object patches when that patcher is loaded,
   which every encode does first, and puts the original back when another clone of the same model loads. Later
   clones of the clone (CLIP Set Last Layer, LoRA loaders) copy the patch.
2. During the encode, and only then, the router holds a process-wide lock and sets an instance ``forward`` on every
   attention module of the encoder. That forward swaps the ``optimized_attention`` argument for a function that
   runs noflash's tiles (:func:`~noflash_core.comfy.override.make_attention_override`, the same semantics as the
   Attention Patcher: masks as ``attention_pytorch`` reads them, ``min_tokens``, ``budget_bytes``).
3. In ``finally`` every module gets back exactly the ``forward`` it had, so nothing stays patched after the encode,
   also when it raises.

Encoders that call ``optimized_attention_for_device(...)(q, k, v, ...)`` inline instead of taking the function as an
argument (ComfyUI 0.33's Gemma 4 and GPT-OSS encoders) are reached the same way: during the encode, and only then,
that module-level name is swapped in the modules whose classes call it (:mod:`~noflash_core.comfy.module_swap`) for
one that returns routed functions.

The original CLIP and its other clones never see the routed forwards: their encodes load their own patcher first,
which restores ``encode_token_weights``. The one caveat is threads: a second thread running the same encoder
modules during this clone's encode would be routed too. ComfyUI executes prompts in one thread.
"""

from __future__ import annotations

import functools
import inspect
import logging
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from ..telemetry import CallRecord
from .module_swap import global_users, swapped_globals
from .override import OverrideConfig, make_attention_override

__all__ = ["ATTENTION_ARG", "FOR_DEVICE", "EncodeRouter", "RouteStats", "attention_module_names", "route_attention"]

logger = logging.getLogger(__name__)

ATTENTION_ARG = "optimized_attention"
"""The ``forward`` parameter through which ComfyUI's text encoders pass their attention function."""

FOR_DEVICE = "optimized_attention_for_device"
"""The module-level function that picks an encoder's attention function (called inline by some encoders)."""

_LOCK = threading.RLock()
_MISSING = object()


@dataclass
class RouteStats:
    """What the routed attention did, for telemetry and tests.

    Attributes:
        encodes: encodes that ran through the router.
        calls: attention calls by path: ``"noflash"`` or ``"comfy"`` (sent on to ComfyUI's function).
        tiers: noflash calls by tier (0 is noflash's own fast path, torch SDPA on a trivially small call).
        max_q_len: the longest query seen.
    """

    encodes: int = 0
    calls: Dict[str, int] = field(default_factory=dict)
    tiers: Dict[int, int] = field(default_factory=dict)
    max_q_len: int = 0

    def record(self, call: CallRecord) -> None:
        self.calls[call.path] = self.calls.get(call.path, 0) + 1
        if call.path == "noflash":
            self.tiers[call.tier] = self.tiers.get(call.tier, 0) + 1
        self.max_q_len = max(self.max_q_len, call.q_len)


@functools.cache
def _forward_signature(cls: type) -> Optional[inspect.Signature]:
    """The signature of ``cls.forward`` without ``self`` when it takes ``optimized_attention``, else None."""
    forward = getattr(cls, "forward", None)
    if forward is None:
        return None
    try:
        sig = inspect.signature(forward)
    except (TypeError, ValueError):
        return None
    if ATTENTION_ARG not in sig.parameters:
        return None
    params = list(sig.parameters.values())
    return sig.replace(parameters=params[1:])


def attention_module_names(root: torch.nn.Module) -> List[str]:
    """Names (as in ``named_modules``) of the modules that call the attention function themselves.

    A module qualifies when its ``forward`` takes ``optimized_attention`` and no module below it does: the layer
    and block modules above only pass the function down.
    """
    takes = {name for name, m in root.named_modules() if _forward_signature(type(m)) is not None}
    return [name for name in takes if not any(other.startswith(name + ".") for other in takes if other != name)]


def _basic_bool_mask(func: Callable[..., Any], args: Tuple[Any, ...], kwargs: Dict[str, Any]):
    """``attention_basic`` reads a bool mask as a key mask ``(b, Lk)``; give it that meaning in ComfyUI's
    ``attention_pytorch`` terms, ``(b, 1, 1, Lk)``. Other masks and functions pass unchanged."""
    if getattr(func, "__name__", "") != "attention_basic":
        return args, kwargs
    if "mask" in kwargs:
        mask = kwargs["mask"]
    elif len(args) > 4:
        mask = args[4]
    else:
        return args, kwargs
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or len(args) < 2:
        return args, kwargs
    k = args[1]
    skip_reshape = kwargs.get("skip_reshape", args[6] if len(args) > 6 else False)
    lk = k.shape[-2] if skip_reshape else k.shape[1]
    b = k.shape[0]
    if mask.numel() != b * lk:
        return args, kwargs  # attention_basic itself cannot read it either: let the call fail the same way
    mask = mask.reshape(b, 1, 1, lk)
    if "mask" in kwargs:
        return args, {**kwargs, "mask": mask}
    return args[:4] + (mask,) + args[5:], kwargs


def route_attention(config: OverrideConfig, stats: Optional[RouteStats] = None) -> Callable[[Callable], Callable]:
    """``route(func)`` → a drop-in for ComfyUI's attention function ``func`` that runs noflash's tiles.

    Calls the override does not compute (below ``config.min_tokens``, disabled, or a form it does not know) go
    to ``func`` itself. Routing a routed function returns it unchanged.
    """
    override = make_attention_override(config, recorder=stats.record if stats is not None else None)

    def route(func: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        if getattr(func, "noflash_routed", False):
            return func

        @functools.wraps(func)
        def routed(*args, **kwargs):
            args, kwargs = _basic_bool_mask(func, args, kwargs)
            return override(func, *args, **kwargs)

        routed.noflash_routed = True
        routed.noflash_original = func
        return routed

    return route


class _RoutedForward:
    """An instance ``forward`` that hands the module a routed ``optimized_attention``."""

    def __init__(self, forward: Callable[..., Any], signature: inspect.Signature, route: Callable) -> None:
        self.forward = forward
        self.signature = signature
        self.route = route

    def __call__(self, *args, **kwargs):
        bound = self.signature.bind(*args, **kwargs)
        func = bound.arguments.get(ATTENTION_ARG)
        if callable(func):
            bound.arguments[ATTENTION_ARG] = self.route(func)
        return self.forward(*bound.args, **bound.kwargs)


class EncodeRouter:
    """The object patch for ``cond_stage_model.encode_token_weights``: the wrapped encode with noflash attention.

    Args:
        encode: the ``encode_token_weights`` to run (the model's own bound method, or an earlier object patch).
        root: the text-encoder module (``cond_stage_model``) whose attention modules are routed.
        config: what the routed attention does (``min_tokens``, ``budget_bytes``, ``enabled``, tier, blocks).
        stats: where calls are counted (a fresh :class:`RouteStats` when None).
        route: ``route(func)`` → what runs instead of ComfyUI's attention function ``func``; default
            :func:`route_attention` with ``config`` (tests pass a float64 reference).
    """

    def __init__(
        self,
        encode: Callable[..., Any],
        root: torch.nn.Module,
        config: OverrideConfig,
        stats: Optional[RouteStats] = None,
        route: Optional[Callable[[Callable], Callable]] = None,
    ) -> None:
        self.encode = encode
        self.root = root
        self.config = config
        self.stats = RouteStats() if stats is None else stats
        self._route = route_attention(config, self.stats) if route is None else route

    def _install(self) -> List[Tuple[torch.nn.Module, Any]]:
        installed = []
        try:
            for name in attention_module_names(self.root):
                module = self.root.get_submodule(name)
                signature = _forward_signature(type(module))
                previous = module.__dict__.get("forward", _MISSING)
                module.forward = _RoutedForward(module.forward, signature, self._route)
                installed.append((module, previous))
        except BaseException:
            self._restore(installed)
            raise
        return installed

    @staticmethod
    def _restore(installed: List[Tuple[torch.nn.Module, Any]]) -> None:
        for module, previous in reversed(installed):
            if previous is _MISSING:
                module.__dict__.pop("forward", None)
            else:
                module.forward = previous

    def _routed_picker(self, pick: Callable[..., Callable]) -> Callable[..., Callable]:
        """``optimized_attention_for_device`` whose picks are routed (for encoders that call it inline)."""

        @functools.wraps(pick)
        def routed_pick(*args, **kwargs):
            return self._route(pick(*args, **kwargs))

        return routed_pick

    def __call__(self, *args, **kwargs):
        if not self.config.enabled:
            return self.encode(*args, **kwargs)
        with _LOCK:
            installed = self._install()
            try:
                self.stats.encodes += 1
                with swapped_globals(global_users(self.root, FOR_DEVICE), FOR_DEVICE, self._routed_picker):
                    return self.encode(*args, **kwargs)
            finally:
                self._restore(installed)

    def __repr__(self) -> str:
        return f"EncodeRouter({self.config}, {len(attention_module_names(self.root))} attention modules)"
