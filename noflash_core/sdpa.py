"""The drop-in ``scaled_dot_product_attention``: validate, plan, dispatch, retry on out-of-memory.

It has exactly the semantics of ``torch.nn.functional.scaled_dot_product_attention`` (masks, causal, GQA, Ev != E,
any batch dims, dropout, fully masked rows give 0) and raises the same exception types for bad input.
"""

from __future__ import annotations

import logging
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from . import telemetry
from .attention_op import attention_forward_op, run_forward
from .oom import free_cached_memory
from .planner import Plan, TierArg, candidate_plans, plan_problem
from .problem import AttentionProblem, build_problem, validate_arguments
from .tiles import DropoutSpec

__all__ = ["original_sdpa", "scaled_dot_product_attention"]

_log = logging.getLogger(__name__)
_MiB = 1024 * 1024

original_sdpa = F.scaled_dot_product_attention
"""torch's own SDPA as it was when noflash_core was imported (the global patch never changes this name)."""

_fp32_note_logged = False


def _math_sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa) -> torch.Tensor:
    """torch's SDPA pinned to the math backend: the fast path keeps math's semantics on every device (torch's
    fused CPU kernel differs from math on inf/NaN inputs and rejects 1-D masks)."""
    if torch.compiler.is_compiling():
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
    except TypeError:  # torch < 2.4
        if device_type == "cpu":
            return torch.is_autocast_cpu_enabled()
        return device_type == "cuda" and torch.is_autocast_enabled()
    except RuntimeError:  # a device type autocast does not know (meta, ...): no autocast there
        return False


def _autocast_dtype(device_type: str) -> torch.dtype:
    try:
        return torch.get_autocast_dtype(device_type)
    except (AttributeError, TypeError):  # torch < 2.4
        return torch.get_autocast_cpu_dtype() if device_type == "cpu" else torch.get_autocast_gpu_dtype()


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
    smaller = {(c.tier, c.block_h, c.block_m, c.block_n): c for c in cands if c.peak_bytes < first.peak_bytes}
    return sorted(smaller.values(), key=lambda c: c.tier != first.tier)


def _run_plan(
    problem: AttentionProblem, p: Plan, dropout: Optional[DropoutSpec], with_grad: bool, pinned: bool
) -> torch.Tensor:
    if with_grad or torch.compiler.is_compiling():
        if p.tier == 3 and with_grad:
            raise RuntimeError(
                "noflash tier 3 is inference-only: it keeps no softmax statistics, so it cannot run backward. "
                "Use tier=1, tier=2 or tier='auto' for inputs that require grad, or call it under torch.no_grad()."
            )
        out, _ = attention_forward_op(
            problem.query, problem.key, problem.value, problem.mask, problem.is_causal, problem.scale,
            dropout.p if dropout else 0.0, dropout.seed if dropout else 0, p.tier, p.block_m, p.block_n, pinned,
            p.block_h,
        )
        return out
    with torch.no_grad():
        out, _ = run_forward(problem, p.tier, p.block_m, p.block_n, dropout, need_lse=False, block_h=p.block_h)
    return out


def _out_of_memory(problem: AttentionProblem, tried: List[Plan], original: BaseException) -> torch.OutOfMemoryError:
    smallest = min(tried, key=lambda p: p.peak_bytes)
    q = problem.query
    b, h, g, length, s, e, ev = problem.dims
    return torch.OutOfMemoryError(
        f"noflash attention ran out of memory for query {tuple(problem.out_shape[:-1])}x{e} and key/value length "
        f"{s} ({q.dtype}, {q.device}) with a budget of {smallest.budget_bytes / _MiB:.1f} MiB. It tried {len(tried)} "
        f"plan(s); the smallest was tier {smallest.tier} with blocks ({smallest.block_m}, {smallest.block_n}), "
        f"predicted {smallest.peak_bytes / _MiB:.1f} MiB. Free memory (smaller batch, resolution or frames), or "
        f"raise the budget (budget_bytes=, NOFLASH_BUDGET_MB). Last error: {original}"
    )


def _dispatch(
    problem: AttentionProblem, first: Plan, tier: TierArg, block_m, block_n, dropout: Optional[DropoutSpec],
    with_grad: bool,
) -> Tuple[torch.Tensor, Plan]:
    # A pinned tier with pinned blocks is a fixed plan (e.g. for CUDA graphs): never changed behind the caller.
    pinned = tier != "auto" and block_m is not None and (block_n is not None or first.tier != 2)
    if torch.compiler.is_compiling():
        return _run_plan(problem, first, dropout, with_grad, True), first
    tried = [first]
    current = first
    retries = None
    while True:
        try:
            return _run_plan(problem, current, dropout, with_grad, pinned), current
        except torch.OutOfMemoryError as exc:
            if retries is None:
                retries = [] if pinned else _retry_plans(problem, first, tier, block_m, block_n, dropout is not None)
            if not retries:
                raise _out_of_memory(problem, tried, exc) from None
            free_cached_memory(problem.query.device)
            current = retries.pop(0)
            tried.append(current)
            _log.info(
                "noflash: out of memory; retrying with tier %d, blocks (%d, %d)",
                current.tier, current.block_m, current.block_n,
            )


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
        block_m, block_n: override the planner's block sizes. With a pinned tier and blocks the plan is fixed
            (no out-of-memory retry), as CUDA graphs need.
        budget_bytes: working-memory budget; default from ``NOFLASH_BUDGET_MB`` or the device's free memory.

    Returns:
        ``(N, ..., Hq, L, Ev)`` in the query's dtype.

    Raises:
        RuntimeError: for the inputs torch's SDPA rejects, with a message naming the argument.
        torch.OutOfMemoryError: when no plan fits, naming the shape, dtype, budget and smallest plan tried.
    """
    tier = _check_tier(tier)
    _check_block("block_m", block_m)
    _check_block("block_n", block_n)
    if any(getattr(t, "is_nested", False) for t in (query, key, value)):
        return original_sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)
    validate_arguments(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa)
    device_type = query.device.type
    if _autocast_enabled(device_type):
        cast = _autocast_cast([query, key, value, attn_mask], _autocast_dtype(device_type))
        if attn_mask is not None and attn_mask.dtype == torch.bool:
            cast[3] = attn_mask
        with torch.autocast(device_type, enabled=False):
            return scaled_dot_product_attention(
                cast[0], cast[1], cast[2], cast[3], dropout_p, is_causal, scale, enable_gqa,
                tier=tier, block_m=block_m, block_n=block_n, budget_bytes=budget_bytes,
            )
    problem = build_problem(query, key, value, attn_mask, is_causal, scale, enable_gqa)
    with_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (query, key, value, attn_mask)
    )
    use_dropout = dropout_p > 0.0
    first = plan_problem(
        problem, budget_bytes=budget_bytes, requires_grad=with_grad, dropout=use_dropout, tier=tier,
        block_m=block_m, block_n=block_n,
    )
    if first.tier == 0:
        out = _math_sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
        used = first
    else:
        _note_fp32(query)
        dropout = None
        if use_dropout:
            dropout = DropoutSpec.draw(dropout_p)
        out5, used = _dispatch(problem, first, tier, block_m, block_n, dropout, with_grad)
        out = out5.reshape(problem.out_shape)
    if telemetry.has_listeners() and not torch.compiler.is_compiling():
        telemetry.emit(
            telemetry.CallRecord(
                used.tier, used.block_m, used.block_n, tuple(query.shape), str(query.dtype).replace("torch.", ""),
                str(query.device), used.reason,
            )
        )
    return out
