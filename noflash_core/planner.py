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
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import torch

from .budget import resolve_budget
from .device import device_profile
from .problem import AttentionProblem, build_problem
from .tiles import TileMath
from .tune.lookup import TunedPlan, entry_plans, tuned_entry
from .tune.session import active_hook

__all__ = [
    "MIN_BLOCK",
    "MIN_GEMM_ROWS",
    "Plan",
    "candidate_plans",
    "plan",
    "plan_problem",
    "planning_math",
    "predict_peak_bytes",
]

MIN_BLOCK = 16
"""The smallest block the planner and the OOM retry go down to."""

_DECODE_MAX_L = 16
_TRIVIAL_SCORE_BYTES = 8 * 1024 * 1024
_MiB = 1024 * 1024
# Preferred scores-block bytes per step (all batch-head pairs of the step together).
# CPU figures are measured (bench/results/cpu-epyc-2core); GPU figures are unmeasured guesses.
_PREFERRED = {
    "cpu": {1: 16 * _MiB, 2: 4 * _MiB, 3: 16 * _MiB},
    "gpu": {1: 512 * _MiB, 2: 128 * _MiB, 3: 64 * _MiB},
}
# CPU orders are measured; GPU orders are unmeasured (no GPU has run them yet).
_TIER_ORDER = {
    ("cpu", False): (3, 1, 2),
    ("cpu", True): (2, 1),  # measured: tier 2's tiled backward beats tier 1's full-row tiles on CPU caches
    ("gpu", False): (1, 2, 3),
    ("gpu", True): (1, 2),
}
MIN_GEMM_ROWS = 128
"""Score GEMMs get at least this many rows (``G * block_m``, or ``G * L`` when shorter): the planner chunks
batch-head pairs rather than shrink query blocks below it, until only the budget can make it shrink them."""
_CAUSAL_ROW_SHARE = 16
"""Under causal masking tiers 1 and 3 multiply a block's keys up to its last row; query blocks of at most
``L / 16`` rows keep that extra work (the upper half of each diagonal square) near 1/32 of the visible half."""

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
        block_h: batch-head pairs per step; 0 means all.
        source: ``"model"`` when the planner's cost model chose it, ``"tuned"`` when a measurement on this device
            (the tuning cache, :mod:`noflash_core.tune`) did.
    """

    tier: int
    block_m: int
    block_n: int
    peak_bytes: int
    budget_bytes: int
    requires_grad: bool = False
    reason: str = ""
    block_h: int = 0
    source: str = "model"

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.budget_bytes


def _elt(dtype: torch.dtype) -> int:
    return dtype.itemsize


def planning_math(problem: AttentionProblem) -> TileMath:
    """The precision policy the planner assumes: read from shapes, dtypes and the device alone (no host read)."""
    return TileMath.for_inputs(problem.query, problem.key, problem.value, read_values=False)


def predict_peak_bytes(
    problem: AttentionProblem,
    tier: int,
    block_m: int,
    block_n: int,
    requires_grad: bool = False,
    dropout: bool = False,
    *,
    block_h: int = 0,
    tile_math: Optional[TileMath] = None,
) -> int:
    """Predicted peak working bytes of running ``tier`` with these blocks on ``problem``.

    Counts the output ``(B, H, G, L, Ev)``, operand copies, softmax statistics, the prepared masks and the largest
    per-step set of live tensors; with ``requires_grad`` also the backward pass (gradients, fp32 accumulators and
    tiles). ``block_h`` batch-head pairs run per step (0: all). The figures mirror the allocations of ``tier1.py``,
    ``tier2.py``, ``tier3.py`` and ``backward.py``; tests hold them against the live-bytes tracker.
    """
    b, h, g, length, s, e, ev = problem.dims
    q = problem.query
    tm = tile_math or planning_math(problem)
    inp, op, acc = _elt(q.dtype), _elt(tm.operand_dtype), _elt(tm.acc_dtype)
    pairs = b * h
    bhg = pairs * g
    bm = max(1, min(block_m, length))
    out = bhg * length * ev * inp
    mask = problem.mask
    mask_b = 1 if mask is not None and mask.dtype == torch.bool and mask.shape[-2] != 1 else 0
    # A key-padding bool mask becomes a 0/-inf bias once per call (its negation is transient).
    mask_prep = mask.numel() * (acc + 1) if mask is not None and mask.dtype == torch.bool and mask_b == 0 else 0
    # Per score element: the fp32 score, its half copy for the P @ V matmul (half operands), a bool mask tile's
    # negation and the dropout hash temporaries.
    half_p = op if op != acc else 0
    per_elt = acc + half_p + mask_b + (40 if dropout else 0)
    if tier == 0:
        # torch's math SDPA: scores and probabilities; half inputs are upcast (q, k, v and the output in fp32).
        half = q.dtype in (torch.float16, torch.bfloat16)
        upcast = (bhg * length * (e + ev) + pairs * s * (e + ev)) * acc if half else 0
        return 2 * bhg * length * s * acc + out + upcast
    s_vis = min(s, length) if problem.is_causal else s  # keys the last query block can see
    hc = pairs if block_h <= 0 else min(block_h, pairs)
    hg = hc * g
    small = 6 * hg * bm * acc + 4096
    if tier == 3:
        # One reused scratch for the scores and one for P @ V; the chunk's operand copies.
        chunk_kv = hc * s * (e + ev) * op if tm.operand_dtype != q.dtype else 0
        causal = 4 * bm * bm if problem.is_causal else 0
        return out + mask_prep + chunk_kv + causal + hg * bm * (s_vis * per_elt + e * 2 * op + ev * acc) + small
    bn = s_vis if tier == 1 else max(1, min(block_n, s_vis))
    causal = 4 * bm * min(bm, bn) if problem.is_causal else 0
    convert_kv = hc * s * (e + ev) * op if tm.operand_dtype != q.dtype else 0
    lse = bhg * length * acc
    q_block = hg * bm * e * 2 * op
    block = hg * bm * (bn * per_elt + 2 * ev * acc)
    forward = out + lse + mask_prep + convert_kv + q_block + block + causal + small
    if not requires_grad:
        return forward
    # Held through the backward: output, lse, the incoming gradient and the three gradients (input dtype).
    held = out + lse + bhg * length * ev * inp + (bhg * length * e + pairs * s * (e + ev)) * inp + mask_prep
    # Per chunk: operand copies and fp32 key/value gradient accumulators (when the inputs are not fp32).
    chunk = convert_kv + (hc * s * (e + ev) * acc if acc != inp else 0)
    # Per query block: q and dO blocks, D and lse rows, the dq block, and per tile: scores/P, dP/dS, dropout
    # multipliers and the matmul results added into dq, dk and dv.
    row_block = hg * bm * (2 * e * op + 3 * ev * max(acc, op) + e * acc + 4 * acc)
    tile = hg * bm * bn * (2 * acc + half_p + mask_b + (40 if dropout else 0))
    tile_grads = (hg * bm * e + 2 * hc * bn * max(e, ev)) * acc
    backward = held + chunk + row_block + tile + tile_grads + causal + small
    return max(forward, backward)


def _device_class(device: torch.device) -> str:
    return device_profile(device).device_class


def _pow2_floor(x: int) -> int:
    return 1 << (max(1, int(x)).bit_length() - 1)


def _pow2_ceil(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def _balanced_rows(rows: int, length: int, floor: int) -> int:
    """At most ``rows`` rows per block, evened out over ``ceil(L / rows)`` blocks (so a last block is not mostly
    recomputed), never below ``floor``."""
    rows = max(1, min(rows, length))
    blocks = -(-length // rows)
    return max(min(floor, length), -(-length // blocks))


def _preferred_block_n(problem: AttentionProblem, device_class: str) -> int:
    s = problem.dims[4]
    return min(_pow2_floor(max(s, MIN_BLOCK)), 512 if device_class == "cpu" else 2048)


def _min_rows(problem: AttentionProblem) -> int:
    """Query rows per head that give a score GEMM :data:`MIN_GEMM_ROWS` rows (``G`` heads share the GEMM), or L."""
    g, length = problem.dims[2], problem.dims[3]
    return min(max(MIN_BLOCK, _pow2_ceil(-(-MIN_GEMM_ROWS // g))), max(length, 1))


def _preferred_blocks(
    problem: AttentionProblem, tier: int, device_class: str, tm: TileMath, block_n: Optional[int] = None
) -> Tuple[int, int, int]:
    """``(block_h, block_m, block_n)`` whose scores step is about the preferred bytes for the device.

    All batch-head pairs go into one step while that leaves at least :data:`MIN_GEMM_ROWS` GEMM rows per head;
    beyond that the pairs are chunked instead.
    """
    b, h, g, length, s, e, ev = problem.dims
    pairs = b * h
    target = _PREFERRED[device_class][tier]
    acc = _elt(tm.acc_dtype)
    bn = (block_n or _preferred_block_n(problem, device_class)) if tier == 2 else max(s, 1)
    cols = max(1, min(s, bn))
    min_rows = _min_rows(problem)
    row_cap = length
    if problem.is_causal and tier in (1, 3):
        row_cap = max(min_rows, _pow2_floor(max(1, length // _CAUSAL_ROW_SHARE)))
    rows_all = min(row_cap, target // max(1, pairs * g * cols * acc))
    if rows_all >= min_rows:
        return pairs, _balanced_rows(rows_all, max(length, 1), min_rows), bn
    heads = max(1, min(pairs, target // max(1, g * min_rows * cols * acc)))
    return heads, min_rows, bn


def _ladder(start: int, floor: int = MIN_BLOCK) -> List[int]:
    ladder = [start]
    while ladder[-1] > floor:
        ladder.append(max(floor, ladder[-1] // 2))
    return ladder


def candidate_plans(
    problem: AttentionProblem,
    budget_bytes: int,
    requires_grad: bool,
    dropout: bool = False,
    tiers: Optional[Sequence[int]] = None,
    block_m: Optional[int] = None,
    block_n: Optional[int] = None,
    tile_math: Optional[TileMath] = None,
) -> Iterator[Plan]:
    """Every plan worth trying, fastest first: each tier in preference order; within a tier the preferred step,
    then fewer batch-head pairs per step, then smaller query blocks (and key blocks for tier 2).

    Explicit ``block_m``/``block_n`` pin the first candidate of each tier; the later ones halve from there.
    """
    device_class = _device_class(problem.query.device)
    tm = tile_math or planning_math(problem)
    order = tuple(tiers) if tiers is not None else _TIER_ORDER[(device_class, requires_grad)]
    b, h, g, length, s, e, ev = problem.dims
    pairs = b * h
    for tier in order:
        bh0, bm0, bn0 = _preferred_blocks(problem, tier, device_class, tm, block_n)
        if block_m is not None:
            bm0 = block_m
            # as many pairs as the preferred step bytes allow at these rows
            cols = max(1, min(s, bn0))
            target = _PREFERRED[device_class][tier]
            bh0 = max(1, min(pairs, target // max(1, g * min(bm0, max(length, 1)) * cols * _elt(tm.acc_dtype))))

        def make(bh: int, bm: int, bn: int, tier: int = tier) -> Plan:
            peak = predict_peak_bytes(problem, tier, bm, bn, requires_grad, dropout, block_h=bh, tile_math=tm)
            return Plan(tier, bm, bn, peak, budget_bytes, requires_grad, "", bh if bh < pairs else 0)

        # Rows (and keys) down to the GEMM floor, then fewer pairs per step, then rows and keys below the floor.
        rows = _ladder(bm0, min(bm0, _min_rows(problem)))
        wide = _ladder(bn0, min(bn0, MIN_GEMM_ROWS)) if tier == 2 else [bn0]
        for bm in rows:
            for bn in wide:
                yield make(bh0, bm, bn)
        for bh in _ladder(bh0, 1)[1:]:
            for bn in wide:
                yield make(bh, rows[-1], bn)
        for bm in _ladder(rows[-1]):
            for bn in _ladder(bn0) if tier == 2 else [bn0]:
                yield make(1, bm, bn)


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
    use_tuning: bool = True,
) -> Plan:
    """Plan a canonical problem (see :func:`plan`). ``use_tuning=False`` ignores the tuning cache (the cost model's
    plan, ``source="model"``)."""
    budget = resolve_budget(problem.query.device, budget_bytes)
    if tier != "auto":
        first = next(candidate_plans(problem, budget, requires_grad, dropout, (int(tier),), block_m, block_n))
        return replace(first, reason=f"tier {tier} requested")
    auto = block_m is None and block_n is None and not dropout
    if auto:
        fast = _fast_path_plan(problem, budget, requires_grad)
        if fast is not None:
            return fast
    model = _model_plan(problem, budget, requires_grad, dropout, block_m, block_n)
    return _consult_tuning(problem, model) if auto and use_tuning else model


def _model_plan(problem: AttentionProblem, budget: int, requires_grad: bool, dropout: bool, block_m, block_n) -> Plan:
    cands = []
    for cand in candidate_plans(problem, budget, requires_grad, dropout, None, block_m, block_n):
        if cand.fits:
            return replace(cand, reason=f"fastest tier that fits {budget / _MiB:.0f} MiB")
        cands.append(cand)
    # Nothing fits: the fixed costs (output, gradients) dominate, so take the fastest plan within 5% of the
    # smallest rather than the tiniest blocks.
    floor = min(c.peak_bytes for c in cands) * 1.05
    near = next(c for c in cands if c.peak_bytes <= floor)
    return replace(near, reason=f"nothing fits {budget / _MiB:.0f} MiB; fastest plan within 5% of the smallest")


def _tuned_plan(problem: AttentionProblem, model: Plan, measured: TunedPlan, rank: int) -> Plan:
    """A measured ``(tier, block_m, block_n, block_h)`` fitted to this problem's sizes, its peak re-predicted."""
    tier, bm, bn, bh = measured
    b, h, g, length, s, e, ev = problem.dims
    bm = max(1, min(bm, length))
    bn = max(1, min(bn, s)) if tier == 2 else max(s, 1)
    bh = 0 if bh <= 0 or bh >= b * h else bh
    peak = predict_peak_bytes(problem, tier, bm, bn, model.requires_grad, block_h=bh)
    why = "measured fastest on this device" if rank == 0 else f"measured #{rank + 1} (faster ones exceed the budget)"
    return Plan(tier, bm, bn, peak, model.budget_bytes, model.requires_grad, f"{why} (tuning cache)", bh, "tuned")


def _consult_tuning(problem: AttentionProblem, model: Plan) -> Plan:
    """The fastest measured plan that fits the budget when the tuning cache has this signature; else the first-run
    tuner's plan when one is active (ComfyUI's ``tune`` option); else ``model``. Reads no tensor values."""
    entry = tuned_entry(problem, model.requires_grad)
    if entry is None:
        hook = active_hook()
        return (hook(problem, model) or model) if hook is not None else model
    for rank, measured in enumerate(entry_plans(entry)):
        if measured[0] == 3 and model.requires_grad:
            continue
        tuned = _tuned_plan(problem, model, measured, rank)
        if tuned.fits:
            return tuned
    return replace(model, reason=f"{model.reason}; the tuned plans need more than the budget")


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

