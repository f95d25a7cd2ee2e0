"""Predict an attention call's peak memory by running the real code on fake tensors.

Nothing is allocated: the inputs are :class:`~torch._subclasses.fake_tensor.FakeTensor` s and a
:class:`~noflash_core.memory.tracker.LiveBytesTracker` adds up the bytes their storages would hold. The
number is what the tracker measures on a real run of the same code (on CPU), with no hand formula.

Long sequences have many tiles, and every tile is a handful of Python-dispatched ops, so a fake run at
75k tokens with small blocks would take minutes. :func:`fake_peak_bytes` therefore runs at a few blocks'
worth of L and S and extrapolates, using the structure of tiled code:

- at one *program point* (the call site of an allocating op), the live bytes are a sum of buffers of fixed
  size (tiles), buffers proportional to L (output, row statistics), to S (a row of scores, key gradients)
  and, for the quadratic baselines, to L·S. So the highest live-bytes at each call site is
  ``a + b·L + c·S + d·L·S``, affine in L at fixed S and in S at fixed L;
- the peak of the call is the maximum over call sites.

The tracker records the highest live-bytes per call site; each site is fitted on a 2×2 grid of (L, S), the
prediction is the maximum of the fitted sites, and a fifth run at a larger size verifies it. Fitting per
site matters: a forward phase that dominates at small sizes can be overtaken by a backward phase at the
real size, which a single affine fit of the overall peak would miss. When the check fails the prediction
falls back to a direct fake run, or is reported as unverified when that would be too slow.

Grad mode: every fake run happens under :func:`plain_grad_mode`, whatever mode the caller is in. Under
``torch.inference_mode()`` (how ComfyUI runs every node) the dispatcher skips the autograd keys, and a
``CompositeImplicitAutograd`` op such as ``aten.scaled_dot_product_attention`` then reaches the tracker's dispatch
mode whole: the fake mode below it decomposes it out of the tracker's sight, so the math backend's ``(L, S)``
score tensors were never counted (160 MiB instead of 66.7 GiB for Wan 2.2 5B at 1280x704x121).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Tuple, Union

import torch

from ..sdpa import math_sdpa

__all__ = [
    "AttentionShape",
    "FakePeak",
    "fake_peak_bytes",
    "math_sdpa",
    "plain_grad_mode",
    "predict_math_peak",
    "predict_plan_peak",
]

logger = logging.getLogger(__name__)

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
Coefficients = Tuple[float, float, float, float]
Site = Tuple[str, ...]

# Key lengths for the fit when the code does not tile keys (any S is a valid point then).
_UNTILED_KEY_STEP = 128
# Relative error allowed at the verification point before the fit is rejected.
_CHECK_TOLERANCE = 1e-3
# Frames of user code (outside torch and the tracker) that name a call site.
_SITE_DEPTH = 4


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
        coefficients: ``(a, b, c, d)`` of ``a + b·L + c·S + d·L·S`` of the site that sets the peak.
        site: that call site, ``"file:line < file:line ..."`` (innermost first).
        check_error: relative error of the fit at its verification point (``None`` for direct runs).
        verified: False only when the fit failed its check and a direct run was too large to do.
        runs: fake runs performed.
    """

    peak_bytes: int
    method: str
    coefficients: Optional[Coefficients] = None
    site: str = ""
    check_error: Optional[float] = None
    verified: bool = True
    runs: int = 1


# ---------------------------------------------------------------------------------------------- grad mode


@contextlib.contextmanager
def plain_grad_mode(requires_grad: bool = False) -> Iterator[None]:
    """Run the enclosed code as a plain process would, whatever the caller's grad mode.

    Leaves ``torch.inference_mode()`` (``inference_mode(False)``), then enables or disables grad. Outside
    inference mode the dispatcher runs every ``CompositeImplicitAutograd`` op's decomposition at the autograd key,
    above any dispatch mode, so the live-bytes tracker sees the ops that allocate (math SDPA's ``bmm`` and
    ``softmax`` outputs, ``linear``'s ``mm``), as in a plain process. Inside inference mode it would see the
    composite op whole and miss its intermediates. Tensors made inside are normal tensors; none made outside are
    needed (the fake runs make their own inputs).

    Args:
        requires_grad: enable grad (for fake runs that include the backward) instead of disabling it.
    """
    with torch.inference_mode(False), (torch.enable_grad() if requires_grad else torch.no_grad()):
        yield


