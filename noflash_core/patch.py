"""The global patch: replace ``torch.nn.functional.scaled_dot_product_attention`` with the tiled version.

Code that looks SDPA up at call time (Hugging Face transformers and diffusers, ``comfy.ops``, most PyTorch models)
then gets tiled attention with no change. The replacement is ``functools.wraps``-ed (``__doc__``, ``__name__``
survive), :func:`enable` twice is a no-op and :func:`disable` puts back the exact original object. Calls whose key
length is below the threshold, and nested tensors, go to the original.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
from typing import Callable, Iterator, Optional

import torch.nn.functional as F

from .dispatch import attention

__all__ = ["disable", "enable", "is_enabled", "patched", "threshold_from_env"]

_log = logging.getLogger(__name__)
_lock = threading.RLock()
_original: Optional[Callable] = None
_wrapper: Optional[Callable] = None


def threshold_from_env() -> int:
    """``NOFLASH_THRESHOLD`` as an int (minimum key length for the tiled path), 0 when unset or invalid."""
    raw = os.environ.get("NOFLASH_THRESHOLD", "").strip()
    if not raw:
        return 0
    try:
        return max(0, int(raw))
    except ValueError:
        _log.warning("NOFLASH_THRESHOLD=%r is not an integer; using 0.", raw)
        return 0


def _make_wrapper(original: Callable, threshold: int) -> Callable:
    @functools.wraps(original)
    def noflash_sdpa(
        query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, *, scale=None, enable_gqa=False
    ):
        return attention(
            query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, threshold=threshold,
            passthrough=original,
        ).out

    noflash_sdpa.__noflash__ = True
    noflash_sdpa.__noflash_threshold__ = threshold
    return noflash_sdpa


def is_enabled() -> bool:
    """Whether torch's SDPA is currently our wrapper."""
    return _wrapper is not None and F.scaled_dot_product_attention is _wrapper


def enable(threshold: Optional[int] = None) -> None:
    """Patch ``torch.nn.functional.scaled_dot_product_attention`` globally.

    Args:
        threshold: minimum key length S that takes the tiled path; shorter calls go to the original. Default:
            ``NOFLASH_THRESHOLD`` or 0.
    """
    global _original, _wrapper
    with _lock:
        if is_enabled():
            return
        thr = threshold_from_env() if threshold is None else int(threshold)
        original = F.scaled_dot_product_attention
        wrapper = _make_wrapper(original, thr)
        F.scaled_dot_product_attention = wrapper
        _original, _wrapper = original, wrapper
        _log.debug("noflash: global SDPA patch enabled (threshold %d)", thr)


def disable() -> None:
    """Restore the exact SDPA object that :func:`enable` replaced. A no-op when not enabled."""
    global _original, _wrapper
    with _lock:
        if _wrapper is None:
            return
        if F.scaled_dot_product_attention is _wrapper:
            F.scaled_dot_product_attention = _original
        else:
            _log.warning(
                "noflash: torch.nn.functional.scaled_dot_product_attention was replaced by someone else after "
                "noflash patched it; leaving their function in place."
            )
        _original, _wrapper = None, None


@contextlib.contextmanager
def patched(threshold: Optional[int] = None) -> Iterator[None]:
    """Enable the global patch inside a ``with`` block; the previous state comes back on exit, even on error."""
    was_enabled = is_enabled()
    enable(threshold)
    try:
        yield
    finally:
        if not was_enabled:
            disable()
