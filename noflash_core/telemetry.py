"""Per-call records of what the attention did, for the ComfyUI nodes, the tests and anyone curious.

Every attention call that goes through noflash's dispatcher (the public SDPA, the global patch and the ComfyUI
override) is described by one :class:`CallRecord`. Listeners subscribe with :func:`subscribe`; emitting costs
nothing when nobody listens, and nothing is emitted while ``torch.compile`` traces. The ComfyUI override hands the
same record type to its per-model recorder.
"""

from __future__ import annotations

import logging
import math
import threading
from dataclasses import dataclass
from typing import Any, Callable, List, Tuple

__all__ = ["CallRecord", "emit", "has_listeners", "subscribe"]

_log = logging.getLogger(__name__)
_lock = threading.Lock()
_listeners: List[Callable[[CallRecord], None]] = []


@dataclass(frozen=True)
class CallRecord:
    """One attention call.

    Attributes:
        path: ``"noflash"`` when noflash planned the call (tier 0: its plan handed the call to torch's math SDPA),
            ``"torch"`` when the global patch passed it on to the original SDPA (key length below the threshold,
            nested tensors), ``"comfy"`` when the ComfyUI override sent it on to ComfyUI's own attention.
        tier: the tier that ran: 0 for torch's or ComfyUI's own attention, else 1, 2 or 3.
        block_m, block_n: the block sizes that ran (L and S for tier 0; 0 when unknown).
        batch, heads, q_len, kv_len, head_dim: the query ``(batch, heads, q_len, head_dim)`` (leading batch dims
            multiplied together) and the key length.
        dtype: the query dtype's torch name, e.g. ``"float16"``.
        device: the device, e.g. ``"cuda:0"``.
        reason: why the call took its path (the planner's reason, ``"below min_tokens"``, ...).
        plan_source: who chose the plan: ``"model"`` (the planner's cost model), ``"tuned"`` (a measurement in the
            tuning cache, see :mod:`noflash_core.tune`); empty for calls noflash did not plan.
    """

    path: str
    tier: int
    block_m: int
    block_n: int
    batch: int
    heads: int
    q_len: int
    kv_len: int
    head_dim: int
    dtype: str
    device: str
    reason: str = ""
    plan_source: str = ""

    @property
    def shape(self) -> Tuple[int, int, int, int]:
        """The query shape as ``(batch, heads, q_len, head_dim)``."""
        return self.batch, self.heads, self.q_len, self.head_dim

    @classmethod
    def of_call(cls, path: str, tier: int, blocks: Tuple[int, int], query: Any, key: Any, reason: str,
                plan_source: str = "") -> CallRecord:
        """The record of a call on ``query (*batch, Hq, L, E)`` and ``key (..., S, E)``; sizes are read from the
        shapes as passed (zeros for what a non-tensor lacks)."""
        q, k = _shape(query), _shape(key)
        return cls(
            path=path, tier=int(tier), block_m=int(blocks[0]), block_n=int(blocks[1]),
            batch=math.prod(q[:-3]) if q else 0, heads=(q[-3] if len(q) >= 3 else 1) if q else 0,
            q_len=q[-2] if len(q) >= 2 else 0, kv_len=k[-2] if len(k) >= 2 else 0, head_dim=q[-1] if q else 0,
            dtype=str(getattr(query, "dtype", "")).replace("torch.", ""), device=str(getattr(query, "device", "")),
            reason=reason, plan_source=plan_source,
        )

    @classmethod
    def of_plan(cls, path: str, plan: Any, query: Any, key: Any) -> CallRecord:
        """The record of a call that ran ``plan`` (a :class:`~noflash_core.planner.Plan`): its tier, blocks,
        reason and source."""
        return cls.of_call(path, plan.tier, (plan.block_m, plan.block_n), query, key, plan.reason,
                           getattr(plan, "source", ""))


def _shape(t: Any) -> Tuple[int, ...]:
    try:
        return tuple(int(d) for d in t.shape)
    except (AttributeError, RuntimeError, TypeError, ValueError):  # not a tensor, or a jagged nested tensor
        return ()


def subscribe(callback: Callable[[CallRecord], None]) -> Callable[[], None]:
    """Call ``callback(record)`` after every attention call; returns a function that unsubscribes it."""
    with _lock:
        _listeners.append(callback)

    def unsubscribe() -> None:
        with _lock:
            if callback in _listeners:
                _listeners.remove(callback)

    return unsubscribe


def has_listeners() -> bool:
    return bool(_listeners)


def emit(record: CallRecord) -> None:
    """Deliver ``record`` to every listener; a failing listener is logged, never raised into the model."""
    for callback in list(_listeners):
        try:
            callback(record)
        except Exception:  # noqa: BLE001 - telemetry must never break attention
            _log.exception("noflash telemetry listener %r failed", callback)
