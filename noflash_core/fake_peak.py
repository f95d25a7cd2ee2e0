"""Predict an attention call's peak memory by running the real code on fake tensors.

Nothing is allocated: the inputs are :class:`~torch._subclasses.fake_tensor.FakeTensor` s and
:class:`~noflash_core.memory_tracker.LiveBytesTracker` adds up the bytes their storages would hold.
The number is exactly what the tracker would measure on a real run of the same code (on CPU), with no
hand formula.

Long sequences have many tiles, and every tile is a handful of Python-dispatched ops, so a fake run at
75k tokens would take minutes. A tiled implementation at fixed blocks holds, at its peak, some buffers of
fixed size (tiles), some proportional to L (output, row statistics), some to S (a row block of scores)
and, for the quadratic baselines, some to L·S. Its peak is affine in L at fixed S and in S at fixed L:

    peak(L, S) = a + b·L + c·S + d·L·S

:func:`fake_peak_bytes` fits ``a, b, c, d`` from four fake runs at a few blocks' worth of L and S,
checks the fit at a fifth, larger point, and evaluates it at the real size. When the check fails (the peak
switches phase between the sizes) it falls back to a direct fake run, or reports the fit as unverified
when that would be too slow.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable, Optional, Tuple, Union

import torch

__all__ = [
    "AttentionShape",
    "FakePeak",
    "fake_peak_bytes",
    "math_sdpa",
    "predict_math_peak",
    "predict_plan_peak",
]

logger = logging.getLogger(__name__)

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

# Relative error allowed at the verification point before the affine model is rejected.
_CHECK_TOLERANCE = 1e-3


@dataclass(frozen=True)
class AttentionShape:
    """Shape of one SDPA call: query ``(B, H, L, E)``, key ``(B, H, S, E)``, value ``(B, H, S, Ev)``."""

    batch: int
    heads: int
    q_len: int
    kv_len: int
    head_dim: int
    v_head_dim: Optional[int] = None

    @property
    def ev(self) -> int:
        """Value head dim (defaults to ``head_dim``)."""
        return self.head_dim if self.v_head_dim is None else self.v_head_dim

    def with_lengths(self, q_len: int, kv_len: int) -> AttentionShape:
        """The same shape at other sequence lengths."""
        return AttentionShape(self.batch, self.heads, q_len, kv_len, self.head_dim, self.v_head_dim)


@dataclass(frozen=True)
class FakePeak:
    """Result of a fake-tensor peak prediction.

    Attributes:
        peak_bytes: predicted peak of bytes allocated inside the call (inputs excluded, output included).
        method: ``"direct"`` (one fake run at full size) or ``"affine"`` (fitted and extrapolated).
        coefficients: ``(a, b, c, d)`` of ``a + b·L + c·S + d·L·S`` when fitted.
        check_error: relative error of the fit at its verification point (``None`` for direct runs).
        verified: False only when the fit failed its check and a direct run was too large to do.
        runs: fake runs performed.
    """

    peak_bytes: int
    method: str
    coefficients: Optional[Tuple[float, float, float, float]] = None
    check_error: Optional[float] = None
    verified: bool = True
    runs: int = 1


def math_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """torch's math SDPA backend, the O(N²) reference."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)


