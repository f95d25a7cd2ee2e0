"""What the current device is, how much memory it has, and whether torch has a fused SDPA kernel for it.

ROCm note: ``torch.cuda.mem_get_info`` over-reports free memory on some ROCm setups, so on ROCm the sysfs files
``mem_info_vram_total`` / ``mem_info_vram_used`` of the matching card are read when present.
"""

from __future__ import annotations

import functools
import glob
import logging
import os
import re
import warnings
from typing import Dict, Optional, Tuple

import torch

__all__ = [
    "ARCHS_WITHOUT_FUSED_ATTENTION",
    "device_report",
    "efficient_sdpa_available",
    "free_memory_bytes",
    "gpu_arch",
    "probe_sdpa_backends",
    "resolve_device",
]

_log = logging.getLogger(__name__)

ARCHS_WITHOUT_FUSED_ATTENTION: Tuple[str, ...] = ("gfx900", "gfx906", "gfx908", "gfx101", "gfx103")
"""ROCm architecture prefixes with no fused attention kernel in torch (AOTriton and CK skip them):
Vega 10 (gfx900), Vega 20 / MI50 / MI60 (gfx906), MI100 (gfx908), RDNA1 (gfx101x) and RDNA2 (gfx103x)."""


def resolve_device(device: Optional[object] = None) -> torch.device:
    """``device`` as a torch.device; None means the default accelerator if there is one, else CPU."""
    if device is not None:
        dev = torch.device(device)
        if dev.type == "cuda" and dev.index is None and torch.cuda.is_available():
            dev = torch.device("cuda", torch.cuda.current_device())
        return dev
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    if hasattr(torch, "xpu") and torch.xpu.is_available():
        return torch.device("xpu", 0)
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def _is_rocm() -> bool:
    return getattr(torch.version, "hip", None) is not None


def gpu_arch(device: torch.device) -> Optional[str]:
    """The GPU architecture: ``gcnArchName`` on ROCm (e.g. ``gfx906:sramecc+:xnack-``), ``sm_XY`` on CUDA."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(device)
    arch = getattr(props, "gcnArchName", None)
    if arch:
        return str(arch)
    return f"sm_{props.major}{props.minor}"


def _rocm_sysfs_vram(device: torch.device) -> Optional[Tuple[int, int]]:
    """``(total, used)`` bytes from the amdgpu sysfs files of ``device``'s card, when they can be matched."""
    cards = []
    for total_path in sorted(glob.glob("/sys/class/drm/card*/device/mem_info_vram_total")):
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
        domain = getattr(props, "pci_domain_id", 0)
        dev_id = getattr(props, "pci_device_id", 0)
        want = f"{domain:04x}:{bus:02x}:{dev_id:02x}"
        for name, total, used in cards:
            if name.startswith(want):
                return total, used
    if len(cards) == 1:
        return cards[0][1], cards[0][2]
    return None


def _cpu_memory() -> Tuple[Optional[int], Optional[int]]:
    values: Dict[str, int] = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                m = re.match(r"(\w+):\s+(\d+) kB", line)
                if m:
                    values[m.group(1)] = int(m.group(2)) * 1024
    except OSError:
        return None, None
    return values.get("MemTotal"), values.get("MemAvailable")


def _memory(device: torch.device) -> Tuple[Optional[int], Optional[int]]:
    """``(total, free)`` bytes of ``device``, None where unknown."""
    if device.type == "cuda" and torch.cuda.is_available():
        if _is_rocm():
            sysfs = _rocm_sysfs_vram(device)
            if sysfs is not None:
                return sysfs[0], max(0, sysfs[0] - sysfs[1])
        free, total = torch.cuda.mem_get_info(device)
        return int(total), int(free)
    if device.type == "xpu" and hasattr(torch, "xpu") and torch.xpu.is_available():
        free, total = torch.xpu.mem_get_info(device)
        return int(total), int(free)
    if device.type == "mps" and getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        total = int(torch.mps.recommended_max_memory())
        return total, max(0, total - int(torch.mps.driver_allocated_memory()))
    if device.type == "cpu":
        return _cpu_memory()
    return None, None


