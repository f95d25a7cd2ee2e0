"""The text-encoder phase: every encoder of the workflow at the prompt's token count (their weights load
together), fp32 activations as in ComfyUI; ComfyUI's ``attention_basic`` (or SDPA) against noflash's plan."""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from ..memory.fake_peak import AttentionShape
from ..units import format_bytes
from ..video.encoders import TextEncoderSpec
from .calls import attention_budget, math_peak, noflash_call
from .comfy_attention import ComfyPaths, basic_bytes, fused_sdpa_bytes
from .denoise import fits
from .results import Phase, TextEncoderEstimate

__all__ = ["estimate_text_encoders"]

_TE_ELT = 4  # ComfyUI runs text encoders in fp32 (SDClipModel passes dtype=float32), weights stay fp16


def _comfy_attention(spec: TextEncoderSpec, shape: AttentionShape, path: str) -> int:
    """One attention call of the encoder through ComfyUI (its output's merged-heads copy included)."""
    b, h, length, d = shape.batch, shape.heads, shape.q_len, shape.head_dim
    if path == "basic":
        return basic_bytes(b, h, length, length, d, d, _TE_ELT, skip_reshape=spec.skip_reshape,
                           mask_copy=b > 1 and spec.mask == "bias", upcast=False)
    call = math_peak(shape, torch.float32) if path == "sdpa_math" else fused_sdpa_bytes(b, h, length, d, _TE_ELT)
    return call + b * length * h * d * _TE_ELT


def _estimate_one(spec: TextEncoderSpec, prompt_tokens: int, paths: ComfyPaths, vram: Optional[int],
                  resident: int, weight_elt: int) -> TextEncoderEstimate:
    """One encoder's attention call and working set with ``resident`` bytes (all encoders' weights) loaded."""
    batch, length = spec.tokens(prompt_tokens)
    h, d, elt = spec.heads, spec.head_dim, _TE_ELT
    shape = AttentionShape(batch, h, length, length, d)
    held = batch * length * (2 * spec.width + 3 * h * d) * elt  # x, its norm, q, k, v (k, v repeated to all heads)
    mask = (h if spec.mask == "bias" else 1) * length * length * elt if spec.mask != "none" else 0
    plan, _, noflash = noflash_call(shape, torch.float32, attention_budget(vram, resident + held + mask),
                                    out_copy=True)
    comfy = _comfy_attention(spec, shape, paths.text)
    mlp = batch * length * (2 * spec.width + spec.ffn_dim * (3 if spec.gated else 2)) * elt
    return TextEncoderEstimate(
        name=spec.name, display=spec.display, batch=batch, tokens=length, heads=h, head_dim=d,
        weights_bytes=int(spec.params * weight_elt), comfy_path=paths.text, comfy_attention_bytes=comfy,
        noflash_attention_bytes=noflash, tier=plan.tier,
        working_comfy_bytes=mask + max(held + comfy, mlp), working_noflash_bytes=mask + max(held + noflash, mlp),
    )


def estimate_text_encoders(encoders: Sequence[TextEncoderSpec], prompt_tokens: int, weight_elt: int,
                           paths: ComfyPaths, vram: Optional[int]
                           ) -> Tuple[Tuple[TextEncoderEstimate, ...], Phase, List[str]]:
    """``(rows, phase, notes)`` for the workflow's text encoders (at least one), ``weight_elt`` bytes per weight.

    When the weights do not fit next to the working set, ComfyUI loads the encoder partially and streams the rest
    (low-VRAM mode): one layer's share is counted.
    """
    te_weights = sum(int(e.params * weight_elt) for e in encoders)
    rows = tuple(_estimate_one(e, prompt_tokens, paths, vram, te_weights, weight_elt) for e in encoders)
    work_comfy = max(r.working_comfy_bytes for r in rows)
    work_noflash = max(r.working_noflash_bytes for r in rows)
    loaded, notes = te_weights, []
    if vram is not None and te_weights + work_noflash > vram:
        loaded = max(int(e.params * weight_elt / e.layers) for e in encoders)
        notes.append(f"text-encoder weights ({format_bytes(te_weights)}) do not fit next to its working set: "
                     "assumed streamed layer by layer (ComfyUI low-VRAM mode), which is slower")
    comfy, noflash = loaded + work_comfy, loaded + work_noflash
    phase = Phase("text encoder", comfy, noflash, fits(vram, comfy), fits(vram, noflash), ("CLIP Patcher",))
    if paths.text == "basic" and any(r.comfy_attention_bytes > 2 * r.noflash_attention_bytes for r in rows):
        notes.append("the text encoder runs ComfyUI's attention_basic here (full scores per layer); "
                     "NoFlash CLIP Patcher replaces it")
    return rows, phase, notes
