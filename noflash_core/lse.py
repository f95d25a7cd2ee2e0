"""Attention that also returns the per-row log-sum-exp, differentiable through both outputs.

``attention_with_lse(q, k, v)`` returns ``out = softmax(S) V`` and ``lse = logsumexp(S, -1)`` with
``S = scale * q k^T`` (masked entries ``-inf``). The log-sum-exp is what sequence-parallel attention needs to merge
partial results computed on different key blocks (Ring Attention, Liu et al. 2023, arXiv:2310.01889; the merge
is the online-softmax rescaling of Milakov & Gimelshein 2018 and FlashAttention, Dao et al. 2022):

    lse = logaddexp(lse_a, lse_b),  out = exp(lse_a - lse) * out_a + exp(lse_b - lse) * out_b.

Forward: tier 1 or tier 2 (both keep the row statistics), O(N) memory. Backward: the tiled recompute of
``backward.py``; the lse output's gradient enters as ``dS = P * (dP - (D - dlse))`` per row, because
``d lse / d S = P``.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Optional, Tuple

import torch

from . import telemetry
from .attention_op import attention_backward_op, attention_forward_op
from .budget import resolve_budget
from .device import device_profile
from .planner import Plan, candidate_plans
from .problem import AttentionProblem, build_problem, validate_arguments

__all__ = ["attention_with_lse", "emit_record", "plan_lse_problem"]

_MiB = 1024 * 1024
Tensor = torch.Tensor


def plan_lse_problem(
    problem: AttentionProblem,
    requires_grad: bool,
    budget_bytes: Optional[int] = None,
    block_m: Optional[int] = None,
    block_n: Optional[int] = None,
) -> Plan:
    """The fastest tier-1 or tier-2 plan (the tiers that return the lse) that fits the budget, else the smallest.

    Args:
        problem: a canonical problem (see ``problem.py``).
        requires_grad: plan for the backward pass too.
        budget_bytes: working-memory budget; default from :func:`noflash_core.budget.resolve_budget`.
        block_m, block_n: pin the block sizes (tier 2 with both pinned, as the planner does).
    """
    budget = resolve_budget(problem.query.device, budget_bytes)
    tiers = (2, 1) if device_profile(problem.query.device).device_class == "cpu" else (1, 2)
    if block_m is not None and block_n is not None:
        tiers = (2,)
    cands = list(candidate_plans(problem, budget, requires_grad, False, tiers, block_m, block_n))
    if block_m is not None or block_n is not None:
        return replace(cands[0], reason="blocks pinned by the caller")
    for cand in cands:
        if cand.fits:
            return replace(cand, reason=f"fastest tier with an lse that fits {budget / _MiB:.0f} MiB")
    smallest = min(cands, key=lambda c: c.peak_bytes)
    return replace(smallest, reason=f"nothing with an lse fits {budget / _MiB:.0f} MiB; the smallest plan")


def emit_record(p: Plan, query: Tensor, key: Tensor, what: str) -> None:
    """Tell telemetry listeners which tier and blocks ``what`` ran (free when nobody listens)."""
    if telemetry.has_listeners() and not torch.compiler.is_compiling():
        telemetry.emit(
            telemetry.CallRecord.of_call("noflash", p.tier, (p.block_m, p.block_n), query, key, f"{what}: {p.reason}")
        )


class _AttentionWithLse(torch.autograd.Function):
    """Canonical ``(q, k, v, mask) -> (out, lse)`` with a backward that takes both output gradients."""

    @staticmethod
    def forward(ctx, q, k, v, mask, is_causal: bool, scale: float, tier: int, block_m: int, block_n: int):
        out, lse = attention_forward_op(q, k, v, mask, is_causal, scale, 0.0, 0, tier, block_m, block_n, False)
        ctx.save_for_backward(q, k, v, mask, out, lse)
        ctx.params = (is_causal, scale, block_m, block_n)
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out: Optional[Tensor], grad_lse: Optional[Tensor]):
        q, k, v, mask, out, lse = ctx.saved_tensors
        is_causal, scale, block_m, block_n = ctx.params
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        mask_grad = mask is not None and ctx.needs_input_grad[3]
        dq, dk, dv, dmask = attention_backward_op(
            grad_out.contiguous(), q, k, v, mask, out, lse, is_causal, scale, 0.0, 0, block_m, block_n, mask_grad,
            False, grad_lse,
        )
        return dq, dk, dv, (dmask if mask_grad else None), None, None, None, None, None


def attention_with_lse(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Optional[Tensor] = None,
    is_causal: bool = False,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
    *,
    budget_bytes: Optional[int] = None,
) -> Tuple[Tensor, Tensor]:
    r"""Exact attention and its per-row log-sum-exp, in O(N) memory, differentiable through both.

    Same arguments and semantics as :func:`noflash_core.scaled_dot_product_attention` without dropout.

    Args:
        query: ``(N, ..., Hq, L, E)``.
        key: ``(N, ..., H, S, E)``.
        value: ``(N, ..., H, S, Ev)``.
        attn_mask: bool (True = takes part) or float (added to the scores), broadcastable to ``(N, ..., Hq, L, S)``.
        is_causal: top-left aligned causal mask; not together with ``attn_mask``.
        scale: defaults to ``1 / sqrt(E)``.
        enable_gqa: query head ``h`` uses key/value head ``h // (Hq // H)``.
        budget_bytes: working-memory budget for the tiles (default: ``NOFLASH_BUDGET_MB`` or the device's).

    Returns:
        ``out`` ``(N, ..., Hq, L, Ev)`` in the query's dtype, and ``lse`` ``(N, ..., Hq, L)``:
        ``logsumexp(scale * q k^T + mask, -1)`` in float32 (float64 for float64 inputs). Rows where every key is
        masked have ``lse = -inf`` and ``out = 0``.

    Raises:
        RuntimeError: for the inputs torch's SDPA rejects, with a message naming the argument.
    """
    if any(getattr(t, "is_nested", False) for t in (query, key, value)):
        raise RuntimeError("attention_with_lse: nested tensors are not supported; pad the batch to one length.")
    validate_arguments(query, key, value, attn_mask, is_causal, enable_gqa)
    problem = build_problem(query, key, value, attn_mask, is_causal, scale, enable_gqa)
    with_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (query, key, value, attn_mask)
    )
    p = plan_lse_problem(problem, with_grad, budget_bytes)
    out, lse = _AttentionWithLse.apply(
        problem.query, problem.key, problem.value, problem.mask, problem.is_causal, problem.scale, p.tier,
        p.block_m, p.block_n,
    )
    emit_record(p, query, key, "attention_with_lse")
    return out.reshape(problem.out_shape), lse.reshape(problem.out_shape[:-1])
