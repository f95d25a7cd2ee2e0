"""The verdict on a run from its phases: it fits with ComfyUI's own attention, only with the noflash nodes (which
ones), or not at all (and what to change)."""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

from ..units import format_bytes
from .results import Phase, TargetDevice

__all__ = ["verdict"]


def _only_with_noflash(phases: Sequence[Phase], card: str) -> Tuple[str, str, str]:
    needed = [p for p in phases if not p.fits_comfy]
    nodes: List[str] = []
    for p in needed:
        nodes.extend(n for n in p.nodes if n not in nodes)
    changes = "; ".join(f"{p.name} {format_bytes(p.comfy_bytes)} -> {format_bytes(p.noflash_bytes)}" for p in needed)
    return ("noflash", f"Fits in {card} only with noflash: " + ", ".join(f"NoFlash {n}" for n in nodes),
            f"Add {', '.join('NoFlash ' + n for n in nodes)} ({changes}).")


def _what_to_change(p: Phase) -> str:
    if p.name == "denoise":
        return (f"denoise needs {format_bytes(p.noflash_bytes)} even with noflash: lower the resolution or frames "
                "(tokens grow with both), use fp8 weights, or a card with more memory")
    if p.name == "text encoder":
        return (f"the text encoder needs {format_bytes(p.noflash_bytes)}: use an fp8 text-encoder file or a shorter "
                "prompt")
    return f"VAE decode needs {format_bytes(p.noflash_bytes)}: use VAE Decode (Tiled)"


def verdict(phases: Sequence[Phase], vram: Optional[int], target: TargetDevice) -> Tuple[Optional[str], str, str]:
    """``(verdict, one line, what to change)``: ``"fits"``, ``"noflash"``, ``"no"``, or None when the VRAM is
    unknown."""
    if vram is None:
        return None, "VRAM unknown: no verdict (give --vram or pick a device profile)", ""
    card = f"{format_bytes(vram)} ({target.key})"
    if all(p.fits_comfy for p in phases):
        peak = max(phases, key=lambda p: p.comfy_bytes)
        return ("fits", f"Fits in {card} with ComfyUI's own attention (largest: {peak.name}, "
                f"{format_bytes(peak.comfy_bytes)})", "")
    if all(p.fits_noflash for p in phases):
        return _only_with_noflash(phases, card)
    failing = [p for p in phases if not p.fits_noflash]
    fixes = "; ".join(dict.fromkeys(_FIXES.get(p.name, "see the advice") for p in failing))
    return ("no", f"Does not fit in {card}, even with noflash ({', '.join(p.name for p in failing)}): {fixes}",
            "; ".join(_what_to_change(p) for p in failing) + ".")


# The fix the verdict line names when a phase does not fit even with noflash (the advice says more).
_FIXES = {"denoise": "lower the resolution or frames", "text encoder": "use an fp8 text encoder",
          "VAE decode": "use VAE Decode (Tiled)"}
