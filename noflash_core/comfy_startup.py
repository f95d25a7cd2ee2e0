"""What the ComfyUI pack does when ComfyUI loads it: the same auto-detection as ``import noflash_core.auto``.

On GPUs without an efficient SDPA backend the global patch of ``torch.nn.functional.scaled_dot_product_attention``
is enabled, so the direct SDPA calls in ComfyUI (text encoders on the pytorch path, VAE mid-block attention,
``comfy.ops.scaled_dot_product_attention``) are tiled too. ``NOFLASH_DISABLE=1`` and ``NOFLASH_FORCE_PATCH=1``
work as they do for ``noflash_core.auto``. The per-model Attention Patcher node is what reaches models that run
ComfyUI's sub-quadratic or split attention; the global patch does not.

:func:`run_startup` logs exactly one line: the pack version, the decision and why.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any, Callable, Optional

__all__ = ["run_startup", "startup_line", "pack_version"]

logger = logging.getLogger("noflash")


def pack_version() -> str:
    """The pack version: ``noflash_core.__version__``, else the ``pyproject.toml`` next to the package."""
    try:
        from . import __version__  # type: ignore[attr-defined]

        return str(__version__)
    except ImportError:
        pass
    pyproject = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "pyproject.toml")
    try:
        with open(pyproject, encoding="utf-8") as f:
            match = re.search(r'^version\s*=\s*"([^"]+)"', f.read(), re.MULTILINE)
    except OSError:
        match = None
    return match.group(1) if match else "unknown"


def _decision_fields(decision: Any) -> tuple:
    """``(patched, reason)`` from the lead's ``AutoDecision`` (tolerant of its exact field names)."""
    patched = None
    for name in ("patched", "enabled", "applied", "activate", "active"):
        if hasattr(decision, name):
            patched = bool(getattr(decision, name))
            break
    reason = None
    for name in ("reason", "why", "message"):
        if getattr(decision, name, None):
            reason = str(getattr(decision, name))
            break
    return patched, reason


def startup_line(decision: Any, version: Optional[str] = None) -> str:
    """The one start-up log line, e.g.
    ``noflash 0.1.0: global SDPA patch ON (NOFLASH_FORCE_PATCH=1); per-model: use the NoFlash Attention Patcher``.
    """
    version = pack_version() if version is None else version
    patched, reason = _decision_fields(decision)
    state = "ON" if patched else "off"
    return f"noflash {version}: global SDPA patch {state} ({reason or 'no reason given'})"


def run_startup(device: Any = None, decide: Optional[Callable[..., Any]] = None) -> Any:
    """Run the auto-detection once for ``device`` and log one line; returns the decision (None if it failed).

    Args:
        device: the device ComfyUI computes on (``comfy.model_management.get_torch_device()``); None lets the
            detection pick the default accelerator.
        decide: the detection to run; defaults to :func:`noflash_core.auto_patch.decide_and_apply`.

    A failure is logged as one warning and never raised: a broken detection must not stop ComfyUI loading the nodes.
    """
    try:
        if decide is None:
            from .auto_patch import decide_and_apply as decide
        decision = decide(device=device)
    except Exception as exc:  # noqa: BLE001 - start-up must not break ComfyUI's node loading
        logger.warning(
            "noflash %s: start-up detection failed, global SDPA patch off (%s: %s)",
            pack_version(), type(exc).__name__, exc,
        )
        return None
    logger.info(startup_line(decision))
    return decision
