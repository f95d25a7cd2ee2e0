"""The drop-in ``scaled_dot_product_attention``: :func:`noflash_core.attention` (``dispatch.py``) without the plan.

It has exactly the semantics of ``torch.nn.functional.scaled_dot_product_attention`` (masks, causal, GQA, Ev != E,
any batch dims, dropout, fully masked rows give 0) and raises the same exception types for bad input.
``original_sdpa`` and ``math_sdpa`` (torch's own SDPA, see ``torch_sdpa.py``) are re-exported here for callers
that import them from this module.
"""

from __future__ import annotations

from typing import Optional

import torch

from .dispatch import attention
from .planner import TierArg
from .torch_sdpa import math_sdpa, original_sdpa

__all__ = ["math_sdpa", "original_sdpa", "scaled_dot_product_attention"]


def scaled_dot_product_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
    *,
    tier: TierArg = "auto",
    block_m: Optional[int] = None,
    block_n: Optional[int] = None,
    budget_bytes: Optional[int] = None,
) -> torch.Tensor:
    r"""Exact scaled dot-product attention in O(N) memory; a drop-in for torch's SDPA.

    Args:
        query: ``(N, ..., Hq, L, E)``.
        key: ``(N, ..., H, S, E)``.
        value: ``(N, ..., H, S, Ev)``.
        attn_mask: bool (True = takes part) or float (added to the scores, query's dtype), broadcastable to
            ``(N, ..., Hq, L, S)``.
        dropout_p: probability of dropping an attention weight (applied whenever > 0, as torch does).
        is_causal: top-left aligned causal mask (``ones(L, S).tril()``); not together with ``attn_mask``.
        scale: defaults to ``1 / sqrt(E)``.
        enable_gqa: query head ``h`` uses key/value head ``h // (Hq // H)``.
        tier: ``"auto"`` (planner), ``1`` (query-chunked), ``2`` (online softmax) or ``3`` (in-place, inference only).
        block_m, block_n: override the planner's block sizes (``block_n`` is used by tier 2 only; tiers 1 and 3
            take whole key rows). With a pinned tier and blocks the plan is fixed (no out-of-memory retry), as
            CUDA graphs need.
        budget_bytes: working-memory budget; default from ``NOFLASH_BUDGET_MB`` or the device's free memory.

    Returns:
        ``(N, ..., Hq, L, Ev)`` in the query's dtype.

    Raises:
        RuntimeError: for the inputs torch's SDPA rejects, with a message naming the argument; for tier 3 with
            inputs that require grad.
        torch.OutOfMemoryError: when no plan fits, naming the shape, dtype, budget and smallest plan tried.
    """
    return attention(
        query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, tier=tier, block_m=block_m,
        block_n=block_n, budget_bytes=budget_bytes,
    ).out
