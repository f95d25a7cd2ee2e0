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
submodules and whose functions or methods load the name as a global (read from the bytecode, so
``self.optimized_attention`` attribute reads do not count; GPT-OSS calls it from a module-level helper). Nothing
here imports ComfyUI.
"""

from __future__ import annotations

import contextlib
import dis
import functools
import sys
import threading
import types
import weakref
from typing import Callable, Iterator, List

import torch

__all__ = ["GLOBAL_ATTENTION", "ModuleAttentionRouter", "global_users", "swapped_globals"]

_LOCK = threading.RLock()

GLOBAL_ATTENTION = "optimized_attention"
"""The module-level name diffusion models call ComfyUI's attention through."""


def _code_loads(code: types.CodeType, name: str) -> bool:
    return name in code.co_names and any(
        ins.opname == "LOAD_GLOBAL" and ins.argval == name for ins in dis.get_instructions(code))


def _functions(mod: types.ModuleType) -> Iterator[types.FunctionType]:
    """The functions defined in ``mod``: module-level ones and the methods of its classes."""
    for obj in list(vars(mod).values()):
        if getattr(obj, "__module__", None) != mod.__name__:
            continue
        if isinstance(obj, types.FunctionType):
            yield obj
        elif isinstance(obj, type):
            yield from (f for f in vars(obj).values() if isinstance(f, types.FunctionType))


@functools.cache
def _module_loads(mod: types.ModuleType, name: str) -> bool:
    """Whether code defined in ``mod`` (a function or a method) loads ``name`` as a global."""
    return any(_code_loads(f.__code__, name) for f in _functions(mod))


def global_users(root: torch.nn.Module, name: str) -> List[types.ModuleType]:
    """The Python modules that define classes of ``root``'s submodules and whose code calls the global ``name``
    (each module once, in the order found)."""
    found: List[types.ModuleType] = []
    for module in root.modules():
        for cls in type(module).__mro__:
            if cls is torch.nn.Module or cls is object:
                break
            mod = sys.modules.get(cls.__module__)
            if mod is None or mod in found or not callable(mod.__dict__.get(name)):
                continue
            if _module_loads(mod, name):
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


class ModuleAttentionRouter:
    """The diffusion-model side of the scheme: for one clone's forward, the modules of its model that call the
    global ``optimized_attention`` get a version that hands calls made *without* ``transformer_options`` (which the
    per-model override never sees: ERNIE-Image, ACE-Step 1.5, HunyuanDiT, PixArt, the Wan audio adapters, ...) to
    that clone's override; calls that pass ``transformer_options`` run unchanged (the override reaches them
    already). ``users`` of each model are found once and kept per model (weakly)."""

    def __init__(self) -> None:
        self._users: weakref.WeakKeyDictionary[torch.nn.Module, List[types.ModuleType]] = weakref.WeakKeyDictionary()

    def users(self, model: torch.nn.Module) -> List[types.ModuleType]:
        found = self._users.get(model)
        if found is None:
            found = self._users[model] = global_users(model, GLOBAL_ATTENTION)
        return found

    @staticmethod
    def route(override: Callable) -> Callable[[Callable], Callable]:
        """``wrap(original)`` for :func:`swapped_globals`: ``override(original, *args, **kwargs)`` for calls without
        ``transformer_options``, the original for the others."""

        def wrap(original: Callable) -> Callable:
            @functools.wraps(original)
            def routed(*args, **kwargs):
                if kwargs.get("transformer_options") is not None:
                    return original(*args, **kwargs)
                return override(original, *args, **kwargs)

            return routed

        return wrap

    @contextlib.contextmanager
    def routing(self, model: torch.nn.Module, override: Callable) -> Iterator[int]:
        """Within the block, ``model``'s module-level attention calls go to ``override``; yields how many modules."""
        with swapped_globals(self.users(model), GLOBAL_ATTENTION, self.route(override)) as swapped:
            yield swapped