def free_memory_bytes(device: torch.device) -> Optional[int]:
    """Free bytes on ``device`` (sysfs on ROCm, ``mem_get_info`` on CUDA/XPU, the MPS recommendation minus what
    the driver holds, MemAvailable on CPU), or None when unknown."""
    return _memory(torch.device(device))[1]


def _bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        try:
            return bool(torch.cuda.is_bf16_supported())
        except (RuntimeError, AssertionError):
            return False
    if device.type == "mps":
        return hasattr(torch.backends.mps, "is_macos_or_newer") and torch.backends.mps.is_macos_or_newer(14, 0)
    return True


@functools.cache
def _probe_cached(device_str: str) -> Tuple[Tuple[str, bool], ...]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    device = torch.device(device_str)
    dtype = torch.float32 if device.type == "cpu" else torch.float16
    backends = {
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": getattr(SDPBackend, "CUDNN_ATTENTION", None),
        "math": SDPBackend.MATH,
    }
    results = []
    for name, backend in backends.items():
        if backend is None:
            results.append((name, False))
            continue
        try:
            q = torch.randn(1, 2, 64, 64, device=device, dtype=dtype)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with sdpa_kernel(backend):
                    torch.nn.functional.scaled_dot_product_attention(q, q, q)
            results.append((name, True))
        except (RuntimeError, NotImplementedError, TypeError):
            results.append((name, False))
    return tuple(results)


def probe_sdpa_backends(device: Optional[object] = None) -> Dict[str, bool]:
    """Which of torch's SDPA backends actually run a tiny call on ``device`` (cached per device)."""
    return dict(_probe_cached(str(resolve_device(device))))


def efficient_sdpa_available(device: Optional[object] = None) -> bool:
    """True when a fused (O(N)-memory) torch SDPA kernel runs on ``device`` and its arch is not known to lack one."""
    dev = resolve_device(device)
    arch = gpu_arch(dev)
    if arch is not None and arch.split(":")[0].startswith(ARCHS_WITHOUT_FUSED_ATTENTION):
        return False
    probed = probe_sdpa_backends(dev)
    return probed["flash"] or probed["efficient"] or probed["cudnn"]


def _vendor(device: torch.device) -> str:
    if device.type == "cuda":
        return "AMD" if _is_rocm() else "NVIDIA"
    return {"mps": "Apple", "xpu": "Intel", "cpu": "CPU"}.get(device.type, device.type)


def _name(device: torch.device) -> str:
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(device)
    if device.type == "xpu" and hasattr(torch, "xpu") and torch.xpu.is_available():
        return torch.xpu.get_device_name(device)
    if device.type == "cpu":
        import platform

        return platform.processor() or platform.machine() or "cpu"
    return device.type


def device_report(device: Optional[object] = None) -> dict:
    """Describe ``device`` (default: the current accelerator, else CPU).

    Returns:
        A dict with ``device``, ``name``, ``vendor``, ``arch``, ``total_bytes``, ``free_bytes``, ``bf16``,
        ``sdpa_backends`` (backend name -> runs), ``efficient_sdpa`` and ``patch_would_activate``.
    """
    dev = resolve_device(device)
    total, free = _memory(dev)
    backends = probe_sdpa_backends(dev)
    efficient = efficient_sdpa_available(dev)
    return {
        "device": str(dev),
        "name": _name(dev),
        "vendor": _vendor(dev),
        "arch": gpu_arch(dev),
        "total_bytes": total,
        "free_bytes": free,
        "bf16": _bf16_supported(dev),
        "sdpa_backends": backends,
        "efficient_sdpa": efficient,
        "patch_would_activate": not efficient,
    }
