"""Write benchmark results as markdown and JSON."""

from __future__ import annotations

import json
import math
import os
from typing import List, Optional, Sequence

from ..units import format_bytes
from .suite import BenchResult, CellResult

__all__ = ["format_ms", "markdown_header", "render_markdown", "write_json", "write_markdown"]

_MODES = {"fwd": "Forward", "fwd+bwd": "Forward + backward"}


def format_ms(ms: Optional[float]) -> str:
    """``491.2`` -> ``"491 ms"``, ``2503`` -> ``"2.50 s"``, small values keep more digits."""
    if ms is None or math.isnan(ms):
        return "—"
    if ms >= 1000:
        return f"{ms / 1000:.2f} s"
    if ms >= 100:
        return f"{ms:.0f} ms"
    if ms >= 10:
        return f"{ms:.1f} ms"
    return f"{ms:.2f} ms"


def markdown_header(title: str, paragraphs: Sequence[str], command: str = "") -> List[str]:
    """A report's opening lines: ``# title``, each paragraph followed by a blank line, then the ``command`` that
    made the report in a code block (when given)."""
    lines = [f"# {title}", ""]
    for paragraph in paragraphs:
        lines += [paragraph, ""]
    if command:
        lines += ["```", command, "```", ""]
    return lines


def _cell_text(cell: Optional[CellResult]) -> str:
    if cell is None:
        return ""
    if cell.status == "ok":
        return f"{format_ms(cell.median_ms)} / {format_bytes(cell.peak_bytes)}"
    return {"skipped": "skipped", "unsupported": "n/a", "error": "error"}.get(cell.status, cell.status)


def _ratio(num: Optional[CellResult], den: Optional[CellResult], with_min: bool = False) -> str:
    if num is None or den is None or num.status != "ok" or den.status != "ok" or not den.median_ms:
        return "—"
    text = f"{num.median_ms / den.median_ms:.2f}×"
    if with_min and num.times_ms and den.times_ms:
        text += f" ({min(num.times_ms) / min(den.times_ms):.2f}×)"
    return text


def _impl_names(result: BenchResult) -> List[str]:
    return list(result.impls)


def _header(result: BenchResult, command: Optional[str]) -> List[str]:
    cfg, m = result.config, result.machine
    lines = ["# noflash attention benchmark", ""]
    where = m.get("gpu") or m.get("cpu")
    lines.append(
        f"- Machine: {where} ({m.get('device')}), {m.get('cpu_count')} CPU cores, "
        f"torch {m.get('torch')} with {cfg.get('threads') or m.get('torch_threads')} threads for every "
        "implementation."
    )
    if m.get("comfyui"):
        lines.append(f"- ComfyUI {m['comfyui']}.")
    lines.append(
        f"- Problem: q, k, v = (B={cfg['batch']}, H={cfg['heads']}, N, D={cfg['head_dim']}), {cfg['dtype']}, "
        "self-attention, no mask."
    )
    method = "live-bytes tracker" if m.get("device", "cpu").startswith(("cpu", "mps")) else "max_memory_allocated"
    lines.append(
        f"- Time: median of up to {cfg['repeats']} calls after {cfg['warmup']} warm-up. Memory: peak bytes "
        f"allocated inside the call ({method}); inputs excluded, output and gradients included."
    )
    lines.append(f"- Started {result.started}, took {result.duration_s:.0f} s.")
    loads = [m.get("load_at_start"), m.get("load_at_end")]
    if all(isinstance(x, (int, float)) for x in loads):
        lines.append(f"- Load average at start / end: {loads[0]:.2f} / {loads[1]:.2f}.")
        cores = m.get("cpu_count") or 1
        if m.get("device") == "cpu" and max(loads) > float(cores) + 1:
            lines.append(
                "- **Warning:** the machine was busy during the run; CPU times are unreliable (ratios within a row "
                "are timed in interleaved rounds and hold up better)."
            )
    if command:
        lines.append(f"- Command: `{command}`")
    lines.append("")
    return lines


def _mode_table(result: BenchResult, mode: str, names: Sequence[str]) -> List[str]:
    sizes = result.config["sizes"]
    lines = [f"## {_MODES[mode]} (time / peak memory)", ""]
    lines.append("| N | " + " | ".join(names) + " |")
    lines.append("|---|" + "---|" * len(names))
    for n in sizes:
        row = [_cell_text(result.cell(name, mode, n)) for name in names]
        lines.append(f"| {n} | " + " | ".join(row) + " |")
    lines.append("")
    return lines


