"""Mask variants side by side: ``python -m noflash_core.bench --variants none,causal,pad,cross``.

For every N and variant, noflash's auto plan, torch's default SDPA (the fused kernel where one exists, e.g. on
CPU) and torch's math SDPA run on the same inputs, forward only, in interleaved rounds: each round times one call
of each, so a change of machine load hits all three alike. The table gives the best call of each (the least
disturbed one on a shared machine), the median, and the ratios ours/fused and math/ours of the best calls.

Variants (``q`` is ``(B, H, N, D)``):

* ``none``: self-attention, no mask;
* ``causal``: ``is_causal=True``;
* ``pad``: a bool key-padding mask ``(B, 1, 1, N)`` hiding the last 25% of keys;
* ``cross``: cross-attention to 512 keys.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .device import describe_machine, load_average, synchronize
from .report import markdown_header

__all__ = [
    "ALL_VARIANTS",
    "VARIANT_TARGETS",
    "VariantCell",
    "VariantsConfig",
    "parse_variants",
    "render_variants_markdown",
    "run_variants",
    "write_variants",
]

logger = logging.getLogger(__name__)

ALL_VARIANTS: Tuple[str, ...] = ("none", "causal", "pad", "cross")
CROSS_KEYS = 512
PAD_SHARE = 0.25
VARIANT_TARGETS = {"ours/fused": 1.7, "math/ours": 1.8}
"""The goals the table is checked against: ours/fused at most 1.7, math/ours at least 1.8."""
IMPLS = ("ours", "fused", "math")
_LABELS = {"ours": "noflash auto", "fused": "torch default SDPA", "math": "torch math SDPA"}


def parse_variants(text: str) -> List[str]:
    """``"none,causal"`` -> ``["none", "causal"]``; ``"all"`` is every variant.

    Raises:
        ValueError: an unknown variant.
    """
    names = [p.strip().lower() for p in text.split(",") if p.strip()]
    if names == ["all"]:
        return list(ALL_VARIANTS)
    unknown = [n for n in names if n not in ALL_VARIANTS]
    if unknown or not names:
        raise ValueError(f"unknown variant(s) {unknown or text!r}; choose from {', '.join(ALL_VARIANTS)} (or all)")
    return names


@dataclass
class VariantsConfig:
    """What ``--variants`` runs.

    Attributes:
        variants: from :data:`ALL_VARIANTS`.
        sizes: N (query length; also the key length except for ``cross``).
        batch, heads, head_dim: ``(B, H, N, D)``.
        dtype, device: of the inputs.
        repeats: interleaved timing rounds (after one untimed warm-up call of each).
        threads: torch intra-op threads (None keeps torch's).
        seed: input RNG seed.
    """

    variants: List[str] = field(default_factory=lambda: list(ALL_VARIANTS))
    sizes: List[int] = field(default_factory=lambda: [2048, 4096])
    batch: int = 1
    heads: int = 16
    head_dim: int = 64
    dtype: torch.dtype = torch.float32
    device: str = "cpu"
    repeats: int = 7
    threads: Optional[int] = None
    seed: int = 0

    def to_dict(self) -> Dict[str, object]:
        d = asdict(self)
        d["dtype"] = str(self.dtype).replace("torch.", "")
        return d


@dataclass
class VariantCell:
    """One (N, variant) row: times in ms of every timed call per implementation, and what noflash ran."""

    n: int
    variant: str
    times_ms: Dict[str, List[float]]
    tier: Optional[int] = None
    blocks: Tuple[int, int] = (0, 0)
    max_abs_err: Optional[float] = None
    source: str = ""

    def best(self, impl: str) -> float:
        return min(self.times_ms[impl])

    def median(self, impl: str) -> float:
        return statistics.median(self.times_ms[impl])

    def ratios(self) -> Dict[str, float]:
        """``ours/fused`` and ``math/ours`` of the best calls."""
        return {
            "ours/fused": self.best("ours") / self.best("fused"),
            "math/ours": self.best("math") / self.best("ours"),
        }

    def meets_targets(self) -> bool:
        r = self.ratios()
        return r["ours/fused"] <= VARIANT_TARGETS["ours/fused"] and r["math/ours"] >= VARIANT_TARGETS["math/ours"]


def make_variant_inputs(cfg: VariantsConfig, n: int, variant: str):
    """``(q, k, v, attn_mask, is_causal)`` for one variant (same values for every implementation)."""
    gen = torch.Generator().manual_seed(cfg.seed + n)
    s = CROSS_KEYS if variant == "cross" else n

    def rand(length: int) -> torch.Tensor:
        t = torch.randn(cfg.batch, cfg.heads, length, cfg.head_dim, generator=gen)
        return t.to(device=cfg.device, dtype=cfg.dtype)

    q, k, v = rand(n), rand(s), rand(s)
    mask = None
    if variant == "pad":
        mask = torch.ones(cfg.batch, 1, 1, s, dtype=torch.bool, device=cfg.device)
        mask[..., s - int(s * PAD_SHARE):] = False
    return q, k, v, mask, variant == "causal"


def _implementations() -> Dict[str, Callable]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from ..sdpa import original_sdpa, scaled_dot_product_attention

    def ours(q, k, v, m, c):
        return scaled_dot_product_attention(q, k, v, m, is_causal=c)

    def fused(q, k, v, m, c):
        return original_sdpa(q, k, v, m, is_causal=c)

    def math(q, k, v, m, c):
        with sdpa_kernel(SDPBackend.MATH):
            return original_sdpa(q, k, v, m, is_causal=c)

    return {"ours": ours, "fused": fused, "math": math}


def _timed(fn: Callable, args, device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn(*args)
    synchronize(device)
    return (time.perf_counter() - start) * 1000.0


def _run_cell(cfg: VariantsConfig, n: int, variant: str, impls: Dict[str, Callable]) -> VariantCell:
    from .. import telemetry

    args = make_variant_inputs(cfg, n, variant)
    device = args[0].device
    seen: List = []
    unsubscribe = telemetry.subscribe(seen.append)
    try:
        with torch.no_grad():
            outs = {name: fn(*args) for name, fn in impls.items()}  # warm-up, and the accuracy check
    finally:
        unsubscribe()
    err = float((outs["ours"].double() - outs["math"].double()).abs().max())
    del outs
    times: Dict[str, List[float]] = {name: [] for name in impls}
    with torch.no_grad():
        for _ in range(max(1, cfg.repeats)):
            for name, fn in impls.items():
                times[name].append(round(_timed(fn, args, device), 4))
    rec = seen[-1] if seen else None
    cell = VariantCell(n, variant, times, rec.tier if rec else None,
                       (rec.block_m, rec.block_n) if rec else (0, 0), err, rec.plan_source if rec else "")
    logger.info(
        "N=%d %-6s ours %.1f ms (tier %s), fused %.1f ms, math %.1f ms: ours/fused %.2f, math/ours %.2f",
        n, variant, cell.best("ours"), cell.tier, cell.best("fused"), cell.best("math"),
        cell.ratios()["ours/fused"], cell.ratios()["math/ours"],
    )
    return cell


def run_variants(cfg: VariantsConfig) -> Dict[str, object]:
    """Run every (N, variant) cell; returns the plain-data result that :func:`write_variants` writes."""
    old_threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    t0 = time.monotonic()
    try:
        machine = describe_machine(torch.device(cfg.device))
        impls = _implementations()
        cells = [_run_cell(cfg, n, v, impls) for n in cfg.sizes for v in cfg.variants]
    finally:
        torch.set_num_threads(old_threads)
    machine["load_at_end"] = load_average()
    machine["omp_env"] = {k: v for k, v in os.environ.items() if k.startswith(("OMP_", "GOMP_", "KMP_"))}
    return {
        "config": cfg.to_dict(),
        "machine": machine,
        "started": started,
        "duration_s": round(time.monotonic() - t0, 2),
        "targets": dict(VARIANT_TARGETS),
        "cells": [asdict(c) for c in cells],
    }


def _cells(result: Dict[str, object]) -> List[VariantCell]:
    return [VariantCell(**{**c, "blocks": tuple(c["blocks"])}) for c in result["cells"]]  # type: ignore[index]


def render_variants_markdown(result: Dict[str, object], command: str = "") -> str:
    """The variant table as markdown."""
    cfg, m = result["config"], result["machine"]
    cells = _cells(result)
    machine = (
        f"{m.get('gpu') or m.get('cpu')}, torch {m.get('torch')}, {m.get('torch_threads')} thread(s), "
        f"{cfg['dtype']}, B={cfg['batch']}, H={cfg['heads']}, D={cfg['head_dim']}, forward. "
        f"Load average {m.get('load_at_start')} at start, {m.get('load_at_end')} at end."
        + (f" Environment: {' '.join(f'{k}={v}' for k, v in m['omp_env'].items())}." if m.get("omp_env") else "")
    )
    method = (
        f"Each cell: best of {cfg['repeats']} interleaved calls (median in brackets). Targets: ours/fused ≤ "
        f"{VARIANT_TARGETS['ours/fused']}, math/ours ≥ {VARIANT_TARGETS['math/ours']}. pad = bool key-padding "
        f"mask (B, 1, 1, N) hiding the last {PAD_SHARE:.0%} of keys; cross = {CROSS_KEYS} keys."
    )
    title = "Mask variants: noflash auto vs torch's default and math SDPA"
    lines = markdown_header(title, [machine, method], command)
    lines += [
        "| N | variant | noflash auto | torch default (fused) | torch math | ours / fused | math / ours | "
        "plan | max abs err vs math |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in cells:
        r = c.ratios()
        ok_f = "" if r["ours/fused"] <= VARIANT_TARGETS["ours/fused"] else " ✗"
        ok_m = "" if r["math/ours"] >= VARIANT_TARGETS["math/ours"] else " ✗"
        times = [f"{c.best(i):.1f} ms ({c.median(i):.1f})" for i in IMPLS]
        source = f", {c.source}" if c.source else ""
        plan = f"tier {c.tier} ({c.blocks[0]}×{c.blocks[1]}{source})" if c.tier is not None else "—"
        err = f"{c.max_abs_err:.1e}" if c.max_abs_err is not None else "—"
        lines.append(
            f"| {c.n} | {c.variant} | {' | '.join(times)} | {r['ours/fused']:.2f}{ok_f} | "
            f"{r['math/ours']:.2f}{ok_m} | {plan} | {err} |"
        )
    met = sum(c.meets_targets() for c in cells)
    lines += ["", f"{met} of {len(cells)} rows meet both targets.", ""]
    return "\n".join(lines)


def write_variants(result: Dict[str, object], out_dir: str, command: str = "") -> List[str]:
    """Write ``results.md`` and ``results.json`` into ``out_dir``; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    md = os.path.join(out_dir, "results.md")
    js = os.path.join(out_dir, "results.json")
    with open(md, "w") as f:
        f.write(render_variants_markdown(result, command))
    with open(js, "w") as f:
        json.dump({**result, "command": command}, f, indent=1)
    return [md, js]


def variants_config_from_args(args, sizes: Optional[Sequence[int]]) -> VariantsConfig:
    """A :class:`VariantsConfig` from the bench CLI's parsed arguments."""
    return VariantsConfig(
        variants=parse_variants(args.variants),
        sizes=list(sizes or (2048, 4096)),
        batch=args.batch,
        heads=args.heads,
        head_dim=args.head_dim,
        dtype=args.dtype or torch.float32,
        device=args.device or "cpu",
        repeats=args.repeats or 7,
        threads=args.threads,
        seed=args.seed,
    )
