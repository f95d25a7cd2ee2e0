"""Per-run telemetry for the ComfyUI nodes: tier mix, call count and peak memory of each sampling run.

A :class:`RunMonitor` receives every :class:`~noflash_core.telemetry.CallRecord` of one patched model. The
node glue calls :meth:`RunMonitor.start` when a sampling run begins (ModelPatcher ``ON_PRE_RUN``) and
:meth:`RunMonitor.finish` when it ends (``ON_CLEANUP``). The monitor publishes a JSON-ready status dict through a
``publish`` callable: throttled while the run goes, and once at its end. Finished runs go into a shared
:class:`RunHistory`, which the VRAM Probe node and the browser's bottom-panel tab read.

Every status says where it comes from, so the browser puts it only on the nodes that produced it, in the graph
that ran (:class:`StatusMonitor`): ``kind`` (``"attention"``; :mod:`.op_telemetry` adds ``"ffn"``, ``"clip"`` and
``"vae"``), ``node_ids`` (the NoFlash nodes whose patch produced the run), and ``prompt_id``, ``workflow_id`` and
``exec_node_id`` (the prompt, the id of the workflow it was queued from, and the node executing when the run
started), read from a ``context`` callable the ComfyUI glue passes in when the run starts.

Peak memory is ``max_memory_allocated`` on CUDA/ROCm/ZLUDA and XPU, reset at the start of each run
(:mod:`noflash_core.device_memory` reads it). MPS has no peak
counter, so the monitor samples ``current_allocated_memory`` at each call. On CPU there is no allocator counter:
the status says so (``peak_bytes`` None, ``peak_source`` "not tracked on CPU").

Nothing here imports ComfyUI.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Any, Callable, Deque, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from ..device_memory import read_peak, reset_peak
from ..telemetry import CallRecord

__all__ = [
    "RunHistory",
    "RunMonitor",
    "StatusMonitor",
    "read_origin",
    "default_history",
    "reset_peak_memory",
    "read_peak_memory",
    "STATUS_EVENT",
]

STATUS_EVENT = "noflash.status"
Publish = Callable[[Dict[str, Any]], None]
Context = Callable[[], Mapping[str, Optional[str]]]
"""Returns the run's origin: ``prompt_id``, ``workflow_id``, ``exec_node_id`` (missing keys: unknown)."""
ORIGIN_KEYS = ("prompt_id", "workflow_id", "exec_node_id")

logger = logging.getLogger(__name__)


def reset_peak_memory(device: torch.device) -> None:
    """Reset the device allocator's peak counter where the device has one (CUDA/ROCm/ZLUDA, XPU)."""
    reset_peak(device)


def read_peak_memory(device: torch.device) -> Tuple[Optional[int], str]:
    """``(bytes, source)`` for the device's memory peak since the last reset; bytes is None on CPU."""
    return read_peak(device)


class RunHistory:
    """The last finished runs of all patched models (newest last); thread-safe."""

    def __init__(self, maxlen: int = 20) -> None:
        self._runs: Deque[Dict[str, Any]] = collections.deque(maxlen=maxlen)
        self._lock = threading.Lock()
        self._counter = 0

    def next_run_id(self) -> int:
        """A process-wide increasing run number."""
        with self._lock:
            self._counter += 1
            return self._counter

    def add(self, status: Dict[str, Any]) -> None:
        """Store a finished run's status dict (replacing the entry of the same ``run_id``, if kept)."""
        with self._lock:
            run_id = status.get("run_id")
            for i, kept in enumerate(self._runs):
                if run_id and kept.get("run_id") == run_id:
                    del self._runs[i]
                    break
            self._runs.append(dict(status))

    def latest(self, kind: Optional[str] = "attention") -> Optional[Dict[str, Any]]:
        """The newest finished run of ``kind`` (None: of any kind), or None."""
        with self._lock:
            for run in reversed(self._runs):
                if kind is None or run.get("kind", "attention") == kind:
                    return dict(run)
            return None

    def runs(self) -> List[Dict[str, Any]]:
        """All kept runs, oldest first."""
        with self._lock:
            return [dict(r) for r in self._runs]

    @property
    def finished(self) -> int:
        """How many runs have been stored since start-up (including ones the deque dropped)."""
        with self._lock:
            return self._counter


