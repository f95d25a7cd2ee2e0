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


def _dit(
    name: str,
    display: str,
    *,
    vae: Tuple[int, int, int],
    patch: Tuple[int, int, int],
    heads: int,
    head_dim: int,
    ffn_dim: int,
    blocks: int,
    joint_text_tokens: int = 0,
    cross_tokens: int = 0,
    params: float,
    text_encoders: Tuple[str, ...] = (),
    vae_key: str = "sd",
    skip_reshape: bool = False,
) -> ModelFamily:
    """A single-stage transformer. ``vae`` is ``(temporal, spatial, channels)``."""
    temporal, spatial, channels = vae
    return ModelFamily(
        name=name,
        display=display,
        vae_spatial=spatial,
        vae_temporal=temporal,
        latent_channels=channels,
        patch=patch,
        stages=(AttentionStage(1, heads, head_dim, ffn_dim, blocks),),
        ffn_kind="gelu",
        joint_text_tokens=joint_text_tokens,
        cross_tokens=cross_tokens,
        nominal_params=params,
        is_video=temporal > 1,
        text_encoders=text_encoders,
        vae=vae_key,
        skip_reshape=skip_reshape,
    )


def _sdxl() -> ModelFamily:
    # Levels with transformers: channel_mult 2 (640 ch, 10 heads) at /2 and 4 (1280 ch, 20 heads) at /4.
    # Depths: input 2+2 and output 2+2+2 at /2; input 10+10, middle 10, output 10+10+10 at /4.
    return ModelFamily(
        name="sdxl",
        display="SDXL 1.0 UNet",
        vae_spatial=8,
        vae_temporal=1,
        latent_channels=4,
        patch=(1, 1, 1),
        stages=(
            AttentionStage(downsample=2, heads=10, head_dim=64, ffn_dim=4 * 640, blocks=10),
            AttentionStage(downsample=4, heads=20, head_dim=64, ffn_dim=4 * 1280, blocks=60),
        ),
        ffn_kind="geglu",
        joint_text_tokens=0,
        cross_tokens=77,
        nominal_params=2.6e9,
        is_video=False,
        text_encoders=("clip-l", "clip-g"),
        vae="sd",
    )


def _build() -> Dict[str, ModelFamily]:
    wan21_vae = (4, 8, 16)
    wan22_vae = (4, 16, 48)
    families: List[ModelFamily] = [
        _dit(
            "wan2.1-1.3b",
            "Wan 2.1 T2V 1.3B",
            vae=wan21_vae,
            patch=(1, 2, 2),
            heads=12,
            head_dim=128,
            ffn_dim=8960,
            blocks=30,
            cross_tokens=512,
            params=1.3e9,
            text_encoders=("umt5-xxl",),
            vae_key="wan2.1",
        ),
        _dit(
            "wan2.1-14b",
            "Wan 2.1 T2V/I2V 14B",
            vae=wan21_vae,
            patch=(1, 2, 2),
            heads=40,
            head_dim=128,
            ffn_dim=13824,
            blocks=40,
            cross_tokens=512,
            params=14e9,
            text_encoders=("umt5-xxl",),
            vae_key="wan2.1",
        ),
        _dit(
            "wan2.2-5b",
            "Wan 2.2 TI2V 5B",
            vae=wan22_vae,
            patch=(1, 2, 2),
            heads=24,
            head_dim=128,
            ffn_dim=14336,
            blocks=30,
            cross_tokens=512,
            params=5e9,
            text_encoders=("umt5-xxl",),
            vae_key="wan2.2",
        ),
        _dit(
            "wan2.2-14b",
            "Wan 2.2 T2V/I2V A14B (per expert)",
            vae=wan21_vae,
            patch=(1, 2, 2),
            heads=40,
            head_dim=128,
            ffn_dim=13824,
            blocks=40,
            cross_tokens=512,
            params=14e9,
            text_encoders=("umt5-xxl",),
            vae_key="wan2.1",
        ),
        _dit(
            "ltxv-2b",
            "LTX-Video 2B (0.9.x)",
            vae=(8, 32, 128),
            patch=(1, 1, 1),
            heads=32,
            head_dim=64,
            ffn_dim=4 * 2048,
            blocks=28,
            cross_tokens=128,
            params=2e9,
            text_encoders=("t5-xxl",),
            vae_key="ltxv",
        ),
        _dit(
            "ltxv-13b",
            "LTX-Video 13B (0.9.7+)",
            vae=(8, 32, 128),
            patch=(1, 1, 1),
            heads=32,
            head_dim=128,
            ffn_dim=4 * 4096,
            blocks=48,
            cross_tokens=128,
            params=13e9,
            text_encoders=("t5-xxl",),
            vae_key="ltxv",
        ),
        _dit(
            "hunyuanvideo",
            "HunyuanVideo 13B",
            vae=(4, 8, 16),
            patch=(1, 2, 2),
            heads=24,
            head_dim=128,
            ffn_dim=4 * 3072,
            blocks=60,
            joint_text_tokens=256,
            params=13e9,
            text_encoders=("llama-3-8b", "clip-l"),
            vae_key="hunyuanvideo",
            skip_reshape=True,
        ),
        _dit(
            "flux",
            "Flux.1 dev",
            vae=(1, 8, 16),
            patch=(1, 2, 2),
            heads=24,
            head_dim=128,
            ffn_dim=4 * 3072,
            blocks=57,
            joint_text_tokens=256,
            params=12e9,
            text_encoders=("clip-l", "t5-xxl"),
            vae_key="sd",
            skip_reshape=True,
        ),
        _dit(
            "qwen-image",
            "Qwen-Image 20B",
            vae=(1, 8, 16),
            patch=(1, 2, 2),
            heads=24,
            head_dim=128,
            ffn_dim=4 * 3072,
            blocks=60,
            joint_text_tokens=256,
            params=20e9,
            text_encoders=("qwen2.5-vl-7b",),
            vae_key="wan2.1",
            skip_reshape=True,
        ),
        _sdxl(),
    ]
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
