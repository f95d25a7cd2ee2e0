"""The one way into the engine: :func:`attention` validates, plans, runs the plan, retries on out-of-memory and
reports the call; it returns the output, the row log-sum-exp when asked, and the :class:`~noflash_core.planner.Plan`
that ran.

Every caller goes through this module: the public SDPA (``sdpa.py``), the global patch (``patch.py``),
:func:`~noflash_core.attention_with_lse`, the ComfyUI override and VAE/CLIP patchers, the ring and Ulysses steps
and the yunchang adapter. Callers that run their own steps on a canonical problem (the ring) use
:func:`plan_attention` (the same plans, from the same cache), :func:`forward_tiles` and :func:`attention_backward`
(the tiled backward): no other module imports a tier or ``backward.py``.

Semantics are exactly those of ``torch.nn.functional.scaled_dot_product_attention`` (masks, causal, GQA,
Ev != E, any batch dims, dropout, fully masked rows give 0), with the same exception types for bad input.

Repeated calls are cheap: the validation and layout (``problem.py``) and the plan are cached per call signature
(shapes, dtypes, devices, flags, grad, budget, tier and blocks); the default budget comes from a time-cached,
bucketed free-memory reading (``budget.py``), so a decode-sized call costs little more than torch's math SDPA.
"""

from __future__ import annotations

import logging
from typing import Callable, Dict, Hashable, List, NamedTuple, Optional, Tuple

import torch

from . import telemetry
from .attention_op import attention_forward_op, attention_with_lse_op, backward_with_retry, run_forward
from .budget import default_budget_bytes, resolve_budget
from .caches import register
from .device import device_profile
from .oom import retry_out_of_memory
from .planner import Plan, TierArg, candidate_plans, check_lse_tier, plan_problem
from .problem import AttentionProblem, build_problem, call_signature, tier3_grad_error
from .tiles import DropoutSpec
from .torch_sdpa import math_sdpa, original_sdpa
from .tracing import is_compiling

__all__ = ["AttentionResult", "attention", "attention_backward", "forward_tiles", "plan_attention", "report_plan"]

_log = logging.getLogger(__name__)
_MiB = 1024 * 1024
_CACHE_SIZE = 512

Tensor = torch.Tensor

_fp32_note_logged = False
_plans: Dict[Hashable, Plan] = {}
register(_plans.clear)


class AttentionResult(NamedTuple):
    """What :func:`attention` returns.

    Attributes:
        out: ``(N, ..., Hq, L, Ev)`` in the query's dtype.
        lse: ``(N, ..., Hq, L)`` row log-sum-exp in float32 (float64 for float64 inputs) when ``return_lse=True``,
            else None.
        plan: the plan that ran (tier 0 is torch's own SDPA; after an out-of-memory retry, the smaller plan).
    """

    out: Tensor
    lse: Optional[Tensor]
    plan: Plan


def _check_knobs(tier: TierArg, block_m: Optional[int], block_n: Optional[int], return_lse: bool = False) -> TierArg:
    if tier != "auto":
        if isinstance(tier, str) and tier.isdigit():
            tier = int(tier)
        if tier not in (1, 2, 3) or isinstance(tier, bool):
            raise ValueError(f"tier must be 'auto', 1, 2 or 3, got {tier!r}.")
        if return_lse:
            check_lse_tier(tier)
    for name, value in (("block_m", block_m), ("block_n", block_n)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"{name} must be a positive int or None, got {value!r}.")
    return tier


def _autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:  # a device type autocast does not know (meta, ...): no autocast there
        return False


def _autocast_cast(tensors: List[Optional[Tensor]], dtype: torch.dtype) -> List[Optional[Tensor]]:
    """Cast like autocast's lower-precision list: floating tensors other than float64 go to ``dtype``; a bool mask
    stays bool."""
    eligible = (torch.float32, torch.float16, torch.bfloat16)
    return [t.to(dtype) if t is not None and t.dtype in eligible and t.dtype != dtype else t for t in tensors]


