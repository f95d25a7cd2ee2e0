"""Which tier ran: read from the telemetry listener, so that a test of ``tier="auto"`` can say what it tested.

:class:`TierLog` collects the telemetry records of the calls made inside a ``with`` block. :func:`run_sdpa` runs
one noflash call and returns its output with the tier that ran (0 = torch's own SDPA). :func:`budget_below_math`
gives the budget one byte under what the planner predicts for torch's math SDPA, so that ``"auto"`` must choose a
tiled tier (1, 2 or 3) for a problem that would otherwise take the fast path.
"""

from __future__ import annotations

import collections
from typing import Any, Dict, List, Optional, Tuple

import torch

import noflash_core
from noflash_core import telemetry

__all__ = ["AUTO_TIERS", "TierLog", "budget_below_math", "run_sdpa"]

AUTO_TIERS: collections.Counter = collections.Counter()
"""Tiers that ran in the ``"auto"`` columns of this session (printed at the end of the run by ``conftest.py``)."""


class TierLog:
    """Context manager: ``records`` are the telemetry records of the calls made inside it."""

    def __init__(self) -> None:
        self.records: List[Any] = []

    def __enter__(self) -> TierLog:
        self._unsubscribe = telemetry.subscribe(self.records.append)
        return self

    def __exit__(self, *exc) -> None:
        self._unsubscribe()

    @property
    def tiers(self) -> List[int]:
        """The tier of each call, in order."""
        return [r.tier for r in self.records]

    def by_tier(self) -> Dict[int, int]:
        """Number of calls per tier (0 = torch's own SDPA)."""
        return dict(collections.Counter(self.tiers))

    def only_tier(self) -> int:
        """The one tier every call ran; fails when there was no call or the calls ran different tiers."""
        tiers = set(self.tiers)
        assert len(tiers) == 1, f"expected calls of one tier, telemetry saw {self.tiers}"
        return tiers.pop()


def run_sdpa(*args, **kwargs) -> Tuple[torch.Tensor, int]:
    """``noflash_core.scaled_dot_product_attention(*args, **kwargs)`` and the tier that ran."""
    with TierLog() as log:
        out = noflash_core.scaled_dot_product_attention(*args, **kwargs)
    return out, log.only_tier()


def budget_below_math(q, k, v, attn_mask=None, is_causal: bool = False, enable_gqa: bool = False,
                      requires_grad: Optional[bool] = None) -> Optional[int]:
    """One byte less than the fast path's predicted peak (math SDPA), or None when the planner would tile anyway.

    Under this budget ``"auto"`` cannot take the fast path: it runs the fastest tiled plan that fits, or, when none
    fits, the smallest. Either way the output comes from our tiles, never from math SDPA.
    """
    fast = noflash_core.plan(q, k, v, attn_mask, is_causal, enable_gqa=enable_gqa, requires_grad=requires_grad)
    return max(1, fast.peak_bytes - 1) if fast.tier == 0 else None
