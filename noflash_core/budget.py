"""How many bytes one attention call may use for its working memory.

Order of precedence: an explicit ``budget_bytes``; the ``NOFLASH_BUDGET_MB`` environment variable; a fraction of
the device's free memory (read by :mod:`noflash_core.device_memory`: ``mem_get_info`` on CUDA, ZLUDA and XPU,
ROCm sysfs on Linux when present, MPS ``recommended_max_memory`` minus what is allocated); on CPU the constant
:data:`CPU_DEFAULT_BUDGET_BYTES` (256 MiB), chosen so that the default plan stays cache-friendly and small next to
the model.
"""

from __future__ import annotations

import logging
import os
from typing import Optional

import torch

from .device import device_profile

__all__ = ["CPU_DEFAULT_BUDGET_BYTES", "FREE_MEMORY_FRACTION", "default_budget_bytes", "resolve_budget"]

_log = logging.getLogger(__name__)

CPU_DEFAULT_BUDGET_BYTES = 256 * 1024 * 1024
"""The default working-memory budget for CPU tensors."""

FREE_MEMORY_FRACTION = 0.5
"""The share of the device's free memory one attention call may take by default."""

_MIN_BUDGET_BYTES = 1024 * 1024


def _env_budget() -> Optional[int]:
    raw = os.environ.get("NOFLASH_BUDGET_MB", "").strip()
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        _log.warning("NOFLASH_BUDGET_MB=%r is not a number; ignoring it.", raw)
        return None
    if value <= 0:
        _log.warning("NOFLASH_BUDGET_MB=%r must be positive; ignoring it.", raw)
        return None
    return int(value * 1024 * 1024)


def default_budget_bytes(device: torch.device) -> int:
    """The budget for ``device`` when the caller gives none (environment, free memory, or the CPU constant)."""
    env = _env_budget()
    if env is not None:
        return env
    profile = device_profile(device)
    if profile.device_class == "cpu":
        return CPU_DEFAULT_BUDGET_BYTES
    free = profile.free_memory()
    if free is None:
        return CPU_DEFAULT_BUDGET_BYTES
    return max(_MIN_BUDGET_BYTES, int(free * FREE_MEMORY_FRACTION))


def resolve_budget(device: torch.device, budget_bytes: Optional[int] = None) -> int:
    """``budget_bytes`` when given (must be positive), else :func:`default_budget_bytes`."""
    if budget_bytes is not None:
        if budget_bytes <= 0:
            raise ValueError(f"budget_bytes must be positive, got {budget_bytes}.")
        return int(budget_bytes)
    return default_budget_bytes(device)
