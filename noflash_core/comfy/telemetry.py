"""Per-run telemetry for the ComfyUI nodes: tier mix, call count and peak memory of each sampling run.

A :class:`RunMonitor` receives every :class:`~noflash_core.telemetry.CallRecord` of one patched model. The
node glue calls :meth:`RunMonitor.start` when a sampling run begins (ModelPatcher ``ON_PRE_RUN``) and
:meth:`RunMonitor.finish` when it ends (``ON_CLEANUP``). The monitor publishes a JSON-ready status dict through a
``publish`` callable: throttled while the run goes, and once at its end. Finished runs go into a shared
:class:`RunHistory`, which the VRAM Probe node and the browser's bottom-panel tab read.

Peak memory is ``max_memory_allocated`` on CUDA/ROCm and XPU, reset at the start of each run. MPS has no peak
counter, so the monitor samples ``current_allocated_memory`` at each call. On CPU there is no allocator counter:
the status says so (``peak_bytes`` None, ``peak_source`` "not tracked on CPU").

Nothing here imports ComfyUI.
"""

from __future__ import annotations

import collections
import threading
import time
from typing import Any, Callable, Deque, Dict, List, Optional, Tuple

import torch

from ..telemetry import CallRecord

__all__ = [
    "RunHistory",
    "RunMonitor",
    "default_history",
    "reset_peak_memory",
    "read_peak_memory",
    "STATUS_EVENT",
]

STATUS_EVENT = "noflash.status"
Publish = Callable[[Dict[str, Any]], None]


def reset_peak_memory(device: torch.device) -> None:
    """Reset the device allocator's peak counter where the device has one (CUDA/ROCm, XPU)."""
    if device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats(device)
    elif device.type == "xpu" and hasattr(torch, "xpu") and torch.xpu.is_available():
        torch.xpu.reset_peak_memory_stats(device)


def read_peak_memory(device: torch.device) -> Tuple[Optional[int], str]:
    """``(bytes, source)`` for the device's memory peak since the last reset; bytes is None on CPU."""
    if device.type == "cuda" and torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated(device)), "torch.cuda.max_memory_allocated"
    if device.type == "xpu" and hasattr(torch, "xpu") and torch.xpu.is_available():
        return int(torch.xpu.max_memory_allocated(device)), "torch.xpu.max_memory_allocated"
    if device.type == "mps" and torch.backends.mps.is_available():
        return int(torch.mps.current_allocated_memory()), "torch.mps.current_allocated_memory (sampled)"
    return None, f"not tracked on {device.type.upper()}"


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
        """Store a finished run's status dict."""
        with self._lock:
            self._runs.append(dict(status))

    def latest(self) -> Optional[Dict[str, Any]]:
        """The newest finished run, or None."""
        with self._lock:
            return dict(self._runs[-1]) if self._runs else None

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


class RunMonitor:
    """Aggregates one patched model's attention calls per sampling run and publishes status dicts.

    Args:
        label: shown in the status (for example the model class).
        node_id: the id of the node that patched the model (the browser puts that run's badge on that node).
        publish: receives status dicts (JSON-ready); None publishes nothing.
        history: where finished runs go; defaults to :func:`default_history`.
        min_interval_s: at most one publish per this many seconds while a run goes.
        clock: monotonic seconds (injectable for tests).
    """

    def __init__(
        self,
        label: str = "",
        publish: Optional[Publish] = None,
        node_id: Optional[str] = None,
        history: Optional[RunHistory] = None,
        min_interval_s: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.label = label
        self.node_id = None if node_id is None else str(node_id)
        self.publish = publish
        self.history = default_history() if history is None else history
        self.min_interval_s = min_interval_s
        self._clock = clock
        self._lock = threading.Lock()
        self._device: Optional[torch.device] = None
        self._running = False
        self.replaced_by: Optional[str] = None
        self._reset_counters()

    def _reset_counters(self) -> None:
        self.run_id = 0
        self.calls = 0
        self.tiers: Dict[str, int] = {}
        self.last_tier: Optional[int] = None
        self.last_blocks: Tuple[int, int] = (0, 0)
        self.max_q_len = 0
        self.max_kv_len = 0
        self._started = self._clock()
        self._last_publish = float("-inf")
        self._sampled_peak: Optional[int] = None

    def start(self, device: Optional[torch.device] = None) -> None:
        """Begin a run: zero the counters and reset the device's peak counter."""
        with self._lock:
            self._reset_counters()
            self._device = torch.device(device) if device is not None else None
            self._running = True
            self.run_id = self.history.next_run_id()
        if self._device is not None:
            reset_peak_memory(self._device)
        self._emit(force=True)

    def record(self, call: CallRecord) -> None:
        """Count one attention call (starts a run if none is going)."""
        if not self._running:
            self.start(torch.device(call.device))
        with self._lock:
            self.calls += 1
            key = "comfy" if call.path == "comfy" else str(call.tier)
            self.tiers[key] = self.tiers.get(key, 0) + 1
            if call.path == "noflash":
                self.last_tier = call.tier
                self.last_blocks = (call.block_m, call.block_n)
            self.max_q_len = max(self.max_q_len, call.q_len)
            self.max_kv_len = max(self.max_kv_len, call.kv_len)
            if self._device is None:
                self._device = torch.device(call.device)
        if self._device is not None and self._device.type == "mps":
            peak, _ = read_peak_memory(self._device)
            self._sampled_peak = max(self._sampled_peak or 0, peak or 0)
        self._emit(force=False)

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
            return {
                "run_id": self.run_id,
                "label": self.label,
                "node_id": self.node_id,
                "state": state or ("running" if self._running else "idle"),
                "calls": self.calls,
                "tiers": dict(self.tiers),
                "active_tier": self.last_tier,
                "block_m": self.last_blocks[0],
                "block_n": self.last_blocks[1],
                "max_q_len": self.max_q_len,
                "max_kv_len": self.max_kv_len,
                "device": str(self._device) if self._device is not None else "",
                "peak_bytes": peak,
                "peak_source": source,
                "replaced_by": self.replaced_by,
                "elapsed_s": round(self._clock() - self._started, 3),
                "time": time.time(),
            }

    def _emit(self, force: bool) -> None:
        if self.publish is None:
            return
        now = self._clock()
        with self._lock:
            if not force and now - self._last_publish < self.min_interval_s:
                return
            self._last_publish = now
        self.publish(self.status())
