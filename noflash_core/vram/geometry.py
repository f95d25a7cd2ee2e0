"""From pixels to tokens: the latent ComfyUI's empty-latent nodes make for a model family and its token grid after
patching; the tokens of a downsampled stage (UNets) are ``families.stage_tokens``, re-exported here."""

from __future__ import annotations

import math
from typing import Tuple

from ..video.families import ModelFamily, latent_frames, stage_tokens

__all__ = ["latent_and_grid", "stage_tokens"]


def latent_and_grid(
    fam: ModelFamily, width: int, height: int, frames: int
) -> Tuple[Tuple[int, int, int, int], Tuple[int, int, int]]:
    """Latent ``(C, T, H, W)`` as ComfyUI's empty-latent nodes make it, and the token grid ``(t, h, w)``.

    Raises:
        ValueError: a non-positive size, frames > 1 for an image model, or a size below one latent pixel.
    """
    if width <= 0 or height <= 0 or frames <= 0:
        raise ValueError(f"width, height and frames must be positive, got {width}x{height}, {frames} frames")
    if not fam.is_video and frames != 1:
        raise ValueError(f"{fam.display} is an image model: use frames=1 (got {frames}); use batch for more images")
    lat_t = latent_frames(fam, frames)
    lat_h, lat_w = height // fam.vae_spatial, width // fam.vae_spatial
    if lat_h == 0 or lat_w == 0:
        raise ValueError(f"{width}x{height} is smaller than one latent pixel ({fam.vae_spatial} px) of {fam.display}")
    pt, ph, pw = fam.patch
    grid = (math.ceil(lat_t / pt), math.ceil(lat_h / ph), math.ceil(lat_w / pw))  # ComfyUI pads to the patch
    return (fam.latent_channels, lat_t, lat_h, lat_w), grid
