"""``python -m noflash_core.tune --verify``: does the tuned auto plan run as fast as the best exact plan?

For each signature: plan it as the dispatcher would (it must come from the tuning cache, ``source == "tuned"``),
then time, side by side in interleaved rounds, the public ``scaled_dot_product_attention`` with ``tier="auto"``
and a grid of pinned exact plans (every tier's preferred blocks and their neighbours, the model's plan among
them). It passes when the auto call's median is within :data:`TOLERANCE` of the fastest pinned plan's.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from ..planner import Plan, plan_problem, predict_peak_bytes
from ..problem import AttentionProblem
from .candidates import tuning_candidates
from .lookup import entry_plans, tuned_entry
from .measure import Clock, interleaved_times, plan_runner
from .report import plan_text
from .signature import Signature
from .tuner import random_problem

__all__ = ["TOLERANCE", "VerifyRow", "render_verify", "verify_signature", "write_verify"]

TOLERANCE = 0.10
"""The tuned auto plan may be at most 10% slower than the fastest pinned plan of the grid."""


@dataclass
class VerifyRow:
    """One signature's verification (times in ms, medians of the interleaved rounds)."""

    label: str
    signature: Signature
    auto: Plan
    auto_ms: List[float]
    model: Plan
    grid: List[Tuple[Plan, List[float]]]

    @staticmethod
    def _median(times: List[float]) -> float:
        return statistics.median(times) if times else float("inf")

    def best(self) -> Tuple[Plan, float]:
        return min(((p, self._median(t)) for p, t in self.grid), key=lambda pt: pt[1])

    def model_ms(self) -> float:
        return next((self._median(t) for p, t in self.grid if _same(p, self.model)), float("nan"))

    def ratio(self) -> float:
        return self._median(self.auto_ms) / self.best()[1]

    def best_call_ratio(self) -> float:
        """The auto call's fastest call over the fastest call of any pinned plan: what a busy machine (whose
        interference only ever adds time) disturbs least."""
        fastest = min((min(t) for _, t in self.grid if t), default=float("inf"))
        return min(self.auto_ms) / fastest if self.auto_ms else float("inf")

    @property
    def skipped(self) -> bool:
        """torch's SDPA runs this signature (the planner's fast path): nothing to tune or verify."""
        return self.model.tier == 0

    @property
    def passed(self) -> bool:
        return self.skipped or (self.auto.source == "tuned" and self.ratio() <= 1 + TOLERANCE)

    def spread(self) -> float:
        """(max - min) / median of the auto call's timed rounds: how noisy the machine was."""
        t = self.auto_ms
        return (max(t) - min(t)) / self._median(t) if t else float("nan")

    def to_dict(self) -> Dict[str, Any]:
        if self.skipped:
            return {"label": self.label, "signature": self.signature.to_dict(), "skipped": self.model.reason}
        best, best_ms = self.best()
        return {
            "label": self.label, "signature": self.signature.to_dict(), "source": self.auto.source,
            "auto_plan": plan_text(self.auto), "auto_ms": [round(x, 3) for x in self.auto_ms],
            "auto_median_ms": round(self._median(self.auto_ms), 3), "best_plan": plan_text(best),
            "best_median_ms": round(best_ms, 3), "model_plan": plan_text(self.model),
            "model_median_ms": round(self.model_ms(), 3), "auto_over_best": round(self.ratio(), 4),
            "auto_best_call_over_fastest_call": round(self.best_call_ratio(), 4),
            "passed": self.passed,
            "grid": [{"plan": plan_text(p), "times_ms": [round(x, 3) for x in t]} for p, t in self.grid],
        }


def _same(a: Plan, b: Plan) -> bool:
    return (a.tier, a.block_m, a.block_n, a.block_h) == (b.tier, b.block_m, b.block_n, b.block_h)


