"""Tables of what a tuning run measured (the CLI's output and the verification report)."""

from __future__ import annotations

from typing import List

from ..planner import Plan
from ..units import format_bytes
from .tuner import TuneResult

__all__ = ["plan_text", "result_table"]


def plan_text(plan: Plan) -> str:
    """``"tier 2 128×512, 4 pairs/step"`` (pairs per step only when not all)."""
    text = f"tier {plan.tier} {plan.block_m}×{plan.block_n}"
    return text + (f", {plan.block_h} pairs/step" if plan.block_h else "")


def _ms(ms: float) -> str:
    return f"{ms / 1000:.2f} s" if ms >= 1000 else f"{ms:.1f} ms"


def result_table(label: str, result: TuneResult) -> str:
    """One signature's candidates as a markdown table, fastest first, failed ones last."""
    sig = result.signature
    head = f"### {label}: {sig.key()} (measured at L={sig.l}, S={sig.s})"
    if result.mode == "not tuned":
        return f"{head}\n\nnot tuned: {result.note}\n"
    model = result.model_measured()
    lines: List[str] = [head, "", f"{len(result.measured)} exact plans, median of up to {result.repeats} "
                        "interleaved calls each.", "",
                        "| rank | plan | median | time / model's | predicted peak | note |",
                        "|---|---|---|---|---|---|"]
    for rank, m in enumerate(result.ranked, 1):
        ratio = f"{m.median_ms / model.median_ms:.2f}" if model is not None and model.ok else "—"
        notes = [n for n, on in (("chosen", rank == 1), ("model's plan", m is model),
                                 (f"stopped after {len(m.times_s)} call(s): over 3× the fastest", m.pruned)) if on]
        lines.append(f"| {rank} | {plan_text(m.plan)} | {_ms(m.median_ms)} | {ratio} | "
                     f"{format_bytes(m.plan.peak_bytes)} | {', '.join(notes)} |")
    for m in result.measured:
        if m.error:
            lines.append(f"| — | {plan_text(m.plan)} | failed | — | {format_bytes(m.plan.peak_bytes)} | {m.error} |")
    return "\n".join(lines) + "\n"
