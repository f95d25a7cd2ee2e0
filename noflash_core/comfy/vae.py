"""VAE attention through noflash: the callable a VAE Patcher object-patches over ComfyUI's ``vae_attention()``.

Every attention block of a ComfyUI VAE stores its function when it is built, ``self.optimized_attention =
vae_attention()`` (``comfy/ldm/modules/diffusionmodules/model.py`` ``AttnBlock``: SD, SDXL, SD3, Flux, Flux 2,
Z-Image, HunyuanVideo and HunyuanVideo 1.5 VAEs; ``comfy/ldm/wan/vae.py`` ``AttentionBlock``: Wan 2.1/2.2 and
Qwen-Image, per frame; also the Cosmos tokenizer, the MMAudio VAE and, in ComfyUI 0.33, the Mage-Flow VAE).
SeedVR2's VAE (``comfy/ldm/seedvr/vae.py`` ``Attention``) keeps the same function under another name,
``self.optimized_vae_attention``, and calls it the same way for its single-head mid-block; :data:`VAE_ATTENTION_ATTRS`
lists both names. It is ``pytorch_attention`` where ComfyUI allows PyTorch attention for VAEs (never on AMD), else
``normal_attention``, the sliced (split) attention. All are called as ``fn(q, k, v)`` with ``q, k, v`` of shape
``(B, C, *spatial)``: one head of ``C`` channels over ``N = prod(spatial)`` tokens, scale ``C**-0.5``, output
``(B, C, *spatial)``.

:class:`VAEAttention` is that function on noflash's tiles. The node stores one per block as an object patch
(``"<block path>.<attribute>"``, :func:`vae_attention_keys`) on a clone of the VAE's ``ModelPatcher``: ComfyUI
applies it when the clone loads for a decode or encode (tiled ones included) and restores the original when another
clone loads.

VAEs whose blocks call the module-level ``optimized_attention`` by name instead (in ComfyUI 0.33 the MiniMax H3 and
Mochi VAEs, SeedVR2's multi-head attention, the Stable Audio 3 VAE) get a :class:`VAEGlobalRouter` as the object
patch of their model's ``decode`` / ``encode`` (and the tiled forms): for the clone's own call it swaps that global
for a routed one (:mod:`~noflash_core.comfy.module_swap`), the same semantics as the CLIP Patcher's routing.

A VAE call never runs as one block of all queries: when the planner would run it whole (its fast path, or one
tier-1 block of every row, which is what it picks on a GPU with room), the query blocks are halved, so the
``N × N`` scores never exist at once. Nothing here imports ComfyUI.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable, List, Optional

import torch

from ..telemetry import CallRecord
from .clip import RouteStats, route_attention
from .module_swap import global_users, swapped_globals
from .override import OverrideConfig

__all__ = [
    "GLOBAL_ATTENTION_NAME",
    "ROUTED_METHODS",
    "VAE_ATTENTION_ATTR",
    "VAE_ATTENTION_ATTRS",
    "VAEAttention",
    "VAEGlobalRouter",
    "vae_attention_keys",
    "vae_attention_names",
]

logger = logging.getLogger(__name__)

VAE_ATTENTION_ATTR = "optimized_attention"
"""The attribute ComfyUI's VAE attention blocks keep their attention function in."""

VAE_ATTENTION_ATTRS = (VAE_ATTENTION_ATTR, "optimized_vae_attention")
"""Every attribute under which a ComfyUI VAE block keeps a ``vae_attention()`` function (the second is SeedVR2's)."""

_MIN_BLOCK = 16


def vae_attention_names(root: torch.nn.Module) -> List[str]:
    """Names of the modules of ``root`` that keep an attention function in ``optimized_attention``."""
    names = []
    for name, module in root.named_modules():
        fn = module.__dict__.get(VAE_ATTENTION_ATTR)
        if callable(fn) and not isinstance(fn, torch.nn.Module):
            names.append(name)
    return names


def vae_attention_keys(root: torch.nn.Module) -> List[str]:
    """Object-patch keys (``"<module path>.<attribute>"``) of every ``vae_attention()`` function stored in ``root``,
    under any of :data:`VAE_ATTENTION_ATTRS`."""
    keys = []
    for name, module in root.named_modules():
        for attr in VAE_ATTENTION_ATTRS:
            fn = module.__dict__.get(attr)
            if callable(fn) and not isinstance(fn, torch.nn.Module):
                keys.append(f"{name}.{attr}" if name else attr)
    return keys


GLOBAL_ATTENTION_NAME = "optimized_attention"
"""The module-level name some VAE blocks call attention by (``comfy.ldm.modules.attention.optimized_attention``)."""

ROUTED_METHODS = ("decode", "encode", "decode_tiled", "encode_tiled")
"""The VAE model's methods that a :class:`VAEGlobalRouter` brackets (those the model has)."""


