"""Choose a tier and block sizes for one attention call.

The plan is the fastest tier whose predicted peak working memory fits the budget. "Working memory" is every byte
the call allocates: the output, the softmax statistics, operand copies and the per-block scratch; the inputs are
not counted. Under grad the backward pass must fit too. The prediction is the byte count of the tensors the tier
allocates (see :func:`predict_peak_bytes`), kept conservative; tests check it against the live-bytes tracker.

Preferred block sizes aim at a cache-friendly scores block; the planner only shrinks them to fit the budget.
Deterministic: the same shapes, dtypes, device and budget always give the same plan.

Tier 0 means torch's own SDPA: the fast path for decode-sized queries and problems that trivially fit.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterator, List, Optional, Sequence, Union

import torch

from .budget import resolve_budget
from .device import device_profile
from .problem import AttentionProblem, build_problem
from .tiles import TileMath

__all__ = ["MIN_BLOCK", "Plan", "candidate_plans", "plan", "plan_problem", "predict_peak_bytes"]

MIN_BLOCK = 16
"""The smallest block the planner and the OOM retry go down to."""

_DECODE_MAX_L = 16
_TRIVIAL_SCORE_BYTES = 8 * 1024 * 1024
_MiB = 1024 * 1024
# Preferred scores-block bytes (all heads together for tiers 1-2, one head for tier 3).
_PREFERRED = {
    "cpu": {1: 16 * _MiB, 2: 4 * _MiB, 3: 8 * _MiB},
    "gpu": {1: 512 * _MiB, 2: 128 * _MiB, 3: 64 * _MiB},
}
_TIER_ORDER = {
    ("cpu", False): (3, 1, 2),
    ("cpu", True): (2, 1),  # measured: tier 2's tiled backward beats tier 1's full-row tiles on CPU caches
    ("gpu", False): (1, 2, 3),
    ("gpu", True): (1, 2),
}

TierArg = Union[str, int]


@dataclass(frozen=True)
class Plan:
    """How one attention call runs.

    Attributes:
        tier: 0 (torch's own SDPA), 1, 2 or 3.
        block_m: query rows per block.
        block_n: keys per block (S for tiers 1 and 3).
        peak_bytes: predicted peak working bytes (forward, plus backward when ``requires_grad``).
        budget_bytes: the budget the plan was made for.
        requires_grad: whether the plan covers a backward pass.
        reason: why this plan was chosen.
    """

    tier: int
    block_m: int
    block_n: int
    peak_bytes: int
    budget_bytes: int
    requires_grad: bool = False
    reason: str = ""

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.budget_bytes


def _elt(dtype: torch.dtype) -> int:
    return dtype.itemsize


def predict_peak_bytes(
    problem: AttentionProblem,
    tier: int,
    block_m: int,
    block_n: int,
    requires_grad: bool = False,
    dropout: bool = False,
) -> int:
    """Predicted peak working bytes of running ``tier`` with these blocks on ``problem``.

    Counts the output ``(B, H, G, L, Ev)``, operand copies, softmax statistics and the largest per-block set of
    live tensors; with ``requires_grad`` also the backward pass (gradients, fp32 accumulators and tiles).
    """
    b, h, g, length, s, e, ev = problem.dims
    q = problem.query
    tm = TileMath.for_inputs(q, problem.key, problem.value)
    inp, op, acc = _elt(q.dtype), _elt(tm.operand_dtype), _elt(tm.acc_dtype)
    bhg = b * h * g
    bm = min(block_m, length)
    out = bhg * length * ev * inp
    convert_kv = b * h * s * (e + ev) * op if tm.operand_dtype != q.dtype else 0
    mask_b = 1 if problem.mask is not None and problem.mask.dtype == torch.bool else 0
    per_elt = acc + mask_b + (40 if dropout else 0)
    small = 6 * bhg * bm * acc + 4096
    if tier == 0:
        return 2 * bhg * length * s * acc + out
    if tier == 3:
        one_head = s * (e + ev) * op if tm.operand_dtype != q.dtype else 0
        return out + one_head + g * bm * (s * per_elt + e * 2 * op + ev * acc) + small
    lse = bhg * length * acc
    q_block = bhg * bm * e * 2 * op
    if tier == 1:
        block = bhg * bm * (s * per_elt + 2 * ev * acc)
    else:
        bn = min(block_n, s)
        block = bhg * bm * (bn * per_elt + 2 * ev * acc)
    forward = out + convert_kv + lse + q_block + block + small
    if not requires_grad:
        return forward
    bn = s if tier == 1 else min(block_n, s)
    # Held through the backward: output, lse, the incoming gradient, fp32 gradient accumulators, operand copies.
    grads_acc = (bhg * length * e + b * h * s * (e + ev)) * acc
    grads_out = (bhg * length * e + b * h * s * (e + ev)) * inp if acc != inp else 0
    held = out + lse + bhg * length * ev * inp + grads_acc + convert_kv
    # Per query block: q and dO blocks, D and lse rows, the dq block, and per tile: scores/P, dP/dS, dropout
    # multipliers and the matmul results added into dq, dk and dv.
    row_block = bhg * bm * (2 * e * op + 3 * ev * max(acc, op) + e * acc + 4 * acc)
    tile = bhg * bm * bn * (2 * acc + mask_b + (40 if dropout else 0))
    tile_grads = (bhg * bm * e + 2 * b * h * bn * max(e, ev)) * acc
    backward = held + max(row_block + tile + tile_grads, grads_out) + small
    return max(forward, backward)


def _device_class(device: torch.device) -> str:
    return device_profile(device).device_class


def _preferred_block_m(problem: AttentionProblem, tier: int, device_class: str) -> int:
    b, h, g, length, s, e, ev = problem.dims
    target = _PREFERRED[device_class][tier]
    acc = _elt(TileMath.for_inputs(problem.query, problem.key, problem.value).acc_dtype)
    if tier == 1:
        rows = target // max(1, b * h * g * s * acc)
    elif tier == 2:
        rows = target // max(1, b * h * g * min(s, _preferred_block_n(problem, device_class)) * acc)
    else:
        rows = target // max(1, g * s * acc)
    return _pow2_clip(rows, length)


def _preferred_block_n(problem: AttentionProblem, device_class: str) -> int:
    s = problem.dims[4]
    return min(_pow2_floor(max(s, MIN_BLOCK)), 512 if device_class == "cpu" else 2048)


def _pow2_floor(x: int) -> int:
    return 1 << (max(1, int(x)).bit_length() - 1)


def _pow2_clip(rows: int, length: int) -> int:
    rows = max(MIN_BLOCK, _pow2_floor(max(rows, 1)))
    return min(rows, max(MIN_BLOCK, length))


def _block_ladder(start: int) -> List[int]:
    ladder = [start]
    while ladder[-1] > MIN_BLOCK:
        ladder.append(max(MIN_BLOCK, ladder[-1] // 2))
    return ladder


def candidate_plans(
    problem: AttentionProblem,
    budget_bytes: int,
    requires_grad: bool,
    dropout: bool = False,
    tiers: Optional[Sequence[int]] = None,
    block_m: Optional[int] = None,
    block_n: Optional[int] = None,
) -> Iterator[Plan]:
    """Every plan worth trying, fastest first: each tier in preference order, blocks from preferred to smallest.

    Explicit ``block_m``/``block_n`` pin the first candidate of each tier; the later ones halve from there.
    """
    device_class = _device_class(problem.query.device)
    order = tuple(tiers) if tiers is not None else _TIER_ORDER[(device_class, requires_grad)]
    s = problem.dims[4]
    for tier in order:
        bm0 = block_m or _preferred_block_m(problem, tier, device_class)
        bn0 = (block_n or _preferred_block_n(problem, device_class)) if tier == 2 else max(s, 1)
        for bm in _block_ladder(bm0):
            bns = _block_ladder(bn0) if tier == 2 else [bn0]
            for bn in bns:
                peak = predict_peak_bytes(problem, tier, bm, bn, requires_grad, dropout)
                yield Plan(tier, bm, bn, peak, budget_bytes, requires_grad, "")


def _fast_path_plan(problem: AttentionProblem, budget: int, requires_grad: bool) -> Optional[Plan]:
    b, h, g, length, s, e, ev = problem.dims
    # Math keeps scores and probabilities (and their gradients under grad): about 2 or 4 score-sized tensors.
    math_peak = predict_peak_bytes(problem, 0, length, s) * (2 if requires_grad else 1)
    score_bytes = b * h * g * length * s * 4
    if length <= _DECODE_MAX_L and math_peak <= budget:
        return Plan(0, length, s, math_peak, budget, requires_grad, f"decode-sized query (L={length}): torch SDPA")
    if score_bytes <= _TRIVIAL_SCORE_BYTES and math_peak <= budget:
        return Plan(0, length, s, math_peak, budget, requires_grad, "trivially small problem: torch SDPA")
    return None


def plan_problem(
    problem: AttentionProblem,
    *,
    budget_bytes: Optional[int] = None,
    requires_grad: bool = False,
    dropout: bool = False,
    tier: TierArg = "auto",
    block_m: Optional[int] = None,
    block_n: Optional[int] = None,
) -> Plan:
    """Plan a canonical problem (see :func:`plan`)."""
    budget = resolve_budget(problem.query.device, budget_bytes)
    if tier != "auto":
        first = next(candidate_plans(problem, budget, requires_grad, dropout, (int(tier),), block_m, block_n))
        return replace(first, reason=f"tier {tier} requested")
    if block_m is None and block_n is None and not dropout:
        fast = _fast_path_plan(problem, budget, requires_grad)
        if fast is not None:
            return fast
    cands = list(candidate_plans(problem, budget, requires_grad, dropout, None, block_m, block_n))
    for cand in cands:
        if cand.fits:
            return replace(cand, reason=f"fastest tier that fits {budget / _MiB:.0f} MiB")
    # Nothing fits: the fixed costs (output, gradients) dominate, so take the fastest plan within 5% of the
    # smallest rather than the tiniest blocks.
    floor = min(c.peak_bytes for c in cands) * 1.05
    near = next(c for c in cands if c.peak_bytes <= floor)
    return replace(near, reason=f"nothing fits {budget / _MiB:.0f} MiB; fastest plan within 5% of the smallest")


def plan(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: Optional[torch.Tensor] = None,
    is_causal: bool = False,
    *,
    budget_bytes: Optional[int] = None,
    requires_grad: Optional[bool] = None,
    dropout_p: float = 0.0,
    enable_gqa: bool = False,
    tier: TierArg = "auto",
    block_m: Optional[int] = None,
    block_n: Optional[int] = None,
) -> Plan:
    """Plan an SDPA call: the tier, block sizes and predicted peak working bytes the dispatcher will use.

    Args:
        query, key, value, attn_mask, is_causal: as for SDPA (only shapes, dtypes and device are read).
        budget_bytes: working-memory budget; default from :func:`noflash_core.budget.resolve_budget`.
        requires_grad: plan for a backward pass too; default: whether any input requires grad.

    Returns:
        A :class:`Plan`. ``plan.fits`` is False when even the smallest plan exceeds the budget.
    """
    problem = build_problem(query, key, value, attn_mask, is_causal, None, enable_gqa)
    if requires_grad is None:
        requires_grad = any(t is not None and t.requires_grad for t in (query, key, value, attn_mask))
    return plan_problem(
        problem,
        budget_bytes=budget_bytes,
        requires_grad=requires_grad,
        dropout=dropout_p > 0,
        tier=tier,
        block_m=block_m,
        block_n=block_n,
    )

