"""The O(N)-memory backward pass shared by tiers 1 and 2.

Flash-attention style: nothing of the forward's ``(L, S)`` softmax is kept. For each tile the scores are recomputed
and normalised with the saved row log-sum-exp, giving ``P`` exactly; then

* ``dV += (P * Z)^T dO`` (``Z`` the dropout multiplier, regenerated from the seed),
* ``dP = (dO V^T) * Z`` and ``dS = P * (dP - D)`` with ``D = rowsum(dO * O)``; when the row log-sum-exp is an
  output too, its gradient enters as ``D - dlse`` (``d lse / d S = P``),
* ``dQ += dS K * scale``, ``dK += dS^T (Q * scale)``, and the float mask's gradient is ``dS`` summed over the mask's
  broadcast dims.

Accumulators are fp32 (fp64 for fp64 inputs). Tier 1's backward is this with ``block_n = S``.
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
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Gradients of the canonical problem.

    Args:
        out: forward output ``(B, H, G, L, Ev)``.
        lse: row log-sum-exp ``(B, H, G, L)`` from the forward.
        grad_out: ``(B, H, G, L, Ev)``.
        mask_grad: also return the gradient of the float mask ``(Bm, Hm, Gm, Lm, Sm)``.
        grad_lse: gradient of the row log-sum-exp ``(B, H, G, L)``, or None when the lse is not an output.

    Returns:
        ``dq (B, H, G, L, E)``, ``dk (B, H, S, E)``, ``dv (B, H, S, Ev)`` in the input dtype, and the mask gradient
        (mask dtype) or None.
    """
    q, k, v, mask = problem.query, problem.key, problem.value, problem.mask
    b, h, g, length, s, e, ev = problem.dims
    tm = TileMath.for_inputs(q, k, v)
    acc = tm.acc_dtype
    ko = tm.operand(k)
    kt = ko.transpose(-1, -2)
    vt = tm.operand(v).transpose(-1, -2)
    dq = torch.empty(b, h, g, length, e, dtype=acc, device=q.device)
    dk = torch.zeros(b, h, s, e, dtype=acc, device=q.device)
    dv = torch.zeros(b, h, s, ev, dtype=acc, device=q.device)
    dmask = torch.zeros(mask.shape, dtype=acc, device=q.device) if (mask_grad and mask is not None) else None
    heads = head_index(b, h, g, q.device) if dropout is not None else None
    for i0 in range(0, length, block_m):
        i1 = min(length, i0 + block_m)
        bm = i1 - i0
        qb = (tm.operand(q[:, :, :, i0:i1]) * problem.scale).reshape(b, h, g * bm, e)
        dout_b = grad_out[:, :, :, i0:i1]
        # D = rowsum(dO * O) and the safe log-sum-exp, one block at a time (no (L, Ev)-sized temporaries).
        d_b = (dout_b.to(acc) * out[:, :, :, i0:i1].to(acc)).sum(-1, keepdim=True)
        if grad_lse is not None:
            d_b = d_b - grad_lse[:, :, :, i0:i1].to(acc).unsqueeze(-1)
        lse_b = lse[:, :, :, i0:i1].to(acc).unsqueeze(-1)
        lse_b = torch.where(lse_b == float("-inf"), float("inf"), lse_b)
        dob = tm.operand(dout_b).reshape(b, h, g * bm, ev)
        dq_b = torch.zeros(b, h, g * bm, e, dtype=acc, device=q.device)
        for j0 in range(0, s, block_n):
            j1 = min(s, j0 + block_n)
            bn = j1 - j0
            state = causal_tile_state(i0, i1, j0, j1) if problem.is_causal else 1
            if state == 0:
                break
            mtile = mask_tile(mask, i0, i1, j0, j1)
            if tile_is_dead(mtile):
                continue
            scores = tm.matmul(qb, kt[..., j0:j1]).view(b, h, g, bm, bn)
            apply_tile_masks(scores, mtile, state, i0, j0)
            probs = scores.sub_(lse_b).exp_()
            keep = None
            if dropout is not None:
                keep = dropout_keep_scale(dropout, heads, length, s, i0, i1, j0, j1, acc)
                dropped = (probs * keep).view(b, h, g * bm, bn)
            else:
                dropped = probs.view(b, h, g * bm, bn)
            dv[:, :, j0:j1].add_(tm.matmul(dropped.transpose(-1, -2), dob))
            del dropped
            dp = tm.matmul(dob, vt[..., j0:j1]).view(b, h, g, bm, bn)
            if keep is not None:
                dp.mul_(keep)
                del keep
            ds = dp.sub_(d_b).mul_(probs)
            del probs
            if dmask is not None:
                mask_tile(dmask, i0, i1, j0, j1).add_(_reduce_to(ds, dmask.shape))
            ds3 = ds.view(b, h, g * bm, bn)
            dq_b.add_(tm.matmul(ds3, ko[..., j0:j1, :]))
            dk[:, :, j0:j1].add_(tm.matmul(ds3.transpose(-1, -2), qb))
            del ds, ds3, dp, scores
        dq[:, :, :, i0:i1] = dq_b.view(b, h, g, bm, e).mul_(problem.scale)
        del dq_b, qb, dob
    grad_mask = dmask.to(mask.dtype) if dmask is not None else None
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), grad_mask
