"""Moved to :mod:`noflash_core.vram` (the estimator covers image models too); this module re-exports its public names
so that ``from noflash_core.video.estimator import estimate_run`` keeps working."""

from ..vram import (
    MATH_PRECISION,
    THIS_MACHINE,
    AttentionEstimate,
    DenoiseEstimate,
    FFNEstimate,
    Phase,
    RunEstimate,
    TargetDevice,
    TextEncoderEstimate,
    VAEEstimate,
    device_choices,
    device_key,
    device_label,
    estimate_run,
    resolve_target,
)

__all__ = [
    "MATH_PRECISION",
    "THIS_MACHINE",
    "AttentionEstimate",
    "DenoiseEstimate",
    "FFNEstimate",
    "Phase",
    "RunEstimate",
    "TargetDevice",
    "TextEncoderEstimate",
    "VAEEstimate",
    "device_choices",
    "device_key",
    "device_label",
    "estimate_run",
    "resolve_target",
]
