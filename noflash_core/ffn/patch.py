"""Chunk every feed-forward of a PyTorch model in place, reversibly.

:func:`patch_ffn` finds the modules :func:`~noflash_core.ffn.detect.find_ffn_modules` accepts and sets each
one's instance ``forward`` to a :class:`~noflash_core.ffn.chunk.ChunkedForward`. Nothing else changes:
submodules, parameters and state-dict keys stay as they are. :meth:`FFNPatchHandle.remove` puts back exactly
what was there (the previous instance ``forward`` object, or no instance attribute at all).

In ComfyUI, patch a ModelPatcher clone with ``add_object_patch`` and
:func:`~noflash_core.ffn.chunk.chunked_forward` instead, so the patch follows the clone's load/unload.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, List, Optional, Tuple

from torch import nn

from .chunk import ChunkedForward, resolve_num_chunks
from .detect import scan_ffn_modules

__all__ = ["FFNPatchHandle", "patch_ffn"]

logger = logging.getLogger(__name__)

_MISSING = object()


@dataclass
class _Patched:
    name: str
    module: nn.Module
    previous: Any  # the instance ``forward`` before patching, or _MISSING
    wrapper: ChunkedForward


class FFNPatchHandle:
    """The modules :func:`patch_ffn` wrapped; :meth:`remove` undoes it (also on leaving a ``with`` block).

    Attributes:
        names: dotted paths of the wrapped modules, in model order.
        num_wrapped: ``len(names)``.
        active: False after :meth:`remove`.
    """

    def __init__(self, patched: List[_Patched], num_chunks: int) -> None:
        self._patched = patched
        self.names: Tuple[str, ...] = tuple(p.name for p in patched)
        self.num_chunks = num_chunks
        self.active = True

    @property
    def num_wrapped(self) -> int:
        return len(self.names)

    def wrappers(self) -> List[ChunkedForward]:
        """The installed :class:`~noflash_core.ffn.chunk.ChunkedForward` objects, in ``names`` order."""
        return [p.wrapper for p in self._patched]

    def remove(self) -> None:
        """Restore every wrapped module's ``forward`` as it was; a second call does nothing."""
        if not self.active:
            return
        for p in reversed(self._patched):
            if p.module.__dict__.get("forward") is not p.wrapper:
                logger.warning("noflash FFN: %s.forward was replaced after patching; leaving it", p.name or "model")
                continue
            if p.previous is _MISSING:
                delattr(p.module, "forward")
            else:
                p.module.forward = p.previous
        self.active = False

    def __enter__(self) -> FFNPatchHandle:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "active" if self.active else "removed"
        return f"FFNPatchHandle({self.num_wrapped} modules, {state})"


def patch_ffn(model: nn.Module, num_chunks: int = 0, verbose: bool = False) -> FFNPatchHandle:
    """Run every token-local feed-forward of ``model`` in token chunks.

    Each wrapped module proves on its first call per input signature that chunking leaves its result
    unchanged, or runs unchunked from then on (see :mod:`noflash_core.ffn.chunk`). Modules already wrapped
    by an earlier ``patch_ffn`` are left alone; a module that already has an instance ``forward`` (another
    patch) gets chunks of that one.

    Args:
        model: any ``nn.Module``; the model itself may be the feed-forward.
        num_chunks: chunks per call; 0 = ``NOFLASH_FFN_CHUNKS`` or, when that is unset, adaptive from the
            memory budget.
        verbose: log (INFO) why each candidate module was accepted or rejected; otherwise at DEBUG.

    Returns:
        An :class:`FFNPatchHandle`; call ``.remove()`` to undo.
    """
    resolved = resolve_num_chunks(num_chunks)
    level = logging.INFO if verbose else logging.DEBUG
    patched: List[_Patched] = []
    for verdict in scan_ffn_modules(model):
        label = verdict.name or "<model>"
        if not verdict.accepted:
            logger.log(level, "noflash FFN: reject %s (%s): %s", label, verdict.class_name, verdict.reason)
            continue
        module = model.get_submodule(verdict.name) if verdict.name else model
        if isinstance(module.__dict__.get("forward"), ChunkedForward):
            logger.log(level, "noflash FFN: skip %s (%s): already chunked", label, verdict.class_name)
            continue
        logger.log(level, "noflash FFN: accept %s (%s): %s", label, verdict.class_name, verdict.reason)
        previous: Optional[Any] = module.__dict__.get("forward", _MISSING)
        chained = None if previous is _MISSING else previous  # keep an existing instance patch working
        wrapper = ChunkedForward(module, resolved, name=label, original=chained)
        module.forward = wrapper
        patched.append(_Patched(verdict.name, module, previous, wrapper))
    logger.log(level, "noflash FFN: chunking %d feed-forward module(s)", len(patched))
    return FFNPatchHandle(patched, resolved)
