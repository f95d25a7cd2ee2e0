"""The plans a tuning run measures: exact plans of every tier around the planner's preferred blocks.

Each candidate comes from :func:`noflash_core.planner.candidate_plans` (pinned to one tier and, for the
neighbours, one query block size), so its peak bytes are the planner's own prediction and only plans that fit the
budget are kept. The model's plan is always first, so a tuning run can never pick something slower than what the
planner would have run without measuring it. Candidates are ordered round-robin over the tiers so that a short
list (ComfyUI's first run) still holds every tier's preferred plan.
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Tuple

from ..planner import MIN_BLOCK, Plan, candidate_plans
from ..problem import AttentionProblem

__all__ = ["plan_key", "tuning_candidates"]

_BLOCK_M_FACTORS = (1.0, 2.0, 0.5, 0.25)
_BLOCK_N_FACTORS = (2.0, 0.5)


def plan_key(plan: Plan, pairs: int) -> Tuple[int, int, int, int]:
    """``(tier, block_m, block_n, block_h)`` with ``block_h`` 0 for "all pairs"."""
    bh = 0 if plan.block_h <= 0 or plan.block_h >= pairs else plan.block_h
    return plan.tier, plan.block_m, plan.block_n, bh


def _acceptable(plan: Plan, model: Plan) -> bool:
    # When nothing fits the budget, plans no bigger than the model's (the smallest within 5%) are fair game.
    return plan.fits or (not model.fits and plan.peak_bytes <= model.peak_bytes)


def _first(plans: Iterable[Plan], model: Plan) -> Optional[Plan]:
    return next((p for p in plans if _acceptable(p, model)), None)


def _tier_grid(problem: AttentionProblem, model: Plan, tier: int) -> List[Plan]:
    """One tier's preferred plan, then its neighbours (query blocks ×2, ×½, ×¼; tier 2 also key blocks ×2, ×½)."""
    length = max(problem.dims.l, 1)
    budget, grad = model.budget_bytes, model.requires_grad
    preferred = _first(candidate_plans(problem, budget, grad, False, (tier,)), model)
    if preferred is None:
        return []
    grid = [preferred]
    for factor in _BLOCK_M_FACTORS[1:]:
        bm = max(MIN_BLOCK, min(length, int(preferred.block_m * factor)))
        found = _first(candidate_plans(problem, budget, grad, False, (tier,), bm), model)
        if found is not None:
            grid.append(found)
    if tier == 2:
        for factor in _BLOCK_N_FACTORS:
            bn = max(MIN_BLOCK, int(preferred.block_n * factor))
            found = _first(candidate_plans(problem, budget, grad, False, (tier,), preferred.block_m, bn), model)
            if found is not None:
                grid.append(found)
    return grid


def tuning_candidates(problem: AttentionProblem, model: Plan, limit: int = 8) -> List[Plan]:
    """Up to ``limit`` distinct exact plans that fit ``model.budget_bytes``: ``model`` first, then the tiers'
    grids taken round-robin (tier 3 only without grad)."""
    tiers = (1, 2) if model.requires_grad else (1, 2, 3)
    pairs = problem.dims.b * problem.dims.h
    grids = [_tier_grid(problem, model, t) for t in tiers]
    out: Dict[Tuple[int, int, int, int], Plan] = {}
    if model.tier != 0:
        out[plan_key(model, pairs)] = model
    depth = max((len(g) for g in grids), default=0)
    for i in range(depth):
        for grid in grids:
            if i < len(grid) and len(out) < limit:
                out.setdefault(plan_key(grid[i], pairs), grid[i])
    return list(out.values())[: max(1, limit)]
