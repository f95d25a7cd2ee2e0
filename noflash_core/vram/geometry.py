"""From pixels to tokens: the latent ComfyUI's empty-latent nodes make for a model family, its token grid after
patching, and the tokens of a downsampled stage (UNets)."""

from __future__ import annotations

import math
from typing import Tuple

from ..video.families import AttentionStage, ModelFamily

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
    lat_t = (frames - 1) // fam.vae_temporal + 1 if fam.is_video else 1
    lat_h, lat_w = height // fam.vae_spatial, width // fam.vae_spatial
    if lat_h == 0 or lat_w == 0:
        raise ValueError(f"{width}x{height} is smaller than one latent pixel ({fam.vae_spatial} px) of {fam.display}")
    pt, ph, pw = fam.patch
    grid = (math.ceil(lat_t / pt), math.ceil(lat_h / ph), math.ceil(lat_w / pw))  # ComfyUI pads to the patch
    return (fam.latent_channels, lat_t, lat_h, lat_w), grid


def stage_tokens(grid: Tuple[int, int, int], stage: AttentionStage) -> int:
    """Tokens per frame-stack at ``stage``: the grid after ``log2(downsample)`` stride-2 convolutions."""
    t, h, w = grid
    for _ in range(int(math.log2(stage.downsample))):  # stride-2 convs with padding 1: ceil(x / 2) per level
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    return t * h * w