# ---------------------------------------------------------------------------------------------- tracking


def _skipped_files() -> Tuple[str, ...]:
    return (
        os.path.dirname(os.path.abspath(torch.__file__)) + os.sep,
        os.path.join(os.path.dirname(os.path.abspath(__file__)), "memory_tracker.py"),
        os.path.abspath(__file__),
    )


def _call_site(skipped: Tuple[str, ...]) -> Site:
    """The innermost frames outside torch, the tracker and this module, as ``("file:line", ...)``."""
    frame = sys._getframe(2)
    site: List[str] = []
    while frame is not None and len(site) < _SITE_DEPTH:
        name = frame.f_code.co_filename
        if not name.startswith(skipped[0]) and name not in skipped[1:]:
            site.append(f"{os.path.basename(name)}:{frame.f_lineno}")
        frame = frame.f_back
    return tuple(site)


def _site_tracker_class() -> type:
    from .tracker import LiveBytesTracker

    skipped = _skipped_files()

    class _SiteTracker(LiveBytesTracker):
        """:class:`LiveBytesTracker` that also records, per call site, the highest live bytes right after an
        allocation there (``site_peaks``)."""

        def __init__(self) -> None:
            super().__init__()
            self.site_peaks: Dict[Site, int] = {}

        def _commit(self, new, grown, requested) -> None:
            super()._commit(new, grown, requested)
            site = _call_site(skipped)
            if self._live > self.site_peaks.get(site, -1):
                self.site_peaks[site] = self._live

    return _SiteTracker


_SITE_TRACKER: Optional[type] = None


def _tracker(record_sites: bool):
    """A live-bytes tracker; with ``record_sites`` one that also fills ``.site_peaks``."""
    global _SITE_TRACKER
    if not record_sites:
        from .tracker import LiveBytesTracker

        return LiveBytesTracker()
    if _SITE_TRACKER is None:
        _SITE_TRACKER = _site_tracker_class()
    return _SITE_TRACKER()


# ---------------------------------------------------------------------------------------------- fake runs


