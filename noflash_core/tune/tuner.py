"""Tune one call signature: measure the exact candidate plans on this device, keep the fastest, remember it.

:func:`tune_problem` measures the candidates of :func:`~noflash_core.tune.candidates.tuning_candidates` on a
problem's own tensors; :func:`tune_signature` first makes random tensors of a signature's shape on a device.
:func:`save_results` merges the results into the persistent cache (``store.py``) and this process's in-memory copy
(``lookup.py``), so the planner uses them at once and in every later process.

Tuning never changes results beyond what the tiers already guarantee: every candidate is an exact plan the
planner could have chosen by itself, only the block shapes and the tier differ.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from ..budget import resolve_budget
from ..planner import Plan, plan_problem
from ..problem import AttentionProblem
from .candidates import plan_key, tuning_candidates
from .lookup import remember
from .measure import Clock, Timing, interleaved_times, plan_runner
from .signature import Signature, device_identity, device_key, signature_of
from .store import cache_path, update_document

__all__ = ["Measured", "TuneResult", "random_problem", "save_results", "tune_problem", "tune_signature"]

_log = logging.getLogger(__name__)

RunnerFactory = Callable[[AttentionProblem, Plan], Callable[[], None]]


@dataclass
class Measured:
    """One candidate plan and what it measured (``error`` set when it failed and was dropped)."""

    plan: Plan
    times_s: List[float] = field(default_factory=list)
    error: Optional[str] = None
    pruned: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.times_s)

    @property
    def median_ms(self) -> float:
        return Timing(self.times_s, self.error).median_s * 1000.0

    def to_dict(self, pairs: int) -> Dict[str, Any]:
        tier, bm, bn, bh = plan_key(self.plan, pairs)
        d: Dict[str, Any] = {"tier": tier, "block_m": bm, "block_n": bn, "block_h": bh,
                             "peak_bytes": self.plan.peak_bytes}
        if self.ok:
            d["median_ms"] = round(self.median_ms, 4)
        if self.error:
            d["error"] = self.error
        if self.pruned:
            d["pruned"] = True
        return d


@dataclass
class TuneResult:
    """The measurement of one signature.

    Attributes:
        signature: the exact signature measured (the cache files it under its bucketed key).
        identity: the device's identity (:func:`~noflash_core.tune.signature.device_identity`); None on meta.
        model: the plan the cost model picks without tuning (always the first candidate when it is tiled).
        measured: every candidate in the order measured.
        repeats: timed calls per candidate.
        mode: ``"cli"``, ``"first-run"`` (ComfyUI, one call each, time-bounded) or ``"not tuned"`` with ``note``.
        note: why nothing was tuned (torch's SDPA fast path), or empty.
    """

    signature: Signature
    identity: Optional[Dict[str, object]]
    model: Plan
    measured: List[Measured]
    repeats: int
    mode: str = "cli"
    note: str = ""

    @property
    def ranked(self) -> List[Measured]:
        """The candidates that ran, fastest (median) first; ties keep the candidate order (the model's first)."""
        return sorted((m for m in self.measured if m.ok), key=lambda m: m.median_ms)

    @property
    def winner(self) -> Optional[Measured]:
        ranked = self.ranked
        return ranked[0] if ranked else None

    def model_measured(self) -> Optional[Measured]:
        pairs = self.signature.pairs
        key = plan_key(self.model, pairs)
        return next((m for m in self.measured if plan_key(m.plan, pairs) == key), None)

    def entry(self) -> Dict[str, Any]:
        """The cache entry (see ``docs/tuning.md``)."""
        pairs = self.signature.pairs
        model = self.model_measured()
        return {
            "signature": self.signature.bucketed().to_dict(),
            "measured_lengths": {"l": self.signature.l, "s": self.signature.s},
            "budget_bytes": self.model.budget_bytes,
            "mode": self.mode,
            "repeats": self.repeats,
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "plans": [m.to_dict(pairs) for m in self.ranked],
            "model": (model or Measured(self.model)).to_dict(pairs),
            "failed": [m.to_dict(pairs) for m in self.measured if m.error],
        }


def tune_problem(
    problem: AttentionProblem,
    *,
    budget_bytes: Optional[int] = None,
    requires_grad: bool = False,
    max_candidates: int = 8,
    warmup: int = 1,
    repeats: int = 3,
    clock: Clock = time.perf_counter,
    make_runner: RunnerFactory = plan_runner,
    candidates: Optional[Sequence[Plan]] = None,
    prune: Optional[float] = 3.0,
) -> TuneResult:
    """Measure the candidate plans of ``problem`` (its own tensors) and rank them.

    Args:
        budget_bytes: working-memory budget; default as the planner's (:func:`~noflash_core.budget.resolve_budget`).
        max_candidates: how many plans to measure (the model's plan included).
        warmup, repeats: untimed and timed interleaved rounds.
        clock: seconds (injectable for tests); make_runner: how a plan is run (injectable for tests).
        candidates: measure these plans instead of :func:`tuning_candidates` (each must fit the budget).
        prune: stop timing a plan once one of its calls took more than this many times the fastest call of that
            round (None: time every plan every round); see :func:`~noflash_core.tune.measure.interleaved_times`.
    """
    budget = resolve_budget(problem.query.device, budget_bytes)
    model = plan_problem(problem, budget_bytes=budget, requires_grad=requires_grad, use_tuning=False)
    sig = signature_of(problem, requires_grad)
    identity = device_identity(problem.query.device)
    if model.tier == 0:
        return TuneResult(sig, identity, model, [], 0, "not tuned", f"torch SDPA runs it ({model.reason})")
    plans = list(candidates) if candidates is not None else tuning_candidates(problem, model, max_candidates)
    timings = interleaved_times([make_runner(problem, p) for p in plans], problem.query.device, warmup=warmup,
                                repeats=repeats, clock=clock, prune=prune)
    measured = [Measured(p, t.times_s, t.error, t.pruned) for p, t in zip(plans, timings)]
    return TuneResult(sig, identity, model, measured, repeats)


def random_problem(sig: Signature, device: Optional[object] = None, seed: int = 0) -> AttentionProblem:
    """Random canonical tensors of ``sig``'s shape on ``device`` (one batch of ``pairs`` heads), with a mask of
    ``sig.mask``'s kind (about a quarter of the keys hidden)."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    dtype = getattr(torch, sig.dtype)
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(device=dev, dtype=dtype)

    q = rand(1, sig.pairs, sig.g, sig.l, sig.e)
    k, v = rand(1, sig.pairs, sig.s, sig.e), rand(1, sig.pairs, sig.s, sig.ev)
    mask = None
    if sig.mask != "none":
        rows = 1 if sig.mask.endswith("-keys") else sig.l
        keep = torch.rand(1, 1, 1, rows, sig.s, generator=gen) > 0.25
        keep[..., 0] = True
        keep = keep.to(dev)
        if sig.mask.startswith("float"):
            keep = torch.zeros(keep.shape, dtype=dtype, device=dev).masked_fill(~keep, float("-inf"))
        mask = keep
    out_shape = (1, sig.pairs * sig.g, sig.l, sig.ev)
    return AttentionProblem(q, k, v, mask, sig.causal, sig.e ** -0.5, out_shape)


def tune_signature(sig: Signature, device: Optional[object] = None, **kwargs: Any) -> TuneResult:
    """:func:`tune_problem` on random tensors of ``sig``'s shape on ``device`` (keyword arguments as there)."""
    return tune_problem(random_problem(sig, device), requires_grad=sig.grad, **kwargs)


def save_results(results: Sequence[TuneResult], path: Optional[str] = None) -> Optional[str]:
    """Merge the tuned results into the cache file (and this process's copy); returns the path written, or None
    when there was nothing to write or the file belongs to another noflash version."""
    results = [r for r in results if r.identity is not None and r.winner is not None]
    if not results:
        return None
    path = path or cache_path()

    def merge(doc: Dict[str, Any]) -> None:
        for r in results:
            key = device_key(r.identity)  # type: ignore[arg-type]
            dev = doc["devices"].setdefault(key, {"identity": r.identity, "entries": {}})
            dev["identity"] = r.identity
            dev["entries"][r.signature.key()] = r.entry()

    written = update_document(path, merge)
    if written is None:
        return None
    if path == cache_path():
        for r in results:
            remember(device_key(r.identity), r.signature.key(), r.entry())  # type: ignore[arg-type]
    _log.info("noflash tune: %d signature(s) written to %s", len(results), path)
    return path
