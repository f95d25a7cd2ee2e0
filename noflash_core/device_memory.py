"""Device memory facts per device type, in one place: total and free bytes, the allocator's peak counter, freeing
the cache and waiting for queued work.

Every module that needs one of these asks here (the device profile, the OOM retry, the benchmark, the ComfyUI
telemetry); nothing else branches on cuda/xpu/mps for memory.

Free memory per device type:

- CUDA (NVIDIA, and AMD through ZLUDA on Windows): ``torch.cuda.mem_get_info``.
- ROCm on Linux: the amdgpu sysfs files ``mem_info_vram_total`` / ``mem_info_vram_used`` of the matching card when
  they can be read (``mem_get_info`` over-reports free memory on some ROCm setups), else ``mem_get_info``.
  ROCm on Windows has no sysfs: ``mem_get_info``.
- XPU: ``torch.xpu.mem_get_info``. MPS: ``recommended_max_memory`` minus ``driver_allocated_memory``.
- CPU: ``/proc/meminfo`` on Linux, else ``psutil`` where it is installed (ComfyUI depends on it), else unknown.

Peak counters: CUDA/ROCm/ZLUDA and XPU keep ``max_memory_allocated``; MPS has none (its current allocation is
sampled instead); CPU has none.
"""

from __future__ import annotations

import glob
import os
import re
import sys
from typing import Dict, Optional, Tuple

import torch

__all__ = [
    "allocated_bytes",
    "empty_cache",
    "has_peak_counter",
    "memory_info",
    "read_peak",
    "reset_peak",
    "synchronize",
]

_SYSFS_GLOB = "/sys/class/drm/card*/device/mem_info_vram_total"
_PEAK_COUNTER_TYPES = ("cuda", "xpu")


def _available(kind: str) -> bool:
    """Whether torch has a working ``kind`` backend here (cuda covers ROCm and ZLUDA)."""
    if kind == "cuda":
        return torch.cuda.is_available()
    if kind == "xpu":
        return hasattr(torch, "xpu") and torch.xpu.is_available()
    if kind == "mps":
        mps = getattr(torch.backends, "mps", None)
        return mps is not None and mps.is_available()
    return False


def _backend(device: torch.device):
    """``torch.cuda`` / ``torch.xpu`` / ``torch.mps`` for an available accelerator, else None."""
    kind = torch.device(device).type
    return getattr(torch, kind, None) if kind in ("cuda", "xpu", "mps") and _available(kind) else None


def _is_rocm() -> bool:
    return getattr(torch.version, "hip", None) is not None


def _rocm_sysfs_vram(device: torch.device) -> Optional[Tuple[int, int]]:
    """``(total, used)`` bytes from the amdgpu sysfs files of ``device``'s card (Linux only), when matched."""
    if not sys.platform.startswith("linux"):
        return None
    cards = []
    for total_path in sorted(glob.glob(_SYSFS_GLOB)):
        dev_dir = os.path.dirname(total_path)
        try:
            with open(total_path) as f:
                total = int(f.read().strip())
            with open(os.path.join(dev_dir, "mem_info_vram_used")) as f:
                used = int(f.read().strip())
        except (OSError, ValueError):
            continue
        cards.append((os.path.basename(os.path.realpath(dev_dir)).lower(), total, used))
    if not cards:
        return None
    props = torch.cuda.get_device_properties(device)
    bus = getattr(props, "pci_bus_id", None)
    if bus is not None:
        want = f"{getattr(props, 'pci_domain_id', 0):04x}:{bus:02x}:{getattr(props, 'pci_device_id', 0):02x}"
        for name, total, used in cards:
            if name.startswith(want):
                return total, used
    if len(cards) == 1:
        return cards[0][1], cards[0][2]
    return None


def _cpu_memory() -> Tuple[Optional[int], Optional[int]]:
    """``(total, available)`` host bytes: ``/proc/meminfo`` where it exists, else psutil, else unknown."""
    values: Dict[str, int] = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                m = re.match(r"(\w+):\s+(\d+) kB", line)
                if m:
                    values[m.group(1)] = int(m.group(2)) * 1024
        return values.get("MemTotal"), values.get("MemAvailable")
    except OSError:
        pass
    try:
        import psutil
    except ImportError:
        return None, None
    vm = psutil.virtual_memory()
    return int(vm.total), int(vm.available)


def memory_info(device: torch.device) -> Tuple[Optional[int], Optional[int]]:
    """``(total, free)`` bytes of ``device`` now; None where unknown (see the module notes for the sources)."""
    device = torch.device(device)
    if device.type == "cuda" and _available("cuda"):
        if _is_rocm():
            sysfs = _rocm_sysfs_vram(device)
            if sysfs is not None:
                return sysfs[0], max(0, sysfs[0] - sysfs[1])
        free, total = torch.cuda.mem_get_info(device)
        return int(total), int(free)
    if device.type == "xpu" and _available("xpu"):
        free, total = torch.xpu.mem_get_info(device)
        return int(total), int(free)
    if device.type == "mps" and _available("mps"):
        total = int(torch.mps.recommended_max_memory())
        return total, max(0, total - int(torch.mps.driver_allocated_memory()))
    if device.type == "cpu":
        return _cpu_memory()
    return None, None


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on ``device`` (a no-op on CPU and meta)."""
    backend = _backend(device)
    if backend is not None and hasattr(backend, "synchronize"):
        backend.synchronize()


def empty_cache(device: torch.device) -> None:
    """Give the cached blocks of ``device``'s allocator back to the driver (a no-op on CPU)."""
    backend = _backend(device)
    if backend is not None and hasattr(backend, "empty_cache"):
        backend.empty_cache()


def has_peak_counter(device: torch.device) -> bool:
    """True where the allocator keeps a resettable ``max_memory_allocated`` (CUDA, ROCm, ZLUDA, XPU)."""
    device = torch.device(device)
    return device.type in _PEAK_COUNTER_TYPES and _backend(device) is not None


def reset_peak(device: torch.device) -> None:
    """Reset the allocator's peak counter of ``device`` where it has one."""
    if has_peak_counter(device):
        _backend(device).reset_peak_memory_stats(device)


def allocated_bytes(device: torch.device) -> Optional[int]:
    """Bytes the allocator holds for tensors on ``device`` now; None where torch does not count them (CPU)."""
    device = torch.device(device)
    if has_peak_counter(device):
        return int(_backend(device).memory_allocated(device))
    if device.type == "mps" and _available("mps"):
        return int(torch.mps.current_allocated_memory())
    return None


def read_peak(device: torch.device) -> Tuple[Optional[int], str]:
    """``(bytes, source)``: the allocator's peak since the last :func:`reset_peak`, MPS's current allocation
    (sampled: it keeps no peak), or ``(None, "not tracked on CPU")``."""
    device = torch.device(device)
    if has_peak_counter(device):
        return int(_backend(device).max_memory_allocated(device)), f"torch.{device.type}.max_memory_allocated"
    if device.type == "mps" and _available("mps"):
        return int(torch.mps.current_allocated_memory()), "torch.mps.current_allocated_memory (sampled)"
    return None, f"not tracked on {device.type.upper()}"
