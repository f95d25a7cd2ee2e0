"""The denoise phase: one transformer block at a time, every stage's attention calls and FFN, with the weights
resident (or streamed block by block when they do not fit next to the working set).

Working memory of a block: ``5 × act`` around attention (residual, normalised copy, q, k, v; ``act`` = batch ×
tokens × width × element size) plus the call; ``2 × act`` plus the FFN around it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch

from ..memory.fake_peak import AttentionShape
from ..units import format_bytes
from ..video.families import ModelFamily, StageCalls, attention_calls
from .calls import attention_budget, estimate_attention, free_bytes
from .comfy_attention import ComfyPaths
from .ffn import estimate_ffn, ffn_chunks
from .geometry import latent_and_grid
from .results import AttentionEstimate, DenoiseEstimate, FFNEstimate, Phase

__all__ = ["estimate_denoise", "fits"]


def fits(vram: Optional[int], need: int) -> Optional[bool]:
    """``need <= vram``, None when the VRAM is unknown."""
    return None if vram is None else need <= vram


@dataclass(frozen=True)
class _Geometry:
    fam: ModelFamily
    grid: Tuple[int, int, int]
    batch: int
    dtype: torch.dtype
    paths: ComfyPaths
    frames: int = 1


@dataclass
class _Blocks:
    attention: List[AttentionEstimate] = field(default_factory=list)
    ffn: List[FFNEstimate] = field(default_factory=list)
    activation_bytes: int = 0
    peaks: Tuple[List[int], List[int], List[int]] = field(default_factory=lambda: ([], [], []))
    notes: List[str] = field(default_factory=list)

    @property
    def working(self) -> Tuple[int, int, int]:
        """ComfyUI + whole FFN, noflash + whole FFN, noflash + chunked FFN."""
        return max(self.peaks[0]), max(self.peaks[1]), max(self.peaks[2])


def _add_stage(out: _Blocks, g: _Geometry, stage_calls: StageCalls, vram: Optional[int],
               loaded_weights: int) -> None:
    """One stage's attention calls (from :func:`~noflash_core.video.families.attention_calls`: self, cross,
    audio streams, reference images) and its FFN, into ``out``."""
    fam, stage, q_len = g.fam, stage_calls.stage, stage_calls.tokens
    act = g.batch * q_len * stage.heads * stage.head_dim * g.dtype.itemsize
    out.activation_bytes = max(out.activation_bytes, 5 * act)
    budget = attention_budget(vram, loaded_weights + 5 * act)
    free = free_bytes(vram, loaded_weights + 5 * act)
    comfy = noflash = 0
    for call in stage_calls.calls:
        shape = AttentionShape(g.batch, call.heads, call.q_len, call.kv_len, call.head_dim)
        est = estimate_attention(call.name, shape, g.dtype, budget, g.paths, free, fam.skip_reshape)
        out.attention.append(est)
        comfy, noflash = max(comfy, est.comfy_bytes), max(noflash, est.peak_bytes)
        if not est.verified:
            out.notes.append(f"{call.name}: the fake-run extrapolation was not verified; its peak is approximate")
    chunks = ffn_chunks(g.batch, q_len, stage.ffn_dim, fam.ffn_kind, g.dtype.itemsize, budget)
    ffn = estimate_ffn(stage, fam.ffn_kind, g.batch, q_len, g.dtype, chunks)
    out.ffn.append(ffn)
    out.peaks[0].extend([5 * act + comfy, 2 * act + ffn.whole_bytes])
    out.peaks[1].extend([5 * act + noflash, 2 * act + ffn.whole_bytes])
    out.peaks[2].extend([5 * act + noflash, 2 * act + ffn.chunked_bytes])


def _blocks(g: _Geometry, vram: Optional[int], loaded_weights: int) -> _Blocks:
    """Every stage's attention calls and FFN, with ``loaded_weights`` on the device."""
    out = _Blocks()
    for stage_calls in attention_calls(g.fam, g.grid, g.frames):
        _add_stage(out, g, stage_calls, vram, loaded_weights)
    return out


def _phase(d: DenoiseEstimate, vram: Optional[int]) -> Phase:
    """The denoise phase: with the Attention Patcher alone when that fits, else with the FFN Chunker too."""
    loaded = d.loaded_bytes
    if d.fits_noflash or vram is None:
        return Phase("denoise", loaded + d.working_comfy_bytes, loaded + d.working_noflash_bytes, d.fits_comfy,
                     d.fits_noflash, ("Attention Patcher",))
    return Phase("denoise", loaded + d.working_comfy_bytes, loaded + d.working_noflash_chunked_bytes, d.fits_comfy,
                 d.fits_noflash_chunked, ("Attention Patcher", "FFN Chunker"))


def estimate_denoise(fam: ModelFamily, size: Tuple[int, int, int], batch: int, dtype: torch.dtype,
                     weights_format: Tuple[str, int], paths: ComfyPaths,
                     vram: Optional[int]) -> Tuple[DenoiseEstimate, Phase, List[str]]:
    """The denoise step of ``fam`` at ``size = (width, height, frames)``: ``(estimate, phase, notes)``.

    Args:
        weights_format: ``(name, bytes per weight)`` of the diffusion model's weights.
        paths: the attention ComfyUI runs on the target.
        vram: the target's memory (None: unknown, nothing is judged).
    """
    latent, grid = latent_and_grid(fam, *size)
    weights = int(fam.nominal_params * weights_format[1])
    block_weights = int(math.ceil(weights / max(1, fam.layers)))
    g = _Geometry(fam, grid, batch, dtype, paths, size[2])
    resident = vram is None or weights < vram
    blocks = _blocks(g, vram, weights if resident else block_weights)
    if resident and vram is not None and weights + blocks.working[2] > vram:
        blocks = _blocks(g, vram, block_weights)  # ComfyUI streams the weights instead
        resident = False
    loaded = weights if resident else block_weights
    working = blocks.working
    d = DenoiseEstimate(
        latent_shape=latent, token_grid=grid, video_tokens=grid[0] * grid[1] * grid[2],
        text_tokens=fam.joint_text_tokens, tokens_per_call=max(a.q_len for a in blocks.attention),
        weights_bytes=weights, block_weights_bytes=block_weights, weights_format=weights_format[0],
        weights_resident=resident, activation_bytes=blocks.activation_bytes, attention=tuple(blocks.attention),
        ffn=tuple(blocks.ffn), working_comfy_bytes=working[0], working_noflash_bytes=working[1],
        working_noflash_chunked_bytes=working[2], fits_comfy=fits(vram, loaded + working[0]),
        fits_noflash=fits(vram, loaded + working[1]), fits_noflash_chunked=fits(vram, loaded + working[2]),
    )
    notes = list(blocks.notes)
    if not resident:
        notes.append(f"weights ({format_bytes(weights)}) do not fit next to the working set: assumed streamed block "
                     "by block (ComfyUI low-VRAM mode), which is much slower")
    if fam.joint_text_tokens and fam.name == "qwen-image":
        notes.append("Qwen-Image's prompt length varies; the transformer assumes 256 text tokens")
    if fam.assumed:
        notes.append(f"{fam.display}: assumed {'; '.join(fam.assumed)}")
    return d, _phase(d, vram), notes
