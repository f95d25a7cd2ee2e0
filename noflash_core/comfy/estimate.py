"""The VRAM Probe's estimate inside ComfyUI: which text encoders a connected CLIP holds, and the probe's text.

The estimate itself is :func:`noflash_core.vram.estimate_run`, the same call the CLI makes, so the node
and ``python -m noflash_core.video`` give the same numbers for the same inputs. Nothing here imports ComfyUI.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Tuple

from ..units import format_bytes
from . import probe
from .probe import format_device

__all__ = ["ENCODER_ATTRIBUTES", "TEXT_ENCODER_CHOICES", "encoders_from_clip", "probe_text"]

ENCODER_ATTRIBUTES = {
    "clip_l": "clip-l",
    "clip_g": "clip-g",
    "t5xxl": "t5-xxl",
    "umt5xxl": "umt5-xxl",
    "qwen25_7b": "qwen2.5-vl-7b",
    "llama": "llama-3-8b",
    "gemma2_2b": "gemma-2-2b",
    "gemma3_12b": "gemma-3-12b",
    "qwen3_4b": "qwen3-4b",
    "qwen3_8b": "qwen3-8b",
    "qwen3vl_4b": "qwen3-vl-4b",
    "qwen3vl_8b": "qwen3-vl-8b",
    "qwen3vl_32b": "qwen3-vl-32b",
    "mistral3_24b": "mistral-small-24b",
}
"""The attribute under which ComfyUI's text-encoder models (``cond_stage_model``) keep each encoder, and its key in
:data:`noflash_core.video.encoders.TEXT_ENCODERS`."""

TEXT_ENCODER_CHOICES = (
    "auto",
    "none",
    "clip-l",
    "clip-l+clip-g",
    "clip-l+t5-xxl",
    "t5-xxl",
    "umt5-xxl",
    "qwen2.5-vl-7b",
    "llama-3-8b+clip-l",
    "gemma-2-2b",
    "gemma-3-12b",
    "qwen3-4b",
    "qwen3-8b",
    "qwen3-vl-4b",
    "qwen3-vl-8b",
    "qwen3-vl-32b",
    "mistral-small-24b",
    "qwen2.5-vl-7b+clip-l",
)
"""The probe's ``text_encoder`` combo: ``auto`` reads a connected CLIP, else the model family's encoders."""


def encoders_from_clip(cond_stage_model: Any) -> Tuple[str, ...]:
    """The encoder keys of a ComfyUI text-encoder model (``clip.cond_stage_model``), in ComfyUI's order.

    Returns ``()`` for a model whose encoders the table does not know.
    """
    found = []
    for attr, key in ENCODER_ATTRIBUTES.items():
        if getattr(cond_stage_model, attr, None) is not None:
            found.append(key)
    return tuple(found)


def _memory_lines(report: Mapping[str, Any]) -> list:
    """Device lines; on a CPU the memory line says it is system RAM, not VRAM."""
    lines = format_device(report)
    if str(report.get("device", "")).startswith("cpu"):
        lines[1] = (f"Memory: system RAM, {format_bytes(report.get('free_bytes'))} free of "
                    f"{format_bytes(report.get('total_bytes'))} (this machine has no GPU)")
    return lines


def probe_text(report: Mapping[str, Any], estimate: Optional[str], last_run: Optional[Mapping[str, Any]],
               note: str = "") -> str:
    """The probe's full text: this machine's device, the estimate (or ``note``), the last patched run."""
    device = ["This machine:"] + ["  " + line for line in _memory_lines(report)]
    return probe.probe_text(report, estimate, last_run, note, device_lines=device)
