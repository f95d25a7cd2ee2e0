"""VRAM Probe: will a run of this size fit on the chosen card? One verdict, a bar chart, and the full text on demand.

The estimate is ``noflash_core.vram.estimate_run``, the same call ``python -m noflash_core.video`` makes.
It goes to the browser as data, ``ui["noflash_estimate"]``, which ``web/noflash.js`` draws as bars against the
card's VRAM and keeps in the node's properties (so the last estimate survives a page reload).
"""

from __future__ import annotations

import logging
from typing import Optional, Tuple, Union

import torch
from comfy_api.latest import io

from ..noflash_core.comfy.estimate import TEXT_ENCODER_CHOICES, encoders_from_clip, probe_text
from ..noflash_core.comfy.families import family_for_comfy_model
from ..noflash_core.comfy.probe import run_of_workflow
from ..noflash_core.comfy.telemetry import default_history
from ..noflash_core.device import device_report, get_preset
from ..noflash_core.units import dtype_name
from ..noflash_core.video.families import family_names
from ..noflash_core.vram import THIS_MACHINE, device_choices, device_key, estimate_run
from ._glue import run_context
from ._schema import node_schema

__all__ = ["NOTHING_TO_ESTIMATE", "NoFlashVRAMProbe"]

logger = logging.getLogger(__name__)

_AUTO = "from model"
_GIB = 1 << 30

NOTHING_TO_ESTIMATE = (
    "Nothing to estimate yet: connect a MODEL or pick a family. The family alone is enough: plan before "
    "downloading anything (no model connected), then queue just this node."
)
"""The probe's text when neither a MODEL nor a family is given."""


def _weights_format(module) -> str:
    """``"fp8"``, ``"fp32"`` or ``"fp16"``: the storage format of most of a module's parameters."""
    by_dtype = {}
    for p in module.parameters():
        by_dtype[p.dtype] = by_dtype.get(p.dtype, 0) + p.numel()
    if not by_dtype:
        return "fp16"
    name = str(max(by_dtype, key=by_dtype.get))
    return "fp8" if "float8" in name else ("fp32" if "float32" in name else "fp16")


def _family_and_dtype(model, family: str) -> Tuple[Optional[str], str, str]:
    """``(family key or None, dtype key, note)`` from the family input and the connected model."""
    dtype = "fp16"
    detected = None
    if model is not None:
        compute = getattr(model.model, "manual_cast_dtype", None)  # fp8 files compute in fp16/bf16
        name = dtype_name(compute if compute is not None else model.model_dtype())
        dtype = name if name in ("fp16", "bf16", "fp32") else "fp16"
        config = getattr(getattr(model.model, "model_config", None), "unet_config", None) or {}
        detected = family_for_comfy_model(type(model.model).__name__, config)
    if family != _AUTO:
        return family, dtype, ""
    if model is None:
        return None, dtype, NOTHING_TO_ESTIMATE
    if detected is None:
        return None, dtype, (f"Estimate: no shape table for {type(model.model).__name__}; "
                             "pick the closest family.")
    return detected, dtype, ""


def _comfy_device(model) -> Optional[torch.device]:
    if model is not None:
        return model.load_device
    try:
        import comfy.model_management

        return comfy.model_management.get_torch_device()
    except Exception:  # noqa: BLE001 - outside a ComfyUI process: the default device
        return None


def _text_encoders(choice: str, clip) -> str:
    """The estimator's ``text_encoders`` argument: a connected CLIP's encoders for ``auto``, else the choice."""
    if choice == "auto" and clip is not None:
        found = encoders_from_clip(clip.cond_stage_model)
        if found:
            return "+".join(found)
    return choice


