"""The drop-in ``scaled_dot_product_attention`` and the one dispatch path behind it.

:func:`_attention` validates, plans, runs the plan, retries on out-of-memory and reports the call to the telemetry
listeners; it returns the output and the :class:`~noflash_core.planner.Plan` that ran. The public function, the
global patch (``patch.py``) and the ComfyUI override (``comfy/override.py``) all call it.

It has exactly the semantics of ``torch.nn.functional.scaled_dot_product_attention`` (masks, causal, GQA, Ev != E,
any batch dims, dropout, fully masked rows give 0) and raises the same exception types for bad input.

Repeated calls are cheap: the validation and layout (``problem.py``) and the plan are cached per call signature
(shapes, dtypes, devices, flags, grad, budget, tier and blocks), so a decode-sized call costs little more than
torch's math SDPA itself.
"""

from __future__ import annotations

import logging
from typing import Callable, Dict, Hashable, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from . import telemetry
from .attention_op import attention_forward_op, run_forward
from .budget import resolve_budget
from .device import device_profile
from .oom import retry_out_of_memory
from .planner import Plan, TierArg, candidate_plans, plan_problem
from .problem import AttentionProblem, build_problem, call_signature, tier3_grad_error
from .tiles import DropoutSpec
from .tracing import is_compiling

__all__ = ["math_sdpa", "original_sdpa", "scaled_dot_product_attention"]

_log = logging.getLogger(__name__)
_MiB = 1024 * 1024
_CACHE_SIZE = 512

original_sdpa = F.scaled_dot_product_attention
"""torch's own SDPA as it was when noflash_core was imported (the global patch never changes this name)."""

_fp32_note_logged = False
_plans: Dict[Hashable, Plan] = {}


def math_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """torch's own SDPA pinned to the math backend: noflash's tier 0, and the O(N²) reference of the bench and
    the memory predictions; arguments and result as torch's SDPA. It keeps math's semantics on every device
    (torch's fused CPU kernel differs from math on inf/NaN inputs and rejects 1-D masks). Under ``torch.compile``
    the backend choice is left to torch."""
    if is_compiling():
        return original_sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)
    with sdpa_kernel(SDPBackend.MATH):
        return original_sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)


def _check_tier(tier: TierArg) -> TierArg:
    if tier == "auto":
        return tier
    if isinstance(tier, str) and tier.isdigit():
        tier = int(tier)
    if tier not in (1, 2, 3) or isinstance(tier, bool):
        raise ValueError(f"tier must be 'auto', 1, 2 or 3, got {tier!r}.")
    return tier


def _check_block(name: str, value: Optional[int]) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise ValueError(f"{name} must be a positive int or None, got {value!r}.")


def _autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:  # a device type autocast does not know (meta, ...): no autocast there
        return False


def _autocast_cast(tensors: List[Optional[torch.Tensor]], dtype: torch.dtype) -> List[Optional[torch.Tensor]]:
    """Cast like autocast's lower-precision list: floating tensors other than float64 go to ``dtype``."""
    eligible = (torch.float32, torch.float16, torch.bfloat16)
    return [t.to(dtype) if t is not None and t.dtype in eligible and t.dtype != dtype else t for t in tensors]


def _note_fp32(query: torch.Tensor) -> None:
    global _fp32_note_logged
    if not _fp32_note_logged and query.dtype == torch.float32 and query.device.type != "cpu":
        _fp32_note_logged = True
        _log.info(
            "noflash: fp32 attention on %s runs the tiled path in fp32; fp16 inputs are about 2x faster there "
            "(results stay exact either way).",
            query.device,
        )


def _retry_plans(problem: AttentionProblem, first: Plan, tier: TierArg, block_m, block_n, dropout: bool):
    """Plans to try after ``first`` ran out of memory: every candidate predicted smaller than ``first``, the same
    tier's halved blocks before the other tiers (those only under ``tier="auto"``)."""
    tiers = (first.tier,) if tier != "auto" else None
    cands = candidate_plans(problem, first.budget_bytes, first.requires_grad, dropout, tiers, block_m, block_n)
    smaller = {(c.tier, c.block_m, c.block_n): c for c in cands if c.peak_bytes < first.peak_bytes}
    return sorted(smaller.values(), key=lambda c: c.tier != first.tier)


