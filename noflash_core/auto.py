"""Opt-in auto-patch: ``import noflash_core.auto``.

Importing this module (and only this one) enables the global SDPA patch where the default device lacks an efficient
SDPA backend, honouring ``NOFLASH_FORCE_PATCH``, ``NOFLASH_DISABLE`` and ``NOFLASH_THRESHOLD``, and logs one line
with the decision. ``DECISION`` holds it.
"""

from __future__ import annotations

from .auto_patch import AutoDecision, decide_and_apply

__all__ = ["DECISION"]

DECISION: AutoDecision = decide_and_apply()
