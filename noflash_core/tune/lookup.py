"""The planner's view of the tuning cache: an in-memory copy, cheap to ask.

The file is read once per process and again only when its modification time or size changed, which is checked at
most every :data:`RELOAD_INTERVAL_S` seconds (and at once when ``NOFLASH_TUNE_CACHE`` points elsewhere). A lookup
costs a dict access after the signature is formed from the problem's shapes, dtype and flags: no tensor value is
read, so it never synchronises a device.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

from ..device import device_profile
from ..problem import AttentionProblem
from .signature import profile_key, signature_of
from .store import cache_path, read_document

__all__ = ["RELOAD_INTERVAL_S", "TunedPlan", "clear_memory_cache", "entry_plans", "remember", "tuned_entry"]

RELOAD_INTERVAL_S = 2.0
"""At most this often the cache file's modification time is checked."""

TunedPlan = Tuple[int, int, int, int]
"""``(tier, block_m, block_n, block_h)`` of a measured plan."""

_lock = threading.Lock()
_clock = time.monotonic


class _Memory:
    def __init__(self) -> None:
        self.path: Optional[str] = None
        self.stamp: Optional[Tuple[int, int]] = None
        self.checked_at = float("-inf")
        self.devices: Dict[str, Dict[str, Dict[str, Any]]] = {}


_memory = _Memory()


def clear_memory_cache() -> None:
    """Forget the in-memory copy; the next lookup reads the file again."""
    global _memory
    with _lock:
        _memory = _Memory()


def _stamp(path: str) -> Optional[Tuple[int, int]]:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size


def _valid_plan(p: Any) -> bool:
    try:
        return (p["tier"] in (1, 2, 3) and all(isinstance(p[k], int) and p[k] > 0 for k in ("block_m", "block_n"))
                and isinstance(p["block_h"], int) and p["block_h"] >= 0)
    except (KeyError, TypeError):
        return False


def entry_plans(entry: Dict[str, Any]) -> List[TunedPlan]:
    """The measured plans of a cache entry, fastest first (malformed ones left out)."""
    plans = entry.get("plans") if isinstance(entry, dict) else None
    if not isinstance(plans, list):
        return []
    return [(p["tier"], p["block_m"], p["block_n"], p["block_h"]) for p in plans if _valid_plan(p)]


def _refresh(memory: _Memory) -> _Memory:
    path = cache_path()
    now = _clock()
    if path == memory.path and now - memory.checked_at < RELOAD_INTERVAL_S:
        return memory
    stamp = _stamp(path)
    if path != memory.path or stamp != memory.stamp:
        doc = read_document(path) if stamp is not None else {"devices": {}}
        fresh = _Memory()
        fresh.path, fresh.stamp = path, stamp
        fresh.devices = {k: dict(d.get("entries", {})) for k, d in doc["devices"].items()}
        memory = fresh
    memory.checked_at = now
    return memory


def tuned_entry(problem: AttentionProblem, requires_grad: bool) -> Optional[Dict[str, Any]]:
    """The cache entry for ``problem`` on its device, or None (no entry, or a meta/simulated device)."""
    key = profile_key(device_profile(problem.query.device))
    if key is None:
        return None
    global _memory
    with _lock:
        _memory = _refresh(_memory)
        entries = _memory.devices.get(key)
    if not entries:
        return None
    return entries.get(signature_of(problem, requires_grad).key())


def remember(device_key: str, signature_key: str, entry: Dict[str, Any]) -> None:
    """Put a fresh entry into the in-memory copy (the tuner calls this after writing the file)."""
    with _lock:
        _memory.devices.setdefault(device_key, {})[signature_key] = entry
