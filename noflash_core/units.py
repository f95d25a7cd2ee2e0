"""Units and names users type and read: byte counts (``"1.50 GiB"``, ``"16GiB"``) and dtype names (``"fp16"``).

:func:`format_bytes` follows the same rules as ``formatBytes`` in ``web/noflash_format.js`` (the browser badge), so
the bench report, the video planner, the ComfyUI status and the badge print one number the same way.
"""

from __future__ import annotations

import math
import re
from decimal import ROUND_HALF_UP, Decimal
from typing import Dict, Iterable, Optional, Union

import torch

__all__ = ["DTYPE_NAMES", "dtype_name", "format_bytes", "parse_bytes", "parse_dtype"]

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def _round_half_up(value: float, decimals: int) -> str:
    """``value`` with ``decimals`` decimals, ties away from zero (JavaScript's ``toFixed``)."""
    return str(Decimal(value).quantize(Decimal(1).scaleb(-decimals), rounding=ROUND_HALF_UP))


def format_bytes(n: Optional[float]) -> str:
    """Bytes in binary units with three significant figures; ``"n/a"`` for None, NaN or infinity.

    Examples: ``512 -> "512 B"``, ``1536 -> "1.50 KiB"``, ``12.25 MiB -> "12.3 MiB"``, ``300 MiB -> "300 MiB"``,
    ``1.5 GiB -> "1.50 GiB"``.
    """
    if n is None or not math.isfinite(n):
        return "n/a"
    value = float(n)
    unit = 0
    while abs(value) >= 1024 and unit < len(_UNITS) - 1:
        value /= 1024
        unit += 1
    if unit == 0:
        return f"{_round_half_up(value, 0)} B"
    decimals = 0 if abs(value) >= 100 else 1 if abs(value) >= 10 else 2
    return f"{_round_half_up(value, decimals)} {_UNITS[unit]}"


_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3, "t": 1000**4, "tb": 1000**4,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
}


def parse_bytes(text: str) -> int:
    """``"16GiB"``, ``"512MB"``, ``"1.5g"`` or ``"1024"`` -> bytes (``k``/``KB`` are powers of 1000, ``KiB`` of 1024).

    Raises:
        ValueError: not a size.
    """
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if m is None or m.group(2).lower() not in _SIZE_UNITS:
        raise ValueError(f"not a byte size: {text!r} (examples: 16GiB, 512MiB, 8GB, 1024)")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])


DTYPE_NAMES: Dict[torch.dtype, str] = {
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.float32: "fp32",
    torch.float64: "fp64",
}
"""The short name of each floating dtype noflash computes in."""

_DTYPE_ALIASES: Dict[str, torch.dtype] = {
    **{name: dtype for dtype, name in DTYPE_NAMES.items()},
    "float16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32, "float": torch.float32,
    "float64": torch.float64, "double": torch.float64,
}


def parse_dtype(value: Union[str, torch.dtype], allowed: Optional[Iterable[torch.dtype]] = None) -> torch.dtype:
    """A dtype from ``"fp16"``, ``"bf16"``, ``"fp32"``, ``"fp64"``, torch's names (``"float16"``,
    ``"torch.bfloat16"``, ``"half"``) or a ``torch.dtype``.

    Args:
        value: the name or dtype.
        allowed: the dtypes the caller supports (default: all four above).

    Raises:
        ValueError: a name it does not know, or a dtype outside ``allowed``; never a silent substitute.
    """
    allowed = tuple(DTYPE_NAMES) if allowed is None else tuple(allowed)
    if isinstance(value, torch.dtype):
        dtype = value
    else:
        dtype = _DTYPE_ALIASES.get(str(value).strip().lower().replace("torch.", ""))
    if dtype is None or dtype not in allowed:
        names = ", ".join(DTYPE_NAMES.get(d, str(d)) for d in allowed)
        raise ValueError(f"unsupported dtype {value!r}; use one of {names}")
    return dtype


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float16 -> "fp16"`` (likewise bf16, fp32, fp64); other dtypes keep torch's name (``"float8_e4m3fn"``),
    which :func:`parse_dtype` then rejects."""
    return DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))