def _note_fp32(query: Tensor) -> None:
    global _fp32_note_logged
    if not _fp32_note_logged and query.dtype == torch.float32 and query.device.type != "cpu":
        _fp32_note_logged = True
        _log.info(
            "noflash: fp32 attention on %s runs the tiled path in fp32; fp16 inputs are about 2x faster there "
            "(results stay exact either way).",
            query.device,
        )


def report_plan(plan: Plan, query, key, path: str = "noflash", reason: Optional[str] = None) -> None:
    """Tell the telemetry listeners that ``plan`` ran on ``query``/``key`` (free when nobody listens)."""
    if telemetry.has_listeners() and not is_compiling():
        telemetry.emit(telemetry.CallRecord.of_call(path, plan.tier, (plan.block_m, plan.block_n), query, key,
                                                    plan.reason if reason is None else reason,
                                                    getattr(plan, "source", "")))


def _length(t, dim: int) -> int:
    """``t.shape[dim]``, or 0 where ``t`` has no such size (a non-tensor, a jagged nested tensor)."""
    try:
        return int(t.shape[dim])
    except (AttributeError, IndexError, RuntimeError, TypeError, ValueError):
        return 0


def _any_nested(query, key, value) -> bool:
    try:
        return query.is_nested or key.is_nested or value.is_nested
    except AttributeError:  # a non-tensor: validation names it
        return False


def _passthrough(fn: Callable, threshold: int, return_lse: bool, args: tuple) -> AttentionResult:
    """Hand the call to torch's SDPA untouched (nested tensors, keys below the patch's threshold)."""
    query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa = args
    if _any_nested(query, key, value):
        if return_lse:
            raise RuntimeError("noflash attention with return_lse=True: nested tensors are not supported; pad the "
                               "batch to one length.")
        reason = "nested tensors: torch SDPA"
    else:
        reason = f"key length {key.shape[-2]} below threshold {threshold}"
    out = fn(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)
    used = Plan(0, _length(query, -2), _length(key, -2), 0, 0, reason=reason)
    report_plan(used, query, key, "torch")
    return AttentionResult(out, None, used)


@torch.compiler.assume_constant_result
def _probe_device(device: torch.device) -> str:
    """Probe ``device`` outside the trace (torch.compile runs this eagerly and keeps the result as a constant): the
    planner then reads a cached profile, so a first call that is compiled does not trace the probe's file reads."""
    return device_profile(device).name


def _shorter(key, threshold: int) -> bool:
    return isinstance(key, torch.Tensor) and key.dim() >= 2 and key.shape[-2] < threshold


def _uncached_problem(args: tuple) -> AttentionProblem:
    """Build (and so validate) a call without the caches: under tracing, or with a non-tensor argument."""
    if is_compiling():
        _probe_device(args[0].device)
    return _build(args, None)


def _without_autocast(args: tuple, signature, problem: Optional[AttentionProblem], knobs: dict) -> AttentionResult:
    """Run a call made under autocast: validated first (as torch does), inputs cast as autocast casts them, then the
    call with autocast off."""
    if problem is None:
        _build(args, signature)
    query, key, value, attn_mask, *rest = args
    device_type = query.device.type
    cast = _autocast_cast([query, key, value, attn_mask], torch.get_autocast_dtype(device_type))
    with torch.autocast(device_type, enabled=False):
        return attention(*cast, *rest, **knobs)


def _build(args: tuple, signature) -> AttentionProblem:
    query, key, value, attn_mask, _, is_causal, scale, enable_gqa = args
    return build_problem(query, key, value, attn_mask, is_causal, scale, enable_gqa, signature=signature)


