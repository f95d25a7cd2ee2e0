"""Tier 2: online-softmax attention, tiled over queries and keys.

Flash-attention style: for each block of ``block_m`` query rows, walk the keys in blocks of ``block_n`` keeping a
running row max and row sum in fp32 and rescaling the accumulator. Tiles that are entirely masked or above the causal
diagonal are skipped. Working memory is ``O(block_m * block_n)`` per head plus the ``O(block_m * Ev)``
accumulator; nothing is clamped, so results match a float64 reference to rounding.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .problem import AttentionProblem
from .tiles import (
    DropoutSpec,
    TileMath,
    apply_tile_masks,
    causal_tile_state,
    dropout_keep_scale,
    head_index,
    mask_tile,
    tile_is_dead,
)

__all__ = ["tier2_forward"]


def tier2_forward(
    problem: AttentionProblem,
    block_m: int,
    block_n: int,
    dropout: Optional[DropoutSpec] = None,
    need_lse: bool = True,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Run tier 2.

    Returns:
        ``out`` ``(B, H, G, L, Ev)`` in the query dtype, and the row log-sum-exp ``(B, H, G, L)`` (``-inf`` on
        fully masked rows) when ``need_lse``.
    """
    q, k, v = problem.query, problem.key, problem.value
    b, h, g, length, s, e, ev = problem.dims
    tm = TileMath.for_inputs(q, k, v)
    kt = tm.operand(k).transpose(-1, -2)
    vo = tm.operand(v)
    acc_dtype = tm.acc_dtype
    out = torch.empty(b, h, g, length, ev, dtype=q.dtype, device=q.device)
    lse = torch.empty(b, h, g, length, dtype=acc_dtype, device=q.device) if need_lse else None
    neg_inf = float("-inf")
    heads = head_index(b, h, g, q.device) if dropout is not None else None
    for i0 in range(0, length, block_m):
        i1 = min(length, i0 + block_m)
        bm = i1 - i0
        qb = (tm.operand(q[:, :, :, i0:i1]) * problem.scale).reshape(b, h, g * bm, e)
        acc = torch.zeros(b, h, g * bm, ev, dtype=acc_dtype, device=q.device)
        run_max = torch.full((b, h, g, bm, 1), neg_inf, dtype=acc_dtype, device=q.device)
        run_sum = torch.zeros(b, h, g, bm, 1, dtype=acc_dtype, device=q.device)
        for j0 in range(0, s, block_n):
            j1 = min(s, j0 + block_n)
            state = causal_tile_state(i0, i1, j0, j1) if problem.is_causal else 1
            if state == 0:
                break  # every later key block is further above the diagonal
            mtile = mask_tile(problem.mask, i0, i1, j0, j1)
            if tile_is_dead(mtile):
                continue
            scores = tm.matmul(qb, kt[..., j0:j1]).view(b, h, g, bm, j1 - j0)
            apply_tile_masks(scores, mtile, state, i0, j0)
            new_max = torch.maximum(run_max, scores.amax(-1, keepdim=True))
            safe_max = torch.where(new_max == neg_inf, 0.0, new_max)
            probs = scores.sub_(safe_max).exp_()
            correction = (run_max - safe_max).exp_()
            run_sum.mul_(correction).add_(probs.sum(-1, keepdim=True))
            if dropout is not None:
                keep = dropout_keep_scale(dropout, heads, length, s, i0, i1, j0, j1, probs.dtype)
                probs.mul_(keep)
                del keep
            acc.view(b, h, g, bm, ev).mul_(correction)
            acc.add_(tm.matmul(probs.view(b, h, g * bm, j1 - j0), vo[..., j0:j1, :]))
            run_max = new_max
            del scores, probs
        acc5 = acc.view(b, h, g, bm, ev)
        acc5.div_(torch.where(run_sum == 0, 1.0, run_sum))
        out[:, :, :, i0:i1].copy_(acc5)
        if lse is not None:
            lse[:, :, :, i0:i1] = (torch.where(run_max == neg_inf, 0.0, run_max) + run_sum.log()).squeeze(-1)
        del acc, acc5, qb
    return out, lse
