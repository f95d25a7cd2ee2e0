"""Device facts in one place: what a device is, its memory, its precision rules and which fused SDPA kernels run.

Everything else in noflash reads a :class:`DeviceProfile` (``device_profile(device)``) and never probes a device
itself. A profile is built once per device and cached; only free memory is read live (``profile.free_memory()``).

``simulate_device("gfx906")`` makes tensors on the ``meta`` device plan and run as on that GPU (its memory,
precision rules and tier order), so GPU plans can be inspected and tested on any machine. The presets in
:data:`PRESETS` are the GPUs noflash is for.

ROCm note: ``torch.cuda.mem_get_info`` over-reports free memory on some ROCm setups, so on ROCm the sysfs files
``mem_info_vram_total`` / ``mem_info_vram_used`` of the matching card are read when present.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import logging
import os
import re
import threading
import warnings
from dataclasses import dataclass, replace
from typing import Dict, Iterator, Mapping, Optional, Tuple, Union

import torch

__all__ = [
    "ARCHS_WITHOUT_FUSED_ATTENTION",
    "PRESETS",
    "DeviceProfile",
    "device_profile",
    "device_report",
    "get_preset",
    "resolve_device",
    "simulate_device",
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


def _gpu_arch(device: torch.device) -> Optional[str]:
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


def _bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        try:
            return bool(torch.cuda.is_bf16_supported())
        except (RuntimeError, AssertionError):
            return False
    if device.type == "mps":
        return hasattr(torch.backends.mps, "is_macos_or_newer") and torch.backends.mps.is_macos_or_newer(14, 0)
    return True


def _probe_backends(device: torch.device) -> Tuple[Tuple[str, bool], ...]:
    """``(backend, runs)`` for torch's SDPA backends: each one tried on a tiny call on ``device``."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from .torch_sdpa import original_sdpa

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
                    original_sdpa(q, q, q)  # torch's own, even while the global patch is on
            results.append((name, True))
        except (RuntimeError, NotImplementedError, TypeError):
            results.append((name, False))
    return tuple(results)


def _name(device: torch.device) -> str:
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(device)
    if device.type == "xpu" and hasattr(torch, "xpu") and torch.xpu.is_available():
        return torch.xpu.get_device_name(device)
    if device.type == "cpu":
        import platform

        return platform.processor() or platform.machine() or "cpu"
    return device.type


# ---------------------------------------------------------------------------------------------- profiles

_GiB = 1024**3
_BACKENDS = ("flash", "efficient", "cudnn", "math")


@dataclass(frozen=True)
class DeviceProfile:
    """The facts about one device that noflash's planner, precision policy, budget and auto-patch use.

    Attributes:
        name: a preset name (``"gfx906"``) or the real device (``"cuda:0"``).
        kind: ``"cpu"``, ``"cuda"`` (NVIDIA), ``"rocm"`` (AMD), ``"mps"``, ``"xpu"`` or ``"meta"``.
        arch: ``gcnArchName`` on ROCm (``"gfx906"``), ``"sm_XY"`` on NVIDIA, None elsewhere.
        description: the product, e.g. ``"AMD Radeon Instinct MI50 (16 GiB)"``.
        total_bytes: device memory; None where unknown.
        free_bytes: free memory when the profile was made (a preset's is its total); see :meth:`free_memory`.
        bf16: whether bf16 matmuls run natively (without it bf16 runs in fp16 where the values fit, else fp32).
        half_out_fp32: whether ``bmm(half, half, out_dtype=float32)`` runs, so half operands need no fp32 copies.
        sdpa_backends: ``(backend, runs)`` pairs for torch's ``flash``, ``efficient``, ``cudnn`` and ``math``.
        simulated: a preset standing in for a device that is not here (see :func:`simulate_device`).
    """

    name: str
    kind: str
    arch: Optional[str]
    description: str
    total_bytes: Optional[int]
    free_bytes: Optional[int]
    bf16: bool
    half_out_fp32: bool
    sdpa_backends: Tuple[Tuple[str, bool], ...]
    simulated: bool = False

    @property
    def device_class(self) -> str:
        """``"cpu"`` for CPUs (and unsimulated meta tensors), else ``"gpu"``: selects block sizes and tier order."""
        return "cpu" if self.kind in ("cpu", "meta") else "gpu"

    @property
    def efficient_sdpa(self) -> bool:
        """True when a fused (O(N)-memory) torch SDPA kernel runs here and the arch is not known to lack one."""
        if self.arch is not None and self.arch.split(":")[0].startswith(ARCHS_WITHOUT_FUSED_ATTENTION):
            return False
        runs = dict(self.sdpa_backends)
        return bool(runs.get("flash") or runs.get("efficient") or runs.get("cudnn"))

    def free_memory(self) -> Optional[int]:
        """Free bytes now: read live from a real accelerator, the fixed figure for presets, CPUs and meta."""
        if self.simulated or self.kind in ("cpu", "meta"):
            return self.free_bytes
        return _memory(torch.device(self.name))[1]

    def with_memory(self, total_bytes: Optional[int] = None, free_bytes: Optional[int] = None) -> DeviceProfile:
        """A copy with other memory figures (e.g. a 32 GiB MI50): ``free_bytes`` defaults to ``total_bytes``."""
        total = self.total_bytes if total_bytes is None else int(total_bytes)
        free = (total if total_bytes is not None else self.free_bytes) if free_bytes is None else int(free_bytes)
        return replace(self, total_bytes=total, free_bytes=free)


