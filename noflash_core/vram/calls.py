"""One attention call, both ways: through noflash (the planner's plan, its peak from a fake run of the real code)
and through the attention ComfyUI runs on the target (:mod:`~noflash_core.vram.comfy_attention`); and the budget
the planner would have at that moment."""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..memory.fake_peak import AttentionShape, FakePeak, predict_math_peak, predict_plan_peak
from .comfy_attention import ComfyPaths, fused_sdpa_bytes, sub_quad_bytes
from .results import AttentionEstimate

__all__ = ["META", "UNLIMITED", "attention_budget", "estimate_attention", "free_bytes", "math_peak", "noflash_call"]

META = torch.device("meta")
UNLIMITED = 1 << 50
"""A budget that never binds (no VRAM given)."""


def attention_budget(vram: Optional[int], resident: int) -> Optional[int]:
    """The planner's default budget at attention time: its share of what is free with ``resident`` bytes loaded."""
    if vram is None:
        return None
    from ..budget import FREE_MEMORY_FRACTION

    return max(1 << 20, int((vram - resident) * FREE_MEMORY_FRACTION))


def free_bytes(vram: Optional[int], resident: int) -> int:
    """Free memory with ``resident`` bytes loaded (unlimited when the VRAM is unknown)."""
    return UNLIMITED if vram is None else max(0, vram - resident)


def math_peak(shape: AttentionShape, dtype: torch.dtype) -> int:
    """Torch's math SDPA for the call, on fake tensors (with the caller's math-reduction setting)."""
    return predict_math_peak(shape, dtype=dtype, device=META).peak_bytes


def noflash_call(shape: AttentionShape, dtype: torch.dtype, budget: Optional[int], out_copy: bool,
                 whole_rows: bool = True) -> Tuple[object, FakePeak, int]:
    """``(plan, fake peak, working bytes)`` of one call through noflash (tiles, plus the merged-heads output copy
    when ``out_copy``).

    ``whole_rows=False`` halves the query blocks of a plan that would take every row at once, as the VAE Patcher
    does.
    """
    plan, peak = predict_plan_peak(shape, dtype=dtype, device=META, budget_bytes=budget or UNLIMITED)
    if not whole_rows and (plan.tier == 0 or plan.block_m >= shape.q_len) and shape.q_len >= 32:
        block_m = max(16, 1 << (shape.q_len // 2).bit_length() - 1)
        plan, peak = predict_plan_peak(shape, dtype=dtype, device=META, budget_bytes=budget or UNLIMITED,
                                       block_m=block_m)
    out = shape.batch * shape.heads * shape.q_len * shape.ev * dtype.itemsize if out_copy else 0
    return plan, peak, peak.peak_bytes + out


def _comfy_diffusion_call(path: str, shape: AttentionShape, dtype: torch.dtype, free: int,
                          skip_reshape: bool, math_bytes: int) -> int:
    elt = dtype.itemsize
    b, h, length, s, d, dv = shape.batch, shape.heads, shape.q_len, shape.kv_len, shape.head_dim, shape.ev
    out = b * h * length * dv * elt  # attention_pytorch's (b, n, h·dv) output copy
    if path == "sub_quad":
        return sub_quad_bytes(b, h, length, s, d, dv, elt, free, skip_reshape=skip_reshape)
    if path == "sdpa_math":
        return math_bytes + out
    return fused_sdpa_bytes(b, h, length, dv, elt) + out


def estimate_attention(name: str, shape: AttentionShape, dtype: torch.dtype, budget: Optional[int],
                       paths: ComfyPaths, free: int, skip_reshape: bool) -> AttentionEstimate:
    """One attention call of a diffusion model's block: ComfyUI's path, math SDPA and noflash's plan."""
    math_bytes = math_peak(shape, dtype)
    plan, peak, call_bytes = noflash_call(shape, dtype, budget, out_copy=True)
    comfy = _comfy_diffusion_call(paths.diffusion, shape, dtype, free, skip_reshape, math_bytes)
    return AttentionEstimate(
        name=name, batch=shape.batch, heads=shape.heads, q_len=shape.q_len, kv_len=shape.kv_len,
        head_dim=shape.head_dim, comfy_path=paths.diffusion, comfy_bytes=comfy, math_bytes=math_bytes,
        tier=plan.tier, block_m=plan.block_m, block_n=plan.block_n, peak_bytes=call_bytes,
        planner_bytes=plan.peak_bytes, budget_bytes=budget, verified=peak.verified,
    )