def _plan_call(
    args: tuple, device: torch.device, signature, problem: Optional[AttentionProblem], with_grad: bool,
    tier: TierArg, block_m: Optional[int], block_n: Optional[int], budget_bytes: Optional[int], need_lse: bool,
) -> Tuple[Plan, Optional[AttentionProblem]]:
    """The plan of a call (``args`` as :func:`attention`'s first eight), from the cache when its signature was
    planned before with the same budget and knobs; and the canonical problem when planning had to build it."""
    budget = default_budget_bytes(device) if budget_bytes is None else resolve_budget(device, budget_bytes)
    dropout = args[4] > 0.0
    key = None
    if signature is not None:
        # Plans read shapes, dtypes and the device only (bf16 without bf16 hardware is planned with fp32 operands).
        key = (signature, with_grad, dropout, tier, block_m, block_n, budget, need_lse,
               device_profile(device) if device.type == "meta" else None)
        cached = _plans.get(key)
        if cached is not None:
            return cached, problem
    if problem is None:
        problem = _build(args, signature)
    planned = plan_problem(problem, budget_bytes=budget, requires_grad=with_grad, dropout=dropout, tier=tier,
                           block_m=block_m, block_n=block_n, need_lse=need_lse)
    if key is not None:
        if len(_plans) >= _CACHE_SIZE:
            _plans.clear()
        _plans[key] = planned
    return planned, problem


def _retry_plans(problem: AttentionProblem, first: Plan, same_tier: bool, block_m, block_n, dropout: bool,
                 need_lse: bool) -> List[Plan]:
    """Plans to try after ``first`` ran out of memory: every candidate predicted smaller than ``first``, the same
    tier's halved blocks before the other tiers (those only when ``same_tier`` is False)."""
    tiers = (first.tier,) if same_tier else None
    cands = candidate_plans(problem, first.budget_bytes, first.requires_grad, dropout, tiers, block_m, block_n,
                            need_lse=need_lse)
    smaller = {(c.tier, c.block_h, c.block_m, c.block_n): c for c in cands if c.peak_bytes < first.peak_bytes}
    return sorted(smaller.values(), key=lambda c: c.tier != first.tier)


def _out_of_memory(problem: AttentionProblem, tried: List[Plan], original: BaseException) -> torch.OutOfMemoryError:
    smallest = min(tried, key=lambda p: p.peak_bytes)
    q = problem.query
    dims = problem.dims
    return torch.OutOfMemoryError(
        f"noflash attention ran out of memory for query {tuple(problem.out_shape[:-1])}x{dims.e} and key/value "
        f"length {dims.s} ({q.dtype}, {q.device}) with a budget of {smallest.budget_bytes / _MiB:.1f} MiB. It tried "
        f"{len(tried)} plan(s); the smallest was tier {smallest.tier} with blocks ({smallest.block_m}, "
        f"{smallest.block_n}), predicted {smallest.peak_bytes / _MiB:.1f} MiB. Free memory (smaller batch, "
        f"resolution or frames), or raise the budget (budget_bytes=, NOFLASH_BUDGET_MB). Last error: {original}"
    )


def _run_plan(problem: AttentionProblem, p: Plan, dropout: Optional[DropoutSpec], with_grad: bool, pinned: bool,
              need_lse: bool) -> Tuple[Tensor, Optional[Tensor]]:
    """Run a tiled plan: through the registered ops where autograd or torch.compile needs them, else directly."""
    if with_grad or is_compiling():
        args = (problem.query, problem.key, problem.value, problem.mask, problem.is_causal, problem.scale,
                dropout.p if dropout else 0.0, dropout.seed if dropout else 0, p.tier, p.block_m, p.block_n, pinned,
                p.block_h)
        if need_lse:
            return attention_with_lse_op(*args)
        return attention_forward_op(*args)[0], None
    with torch.no_grad():
        return run_forward(problem, p.tier, p.block_m, p.block_n, dropout, need_lse, p.block_h)


