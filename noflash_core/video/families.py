"""Shapes of popular diffusion models, read from their public configs.

Only the numbers that decide attention and feed-forward memory are kept: how the VAE compresses pixels
and frames, the transformer's patch size, heads, head dim, FFN width and depth, and how many text tokens
join the attention.

Sources (public configs, read on the model's own code or config files):

- Wan 2.1 / 2.2: the Wan team's ``wan/configs/wan_t2v_1_3B.py``, ``wan_t2v_14B.py``, ``wan_ti2v_5B.py``
  (``vae_stride``, ``patch_size``, ``dim``, ``ffn_dim``, ``num_heads``, ``num_layers``); UMT5 text padded to 512
  tokens (ComfyUI ``min_length=512``) for the cross-attention.
- LTX-Video: ComfyUI ``comfy/ldm/lightricks/model.py`` defaults (28 layers, 32 heads of 64, FFN ×4,
  ``vae_scale_factors=(8, 32, 32)``, 128 latent channels); the 13B checkpoints have 48 layers of
  32 heads × 128.
- HunyuanVideo: ``hidden_size=3072``, ``heads_num=24``, ``mlp_width_ratio=4``, 20 double + 40 single blocks,
  ``patch_size=[1, 2, 2]``, 884 VAE with 16 channels; the LLM prompt (up to 256 tokens, the assumed
  length here) joins the attention.
- Flux.1: ComfyUI ``model_detection`` (hidden 3072, 24 heads, ``mlp_ratio=4``, patch 2), 19 double + 38 single
  blocks, 16-channel VAE at /8; the T5 prompt joins the attention (ComfyUI pads it to 256 tokens).
- SDXL: ComfyUI ``supported_models.SDXL`` / ``model_detection`` (model_channels 320,
  ``channel_mult [1, 2, 4]``, ``transformer_depth [0, 0, 2, 2, 10, 10]``, middle depth 10, 64 channels per
  head, GEGLU FFN ×4), VAE /8 with 4 channels.
- Qwen-Image: ComfyUI ``comfy/ldm/qwen_image/model.py`` defaults (60 layers, 24 heads × 128, patch 2, FFN ×4),
  Wan-2.1-style VAE at /8 with 16 channels.

``nominal_params`` is the size in the model's name (for weight-memory estimates only).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict, List, Tuple

__all__ = ["AttentionStage", "ModelFamily", "MODEL_FAMILIES", "get_family", "family_names"]


@dataclass(frozen=True)
class AttentionStage:
    """One group of transformer blocks that share a token grid.

    DiTs have a single stage. UNets (SDXL) have one per resolution level that holds transformer blocks.

    Attributes:
        downsample: extra spatial downsampling of the token grid beyond the patch size (UNet levels: 1, 2, 4).
        heads: attention heads.
        head_dim: channels per head (E = Ev).
        ffn_dim: width of the FFN intermediate per token (for GEGLU the gated projection is ``2 * ffn_dim``).
        blocks: number of transformer blocks in this stage.
    """

    downsample: int
    heads: int
    head_dim: int
    ffn_dim: int
    blocks: int


@dataclass(frozen=True)
class ModelFamily:
    """A model family's public shape facts.

    Attributes:
        name: CLI key, e.g. ``"wan2.2-5b"``.
        display: human name.
        vae_spatial: pixels per latent pixel (per side).
        vae_temporal: frames per latent frame; 1 for image models.
        latent_channels: VAE latent channels.
        patch: ``(t, h, w)`` latent cells per token.
        stages: attention stages (see :class:`AttentionStage`).
        ffn_kind: ``"gelu"`` (Linear, GELU, Linear) or ``"geglu"`` (Linear to 2×width, gate, Linear).
        joint_text_tokens: text tokens concatenated into self-attention (MMDiT); 0 when text enters by
            cross-attention. For Qwen-Image (variable prompt length) 256 is an assumed typical prompt.
        cross_tokens: key length of the cross-attention to text; 0 when there is none.
        nominal_params: parameter count from the model's name.
        is_video: whether ``frames > 1`` is meaningful.
        text_encoders: keys of :data:`noflash_core.video.encoders.TEXT_ENCODERS` its workflows load.
        vae: key of :data:`noflash_core.video.encoders.VAES`.
        skip_reshape: ComfyUI's model calls attention with ``(b, h, n, d)`` operands (Flux-style ``attention()``),
            so ComfyUI's sub-quadratic attention makes no operand copies.
    """

    name: str
    display: str
    vae_spatial: int
    vae_temporal: int
    latent_channels: int
    patch: Tuple[int, int, int]
    stages: Tuple[AttentionStage, ...]
    ffn_kind: str
    joint_text_tokens: int
    cross_tokens: int
    nominal_params: float
    is_video: bool
    text_encoders: Tuple[str, ...] = ()
    vae: str = "sd"
    skip_reshape: bool = False

    @property
    def dim(self) -> int:
        """Model width of the largest-token stage (heads × head_dim)."""
        stage = self.stages[0]
        return stage.heads * stage.head_dim

    @property
    def layers(self) -> int:
        """Total transformer blocks over all stages."""
        return sum(s.blocks for s in self.stages)

    def to_dict(self) -> Dict[str, object]:
        """Plain-data form (for JSON)."""
        return asdict(self)


# VAE of a family: ((frames, pixels per latent pixel, latent channels), key in ``encoders.VAES``).
_WAN21_VAE = ((4, 8, 16), "wan2.1")
_WAN22_VAE = ((4, 16, 48), "wan2.2")
_LTXV_VAE = ((8, 32, 128), "ltxv")
_HUNYUAN_VAE = ((4, 8, 16), "hunyuanvideo")
_FLUX_VAE = ((1, 8, 16), "sd")
_QWEN_VAE = ((1, 8, 16), "wan2.1")
_P122 = (1, 2, 2)
_P111 = (1, 1, 1)
_UMT5 = ("umt5-xxl",)
_T5 = ("t5-xxl",)

# Single-stage transformers (DiT / MMDiT), one row each:
# name: (display, VAE, patch, (heads, head_dim, ffn_dim, blocks), joint text tokens, cross tokens, params,
#        text encoders, skip_reshape)
_DITS: Dict[str, tuple] = {
    "wan2.1-1.3b": ("Wan 2.1 T2V 1.3B", _WAN21_VAE, _P122, (12, 128, 8960, 30), 0, 512, 1.3e9, _UMT5, False),
    "wan2.1-14b": ("Wan 2.1 T2V/I2V 14B", _WAN21_VAE, _P122, (40, 128, 13824, 40), 0, 512, 14e9, _UMT5, False),
    "wan2.2-5b": ("Wan 2.2 TI2V 5B", _WAN22_VAE, _P122, (24, 128, 14336, 30), 0, 512, 5e9, _UMT5, False),
    "wan2.2-14b": (
        "Wan 2.2 T2V/I2V A14B (per expert)", _WAN21_VAE, _P122, (40, 128, 13824, 40), 0, 512, 14e9, _UMT5, False
    ),
    "ltxv-2b": ("LTX-Video 2B (0.9.x)", _LTXV_VAE, _P111, (32, 64, 4 * 2048, 28), 0, 128, 2e9, _T5, False),
    "ltxv-13b": ("LTX-Video 13B (0.9.7+)", _LTXV_VAE, _P111, (32, 128, 4 * 4096, 48), 0, 128, 13e9, _T5, False),
    "hunyuanvideo": (
        "HunyuanVideo 13B", _HUNYUAN_VAE, _P122, (24, 128, 4 * 3072, 60), 256, 0, 13e9, ("llama-3-8b", "clip-l"), True
    ),
    "flux": ("Flux.1 dev", _FLUX_VAE, _P122, (24, 128, 4 * 3072, 57), 256, 0, 12e9, ("clip-l", "t5-xxl"), True),
    "qwen-image": ("Qwen-Image 20B", _QWEN_VAE, _P122, (24, 128, 4 * 3072, 60), 256, 0, 20e9, ("qwen2.5-vl-7b",), True),
}


def _dit(name: str, row: tuple) -> ModelFamily:
    """A single-stage transformer from its :data:`_DITS` row."""
    display, ((temporal, spatial, channels), vae_key), patch, stage, joint, cross, params, encoders, skip = row
    return ModelFamily(
        name, display, spatial, temporal, channels, patch, (AttentionStage(1, *stage),), "gelu", joint, cross,
        params, temporal > 1, encoders, vae_key, skip,
    )


def _sdxl() -> ModelFamily:
    # Levels with transformers: channel_mult 2 (640 ch, 10 heads) at /2 and 4 (1280 ch, 20 heads) at /4.
    # Depths: input 2+2 and output 2+2+2 at /2; input 10+10, middle 10, output 10+10+10 at /4.
    stages = (
        AttentionStage(downsample=2, heads=10, head_dim=64, ffn_dim=4 * 640, blocks=10),
        AttentionStage(downsample=4, heads=20, head_dim=64, ffn_dim=4 * 1280, blocks=60),
    )
    return ModelFamily(
        "sdxl", "SDXL 1.0 UNet", 8, 1, 4, _P111, stages, "geglu", 0, 77, 2.6e9, False, ("clip-l", "clip-g"), "sd"
    )


def _build() -> Dict[str, ModelFamily]:
    families: List[ModelFamily] = [_dit(name, row) for name, row in _DITS.items()] + [_sdxl()]
    return {f.name: f for f in families}


MODEL_FAMILIES: Dict[str, ModelFamily] = _build()

_ALIASES = {
    "wan2.1-t2v-1.3b": "wan2.1-1.3b",
    "wan2.2-ti2v-5b": "wan2.2-5b",
    "wan2.2-a14b": "wan2.2-14b",
    "ltxv": "ltxv-2b",
    "hunyuan-video": "hunyuanvideo",
    "flux-dev": "flux",
    "qwen": "qwen-image",
}


def family_names() -> List[str]:
    """The CLI keys, in table order."""
    return list(MODEL_FAMILIES)


def get_family(name: str) -> ModelFamily:
    """Look a family up by key (case-insensitive; a few common aliases accepted).

    Raises:
        ValueError: unknown name; the message lists the known keys.
    """
    key = name.strip().lower().replace("_", "-")
    key = _ALIASES.get(key, key)
    try:
        return MODEL_FAMILIES[key]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(MODEL_FAMILIES)}") from None