def _speedup_table(result: BenchResult, names: Sequence[str]) -> List[str]:
    others = [n for n in names if n != "math"]
    lines = ["## Speed-up over math SDPA (math time / time; above 1× is faster)", ""]
    lines.append("| N | mode | " + " | ".join(others) + " |")
    lines.append("|---|---|" + "---|" * len(others))
    for n in result.config["sizes"]:
        for mode in result.config["modes"]:
            math_cell = result.cell("math", mode, n)
            row = [_ratio(math_cell, result.cell(name, mode, n)) for name in others]
            lines.append(f"| {n} | {mode} | " + " | ".join(row) + " |")
    lines.append("")
    return lines


def _auto_table(result: BenchResult) -> List[str]:
    if "noflash-auto" not in result.impls:
        return []
    lines = [
        "## noflash auto against math SDPA and torch's default SDPA",
        "",
        "Ratios of median times; in brackets the ratio of the fastest calls, which a busy machine disturbs less.",
        "",
    ]
    lines.append("| N | mode | auto | math | torch default | auto speed-up over math | auto time / torch time | "
                 "auto plan (source) |")
    lines.append("|---|---|---|---|---|---|---|---|")
    for n in result.config["sizes"]:
        for mode in result.config["modes"]:
            auto, mth, tch = (result.cell(i, mode, n) for i in ("noflash-auto", "math", "torch"))
            lines.append(
                f"| {n} | {mode} | {_cell_text(auto)} | {_cell_text(mth)} | {_cell_text(tch)} | "
                f"{_ratio(mth, auto, True)} | {_ratio(auto, tch, True)} | {(auto.plan if auto else '') or '—'} |"
            )
    lines.append("")
    return lines


def _accuracy_table(result: BenchResult, names: Sequence[str]) -> List[str]:
    cells = [c for c in result.cells if c.mode == "fwd" and c.max_abs_err is not None]
    if not cells:
        return []
    lines = ["## Forward accuracy: max |out − torch default SDPA out|", ""]
    lines.append("| N | " + " | ".join(names) + " |")
    lines.append("|---|" + "---|" * len(names))
    for n in result.config["sizes"]:
        row = []
        for name in names:
            c = result.cell(name, "fwd", n)
            row.append(f"{c.max_abs_err:.1e}" if c is not None and c.max_abs_err is not None else "—")
        lines.append(f"| {n} | " + " | ".join(row) + " |")
    lines.append("")
    return lines


def _notes(result: BenchResult) -> List[str]:
    lines = []
    notes = [c for c in result.cells if c.status in ("skipped", "error", "ok") and c.note]
    if notes or result.missing:
        lines += ["## Notes", ""]
    for c in notes:
        lines.append(
            f"- {c.impl} {c.mode} N={c.n}: {c.note}"
            if c.status == "ok"
            else f"- {c.impl} {c.mode} N={c.n}: {c.status}: {c.note}"
        )
    for name, why in result.missing.items():
        lines.append(f"- {name}: not run: {why}")
    if lines:
        lines.append("")
    return lines


def render_markdown(result: BenchResult, command: Optional[str] = None, plots: Sequence[str] = ()) -> str:
    """The markdown report."""
    names = _impl_names(result)
    lines = _header(result, command)
    for mode in result.config["modes"]:
        lines += _mode_table(result, mode, names)
    lines += _auto_table(result)
    if "math" in names:
        lines += _speedup_table(result, names)
    lines += _accuracy_table(result, names)
    lines += _notes(result)
    for path in plots:
        lines += [f"![{os.path.splitext(os.path.basename(path))[0]}]({os.path.basename(path)})", ""]
    return "\n".join(lines)


def write_markdown(result: BenchResult, path: str, command: Optional[str] = None, plots: Sequence[str] = ()) -> str:
    """Write :func:`render_markdown` to ``path``; returns the path."""
    with open(path, "w", encoding="utf-8") as f:
        f.write(render_markdown(result, command, plots))
    return path


def write_json(result: BenchResult, path: str, command: Optional[str] = None) -> str:
    """Write the full result (every timed call) as JSON; returns the path."""
    data = result.to_dict()
    data["command"] = command
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
    return path
