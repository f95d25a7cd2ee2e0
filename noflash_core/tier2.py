"""Tier 2: online-softmax attention, tiled over queries and keys.

For each chunk of ``block_h`` batch-head pairs and each block of ``block_m`` query rows, walk the keys in blocks of
``block_n`` keeping a running row max and row sum in fp32 and rescaling the accumulator. Key blocks above the
causal diagonal are never visited; tiles that cross it are masked right of the diagonal only. Working memory is
``O(block_h * G * block_m * block_n)`` plus the ``O(block_h * G * block_m * Ev)`` accumulator; nothing is clamped,
so results match a float64 reference to rounding.
"""

# implementation of:
#   online softmax: Milakov and Gimelshein 2018, "Online normalizer calculation for softmax",
#     https://arxiv.org/abs/1805.02867
#   FlashAttention-2 forward (query blocks outer, key blocks inner, one rescale per tile, log-sum-exp out):
#     Dao 2023, "FlashAttention-2: Faster Attention with Better Parallelism and Work Partitioning",
#     https://arxiv.org/abs/2307.08691

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .chunk_setup import ChunkTiles, ForwardSpec, for_each_chunk, forward_outputs
from .problem import AttentionProblem
from .tiles import NEG_INF, dropout_keep_scale, guard_dead_rows, row_blocks, visible_keys

__all__ = ["tier2_forward"]


def tier2_forward(problem: AttentionProblem, spec: ForwardSpec) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Run tier 2 on tiles of ``spec.block_m`` query rows by ``spec.block_n`` keys.

    Returns:
        ``out`` ``(B, H, G, L, Ev)`` in the query dtype, and the row log-sum-exp ``(B, H, G, L)`` (``-inf`` on
        fully masked rows) when ``need_lse``.
    """
    tm, out, lse = forward_outputs(problem, spec.tile_math, spec.need_lse)
    for_each_chunk(problem, tm, spec.block_h, spec.dropout, lambda t: _chunk_forward(t, spec, out, lse))
    return out, lse


def _chunk_forward(t: ChunkTiles, spec: ForwardSpec, out: torch.Tensor, lse: Optional[torch.Tensor]) -> None:
    """Tier 2 on one prepared chunk of batch-head pairs, writing its rows of ``out`` and ``lse``."""
    problem, masks, tm, hb, hh = t.problem, t.masks, t.tm, t.hb, t.hh
    _, _, g, length, s, _, ev = problem.dims
    out_c, lse_c = t.chunk.of(out), t.chunk.of(lse)
    acc_dtype, device = tm.acc_dtype, t.q.device
    block_m, block_n, dropout = spec.block_m, spec.block_n, spec.dropout
    for i0, i1 in row_blocks(length, block_m, overlap_last=True):
        bm = i1 - i0
        qb = t.query_block(i0, i1, problem.scale * masks.units)
        acc = torch.zeros(hb, hh, g * bm, ev, dtype=acc_dtype, device=device)
        run_max = torch.full((hb, hh, g, bm, 1), NEG_INF, dtype=acc_dtype, device=device)
        run_sum = torch.zeros(hb, hh, g, bm, 1, dtype=acc_dtype, device=device)
        s_end = visible_keys(i1, s, problem.is_causal)
        for j0 in range(0, s_end, block_n):
            j1 = min(s_end, j0 + block_n)
            scores = tm.matmul(qb, t.kt[..., j0:j1]).view(hb, hh, g, bm, j1 - j0)
            masks.apply(scores, i0, i1, j0, j1)
            new_max = torch.maximum(run_max, scores.amax(-1, keepdim=True))
            safe_max = guard_dead_rows(new_max, NEG_INF, 0.0)
            probs = masks.exp_(scores.sub_(safe_max))
            correction = masks.exp_(run_max - safe_max)
            run_sum.mul_(correction).add_(probs.sum(-1, keepdim=True))
            if dropout is not None:
                keep = dropout_keep_scale(dropout, t.heads, length, s, i0, i1, j0, j1, probs.dtype)
                probs.mul_(keep)
                del keep
            acc.view(hb, hh, g, bm, ev).mul_(correction)
            acc.add_(tm.matmul(probs.view(hb, hh, g * bm, j1 - j0), t.vo[..., j0:j1, :]))
            run_max = new_max
            del scores, probs
        acc5 = acc.view(hb, hh, g, bm, ev)
        acc5.div_(guard_dead_rows(run_sum, 0.0, 1.0))
        out_c[:, :, :, i0:i1].copy_(acc5)
        if lse_c is not None:
            lse_c[:, :, :, i0:i1] = masks.lse(guard_dead_rows(run_max, NEG_INF, 0.0), run_sum).squeeze(-1)
        del acc, acc5, qb
