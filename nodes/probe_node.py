"""VRAM Probe: what the device has, what a run of the given size needs, and what the last run used."""

from __future__ import annotations

import logging
from typing import Optional, Tuple

import torch
from comfy_api.latest import io

from ..noflash_core.comfy.families import family_for_comfy_model
from ..noflash_core.comfy.probe import probe_text
from ..noflash_core.comfy.telemetry import default_history
from ..noflash_core.device import device_report
from ..noflash_core.units import dtype_name
from ..noflash_core.video.families import family_names

__all__ = ["NoFlashVRAMProbe"]

logger = logging.getLogger(__name__)

_AUTO = "from model"


def _family_and_dtype(model, family: str) -> Tuple[Optional[str], str, str]:
    """``(family key or None, dtype key, note)`` from the family input and the connected model."""
    dtype = "fp16"
    detected = None
    if model is not None:
        dtype = dtype_name(model.model_dtype())
        config = getattr(getattr(model.model, "model_config", None), "unet_config", None) or {}
        detected = family_for_comfy_model(type(model.model).__name__, config)
    if family != _AUTO:
        return family, dtype, ""
    if model is None:
        return None, dtype, "Estimate: connect a MODEL or pick a family to get the attention estimate."
    if detected is None:
        return None, dtype, (f"Estimate: no shape table for {type(model.model).__name__}; "
                             "pick the closest family.")
    return detected, dtype, ""


class NoFlashVRAMProbe(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NoFlashVRAMProbe",
            display_name="NoFlash VRAM Probe",
            category="advanced/noflash",
            description="Reports the device, free VRAM, whether a fused SDPA kernel exists, the attention memory "
            "of a run of this size (math SDPA vs noflash's plan) and the last patched run's tiers and peak.",
            inputs=[
                io.Int.Input("width", default=1280, min=16, max=16384, step=16, tooltip="Output width in pixels."),
                io.Int.Input("height", default=704, min=16, max=16384, step=16, tooltip="Output height in pixels."),
                io.Int.Input("frames", default=121, min=1, max=4096,
                             tooltip="Video frames (1 for image models)."),
                io.Int.Input("batch", default=1, min=1, max=64, tooltip="Batch size (CFG doubles it in practice)."),
                io.Combo.Input("family", options=[_AUTO, *family_names()], default=_AUTO,
                               tooltip="Model family for the estimate; 'from model' reads the connected MODEL."),
                io.Model.Input("model", optional=True,
                               tooltip="Optional: the model to estimate for (its family and dtype)."),
            ],
            outputs=[io.String.Output(display_name="report")],
            is_output_node=True,
        )

    @classmethod
    def fingerprint_inputs(cls, **kwargs) -> int:
        # Re-run whenever a patched run finished since the last probe, so "last run" stays current.
        return default_history().finished

    @classmethod
    def execute(cls, width: int, height: int, frames: int, batch: int, family: str, model=None) -> io.NodeOutput:
        device = model.load_device if model is not None else None
        report = device_report(device)
        key, dtype, note = _family_and_dtype(model, family)
        estimate = None
        if key is not None:
            try:
                from ..noflash_core.video.estimator import estimate_run

                estimate = estimate_run(key, width, height, frames=frames, batch=batch, dtype=dtype,
                                        vram_bytes=report.get("total_bytes"),
                                        device=torch.device(report["device"]).type).to_text()
            except (ImportError, ValueError) as exc:
                note = f"Estimate unavailable: {exc}"
        text = probe_text(report, estimate, default_history().latest(), note)
        return io.NodeOutput(text, ui={"text": [text]})
