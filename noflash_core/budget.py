"""How many bytes one attention call may use for its working memory.

Order of precedence: an explicit ``budget_bytes``; the ``NOFLASH_BUDGET_MB`` environment variable; a fraction of
the device's free memory (read by :mod:`noflash_core.device_memory`: ``mem_get_info`` on CUDA, ZLUDA and XPU,
ROCm sysfs on Linux when present, MPS ``recommended_max_memory`` minus what is allocated); on CPU the constant
:data:`CPU_DEFAULT_BUDGET_BYTES` (256 MiB), chosen so that the default plan stays cache-friendly and small next to
the model.

The budget taken from free memory is the hot path's only live reading, so it is made cheap and steady:

* free memory is read at most once per :data:`FREE_MEMORY_MAX_AGE_S` per device (:class:`FreeMemoryReader`; on
  ROCm a reading opens several sysfs files);
* the budget is rounded down to a step of an eighth of an octave (:func:`bucket_bytes`, at most 8.3% less), so a
  free-memory figure that moves a little between calls gives the same budget, the same plan-cache entry and the
  same plan, and the plan, made for the rounded budget, still fits the real one.

Explicit and environment budgets are used as given.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from typing import Callable, Dict, Optional, Tuple

import torch

from .caches import register
from .device import DeviceProfile, device_profile

__all__ = [
    "CPU_DEFAULT_BUDGET_BYTES",
    "FREE_MEMORY_FRACTION",
    "FREE_MEMORY_MAX_AGE_S",
    "FreeMemoryReader",
    "bucket_bytes",
    "default_budget_bytes",
    "free_memory",
    "resolve_budget",
]

_log = logging.getLogger(__name__)

CPU_DEFAULT_BUDGET_BYTES = 256 * 1024 * 1024
"""The default working-memory budget for CPU tensors."""

FREE_MEMORY_FRACTION = 0.5
"""The share of the device's free memory one attention call may take by default."""

FREE_MEMORY_MAX_AGE_S = 0.25
"""How long a free-memory reading is reused (at most four readings a second per device)."""

_MIN_BUDGET_BYTES = 1024 * 1024
_STEPS_PER_OCTAVE = 8


def bucket_bytes(n: int) -> int:
    """``n`` rounded down to the grid ``ceil(2 ** (k / 8))`` (eight steps per doubling, at most 8.3% down); never
    more than ``n``, and ``bucket_bytes(bucket_bytes(n)) == bucket_bytes(n)``."""
    n = int(n)
    if n <= 1:
        return max(n, 0)
    k = math.floor(math.log2(n) * _STEPS_PER_OCTAVE)
    edge = math.ceil(2.0 ** (k / _STEPS_PER_OCTAVE))  # rounded up, so that a bucket's edge is its own bucket
    if edge > n:  # log2 rounded across a grid point
        edge = math.ceil(2.0 ** ((k - 1) / _STEPS_PER_OCTAVE))
    return min(n, edge)


class FreeMemoryReader:
    """Free device memory, read at most once per ``max_age_s`` per device.

    Args:
        read: reads one profile's free bytes now (default ``profile.free_memory()``).
        clock: monotonic seconds (injectable for tests).
        max_age_s: how long a reading is reused.

    Fixed figures (CPU, meta, simulated presets) are never cached: they cost nothing and a test may change them.
    """

    def __init__(self, read: Optional[Callable[[DeviceProfile], Optional[int]]] = None,
                 clock: Callable[[], float] = time.monotonic, max_age_s: float = FREE_MEMORY_MAX_AGE_S) -> None:
        self._read = read or DeviceProfile.free_memory
        self._clock = clock
        self.max_age_s = max_age_s
        self._seen: Dict[str, Tuple[float, Optional[int]]] = {}
        self._lock = threading.Lock()

    def __call__(self, profile: DeviceProfile) -> Optional[int]:
        if profile.simulated or profile.kind in ("cpu", "meta"):
            return profile.free_memory()
        now = self._clock()
        seen = self._seen.get(profile.name)
        if seen is not None and now - seen[0] < self.max_age_s:
            return seen[1]
        value = self._read(profile)
        with self._lock:
            self._seen[profile.name] = (now, value)
        return value

    def clear(self) -> None:
        """Forget every reading (the next call reads again)."""
        with self._lock:
            self._seen.clear()


free_memory = FreeMemoryReader()
"""The process-wide reader the default budget uses (cleared by :func:`noflash_core.clear_caches`)."""


@register
def _forget_free_memory() -> None:
    free_memory.clear()


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
    free = free_memory(profile)
    if free is None:
        return CPU_DEFAULT_BUDGET_BYTES
    return max(_MIN_BUDGET_BYTES, bucket_bytes(int(free * FREE_MEMORY_FRACTION)))


def resolve_budget(device: torch.device, budget_bytes: Optional[int] = None) -> int:
    """``budget_bytes`` when given (must be positive), else :func:`default_budget_bytes`."""
    if budget_bytes is not None:
        if budget_bytes <= 0:
            raise ValueError(f"budget_bytes must be positive, got {budget_bytes}.")
        return int(budget_bytes)
    return default_budget_bytes(device)
