"""Tier 3: minimum-memory attention for inference.

One chunk of ``block_h`` (batch, kv-head) pairs at a time (down to a single pair), one block of query rows at a
time, with a single scratch buffer for the scores that every block reuses: ``out=`` matmuls and torch's softmax run
in place on it. Working memory is ``O(block_h * G * block_m * S)`` for the scratch plus one chunk's operand copies.
Under causal masking a block multiplies only the keys up to its last row and masks only the diagonal square. It
keeps no softmax statistics, so it has no backward.
"""

# implementation of:
#   exact softmax attention one query block at a time (Rabe and Staats 2021, "Self-attention Does Not Need O(n^2)
#   Memory", https://arxiv.org/abs/2112.05682, without their key chunking), in one reused scratch buffer

from __future__ import annotations

from typing import Optional

import torch

from .chunk_setup import ChunkTiles, ForwardSpec, for_each_chunk, forward_outputs
from .problem import AttentionProblem, tier3_grad_error
from .tiles import (
    DropoutSpec,
    HeadChunk,
    dropout_keep_scale,
    head_chunks,
    row_blocks,
    visible_keys,
    zero_dead_rows_,
)

__all__ = ["tier3_forward"]


def tier3_forward(problem: AttentionProblem, spec: ForwardSpec) -> torch.Tensor:
    """Run tier 3 under no_grad (``spec.block_n`` and ``spec.need_lse`` are not used: it keeps no statistics).

    Returns:
        ``out`` ``(B, H, G, L, Ev)`` in the query dtype.
    """
    if torch.is_grad_enabled() and any(t.requires_grad for t in (problem.query, problem.key, problem.value)):
        raise tier3_grad_error()
    b, h, g, length, s, _, ev = problem.dims
    tm, out, _ = forward_outputs(problem, spec.tile_math, need_lse=False)
    if s == 0:  # no keys: every row is empty, as in torch
        return out.zero_()
    block_m, dropout = spec.block_m, spec.dropout
    chunks = head_chunks(b, h, spec.block_h)
    pairs = max(_pairs(c, b, h) for c in chunks)
    rows = pairs * g * min(block_m, length)
    scratch = torch.empty(rows * s, dtype=tm.acc_dtype, device=out.device)
    ob_buf = torch.empty(rows * ev, dtype=tm.acc_dtype, device=out.device)

    def run(t: ChunkTiles) -> None:
        _chunk_forward(t, block_m, dropout, out, scratch, ob_buf)

    with torch.no_grad():
        for_each_chunk(problem, tm, spec.block_h, dropout, run, chunks)
    return out


def _pairs(chunk: HeadChunk, b: int, h: int) -> int:
    return len(range(b)[chunk.batch]) * len(range(h)[chunk.heads])


def _chunk_forward(
    t: ChunkTiles,
    block_m: int,
    dropout: Optional[DropoutSpec],
    out: torch.Tensor,
    scratch: torch.Tensor,
    ob_buf: torch.Tensor,
) -> None:
    """Tier 3 on one prepared chunk of batch-head pairs, writing its rows of ``out``."""
    problem, masks, tm, hb, hh = t.problem, t.masks, t.tm, t.hb, t.hh
    _, _, g, length, s, _, ev = problem.dims
    out_c = t.chunk.of(out)
    for i0, i1 in row_blocks(length, block_m, overlap_last=True):
        bm = i1 - i0
        s_end = visible_keys(i1, s, problem.is_causal)
        qb = t.query_block(i0, i1, problem.scale)
        scores = scratch[: hb * hh * g * bm * s_end].view(hb, hh, g * bm, s_end)
        tm.matmul(qb, t.kt[..., :s_end], out=scores)
        s5 = scores.view(hb, hh, g, bm, s_end)
        masks.apply(s5, i0, i1, 0, s_end)
        # A row with every key hidden has max -inf; softmax makes it NaN, its output must be 0 (as math's).
        row_max = scores.amax(-1, keepdim=True) if masks.can_die else None
        torch.ops.aten._softmax.out(scores, -1, False, out=scores)  # in place: fewer passes than by hand
        if dropout is not None:
            s5.mul_(dropout_keep_scale(dropout, t.heads, length, s, i0, i1, 0, s_end, scores.dtype))
        ob = ob_buf[: hb * hh * g * bm * ev].view(hb, hh, g * bm, ev)
        tm.matmul(scores, t.vo[..., :s_end, :], out=ob)
        if row_max is not None:
            zero_dead_rows_(ob, row_max)
        out_c[:, :, :, i0:i1].copy_(ob.view(hb, hh, g, bm, ev))
        del qb, row_max  # before the next block's copies are made