_DEFAULT_HISTORY: Optional[RunHistory] = None
_DEFAULT_LOCK = threading.Lock()


def default_history() -> RunHistory:
    """The process-wide history shared by every node (created on first use)."""
    global _DEFAULT_HISTORY
    with _DEFAULT_LOCK:
        if _DEFAULT_HISTORY is None:
            _DEFAULT_HISTORY = RunHistory()
        return _DEFAULT_HISTORY


def read_origin(context: Optional[Context]) -> Dict[str, Optional[str]]:
    """The run's origin from ``context`` (all None without one, or when it fails: telemetry never raises)."""
    origin: Dict[str, Optional[str]] = dict.fromkeys(ORIGIN_KEYS)
    if context is None:
        return origin
    try:
        found = context() or {}
    except Exception as exc:  # noqa: BLE001 - telemetry must never break a run
        logger.debug("noflash: could not read the run's origin: %s", exc)
        return origin
    for key in ORIGIN_KEYS:
        value = found.get(key)
        origin[key] = None if value is None else str(value)
    return origin


class StatusMonitor:
    """One node's runs, published as JSON-ready status dicts: identity, run lifecycle, throttling, peak memory.

    Subclasses count what their runs do (:meth:`_reset_counters`, :meth:`_fields`) and set :attr:`kind`.

    Args:
        label: shown in the status (for example the model class).
        publish: receives status dicts (JSON-ready); None publishes nothing.
        node_id: the id of the node that made the patch (the browser puts that run's badge on it).
        history: where finished runs go; defaults to :func:`default_history`.
        min_interval_s: at most one publish per this many seconds while a run goes.
        clock: monotonic seconds (injectable for tests).
        node_ids: more producing nodes (a Tier Selector after the Attention Patcher); ``node_id`` comes first.
        context: called when a run starts; returns the run's ``prompt_id``, ``workflow_id`` and ``exec_node_id``.
    """

    kind = "attention"

    def __init__(
        self,
        label: str = "",
        publish: Optional[Publish] = None,
        node_id: Optional[str] = None,
        history: Optional[RunHistory] = None,
        min_interval_s: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
        *,
        node_ids: Sequence[Any] = (),
        context: Optional[Context] = None,
    ) -> None:
        ids = [node_id, *node_ids]
        self.node_ids: List[str] = list(dict.fromkeys(str(n) for n in ids if n is not None))
        self.node_id = self.node_ids[0] if self.node_ids else None
        self.label = label
        self.publish = publish
        self.history = default_history() if history is None else history
        self.min_interval_s = min_interval_s
        self.context = context
        self._clock = clock
        self._lock = threading.Lock()
        self._device: Optional[torch.device] = None
        self._running = False
        self._origin: Dict[str, Optional[str]] = dict.fromkeys(ORIGIN_KEYS)
        self.replaced_by: Optional[str] = None
        self._reset()

    def _reset(self) -> None:
        self.run_id = 0
        self._started = self._clock()
        self._last_publish = float("-inf")
        self._sampled_peak: Optional[int] = None
        self._reset_counters()

    def _reset_counters(self) -> None:
        """Zero the subclass's counters (called under no lock, before a run starts)."""

    def _fields(self) -> Dict[str, Any]:
        """The subclass's counters as status fields (called with the lock held)."""
        return {}

    def start(self, device: Optional[torch.device] = None, origin: Optional[Dict[str, Optional[str]]] = None) -> None:
        """Begin a run: zero the counters, read the run's origin, reset the device's peak counter."""
        origin = read_origin(self.context) if origin is None else origin
        with self._lock:
            self._reset()
            self._device = torch.device(device) if device is not None else None
            self._running = True
            self._origin = origin
            self.run_id = self.history.next_run_id()
        if self._device is not None:
            reset_peak_memory(self._device)
        self._emit(force=True)

    def _ensure_running(self, device: Any) -> None:
        """Start a run when a call arrives outside one; note the device."""
        if not self._running:
            self.start(torch.device(device))
        elif self._device is None:
            self._device = torch.device(device)

    def _sample_peak(self) -> None:
        """MPS has no peak counter: sample the allocation at each call."""
        if self._device is not None and self._device.type == "mps":
            peak, _ = read_peak_memory(self._device)
            self._sampled_peak = max(self._sampled_peak or 0, peak or 0)

    def set_replaced_by(self, name: Optional[str]) -> None:
        """Say which attention replaced noflash's override on the model being sampled (None: noflash's is active).

        Kept across :meth:`start`, which ComfyUI runs after the sampling wrapper that calls this; published in the
        status as ``"replaced_by"``.
        """
        with self._lock:
            self.replaced_by = name

    def finish(self) -> Optional[Dict[str, Any]]:
        """End the run: read the peak, store the run in the history, publish; returns the final status."""
        if not self._running:
            return None
        status = self.status(state="done")
        with self._lock:
            self._running = False
        self.history.add(status)
        if self.publish is not None:
            self.publish(status)
        return status

    def status(self, state: Optional[str] = None) -> Dict[str, Any]:
        """The current run as a JSON-ready dict (see the web extension for the consumer)."""
        peak, source = (None, "no run yet") if self._device is None else read_peak_memory(self._device)
        if self._sampled_peak is not None:
            peak = max(peak or 0, self._sampled_peak)
        with self._lock:
            status = {
                "run_id": self.run_id,
                "kind": self.kind,
                "label": self.label,
                "node_id": self.node_id,
                "node_ids": list(self.node_ids),
                **self._origin,
                "state": state or ("running" if self._running else "idle"),
                "device": str(self._device) if self._device is not None else "",
                "peak_bytes": peak,
                "peak_source": source,
                "replaced_by": self.replaced_by,
                "elapsed_s": round(self._clock() - self._started, 3),
                "time": time.time(),
            }
            status.update(self._fields())
            return status

    def _emit(self, force: bool) -> None:
        if self.publish is None:
            return
        now = self._clock()
        with self._lock:
            if not force and now - self._last_publish < self.min_interval_s:
                return
            self._last_publish = now
        self.publish(self.status())


