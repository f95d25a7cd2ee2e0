"""Device facts in one place: what a device is, its memory, its precision rules and which fused SDPA kernels run.

Everything else in noflash reads a :class:`DeviceProfile` (``device_profile(device)``) and never probes a device
itself. A profile is built once per device and cached; only free memory is read live (``profile.free_memory()``).

``simulate_device("gfx906")`` makes tensors on the ``meta`` device plan and run as on that GPU (its memory,
precision rules and tier order), so GPU plans can be inspected and tested on any machine. The presets in
:data:`PRESETS` are the GPUs noflash is for.

Memory is read by :mod:`noflash_core.device_memory` (ROCm sysfs on Linux, ``mem_get_info`` elsewhere).

AMD on Windows: under ZLUDA (ComfyUI-Zluda) torch sees a CUDA device named ``"AMD Radeon RX 6800 [ZLUDA]"`` with
``torch.version.hip`` None, compute capability 8.8 and no real ``gcnArchName``; its profile has kind ``"zluda"``
and the arch its marketing name maps to (:func:`amd_arch_from_name`). ROCm's Windows wheels are ROCm (kind
``"rocm"``, ``gcnArchName`` present) built without AOTriton: math SDPA only. Whether a fused SDPA kernel counts
follows the process's SDP flags (:func:`sdp_flags`), which ComfyUI-Zluda turns off.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import re
import sys
import threading
import warnings
from dataclasses import dataclass, replace
from typing import Dict, Iterator, Mapping, Optional, Tuple, Union

import torch

from .device_memory import memory_info

__all__ = [
    "ARCHS_WITHOUT_FUSED_ATTENTION",
    "PRESETS",
    "ZLUDA_SUFFIX",
    "DeviceProfile",
    "amd_arch_from_name",
    "clear_profile_cache",
    "device_profile",
    "device_report",
    "get_preset",
    "is_zluda_name",
    "resolve_device",
    "sdp_flags",
    "simulate_device",
]

_log = logging.getLogger(__name__)

ARCHS_WITHOUT_FUSED_ATTENTION: Tuple[str, ...] = ("gfx900", "gfx906", "gfx908", "gfx101", "gfx103")
"""ROCm architecture prefixes with no fused attention kernel in torch (AOTriton and CK skip them):
Vega 10 (gfx900), Vega 20 / MI50 / MI60 (gfx906), MI100 (gfx908), RDNA1 (gfx101x) and RDNA2 (gfx103x)."""

ZLUDA_SUFFIX = "[ZLUDA]"
"""ZLUDA (which runs CUDA builds of torch on AMD GPUs, on Windows) appends this to the device name."""

_ARCHS_WITHOUT_BF16 = ("gfx900", "gfx906", "gfx101", "gfx103")  # no bf16 matrix instructions (AMD ISA docs)


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


def is_zluda_name(name: Optional[str]) -> bool:
    """True for a CUDA device name that ZLUDA reports (``"AMD Radeon RX 6800 XT [ZLUDA]"``)."""
    return bool(name) and str(name).rstrip().endswith(ZLUDA_SUFFIX)


# Marketing name -> gfx target, from AMD's product specifications (most specific first: mobile parts and the
# "S"/"M" suffixes before the desktop names that are their prefixes).
_AMD_NAME_ARCHS: Tuple[Tuple[str, str], ...] = (
    (r"rx\s*9070", "gfx1201"),
    (r"rx\s*9060", "gfx1200"),
    (r"rx\s*7900|w7900|w7800", "gfx1100"),
    (r"rx\s*7[78]00|w7700", "gfx1101"),
    (r"rx\s*7[46]\d0|w7[456]00", "gfx1102"),
    (r"rx\s*6(800|850|700)m\b", "gfx1031"),
    (r"rx\s*6(800|700)s\b|rx\s*6(600|650)m\b|rx\s*6600s\b", "gfx1032"),
    (r"rx\s*6(800|900|950)\b|w6800", "gfx1030"),
    (r"rx\s*67[05]0\b", "gfx1031"),
    (r"rx\s*66[05]0\b|w6600", "gfx1032"),
    (r"rx\s*6[345]\d0\b|w6[345]00", "gfx1034"),
    (r"rx\s*5[67]00\b|w5700", "gfx1010"),
    (r"rx\s*5[345]00\b|w5[35]00", "gfx1012"),
    (r"radeon\s*(pro\s*)?vii\b|mi50\b|mi60\b", "gfx906"),
    (r"vega\s*(56|64)\b|vega\s*frontier", "gfx900"),
    # A model not listed above: only its family is known.
    (r"rx\s*9\d{3}", "gfx120x"),
    (r"rx\s*7\d{3}", "gfx110x"),
    (r"rx\s*6\d{3}", "gfx103x"),
    (r"rx\s*5\d{3}", "gfx101x"),
)


def amd_arch_from_name(name: str) -> Optional[str]:
    """The gfx target of an AMD card from its marketing name (ZLUDA shows no ``gcnArchName``).

    ``"AMD Radeon RX 6800 XT [ZLUDA]"`` -> ``"gfx1030"``, ``"AMD Radeon RX 5700 XT"`` -> ``"gfx1010"``; a model
    the table does not list gives its family (``"gfx103x"``); None for names that are not a Radeon we know.
    """
    text = str(name).lower().replace(ZLUDA_SUFFIX.lower(), "")
    for pattern, arch in _AMD_NAME_ARCHS:
        if re.search(pattern, text):
            return arch
    return None


def _gpu_arch(device: torch.device, name: str) -> Optional[str]:
    """The GPU architecture: ``gcnArchName`` on ROCm (e.g. ``gfx906:sramecc+:xnack-``), the marketing name's
    gfx target under ZLUDA, ``sm_XY`` on NVIDIA."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(device)
    arch = str(getattr(props, "gcnArchName", "") or "")
    if arch.startswith("gfx"):
        return arch
    if is_zluda_name(name):  # ZLUDA reports compute capability 8.8; ComfyUI-Zluda may fake gcnArchName
        return amd_arch_from_name(name)
    if _is_rocm():
        return None
    return f"sm_{props.major}{props.minor}"


