"""What the ComfyUI pack does when ComfyUI loads it: the same auto-detection as ``import noflash_core.auto``.

On GPUs without an efficient SDPA backend the global patch of ``torch.nn.functional.scaled_dot_product_attention``
is enabled, so the direct SDPA calls in ComfyUI (text encoders on the pytorch path, VAE attention,
``comfy.ops.scaled_dot_product_attention``) are tiled too. ``NOFLASH_DISABLE=1`` and ``NOFLASH_FORCE_PATCH=1``
work as they do for ``noflash_core.auto``. The per-model Attention Patcher node is what reaches models that
run ComfyUI's sub-quadratic or split attention; the global patch does not.

:func:`run_startup` logs exactly one line with the pack version, the decision and why, for example
``noflash 0.1.0: global SDPA patch enabled: no fused SDPA kernel on cuda:0 (gfx1030)``; with ``NOFLASH_THRESHOLD``
set it adds what that does: ``(calls with under 1024 key tokens keep torch's SDPA)``.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any, Callable, Optional

__all__ = ["pack_version", "run_startup"]

logger = logging.getLogger("noflash_core")


def pack_version() -> str:
    """The pack version: ``noflash_core.__version__``, else the ``pyproject.toml`` next to the package."""
    try:
        from .. import __version__

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


def run_startup(device: Any = None, decide: Optional[Callable[..., Any]] = None) -> Any:
    """Run the auto-detection once for ``device``; it logs the one line. Returns the decision, None on failure.

    Args:
        device: the device ComfyUI computes on (``comfy.model_management.get_torch_device()``); None lets the
            detection pick the default accelerator.
        decide: the detection; defaults to :func:`noflash_core.auto_patch.decide_and_apply`, which takes
            ``device`` and ``log_prefix`` and logs ``"<prefix>: global SDPA patch ...: <why>"``.

    A failure is logged as one warning and never raised: a broken detection must not stop ComfyUI loading the
    nodes.
    """
    prefix = f"noflash {pack_version()}"
    try:
        if decide is None:
            from ..auto_patch import decide_and_apply as decide
        return decide(device=device, log_prefix=prefix)
    except Exception as exc:  # noqa: BLE001 - start-up must not break ComfyUI's node loading
        logger.warning("%s: start-up detection failed, global SDPA patch not enabled (%s: %s)",
                       prefix, type(exc).__name__, exc)
        return None
