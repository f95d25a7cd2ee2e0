"""The O(N)-memory backward pass shared by tiers 1 and 2.

Nothing of the forward's ``(L, S)`` softmax is kept. For each tile the scores are recomputed and normalised with the
saved row log-sum-exp, giving ``P`` exactly; then

* ``dV += (P * Z)^T dO`` (``Z`` the dropout multiplier, regenerated from the seed),
* ``dP = (dO V^T) * Z`` and ``dS = P * (dP - D)`` with ``D = rowsum(dO * O)``; when the row log-sum-exp is an
  output too, its gradient enters as ``D - dlse`` (``d lse / d S = P``),
* ``dQ += dS K * scale``, ``dK += dS^T (Q * scale)``, and the float mask's gradient is ``dS`` summed over the mask's
  broadcast dims.

Batch-head pairs are processed in chunks of ``block_h`` (each chunk's key and value gradients are complete when
its loop ends). Key blocks above the causal diagonal are never visited. Accumulators are fp32 (fp64 for fp64
inputs). Tier 1's backward is this with ``block_n = S``.
"""

# implementation of:
#   FlashAttention-2 backward (recompute P per tile from the saved log-sum-exp, D = rowsum(dO * O)):
#     Dao 2023, "FlashAttention-2: Faster Attention with Better Parallelism and Work Partitioning",
#     https://arxiv.org/abs/2307.08691

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch

from .chunk_setup import ChunkTiles, for_each_chunk
from .problem import AttentionProblem
from .tiles import (
    NEG_INF,
    DropoutSpec,
    TileMath,
    dropout_keep_scale,
    guard_dead_rows,
    mask_tile,
    row_blocks,
    visible_keys,
)

__all__ = ["attention_backward"]


