"""The one estimator behind ``python -m noflash_core.video`` and the ComfyUI VRAM Probe: :func:`estimate_run`.

It takes a model family (:mod:`noflash_core.video.families`), a size, a target device (:mod:`.target`) and
optionally the text encoders and the prompt length, and predicts three phases, each of which has to fit on its own
(ComfyUI loads the models of one phase and offloads the others when memory is short): denoise (:mod:`.denoise`),
text encoder (:mod:`.text_encoder`) and VAE decode (:mod:`.vae`); then the verdict (:mod:`.verdict`). Totals
include the weights.

The estimate runs with torch's fp16/bf16 reductions in math SDPA on (ComfyUI's setting,
:func:`~noflash_core.vram.comfy_attention.math_reductions`), and outside inference mode with grad off
(:func:`~noflash_core.memory.fake_peak.plain_grad_mode`; ComfyUI runs nodes under ``torch.inference_mode()``), so the
same inputs give the same numbers in a plain process and inside ComfyUI.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch

from ..device import DeviceProfile, simulate_device
from ..memory.fake_peak import plain_grad_mode
from ..units import dtype_name, parse_dtype
from ..video.encoders import TextEncoderSpec, VAESpec, get_encoder, get_vae, parse_encoders
from ..video.families import ModelFamily, get_family
from .comfy_attention import math_reductions
from .denoise import estimate_denoise
from .results import RunEstimate, TargetDevice
from .target import THIS_MACHINE, resolve_target
from .text_encoder import estimate_text_encoders
from .vae import estimate_vae
from .verdict import verdict

__all__ = ["estimate_run", "parse_dtype_name"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_DTYPE_ALIASES = {"float16": "fp16", "half": "fp16", "bfloat16": "bf16", "float32": "fp32", "float": "fp32"}
_WEIGHT_BYTES = {"fp8": 1, "fp16": 2, "bf16": 2, "fp32": 4}

EncodersArg = Union[None, str, Sequence[Union[str, TextEncoderSpec]]]


def parse_dtype_name(dtype: Union[str, torch.dtype]) -> Tuple[str, torch.dtype]:
    """``("fp16", torch.float16)`` for ``"fp16"``, ``"float16"``, ``"torch.float16"``, ...

    Raises:
        ValueError: not fp16, bf16 or fp32.
    """
    torch_dtype = parse_dtype(dtype, allowed=_DTYPES)
    return dtype_name(torch_dtype), torch_dtype


def _weight_format(name: str, what: str) -> Tuple[str, int]:
    """``(format, bytes per weight)`` of a weight-format name (any fp8 variant is ``"fp8"``)."""
    key = str(name).strip().lower().replace("torch.", "")
    key = _DTYPE_ALIASES.get(key, key)
    if key.startswith(("fp8", "float8")):
        key = "fp8"
    if key not in _WEIGHT_BYTES:
        raise ValueError(f"unknown {what} format {name!r}; use fp8, fp16, bf16 or fp32")
    return key, _WEIGHT_BYTES[key]


def _encoder_specs(fam: ModelFamily, text_encoders: EncodersArg) -> List[TextEncoderSpec]:
    if text_encoders is None or (isinstance(text_encoders, str) and text_encoders.strip().lower() == "auto"):
        return [get_encoder(k) for k in fam.text_encoders]
    if isinstance(text_encoders, str):
        return [get_encoder(k) for k in parse_encoders(text_encoders)]
    return [e if isinstance(e, TextEncoderSpec) else get_encoder(e) for e in text_encoders]


def _vae_spec(fam: ModelFamily, vae: Union[None, str, VAESpec]) -> Optional[VAESpec]:
    if vae is None or vae == "none":
        return None
    if vae == "auto":
        return get_vae(fam.vae)
    return vae if isinstance(vae, VAESpec) else get_vae(vae)


def estimate_run(
    model: str,
    width: int,
    height: int,
    frames: int = 1,
    batch: int = 1,
    dtype: str = "fp16",
    vram_bytes: Optional[int] = None,
    *,
    device: Union[None, str, torch.device, DeviceProfile] = THIS_MACHINE,
    text_encoders: EncodersArg = "auto",
    prompt_tokens: int = 256,
    vae: Union[None, str, VAESpec] = "auto",
    weights: Optional[str] = None,
    text_encoder_weights: str = "fp16",
) -> RunEstimate:
    """Predict the memory of one run on ``device`` and whether it fits.

    Args:
        model: a key of :data:`~noflash_core.video.families.MODEL_FAMILIES`, e.g. ``"wan2.2-5b"``.
        width, height: output pixels.
        frames: output frames (1 for image models).
        batch: batch of the transformer call (2 when CFG runs cond and uncond together).
        dtype: ``"fp16"``, ``"bf16"`` or ``"fp32"``: the diffusion model's activations and weights.
        vram_bytes: overrides the device's memory (a preset's, or this machine's total).
        device: a preset (``"gfx906"``, ``"gfx1030"``, ...) or its label, ``"this machine"``, a ``torch.device``
            or a ``DeviceProfile`` (:func:`~noflash_core.vram.target.resolve_target`).
        text_encoders: ``"auto"`` (the family's), ``"none"``, ``"clip-l+t5-xxl"`` style keys, or specs.
        prompt_tokens: prompt length in tokens before the encoder's padding and template.
        vae: ``"auto"`` (the family's), ``"none"``, a key of :data:`~noflash_core.video.encoders.VAES` or a spec.
        weights: the diffusion model's weight format when it differs from ``dtype`` (``"fp8"`` for fp8 files).
        text_encoder_weights: the text encoders' weight format (``"fp16"``; ``"fp8"`` for fp8-scaled files).
            ComfyUI computes text encoders in fp32 either way.

    Raises:
        ValueError: unknown model, device, encoder, VAE or dtype, or a size that makes no latent.
    """
    fam = get_family(model)
    name, torch_dtype = parse_dtype_name(dtype)
    if batch <= 0:
        raise ValueError(f"batch must be positive, got {batch}")
    target, profile = resolve_target(device, vram_bytes)
    formats = (_weight_format(weights or name, "weights"), _weight_format(text_encoder_weights, "text_encoder_weights"))
    encoders, vae_spec = _encoder_specs(fam, text_encoders), _vae_spec(fam, vae)
    run = _Run(fam, (width, height, frames), batch, name, torch_dtype, target, profile, max(1, int(prompt_tokens)),
               formats)
    with math_reductions(True), simulate_device(profile), plain_grad_mode():
        return run.estimate(encoders, vae_spec)


class _Run:
    """The parsed arguments of one :func:`estimate_run` call; :meth:`estimate` runs the phases."""

    def __init__(self, fam: ModelFamily, size: Tuple[int, int, int], batch: int, dtype_name: str,
                 dtype: torch.dtype, target: TargetDevice, profile: DeviceProfile, prompt_tokens: int,
                 formats: Tuple[Tuple[str, int], Tuple[str, int]]) -> None:
        self.fam, self.size, self.batch, self.dtype_name, self.dtype = fam, size, batch, dtype_name, dtype
        self.target, self.profile, self.prompt_tokens, self.formats = target, profile, prompt_tokens, formats

    def estimate(self, encoders: List[TextEncoderSpec], vae_spec: Optional[VAESpec]) -> RunEstimate:
        fam, target, vram = self.fam, self.target, self.target.vram_bytes
        denoise, phase, notes = estimate_denoise(fam, self.size, self.batch, self.dtype, self.formats[0],
                                                 target.paths, vram)
        phases, notes = [phase], [target.note, *notes]
        te_rows: tuple = ()
        if encoders:
            te_rows, phase, more = estimate_text_encoders(encoders, self.prompt_tokens, self.formats[1][1],
                                                          target.paths, vram)
            phases.append(phase)
            notes.extend(more)
        vae_row = None
        if vae_spec is not None:
            vae_row, phase, more = estimate_vae(vae_spec, fam, denoise.latent_shape, self.size, self.batch,
                                                self.profile, target.paths, vram)
            phases.append(phase)
            notes.extend(more)
        word, line, advice = verdict(phases, vram, target)
        width, height, frames = self.size
        return RunEstimate(
            model=fam.name, display=fam.display, width=width, height=height, frames=frames, batch=self.batch,
            dtype=self.dtype_name, device=target, vram_bytes=vram, denoise=denoise,
            text_encoder_weights=self.formats[1][0], prompt_tokens=self.prompt_tokens, text_encoders=te_rows,
            vae=vae_row, phases=tuple(phases), verdict=word, verdict_text=line, advice=advice, notes=tuple(notes),
        )
