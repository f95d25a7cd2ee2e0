"""ComfyUI's own attention implementations, imported from a ComfyUI checkout when one is available.

Only the benchmark uses this; the library never imports ComfyUI. ComfyUI reads its CLI arguments at import, so
``comfy.cli_args.args.cpu`` is set before ``comfy.model_management`` loads when the benchmark runs on CPU.
ComfyUI imports ``torchvision`` at module level without using it on these paths; when torchvision is not
installed, empty stand-in modules are registered for the import to succeed.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import sys
import types
from typing import Callable, Dict, Optional, Tuple

import torch

__all__ = ["comfy_version", "load_comfy_attention"]

logger = logging.getLogger(__name__)

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _stub_torchvision() -> None:
    """Register empty ``torchvision`` and ``torchvision.transforms`` modules if torchvision is missing."""
    if "torchvision" in sys.modules or importlib.util.find_spec("torchvision") is not None:
        return
    logger.debug("torchvision is not installed: registering an import-only stand-in for ComfyUI")
    tv = types.ModuleType("torchvision")
    tv.__path__ = []  # a package, so submodule imports resolve from sys.modules
    transforms = types.ModuleType("torchvision.transforms")
    tv.transforms = transforms
    sys.modules["torchvision"] = tv
    sys.modules["torchvision.transforms"] = transforms


def _wrap(fn: Callable) -> AttentionFn:
    """Adapt a ComfyUI ``attention_*(q, k, v, heads, ...)`` to ``(q, k, v) -> out`` on ``(B, H, N, D)``."""

    def call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return fn(q, k, v, q.shape[1], skip_reshape=True, skip_output_reshape=True)

    call.__name__ = getattr(fn, "__name__", "comfy_attention")
    return call


def load_comfy_attention(
    device: torch.device, comfy_path: Optional[str] = None
) -> Tuple[Dict[str, AttentionFn], Optional[str]]:
    """Import ComfyUI's ``attention_sub_quad`` and ``attention_split``.

    Args:
        device: the benchmark device; on CPU ComfyUI is told ``--cpu`` before it probes devices.
        comfy_path: a ComfyUI checkout to put first on ``sys.path`` (None: use ``comfy`` only if importable).

    Returns:
        ``({"comfy-subquad": fn, "comfy-split": fn}, None)``, or ``({}, reason)`` when ComfyUI is unavailable.
    """
    if comfy_path:
        if comfy_path not in sys.path:
            sys.path.insert(0, comfy_path)
    if importlib.util.find_spec("comfy") is None:
        return {}, "ComfyUI is not importable (pass --comfy PATH to a checkout)"
    try:
        _stub_torchvision()
        with contextlib.redirect_stdout(sys.stderr):  # ComfyUI prints its device report at import
            cli_args = importlib.import_module("comfy.cli_args")
            if device.type == "cpu":
                cli_args.args.cpu = True
            attention = importlib.import_module("comfy.ldm.modules.attention")
    except Exception as exc:  # noqa: BLE001 - any import failure just means "not available"
        logger.warning("ComfyUI import failed: %s", exc)
        return {}, f"ComfyUI import failed: {type(exc).__name__}: {exc}"
    fns = {
        "comfy-subquad": _wrap(attention.attention_sub_quad),
        "comfy-split": _wrap(attention.attention_split),
    }
    logger.info("ComfyUI %s attention loaded from %s", comfy_version(), attention.__file__)
    return fns, None


def comfy_version() -> Optional[str]:
    """The version of the imported ComfyUI, or None when it is not loaded."""
    if "comfy" not in sys.modules:
        return None
    try:
        return str(importlib.import_module("comfyui_version").__version__)
    except (ImportError, AttributeError):
        return "unknown"
