"""Decide whether to enable the global patch on this machine, and do it (used by ``noflash_core.auto`` and the
ComfyUI start-up).

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

from .device import device_profile
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


def decide_and_apply(device: Optional[object] = None, *, log_prefix: str = "noflash") -> AutoDecision:
    """Enable the global SDPA patch where ``device`` lacks an efficient SDPA backend (its
    :class:`~noflash_core.device.DeviceProfile` says so); log one line saying why."""
    profile = device_profile(device)
    dev = profile.name
    threshold = threshold_from_env()
    if env_flag("NOFLASH_DISABLE"):
        decision = AutoDecision(False, "NOFLASH_DISABLE is set", dev, threshold)
    elif env_flag("NOFLASH_FORCE_PATCH"):
        decision = AutoDecision(True, "NOFLASH_FORCE_PATCH is set", dev, threshold)
    elif profile.efficient_sdpa:
        decision = AutoDecision(False, f"torch has a fused SDPA kernel on {dev}", dev, threshold)
    else:
        where = f"{dev} ({profile.arch})" if profile.arch else dev
        decision = AutoDecision(True, f"no fused SDPA kernel on {where}", dev, threshold)
    if decision.enabled:
        enable(threshold)
    # NOFLASH_THRESHOLD is only worth a word when it is set: 0 (the default) routes every call the patch sees.
    keeps = f" (calls with under {threshold} key tokens keep torch's SDPA)" if decision.enabled and threshold else ""
    _log.info("%s: global SDPA patch %s: %s%s", log_prefix, "enabled" if decision.enabled else "not enabled",
              decision.reason, keeps)
    return decision
