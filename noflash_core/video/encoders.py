"""Shapes of the text encoders and VAEs that diffusion workflows load, for the text-encoder and VAE-decode rows.

Only what decides memory is kept. Sources (public configs, checked against ComfyUI 0.3.64's classes):

- CLIP-L / CLIP-G: ``comfy/sd1_clip_config.json`` (12 layers, width 768, 12 heads, MLP 3072) and
  ``comfy/clip_config_bigg.json`` (32 layers, width 1280, 20 heads, MLP 5120); prompts in chunks of 77 tokens, the
  chunks run as a batch.
- T5-XXL / UMT5-XXL encoders: ``comfy/text_encoders/t5_config_xxl.json`` / ``umt5_config_xxl.json`` (24 layers,
  d_model 4096, 64 heads of 64, gated-GELU FFN 10240); the relative position bias enters every layer as a
  ``(1, 64, L, L)`` mask. ComfyUI pads Flux's T5 to 256 tokens, SD3's to 77, LTXV's to 128 and Wan's UMT5 to 512.
- Qwen2.5-VL 7B (Qwen-Image): ``Qwen25_7BVLI_Config`` (28 layers, width 3584, 28 heads, 4 KV heads, head dim 128,
  MLP 18944); the prompt template adds 34 tokens.
- Llama 3 8B (HunyuanVideo's llava-llama-3): ``Llama2Config`` defaults (32 layers, 4096, 32 heads, 8 KV heads,
  MLP 14336); its template adds 95 tokens.
- Gemma 2 2B (Lumina 2): ``Gemma2_2B_Config`` (26 layers, width 2304, 8 heads, 4 KV heads, head dim 256, MLP 9216).
- 2026 encoders, from ComfyUI 0.33's ``comfy/text_encoders/llama.py`` configs (layers, width, heads, KV heads,
  head dim, MLP): ``Gemma3_12B_Config`` (LTX-2; ``lt.py`` pads to ``min_length=1024``), ``Qwen3_4BConfig`` (Z-Image,
  ``z_image.py`` ``min_length=1``), ``Qwen3_8BConfig`` (Flux 2 Klein 9B), ``Qwen3VL_4BConfig`` (Krea 2),
  ``Qwen3VL_8BConfig``, ``Qwen3VL_32BConfig`` (MiniMax H3: the first 50 of 64 layers), ``Mistral3Small24BConfig``
  (Flux 2 dev, ``flux.py`` ``min_length=1``). Template lengths are assumptions (the tokenizer files are not read
  here): Qwen chat template 34 tokens as Qwen-Image's, Z-Image's short template 9, Flux 2's system prompt 50,
  MiniMax H3 none (not chat-templated, ``minimax.py``). Parameter counts from the model names; the 32B truncated
  to 50 layers is scaled by 50/64 (assumed).
- VAEs: the SD/SDXL/SD3/Flux ``AutoencoderKL`` decoder (mid-block attention, 512 channels at the latent size; 128
  channels at full size); the Wan 2.1 VAE (Qwen-Image, Wan 2.1, Wan 2.2 A14B: dim 96, mid-block 384 channels, one
  attention per latent frame); the Wan 2.2 TI2V VAE (``vae2_2``: decoder dim 256, mid-block 1024 channels at /16);
  the HunyuanVideo VAE (conv3d ``AttnBlock``: one attention over all latent frames); the LTXV VAE has no attention
  (LTX-2 uses the same ``causal_video_autoencoder``). ComfyUI 0.33 (``comfy/sd.py``): the Flux 2 VAE is the same
  ``AutoencodingEngine`` decoder with 32 latent channels (mid-block 512 channels; its working set per pixel is
  assumed equal to SD's, not measured); the HunyuanVideo 1.5 VAE is ``hunyuan_video/vae_refiner.py``
  (``block_out_channels`` up to 1024, /16, /4, conv3d ``AttnBlock`` at the mid-block, assumed to attend over all
  latent frames like HunyuanVideo's); the MiniMax H3 VAE (``ldm/minimax/vae.py``, 24 channels, /16) attends in
  multi-head transformer blocks through the module-level ``optimized_attention``, which the VAE Patcher cannot
  reach: no attention row for it. The parameter counts of these two new video VAEs (250M) are assumptions.

``params`` are approximate parameter counts (for weight memory): from the model cards, or for the VAEs from the
size of the files ComfyUI's examples use.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

__all__ = [
    "TEXT_ENCODERS",
    "VAES",
    "TextEncoderSpec",
    "VAESpec",
    "encoder_names",
    "get_encoder",
    "get_vae",
    "parse_encoders",
]


@dataclass(frozen=True)
class TextEncoderSpec:
    """One text encoder.

    Attributes:
        name: key, e.g. ``"t5-xxl"``.
        display: human name.
        layers: transformer layers.
        width: hidden width.
        heads: attention heads (queries).
        head_dim: channels per head.
        ffn_dim: MLP intermediate width.
        gated: gated MLP (two up-projections: GEGLU/SwiGLU).
        params: parameter count.
        min_tokens: ComfyUI's padding (``min_length``) for this encoder in its usual workflow.
        template_tokens: tokens the prompt template adds.
        chunk: tokens per chunk for CLIP-style encoders (chunks run as a batch); 0 when the prompt is one sequence.
        mask: what the encoder passes as mask: ``"causal"`` (an ``(L, L)`` float mask), ``"bias"`` (T5's
            ``(b|1, heads, L, L)`` position bias) or ``"none"``.
        skip_reshape: the encoder calls attention with ``(b, h, n, d)`` tensors (Llama family).
        kv_heads: key/value heads (grouped-query attention); 0 means ``heads``. ComfyUI 0.3.64 repeats k/v to
            ``heads`` before the call, 0.33 passes them with ``enable_gqa=True``; the estimate plans the repeated
            form (an upper bound).
    """

    name: str
    display: str
    layers: int
    width: int
    heads: int
    head_dim: int
    ffn_dim: int
    gated: bool
    params: float
    min_tokens: int
    template_tokens: int
    chunk: int
    mask: str
    skip_reshape: bool
    kv_heads: int = 0

    def tokens(self, prompt_tokens: int) -> Tuple[int, int]:
        """``(batch, sequence length)`` of the encoder's forward for a prompt of ``prompt_tokens`` tokens."""
        prompt_tokens = max(1, int(prompt_tokens))
        if self.chunk:
            return max(1, math.ceil(prompt_tokens / (self.chunk - 2))), self.chunk
        return 1, max(self.min_tokens, prompt_tokens + self.template_tokens)


