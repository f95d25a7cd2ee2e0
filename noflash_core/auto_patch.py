"""Decide whether to enable the global patch on this machine, and do it (used by ``noflash_core.auto`` and the
ComfyUI start-up).

The decision is the device's :class:`~noflash_core.device.DeviceProfile`'s: patch where no fused torch SDPA kernel
runs, where the arch is known to lack one, or where the process has turned the fused kernels off
(``torch.backends.cuda.enable_flash_sdp(False)`` and friends, read when deciding: ComfyUI-Zluda does this). Under
ZLUDA the log line names it, e.g. ``no fused SDPA kernel on cuda:0 (ZLUDA, gfx1030; this process turned off torch's
flash, efficient and cudnn SDPA)``.

Environment:
    NOFLASH_DISABLE: any non-empty value other than ``0``/``false`` keeps torch's SDPA untouched.
    NOFLASH_FORCE_PATCH: likewise, patches even where torch has a fused kernel.
    NOFLASH_THRESHOLD: minimum key length that takes the tiled path.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Optional

from .device import DeviceProfile, device_profile, sdp_flags
from .patch import enable, threshold_from_env

__all__ = ["AutoDecision", "decide_and_apply", "env_flag"]

_log = logging.getLogger("noflash_core")


@dataclass(frozen=True)
class AutoDecision:
    """What the auto-patch decided: ``enabled``, the ``reason``, the ``device`` looked at and the ``threshold``."""

    enabled: bool
    reason: str
    device: str
    threshold: int


def env_flag(name: str) -> bool:
    """True when the environment variable is set to something other than empty, ``0``, ``false``, ``no``, ``off``."""
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


def _where(profile: DeviceProfile, note: str = "") -> str:
    """``cuda:0 (ZLUDA, gfx1030; note)``: the device, ZLUDA, its arch where known, and a note."""
    details = ", ".join((["ZLUDA"] if profile.kind == "zluda" else []) + ([profile.arch] if profile.arch else []))
    details = "; ".join(part for part in (details, note) if part)
    return f"{profile.name} ({details})" if details else profile.name


def _turned_off(profile: DeviceProfile) -> str:
    """``"this process turned off torch's flash and efficient SDPA"`` on a real CUDA/ROCm/ZLUDA device, else ``""``."""
    if profile.simulated or profile.kind not in ("cuda", "rocm", "zluda"):
        return ""
    off = [name for name, on in sdp_flags().items() if name != "math" and not on]
    if not off:
        return ""
    names = off[0] if len(off) == 1 else f"{', '.join(off[:-1])} and {off[-1]}"
    return f"this process turned off torch's {names} SDPA"


def _decide(profile: DeviceProfile, threshold: int) -> AutoDecision:
    dev = profile.name
    if env_flag("NOFLASH_DISABLE"):
        return AutoDecision(False, "NOFLASH_DISABLE is set", dev, threshold)
    if env_flag("NOFLASH_FORCE_PATCH"):
        return AutoDecision(True, "NOFLASH_FORCE_PATCH is set", dev, threshold)
    if profile.efficient_sdpa:
        fused = ", ".join(profile.fused_sdpa_backends())
        return AutoDecision(False, f"torch has a fused SDPA kernel ({fused}) on {_where(profile)}", dev, threshold)
    return AutoDecision(True, f"no fused SDPA kernel on {_where(profile, _turned_off(profile))}", dev, threshold)


def decide_and_apply(device: Optional[object] = None, *, log_prefix: str = "noflash") -> AutoDecision:
    """Enable the global SDPA patch where ``device`` lacks an efficient SDPA backend (its
    :class:`~noflash_core.device.DeviceProfile` says so, with the process's SDP flags as they are now); log one
    line saying why."""
    decision = _decide(device_profile(device), threshold_from_env())
    if decision.enabled:
        enable(decision.threshold)
    # NOFLASH_THRESHOLD is only worth a word when it is set: 0 (the default) routes every call the patch sees.
    threshold = decision.threshold
    keeps = f" (calls with under {threshold} key tokens keep torch's SDPA)" if decision.enabled and threshold else ""
    _log.info("%s: global SDPA patch %s: %s%s", log_prefix, "enabled" if decision.enabled else "not enabled",
              decision.reason, keeps)
    return decision
