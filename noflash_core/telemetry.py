"""Per-call records of what the attention did, for the ComfyUI nodes, the tests and anyone curious.

Listeners subscribe with :func:`subscribe`; emitting costs nothing when nobody listens.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Callable, List, Tuple

__all__ = ["CallRecord", "emit", "has_listeners", "subscribe"]

_log = logging.getLogger(__name__)
_lock = threading.Lock()
_listeners: List[Callable[[CallRecord], None]] = []


@dataclass(frozen=True)
class CallRecord:
    """One attention call.

    Attributes:
        tier: 0 when torch's own SDPA ran (fast path or below the threshold), else 1, 2 or 3.
        block_m, block_n: block sizes (L and S for tier 0).
        shape: query shape as passed.
        dtype: query dtype name, e.g. ``"float16"``.
        device: device string.
        reason: why the plan was chosen.
    """

    tier: int
    block_m: int
    block_n: int
    shape: Tuple[int, ...]
    dtype: str
    device: str
    reason: str = ""


def subscribe(callback: Callable[[CallRecord], None]) -> Callable[[], None]:
    """Call ``callback(record)`` after every attention call; returns a function that unsubscribes it."""
    with _lock:
        _listeners.append(callback)

    def unsubscribe() -> None:
        with _lock:
            if callback in _listeners:
                _listeners.remove(callback)

    return unsubscribe


def has_listeners() -> bool:
    return bool(_listeners)


def emit(record: CallRecord) -> None:
    """Deliver ``record`` to every listener; a failing listener is logged, never raised into the model."""
    for callback in list(_listeners):
        try:
            callback(record)
        except Exception:  # noqa: BLE001 - telemetry must never break attention
            _log.exception("noflash telemetry listener %r failed", callback)