def _fake_run(
    fn: AttentionFn,
    shape: AttentionShape,
    dtype: torch.dtype,
    device: Union[str, torch.device],
    requires_grad: bool,
) -> int:
    """One fake run of ``fn`` (and its backward); returns the tracker's peak."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from .memory_tracker import LiveBytesTracker

    b, h, length, s, e, ev = shape.batch, shape.heads, shape.q_len, shape.kv_len, shape.head_dim, shape.ev
    grad_ctx = torch.enable_grad() if requires_grad else torch.no_grad()
    with FakeTensorMode(allow_non_fake_inputs=False), grad_ctx:
        kw = {"dtype": dtype, "device": device}
        q = torch.empty(b, h, length, e, **kw).requires_grad_(requires_grad)
        k = torch.empty(b, h, s, e, **kw).requires_grad_(requires_grad)
        v = torch.empty(b, h, s, ev, **kw).requires_grad_(requires_grad)
        grad_out = torch.empty(b, h, length, ev, **kw) if requires_grad else None
        with LiveBytesTracker() as tracker:
            out = fn(q, k, v)
            if grad_out is not None:
                torch.autograd.backward(out, grad_out)
            del out
        return tracker.peak_bytes


def _fit_bilinear(points: list[tuple[int, int, int]]) -> Tuple[float, float, float, float]:
    """Solve ``p = a + bL + cS + dLS`` exactly through four points on a 2×2 grid ``(L, S, p)``."""
    (l1, s1, p11), (_, s2, p12), (l2, _, p21), (_, _, p22) = points
    # Along S at L1 and at L2, then along L.
    slope1 = (p12 - p11) / (s2 - s1)  # c + d·L1
    slope2 = (p22 - p21) / (s2 - s1)  # c + d·L2
    d = (slope2 - slope1) / (l2 - l1)
    c = slope1 - d * l1
    base1 = p11 - slope1 * s1  # a + b·L1
    base2 = p21 - slope2 * s1  # a + b·L2
    b = (base2 - base1) / (l2 - l1)
    a = base1 - b * l1
    return a, b, c, d


def _eval_bilinear(coef: Tuple[float, float, float, float], length: int, s: int) -> float:
    a, b, c, d = coef
    return a + b * length + c * s + d * length * s


def fake_peak_bytes(
    fn: AttentionFn,
    shape: AttentionShape,
    *,
    dtype: torch.dtype = torch.float32,
    device: Union[str, torch.device] = "cpu",
    requires_grad: bool = False,
    tile: Optional[Tuple[int, int]] = None,
    max_direct_tiles: int = 256,
) -> FakePeak:
    """Predict the peak bytes ``fn(q, k, v)`` allocates, with no real allocation.

    Args:
        fn: attention ``(q, k, v) -> out`` on ``(B, H, L|S, E)`` tensors; it must use fixed blocks (not
            re-plan at the smaller fitting sizes), e.g. ``partial(sdpa, tier=2, block_m=.., block_n=..)``.
        shape: the full-size call.
        dtype, device: of the fake inputs.
        requires_grad: include the backward pass (``out.backward(grad)`` with ``grad`` allocated outside).
        tile: ``(block_m, block_n)`` of ``fn``; ``None`` for untiled code, which is run directly at full size.
        max_direct_tiles: run directly at full size when it has at most this many tiles.

    Returns:
        A :class:`FakePeak`.
    """

    def run(length: int, s: int) -> int:
        return _fake_run(fn, shape.with_lengths(length, s), dtype, device, requires_grad)

    length, s = shape.q_len, shape.kv_len
    if tile is None:
        return FakePeak(run(length, s), "direct")
    bm, bn = max(1, tile[0]), max(1, tile[1])
    tiles = math.ceil(length / bm) * math.ceil(s / bn)
    # Fit on whole blocks, at least two of each so that a first/last-block special case is inside the fit.
    grid_l = (2 * bm, 3 * bm, 5 * bm)
    grid_s = (2 * bn, 3 * bn, 5 * bn)
    if tiles <= max_direct_tiles or length <= grid_l[-1] or s <= grid_s[-1]:
        return FakePeak(run(length, s), "direct")

    points = [(li, si, run(li, si)) for li in grid_l[:2] for si in grid_s[:2]]
    coef = _fit_bilinear(points)
    check = run(grid_l[2], grid_s[2])
    predicted = _eval_bilinear(coef, grid_l[2], grid_s[2])
    error = abs(predicted - check) / max(check, 1)
    if error <= _CHECK_TOLERANCE:
        peak = int(round(_eval_bilinear(coef, length, s)))
        return FakePeak(peak, "affine", coef, error, True, runs=5)
    logger.warning(
        "fake peak: affine model off by %.2f%% at L=%d S=%d for %s; %s",
        100 * error,
        grid_l[2],
        grid_s[2],
        getattr(fn, "__name__", fn),
        "running at full size" if tiles <= 16 * max_direct_tiles else "result is unverified",
    )
    if tiles <= 16 * max_direct_tiles:
        return FakePeak(run(length, s), "direct", coef, error, True, runs=6)
    peak = int(round(_eval_bilinear(coef, length, s)))
    return FakePeak(peak, "affine", coef, error, False, runs=5)


def predict_math_peak(
    shape: AttentionShape, *, dtype: torch.dtype = torch.float32, requires_grad: bool = False
) -> FakePeak:
    """Peak bytes of torch's math SDPA for ``shape`` (one direct fake run; math has no tiles)."""
    return fake_peak_bytes(math_sdpa, shape, dtype=dtype, requires_grad=requires_grad)


def _full_size_plan(shape: AttentionShape, dtype: torch.dtype, device, requires_grad: bool, budget_bytes):
    """The planner's :class:`~noflash_core.planner.Plan` for ``shape``, computed on fake inputs."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from .planner import plan

    with FakeTensorMode():
        kw = {"dtype": dtype, "device": device}
        q = torch.empty(shape.batch, shape.heads, shape.q_len, shape.head_dim, **kw)
        k = torch.empty(shape.batch, shape.heads, shape.kv_len, shape.head_dim, **kw)
        v = torch.empty(shape.batch, shape.heads, shape.kv_len, shape.ev, **kw)
        return plan(q, k, v, budget_bytes=budget_bytes, requires_grad=requires_grad)


def predict_plan_peak(
    shape: AttentionShape,
    *,
    dtype: torch.dtype = torch.float32,
    device: Union[str, torch.device] = "cpu",
    requires_grad: bool = False,
    budget_bytes: Optional[int] = None,
    tier: Union[str, int] = "auto",
    block_m: Optional[int] = None,
    block_n: Optional[int] = None,
):
    """Plan ``shape`` like noflash's dispatcher would, then predict that plan's peak with fake runs.

    Args:
        tier: ``"auto"`` uses the planner's choice; 1, 2 or 3 forces a tier (blocks from the planner
            unless given).

    Returns:
        ``(plan, FakePeak)``; ``plan`` is the planner's :class:`~noflash_core.planner.Plan` for the auto
        choice, and the fake run uses ``plan.tier``/blocks unless ``tier``/``block_m``/``block_n`` override
        them.
    """
    from .sdpa import scaled_dot_product_attention

    chosen = _full_size_plan(shape, dtype, device, requires_grad, budget_bytes)
    run_tier = chosen.tier if tier == "auto" else int(tier)
    bm = block_m or chosen.block_m
    bn = block_n or chosen.block_n
    budget = chosen.budget_bytes

    def fixed_plan(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return scaled_dot_product_attention(
            q, k, v, tier=run_tier, block_m=bm, block_n=bn, budget_bytes=budget
        )

    fixed_plan.__name__ = f"noflash_tier{run_tier}_{bm}x{bn}"
    peak = fake_peak_bytes(
        fixed_plan, shape, dtype=dtype, device=device, requires_grad=requires_grad, tile=(bm, bn)
    )
    return chosen, peak
