"""Measured plans: noflash times the exact candidate plans on the user's own device and remembers the fastest.

For one call signature (device, dtype, batch·heads, L, S, E, Ev, mask kind, causal, GQA, grad) the tuner times
the candidate plans that fit the budget (the tiers and their block shapes) on real tensors, in interleaved rounds
after a warm-up, and records the winner with its time and the runners-up in a persistent cache. The planner looks
every auto plan up there (:func:`noflash_core.planner.plan_problem`): a hit whose plan still fits the budget is
used with ``Plan.source == "tuned"``.

Ways to tune: ``python -m noflash_core.tune`` (shapes or a whole video workflow; ``--help``), :func:`tune_signature`
and :func:`save_results` from Python, and ComfyUI's Attention Patcher option ``tune = "first run"``
(:class:`FirstRunTuner`). See ``docs/tuning.md``.

Modules: ``signature`` (what a result is filed under), ``store`` (the file), ``lookup`` (the planner's in-memory
copy), ``session`` (the planner's hook for tuning during a run), ``candidates``, ``measure``, ``tuner``,
``firstrun``, ``workflow`` (the calls of a video run), ``cli``.

The tuner's names are imported on first use: the planner imports ``lookup`` and ``session`` from this package,
and the tuner imports the planner.
"""

from __future__ import annotations

import importlib
from typing import Any

from .lookup import clear_memory_cache
from .session import tuning_hook
from .signature import Signature, bucket_length, device_identity, signature_of
from .store import cache_path

__all__ = [
    "FirstRunPolicy",
    "FirstRunTuner",
    "Signature",
    "TuneResult",
    "bucket_length",
    "cache_path",
    "clear_memory_cache",
    "device_identity",
    "save_results",
    "signature_of",
    "tune_problem",
    "tune_signature",
    "tuning_hook",
    "workflow_signatures",
]

_LAZY = {
    "TuneResult": "tuner",
    "save_results": "tuner",
    "tune_problem": "tuner",
    "tune_signature": "tuner",
    "FirstRunPolicy": "firstrun",
    "FirstRunTuner": "firstrun",
    "workflow_signatures": "workflow",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)