def _run_plan(
    problem: AttentionProblem, p: Plan, dropout: Optional[DropoutSpec], with_grad: bool, pinned: bool
) -> torch.Tensor:
    """Run a tiled plan: through the registered op where autograd or torch.compile needs it, else directly."""
    if with_grad or is_compiling():
        out, _ = attention_forward_op(
            problem.query, problem.key, problem.value, problem.mask, problem.is_causal, problem.scale,
            dropout.p if dropout else 0.0, dropout.seed if dropout else 0, p.tier, p.block_m, p.block_n, pinned,
        )
        return out
    with torch.no_grad():
        out, _ = run_forward(problem, p.tier, p.block_m, p.block_n, dropout, need_lse=False)
    return out


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


def _run_tiled(
    problem: AttentionProblem, first: Plan, tier: TierArg, block_m, block_n, dropout_p: float, with_grad: bool
) -> Tuple[torch.Tensor, Plan]:
    """Run a tiled plan, retrying smaller plans on out-of-memory (never under torch.compile, never a pinned plan)."""
    _note_fp32(problem.query)
    dropout = None
    if dropout_p > 0.0:
        dropout = DropoutSpec(float(dropout_p), int(torch.randint(0, 2**62, (), device="cpu").item()))
    # A pinned tier with pinned blocks is a fixed plan (e.g. for CUDA graphs): never changed behind the caller.
    pinned = tier != "auto" and block_m is not None and (block_n is not None or first.tier != 2)
    if is_compiling():
        out = _run_plan(problem, first, dropout, with_grad, True)
        return out.reshape(problem.out_shape), first
    out, used = retry_out_of_memory(
        lambda p: _run_plan(problem, p, dropout, with_grad, pinned),
        first,
        lambda: () if pinned else _retry_plans(problem, first, tier, block_m, block_n, dropout is not None),
        problem.query.device,
        what="noflash attention",
        exhausted=lambda tried, exc: _out_of_memory(problem, tried, exc),
    )
    return out.reshape(problem.out_shape), used


def _report(path: str, plan: Plan, query, key) -> None:
    if telemetry.has_listeners() and not is_compiling():
        telemetry.emit(telemetry.CallRecord.of_call(path, plan.tier, (plan.block_m, plan.block_n), query, key,
                                                    plan.reason))


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


def _passthrough(fn: Callable, reason: str, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa):
    out = fn(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)
    used = Plan(0, _length(query, -2), _length(key, -2), 0, 0, reason=reason)
    _report("torch", used, query, key)
    return out, used