class NoFlashVRAMProbe(io.ComfyNode):
    """Will a run of this size fit on your card? Shows one bar per component (weights,
    activations, attention with ComfyUI's own path and with noflash, FFN, text encoder, VAE decode)
    against the card's VRAM and a one-line verdict, for this machine or a GPU profile. The full report
    (and the last patched run) is one click away."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return node_schema(
            cls,
            "NoFlash VRAM Probe",
            [
                io.Int.Input("width", default=1280, min=16, max=16384, step=16,
                             tooltip="Output width in pixels, as set on the workflow's empty-latent node."),
                io.Int.Input("height", default=704, min=16, max=16384, step=16,
                             tooltip="Output height in pixels, as set on the workflow's empty-latent node."),
                io.Int.Input("frames", default=121, min=1, max=4096,
                             tooltip="Video frames (1 for image models)."),
                io.Int.Input("batch", default=1, min=1, max=64,
                             tooltip="Batch size of the latent. Leave it at 1: ComfyUI runs the CFG halves "
                             "one after the other when memory is short."),
                io.Combo.Input("family", options=[_AUTO, *family_names()], default=_AUTO,
                               tooltip="The model to plan for. Pick one to get the estimate with nothing "
                               "connected (plan before downloading: queue just this node). 'from model' reads "
                               "the connected MODEL."),
                io.Combo.Input("device", options=device_choices(), default=THIS_MACHINE,
                               tooltip="The card to plan for: this machine, or a GPU profile by its card name "
                               "(planned on meta tensors, so the card need not be in this box)."),
                io.Int.Input("vram_gb", default=0, min=0, max=1024,
                             tooltip="Card memory in GiB. 0 = the device's own (or the profile's): leave it, "
                             "unless your card has a different amount."),
                io.Combo.Input("text_encoder", options=list(TEXT_ENCODER_CHOICES), default="auto",
                               tooltip="Text encoders for the text-encoder row. 'auto' = a connected CLIP's, "
                               "else the model family's: leave it."),
                io.Int.Input("prompt_tokens", default=256, min=1, max=1 << 16,
                             tooltip="Prompt length in tokens (before the encoder's padding and template); "
                             "256 covers a long prompt. Raise it only for very long prompts."),
                io.Model.Input("model", optional=True,
                               tooltip="Optional: the loaded model (gives its dtype, and its family when family "
                               "is 'from model'). Leave it unconnected to plan from the family alone."),
                io.Clip.Input("clip", optional=True,
                              tooltip="Optional: the loaded text encoder (its encoders and weight format for the "
                              "text-encoder row when text_encoder is 'auto')."),
            ],
            [io.String.Output(display_name="report",
                              tooltip="The probe's full text (this machine, the estimate, the last patched run), "
                              "e.g. for a Preview Any or Save Text node.")],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, device: str = THIS_MACHINE) -> Union[bool, str]:
        """Take a device label of the list, or a bare preset name as saved by earlier versions (``"gfx1030"``)."""
        key = device_key(device)
        if key == THIS_MACHINE:
            return True
        try:
            get_preset(key)
        except ValueError as exc:
            return f"device: {exc}"
        return True

    @classmethod
    def fingerprint_inputs(cls, **kwargs) -> str:
        # Re-run whenever a patched run finished since the last probe, and in another workflow (another prompt when
        # the workflow is unknown), so "last run" is always this workflow's newest. ComfyUI calls this inside the
        # prompt's executing context.
        origin = run_context()
        return f"{default_history().finished}|{origin.get('workflow_id') or origin.get('prompt_id') or ''}"

    @classmethod
    def execute(cls, width: int, height: int, frames: int, batch: int, family: str, device: str = THIS_MACHINE,
                vram_gb: int = 0, text_encoder: str = "auto", prompt_tokens: int = 256, model=None,
                clip=None) -> io.NodeOutput:
        here = _comfy_device(model)
        report = device_report(here)
        key, dtype, note = _family_and_dtype(model, family)
        chart = None
        estimate = None
        if key is not None:
            try:
                fp8 = model is not None and "float8" in str(model.model_dtype())
                est = estimate_run(
                    key, width, height, frames=frames, batch=batch, dtype=dtype,
                    vram_bytes=vram_gb * _GIB if vram_gb > 0 else None,
                    device=here if device_key(device) == THIS_MACHINE and here is not None else device,
                    text_encoders=_text_encoders(text_encoder, clip), prompt_tokens=prompt_tokens,
                    weights="fp8" if fp8 else None,
                    text_encoder_weights=_weights_format(clip.cond_stage_model) if clip is not None else "fp16",
                )
                estimate = est.to_text()
                chart = est.to_chart()
            except (ImportError, ValueError) as exc:
                note = f"Estimate unavailable: {exc}"
        last_run = run_of_workflow(default_history().runs(), run_context())
        text = probe_text(report, estimate, last_run, note)
        ui = {"text": [text]}
        if chart is not None:
            chart["text"] = text
            ui["noflash_estimate"] = [chart]
        else:
            ui["noflash_estimate"] = [{"version": 1, "verdict": None, "verdict_text": note, "components": [],
                                       "vram_bytes": None, "text": text}]
        return io.NodeOutput(text, ui=ui)
