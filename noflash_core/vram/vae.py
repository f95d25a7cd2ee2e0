"""The VAE-decode phase: the decoder's mid-block attention (ComfyUI's split attention or SDPA against noflash) and
the decoder's other working memory, measured on ComfyUI's decoders (:class:`~noflash_core.video.encoders.VAESpec`).
The whole latent is decoded in one go: what ComfyUI tries before it falls back to tiles."""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from ..device import DeviceProfile
from ..memory.fake_peak import AttentionShape
from ..video.encoders import VAESpec
from ..video.families import ModelFamily
from .calls import attention_budget, free_bytes, math_peak, noflash_call
from .comfy_attention import ComfyPaths, fused_sdpa_bytes, vae_split_bytes
from .denoise import fits
from .results import Phase, VAEEstimate

__all__ = ["estimate_vae"]


def _mid_block_tokens(spec: VAESpec, fam: ModelFamily, latent: Tuple[int, int, int, int]) -> Tuple[int, int]:
    """``(tokens per attention call, calls per decode)`` of the decoder's mid-block attention."""
    _, lat_t, lat_h, lat_w = latent
    lat_h, lat_w = lat_h * fam.vae_spatial // spec.spatial, lat_w * fam.vae_spatial // spec.spatial
    per_frame = spec.attention_frames == "one"
    return lat_h * lat_w * (1 if per_frame else lat_t), (lat_t if per_frame else 1)


def _comfy_attention(path: str, batch: int, channels: int, tokens: int, dtype: torch.dtype, free: int) -> int:
    """One mid-block attention call through ComfyUI (single head, ``channels`` wide)."""
    elt = dtype.itemsize
    if path == "split":
        return vae_split_bytes(batch, channels, tokens, elt, free)
    copies = 4 * batch * channels * tokens * elt  # q, k, v made contiguous, the output transposed back
    if path == "sdpa_math":
        return copies + math_peak(AttentionShape(batch, 1, tokens, tokens, channels), dtype)
    return copies + fused_sdpa_bytes(batch, 1, tokens, channels, elt)


def _decode(spec: VAESpec, fam: ModelFamily, latent: Tuple[int, int, int, int], size: Tuple[int, int, int],
            batch: int, profile: DeviceProfile, paths: ComfyPaths, vram: Optional[int]) -> VAEEstimate:
    # ComfyUI's vae_dtype: bf16 where the device has it, never on CPU (and not on RDNA2 and older AMD).
    vae_dtype = torch.bfloat16 if profile.bf16 and profile.kind != "cpu" else torch.float32
    weights = int(spec.params * vae_dtype.itemsize)
    width, height, frames = size
    tokens, calls = _mid_block_tokens(spec, fam, latent)
    conv = spec.conv_bytes(height, width, frames if spec.temporal > 1 else 1, vae_dtype.itemsize)
    if conv is not None:
        conv = conv * batch
    comfy = noflash = tier = 0
    if spec.mid_channels:
        c = spec.mid_channels
        comfy = _comfy_attention(paths.vae, batch, c, tokens, vae_dtype, free_bytes(vram, weights))
        plan, _, noflash = noflash_call(AttentionShape(batch, 1, tokens, tokens, c), vae_dtype,
                                        attention_budget(vram, weights), out_copy=True, whole_rows=False)
        tier = plan.tier
    base = conv or 0
    return VAEEstimate(
        name=spec.name, display=spec.display, dtype=str(vae_dtype).replace("torch.", ""), tokens=tokens,
        channels=spec.mid_channels, calls=calls, weights_bytes=weights, comfy_path=paths.vae,
        comfy_attention_bytes=comfy, noflash_attention_bytes=noflash, tier=tier, conv_bytes=conv,
        working_comfy_bytes=max(base, comfy), working_noflash_bytes=max(base, noflash),
    )


def estimate_vae(spec: VAESpec, fam: ModelFamily, latent: Tuple[int, int, int, int], size: Tuple[int, int, int],
                 batch: int, profile: DeviceProfile, paths: ComfyPaths,
                 vram: Optional[int]) -> Tuple[VAEEstimate, Phase, List[str]]:
    """``(row, phase, notes)`` of decoding ``latent`` (of a ``size = (width, height, frames)`` run) with ``spec``.

    Args:
        profile: the target's profile (the VAE's dtype depends on bf16 support).
    """
    row = _decode(spec, fam, latent, size, batch, profile, paths, vram)
    comfy = row.weights_bytes + row.working_comfy_bytes
    noflash = row.weights_bytes + row.working_noflash_bytes
    phase = Phase("VAE decode", comfy, noflash, fits(vram, comfy), fits(vram, noflash),
                  ("VAE Patcher",) if row.channels else ())
    notes = []
    if row.conv_bytes is None:
        notes.append(f"{row.display}: only its attention and weights are estimated (decoder convolutions not "
                     "measured)")
    return row, phase, notes
