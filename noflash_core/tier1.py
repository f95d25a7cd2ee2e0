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

from .chunk_setup import ChunkTiles, ForwardSpec, for_each_chunk, forward_outputs
from .problem import AttentionProblem
from .tiles import NEG_INF, DropoutSpec, dropout_keep_scale, guard_dead_rows, row_blocks, visible_keys

__all__ = ["tier1_forward"]


def tier1_forward(problem: AttentionProblem, spec: ForwardSpec) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Run tier 1 (``spec.block_n`` is not used: a block sees all its keys at once).

    Returns:
        ``out`` ``(B, H, G, L, Ev)`` in the query dtype, and the row log-sum-exp ``(B, H, G, L)`` (fp32, fp64 for
        fp64 inputs; ``-inf`` on fully masked rows) when ``need_lse``.
    """
    tm, out, lse = forward_outputs(problem, spec.tile_math, spec.need_lse)
    if problem.dims[4] == 0:  # no keys: every row is empty, as in torch
        out.zero_()
        if lse is not None:
            lse.fill_(NEG_INF)
        return out, lse
    for_each_chunk(
        problem, tm, spec.block_h, spec.dropout, lambda t: _chunk_forward(t, spec.block_m, spec.dropout, out, lse)
    )
    return out, lse


def _chunk_forward(
    t: ChunkTiles, block_m: int, dropout: Optional[DropoutSpec], out: torch.Tensor, lse: Optional[torch.Tensor]
) -> None:
    """Tier 1 on one prepared chunk of batch-head pairs, writing its rows of ``out`` and ``lse``."""
    problem, masks, tm, hb, hh = t.problem, t.masks, t.tm, t.hb, t.hh
    _, _, g, length, s, _, ev = problem.dims
    out_c, lse_c = t.chunk.of(out), t.chunk.of(lse)
    for i0, i1 in row_blocks(length, block_m, overlap_last=True):
        bm = i1 - i0
        s_end = visible_keys(i1, s, problem.is_causal)
        qb = t.query_block(i0, i1, problem.scale * masks.units)
        scores = tm.matmul(qb, t.kt[..., :s_end]).view(hb, hh, g, bm, s_end)
        masks.apply(scores, i0, i1, 0, s_end)
        row_max = scores.amax(-1, keepdim=True)
        if masks.can_die:
            row_max = guard_dead_rows(row_max, NEG_INF, 0.0)
        probs = masks.exp_(scores.sub_(row_max))
        row_sum = probs.sum(-1, keepdim=True)
        if dropout is not None:
            probs.mul_(dropout_keep_scale(dropout, t.heads, length, s, i0, i1, 0, s_end, probs.dtype))
        ob = tm.matmul(probs.view(hb, hh, g * bm, s_end), t.vo[..., :s_end, :]).view(hb, hh, g, bm, ev)
        ob.div_(guard_dead_rows(row_sum, 0.0, 1.0) if masks.can_die else row_sum)
        out_c[:, :, :, i0:i1].copy_(ob)
        if lse_c is not None:
            lse_c[:, :, :, i0:i1] = masks.lse(row_max, row_sum).squeeze(-1)
        del scores, probs, ob, qb
