"""Human-readable byte counts, shared by the benchmark report, the video planner and the ComfyUI status text."""

from __future__ import annotations

from typing import Optional

__all__ = ["format_bytes"]

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def format_bytes(n: Optional[float], *, decimals: int = 1, missing: str = "—") -> str:
    """Bytes in binary units.

    Args:
        n: a byte count, or None for "unknown".
        decimals: decimals for GiB and TiB; with ``decimals >= 2`` KiB and MiB get them too.
        missing: the text for None.

    Examples: ``format_bytes(520 * 2**20) == "520 MiB"``, ``format_bytes(2 * 2**30) == "2.0 GiB"``,
    ``format_bytes(3 * 2**20, decimals=2) == "3.00 MiB"``.
    """
    if n is None:
        return missing
    value = float(n)
    for unit in _UNITS:
        if abs(value) < 1024 or unit == _UNITS[-1]:
            if unit == "B" or (unit in ("KiB", "MiB") and decimals < 2):
                return f"{value:.0f} {unit}"
            return f"{value:.{decimals}f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")  # pragma: no cover