def _run_tiled(problem: AttentionProblem, first: Plan, tier: TierArg, block_m, block_n, dropout_p: float,
               with_grad: bool, need_lse: bool) -> Tuple[Tensor, Optional[Tensor], Plan]:
    """Run a tiled plan, retrying smaller plans on out-of-memory (never under torch.compile, never a pinned plan)."""
    _note_fp32(problem.query)
    dropout = DropoutSpec.draw(dropout_p) if dropout_p > 0.0 else None
    # A pinned tier with pinned blocks is a fixed plan (e.g. for CUDA graphs): never changed behind the caller.
    pinned = tier != "auto" and block_m is not None and (block_n is not None or first.tier != 2)
    if is_compiling():
        (out, lse), used = _run_plan(problem, first, dropout, with_grad, True, need_lse), first
    else:
        (out, lse), used = retry_out_of_memory(
            lambda p: _run_plan(problem, p, dropout, with_grad, pinned, need_lse),
            first,
            lambda: () if pinned else _retry_plans(problem, first, tier != "auto", block_m, block_n,
                                                   dropout is not None, need_lse),
            problem.query.device,
            what="noflash attention",
            exhausted=lambda tried, exc: _out_of_memory(problem, tried, exc),
        )
    out = out.reshape(problem.out_shape)
    return out, (lse.reshape(problem.out_shape[:-1]) if need_lse else None), used


def _requires_grad(query, key, value, attn_mask) -> bool:
    return torch.is_grad_enabled() and (
        query.requires_grad or key.requires_grad or value.requires_grad
        or (attn_mask is not None and attn_mask.requires_grad)
    )


