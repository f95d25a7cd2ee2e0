"""Setup shared by the tiled forward tiers and the backward pass: a call's outputs and masks, and one chunk of
batch-head pairs' operands, ready for the tile loops.

Every tier walks the ``B * H`` batch-head pairs in :class:`~noflash_core.tiles.HeadChunk` chunks and, inside a
chunk, blocks of query rows. What a chunk needs before its first block (its views of the query, the key and value
operands in the call's precision, the dropout head index) and how a block's queries are scaled are the same for
all of them, so they are made here once.
"""

# implementation of:
#   the per-chunk operand preparation of a FlashAttention-2 style tiling (query blocks outer, keys as one transposed
#   operand): Dao 2023, "FlashAttention-2", https://arxiv.org/abs/2307.08691

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import torch

from .problem import AttentionProblem
from .tiles import DropoutSpec, HeadChunk, TileMasks, TileMath, head_chunks, head_index

__all__ = ["ChunkTiles", "ForwardSpec", "call_masks", "for_each_chunk", "forward_outputs"]


@dataclass(frozen=True)
class ForwardSpec:
    """How a tier's forward runs, the same for every tier.

    Attributes:
        block_m: query rows per block (per head).
        block_n: keys per tile (tier 2 only).
        block_h: batch-head pairs per step (0: all).
        dropout: the dropout of the call, or None.
        need_lse: also return the row log-sum-exp (tiers 1 and 2; tier 3 keeps none).
        tile_math: the call's precision policy, when the caller already made it (None: from the inputs).
    """

    block_m: int
    block_n: int = 0
    block_h: int = 0
    dropout: Optional[DropoutSpec] = None
    need_lse: bool = True
    tile_math: Optional[TileMath] = None


def forward_outputs(
    problem: AttentionProblem, tile_math: Optional[TileMath], need_lse: bool
) -> Tuple[TileMath, torch.Tensor, Optional[torch.Tensor]]:
    """The call's precision policy and its uninitialised outputs.

    Returns:
        ``tile_math`` (made from the inputs when None), ``out`` ``(B, H, G, L, Ev)`` in the query dtype, and the
        row log-sum-exp ``(B, H, G, L)`` in the accumulator dtype when ``need_lse`` (else None).
    """
    q, k, v = problem.query, problem.key, problem.value
    b, h, g, length, _, _, ev = problem.dims
    tm = tile_math or TileMath.for_inputs(q, k, v)
    out = torch.empty(b, h, g, length, ev, dtype=q.dtype, device=q.device)
    lse = torch.empty(b, h, g, length, dtype=tm.acc_dtype, device=q.device) if need_lse else None
    return tm, out, lse


def call_masks(problem: AttentionProblem, acc_dtype: torch.dtype) -> TileMasks:
    """The call's :class:`TileMasks` (its mask ``(Bm, Hm, Gm, Lm, Sm)`` and causal flag), prepared once."""
    return TileMasks(problem.mask, problem.is_causal, acc_dtype)


def for_each_chunk(
    problem: AttentionProblem,
    tm: TileMath,
    block_h: int,
    dropout: Optional[DropoutSpec],
    run: Callable[[ChunkTiles], None],
    chunks: Optional[List[HeadChunk]] = None,
) -> None:
    """Prepare the call's masks once, then ``run`` each chunk of ``block_h`` batch-head pairs (or ``chunks``).

    Each chunk's operands are made just before its ``run`` and dropped when it returns, so at most one chunk's
    copies are alive at a time.
    """
    masks = call_masks(problem, tm.acc_dtype)
    b, h = problem.dims[:2]
    for chunk in head_chunks(b, h, block_h) if chunks is None else chunks:
        run(ChunkTiles(problem, chunk, masks, tm, dropout))


class ChunkTiles:
    """One :class:`HeadChunk` of a problem, prepared for the tile loops.

    Attributes:
        problem, chunk, tm: the call's problem, this chunk, the precision policy.
        masks: the call's masks restricted to the chunk.
        q: the chunk's query ``(hb, hh, G, L, E)`` (input dtype).
        ko: the key operand ``(hb, hh, S, E)``; ``kt`` its transpose ``(hb, hh, E, S)``.
        vo: the value operand ``(hb, hh, S, Ev)``.
        hb, hh: the chunk's batch and head counts.
        heads: the flat head index ``(hb, hh, G)`` for dropout, or None without dropout.
    """

    def __init__(
        self,
        problem: AttentionProblem,
        chunk: HeadChunk,
        masks: TileMasks,
        tm: TileMath,
        dropout: Optional[DropoutSpec],
    ) -> None:
        self.problem, self.chunk, self.tm = problem, chunk, tm
        self.masks = masks.for_chunk(chunk)
        self.q = chunk.of(problem.query)
        self.ko = tm.operand(chunk.of(problem.key))
        self.kt = self.ko.transpose(-1, -2)
        self.vo = tm.operand(chunk.of(problem.value))
        self.hb, self.hh = self.q.shape[:2]
        g = problem.dims[2]
        if dropout is None:
            self.heads = None
        else:
            self.heads = head_index(self.hb, self.hh, g, self.q.device, offset=chunk.first * g)

    def query_block(self, i0: int, i1: int, scale: float) -> torch.Tensor:
        """Query rows ``i0:i1`` as an operand times ``scale``, flattened to ``(hb, hh, G * (i1 - i0), E)``."""
        _, _, g, _, _, e, _ = self.problem.dims
        return (self.tm.operand(self.q[:, :, :, i0:i1]) * scale).reshape(self.hb, self.hh, g * (i1 - i0), e)
