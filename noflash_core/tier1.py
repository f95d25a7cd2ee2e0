"""Tier 1: query-chunked attention.

For each block of ``block_m`` query rows: scores against every key, a softmax with fp32 statistics, then ``P @ V``
written into a preallocated output. Working memory is ``O(block_m * S)`` per head. Under causal masking a block
only multiplies the keys it can see.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .problem import AttentionProblem
from .tiles import DropoutSpec, TileMath, apply_tile_masks, causal_tile_state, dropout_keep_scale, head_index, mask_tile

__all__ = ["tier1_forward"]


def tier1_forward(
    problem: AttentionProblem, block_m: int, dropout: Optional[DropoutSpec] = None, need_lse: bool = True
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Run tier 1.

    Returns:
        ``out`` ``(B, H, G, L, Ev)`` in the query dtype, and the row log-sum-exp ``(B, H, G, L)`` (fp32, fp64 for
        fp64 inputs; ``-inf`` on fully masked rows) when ``need_lse``.
    """
    q, k, v = problem.query, problem.key, problem.value
    b, h, g, length, s, e, ev = problem.dims
    tm = TileMath.for_inputs(q, k, v)
    kt = tm.operand(k).transpose(-1, -2)
    vo = tm.operand(v)
    out = torch.empty(b, h, g, length, ev, dtype=q.dtype, device=q.device)
    lse = torch.empty(b, h, g, length, dtype=tm.acc_dtype, device=q.device) if need_lse else None
    if s == 0:  # no keys: every row is empty, as in torch
        out.zero_()
        if lse is not None:
            lse.fill_(float("-inf"))
        return out, lse
    can_die = problem.mask is not None
    heads = head_index(b, h, g, q.device) if dropout is not None else None
    for i0 in range(0, length, block_m):
        i1 = min(length, i0 + block_m)
        bm = i1 - i0
        s_end = min(s, i1) if problem.is_causal else s
        qb = (tm.operand(q[:, :, :, i0:i1]) * problem.scale).reshape(b, h, g * bm, e)
        scores = tm.matmul(qb, kt[..., :s_end]).view(b, h, g, bm, s_end)
        state = causal_tile_state(i0, i1, 0, s_end) if problem.is_causal else 1
        apply_tile_masks(scores, mask_tile(problem.mask, i0, i1, 0, s_end), state, i0, 0)
        row_max = scores.amax(-1, keepdim=True)
        if can_die:
            row_max = torch.where(row_max == float("-inf"), 0.0, row_max)
        probs = scores.sub_(row_max).exp_()
        row_sum = probs.sum(-1, keepdim=True)
        if dropout is not None:
            probs.mul_(dropout_keep_scale(dropout, heads, length, s, i0, i1, 0, s_end, probs.dtype))
        ob = tm.matmul(probs.view(b, h, g * bm, s_end), vo[..., :s_end, :]).view(b, h, g, bm, ev)
        ob.div_(torch.where(row_sum == 0, 1.0, row_sum) if can_die else row_sum)
        out[:, :, :, i0:i1].copy_(ob)
        if lse is not None:
            lse[:, :, :, i0:i1] = (row_max + row_sum.log()).squeeze(-1)
        del scores, probs, ob, qb
    return out, lse
