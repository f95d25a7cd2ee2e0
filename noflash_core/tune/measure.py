"""Timing exact plans fairly: warm-up, device synchronisation and interleaved repeats.

A noisy machine (another process, a GPU clocking up) slows whatever runs at that moment. Timing all candidates in
rounds, each round visiting every candidate once in a rotated order, spreads such disturbances over all of them;
the median of each candidate's rounds then ignores the odd slow call. A candidate that raises (out of memory or
anything else) is dropped at once and never timed again.

The clock and the way a plan is run are injectable, so tests can script the times.
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence

import torch

from ..attention_op import attention_forward_op, run_forward
from ..planner import Plan
from ..problem import AttentionProblem

__all__ = ["Clock", "Timing", "interleaved_times", "plan_runner", "synchronize"]

_log = logging.getLogger(__name__)

Clock = Callable[[], float]
Runner = Callable[[], None]


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on ``device`` (CUDA/ROCm, XPU, MPS); nothing on CPU."""
    backend = getattr(torch, device.type, None) if device.type not in ("cpu", "meta") else None
    if backend is not None and hasattr(backend, "synchronize"):
        backend.synchronize()


def plan_runner(problem: AttentionProblem, plan: Plan) -> Runner:
    """A callable that runs ``plan`` pinned on ``problem`` (forward, or forward and backward when
    ``plan.requires_grad``), discarding the result."""
    tier, bm, bn, bh = plan.tier, plan.block_m, plan.block_n, plan.block_h
    if not plan.requires_grad:
        def forward() -> None:
            with torch.no_grad():
                run_forward(problem, tier, bm, bn, None, False, bh)
        return forward
    q, k, v = (t.detach().requires_grad_(True) for t in (problem.query, problem.key, problem.value))
    grad_out = torch.ones(q.shape[:-1] + (v.shape[-1],), dtype=q.dtype, device=q.device)

    def forward_backward() -> None:
        for t in (q, k, v):
            t.grad = None
        with torch.enable_grad():
            out, _ = attention_forward_op(q, k, v, problem.mask, problem.is_causal, problem.scale, 0.0, 0, tier,
                                          bm, bn, True, bh)
            out.backward(grad_out)
    return forward_backward


@dataclass
class Timing:
    """What one candidate measured: every timed call in seconds, or the error that dropped it."""

    times_s: List[float] = field(default_factory=list)
    error: Optional[str] = None
    pruned: bool = False

    @property
    def median_s(self) -> float:
        return statistics.median(self.times_s) if self.times_s and self.error is None else float("inf")


def _attempt(runner: Runner, timing: Timing, device: torch.device, clock: Clock) -> Optional[float]:
    try:
        synchronize(device)
        start = clock()
        runner()
        synchronize(device)
        return clock() - start
    except Exception as exc:  # noqa: BLE001 - any failure drops the candidate, never the tuning run
        timing.error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        _log.info("noflash tune: a candidate failed and is dropped (%s)", timing.error)
        if device.type == "cuda" and isinstance(exc, torch.OutOfMemoryError):
            torch.cuda.empty_cache()
        return None


def interleaved_times(runners: Sequence[Runner], device: torch.device, *, warmup: int = 1, repeats: int = 3,
                      clock: Clock = time.perf_counter, prune: Optional[float] = 3.0,
                      keep: Sequence[int] = ()) -> List[Timing]:
    """Time each runner ``repeats`` times in interleaved rounds after ``warmup`` untimed rounds.

    Round ``r`` visits the candidates starting at ``r mod n``, so no candidate always runs first (after a pause)
    or last. With ``prune``, from the second timed round on, a candidate whose fastest timed call so far took more
    than ``prune`` times the fastest timed call of any candidate is not run again: it cannot win, and the slowest
    plans cost the most time. A candidate is judged on at least two calls (one disturbed call never prunes it),
    warm-up calls (cold) never count, and the runners at the indices in ``keep`` are always timed.
    Returns one :class:`Timing` per runner, in the given order.
    """
    timings = [Timing() for _ in runners]
    best = [float("inf")] * len(runners)  # each runner's fastest call so far, the warm-up included
    n = len(runners)
    for r in range(max(0, warmup) + max(1, repeats)):
        for j in range(n):
            i = (j + r) % n
            if timings[i].error is not None or timings[i].pruned:
                continue
            elapsed = _attempt(runners[i], timings[i], device, clock)
            if elapsed is not None and r >= warmup:
                best[i] = min(best[i], elapsed)
                timings[i].times_s.append(elapsed)
        if prune is not None and r > warmup:  # after two timed calls each; warm-up calls (cold) never count
            _prune(timings, best, prune, keep)
    return timings


def _prune(timings: List[Timing], best: List[float], factor: float, keep: Sequence[int]) -> None:
    """Stop timing the runners whose fastest call is over ``factor`` times the fastest call of any runner."""
    fastest = min(best, default=float("inf"))
    for i, (timing, b) in enumerate(zip(timings, best)):
        if i not in keep and timing.error is None and not timing.pruned and b > factor * fastest:
            timing.pruned = True