def _preset(name, kind, arch, description, gib, bf16, half_out_fp32, fused=()) -> DeviceProfile:
    backends = tuple((b, b == "math" or b in fused) for b in _BACKENDS)
    return DeviceProfile(name, kind, arch, description, gib * _GiB, gib * _GiB, bf16, half_out_fp32, backends, True)


PRESETS: Mapping[str, DeviceProfile] = {
    p.name: p
    for p in (
        # bf16 on these AMD archs: no bf16 matrix hardware, torch emulates it; flags are from AMD's ISA docs, not
        # measured by us. half_out_fp32: torch's bmm(out_dtype=float32) runs through hipBLASLt/rocBLAS there.
        _preset("gfx906", "rocm", "gfx906", "AMD Radeon Instinct MI50 / Radeon VII (Vega 20, 16 GiB)", 16, False, True),
        _preset("gfx1030", "rocm", "gfx1030", "AMD Radeon RX 6800 / 6800 XT / 6900 XT (RDNA2, 16 GiB)", 16, False,
                True),
        _preset("gfx1010", "rocm", "gfx1010", "AMD Radeon RX 5700 XT (RDNA1, 8 GiB)", 8, False, True),
        _preset("mps", "mps", None, "Apple silicon, 16 GiB unified memory (MPS)", 16, True, False),
        _preset("arc", "xpu", None, "Intel Arc A770 (16 GiB)", 16, True, False),
        _preset("cpu", "cpu", None, "CPU (a 32 GiB host)", 32, True, False),
    )
}
"""Named profiles of the GPUs noflash is for, for planning and for :func:`simulate_device`. None of them has a
fused SDPA kernel that runs (torch falls back to math SDPA there)."""


_ALIASES = {"rdna2": "gfx1030", "rdna1": "gfx1010", "mi50": "gfx906", "vega20": "gfx906", "a770": "arc"}


def get_preset(name: str) -> DeviceProfile:
    """The preset called ``name`` (case-insensitive; ``rdna2``/``rdna1``/``mi50``/``a770`` are accepted too)."""
    key = str(name).strip().lower()
    key = _ALIASES.get(key, key)
    if key not in PRESETS:
        raise ValueError(f"unknown device profile {name!r}; use one of: {', '.join(PRESETS)}")
    return PRESETS[key]


_META = DeviceProfile("meta", "meta", None, "meta tensors (no device)", None, None, True, False,
                      tuple((b, b == "math") for b in _BACKENDS))
_state = threading.local()


def _simulated() -> Optional[DeviceProfile]:
    stack = getattr(_state, "stack", None)
    return stack[-1] if stack else None


