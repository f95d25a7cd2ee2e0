"""One switch for every cache the engine keeps: :func:`clear_caches`.

The dispatcher caches plans, ``problem.py`` the validation and layout of each call signature, ``budget.py`` the
free-memory readings; other modules (the tuning cache, ...) add theirs with :func:`register`. Clearing is what a
test, a benchmark or a long-lived process (a ComfyUI server after a driver or model change) does to plan afresh.
"""

from __future__ import annotations

import threading
from typing import Callable, List

__all__ = ["clear_caches", "register"]

_clearers: List[Callable[[], None]] = []
_lock = threading.Lock()


def register(clear: Callable[[], None]) -> Callable[[], None]:
    """Add ``clear`` (no arguments) to what :func:`clear_caches` calls; registering it twice adds it once.
    Returns ``clear``, so it also works as a decorator."""
    with _lock:
        if clear not in _clearers:
            _clearers.append(clear)
    return clear


def clear_caches() -> None:
    """Empty every registered cache: plans, validated layouts, free-memory readings and whatever else registered.
    The next call of each signature validates, reads free memory and plans again."""
    with _lock:
        clearers = list(_clearers)
    for clear in clearers:
        clear()
