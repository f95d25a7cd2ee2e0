"""VAE attention through noflash: the callable a VAE Patcher object-patches over ComfyUI's ``vae_attention()``.

Every attention block of a ComfyUI VAE stores its function when it is built, ``self.optimized_attention =
vae_attention()`` (``comfy/ldm/modules/diffusionmodules/model.py`` ``AttnBlock``: SD, SDXL, SD3, Flux, Z-Image and
HunyuanVideo VAEs; ``comfy/ldm/wan/vae.py`` ``AttentionBlock``: Wan 2.1/2.2 and Qwen-Image, per frame; also the
Cosmos tokenizer and the MMAudio VAE). It is ``pytorch_attention`` where ComfyUI allows PyTorch attention for VAEs
(never on AMD), else ``normal_attention``, the sliced (split) attention. All are called as ``fn(q, k, v)`` with
``q, k, v`` of shape ``(B, C, *spatial)``: one head of ``C`` channels over ``N = prod(spatial)`` tokens, scale
``C**-0.5``, output ``(B, C, *spatial)``.

:class:`VAEAttention` is that function on noflash's tiles. The node stores one per block as an object patch
(``"<block path>.optimized_attention"``) on a clone of the VAE's ``ModelPatcher``: ComfyUI applies it when the
clone loads for a decode or encode (tiled ones included) and restores the original when another clone loads.

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
from .clip import RouteStats
from .override import OverrideConfig

__all__ = ["VAE_ATTENTION_ATTR", "VAEAttention", "vae_attention_names"]

logger = logging.getLogger(__name__)

VAE_ATTENTION_ATTR = "optimized_attention"
"""The attribute ComfyUI's VAE attention blocks keep their attention function in."""

_MIN_BLOCK = 16


def vae_attention_names(root: torch.nn.Module) -> List[str]:
    """Names of the modules of ``root`` that keep an attention function in ``optimized_attention``."""
    names = []
    for name, module in root.named_modules():
        fn = module.__dict__.get(VAE_ATTENTION_ATTR)
        if callable(fn) and not isinstance(fn, torch.nn.Module):
            names.append(name)
    return names


def _pow2_floor(x: int) -> int:
    return 1 << (max(1, int(x)).bit_length() - 1)


def _dispatch():
    from .. import dispatch

    return dispatch


class VAEAttention:
    """``fn(q, k, v)`` for a VAE attention block, on noflash's tiles.

    Args:
        previous: the block's own function (``normal_attention``, ``pytorch_attention``, ...) for the calls not
            computed here (below ``config.min_tokens``, or disabled).
        config: ``enabled``, ``min_tokens`` (on ``N``), ``budget_bytes``, ``tier``, ``block_m``, ``block_n``.
        stats: shared call counter (per node).
        attention: a reference SDPA to run instead of noflash's (tests pass a float64 reference; its calls are
            recorded as tier 0). Default: :func:`noflash_core.attention`, whose result names the plan that ran.
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
        # The dispatcher's cached plan: the call that follows with block_m=None runs it without planning again.
        chosen = _dispatch().plan_attention(q, k, v, budget_bytes=cfg.budget_bytes, tier=cfg.tier, block_n=cfg.block_n)
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
        if self.attention is not None:
            out = self.attention(qh, kh, vh)
            self._record("noflash", 0, (0, 0), q, n, "reference attention")
        else:
            block_m = self._block_m(qh, kh, vh)
            out, _, plan = _dispatch().attention(qh, kh, vh, tier=self.config.tier, block_m=block_m,
                                                 block_n=self.config.block_n, budget_bytes=self.config.budget_bytes)
            self._record("noflash", plan.tier, (plan.block_m, plan.block_n), q, n, plan.reason)
        return out.to(q.dtype).transpose(-1, -2).reshape(b, v.shape[1], *shape[2:])

    def __repr__(self) -> str:
        return f"VAEAttention({self.config})"