class RunMonitor(StatusMonitor):
    """Aggregates one patched model's attention calls per sampling run (tier mix, calls, longest sequence, peak).

    Arguments as for :class:`StatusMonitor`. A call's plan source (``"model"`` or ``"tuned"``, when the record
    carries one as ``plan_source`` or ``source``) is kept per tier as the status's ``plan_source``.
    """

    def _reset_counters(self) -> None:
        self.calls = 0
        self.tiers: Dict[str, int] = {}
        self.plan_source: Dict[str, str] = {}
        self.last_tier: Optional[int] = None
        self.last_blocks: Tuple[int, int] = (0, 0)
        self.max_q_len = 0
        self.max_kv_len = 0

    def record(self, call: CallRecord) -> None:
        """Count one attention call (starts a run if none is going)."""
        self._ensure_running(call.device)
        with self._lock:
            self.calls += 1
            key = "comfy" if call.path == "comfy" else str(call.tier)
            self.tiers[key] = self.tiers.get(key, 0) + 1
            source = getattr(call, "plan_source", None) or getattr(call, "source", None)
            if source:
                self.plan_source[key] = str(source)
            if call.path == "noflash":
                self.last_tier = call.tier
                self.last_blocks = (call.block_m, call.block_n)
            self.max_q_len = max(self.max_q_len, call.q_len)
            self.max_kv_len = max(self.max_kv_len, call.kv_len)
        self._sample_peak()
        self._emit(force=False)

    def _fields(self) -> Dict[str, Any]:
        fields = {
            "calls": self.calls,
            "tiers": dict(self.tiers),
            "active_tier": self.last_tier,
            "block_m": self.last_blocks[0],
            "block_n": self.last_blocks[1],
            "max_q_len": self.max_q_len,
            "max_kv_len": self.max_kv_len,
        }
        if self.plan_source:
            fields["plan_source"] = dict(self.plan_source)
        return fields