def _attention(
    query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False, *,
    tier: TierArg = "auto", block_m: Optional[int] = None, block_n: Optional[int] = None,
    budget_bytes: Optional[int] = None, threshold: int = 0, passthrough: Callable[..., torch.Tensor] = original_sdpa,
) -> Tuple[torch.Tensor, Plan]:
    """The one dispatch path: arguments as :func:`scaled_dot_product_attention`; returns ``(output, plan that ran)``.

    Args:
        threshold: calls whose key length is below this (and nested tensors) go to ``passthrough`` untouched,
            reported with path ``"torch"`` (the global patch's threshold).
        passthrough: the SDPA those calls go to (the function the global patch replaced).
    """
    if tier != "auto":
        tier = _check_tier(tier)
    if block_m is not None or block_n is not None:
        _check_block("block_m", block_m)
        _check_block("block_n", block_n)
    args = (query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    if _any_nested(query, key, value):
        return _passthrough(passthrough, "nested tensors: torch SDPA", *args)
    if threshold and isinstance(key, torch.Tensor) and key.dim() >= 2 and key.shape[-2] < threshold:
        return _passthrough(passthrough, f"key length {key.shape[-2]} below threshold {threshold}", *args)

    problem = None
    signature = None if is_compiling() else call_signature(query, key, value, attn_mask, is_causal, enable_gqa)
    if signature is None:  # tracing, or a non-tensor argument: build (and so validate) without the caches
        problem = build_problem(query, key, value, attn_mask, is_causal, scale, enable_gqa)
    device = query.device
    if _autocast_enabled(device.type):
        if problem is None:  # validate before casting, as torch does
            build_problem(query, key, value, attn_mask, is_causal, scale, enable_gqa, signature=signature)
        cast = _autocast_cast([query, key, value, attn_mask], torch.get_autocast_dtype(device.type))
        if attn_mask is not None and attn_mask.dtype == torch.bool:
            cast[3] = attn_mask
        with torch.autocast(device.type, enabled=False):
            return _attention(
                cast[0], cast[1], cast[2], cast[3], dropout_p, is_causal, scale, enable_gqa, tier=tier,
                block_m=block_m, block_n=block_n, budget_bytes=budget_bytes, threshold=threshold,
                passthrough=passthrough,
            )

    with_grad = torch.is_grad_enabled() and (
        query.requires_grad or key.requires_grad or value.requires_grad
        or (attn_mask is not None and attn_mask.requires_grad)
    )
    budget = resolve_budget(device, budget_bytes)
    use_dropout = dropout_p > 0.0
    plan_key = None
    first = None
    if signature is not None:
        profile = device_profile(device)
        # bf16 without bf16 hardware picks its operand precision from the values: such plans are not cached.
        if not (query.dtype == torch.bfloat16 and not profile.bf16):
            plan_key = (signature, with_grad, use_dropout, tier, block_m, block_n, budget,
                        profile if device.type == "meta" else None)
            first = _plans.get(plan_key)
    if first is None:
        if problem is None:
            problem = build_problem(query, key, value, attn_mask, is_causal, scale, enable_gqa, signature=signature)
        first = plan_problem(problem, budget_bytes=budget, requires_grad=with_grad, dropout=use_dropout, tier=tier,
                             block_m=block_m, block_n=block_n)
        if plan_key is not None:
            if len(_plans) >= _CACHE_SIZE:
                _plans.clear()
            _plans[plan_key] = first
    if first.tier == 3 and with_grad:
        raise tier3_grad_error()

    if first.tier == 0:
        out, used = math_sdpa(*args), first
    else:
        if problem is None:
            problem = build_problem(query, key, value, attn_mask, is_causal, scale, enable_gqa, signature=signature)
        out, used = _run_tiled(problem, first, tier, block_m, block_n, dropout_p, with_grad)
    _report("noflash", used, query, key)
    return out, used


def scaled_dot_product_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
    *,
    tier: TierArg = "auto",
    block_m: Optional[int] = None,
    block_n: Optional[int] = None,
    budget_bytes: Optional[int] = None,
) -> torch.Tensor:
    r"""Exact scaled dot-product attention in O(N) memory; a drop-in for torch's SDPA.

    Args:
        query: ``(N, ..., Hq, L, E)``.
        key: ``(N, ..., H, S, E)``.
        value: ``(N, ..., H, S, Ev)``.
        attn_mask: bool (True = takes part) or float (added to the scores, query's dtype), broadcastable to
            ``(N, ..., Hq, L, S)``.
        dropout_p: probability of dropping an attention weight (applied whenever > 0, as torch does).
        is_causal: top-left aligned causal mask (``ones(L, S).tril()``); not together with ``attn_mask``.
        scale: defaults to ``1 / sqrt(E)``.
        enable_gqa: query head ``h`` uses key/value head ``h // (Hq // H)``.
        tier: ``"auto"`` (planner), ``1`` (query-chunked), ``2`` (online softmax) or ``3`` (in-place, inference only).
        block_m, block_n: override the planner's block sizes (``block_n`` is used by tier 2 only; tiers 1 and 3
            take whole key rows). With a pinned tier and blocks the plan is fixed (no out-of-memory retry), as
            CUDA graphs need.
        budget_bytes: working-memory budget; default from ``NOFLASH_BUDGET_MB`` or the device's free memory.

    Returns:
        ``(N, ..., Hq, L, Ev)`` in the query's dtype.

    Raises:
        RuntimeError: for the inputs torch's SDPA rejects, with a message naming the argument; for tier 3 with
            inputs that require grad.
        torch.OutOfMemoryError: when no plan fits, naming the shape, dtype, budget and smallest plan tried.
    """
    out, _ = _attention(
        query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, tier=tier, block_m=block_m,
        block_n=block_n, budget_bytes=budget_bytes,
    )
    return out
