"""The planner's hook for tuning during a run (ComfyUI's first-run tuning).

While :func:`tuning_hook` is active (in this thread or task), a plan request whose signature has no tuning-cache
entry calls ``hook(problem, model_plan)``; the hook may measure candidates and return the plan to use (with
``source="tuned"``) or None to keep the model's plan. Nothing is active by default.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Callable, Iterator, Optional

__all__ = ["MissHook", "active_hook", "tuning_hook"]

MissHook = Callable[..., object]
"""``hook(problem: AttentionProblem, model_plan: Plan) -> Optional[Plan]``."""

_hook: contextvars.ContextVar[Optional[MissHook]] = contextvars.ContextVar("noflash_tuning_hook", default=None)


def active_hook() -> Optional[MissHook]:
    """The hook in force, or None."""
    return _hook.get()


@contextlib.contextmanager
def tuning_hook(hook: Optional[MissHook]) -> Iterator[None]:
    """Make ``hook`` the planner's cache-miss hook inside the block (None: no hook)."""
    token = _hook.set(hook)
    try:
        yield
    finally:
        _hook.reset(token)
