"""The text the VRAM Probe node shows: device, memory, SDPA support, the run estimate and the last run.

The node gathers the pieces (``device_report()``, ``estimate_run(...)``, the run history, where it runs) and this
module turns them into plain text. The last run is that of the probe's own workflow (:func:`run_of_workflow`), as the
badges are: a run another workflow produced is not this workflow's story. Nothing here imports ComfyUI.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, List, Mapping, Optional

from ..units import format_bytes

__all__ = ["NO_RUN", "format_device", "format_last_run", "probe_text", "run_of_workflow"]

NO_RUN = "Last run: no run of this workflow yet (queue it with a NoFlash-patched model)"
"""The last-run line when the probe's workflow has no finished patched run."""


def format_device(report: Mapping[str, Any]) -> List[str]:
    """Lines about the device from a ``device_report()`` dict."""
    arch = report.get("arch") or "n/a"
    lines = [
        f"Device: {report.get('name', '?')} ({report.get('vendor', '?')}, arch {arch})",
        f"VRAM: {format_bytes(report.get('free_bytes'))} free of {format_bytes(report.get('total_bytes'))}",
    ]
    backends = report.get("sdpa_backends") or {}
    working = ", ".join(name for name, ok in backends.items() if ok) or "none"
    efficient = "yes" if report.get("efficient_sdpa") else "no (math SDPA builds the full N x N scores)"
    lines.append(f"Efficient SDPA kernel: {efficient}; backends that run: {working}")
    lines.append(f"Global SDPA patch would activate: {'yes' if report.get('patch_would_activate') else 'no'}")
    return lines


def run_of_workflow(
    runs: Iterable[Mapping[str, Any]], origin: Mapping[str, Optional[str]], kind: str = "attention"
) -> Optional[Dict[str, Any]]:
    """The newest of ``runs`` (oldest first, as ``RunHistory.runs()``) of ``kind`` that the probe's own workflow
    produced: the same ``prompt_id`` as ``origin``, or the same ``workflow_id`` (the graph the frontend queued). A run
    whose origin is unknown matches nothing. When ``origin`` names neither (the probe was called outside ComfyUI's
    executor, as in a script) there is no workflow to key on: the newest run of ``kind``."""
    prompt, workflow = origin.get("prompt_id"), origin.get("workflow_id")
    for run in reversed(list(runs)):
        if run.get("kind", "attention") != kind:
            continue
        if prompt is None and workflow is None:
            return dict(run)
        if (prompt is not None and run.get("prompt_id") == prompt) or \
                (workflow is not None and run.get("workflow_id") == workflow):
            return dict(run)
    return None


def format_last_run(run: Optional[Mapping[str, Any]]) -> List[str]:
    """Lines about the last finished sampling run of a patched model in this workflow (:func:`run_of_workflow`)."""
    if not run:
        return [NO_RUN]
    tiers: Dict[str, int] = dict(run.get("tiers") or {})
    mix = ", ".join(f"{t if t == 'comfy' else 'T' + t}: {n}" for t, n in sorted(tiers.items())) or "no calls"
    peak = run.get("peak_bytes")
    peak_text = format_bytes(peak) if peak is not None else run.get("peak_source", "n/a")
    return [
        f"Last run #{run.get('run_id', '?')} ({run.get('label') or 'model'}): {run.get('calls', 0)} attention calls "
        f"[{mix}], longest sequence {run.get('max_q_len', 0)} tokens",
        f"Last run peak memory: {peak_text}",
    ]


def probe_text(
    report: Mapping[str, Any],
    estimate: Optional[str] = None,
    last_run: Optional[Mapping[str, Any]] = None,
    note: str = "",
    device_lines: Optional[List[str]] = None,
) -> str:
    """The whole probe text: device lines (``device_lines``, default :func:`format_device`'s), the estimate block
    (or ``note``), the last run."""
    lines = list(device_lines) if device_lines is not None else format_device(report)
    lines.append("")
    if estimate:
        lines.append(estimate.rstrip())
    elif note:
        lines.append(note)
    lines.append("")
    lines.extend(format_last_run(last_run))
    return "\n".join(lines)
