"""One callable per attention implementation, each ``(q, k, v) -> out`` on ``(B, H, N, D)`` tensors."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Optional, Tuple

import torch
import torch.nn.functional as F

from ..device import device_profile
from ..sdpa import math_sdpa

__all__ = ["Implementation", "build_implementations", "torch_default_sdpa"]

logger = logging.getLogger(__name__)

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Implementation:
    """An implementation under test.

    Attributes:
        name: row key, e.g. ``"noflash-t2"``.
        fn: ``(q, k, v) -> out``, shapes ``(B, H, N, D)``.
        backward: whether it can run forward+backward.
        quadratic: whether its memory grows with N² with no regard to free memory (such cells are skipped
            above the memory cap).
        label: a longer description for the report.
    """

    name: str
    fn: AttentionFn
    backward: bool
    quadratic: bool
    label: str


def torch_default_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v)


def _noflash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, tier) -> torch.Tensor:
    from ..sdpa import scaled_dot_product_attention

    return scaled_dot_product_attention(q, k, v, tier=tier)


def _noflash_available() -> Optional[str]:
    """None when noflash's SDPA imports, else the reason."""
    try:
        from ..sdpa import scaled_dot_product_attention  # noqa: F401
    except ImportError as exc:
        return f"noflash_core.sdpa did not import: {exc}"
    return None


def build_implementations(
    names: Iterable[str],
    device: torch.device,
    comfy_path: Optional[str] = None,
) -> Tuple[Dict[str, Implementation], Dict[str, str]]:
    """Resolve implementation names to callables.

    Returns:
        ``(available, missing)``: name -> :class:`Implementation`, and name -> reason it cannot run here.
    """
    available: Dict[str, Implementation] = {}
    missing: Dict[str, str] = {}
    names = list(names)
    fused = device_profile(device).efficient_sdpa
    noflash_reason = _noflash_available() if any(n.startswith("noflash") for n in names) else None
    comfy_fns: Dict[str, AttentionFn] = {}
    comfy_reason: Optional[str] = None
    if any(n.startswith("comfy") for n in names):
        from .comfy import load_comfy_attention

        comfy_fns, comfy_reason = load_comfy_attention(device, comfy_path)

    for name in names:
        if name == "math":
            available[name] = Implementation(name, math_sdpa, True, True, "torch SDPA, math backend")
        elif name == "torch":
            label = "torch SDPA default (fused kernel)" if fused else "torch SDPA default (no fused kernel: math)"
            available[name] = Implementation(name, torch_default_sdpa, True, not fused, label)
        elif name.startswith("noflash-"):
            if noflash_reason:
                missing[name] = noflash_reason
                continue
            tier_text = name.split("-", 1)[1]
            tier = "auto" if tier_text == "auto" else int(tier_text.lstrip("t"))
            fn = functools.partial(_noflash, tier=tier)
            label = "noflash auto plan" if tier == "auto" else f"noflash tier {tier}"
            available[name] = Implementation(name, fn, tier != 3, False, label)
        elif name.startswith("comfy-"):
            fn = comfy_fns.get(name)
            if fn is None:
                missing[name] = comfy_reason or "ComfyUI attention not found"
                continue
            label = {"comfy-subquad": "ComfyUI attention_sub_quad", "comfy-split": "ComfyUI attention_split"}[name]
            # Not capped by the math estimate: both size their chunks from free memory themselves (split raises
            # "Not enough memory" when it cannot), so they never thrash; the time cap still applies.
            available[name] = Implementation(name, fn, True, False, label)
        else:
            missing[name] = "unknown implementation"
    return available, missing
