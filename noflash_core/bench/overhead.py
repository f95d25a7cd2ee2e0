"""The fixed cost noflash adds to a call it hands to torch: ``python -m noflash_core.bench --overhead``.

A decode-sized call (one query row, ``L = 1``, against ``S = 512`` keys) takes noflash's fast path: the planner
picks tier 0 and torch's math SDPA computes it. Everything else noflash does for the call (validation, the cached
plan, telemetry) is overhead. This module times noflash's public SDPA and torch's math SDPA (``sdpa_kernel(MATH)``)
on the same inputs, alternating call by call so both see the same machine load, and reports the medians and the
median of the paired differences.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch

from .device import synchronize
from .measure import make_inputs

__all__ = ["OverheadResult", "measure_overhead"]


@dataclass(frozen=True)
class OverheadResult:
    """Per-call times in microseconds (medians over ``calls`` alternating calls).

    Attributes:
        math_us: torch's SDPA pinned to the math backend.
        noflash_us: ``noflash_core.scaled_dot_product_attention`` on the same inputs.
        paired_diff_us: the median of ``noflash - math`` over adjacent pairs of calls (robust to load changes).
        tier: the tier noflash's plan chose (0 = torch's math SDPA).
        description: the inputs, e.g. ``"q (1, 16, 1, 64), k/v (1, 16, 512, 64) float32 on cpu"``.
    """

    math_us: float
    noflash_us: float
    paired_diff_us: float
    calls: int
    tier: int
    description: str

    @property
    def overhead_us(self) -> float:
        """``noflash_us - math_us``."""
        return self.noflash_us - self.math_us

    def to_text(self) -> str:
        return (
            f"{self.description}, {self.calls} alternating calls each:\n"
            f"  torch math SDPA  {self.math_us:8.1f} us per call (median)\n"
            f"  noflash (tier {self.tier})  {self.noflash_us:8.1f} us per call (median)\n"
            f"  overhead         {self.overhead_us:8.1f} us (difference of medians); "
            f"{self.paired_diff_us:.1f} us (median paired difference)"
        )


def _timed(fn: Callable[[], torch.Tensor], device: torch.device) -> float:
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def measure_overhead(
    q_len: int = 1,
    kv_len: int = 512,
    batch: int = 1,
    heads: int = 16,
    head_dim: int = 64,
    dtype: torch.dtype = torch.float32,
    device: Optional[torch.device] = None,
    calls: int = 2000,
    warmup: int = 200,
    seed: int = 0,
) -> OverheadResult:
    """Time noflash's SDPA against torch's math SDPA on ``q (batch, heads, q_len, head_dim)`` and
    ``k, v (batch, heads, kv_len, head_dim)``; see the module docstring."""
    from ..planner import plan
    from ..sdpa import math_sdpa, scaled_dot_product_attention

    device = torch.device("cpu") if device is None else torch.device(device)
    inputs = make_inputs(batch, heads, kv_len, head_dim, dtype=dtype, device=device, backward=False, seed=seed)
    q, k, v = inputs.q[:, :, :q_len].contiguous(), inputs.k, inputs.v

    def ours() -> torch.Tensor:
        return scaled_dot_product_attention(q, k, v)

    def theirs() -> torch.Tensor:
        return math_sdpa(q, k, v)

    with torch.no_grad():
        for _ in range(warmup):
            ours()
            theirs()
        t_math: List[float] = []
        t_ours: List[float] = []
        for i in range(calls):
            if i % 2:  # alternate which one goes first, so neither always follows the other
                t_ours.append(_timed(ours, device))
                t_math.append(_timed(theirs, device))
            else:
                t_math.append(_timed(theirs, device))
                t_ours.append(_timed(ours, device))
    us = 1e6
    return OverheadResult(
        math_us=statistics.median(t_math) * us,
        noflash_us=statistics.median(t_ours) * us,
        paired_diff_us=statistics.median(a - b for a, b in zip(t_ours, t_math)) * us,
        calls=calls,
        tier=plan(q, k, v).tier,
        description=f"q {tuple(q.shape)}, k/v {tuple(k.shape)} {str(dtype).replace('torch.', '')} on {device}, "
        f"{torch.get_num_threads()} thread(s)",
    )
