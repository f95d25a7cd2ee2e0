"""Tuning during the first sampling run (ComfyUI's Attention Patcher option ``tune = "first run"``), bounded.

The policy, per call signature the cache does not know yet (the planner calls :class:`FirstRunTuner` through the
hook of ``session.py``):

1. time the model's plan once: ``t`` (the call an untuned step makes anyway);
2. time up to ``max_candidates - 1`` other exact plans once each, in the order of
   :func:`~noflash_core.tune.candidates.tuning_candidates`, but start one only while the time spent so far plus
   the slowest call seen so far stays within ``(step_multiple - 1) * t``;
3. run the call itself with the fastest plan (no slower than ``t`` as measured).

So a tuned call costs at most ``step_multiple * t`` (the tuning within ``(step_multiple - 1) * t``, then the call),
and the first sampling step at most ``step_multiple`` times an untuned step's attention, provided no candidate is
slower than the slowest one measured before it (a single kernel cannot be stopped half-way; the candidates are
ordered so that the preferred blocks of every tier come first). Each signature is tuned once per process; the
result is written to the cache (one timed call per plan, ``mode: "first-run"``), so later runs and processes
start tuned. ``python -m noflash_core.tune`` measures more carefully and replaces such entries.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from dataclasses import dataclass, replace
from typing import Callable, Dict, List, Optional, Tuple

from ..planner import Plan
from ..problem import AttentionProblem
from .candidates import tuning_candidates
from .measure import Clock, plan_runner, synchronize
from .signature import device_identity, signature_of
from .tuner import Measured, RunnerFactory, TuneResult, save_results

__all__ = ["FirstRunPolicy", "FirstRunTuner", "bounded_tune", "forget_plans"]

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FirstRunPolicy:
    """The bound of first-run tuning.

    Attributes:
        step_multiple: a tuned call costs at most this many untuned calls (tuning plus the call itself).
        max_candidates: at most this many plans are timed per signature (the model's included).
    """

    step_multiple: float = 4.0
    max_candidates: int = 6

    def __post_init__(self) -> None:
        if self.step_multiple < 1 or self.max_candidates < 1:
            raise ValueError("step_multiple must be >= 1 and max_candidates >= 1, got "
                             f"{self.step_multiple} and {self.max_candidates}")


def _time_once(plan: Plan, runner: Callable[[], None], device, clock: Clock) -> Tuple[Measured, float]:
    """Run once; returns what it measured and the time spent, also when the run failed (it was spent all the
    same)."""
    error = None
    synchronize(device)
    start = clock()
    try:
        runner()
        synchronize(device)
    except Exception as exc:  # noqa: BLE001 - a failing candidate is dropped, never chosen
        error = f"{type(exc).__name__}: {str(exc)[:200]}"
    elapsed = clock() - start
    return Measured(plan, [elapsed] if error is None else [], error), elapsed


def bounded_tune(problem: AttentionProblem, model: Plan, policy: FirstRunPolicy, *, clock: Clock = time.perf_counter,
                 make_runner: RunnerFactory = plan_runner) -> TuneResult:
    """Steps 1 and 2 of the policy above on ``problem``'s own tensors; the result ranks what ran."""
    plans = tuning_candidates(problem, model, policy.max_candidates)
    device = problem.query.device
    measured: List[Measured] = []
    spent = 0.0
    limit = slowest = None
    for plan in plans:
        if limit is not None and spent + slowest > limit:
            break
        m, elapsed = _time_once(plan, make_runner(problem, plan), device, clock)
        measured.append(m)
        spent += elapsed
        if limit is None:  # the model's plan: it sets the bound
            if not m.ok:
                break
            limit, slowest = (policy.step_multiple - 1) * elapsed, elapsed
        slowest = max(slowest, elapsed)
    sig = signature_of(problem, model.requires_grad)
    return TuneResult(sig, device_identity(device), model, measured, 1, "first-run")


def forget_plans() -> None:
    """Drop the dispatcher's cached plans (``noflash_core.clear_caches()`` where this copy has it), so that every
    signature is planned, and so offered to the tuner, again."""
    package = sys.modules.get(__name__.rsplit(".", 2)[0])
    clear = getattr(package, "clear_caches", None)
    if callable(clear):
        clear()


class FirstRunTuner:
    """The planner's cache-miss hook for one patched model: tunes each new signature once, within the policy.

    Args:
        policy: the bound.
        clock, make_runner: injectable for tests (see ``measure.py``).
        save: writes results to the cache (default :func:`~noflash_core.tune.tuner.save_results`).
        on_state: called with ``("tuning" | "tuned", signature key)`` around each tuning.

    Attributes:
        results: signature key -> :class:`~noflash_core.tune.tuner.TuneResult`, this process's tunings.
    """

    def __init__(self, policy: Optional[FirstRunPolicy] = None, *, clock: Clock = time.perf_counter,
                 make_runner: RunnerFactory = plan_runner,
                 save: Callable[[List[TuneResult]], object] = save_results,
                 on_state: Optional[Callable[[str, str], None]] = None) -> None:
        self.policy = policy or FirstRunPolicy()
        self.clock = clock
        self.make_runner = make_runner
        self.save = save
        self.on_state = on_state
        self.results: Dict[str, TuneResult] = {}
        self._lock = threading.Lock()

    def __call__(self, problem: AttentionProblem, model: Plan) -> Optional[Plan]:
        """The plan to run: the measured fastest (``source="tuned"``), or None to keep ``model``."""
        if model.tier == 0 or model.requires_grad or device_identity(problem.query.device) is None:
            return None  # torch's SDPA runs it, training runs are not tuned here, meta/simulated devices
        key = signature_of(problem, False).key()
        with self._lock:
            result = self.results.get(key)
            if result is None:
                result = self._tune(problem, model, key)
        winner = result.winner
        if winner is None:
            return None
        return replace(winner.plan, reason="measured fastest on the first run (tuning cache)", source="tuned")

    def _tune(self, problem: AttentionProblem, model: Plan, key: str) -> TuneResult:
        self._state("tuning", key)
        result = bounded_tune(problem, model, self.policy, clock=self.clock, make_runner=self.make_runner)
        self.results[key] = result
        try:
            self.save([result])
        except (OSError, TimeoutError) as exc:
            _log.warning("noflash: could not write the tuning cache (%s); the result is used in this process only.",
                         exc)
        w = result.winner
        _log.info("noflash: tuned %s: %s", key,
                  f"tier {w.plan.tier} ({w.plan.block_m}x{w.plan.block_n}, {w.median_ms:.1f} ms) of "
                  f"{len(result.measured)} plans" if w else "no plan ran")
        self._state("tuned", key)
        return result

    def _state(self, state: str, key: str) -> None:
        if self.on_state is not None:
            try:
                self.on_state(state, key)
            except Exception:  # noqa: BLE001 - status must never break a sampling run
                _log.exception("noflash: tuning status callback failed")