def _fake_run(
    fn: AttentionFn,
    shape: AttentionShape,
    dtype: torch.dtype,
    device: Union[str, torch.device],
    requires_grad: bool,
    record_sites: bool = False,
) -> Tuple[int, Dict[Site, int]]:
    """One fake run of ``fn`` (and its backward); returns ``(peak, site_peaks)``."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    b, h, length, s, e, ev = shape.batch, shape.heads, shape.q_len, shape.kv_len, shape.head_dim, shape.ev
    with plain_grad_mode(requires_grad), FakeTensorMode():
        kw = {"dtype": dtype, "device": device}
        q = torch.empty(b, h, length, e, **kw).requires_grad_(requires_grad)
        k = torch.empty(b, h, s, e, **kw).requires_grad_(requires_grad)
        v = torch.empty(b, h, s, ev, **kw).requires_grad_(requires_grad)
        grad_out = torch.empty(b, h, length, ev, **kw) if requires_grad else None
        with _tracker(record_sites) as tracker:
            out = fn(q, k, v)
            if grad_out is not None:
                torch.autograd.backward(out, grad_out)
            del out
        return tracker.peak_bytes, dict(getattr(tracker, "site_peaks", {}))


# ---------------------------------------------------------------------------------------------- fitting


def _fit(points: List[Tuple[int, int, int]], along_l: bool, along_s: bool) -> Coefficients:
    """Coefficients through 4 grid points ``(L, S, p)``, or 2 points along one axis (the other fixed)."""
    if along_l and along_s:
        (l1, s1, p11), (_, s2, p12), (l2, _, p21), (_, _, p22) = points
        slope1 = (p12 - p11) / (s2 - s1)  # c + d·L1
        slope2 = (p22 - p21) / (s2 - s1)  # c + d·L2
        d = (slope2 - slope1) / (l2 - l1)
        c = slope1 - d * l1
        base1 = p11 - slope1 * s1  # a + b·L1
        base2 = p21 - slope2 * s1  # a + b·L2
        b = (base2 - base1) / (l2 - l1)
        return base1 - b * l1, b, c, d
    (l1, s1, p1), (l2, s2, p2) = points
    if along_l:
        slope = (p2 - p1) / (l2 - l1)
        return p1 - slope * l1, slope, 0.0, 0.0
    slope = (p2 - p1) / (s2 - s1)
    return p1 - slope * s1, 0.0, slope, 0.0


def _evaluate(coef: Coefficients, length: int, s: int) -> float:
    a, b, c, d = coef
    return a + b * length + c * s + d * length * s


def _fit_sites(
    grid: List[Tuple[int, int]], runs: List[Dict[Site, int]], along_l: bool, along_s: bool
) -> Dict[Site, Coefficients]:
    """Fit every call site that allocated in all grid runs."""
    common = set(runs[0])
    for r in runs[1:]:
        common &= set(r)
    return {site: _fit([(li, si, r[site]) for (li, si), r in zip(grid, runs)], along_l, along_s) for site in common}


def _predict(fits: Dict[Site, Coefficients], length: int, s: int) -> Tuple[float, Site]:
    site = max(fits, key=lambda k: _evaluate(fits[k], length, s))
    return _evaluate(fits[site], length, s), site


def fake_peak_bytes(
    fn: AttentionFn,
    shape: AttentionShape,
    *,
    dtype: torch.dtype = torch.float32,
    device: Union[str, torch.device] = "cpu",
    requires_grad: bool = False,
    tile: Optional[Tuple[int, Optional[int]]] = None,
    max_direct_tiles: int = 256,
    loops_per_tile: int = 1,
) -> FakePeak:
    """Predict the peak bytes ``fn(q, k, v)`` allocates, with no real allocation.

    Args:
        fn: attention ``(q, k, v) -> out`` on ``(B, H, L|S, E)`` tensors; it must use fixed blocks (not
            re-plan at the smaller fitting sizes), e.g. ``partial(sdpa, tier=2, block_m=.., block_n=..)``.
        shape: the full-size call.
        dtype, device: of the fake inputs.
        requires_grad: include the backward pass (``out.backward(grad)`` with ``grad`` allocated outside).
        tile: ``(block_m, block_n)`` of ``fn``; ``block_n=None`` when keys are not tiled (all keys per
            query block); ``tile=None`` for untiled code, which is run directly at full size.
        max_direct_tiles: run directly at full size when it has at most this many tiles.
        loops_per_tile: Python iterations per tile (e.g. B·H for code that loops over heads), for that test.

    Returns:
        A :class:`FakePeak`.
    """
    length, s = shape.q_len, shape.kv_len

    def run(li: int, si: int, sites: bool = False) -> Tuple[int, Dict[Site, int]]:
        return _fake_run(fn, shape.with_lengths(li, si), dtype, device, requires_grad, sites)

    if tile is None:
        return FakePeak(run(length, s)[0], "direct")
    bm = max(1, tile[0])
    keys_tiled = tile[1] is not None
    bn = max(1, tile[1]) if keys_tiled else _UNTILED_KEY_STEP
    tiles = math.ceil(length / bm) * (math.ceil(s / bn) if keys_tiled else 1) * max(1, loops_per_tile)
    # Fit on whole blocks, at least two of each so that first/last-block special cases are inside the fit.
    # An axis too short to fit along is held at its real length (the model is then affine in the other).
    grid_l = (2 * bm, 3 * bm, 5 * bm) if length > 5 * bm else None
    grid_s = (2 * bn, 3 * bn, 5 * bn) if s > 5 * bn else None
    if tiles <= max_direct_tiles or (grid_l is None and grid_s is None):
        return FakePeak(run(length, s)[0], "direct")
    return _fitted_peak(run, fn, (length, s), grid_l, grid_s, tiles <= 16 * max_direct_tiles)


def _fitted_peak(run: Callable[..., Tuple[int, Dict[Site, int]]], fn: AttentionFn, full: Tuple[int, int],
                 grid_l: Optional[Tuple[int, int, int]], grid_s: Optional[Tuple[int, int, int]],
                 small_enough: bool) -> FakePeak:
    """Fit every call site on the grid's first two points per axis, check the fit at the third, extrapolate to
    ``full = (L, S)``; a failed check falls back to a direct run when ``small_enough``, else is unverified."""
    length, s = full
    ls = grid_l or (length,) * 3
    ss = grid_s or (s,) * 3
    grid = [(li, si) for li in (ls[:2] if grid_l else ls[:1]) for si in (ss[:2] if grid_s else ss[:1])]
    fits = _fit_sites(grid, [run(li, si, True)[1] for li, si in grid], grid_l is not None, grid_s is not None)
    check, _ = run(ls[2], ss[2])
    nruns = len(grid) + 1
    error = None
    if fits:
        predicted, _ = _predict(fits, ls[2], ss[2])
        error = abs(predicted - check) / max(check, 1)
        if error <= _CHECK_TOLERANCE:
            peak, site = _predict(fits, length, s)
            return FakePeak(int(round(peak)), "affine", fits[site], " < ".join(site), error, True, nruns)
    logger.warning(
        "fake peak: fitted call sites are off by %s at L=%d S=%d for %s; %s",
        "?" if error is None else f"{100 * error:.2f}%",
        ls[2],
        ss[2],
        getattr(fn, "__name__", fn),
        "running at full size" if small_enough or not fits else "result is unverified",
    )
    if small_enough or not fits:
        return FakePeak(run(length, s)[0], "direct", None, "", error, True, nruns + 1)
    peak, site = _predict(fits, length, s)
    return FakePeak(int(round(peak)), "affine", fits[site], " < ".join(site), error, False, nruns)


# ---------------------------------------------------------------------------------------------- front ends


def predict_math_peak(
    shape: AttentionShape,
    *,
    dtype: torch.dtype = torch.float32,
    device: Union[str, torch.device] = "cpu",
    requires_grad: bool = False,
) -> FakePeak:
    """Peak bytes of torch's math SDPA for ``shape`` (one direct fake run; math has no tiles)."""
    return fake_peak_bytes(math_sdpa, shape, dtype=dtype, device=device, requires_grad=requires_grad)


