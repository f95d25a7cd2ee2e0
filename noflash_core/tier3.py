"""Tier 3: minimum-memory attention for inference.

One (batch, kv-head) pair at a time, one block of query rows at a time, with a single scratch buffer for the scores
that every block reuses through ``out=`` matmuls and in-place softmax steps. Working memory is ``O(G * block_m * S)``
for the scratch plus one head's operand copies. It keeps no softmax statistics, so it has no backward.
"""

from __future__ import annotations

from typing import Optional

import torch

from .problem import AttentionProblem, tier3_grad_error
from .tiles import DropoutSpec, TileMath, apply_tile_masks, causal_tile_state, dropout_keep_scale, head_index, mask_tile

__all__ = ["tier3_forward"]


def _head_slice(mask: Optional[torch.Tensor], bi: int, hi: int) -> Optional[torch.Tensor]:
    """The ``(1, 1, Gm, Lm, Sm)`` part of a canonical mask for batch ``bi`` and kv head ``hi``."""
    if mask is None:
        return None
    bsel = bi if mask.shape[0] != 1 else 0
    hsel = hi if mask.shape[1] != 1 else 0
    return mask[bsel : bsel + 1, hsel : hsel + 1]


def tier3_forward(
    problem: AttentionProblem, block_m: int, dropout: Optional[DropoutSpec] = None
) -> torch.Tensor:
    """Run tier 3 under no_grad.

    Returns:
        ``out`` ``(B, H, G, L, Ev)`` in the query dtype.
    """
    if torch.is_grad_enabled() and any(t.requires_grad for t in (problem.query, problem.key, problem.value)):
        raise tier3_grad_error()
    q, k, v = problem.query, problem.key, problem.value
    b, h, g, length, s, e, ev = problem.dims
    tm = TileMath.for_inputs(q, k, v)
    out = torch.empty(b, h, g, length, ev, dtype=q.dtype, device=q.device)
    if s == 0:  # no keys: every row is empty, as in torch
        return out.zero_()
    rows = g * min(block_m, length)
    scratch = torch.empty(rows * s, dtype=tm.acc_dtype, device=q.device)
    ob_buf = torch.empty(rows * ev, dtype=tm.acc_dtype, device=q.device)
    can_die = problem.mask is not None
    with torch.no_grad():
        kt = vo = None
        for bi in range(b):
            for hi in range(h):
                del kt, vo  # free the previous head's operand copies before making this head's
                kt = tm.operand(k[bi, hi]).transpose(0, 1)
                vo = tm.operand(v[bi, hi])
                head_mask = _head_slice(problem.mask, bi, hi)
                for i0 in range(0, length, block_m):
                    i1 = min(length, i0 + block_m)
                    bm = i1 - i0
                    s_end = min(s, i1) if problem.is_causal else s
                    qb = (tm.operand(q[bi, hi, :, i0:i1]) * problem.scale).reshape(g * bm, e)
                    scores = scratch[: g * bm * s_end].view(g * bm, s_end)
                    if tm.operand_dtype == tm.acc_dtype:
                        torch.matmul(qb, kt[:, :s_end], out=scores)
                    else:
                        scores.copy_(tm.matmul(qb, kt[:, :s_end]))
                    s5 = scores.view(1, 1, g, bm, s_end)
                    state = causal_tile_state(i0, i1, 0, s_end) if problem.is_causal else 1
                    apply_tile_masks(s5, mask_tile(head_mask, i0, i1, 0, s_end), state, i0, 0)
                    row_max = scores.amax(-1, keepdim=True)
                    if can_die:
                        row_max.masked_fill_(row_max == float("-inf"), 0.0)
                    scores.sub_(row_max).exp_()
                    row_sum = scores.sum(-1, keepdim=True)
                    if can_die:
                        row_sum.masked_fill_(row_sum == 0, 1.0)
                    if dropout is not None:
                        heads = head_index(1, 1, g, q.device, offset=(bi * h + hi) * g)
                        s5.mul_(dropout_keep_scale(dropout, heads, length, s, i0, i1, 0, s_end, scores.dtype))
                    ob = ob_buf[: g * bm * ev].view(g * bm, ev)
                    if tm.operand_dtype == tm.acc_dtype:
                        torch.matmul(scores, vo[:s_end], out=ob)
                    else:
                        ob.copy_(tm.matmul(scores, vo[:s_end]))
                    ob.div_(row_sum)
                    out[bi, hi, :, i0:i1].copy_(ob.view(g, bm, ev))
                    del qb  # before the next block's copy is made
    return out