@contextlib.contextmanager
def simulate_device(profile: Union[str, DeviceProfile], *, total_bytes: Optional[int] = None,
                    free_bytes: Optional[int] = None) -> Iterator[DeviceProfile]:
    """Plan and run ``meta`` tensors as on another device.

    While active (in this thread), tensors on the ``meta`` device are planned with ``profile``'s memory, precision
    rules and tier order; nothing touches a real device. Nest freely; the innermost wins.

    Args:
        profile: a :class:`DeviceProfile` or a preset name from :data:`PRESETS` (``"gfx906"``, ``"gfx1030"``, ...).
        total_bytes, free_bytes: override the profile's memory (e.g. a 32 GiB MI50).

    Yields:
        The profile in force.

    Example::

        with noflash_core.simulate_device("gfx1030"):
            q = torch.empty(1, 24, 9728, 128, dtype=torch.float16, device="meta")
            print(noflash_core.plan(q, q, q))
    """
    prof = get_preset(profile) if isinstance(profile, str) else profile
    if not isinstance(prof, DeviceProfile):
        raise TypeError(f"simulate_device takes a preset name or a DeviceProfile, got {type(profile).__name__}")
    if total_bytes is not None or free_bytes is not None:
        prof = prof.with_memory(total_bytes, free_bytes)
    prof = replace(prof, simulated=True)
    stack = getattr(_state, "stack", None)
    if stack is None:
        stack = _state.stack = []
    stack.append(prof)
    try:
        yield prof
    finally:
        stack.pop()


def _probe_half_out_fp32(device: torch.device) -> bool:
    if device.type == "cpu":
        return False  # CPU bmm has no fp32 output for half inputs worth using: operands are upcast once instead
    from torch.utils._python_dispatch import _disable_current_modes

    try:
        with _disable_current_modes():  # probe the real device, never a fake or tracking mode's answer
            a = torch.ones(1, 2, 2, dtype=torch.float16, device=device)
            return torch.bmm(a, a, out_dtype=torch.float32).dtype == torch.float32
    except (TypeError, RuntimeError, NotImplementedError, AssertionError):
        return False


@functools.cache
def _real_profile(device_str: str) -> DeviceProfile:
    dev = torch.device(device_str)
    kind = "rocm" if dev.type == "cuda" and _is_rocm() else dev.type
    total, free = _memory(dev)
    return DeviceProfile(
        name=str(dev), kind=kind, arch=_gpu_arch(dev), description=_name(dev), total_bytes=total, free_bytes=free,
        bf16=_bf16_supported(dev), half_out_fp32=_probe_half_out_fp32(dev),
        sdpa_backends=_probe_backends(dev), simulated=False,
    )


_by_device: Dict[torch.device, DeviceProfile] = {}


def device_profile(device: Optional[object] = None) -> DeviceProfile:
    """The :class:`DeviceProfile` of ``device`` (a device, its name or a tensor; default: the current accelerator,
    else CPU).

    ``meta`` tensors get the profile of an active :func:`simulate_device`, else a CPU-like meta profile. Real
    devices are probed once and cached.
    """
    if isinstance(device, torch.Tensor):
        device = device.device
    if isinstance(device, torch.device):
        if device.type == "meta":
            return _simulated() or _META
        cached = _by_device.get(device)
        if cached is not None:
            return cached
    elif device is not None and torch.device(device).type == "meta":
        return _simulated() or _META
    profile = _real_profile(str(resolve_device(device)))
    if isinstance(device, torch.device) and (device.index is not None or device.type != "cuda"):
        _by_device[device] = profile  # "cuda" alone follows the current device, so it is resolved every time
    return profile


_VENDORS = {"cuda": "NVIDIA", "rocm": "AMD", "mps": "Apple", "xpu": "Intel", "cpu": "CPU", "meta": "none"}


def device_report(device: Union[None, str, torch.device, DeviceProfile] = None) -> dict:
    """Describe ``device`` (a device or its name, or a profile such as ``get_preset("gfx906")``; default: the
    current accelerator, else CPU), from its :class:`DeviceProfile`.

    Returns:
        A dict with ``device``, ``name``, ``vendor``, ``arch``, ``total_bytes``, ``free_bytes``, ``bf16``,
        ``sdpa_backends`` (backend name -> runs), ``efficient_sdpa``, ``patch_would_activate`` and ``simulated``.
    """
    profile = device if isinstance(device, DeviceProfile) else device_profile(device)
    return {
        "device": profile.name,
        "name": profile.description,
        "vendor": _VENDORS.get(profile.kind, profile.kind),
        "arch": profile.arch,
        "total_bytes": profile.total_bytes,
        "free_bytes": profile.free_memory(),
        "bf16": profile.bf16,
        "sdpa_backends": dict(profile.sdpa_backends),
        "efficient_sdpa": profile.efficient_sdpa,
        "patch_would_activate": not profile.efficient_sdpa,
        "simulated": profile.simulated,
    }