def _full_size_plan(
    shape: AttentionShape, dtype: torch.dtype, device, requires_grad: bool, budget_bytes, tier, block_m, block_n
):
    """The planner's :class:`~noflash_core.planner.Plan` for ``shape``, computed on fake inputs."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from ..planner import plan

    with plain_grad_mode(requires_grad), FakeTensorMode():
        kw = {"dtype": dtype, "device": device}
        q = torch.empty(shape.batch, shape.heads, shape.q_len, shape.head_dim, **kw)
        k = torch.empty(shape.batch, shape.heads, shape.kv_len, shape.head_dim, **kw)
        v = torch.empty(shape.batch, shape.heads, shape.kv_len, shape.ev, **kw)
        return plan(
            q,
            k,
            v,
            budget_bytes=budget_bytes,
            requires_grad=requires_grad,
            tier=tier,
            block_m=block_m,
            block_n=block_n,
        )


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
    max_direct_tiles: int = 256,
):
    """Plan ``shape`` as noflash's dispatcher would, then predict that plan's peak with fake runs.

    Args:
        shape, dtype, device, requires_grad: the call.
        budget_bytes: the planner's budget (default: its own default for ``device``).
        tier: ``"auto"`` for the planner's choice; 1, 2 or 3 to force a tier.
        block_m, block_n: force blocks (as for ``scaled_dot_product_attention``).
        max_direct_tiles: see :func:`fake_peak_bytes` (0 extrapolates whenever the sizes allow).

    Returns:
        ``(plan, FakePeak)``: the planner's :class:`~noflash_core.planner.Plan` and the predicted peak of
        running exactly that plan.
    """
    from ..sdpa import scaled_dot_product_attention

    chosen = _full_size_plan(shape, dtype, device, requires_grad, budget_bytes, tier, block_m, block_n)
    budget = chosen.budget_bytes
    if chosen.tier == 0:
        # torch's own SDPA on a small problem: no tiles; run it as the dispatcher would.
        def as_dispatched(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return scaled_dot_product_attention(q, k, v, budget_bytes=budget)

        peak = fake_peak_bytes(as_dispatched, shape, dtype=dtype, device=device, requires_grad=requires_grad)
        return chosen, peak
    run_tier, bm, bn = chosen.tier, chosen.block_m, chosen.block_n

    def fixed_plan(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return scaled_dot_product_attention(q, k, v, tier=run_tier, block_m=bm, block_n=bn, budget_bytes=budget)

    fixed_plan.__name__ = f"noflash_tier{run_tier}_{bm}x{bn}"
    # Tiers 1 and 3 take all keys at once: only the query axis is tiled.
    tile = (bm, bn if run_tier == 2 else None)
    peak = fake_peak_bytes(
        fixed_plan,
        shape,
        dtype=dtype,
        device=device,
        requires_grad=requires_grad,
        tile=tile,
        max_direct_tiles=max_direct_tiles,
        loops_per_tile=shape.batch * shape.heads if run_tier == 3 else 1,  # tier 3 works one head at a time
    )
    return chosen, peak