def sdp_flags() -> Dict[str, bool]:
    """Which of torch's SDPA backends this process allows now (``torch.backends.cuda.*_sdp_enabled``).

    ComfyUI-Zluda turns ``flash`` and ``efficient`` off at start-up (and cuDNN with it); ``cudnn`` also needs
    ``torch.backends.cudnn.enabled``.
    """
    cuda = torch.backends.cuda
    cudnn_sdp = getattr(cuda, "cudnn_sdp_enabled", lambda: False)()
    return {
        "flash": bool(cuda.flash_sdp_enabled()),
        "efficient": bool(cuda.mem_efficient_sdp_enabled()),
        "cudnn": bool(cudnn_sdp and torch.backends.cudnn.enabled),
        "math": bool(cuda.math_sdp_enabled()),
    }


def _bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        try:
            return bool(torch.cuda.is_bf16_supported())
        except (RuntimeError, AssertionError):
            return False
    if device.type == "mps":
        return hasattr(torch.backends.mps, "is_macos_or_newer") and torch.backends.mps.is_macos_or_newer(14, 0)
    return True


def _try_backend(device: torch.device, backend) -> bool:
    """Whether torch's SDPA ``backend`` runs a tiny call on ``device`` (the only part of the probe that computes)."""
    from torch.nn.attention import sdpa_kernel

    from .sdpa import original_sdpa

    dtype = torch.float32 if device.type == "cpu" else torch.float16
    try:
        q = torch.randn(1, 2, 64, 64, device=device, dtype=dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with sdpa_kernel(backend):
                original_sdpa(q, q, q)  # torch's own, even while the global patch is on
        return True
    except (RuntimeError, NotImplementedError, TypeError, AssertionError):
        return False


def _probe_backends(device: torch.device) -> Tuple[Tuple[str, bool], ...]:
    """``(backend, runs)`` for torch's SDPA backends: each one tried on a tiny call on ``device``.

    On CUDA devices a backend the process has turned off (:func:`sdp_flags`) is not tried and counts as not
    running: under ZLUDA, torch's fused kernels are CUDA code that the fork disables for a reason."""
    from torch.nn.attention import SDPBackend

    backends = {
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": getattr(SDPBackend, "CUDNN_ATTENTION", None),
        "math": SDPBackend.MATH,
    }
    allowed = sdp_flags() if device.type == "cuda" else {}
    return tuple(
        (name, backend is not None and allowed.get(name, True) and _try_backend(device, backend))
        for name, backend in backends.items()
    )


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
_FUSED = ("flash", "efficient", "cudnn")
_VENDORS = {"cuda": "NVIDIA", "rocm": "AMD", "zluda": "AMD", "mps": "Apple", "xpu": "Intel", "cpu": "CPU",
            "meta": "none"}


@dataclass(frozen=True)
class DeviceProfile:
    """The facts about one device that noflash's planner, precision policy, budget and auto-patch use.

    Attributes:
        name: a preset name (``"gfx906"``) or the real device (``"cuda:0"``).
        kind: ``"cpu"``, ``"cuda"`` (NVIDIA), ``"rocm"`` (AMD on ROCm, Linux or Windows), ``"zluda"`` (AMD
            through ZLUDA: torch sees a CUDA device), ``"mps"``, ``"xpu"`` or ``"meta"``.
        arch: ``gcnArchName`` on ROCm (``"gfx906"``), the name's gfx target under ZLUDA (``"gfx1030"``, or a
            family such as ``"gfx103x"``), ``"sm_XY"`` on NVIDIA, None elsewhere.
        description: the product, e.g. ``"AMD Radeon Instinct MI50 (16 GiB)"``.
        total_bytes: device memory; None where unknown.
        free_bytes: free memory when the profile was made (a preset's is its total); see :meth:`free_memory`.
        bf16: whether bf16 matmuls run natively (without it bf16 runs in fp16 where the values fit, else fp32).
        half_out_fp32: whether ``bmm(half, half, out_dtype=float32)`` runs, so half operands need no fp32 copies.
        sdpa_backends: ``(backend, runs)`` pairs for torch's ``flash``, ``efficient``, ``cudnn`` and ``math``.
        simulated: a preset standing in for a device that is not here (see :func:`simulate_device`).
        platform: ``sys.platform`` of the machine (``"linux"``, ``"win32"``, ``"darwin"``); None for a preset
            that is not tied to one.
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
    platform: Optional[str] = None

    @property
    def device_class(self) -> str:
        """``"cpu"`` for CPUs (and unsimulated meta tensors), else ``"gpu"``: selects block sizes and tier order."""
        return "cpu" if self.kind in ("cpu", "meta") else "gpu"

    @property
    def vendor(self) -> str:
        """``"NVIDIA"``, ``"AMD"`` (ROCm and ZLUDA), ``"Apple"``, ``"Intel"``, ``"CPU"`` or ``"none"``."""
        return _VENDORS.get(self.kind, self.kind)

    @property
    def arch_lacks_fused_sdpa(self) -> bool:
        """True for an AMD arch torch ships no fused attention kernel for (:data:`ARCHS_WITHOUT_FUSED_ATTENTION`)."""
        return self.arch is not None and self.arch.split(":")[0].startswith(ARCHS_WITHOUT_FUSED_ATTENTION)

    def fused_sdpa_backends(self) -> Tuple[str, ...]:
        """The fused torch SDPA backends (``flash``, ``efficient``, ``cudnn``) that ran when probed and that the
        process allows now (:func:`sdp_flags`, read live for a real CUDA/ROCm/ZLUDA device; a preset's own)."""
        runs = dict(self.sdpa_backends)
        live = not self.simulated and self.kind in ("cuda", "rocm", "zluda")
        allowed = sdp_flags() if live else {}
        return tuple(b for b in _FUSED if runs.get(b) and allowed.get(b, True))

    @property
    def efficient_sdpa(self) -> bool:
        """True when a fused (O(N)-memory) torch SDPA kernel runs here, the process allows it and the arch is not
        known to lack one."""
        return not self.arch_lacks_fused_sdpa and bool(self.fused_sdpa_backends())

    def free_memory(self) -> Optional[int]:
        """Free bytes now: read live from a real accelerator, the fixed figure for presets, CPUs and meta."""
        if self.simulated or self.kind in ("cpu", "meta"):
            return self.free_bytes
        return memory_info(torch.device(self.name))[1]

    def with_memory(self, total_bytes: Optional[int] = None, free_bytes: Optional[int] = None) -> DeviceProfile:
        """A copy with other memory figures (e.g. a 32 GiB MI50): ``free_bytes`` defaults to ``total_bytes``."""
        total = self.total_bytes if total_bytes is None else int(total_bytes)
        free = (total if total_bytes is not None else self.free_bytes) if free_bytes is None else int(free_bytes)
        return replace(self, total_bytes=total, free_bytes=free)


def _preset(name, kind, arch, description, gib, bf16, half_out_fp32, fused=(), platform=None) -> DeviceProfile:
    backends = tuple((b, b == "math" or b in fused) for b in _BACKENDS)
    return DeviceProfile(name, kind, arch, description, gib * _GiB, gib * _GiB, bf16, half_out_fp32, backends, True,
                         platform)


# The AMD cards served on Windows: (preset suffix, product, arch, GiB).
_WINDOWS_CARDS = (
    ("rx6800", "Radeon RX 6800 / 6800 XT / 6900 XT (RDNA2", "gfx1030", 16),
    ("rx6700xt", "Radeon RX 6700 XT / 6750 XT (RDNA2", "gfx1031", 12),
    ("rx6600", "Radeon RX 6600 / 6600 XT / 6650 XT (RDNA2", "gfx1032", 8),
    ("rx5700xt", "Radeon RX 5700 XT (RDNA1", "gfx1010", 8),
)


def _windows_presets() -> Tuple[DeviceProfile, ...]:
    """ZLUDA and ROCm-on-Windows presets of :data:`_WINDOWS_CARDS`.

    ZLUDA: ComfyUI-Zluda installs torch 2.7 for CUDA 11.8 (the newest CUDA 11.8 build; ZLUDA translates CUDA 11),
    which has no ``bmm(out_dtype=float32)`` (torch 2.8 added it), and turns flash and memory-efficient SDPA off.
    ROCm on Windows: the gfx101x/gfx103x wheels are built without AOTriton (math SDPA only), torch >= 2.8.
    """
    out = []
    for key, product, arch, gib in _WINDOWS_CARDS:
        out.append(_preset(f"zluda-{key}", "zluda", arch, f"AMD {product}, {arch}, {gib} GiB) via ZLUDA on Windows",
                           gib, False, False, platform="win32"))
        out.append(_preset(f"winrocm-{key}", "rocm", arch, f"AMD {product}, {arch}, {gib} GiB) on ROCm for Windows",
                           gib, False, True, platform="win32"))
    return tuple(out)


PRESETS: Mapping[str, DeviceProfile] = {
    p.name: p
    for p in (
        # bf16 on these AMD archs: no bf16 matrix hardware, torch emulates it; flags are from AMD's ISA docs, not
        # measured by us. half_out_fp32: torch's bmm(out_dtype=float32) runs through hipBLASLt/rocBLAS there.
        _preset("gfx906", "rocm", "gfx906", "AMD Radeon Instinct MI50 / Radeon VII (Vega 20, 16 GiB)", 16, False, True,
                platform="linux"),
        _preset("gfx1030", "rocm", "gfx1030", "AMD Radeon RX 6800 / 6800 XT / 6900 XT (RDNA2, 16 GiB)", 16, False,
                True, platform="linux"),
        _preset("gfx1010", "rocm", "gfx1010", "AMD Radeon RX 5700 XT (RDNA1, 8 GiB)", 8, False, True,
                platform="linux"),
        *_windows_presets(),
        _preset("mps", "mps", None, "Apple silicon, 16 GiB unified memory (MPS)", 16, True, False, platform="darwin"),
        _preset("arc", "xpu", None, "Intel Arc A770 (16 GiB)", 16, True, False),
        _preset("cpu", "cpu", None, "CPU (a 32 GiB host)", 32, True, False),
    )
}
"""Named profiles of the GPUs noflash is for, for planning and for :func:`simulate_device`. None of them has a
fused SDPA kernel that runs (torch falls back to math SDPA there). ``zluda-*`` and ``winrocm-*`` are the AMD cards
on Windows, through ComfyUI-Zluda and through ROCm's Windows wheels."""


_ALIASES = {"rdna2": "gfx1030", "rdna1": "gfx1010", "mi50": "gfx906", "vega20": "gfx906", "a770": "arc",
            "zluda": "zluda-rx6800"}


def get_preset(name: str) -> DeviceProfile:
    """The preset called ``name`` (case-insensitive; ``rdna2``/``rdna1``/``mi50``/``a770``/``zluda`` are accepted
    too)."""
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


def _kind(device: torch.device, name: str) -> str:
    if device.type != "cuda":
        return device.type
    if _is_rocm():
        return "rocm"
    return "zluda" if is_zluda_name(name) else "cuda"


@functools.cache
def _real_profile(device_str: str) -> DeviceProfile:
    dev = torch.device(device_str)
    name = _name(dev)
    arch = _gpu_arch(dev, name)
    bf16 = _bf16_supported(dev)
    if arch is not None and arch.startswith(_ARCHS_WITHOUT_BF16):
        bf16 = False  # ZLUDA reports compute capability 8.8, which torch takes for native bf16
    total, free = memory_info(dev)
    return DeviceProfile(
        name=str(dev), kind=_kind(dev, name), arch=arch, description=name, total_bytes=total, free_bytes=free,
        bf16=bf16, half_out_fp32=_probe_half_out_fp32(dev), sdpa_backends=_probe_backends(dev), simulated=False,
        platform=sys.platform,
    )


_by_device: Dict[torch.device, DeviceProfile] = {}


def clear_profile_cache() -> None:
    """Forget the probed profiles of real devices, so the next :func:`device_profile` probes again (tests that
    simulate a device's torch functions, or a process that changed its devices)."""
    _real_profile.cache_clear()
    _by_device.clear()


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


def device_report(device: Union[None, str, torch.device, DeviceProfile] = None) -> dict:
    """Describe ``device`` (a device or its name, or a profile such as ``get_preset("gfx906")``; default: the
    current accelerator, else CPU), from its :class:`DeviceProfile`.

    Returns:
        A dict with ``device``, ``name``, ``vendor``, ``kind``, ``zluda``, ``platform``, ``arch``, ``total_bytes``,
        ``free_bytes``, ``bf16``, ``sdpa_backends`` (backend name -> runs), ``fused_sdpa`` (the fused backends
        that run and are allowed now), ``efficient_sdpa``, ``patch_would_activate`` and ``simulated``.
    """
    profile = device if isinstance(device, DeviceProfile) else device_profile(device)
    return {
        "device": profile.name,
        "name": profile.description,
        "vendor": profile.vendor,
        "kind": profile.kind,
        "zluda": profile.kind == "zluda",
        "platform": profile.platform,
        "arch": profile.arch,
        "total_bytes": profile.total_bytes,
        "free_bytes": profile.free_memory(),
        "bf16": profile.bf16,
        "sdpa_backends": dict(profile.sdpa_backends),
        "fused_sdpa": list(profile.fused_sdpa_backends()),
        "efficient_sdpa": profile.efficient_sdpa,
        "patch_would_activate": not profile.efficient_sdpa,
        "simulated": profile.simulated,
    }
