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

- 2026 families, every figure read from ComfyUI 0.33 (``../shared/comfyui-0.33``; the file is named at each row
  below). Where ComfyUI's detection derives a figure from the checkpoint's tensor shapes (layer counts, hidden sizes
  of HunyuanVideo 1.5, Flux 2 and Z-Image), the value is the published checkpoint's, marked ``assumed`` at its
  row; text lengths that depend on the prompt are assumptions too, marked the same way.

``nominal_params`` is the size in the model's name (for weight-memory estimates only).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Tuple

__all__ = [
    "AttentionCall",
    "AttentionStage",
    "AudioStream",
    "ModelFamily",
    "MODEL_FAMILIES",
    "StageCalls",
    "attention_calls",
    "audio_tokens",
    "family_names",
    "get_family",
    "latent_frames",
    "stage_tokens",
]


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
        kv_heads: key/value heads of a grouped-query model (Krea 2); 0 means ``heads``. The estimate still plans
            k/v at ``heads`` (the memory of k/v repeated to all heads, an upper bound).
    """

    downsample: int
    heads: int
    head_dim: int
    ffn_dim: int
    blocks: int
    kv_heads: int = 0


@dataclass(frozen=True)
class AudioStream:
    """Audio tokens next to the video tokens (LTX-2, MiniMax H3).

    Attributes:
        latents_per_second: audio latent steps per second of video.
        rows_per_latent: tokens per audio latent step (MiniMax H3 packs its 2 stereo channels as 2 rows).
        fps: the video frame rate that turns frames into seconds (the model's default workflow's).
        stage: the audio stream's own blocks (LTX-2: audio self-attention, its text cross-attention, and the
            video-to-audio / audio-to-video cross-attentions, all at the audio heads); None when the audio tokens
            join the video tokens' self-attention (MiniMax H3's single packed sequence).
        cross_tokens: key length of the audio stream's text cross-attention (0: none).
    """

    latents_per_second: float
    rows_per_latent: int
    fps: float
    stage: Optional[AttentionStage] = None
    cross_tokens: int = 0


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
        audio: the audio stream (:class:`AudioStream`), None for video- or image-only models.
        reference_images: reference images the family's usual workflow adds (Qwen-Image-Edit: 1); each adds one
            latent frame of tokens at the output size to the self-attention.
        frame_rule: how frames become latent frames: ``"causal"`` (``(frames - 1) // vae_temporal + 1``) or
            ``"minimax"`` (MiniMax H3: frames snapped up to ``17k + 5``, then ``(frames - 5) // 17 * 5 + 2``).
        pad_multiple: the text and the image tokens are each padded up to this multiple (Z-Image: 32).
        assumed: the figures of this row that are assumptions, not read from ComfyUI (the estimate lists them).
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
    audio: Optional[AudioStream] = None
    reference_images: int = 0
    frame_rule: str = "causal"
    pad_multiple: int = 1
    assumed: Tuple[str, ...] = ()

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


# ---- 2026 families (ComfyUI 0.33). Paths are relative to ComfyUI 0.33's ``comfy/``. -------------------------------


def _ltx2(name: str, display: str, params: float) -> ModelFamily:
    # ldm/lightricks/av_model.py LTXAVModel defaults: video 32 heads x 128 (4096), audio 32 heads x 64 (2048),
    # 48 layers, FFN x4 (lightricks/model.py FeedForward: GELU, mult 4); vae_scale_factors (8, 32, 32) and 128
    # latent channels (latent_formats.LTXV); patch 1. Text: text_encoders/lt.py pads Gemma 3 to min_length=1024,
    # the context of both streams' cross-attention. Audio: vae/audio_vae.py latents_per_second = 16000 / 160 / 4 =
    # 25, one token per latent step (8 channels x 16 bins = audio_in_channels 128); 25 fps is LTXVEmptyLatentAudio's
    # default frame rate (comfy_extras/nodes_lt_audio.py).
    audio_stage = AttentionStage(1, 32, 64, 4 * 2048, 48)
    return ModelFamily(
        name, display, 32, 8, 128, _P111, (AttentionStage(1, 32, 128, 4 * 4096, 48),), "gelu", 0, 1024, params,
        True, ("gemma-3-12b",), "ltxv", False, audio=AudioStream(25.0, 1, 25.0, audio_stage, 1024),
        assumed=("audio at the default 25 fps of LTXVEmptyLatentAudio",),
    )


def _new_families() -> List[ModelFamily]:
    return [
        # LTX-2 19B / LTX-2.3 22B: one class (model_base.LTXAV), same shapes; 2.3's differences are in its
        # metadata config (caption projection, gated attention). Parameter counts from the names.
        _ltx2("ltx-2", "LTX-2 19B (video + audio)", 19e9),
        _ltx2("ltx-2.3", "LTX-2.3 22B (video + audio)", 22e9),
        # HunyuanVideo 1.5: model_detection.py (hunyuan_video branch): num_heads = hidden_size // 128, mlp_ratio 4,
        # patch from img_in; latent_formats.HunyuanVideo15: 32 channels, /16, /4. Checkpoint figures (assumed):
        # hidden 2048, 54 double blocks, no single blocks, patch 1x1x1. Text: Qwen2.5-VL prompt (template cropped)
        # joins the attention, 256 tokens assumed (ByT5 glyph tokens and the I2V SigLIP tokens not counted).
        ModelFamily("hunyuanvideo-1.5", "HunyuanVideo 1.5 8.3B", 16, 4, 32, _P111,
                    (AttentionStage(1, 16, 128, 4 * 2048, 54),), "gelu", 256, 0, 8.3e9, True,
                    ("qwen2.5-vl-7b",), "hunyuanvideo-1.5", True,
                    assumed=("hidden 2048, 54 blocks, patch 1 (checkpoint)", "256 text tokens (no ByT5/SigLIP)")),
        # Flux 2 dev: model_detection.py (flux2 branch): num_heads 48 (hidden // sum(axes_dim = 4 x 32)), head 128,
        # mlp_ratio 3.0 with a SiLU-gated MLP, patch_size 1 on latent_formats.Flux2 (128 channels, /16).
        # Checkpoint figures (assumed): hidden 6144, 8 double + 48 single blocks. Text: Mistral Small 3 (no padding,
        # text_encoders/flux.py min_length=1); 512 prompt+template tokens assumed.
        ModelFamily("flux2-dev", "Flux 2 dev 32B", 16, 1, 128, _P111, (AttentionStage(1, 48, 128, 3 * 6144, 56),),
                    "geglu", 512, 0, 32e9, False, ("mistral-small-24b",), "flux2", True,
                    assumed=("hidden 6144, 8 + 48 blocks (checkpoint)", "512 text tokens")),
        # Z-Image: model_detection.py (lumina2 branch, dim 3840): 30 heads = 30 kv heads (head 128), FFN
        # int(8/3 x 3840) = 10240 rounded to 256 (ldm/lumina/model.py FeedForward, SwiGLU), patch 2, Flux latent
        # (16 channels, /8); cap_pad_token: text and image tokens padded to a multiple of 32 (pad_zimage).
        # Checkpoint (assumed): 30 main layers (+ 2 noise + 2 context refiner layers). Text: Qwen3 4B, 256 assumed.
        ModelFamily("z-image", "Z-Image 6B", 8, 1, 16, _P122, (AttentionStage(1, 30, 128, 10240, 30, 30),),
                    "geglu", 256, 0, 6e9, False, ("qwen3-4b",), "sd", True, pad_multiple=32,
                    assumed=("30 layers (checkpoint)", "256 text tokens")),
        # Qwen-Image-Edit: the Qwen-Image transformer (ldm/qwen_image/model.py) with reference latents appended to
        # the image tokens (model_base.QwenImage ref_latents); one reference at the output size assumed.
        ModelFamily("qwen-image-edit", "Qwen-Image-Edit 20B", 8, 1, 16, _P122,
                    (AttentionStage(1, 24, 128, 4 * 3072, 60),), "gelu", 256, 0, 20e9, False, ("qwen2.5-vl-7b",),
                    "wan2.1", True, reference_images=1,
                    assumed=("one reference image at the output size", "256 text tokens")),
        # Kandinsky 5: model_detection.py (kandinsky5 branch) and ldm/kandinsky5/model.py: head_dim = sum(axes_dims)
        # (lite 16+24+24 = 64, pro 32+48+48 = 128), heads = model_dim // head_dim, patch (1, 2, 2), text by
        # cross-attention; latent_formats.HunyuanVideo (16 channels, /8, /4). Lite: model_dim 1792, ff_dim 7168,
        # 32 visual blocks (the class defaults). Pro (assumed, checkpoint): model_dim 4096, ff_dim 16384, 60 blocks.
        # Text: Qwen2.5-VL (template cropped), 256 tokens assumed.
        ModelFamily("kandinsky5-lite", "Kandinsky 5 Video Lite 2B", 8, 4, 16, _P122,
                    (AttentionStage(1, 28, 64, 7168, 32),), "gelu", 0, 256, 2e9, True, ("qwen2.5-vl-7b", "clip-l"),
                    "hunyuanvideo", True, assumed=("256 text tokens",)),
        ModelFamily("kandinsky5-pro", "Kandinsky 5 Video Pro 19B", 8, 4, 16, _P122,
                    (AttentionStage(1, 32, 128, 16384, 60),), "gelu", 0, 256, 19e9, True, ("qwen2.5-vl-7b", "clip-l"),
                    "hunyuanvideo", True, assumed=("FFN 16384, 60 blocks (checkpoint)", "256 text tokens")),
        # MiniMax H3: ldm/minimax/model.py MiniMaxH3Model defaults (50 layers, 56 heads x 128, FFN 14336 gated,
        # patch 1x2x2, one packed sequence [text | references | audio | video]); latent_formats.MiniMaxH3Video
        # (24 channels, /16); comfy_extras/nodes_minimax_h3.py: frames snapped to 17k+5 at 24 fps, latent frames
        # (frames - 5) // 17 * 5 + 2, audio round(frames / 24 x 40) steps of 2 stereo rows. Text: Qwen3-VL 32B
        # layer 50, 256 tokens assumed; parameters estimated from the shapes (assumed).
        ModelFamily("minimax-h3", "MiniMax H3 (video + audio)", 16, 4, 24, _P122,
                    (AttentionStage(1, 56, 128, 14336, 50),), "geglu", 256, 0, 19e9, True, ("qwen3-vl-32b",),
                    "minimax-h3", True, audio=AudioStream(40.0, 2, 24.0), frame_rule="minimax",
                    assumed=("256 text tokens", "no reference images")),
        # Krea 2: model_detection.py (krea2 branch) with ldm/krea2/model.py defaults: features 6144, 48 heads x 128,
        # 12 kv heads (GQA), 28 layers, patch 2, SwiGLU int(2 x 6144 / 3) x 4 = 16384; latent_formats.Wan21 (16
        # channels, /8). Text (Qwen3-VL 4B, template stripped) joins the attention, 256 tokens assumed; parameters
        # estimated from the shapes (assumed).
        ModelFamily("krea2", "Krea 2", 8, 1, 16, _P122, (AttentionStage(1, 48, 128, 16384, 28, 12),), "geglu",
                    256, 0, 11e9, False, ("qwen3-vl-4b",), "wan2.1", True, assumed=("256 text tokens",)),
    ]


def _build() -> Dict[str, ModelFamily]:
    families: List[ModelFamily] = [_dit(name, row) for name, row in _DITS.items()] + [_sdxl()] + _new_families()
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
    "ltx2": "ltx-2",
    "ltxav": "ltx-2",
    "ltx2.3": "ltx-2.3",
    "hunyuanvideo1.5": "hunyuanvideo-1.5",
    "hunyuan-video-1.5": "hunyuanvideo-1.5",
    "flux2": "flux2-dev",
    "flux-2-dev": "flux2-dev",
    "zimage": "z-image",
    "z-image-turbo": "z-image",
    "kandinsky5": "kandinsky5-lite",
    "minimax": "minimax-h3",
    "krea-2": "krea2",
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


# ---------------------------------------------------------------------------------------------- tokens


@dataclass(frozen=True)
class AttentionCall:
    """One attention call of a block: ``q_len`` queries against ``kv_len`` keys at ``heads x head_dim``."""

    name: str
    q_len: int
    kv_len: int
    heads: int
    head_dim: int


@dataclass(frozen=True)
class StageCalls:
    """A stage's token count (what its FFN sees) and its attention calls."""

    stage: AttentionStage
    tokens: int
    calls: Tuple[AttentionCall, ...]