@dataclass(frozen=True)
class VAESpec:
    """One VAE decoder.

    Attributes:
        name: key.
        display: human name.
        spatial: pixels per latent pixel (per side).
        temporal: frames per latent frame (1 for image VAEs).
        mid_channels: channels of the mid-block attention (single head); 0 when the decoder has no attention.
        full_channels: decoder channels at full resolution (for the working-set estimate of the last up-block).
        params: parameter count.
        attention_frames: ``"one"`` (one call per latent frame, Wan) or ``"all"`` (one call over every latent
            frame's tokens, HunyuanVideo).
        conv_px: decoder working set outside attention, in elements of the VAE's dtype per output pixel;
            None where it was not measured.
        conv_px_frame: the part of it that grows with the output frames, per pixel and frame.
        conv_px_image: the working set per pixel when only one frame is decoded (images through a video VAE,
            which decodes the first latent frame alone); None: ``conv_px + conv_px_frame``.

    They were measured with the live-bytes tracker on ComfyUI 0.3.64's decoders on fake tensors (fp32, bytes per
    output pixel; ``tests/comfy/test_comfyui_probe.py`` re-measures some): SD 2,561 at 1024² and 1536²; Wan 2.1
    6,538 for one frame, 17,264 and 17,411 for 9 and 21 frames (16,399 for 5: the fit is 5% high there); Wan 2.2
    5,292, 17,528 and 17,674; HunyuanVideo about 4,400 per pixel and frame.
    """

    name: str
    display: str
    spatial: int
    temporal: int
    mid_channels: int
    full_channels: int
    params: float
    attention_frames: str = "one"
    conv_px: Optional[float] = None
    conv_px_frame: float = 0.0
    conv_px_image: Optional[float] = None

    def conv_bytes(self, height: int, width: int, frames: int, elt: int) -> Optional[int]:
        """Decoder working bytes outside attention for ``frames`` output frames of ``height x width``."""
        if self.conv_px is None:
            return None
        per_px = self.conv_px + self.conv_px_frame * frames
        if frames == 1 and self.conv_px_image is not None:
            per_px = self.conv_px_image
        return int(height * width * per_px * elt)