def _reduce_to(grad: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Sum ``grad`` over the dims where ``shape`` is 1 (broadcast), keeping dims."""
    dims = [d for d, n in enumerate(shape) if n == 1 and grad.shape[d] != 1]
    return grad.sum(dims, keepdim=True) if dims else grad


def attention_backward(
    problem: AttentionProblem,
    out: torch.Tensor,
    lse: torch.Tensor,
    grad_out: torch.Tensor,
    block_m: int,
    block_n: int,
    dropout: Optional[DropoutSpec] = None,
    mask_grad: bool = False,
    grad_lse: Optional[torch.Tensor] = None,
    block_h: int = 0,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Gradients of the canonical problem.

    Args:
        out: forward output ``(B, H, G, L, Ev)``.
        lse: row log-sum-exp ``(B, H, G, L)`` from the forward.
        grad_out: ``(B, H, G, L, Ev)``.
        mask_grad: also return the gradient of the float mask ``(Bm, Hm, Gm, Lm, Sm)``.
        grad_lse: gradient of the row log-sum-exp ``(B, H, G, L)``, or None when the lse is not an output.
        block_h: batch-head pairs per step (0: all).

    Returns:
        ``dq (B, H, G, L, E)``, ``dk (B, H, S, E)``, ``dv (B, H, S, Ev)`` in the input dtype, and the mask gradient
        (mask dtype) or None.
    """
    q, k, v, mask = problem.query, problem.key, problem.value, problem.mask
    b, h, g, length, s, e, ev = problem.dims
    tm = TileMath.for_inputs(q, k, v)
    acc = tm.acc_dtype
    dq = torch.empty(b, h, g, length, e, dtype=q.dtype, device=q.device)
    dk = torch.zeros(b, h, s, e, dtype=k.dtype, device=q.device)
    dv = torch.zeros(b, h, s, ev, dtype=v.dtype, device=q.device)
    dmask = torch.zeros(mask.shape, dtype=acc, device=q.device) if (mask_grad and mask is not None) else None

    def run(t: ChunkTiles) -> None:
        grads = (dq, dk, dv, t.chunk.of_mask(dmask))
        _chunk_backward(t, out, lse, grad_out, t.chunk.of(grad_lse), block_m, block_n, dropout, *grads)

    for_each_chunk(problem, tm, block_h, dropout, run)
    grad_mask = dmask.to(mask.dtype) if dmask is not None else None
    return dq, dk, dv, grad_mask


class _RowBlock(NamedTuple):
    """One block of query rows ``i0:i1`` of a chunk, ready for its key tiles (``n = G * (i1 - i0)`` rows)."""

    i0: int
    i1: int
    qb: torch.Tensor  # (hb, hh, n, E) scaled query operand
    dob: torch.Tensor  # (hb, hh, n, Ev) dO operand
    d_b: torch.Tensor  # (hb, hh, G, bm, 1) D = rowsum(dO * O), minus dlse when the lse is an output
    lse_b: torch.Tensor  # (hb, hh, G, bm, 1) the guarded row log-sum-exp
    dq_b: torch.Tensor  # (hb, hh, n, E) the dq accumulator


def _row_block(t: ChunkTiles, out_c, lse_c, dout_c, grad_lse: Optional[torch.Tensor], i0: int, i1: int) -> _RowBlock:
    _, _, g, _, _, e, ev = t.problem.dims
    acc, masks = t.tm.acc_dtype, t.masks
    bm = i1 - i0
    qb = t.query_block(i0, i1, t.problem.scale * masks.units)
    dout_b = dout_c[:, :, :, i0:i1]
    # D = rowsum(dO * O) and the guarded log-sum-exp, one block at a time (no (L, Ev)-sized temporaries).
    d_b = (dout_b.to(acc) * out_c[:, :, :, i0:i1].to(acc)).sum(-1, keepdim=True)
    if grad_lse is not None:
        d_b = d_b - grad_lse[:, :, :, i0:i1].to(acc).unsqueeze(-1)
    lse_b = guard_dead_rows(lse_c[:, :, :, i0:i1].to(acc).unsqueeze(-1), NEG_INF, float("inf")) * masks.units
    dob = t.tm.operand(dout_b).reshape(t.hb, t.hh, g * bm, ev)
    dq_b = torch.zeros(t.hb, t.hh, g * bm, e, dtype=acc, device=t.q.device)
    return _RowBlock(i0, i1, qb, dob, d_b, lse_b, dq_b)


def _tile_backward(t: ChunkTiles, rb: _RowBlock, j0: int, j1: int, dropout: Optional[DropoutSpec],
                   dk_acc: torch.Tensor, dv_acc: torch.Tensor, dmask: Optional[torch.Tensor]) -> None:
    """Keys ``j0:j1`` of one row block: adds into ``rb.dq_b``, ``dk_acc``, ``dv_acc`` and ``dmask``."""
    problem, masks, tm, hb, hh = t.problem, t.masks, t.tm, t.hb, t.hh
    _, _, g, length, s, _, _ = problem.dims
    i0, i1 = rb.i0, rb.i1
    bm, bn = i1 - i0, j1 - j0
    scores = tm.matmul(rb.qb, t.kt[..., j0:j1]).view(hb, hh, g, bm, bn)
    masks.apply(scores, i0, i1, j0, j1)
    probs = masks.exp_(scores.sub_(rb.lse_b))
    keep = None
    if dropout is not None:
        keep = dropout_keep_scale(dropout, t.heads, length, s, i0, i1, j0, j1, tm.acc_dtype)
        dropped = (probs * keep).view(hb, hh, g * bm, bn)
    else:
        dropped = probs.view(hb, hh, g * bm, bn)
    dv_acc[:, :, j0:j1].add_(tm.matmul(dropped.transpose(-1, -2), rb.dob))
    del dropped
    dp = tm.matmul(rb.dob, t.vo.transpose(-1, -2)[..., j0:j1]).view(hb, hh, g, bm, bn)
    if keep is not None:
        dp.mul_(keep)
        del keep
    ds = dp.sub_(rb.d_b).mul_(probs)
    del probs
    if dmask is not None:
        dm_tile = mask_tile(dmask, i0, i1, j0, j1)
        dm_tile.add_(_reduce_to(ds, dm_tile.shape))
    ds3 = ds.view(hb, hh, g * bm, bn)
    rb.dq_b.add_(tm.matmul(ds3, t.ko[..., j0:j1, :]))
    dk_acc[:, :, j0:j1].add_(tm.matmul(ds3.transpose(-1, -2), rb.qb), alpha=1.0 / masks.units)


def _chunk_backward(
    t: ChunkTiles,
    out: torch.Tensor,
    lse: torch.Tensor,
    grad_out: torch.Tensor,
    grad_lse: Optional[torch.Tensor],
    block_m: int,
    block_n: int,
    dropout: Optional[DropoutSpec],
    dq: torch.Tensor,
    dk: torch.Tensor,
    dv: torch.Tensor,
    dmask: Optional[torch.Tensor],
) -> None:
    """The backward of one chunk of batch-head pairs: writes its slices of ``dq``, ``dk``, ``dv`` and adds into
    ``dmask`` (the chunk's view of the mask gradient)."""
    problem, chunk = t.problem, t.chunk
    _, _, g, length, s, e, _ = problem.dims
    acc = t.tm.acc_dtype
    out_c, lse_c, dout_c, dq_c = chunk.of(out), chunk.of(lse), chunk.of(grad_out), chunk.of(dq)
    # Key and value gradients accumulate in place when they already have the accumulator dtype.
    dk_c, dv_c = chunk.of(dk), chunk.of(dv)
    dk_acc = dk_c if dk_c.dtype == acc else torch.zeros(dk_c.shape, dtype=acc, device=t.q.device)
    dv_acc = dv_c if dv_c.dtype == acc else torch.zeros(dv_c.shape, dtype=acc, device=t.q.device)
    for i0, i1 in row_blocks(length, block_m):
        rb = _row_block(t, out_c, lse_c, dout_c, grad_lse, i0, i1)
        s_end = visible_keys(i1, s, problem.is_causal)
        for j0 in range(0, s_end, block_n):
            _tile_backward(t, rb, j0, min(s_end, j0 + block_n), dropout, dk_acc, dv_acc, dmask)
        dq_c[:, :, :, i0:i1] = rb.dq_b.view(t.hb, t.hh, g, i1 - i0, e).mul_(problem.scale)
        del rb
    if dk_acc is not dk_c:
        dk_c.copy_(dk_acc)
    if dv_acc is not dv_c:
        dv_c.copy_(dv_acc)