def _public_auto(problem: AttentionProblem):
    """The public SDPA on ``problem``'s tensors in torch's layout ``(1, Hq, L, E)``, tier auto."""
    from .. import scaled_dot_product_attention

    q = problem.query.flatten(1, 2)
    k, v = problem.key, problem.value
    mask = problem.mask.squeeze(2) if problem.mask is not None else None
    gqa = problem.dims.g > 1

    def run() -> None:
        with torch.no_grad():
            scaled_dot_product_attention(q, k, v, mask, is_causal=problem.is_causal, enable_gqa=gqa)
    return run


def _grid(problem: AttentionProblem, model: Plan, size: int) -> List[Plan]:
    grid = tuning_candidates(problem, model, size)
    entry = tuned_entry(problem, False)
    pairs = problem.dims.b * problem.dims.h
    for tier, bm, bn, bh in entry_plans(entry) if entry else []:
        if not any((p.tier, p.block_m, p.block_n, p.block_h) == (tier, bm, bn, bh) for p in grid):
            peak = predict_peak_bytes(problem, tier, bm, bn, False, block_h=bh)
            grid.append(Plan(tier, bm, bn, peak, model.budget_bytes, False, "tuning cache", bh if bh < pairs else 0))
    return grid


def verify_signature(label: str, sig: Signature, device: Optional[object] = None, *, grid_size: int = 12,
                     warmup: int = 1, repeats: int = 5, clock: Clock = time.perf_counter,
                     prune: Optional[float] = 3.0) -> VerifyRow:
    """Time the tuned auto call against the pinned grid on random tensors of ``sig`` (forward only). Plans whose
    fastest call is over ``prune`` times the fastest call of any runner stop being timed (they cannot be the
    fastest)."""
    problem = random_problem(sig, device)
    auto = plan_problem(problem)
    model = plan_problem(problem, use_tuning=False)
    if model.tier == 0:
        return VerifyRow(label, sig, auto, [], model, [])
    grid = _grid(problem, model, grid_size)
    runners = [_public_auto(problem)] + [plan_runner(problem, p) for p in grid]
    timings = interleaved_times(runners, problem.query.device, warmup=warmup, repeats=repeats, clock=clock,
                                prune=prune, keep=(0,))  # the auto call is what is verified: always timed
    ms = [[t * 1000 for t in timing.times_s] for timing in timings]
    kept = [(p, t) for p, t, timing in zip(grid, ms[1:], timings[1:]) if timing.error is None]
    return VerifyRow(label, sig, auto, ms[0], model, kept)


def render_verify(rows: Sequence[VerifyRow], header: Sequence[str] = ()) -> str:
    """The verification as markdown: one line per signature."""
    lines = list(header) + [
        "| shape | source | tuned auto plan | auto median | fastest pinned plan | its median | auto / fastest "
        "| best calls: auto / fastest | untuned (model) plan | its median | model / auto | spread of auto calls "
        "| passed |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.skipped:
            lines.append(f"| {r.label} | — | torch SDPA ({r.model.reason}) | | | | | | | | | | not tuned |")
            continue
        best, best_ms = r.best()
        auto_ms = statistics.median(r.auto_ms)
        lines.append(
            f"| {r.label} | {r.auto.source} | {plan_text(r.auto)} | {auto_ms:.0f} ms | {plan_text(best)} | "
            f"{best_ms:.0f} ms | {r.ratio():.3f} | {r.best_call_ratio():.3f} | {plan_text(r.model)} | "
            f"{r.model_ms():.0f} ms | "
            f"{r.model_ms() / auto_ms:.2f}× | {r.spread():.0%} | {'yes' if r.passed else '**no**'} |"
        )
    return "\n".join(lines) + "\n"


def write_verify(rows: Sequence[VerifyRow], out_dir: str, header: Sequence[str], meta: Dict[str, Any]) -> List[str]:
    """Write ``results.md`` and ``results.json`` into ``out_dir``; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    md, js = os.path.join(out_dir, "results.md"), os.path.join(out_dir, "results.json")
    with open(md, "w", encoding="utf-8") as f:
        f.write(render_verify(rows, header))
    with open(js, "w", encoding="utf-8") as f:
        json.dump({**meta, "tolerance": TOLERANCE, "rows": [r.to_dict() for r in rows]}, f, indent=1)
        f.write("\n")
    return [md, js]
