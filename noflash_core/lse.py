"""Attention that also returns the per-row log-sum-exp, differentiable through both outputs.

``attention_with_lse(q, k, v)`` returns ``out = softmax(S) V`` and ``lse = logsumexp(S, -1)`` with
``S = scale * q k^T`` (masked entries ``-inf``). The log-sum-exp is what sequence-parallel attention needs to merge
partial results computed on different key blocks (Ring Attention, Liu et al. 2023, arXiv:2310.01889; the merge
is the online-softmax rescaling of Milakov & Gimelshein 2018 and FlashAttention, Dao et al. 2022):

    lse = logaddexp(lse_a, lse_b),  out = exp(lse_a - lse) * out_a + exp(lse_b - lse) * out_b.

It is :func:`noflash_core.attention` with ``return_lse=True`` (the same validation, plan cache and out-of-memory
retry): forward on tier 1 or tier 2 (both keep the row statistics), O(N) memory; backward the tiled recompute of
``backward.py``, where the lse output's gradient enters as ``dS = P * (dP - (D - dlse))`` per row, because
``d lse / d S = P``.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .dispatch import attention

__all__ = ["attention_with_lse"]

Tensor = torch.Tensor


def attention_with_lse(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Optional[Tensor] = None,
    is_causal: bool = False,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
    *,
    budget_bytes: Optional[int] = None,
) -> Tuple[Tensor, Tensor]:
    r"""Exact attention and its per-row log-sum-exp, in O(N) memory, differentiable through both.

    Same arguments and semantics as :func:`noflash_core.scaled_dot_product_attention` without dropout.

    Args:
        query: ``(N, ..., Hq, L, E)``.
        key: ``(N, ..., H, S, E)``.
        value: ``(N, ..., H, S, Ev)``.
        attn_mask: bool (True = takes part) or float (added to the scores), broadcastable to ``(N, ..., Hq, L, S)``.
        is_causal: top-left aligned causal mask; not together with ``attn_mask``.
        scale: defaults to ``1 / sqrt(E)``.
        enable_gqa: query head ``h`` uses key/value head ``h // (Hq // H)``.
        budget_bytes: working-memory budget for the tiles (default: ``NOFLASH_BUDGET_MB`` or the device's).

    Returns:
        ``out`` ``(N, ..., Hq, L, Ev)`` in the query's dtype, and ``lse`` ``(N, ..., Hq, L)``:
        ``logsumexp(scale * q k^T + mask, -1)`` in float32 (float64 for float64 inputs). Rows where every key is
        masked have ``lse = -inf`` and ``out = 0``.

    Raises:
        RuntimeError: for the inputs torch's SDPA rejects, with a message naming the argument.
    """
    result = attention(query, key, value, attn_mask, 0.0, is_causal, scale, enable_gqa, budget_bytes=budget_bytes,
                       return_lse=True)
    return result.out, result.lse
