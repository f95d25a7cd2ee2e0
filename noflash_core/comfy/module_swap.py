"""A module-level attention function swapped for the length of one clone's call: reach for code that calls it by name.

Some ComfyUI models call the attention function through a name their Python module imported at load time
(``from comfy.ldm.modules.attention import optimized_attention``) without ``transformer_options``, so the
per-model override never sees the call (in ComfyUI 0.33: the MiniMax H3 and Mochi VAEs, SeedVR2's multi-head VAE
attention, the Stable Audio 3 VAE). Python looks such a name up in the module's globals at every call
(``LOAD_GLOBAL``), so it can be reached per clone when two things hold:

1. a per-clone object patch brackets exactly the clone's own call (the VAE's ``decode``/``encode``), and
2. for that call only, under a process-wide lock, the module's global is replaced and put back in ``finally``.

That is the scheme the CLIP Patcher already uses for instance ``forward`` s. The caveat is the same: a second thread
running the same module's code during the call would be routed too (ComfyUI executes prompts in one thread).

:func:`global_users` finds the modules to swap in from the model itself: the modules that define the classes of its
submodules and whose methods load the name as a global (read from the bytecode, so ``self.optimized_attention``
attribute reads do not count). Nothing here imports ComfyUI.
"""

from __future__ import annotations

import contextlib
import dis
import functools
import sys
import threading
import types
from typing import Callable, Iterator, List

import torch

__all__ = ["global_users", "swapped_globals"]

_LOCK = threading.RLock()


@functools.cache
def _loads_global(cls: type, name: str) -> bool:
    """Whether a method defined on ``cls`` (not inherited) loads ``name`` as a global."""
    for attr in vars(cls).values():
        code = getattr(attr, "__code__", None)
        if code is None or name not in code.co_names:
            continue
        if any(ins.opname == "LOAD_GLOBAL" and ins.argval == name for ins in dis.get_instructions(code)):
            return True
    return False


def global_users(root: torch.nn.Module, name: str) -> List[types.ModuleType]:
    """The Python modules whose classes, among ``root``'s submodules, call the global ``name`` (each once)."""
    found: List[types.ModuleType] = []
    for module in root.modules():
        for cls in type(module).__mro__:
            if cls is torch.nn.Module or cls is object:
                break
            mod = sys.modules.get(cls.__module__)
            if mod is None or mod in found or not callable(mod.__dict__.get(name)):
                continue
            if _loads_global(cls, name):
                found.append(mod)
    return found


@contextlib.contextmanager
def swapped_globals(modules: List[types.ModuleType], name: str,
                    wrap: Callable[[Callable], Callable]) -> Iterator[int]:
    """Within the block, each module's global ``name`` is ``wrap(original)``; every original is put back after,
    also when the block raises. Yields how many were swapped."""
    with _LOCK:
        saved = []
        try:
            for mod in modules:
                original = mod.__dict__.get(name)
                if callable(original):
                    saved.append((mod, original))
                    setattr(mod, name, wrap(original))
            yield len(saved)
        finally:
            for mod, original in reversed(saved):
                setattr(mod, name, original)
