"""What an estimate is made of: the target device, each attention call and FFN, the denoise step, the text
encoders, the VAE decode, the phases and the run (plain frozen dataclasses; :meth:`RunEstimate.to_dict` is their
JSON form)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Dict, Optional, Tuple

from .comfy_attention import ComfyPaths
from .report import chart, report_text

__all__ = [
    "MATH_PRECISION",
    "AttentionEstimate",
    "DenoiseEstimate",
    "FFNEstimate",
    "Phase",
    "RunEstimate",
    "TargetDevice",
    "TextEncoderEstimate",
    "VAEEstimate",
]

MATH_PRECISION = "torch math SDPA with fp16/bf16 reductions on (ComfyUI's setting)"


@dataclass(frozen=True)
class TargetDevice:
    """The device an estimate is for.

    Attributes:
        key: a preset name (``"gfx1030"``) or ``"this machine"``.
        description: the product, e.g. ``"AMD Radeon RX 6800 / 6800 XT / 6900 XT (RDNA2, 16 GiB)"``.
        kind: ``"rocm"``, ``"cuda"``, ``"mps"``, ``"xpu"`` or ``"cpu"``.
        vram_bytes: the memory planned with (the preset's, ``--vram``, or the device's total); None if unknown.
        simulated: planned with :func:`noflash_core.simulate_device` for a card that is not this machine's.
        paths: the attention ComfyUI runs there.
        note: one sentence on what is planned for.
    """

    key: str
    description: str
    kind: str
    vram_bytes: Optional[int]
    simulated: bool
    paths: ComfyPaths
    note: str


@dataclass(frozen=True)
class AttentionEstimate:
    """One attention call of a transformer block.

    Attributes:
        name: ``"self"`` or ``"cross"``, with the stage for multi-stage models.
        batch, heads, q_len, kv_len, head_dim: the call's shape.
        comfy_path: ComfyUI's attention on the target (``"sub_quad"``, ``"sdpa"``, ``"sdpa_math"``).
        comfy_bytes: its working bytes for this call (output included).
        math_bytes: torch's math SDPA for the call, fp16/bf16 reductions on (what the global patch replaces).
        tier, block_m, block_n: noflash's plan under ``budget_bytes``.
        peak_bytes: the call through noflash's override: the plan's peak (fake run of the real code) plus the
            ``(b, n, h·d)`` output copy.
        planner_bytes: the planner's own prediction for the tiles.
        budget_bytes: the budget the plan was made for (None: unlimited).
        verified: False when the extrapolated fake peak failed its check.
    """

    name: str
    batch: int
    heads: int
    q_len: int
    kv_len: int
    head_dim: int
    comfy_path: str
    comfy_bytes: int
    math_bytes: int
    tier: int
    block_m: int
    block_n: int
    peak_bytes: int
    planner_bytes: int
    budget_bytes: Optional[int]
    verified: bool = True


@dataclass(frozen=True)
class FFNEstimate:
    """The feed-forward of one stage.

    Attributes:
        tokens: tokens per batch item.
        width: intermediate width (the gated half for GEGLU).
        kind: ``"gelu"`` or ``"geglu"``.
        whole_bytes: peak of the unchunked FFN call (output included).
        chunked_bytes: peak with ``chunks`` token chunks.
        chunks: chunk count used for ``chunked_bytes``.
    """

    tokens: int
    width: int
    kind: str
    whole_bytes: int
    chunked_bytes: int
    chunks: int


@dataclass(frozen=True)
class TextEncoderEstimate:
    """One text encoder at the prompt's length.

    Attributes:
        name, display: the encoder.
        batch, tokens: the forward's batch (CLIP chunks) and sequence length.
        heads, head_dim: attention shape.
        weights_bytes: its weights (fp16).
        comfy_path: ComfyUI's attention there (``"basic"``, ``"sdpa"``, ``"sdpa_math"``).
        comfy_attention_bytes, noflash_attention_bytes: one attention call's working bytes.
        tier: noflash's tier for it (0: noflash's own fast path, torch SDPA on a small call).
        working_comfy_bytes, working_noflash_bytes: the encoder's peak working set without weights.
    """

    name: str
    display: str
    batch: int
    tokens: int
    heads: int
    head_dim: int
    weights_bytes: int
    comfy_path: str
    comfy_attention_bytes: int
    noflash_attention_bytes: int
    tier: int
    working_comfy_bytes: int
    working_noflash_bytes: int


@dataclass(frozen=True)
class VAEEstimate:
    """The VAE decode.

    Attributes:
        name, display: the VAE.
        dtype: the VAE's dtype on the target (bf16 where the card has it, else fp32).
        tokens, channels, calls: mid-block attention shape (single head) and calls per decode.
        weights_bytes: VAE weights.
        comfy_path: ComfyUI's VAE attention there (``"split"``, ``"sdpa"``, ``"sdpa_math"``).
        comfy_attention_bytes, noflash_attention_bytes: one attention call (0 for a VAE without attention).
        tier: noflash's tier (0 when there is no attention).
        conv_bytes: the decoder's other working memory (measured model; None where not measured).
        working_comfy_bytes, working_noflash_bytes: peak working set without weights.
    """

    name: str
    display: str
    dtype: str
    tokens: int
    channels: int
    calls: int
    weights_bytes: int
    comfy_path: str
    comfy_attention_bytes: int
    noflash_attention_bytes: int
    tier: int
    conv_bytes: Optional[int]
    working_comfy_bytes: int
    working_noflash_bytes: int


@dataclass(frozen=True)
class DenoiseEstimate:
    """The denoising step: one transformer block at a time (working memory) with the weights loaded.

    Attributes:
        latent_shape: ``(C, T, H, W)`` as ComfyUI's empty-latent nodes make it.
        token_grid: ``(t, h, w)`` after patching; ``video_tokens`` is their product.
        text_tokens: text tokens joined to self-attention (MMDiT), 0 for cross-attention models.
        tokens_per_call: the longest attention call's query length.
        weights_bytes, block_weights_bytes: all weights, one block's share.
        weights_format: ``"fp8"``, ``"fp16"``, ``"bf16"`` or ``"fp32"``.
        weights_resident: all weights stay loaded (else streamed block by block, ComfyUI's low-VRAM mode).
        activation_bytes: ``5 × act`` around attention, the largest stage's.
        attention, ffn: every stage's attention calls and feed-forward.
        working_comfy_bytes, working_noflash_bytes, working_noflash_chunked_bytes: a block's peak working set
            (weights excluded) with ComfyUI's attention, noflash's, and noflash's with the FFN chunked.
        fits_comfy, fits_noflash, fits_noflash_chunked: the same with the loaded weights, against the VRAM.
    """

    latent_shape: Tuple[int, int, int, int]
    token_grid: Tuple[int, int, int]
    video_tokens: int
    text_tokens: int
    tokens_per_call: int
    weights_bytes: int
    block_weights_bytes: int
    weights_format: str
    weights_resident: bool
    activation_bytes: int
    attention: Tuple[AttentionEstimate, ...]
    ffn: Tuple[FFNEstimate, ...]
    working_comfy_bytes: int
    working_noflash_bytes: int
    working_noflash_chunked_bytes: int
    fits_comfy: Optional[bool]
    fits_noflash: Optional[bool]
    fits_noflash_chunked: Optional[bool]

    @property
    def loaded_bytes(self) -> int:
        """The weights on the device while a block runs: all of them, or one block's when streamed."""
        return self.weights_bytes if self.weights_resident else self.block_weights_bytes


@dataclass(frozen=True)
class Phase:
    """A part of the run that has to fit on its own: peak bytes with weights, ComfyUI's attention vs noflash.

    Attributes:
        name: ``"denoise"``, ``"text encoder"`` or ``"VAE decode"``.
        comfy_bytes: peak with ComfyUI's own attention.
        noflash_bytes: peak with the noflash nodes (for denoise: Attention Patcher and FFN Chunker).
        fits_comfy, fits_noflash: against the target's VRAM (None when unknown).
        nodes: the noflash nodes that give ``noflash_bytes``.
    """

    name: str
    comfy_bytes: int
    noflash_bytes: int
    fits_comfy: Optional[bool]
    fits_noflash: Optional[bool]
    nodes: Tuple[str, ...]


@dataclass(frozen=True)
class RunEstimate:
    """Memory estimate of one run: the denoise step, the text encoders and the VAE decode, each a phase that has to
    fit on its own, and the verdict.

    ``verdict`` is ``"fits"`` (every phase fits with ComfyUI's own attention), ``"noflash"`` (it fits only with the
    noflash nodes), ``"no"`` (a phase does not fit even then) or None when the VRAM is unknown.
    """

    model: str
    display: str
    width: int
    height: int
    frames: int
    batch: int
    dtype: str
    device: TargetDevice
    vram_bytes: Optional[int]
    denoise: DenoiseEstimate
    text_encoder_weights: str
    prompt_tokens: int
    text_encoders: Tuple[TextEncoderEstimate, ...]
    vae: Optional[VAEEstimate]
    phases: Tuple[Phase, ...]
    verdict: Optional[str]
    verdict_text: str
    advice: str
    precision: str = MATH_PRECISION
    notes: Tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> Dict[str, object]:
        """Plain-data form (JSON-ready)."""
        return asdict(self)

    def to_text(self) -> str:
        """The human-readable report (:func:`noflash_core.vram.report.report_text`)."""
        return report_text(self)

    def to_chart(self) -> Dict[str, object]:
        """The bar-chart data the ComfyUI node sends to the browser (:func:`noflash_core.vram.report.chart`)."""
        return chart(self)