class VAEGlobalRouter:
    """The object patch for a VAE model's ``decode`` / ``encode``: the call with the module-level attention routed.

    Args:
        call: the method to run (the model's own bound method, or an earlier object patch).
        root: the VAE model (``first_stage_model``); the modules to swap in are :func:`global_users` of it.
        config: what the routed attention does (``enabled``, ``min_tokens``, ``budget_bytes``, tier, blocks).
        stats: shared call counter.
        route: ``route(func)`` → what runs instead of ComfyUI's function; default
            :func:`~noflash_core.comfy.clip.route_attention` with ``config`` (tests pass a float64 reference).
    """

    def __init__(self, call: Callable[..., Any], root: torch.nn.Module, config: OverrideConfig,
                 stats: Optional[RouteStats] = None, route: Optional[Callable[[Callable], Callable]] = None) -> None:
        self.call = call
        self.config = config
        self.stats = RouteStats() if stats is None else stats
        self.modules = global_users(root, GLOBAL_ATTENTION_NAME)
        self._route = route_attention(config, self.stats) if route is None else route

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not self.config.enabled or not self.modules:
            return self.call(*args, **kwargs)
        with swapped_globals(self.modules, GLOBAL_ATTENTION_NAME, self._route):
            return self.call(*args, **kwargs)

    def __repr__(self) -> str:
        return f"VAEGlobalRouter({self.config}, {[m.__name__ for m in self.modules]})"


def _pow2_floor(x: int) -> int:
    return 1 << (max(1, int(x)).bit_length() - 1)


def _sdpa():
    from ..sdpa import scaled_dot_product_attention

    return scaled_dot_product_attention


def _plan():
    from ..planner import plan

    return plan


class VAEAttention:
    """``fn(q, k, v)`` for a VAE attention block, on noflash's tiles.

    Args:
        previous: the block's own function (``normal_attention``, ``pytorch_attention``, ...) for the calls not
            computed here (below ``config.min_tokens``, or disabled).
        config: ``enabled``, ``min_tokens`` (on ``N``), ``budget_bytes``, ``tier``, ``block_m``, ``block_n``.
        stats: shared call counter (per node).
        attention: the SDPA to run (default :func:`noflash_core.scaled_dot_product_attention`; tests pass a
            float64 reference).
    """

    def __init__(self, previous: Callable[..., torch.Tensor], config: OverrideConfig,
                 stats: Optional[RouteStats] = None,
                 attention: Optional[Callable[..., torch.Tensor]] = None) -> None:
        self.previous = previous
        self.config = config
        self.stats = RouteStats() if stats is None else stats
        self.attention = attention

    def _record(self, path: str, tier: int, blocks, q: torch.Tensor, n: int, reason: str) -> None:
        b, c = q.shape[0], q.shape[1]
        self.stats.record(CallRecord(path, tier, blocks[0], blocks[1], b, 1, n, n, c,
                                     str(q.dtype).replace("torch.", ""), str(q.device), reason))

    def _block_m(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Optional[int]:
        """The query block: the planner's, halved until it is not all of ``N`` (see the module docstring)."""
        cfg = self.config
        n = q.shape[-2]
        if cfg.block_m is not None or n < 2 * _MIN_BLOCK:
            return cfg.block_m
        chosen = _plan()(q, k, v, budget_bytes=cfg.budget_bytes, tier=cfg.tier, block_n=cfg.block_n)
        if chosen.tier != 0 and chosen.block_m < n:
            return None  # the planner's own plan already tiles the queries
        return max(_MIN_BLOCK, _pow2_floor(n // 2))

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        shape = q.shape
        if args or kwargs or q.dim() < 3 or k.shape != shape or v.shape[:2] != shape[:2]:
            return self.previous(q, k, v, *args, **kwargs)
        b = shape[0]
        n = math.prod(shape[2:])
        if not self.config.enabled or n < self.config.min_tokens:
            out = self.previous(q, k, v)
            self._record("comfy", 0, (0, 0), q, n, "disabled" if not self.config.enabled else "below min_tokens")
            return out
        # (B, C, *spatial) -> (B, 1, N, C): one head over N tokens (views; the tiles read strided operands).
        qh, kh, vh = (t.reshape(b, 1, t.shape[1], n).transpose(-1, -2) for t in (q, k, v))
        block_m = self._block_m(qh, kh, vh)
        from .. import telemetry

        seen = {}
        unsubscribe = telemetry.subscribe(lambda rec: seen.update(tier=rec.tier, bm=rec.block_m, bn=rec.block_n))
        try:
            attention = self.attention or _sdpa()
            out = attention(qh, kh, vh, tier=self.config.tier, block_m=block_m, block_n=self.config.block_n,
                            budget_bytes=self.config.budget_bytes)
        finally:
            unsubscribe()
        tier = int(seen.get("tier", 0 if self.config.tier == "auto" else self.config.tier))
        self._record("noflash", tier, (int(seen.get("bm", block_m or 0)), int(seen.get("bn", 0))), q, n, "noflash")
        return out.to(q.dtype).transpose(-1, -2).reshape(b, v.shape[1], *shape[2:])

    def __repr__(self) -> str:
        return f"VAEAttention({self.config})"