def _snap_minimax(frames: int) -> int:
    """Frames snapped up to MiniMax H3's ``17k + 5`` grid (``nodes_minimax_h3.align_frame_count``)."""
    frames = max(5, int(frames))
    return frames + (5 - frames) % 17


def latent_frames(fam: ModelFamily, frames: int) -> int:
    """Latent frames of ``frames`` output frames (1 for image models)."""
    if not fam.is_video:
        return 1
    if fam.frame_rule == "minimax":
        snapped = _snap_minimax(frames)
        return 2 if snapped <= 5 else (snapped - 5) // 17 * 5 + 2
    return (frames - 1) // fam.vae_temporal + 1


def audio_tokens(fam: ModelFamily, frames: int) -> int:
    """Tokens of the audio stream for ``frames`` output frames (0 without audio)."""
    audio = fam.audio
    if audio is None:
        return 0
    if fam.frame_rule == "minimax":
        frames = _snap_minimax(frames)
    return round(frames / audio.fps * audio.latents_per_second) * audio.rows_per_latent


def stage_tokens(grid: Tuple[int, int, int], stage: AttentionStage) -> int:
    """Tokens of a stage's grid: the token grid ``(t, h, w)`` after the stage's extra downsampling."""
    t, h, w = grid
    for _ in range(int(math.log2(stage.downsample))):  # stride-2 convs with padding 1: ceil(x / 2) per level
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    return t * h * w


