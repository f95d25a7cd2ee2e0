"""Device helpers for the benchmark: synchronisation, peak memory and a machine description.

What the device is (name, arch, memory, fused kernels) comes from :func:`noflash_core.device.device_profile`."""

from __future__ import annotations

import os
import platform
from typing import Dict, Optional

import torch

from ..device import device_profile
from ..device_memory import allocated_bytes, has_peak_counter, read_peak, reset_peak, synchronize

__all__ = ["PeakMemory", "describe_machine", "load_average", "synchronize"]


class PeakMemory:
    """Peak bytes allocated inside the context, above what was allocated on entry.

    CUDA/ROCm/ZLUDA and XPU use the caching allocator's ``max_memory_allocated``; every other device (CPU, MPS) uses
    :class:`~noflash_core.memory.tracker.LiveBytesTracker`, which counts tensor storages exactly (including
    those allocated inside custom ops).

    Attributes:
        peak_bytes: set on exit.
        method: ``"allocator"`` or ``"tracker"``.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.method = "allocator" if has_peak_counter(device) else "tracker"
        self.peak_bytes = 0
        self._tracker = None
        self._base = 0

    def __enter__(self) -> PeakMemory:
        if self.method == "allocator":
            synchronize(self.device)
            reset_peak(self.device)
            self._base = allocated_bytes(self.device)
        else:
            from ..memory.tracker import LiveBytesTracker

            self._tracker = LiveBytesTracker()
            self._tracker.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.method == "allocator":
            synchronize(self.device)
            self.peak_bytes = int(read_peak(self.device)[0] - self._base)
        else:
            self._tracker.__exit__(*exc)
            self.peak_bytes = int(self._tracker.peak_bytes)


def load_average() -> Optional[float]:
    """The 1-minute load average (None where the OS has none). Above the core count, CPU timings are unreliable."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_machine(device: torch.device) -> Dict[str, object]:
    """What the numbers were measured on."""
    info: Dict[str, object] = {
        "device": str(device),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_at_start": load_average(),
    }
    if device.type != "cpu":
        profile = device_profile(device)
        info["gpu"] = profile.description
        info["gpu_kind"] = profile.kind  # "zluda" for an AMD card under ZLUDA (torch sees CUDA)
        info["gpu_total_bytes"] = profile.total_bytes
        if profile.arch:
            info["gpu_arch"] = profile.arch
        info["fused_sdpa"] = profile.efficient_sdpa
    if device.type == "cuda":
        info["hip"] = getattr(torch.version, "hip", None)
        info["cuda"] = torch.version.cuda
    return info
