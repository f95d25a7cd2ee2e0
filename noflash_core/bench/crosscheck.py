"""``python -m noflash_core.bench.crosscheck``: fake-tensor peak predictions against the tracker on real tensors.

For scaled-down problems (CPU, real allocation) it compares three numbers per plan: the peak the live-bytes
tracker measures, the fake-tensor prediction (forced through the fit-and-extrapolate path) and the planner's own
formula. Writes a markdown table to stdout (and to ``--out`` when given).
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

import torch

__all__ = ["crosscheck_rows", "main", "real_peak_bytes"]

_SHAPES = ((2048, 2048), (3000, 2500), (4096, 512))
_TIERS = ("auto", 1, 2, 3)


def real_peak_bytes(fn, shape, dtype: torch.dtype, requires_grad: bool, tracker=None) -> int:
    """Peak live bytes of ``fn(q, k, v)`` (plus its backward under ``requires_grad``) on real random tensors.

    Args:
        fn: an attention function ``(q, k, v) -> out``.
        shape: a :class:`~noflash_core.memory.fake_peak.AttentionShape`; q is ``(batch, heads, q_len, head_dim)``,
            k ``(batch, heads, kv_len, head_dim)``, v ``(batch, heads, kv_len, ev)``.
        tracker: the tracker class (default :class:`~noflash_core.memory.tracker.LiveBytesTracker`).
    """
    from ..memory.tracker import LiveBytesTracker

    gen = torch.Generator().manual_seed(0)

    def rand(length: int, dim: int) -> torch.Tensor:
        t = torch.randn(shape.batch, shape.heads, length, dim, generator=gen).to(dtype)
        return t.requires_grad_(requires_grad)

    q, k, v = rand(shape.q_len, shape.head_dim), rand(shape.kv_len, shape.head_dim), rand(shape.kv_len, shape.ev)
    grad = torch.randn(shape.batch, shape.heads, shape.q_len, shape.ev, generator=gen).to(dtype)
    with (tracker or LiveBytesTracker)() as tr:
        out = fn(q, k, v)
        if requires_grad:
            out.backward(grad)
        del out
    return tr.peak_bytes


def _real_peak(shape, plan, requires_grad: bool, dtype: torch.dtype, budget: int) -> int:
    from ..sdpa import scaled_dot_product_attention

    def run(q, k, v):
        return scaled_dot_product_attention(
            q, k, v, tier=plan.tier, block_m=plan.block_m, block_n=plan.block_n, budget_bytes=budget
        )

    return real_peak_bytes(run, shape, dtype, requires_grad)


def crosscheck_rows(heads: int = 4, head_dim: int = 64, budget: int = 16 << 20) -> List[dict]:
    """One row per (shape, dtype, tier, grad): real, fake and planner bytes and the relative errors."""
    from ..memory.fake_peak import AttentionShape, predict_plan_peak

    rows = []
    for length, s in _SHAPES:
        for dtype in (torch.float32, torch.float16):
            for tier in _TIERS:
                for grad in (False, True):
                    if tier == 3 and grad:
                        continue
                    shape = AttentionShape(1, heads, length, s, head_dim)
                    plan, fake = predict_plan_peak(
                        shape, dtype=dtype, tier=tier, requires_grad=grad, budget_bytes=budget, max_direct_tiles=0
                    )
                    real = _real_peak(shape, plan, grad, dtype, budget)
                    rows.append(
                        {
                            "L": length,
                            "S": s,
                            "dtype": str(dtype).replace("torch.", ""),
                            "tier": tier,
                            "grad": grad,
                            "plan": f"tier {plan.tier}, {plan.block_m}x{plan.block_n}",
                            "real": real,
                            "fake": fake.peak_bytes,
                            "method": fake.method,
                            "fake_error": (fake.peak_bytes - real) / real,
                            "planner": plan.peak_bytes,
                            "planner_error": (plan.peak_bytes - real) / real,
                        }
                    )
    return rows


def render(rows: List[dict]) -> str:
    """Markdown table plus the worst errors."""
    lines = [
        "# Fake-tensor peak prediction vs the live-bytes tracker (CPU, B=1, H=4, D=64, budget 16 MiB)",
        "",
        "| L | S | dtype | tier asked | grad | plan | tracker (real) | fake prediction | error | planner formula "
        "| error |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['L']} | {r['S']} | {r['dtype']} | {r['tier']} | {r['grad']} | {r['plan']} | {r['real']:,} | "
            f"{r['fake']:,} ({r['method']}) | {100 * r['fake_error']:+.3f}% | {r['planner']:,} | "
            f"{100 * r['planner_error']:+.1f}% |"
        )
    worst = max(abs(r["fake_error"]) for r in rows)
    low = min(r["planner_error"] for r in rows)
    high = max(r["planner_error"] for r in rows)
    lines += [
        "",
        f"Worst fake-prediction error: {100 * worst:.3f}%. Planner formula error range: "
        f"{100 * low:+.1f}% .. {100 * high:+.1f}%.",
        "",
    ]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    """Run the cross-check; returns the exit code (1 when a fake prediction is off by more than 5%)."""
    p = argparse.ArgumentParser(prog="python -m noflash_core.bench.crosscheck", description=__doc__.splitlines()[0])
    p.add_argument("--out", help="also write the markdown here")
    args = p.parse_args(argv)
    rows = crosscheck_rows()
    text = render(rows)
    sys.stdout.write(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text)
    return 0 if all(abs(r["fake_error"]) <= 0.05 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