def _pad(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def attention_calls(fam: ModelFamily, grid: Tuple[int, int, int], frames: int = 1,
                    reference_images: Optional[int] = None) -> List[StageCalls]:
    """Every stage's tokens and attention calls for a token grid ``(t, h, w)``.

    The self-attention of a stage holds its grid's tokens, plus (first stage) one ``h x w`` frame per reference
    image, the joint text and the joint audio tokens, each part padded to ``pad_multiple``. A separate audio stream
    (LTX-2) adds a stage with the audio self-attention, its text cross-attention and video-to-audio attention, and
    the video stage gets the audio-to-video call (video queries, audio keys, at the audio heads).

    Args:
        reference_images: overrides the family's ``reference_images``.
    """
    refs = fam.reference_images if reference_images is None else int(reference_images)
    audio = fam.audio
    n_audio = audio_tokens(fam, frames)
    out = []
    for i, stage in enumerate(fam.stages):
        suffix = f" (stage {i + 1}, /{stage.downsample})" if len(fam.stages) > 1 else ""
        image = stage_tokens(grid, stage)
        if i == 0:
            image += refs * grid[1] * grid[2]
        q_len = _pad(image, fam.pad_multiple) + _pad(fam.joint_text_tokens, fam.pad_multiple)
        if audio is not None and audio.stage is None:
            q_len += n_audio
        calls = [AttentionCall("self" + suffix, q_len, q_len, stage.heads, stage.head_dim)]
        if fam.cross_tokens:
            calls.append(AttentionCall("cross" + suffix, q_len, fam.cross_tokens, stage.heads, stage.head_dim))
        if audio is not None and audio.stage is not None:
            calls.append(AttentionCall("audio-to-video", q_len, n_audio, audio.stage.heads, audio.stage.head_dim))
        out.append(StageCalls(stage, q_len, tuple(calls)))
    if audio is not None and audio.stage is not None:
        a, video = audio.stage, out[0].tokens
        calls = [AttentionCall("audio self", n_audio, n_audio, a.heads, a.head_dim)]
        if audio.cross_tokens:
            calls.append(AttentionCall("audio cross", n_audio, audio.cross_tokens, a.heads, a.head_dim))
        calls.append(AttentionCall("video-to-audio", n_audio, video, a.heads, a.head_dim))
        out.append(StageCalls(a, n_audio, tuple(calls)))
    return out