def attention(
    query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False, *,
    tier: TierArg = "auto", block_m: Optional[int] = None, block_n: Optional[int] = None,
    budget_bytes: Optional[int] = None, return_lse: bool = False, threshold: int = 0,
    passthrough: Optional[Callable[..., Tensor]] = None,
) -> AttentionResult:
    r"""Exact attention in O(N) memory: the output, the row log-sum-exp when asked, and the plan that ran.

    Args:
        query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa: as
            :func:`noflash_core.scaled_dot_product_attention` (``(N, ..., Hq, L, E)``, ``(N, ..., H, S, E)``,
            ``(N, ..., H, S, Ev)``, a mask broadcastable to ``(N, ..., Hq, L, S)``).
        tier: ``"auto"`` (the planner), ``1``, ``2`` or ``3`` (inference only, no lse).
        block_m, block_n: the planner's first blocks; with a pinned tier a fixed plan (no out-of-memory retry).
        budget_bytes: working-memory budget; default from ``NOFLASH_BUDGET_MB`` or the device's free memory.
        return_lse: also return ``lse = logsumexp(scale * q k^T + mask, -1)`` ``(N, ..., Hq, L)``, differentiable
            (tiers 1 and 2 only; rows with every key masked have ``-inf``). Dropout does not change the lse.
        threshold: calls whose key length is below this (and nested tensors) go to ``passthrough`` untouched,
            reported with path ``"torch"`` (the global patch's threshold; ignored with ``return_lse``).
        passthrough: the SDPA those calls go to (default: torch's own, as it was at import).

    Returns:
        :class:`AttentionResult` ``(out, lse, plan)``.

    Raises:
        RuntimeError (TypeError for non-tensors): what torch's SDPA rejects, naming the argument and the fix; tier 3
            under grad; ``return_lse`` with nested tensors.
        ValueError: a bad ``tier``, block or budget; tier 3 with ``return_lse``.
        torch.OutOfMemoryError: when no plan fits, naming the shape, dtype, budget and smallest plan tried.
    """
    if tier != "auto" or block_m is not None or block_n is not None:
        tier = _check_knobs(tier, block_m, block_n, return_lse)
    args = (query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    if _any_nested(query, key, value) or (threshold and not return_lse and _shorter(key, threshold)):
        return _passthrough(passthrough or original_sdpa, threshold, return_lse, args)
    signature = None if is_compiling() else call_signature(query, key, value, attn_mask, is_causal, enable_gqa)
    problem = None if signature is not None else _uncached_problem(args)
    device = query.device
    if _autocast_enabled(device.type):
        return _without_autocast(args, signature, problem, dict(
            tier=tier, block_m=block_m, block_n=block_n, budget_bytes=budget_bytes, return_lse=return_lse))
    with_grad = torch.is_grad_enabled() and (
        query.requires_grad or key.requires_grad or value.requires_grad
        or (attn_mask is not None and attn_mask.requires_grad)
    )
    first, problem = _plan_call(args, device, signature, problem, with_grad, tier, block_m, block_n, budget_bytes,
                                return_lse)
    if first.tier == 3 and with_grad:
        raise tier3_grad_error()
    if first.tier == 0:
        out, lse, used = math_sdpa(*args), None, first
    else:
        out, lse, used = _run_tiled(problem or _build(args, signature), first, tier, block_m, block_n, dropout_p,
                                    with_grad, return_lse)
    report_plan(used, query, key)
    return AttentionResult(out, lse, used)


def plan_attention(
    query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False, *,
    tier: TierArg = "auto", block_m: Optional[int] = None, block_n: Optional[int] = None,
    budget_bytes: Optional[int] = None, return_lse: bool = False, requires_grad: Optional[bool] = None,
) -> Plan:
    """The plan :func:`attention` would run for these arguments, from (and into) the same plan cache, so the call
    that follows does not plan again. ``requires_grad`` defaults to whether an input requires grad (and grad
    mode is on). Autocast is not applied: pass the tensors in the dtype they will run in."""
    if tier != "auto" or block_m is not None or block_n is not None:
        tier = _check_knobs(tier, block_m, block_n, return_lse)
    args = (query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    signature = None if is_compiling() else call_signature(query, key, value, attn_mask, is_causal, enable_gqa)
    problem = None if signature is not None else _uncached_problem(args)
    with_grad = _requires_grad(query, key, value, attn_mask) if requires_grad is None else bool(requires_grad)
    return _plan_call(args, query.device, signature, problem, with_grad, tier, block_m, block_n, budget_bytes,
                      return_lse)[0]


def forward_tiles(problem: AttentionProblem, plan: Plan, *, need_lse: bool = True,
                  dropout: Optional[DropoutSpec] = None, pinned: bool = False) -> Tuple[Tensor, Optional[Tensor], Plan]:
    """Run a tiled ``plan`` on a canonical problem without autograd (the steps of a caller's own autograd
    function, such as the ring's), retrying smaller plans on out-of-memory unless ``pinned``.

    Returns:
        ``out (B, H, G, L, Ev)`` in the query's dtype, ``lse (B, H, G, L)`` (fp32, fp64 for fp64) or None, and the
        plan that ran.
    """
    (out, lse), used = retry_out_of_memory(
        lambda p: run_forward(problem, p.tier, p.block_m, p.block_n, dropout, need_lse, p.block_h),
        plan,
        lambda: () if pinned else _retry_plans(problem, plan, False, None, None, dropout is not None, need_lse),
        problem.query.device,
        what="noflash attention",
        exhausted=lambda tried, exc: _out_of_memory(problem, tried, exc),
    )
    return out, lse, used


def attention_backward(
    problem: AttentionProblem, out: Tensor, lse: Tensor, grad_out: Tensor, plan: Plan, *,
    grad_lse: Optional[Tensor] = None, mask_grad: bool = False, dropout: Optional[DropoutSpec] = None,
    pinned: bool = False,
) -> Tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
    """The tiled O(N)-memory backward of a canonical problem with ``plan``'s blocks (retried with smaller blocks on
    out-of-memory unless ``pinned``): for callers that keep the output and lse themselves (the ring, yunchang's
    ``"bwd-only"`` stage).

    Args:
        out: the forward output ``(B, H, G, L, Ev)``; lse: its row log-sum-exp ``(B, H, G, L)``.
        grad_out: ``(B, H, G, L, Ev)``; grad_lse: the lse's gradient ``(B, H, G, L)`` or None.
        mask_grad: also return the float mask's gradient.

    Returns:
        ``dq (B, H, G, L, E)``, ``dk (B, H, S, E)``, ``dv (B, H, S, Ev)`` and the mask gradient or None.
    """
    return backward_with_retry(problem, out, lse, grad_out, plan.block_m, plan.block_n, plan.block_h,
                               dropout=dropout, mask_grad=mask_grad, grad_lse=grad_lse, pinned=pinned)
