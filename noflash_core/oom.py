"""The out-of-memory retry policy shared by the forward pass (``sdpa.py``) and the backward pass (``attention_op.py``).

On ``torch.OutOfMemoryError`` the run is retried with the next smaller setting, after giving cached blocks back to
the device allocator; when none is left the error goes to the caller. Pinned settings (a fixed plan, as CUDA graphs
need) get no fallbacks, so they are never changed behind the caller.
"""

from __future__ import annotations

import gc
import logging
from typing import Callable, Iterable, List, Optional, Tuple, TypeVar

import torch

from .device_memory import empty_cache

__all__ = ["free_cached_memory", "retry_out_of_memory"]

_log = logging.getLogger(__name__)

S = TypeVar("S")
T = TypeVar("T")


def free_cached_memory(device: torch.device) -> None:
    """Collect garbage and empty the caching allocator of ``device`` (a no-op on CPU)."""
    gc.collect()
    empty_cache(torch.device(device))


def retry_out_of_memory(
    run: Callable[[S], T],
    first: S,
    fallbacks: Callable[[], Iterable[S]],
    device: torch.device,
    *,
    what: str,
    exhausted: Optional[Callable[[List[S], torch.OutOfMemoryError], BaseException]] = None,
) -> Tuple[T, S]:
    """``(run(setting), setting)`` for the first setting that does not run out of memory.

    Args:
        run: runs one setting (a plan, a pair of block sizes).
        first: the setting to try first.
        fallbacks: the smaller settings, in order; called only after the first out-of-memory error.
        device: whose cached memory is freed before each retry.
        what: names the run in the log line, e.g. ``"noflash backward"``.
        exhausted: builds the error raised when every setting failed, from the settings tried and the last
            error; None raises the last error itself.
    """
    tried = [first]
    current = first
    rest = None
    while True:
        try:
            return run(current), current
        except torch.OutOfMemoryError as exc:
            if rest is None:
                rest = iter(fallbacks())
            following = next(rest, None)
            if following is None:
                if exhausted is None:
                    raise
                raise exhausted(tried, exc) from None
            free_cached_memory(device)
            current = following
            tried.append(current)
            _log.info("%s ran out of memory; retrying with %s", what, current)
