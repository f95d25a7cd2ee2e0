"""Tier 1: query-chunked attention.

For each chunk of ``block_h`` batch-head pairs and each block of ``block_m`` query rows: scores against every key
the block can see, a softmax with fp32 statistics, then ``P @ V`` written into a preallocated output. Working
memory is ``O(block_h * G * block_m * S)``. Chunking heads rather than rows keeps every score GEMM at least
``G * block_m`` rows tall however many heads and keys there are. Under causal masking a block multiplies only the
keys up to its last row and masks only the diagonal square.
"""

# implementation of:
#   exact softmax attention one query block at a time, as in Rabe and Staats 2021, "Self-attention Does Not Need
#   O(n^2) Memory" (https://arxiv.org/abs/2112.05682), without their key chunking; the per-row log-sum-exp kept for
#   the backward pass follows Dao 2023, "FlashAttention-2" (https://arxiv.org/abs/2307.08691)

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .problem import AttentionProblem
from .tiles import (
    NEG_INF,
    DropoutSpec,
    HeadChunk,
    TileMasks,
    TileMath,
    dropout_keep_scale,
    guard_dead_rows,
    head_chunks,
    head_index,
    row_blocks,
    visible_keys,
)

__all__ = ["tier1_forward"]


def tier1_forward(
    problem: AttentionProblem,
    block_m: int,
    dropout: Optional[DropoutSpec] = None,
    need_lse: bool = True,
    block_h: int = 0,
    tile_math: Optional[TileMath] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Run tier 1.

    Args:
        block_m: query rows per block (per head).
        block_h: batch-head pairs per step (0: all).
        tile_math: the call's precision policy, when the caller already made it.

    Returns:
        ``out`` ``(B, H, G, L, Ev)`` in the query dtype, and the row log-sum-exp ``(B, H, G, L)`` (fp32, fp64 for
        fp64 inputs; ``-inf`` on fully masked rows) when ``need_lse``.
    """
    q, k, v = problem.query, problem.key, problem.value
    b, h, g, length, s, e, ev = problem.dims
    tm = tile_math or TileMath.for_inputs(q, k, v)
    out = torch.empty(b, h, g, length, ev, dtype=q.dtype, device=q.device)
    lse = torch.empty(b, h, g, length, dtype=tm.acc_dtype, device=q.device) if need_lse else None
    if s == 0:  # no keys: every row is empty, as in torch
        out.zero_()
        if lse is not None:
            lse.fill_(NEG_INF)
        return out, lse
    masks = TileMasks(problem.mask, problem.is_causal, tm.acc_dtype)
    for chunk in head_chunks(b, h, block_h):
        _chunk_forward(problem, chunk, masks.for_chunk(chunk), tm, block_m, dropout, out, lse)
    return out, lse


def _chunk_forward(
    problem: AttentionProblem,
    chunk: HeadChunk,
    masks: TileMasks,
    tm: TileMath,
    block_m: int,
    dropout: Optional[DropoutSpec],
    out: torch.Tensor,
    lse: Optional[torch.Tensor],
) -> None:
    """Tier 1 on one chunk of batch-head pairs, writing its rows of ``out`` and ``lse``."""
    _, _, g, length, s, e, ev = problem.dims
    q = chunk.of(problem.query)
    kt = tm.operand(chunk.of(problem.key)).transpose(-1, -2)
    vo = tm.operand(chunk.of(problem.value))
    out_c, lse_c = chunk.of(out), chunk.of(lse)
    hb, hh = q.shape[:2]
    heads = head_index(hb, hh, g, q.device, offset=chunk.first * g) if dropout is not None else None
    for i0, i1 in row_blocks(length, block_m, overlap_last=True):
        bm = i1 - i0
        s_end = visible_keys(i1, s, problem.is_causal)
        qb = (tm.operand(q[:, :, :, i0:i1]) * (problem.scale * masks.units)).reshape(hb, hh, g * bm, e)
        scores = tm.matmul(qb, kt[..., :s_end]).view(hb, hh, g, bm, s_end)
        masks.apply(scores, i0, i1, 0, s_end)
        row_max = scores.amax(-1, keepdim=True)
        if masks.can_die:
            row_max = guard_dead_rows(row_max, NEG_INF, 0.0)
        probs = masks.exp_(scores.sub_(row_max))
        row_sum = probs.sum(-1, keepdim=True)
        if dropout is not None:
            probs.mul_(dropout_keep_scale(dropout, heads, length, s, i0, i1, 0, s_end, probs.dtype))
        ob = tm.matmul(probs.view(hb, hh, g * bm, s_end), vo[..., :s_end, :]).view(hb, hh, g, bm, ev)
        ob.div_(guard_dead_rows(row_sum, 0.0, 1.0) if masks.can_die else row_sum)
        out_c[:, :, :, i0:i1].copy_(ob)
        if lse_c is not None:
            lse_c[:, :, :, i0:i1] = masks.lse(row_max, row_sum).squeeze(-1)
        del scores, probs, ob, qb
