"""The device the engine tests run on: ``NOFLASH_TEST_DEVICE=cpu|cuda|xpu|mps`` (default ``cpu``).

``cuda`` covers ROCm builds too. The conformance, gradient, memory and compile tests build their tensors on
:data:`DEVICE`; what is not meaningful there skips with the reason (:func:`skip_unless_supported`). Memory is
measured with the live-bytes tracker on every device and, where torch keeps allocator statistics (CUDA, ROCm,
XPU), with ``max_memory_allocated`` as well (:func:`measure_peak`).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Iterator, Optional

import pytest
import torch

from noflash_core import device_memory
from noflash_core.memory.tracker import LiveBytesTracker

__all__ = [
    "DEVICE",
    "ENV_VAR",
    "KNOWN_DEVICES",
    "Peak",
    "measure_peak",
    "resolve_test_device",
    "skip_unless_supported",
    "synchronize",
]

ENV_VAR = "NOFLASH_TEST_DEVICE"
KNOWN_DEVICES = ("cpu", "cuda", "xpu", "mps")


def _available(kind: str) -> bool:
    if kind == "cpu":
        return True
    backend = getattr(torch, kind, None)
    if kind == "mps":
        return bool(torch.backends.mps.is_available())
    return backend is not None and bool(backend.is_available())


def resolve_test_device(value: Optional[str] = None) -> torch.device:
    """The device named by ``value`` (default: ``$NOFLASH_TEST_DEVICE``, else ``cpu``).

    Raises:
        ValueError: for a name other than cpu, cuda, xpu or mps, or a device this machine does not have.
    """
    raw = os.environ.get(ENV_VAR, "") if value is None else value
    kind = raw.strip().lower() or "cpu"
    if kind not in KNOWN_DEVICES:
        raise ValueError(
            f"{ENV_VAR}={raw!r} is not a test device. Use one of {', '.join(KNOWN_DEVICES)} "
            "(cuda also means ROCm), or leave it unset for cpu."
        )
    if not _available(kind):
        raise ValueError(
            f"{ENV_VAR}={kind} but this torch {torch.__version__} sees no {kind} device. Install the torch build "
            f"for that GPU, or unset {ENV_VAR} to test on the CPU."
        )
    return torch.device(kind)


DEVICE = resolve_test_device()
"""The test device. A bad ``NOFLASH_TEST_DEVICE`` fails this import; ``conftest.py`` turns that into a usage error."""


def skip_unless_supported(dtype: torch.dtype, device: Optional[torch.device] = None) -> None:
    """Skip the calling test when ``device`` (default :data:`DEVICE`) has no ``dtype``: MPS has no float64."""
    device = device or DEVICE
    if device.type == "mps" and dtype == torch.float64:
        pytest.skip("MPS has no float64")


def synchronize(device: Optional[torch.device] = None) -> None:
    device_memory.synchronize(device or DEVICE)


_warmed: set = set()


def _warm_up(device: torch.device) -> None:
    """Run one matmul per dtype once, so that the BLAS libraries' workspaces exist before anything is measured."""
    if device in _warmed:
        return
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        a = torch.ones(64, 64, device=device, dtype=dtype)
        (a @ a).sum()
        torch.bmm(a[None], a[None])
    synchronize(device)
    _warmed.add(device)


@dataclass
class Peak:
    """Peak bytes of one measured block.

    Attributes:
        tracker: the live-bytes tracker's exact count of the tensor storages allocated inside the block.
        device: ``max_memory_allocated`` above the bytes allocated on entry (CUDA, ROCm, XPU), else None.
        live: the tracker's bytes still alive when the block ended.
    """

    tracker: int = 0
    device: Optional[int] = None
    live: int = 0


@contextlib.contextmanager
def measure_peak(device: Optional[torch.device] = None) -> Iterator[Peak]:
    """Measure the peak memory of the ``with`` block with the tracker and, where it exists, the device allocator."""
    device = device or DEVICE
    counted = device_memory.has_peak_counter(device)
    peak = Peak()
    base = 0
    if counted:
        _warm_up(device)
        base = device_memory.allocated_bytes(device)
        device_memory.reset_peak(device)
    with LiveBytesTracker() as tracker:
        yield peak
        synchronize(device)
        peak.live = tracker.live_bytes
    peak.tracker = tracker.peak_bytes
    if counted:
        peak.device = device_memory.read_peak(device)[0] - base