TEXT_ENCODERS: Dict[str, TextEncoderSpec] = {
    s.name: s
    for s in (
        TextEncoderSpec("clip-l", "CLIP-L", 12, 768, 12, 64, 3072, False, 123e6, 77, 0, 77, "causal", False),
        TextEncoderSpec("clip-g", "CLIP-G", 32, 1280, 20, 64, 5120, False, 695e6, 77, 0, 77, "causal", False),
        TextEncoderSpec("t5-xxl", "T5-XXL encoder", 24, 4096, 64, 64, 10240, True, 4.76e9, 256, 0, 0, "bias",
                        False),
        TextEncoderSpec("umt5-xxl", "UMT5-XXL encoder", 24, 4096, 64, 64, 10240, True, 5.68e9, 512, 0, 0, "bias",
                        False),
        TextEncoderSpec("qwen2.5-vl-7b", "Qwen2.5-VL 7B", 28, 3584, 28, 128, 18944, True, 8.29e9, 1, 34, 0,
                        "causal", True, 4),
        TextEncoderSpec("llama-3-8b", "Llama 3 8B (llava)", 32, 4096, 32, 128, 14336, True, 8.03e9, 1, 95, 0,
                        "causal", True, 8),
        TextEncoderSpec("gemma-2-2b", "Gemma 2 2B", 26, 2304, 8, 256, 9216, True, 2.61e9, 1, 0, 0, "causal", True, 4),
        TextEncoderSpec("gemma-3-12b", "Gemma 3 12B", 48, 3840, 16, 256, 15360, True, 12e9, 1024, 0, 0, "causal",
                        True, 8),
        TextEncoderSpec("qwen3-4b", "Qwen3 4B", 36, 2560, 32, 128, 9728, True, 4e9, 1, 9, 0, "causal", True, 8),
        TextEncoderSpec("qwen3-8b", "Qwen3 8B", 36, 4096, 32, 128, 12288, True, 8e9, 1, 34, 0, "causal", True, 8),
        TextEncoderSpec("qwen3-vl-4b", "Qwen3-VL 4B", 36, 2560, 32, 128, 9728, True, 4e9, 1, 34, 0, "causal", True,
                        8),
        TextEncoderSpec("qwen3-vl-8b", "Qwen3-VL 8B", 36, 4096, 32, 128, 12288, True, 8e9, 1, 34, 0, "causal", True,
                        8),
        TextEncoderSpec("qwen3-vl-32b", "Qwen3-VL 32B (50 layers)", 50, 5120, 64, 128, 25600, True, 32e9 * 50 / 64,
                        1, 0, 0, "causal", True, 8),
        TextEncoderSpec("mistral-small-24b", "Mistral Small 3 24B", 40, 5120, 32, 128, 32768, True, 24e9, 1, 50, 0,
                        "causal", True, 8),
    )
}

VAES: Dict[str, VAESpec] = {
    s.name: s
    for s in (
        VAESpec("sd", "SD/SDXL/SD3/Flux VAE", 8, 1, 512, 128, 83.7e6, "one", 640.0),
        VAESpec("wan2.1", "Wan 2.1 / Qwen-Image VAE", 8, 4, 384, 96, 127e6, "one", 4288.5, 3.06, 1634.4),
        VAESpec("wan2.2", "Wan 2.2 TI2V VAE", 16, 4, 1024, 256, 353e6, "one", 4354.6, 3.05, 1322.9),
        VAESpec("hunyuanvideo", "HunyuanVideo VAE", 8, 4, 512, 128, 246e6, "all", 0.0, 1100.0),
        VAESpec("ltxv", "LTX-Video VAE", 32, 8, 0, 128, 419e6),
        VAESpec("flux2", "Flux 2 VAE", 8, 1, 512, 128, 84e6, "one", 640.0),
        VAESpec("hunyuanvideo-1.5", "HunyuanVideo 1.5 VAE", 16, 4, 1024, 128, 250e6, "all"),
        VAESpec("minimax-h3", "MiniMax H3 VAE", 16, 4, 0, 128, 250e6),
    )
}


def encoder_names() -> List[str]:
    """Text-encoder keys, in table order."""
    return list(TEXT_ENCODERS)


def get_encoder(name: str) -> TextEncoderSpec:
    """A text encoder by key (case-insensitive). Raises ValueError listing the keys."""
    key = name.strip().lower()
    if key not in TEXT_ENCODERS:
        raise ValueError(f"unknown text encoder {name!r}; known: {', '.join(TEXT_ENCODERS)}")
    return TEXT_ENCODERS[key]


def get_vae(name: str) -> VAESpec:
    """A VAE by key (case-insensitive). Raises ValueError listing the keys."""
    key = name.strip().lower()
    if key not in VAES:
        raise ValueError(f"unknown VAE {name!r}; known: {', '.join(VAES)}")
    return VAES[key]


def parse_encoders(text: str) -> Tuple[str, ...]:
    """``"clip-l+t5-xxl"`` → ``("clip-l", "t5-xxl")``; every key is checked; ``"none"`` → ``()``."""
    text = text.strip().lower()
    if text in ("", "none"):
        return ()
    return tuple(get_encoder(part).name for part in text.split("+"))
