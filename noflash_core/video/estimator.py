"""Will a diffusion run fit on a given card? Denoising, text encoding and VAE decode, ComfyUI's attention vs noflash.

:func:`estimate_run` is the one estimator behind ``python -m noflash_core.video`` and the ComfyUI VRAM Probe node;
both print :mod:`noflash_core.video.report`. It takes a model family (:mod:`~noflash_core.video.families`), a size,
a target device and optionally the text encoders and prompt length, and predicts three phases, each of which has to
fit on its own (ComfyUI loads the models of one phase and offloads the others when memory is short):

- **denoise**: one transformer block's attention calls and feed-forward. ComfyUI's own attention on that device
  (:mod:`~noflash_core.video.comfy_attention`: sub-quadratic, math or fused SDPA) is compared with noflash's plan,
  which is predicted by running the real code on fake tensors (:mod:`noflash_core.memory.fake_peak`), and the FFN
  with and without chunking. Working memory of a block: ``5 × act`` around attention (residual, normalised copy,
  q, k, v; ``act`` = batch × tokens × width × element size) plus the call; ``2 × act`` plus the FFN around it.
- **text encoder**: every encoder of the workflow (weights of all of them, they load together), at the prompt's
  token count; activations are fp32 as in ComfyUI. ``attention_basic`` (or SDPA) against noflash's plan.
- **VAE decode**: the decoder's mid-block attention (split attention or SDPA against noflash), and the decoder's
  other working memory, measured on ComfyUI's decoders (:class:`~noflash_core.video.encoders.VAESpec`).

Totals include the weights. The target is a preset from :data:`noflash_core.device.PRESETS` (planned with
:func:`noflash_core.simulate_device` on meta tensors, nothing runs on this machine), or ``"this machine"``.

Precision: ComfyUI enables fp16/bf16 reductions in torch's math SDPA. The whole estimate runs with that flag fixed
on (:func:`~noflash_core.video.comfy_attention.math_reductions`), so the same inputs give the same numbers in a
plain process and inside ComfyUI.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..device import PRESETS, DeviceProfile, device_profile, get_preset, simulate_device
from ..memory.fake_peak import AttentionShape, predict_math_peak, predict_plan_peak
from ..memory.tracker import LiveBytesTracker
from ..units import dtype_name, parse_dtype
from ..units import format_bytes as _format_bytes
from .comfy_attention import (
    ComfyPaths,
    basic_bytes,
    comfy_paths,
    fused_sdpa_bytes,
    math_reductions,
    sub_quad_bytes,
    vae_split_bytes,
)
from .encoders import TextEncoderSpec, VAESpec, get_encoder, get_vae
from .families import AttentionStage, ModelFamily, attention_calls, get_family, latent_frames, stage_tokens

__all__ = [
    "MATH_PRECISION",
    "THIS_MACHINE",
    "AttentionEstimate",
    "FFNEstimate",
    "Phase",
    "RunEstimate",
    "TargetDevice",
    "TextEncoderEstimate",
    "VAEEstimate",
    "device_choices",
    "estimate_run",
    "format_bytes",
    "resolve_target",
]

THIS_MACHINE = "this machine"
MATH_PRECISION = "torch math SDPA with fp16/bf16 reductions on (ComfyUI's setting)"

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_DTYPE_ALIASES = {"float16": "fp16", "half": "fp16", "bfloat16": "bf16", "float32": "fp32", "float": "fp32"}
_UNLIMITED = 1 << 50
_MAX_FFN_CHUNKS = 64  # past this, per-chunk overhead grows and the output buffer dominates anyway
_META = torch.device("meta")
_TE_ELT = 4  # ComfyUI runs text encoders in fp32 (SDClipModel passes dtype=float32), weights stay fp16
_WEIGHT_BYTES = {"fp8": 1, "fp16": 2, "bf16": 2, "fp32": 4}


def format_bytes(n: Optional[float]) -> str:
    """Bytes in binary units (:func:`noflash_core.units.format_bytes`); None is ``"?"``."""
    return "?" if n is None else _format_bytes(n)


def device_choices() -> List[str]:
    """The target devices the CLI and the node offer: ``"this machine"`` and the presets."""
    return [THIS_MACHINE, *PRESETS]


# ---------------------------------------------------------------------------------------------- results


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
    """Memory estimate of one run; see the module docstring for the model.

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
    latent_shape: Tuple[int, int, int, int]
    token_grid: Tuple[int, int, int]
    video_tokens: int
    text_tokens: int
    tokens_per_call: int
    vram_bytes: Optional[int]
    weights_bytes: int
    block_weights_bytes: int
    activation_bytes: int
    attention: Tuple[AttentionEstimate, ...]
    ffn: Tuple[FFNEstimate, ...]
    working_comfy_bytes: int
    working_noflash_bytes: int
    working_noflash_chunked_bytes: int
    weights_resident: bool
    fits_comfy: Optional[bool]
    fits_noflash: Optional[bool]
    fits_noflash_chunked: Optional[bool]
    weights_format: str
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
        """The human-readable report (:func:`noflash_core.video.report.report_text`)."""
        from .report import report_text

        return report_text(self)

    def to_chart(self) -> Dict[str, object]:
        """The bar-chart data the ComfyUI node sends to the browser (:func:`~noflash_core.video.report.chart`)."""
        from .report import chart

        return chart(self)


# ---------------------------------------------------------------------------------------------- target device


def _simulated(profile: DeviceProfile, vram: Optional[int]) -> DeviceProfile:
    if vram is not None:
        profile = profile.with_memory(vram, vram)
    return replace(profile, simulated=True)


def resolve_target(device: Union[None, str, torch.device, DeviceProfile] = THIS_MACHINE,
                   vram_bytes: Optional[int] = None) -> Tuple[TargetDevice, DeviceProfile]:
    """The target device and the profile to plan with (memory set to the VRAM planned for).

    Args:
        device: a preset name or alias (``"gfx1030"``, ``"rdna2"``, ``"mps"``, ...), ``"this machine"`` (also
            None, ``"this-machine"``, ``"auto"``), a ``torch.device`` of this machine, or a ``DeviceProfile``.
        vram_bytes: overrides the device's memory.

    Raises:
        ValueError: an unknown name or a non-positive ``vram_bytes``.
    """
    if vram_bytes is not None and vram_bytes <= 0:
        raise ValueError(f"vram_bytes must be positive, got {vram_bytes}")
    if isinstance(device, DeviceProfile):
        base, key, real = device, device.name, not device.simulated
    elif isinstance(device, torch.device):
        base, key, real = device_profile(device), THIS_MACHINE, True
    elif device is None or str(device).strip().lower().replace("-", " ").replace("_", " ") in (THIS_MACHINE, "auto"):
        base, key, real = device_profile(None), THIS_MACHINE, True
    else:
        try:
            base = get_preset(str(device))
        except ValueError:
            raise ValueError(
                f"unknown device {device!r}; use 'this machine' or a preset: {', '.join(PRESETS)}"
            ) from None
        key, real = base.name, False
    vram = vram_bytes if vram_bytes is not None else base.total_bytes
    profile = _simulated(base, vram)
    size = "unknown memory" if vram is None else format_bytes(vram)
    if real and base.kind == "cpu":
        note = (f"this machine has no GPU: planned for its CPU with {size} of system RAM. Pick a GPU profile "
                f"(device: {', '.join(p for p in PRESETS if p != 'cpu')}) to plan for a card")
    elif real:
        note = f"planned for this machine's {base.description} with {size}"
    else:
        note = (f"planned for the {key} profile ({base.description}) with {size}, simulated on meta tensors: "
                "nothing runs on this machine")
    target = TargetDevice(key=key, description=base.description, kind=base.kind, vram_bytes=vram,
                          simulated=not real, paths=comfy_paths(base), note=note)
    return target, profile


# ---------------------------------------------------------------------------------------------- geometry


def _latent_and_grid(
    fam: ModelFamily, width: int, height: int, frames: int
) -> Tuple[Tuple[int, int, int, int], Tuple[int, int, int]]:
    """Latent ``(C, T, H, W)`` as ComfyUI's empty-latent nodes make it, and the token grid ``(t, h, w)``."""
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


def _stage_tokens(grid: Tuple[int, int, int], stage: AttentionStage) -> int:
    return stage_tokens(grid, stage)


# ---------------------------------------------------------------------------------------------- FFN


class _GEGLUFeedForward(nn.Module):
    """SD-style feed-forward: Linear to 2×width, ``a * gelu(gate)``, Linear back. Shapes ``(B, N, dim)``."""

    def __init__(self, dim: int, width: int, **kw) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, 2 * width, **kw)
        self.out = nn.Linear(width, dim, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, gate = self.proj(x).chunk(2, dim=-1)
        return self.out(a * nn.functional.gelu(gate))


def _ffn_module(kind: str, dim: int, width: int, dtype: torch.dtype, device: torch.device) -> nn.Module:
    kw = {"dtype": dtype, "device": device}
    if kind == "geglu":
        return _GEGLUFeedForward(dim, width, **kw)
    return nn.Sequential(nn.Linear(dim, width, **kw), nn.GELU(approximate="tanh"), nn.Linear(width, dim, **kw))


def _ffn_chunks(batch: int, tokens: int, width: int, kind: str, elt: int, budget: Optional[int]) -> int:
    """Chunks so one chunk's intermediates take at most half the budget (ffn_chunk's adaptive rule)."""
    per_token = batch * width * (3 if kind == "geglu" else 2) * elt
    if budget is None or budget >= _UNLIMITED:
        return 8
    return max(2, min(_MAX_FFN_CHUNKS, tokens, math.ceil(tokens * per_token / max(1, budget // 2))))


def _estimate_ffn(stage: AttentionStage, kind: str, batch: int, tokens: int, dtype: torch.dtype,
                  chunks: int) -> FFNEstimate:
    """Peak bytes of the stage's FFN on fake tensors, whole and in ``chunks`` chunks."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from ..ffn.chunk import chunked_forward

    dim = stage.heads * stage.head_dim
    peaks = []
    with FakeTensorMode(), torch.no_grad():
        module = _ffn_module(kind, dim, stage.ffn_dim, dtype, _META)
        x = torch.empty(batch, tokens, dim, dtype=dtype, device=_META)
        for fn in (module, chunked_forward(module, chunks)):
            with LiveBytesTracker() as tracker:
                out = fn(x)
                del out
            peaks.append(tracker.peak_bytes)
    return FFNEstimate(tokens, stage.ffn_dim, kind, peaks[0], peaks[1], chunks)


# ---------------------------------------------------------------------------------------------- attention


def _noflash_call(shape: AttentionShape, dtype: torch.dtype, budget: Optional[int], out_copy: bool,
                  whole_rows: bool = True):
    """``(plan, working bytes)`` of one call through noflash (tiles, plus the merged-heads output copy).

    ``whole_rows=False`` halves the query blocks of a plan that would take every row at once, as the VAE Patcher
    does.
    """
    plan, peak = predict_plan_peak(shape, dtype=dtype, device=_META, budget_bytes=budget or _UNLIMITED)
    if not whole_rows and (plan.tier == 0 or plan.block_m >= shape.q_len) and shape.q_len >= 32:
        block_m = max(16, 1 << (shape.q_len // 2).bit_length() - 1)
        plan, peak = predict_plan_peak(shape, dtype=dtype, device=_META, budget_bytes=budget or _UNLIMITED,
                                       block_m=block_m)
    out = shape.batch * shape.heads * shape.q_len * shape.ev * dtype.itemsize if out_copy else 0
    return plan, peak, peak.peak_bytes + out


def _comfy_diffusion_call(path: str, shape: AttentionShape, dtype: torch.dtype, free: int,
                          skip_reshape: bool, math_bytes: int) -> int:
    elt = dtype.itemsize
    b, h, length, s, d, dv = shape.batch, shape.heads, shape.q_len, shape.kv_len, shape.head_dim, shape.ev
    out = b * h * length * dv * elt  # attention_pytorch's (b, n, h·dv) output copy
    if path == "sub_quad":
        return sub_quad_bytes(b, h, length, s, d, dv, elt, free, skip_reshape=skip_reshape)
    if path == "sdpa_math":
        return math_bytes + out
    return fused_sdpa_bytes(b, h, length, dv, elt) + out


def _attention_budget(vram: Optional[int], resident: int) -> Optional[int]:
    """The planner's default budget at attention time: its share of what is free then."""
    if vram is None:
        return None
    from ..budget import FREE_MEMORY_FRACTION

    return max(1 << 20, int((vram - resident) * FREE_MEMORY_FRACTION))


def _free(vram: Optional[int], resident: int) -> int:
    return _UNLIMITED if vram is None else max(0, vram - resident)


def _estimate_attention(name: str, shape: AttentionShape, dtype: torch.dtype, budget: Optional[int],
                        paths: ComfyPaths, free: int, skip_reshape: bool) -> AttentionEstimate:
    math_peak = predict_math_peak(shape, dtype=dtype, device=_META).peak_bytes
    plan, peak, call_bytes = _noflash_call(shape, dtype, budget, out_copy=True)
    comfy = _comfy_diffusion_call(paths.diffusion, shape, dtype, free, skip_reshape, math_peak)
    return AttentionEstimate(
        name=name, batch=shape.batch, heads=shape.heads, q_len=shape.q_len, kv_len=shape.kv_len,
        head_dim=shape.head_dim, comfy_path=paths.diffusion, comfy_bytes=comfy, math_bytes=math_peak,
        tier=plan.tier, block_m=plan.block_m, block_n=plan.block_n, peak_bytes=call_bytes,
        planner_bytes=plan.peak_bytes, budget_bytes=budget, verified=peak.verified,
    )


# ---------------------------------------------------------------------------------------------- text encoders


def _estimate_text_encoder(spec: TextEncoderSpec, prompt_tokens: int, paths: ComfyPaths,
                           vram: Optional[int], resident: int, weight_elt: int) -> TextEncoderEstimate:
    """One encoder's attention call and working set (fp32 activations, as ComfyUI runs text encoders)."""
    batch, length = spec.tokens(prompt_tokens)
    h, d, elt = spec.heads, spec.head_dim, _TE_ELT
    inner = h * d
    shape = AttentionShape(batch, h, length, length, d)
    held = batch * length * (2 * spec.width + 3 * inner) * elt  # x, its norm, q, k, v (k, v repeated to all heads)
    mask = (h if spec.mask == "bias" else 1) * length * length * elt if spec.mask != "none" else 0
    budget = _attention_budget(vram, resident + held + mask)
    plan, _, noflash = _noflash_call(shape, torch.float32, budget, out_copy=True)
    if paths.text == "basic":
        comfy = basic_bytes(batch, h, length, length, d, d, elt, skip_reshape=spec.skip_reshape,
                            mask_copy=batch > 1 and spec.mask == "bias", upcast=False)
    elif paths.text == "sdpa_math":
        comfy = predict_math_peak(shape, dtype=torch.float32, device=_META).peak_bytes + batch * length * inner * elt
    else:
        comfy = fused_sdpa_bytes(batch, h, length, d, elt) + batch * length * inner * elt
    mlp = batch * length * (2 * spec.width + spec.ffn_dim * (3 if spec.gated else 2)) * elt
    return TextEncoderEstimate(
        name=spec.name, display=spec.display, batch=batch, tokens=length, heads=h, head_dim=d,
        weights_bytes=int(spec.params * weight_elt), comfy_path=paths.text, comfy_attention_bytes=comfy,
        noflash_attention_bytes=noflash, tier=plan.tier,
        working_comfy_bytes=mask + max(held + comfy, mlp), working_noflash_bytes=mask + max(held + noflash, mlp),
    )


# ---------------------------------------------------------------------------------------------- VAE


def _estimate_vae(spec: VAESpec, fam: ModelFamily, latent: Tuple[int, int, int, int], width: int, height: int,
                  frames: int, batch: int, profile: DeviceProfile, paths: ComfyPaths,
                  vram: Optional[int]) -> VAEEstimate:
    """The decode of the whole latent in one go (what ComfyUI tries before it falls back to tiles)."""
    # ComfyUI's vae_dtype: bf16 where the device has it, never on CPU (and not on RDNA2 and older AMD).
    vae_dtype = torch.bfloat16 if profile.bf16 and profile.kind != "cpu" else torch.float32
    elt = vae_dtype.itemsize
    weights = int(spec.params * elt)
    _, lat_t, lat_h, lat_w = latent
    lat_h, lat_w = lat_h * fam.vae_spatial // spec.spatial, lat_w * fam.vae_spatial // spec.spatial
    per_frame = spec.attention_frames == "one"
    tokens = lat_h * lat_w * (1 if per_frame else lat_t)
    calls = lat_t if per_frame else 1
    out_frames = frames if spec.temporal > 1 else 1
    conv = spec.conv_bytes(height, width, out_frames, elt)
    if conv is not None:
        conv = conv * batch
    comfy = noflash = tier = 0
    if spec.mid_channels:
        c = spec.mid_channels
        free = _free(vram, weights)
        if paths.vae == "split":
            comfy = vae_split_bytes(batch, c, tokens, elt, free)
        else:
            copies = 4 * batch * c * tokens * elt  # q, k, v made contiguous, the output transposed back
            if paths.vae == "sdpa_math":
                comfy = copies + predict_math_peak(AttentionShape(batch, 1, tokens, tokens, c), dtype=vae_dtype,
                                                   device=_META).peak_bytes
            else:
                comfy = copies + fused_sdpa_bytes(batch, 1, tokens, c, elt)
        shape = AttentionShape(batch, 1, tokens, tokens, c)
        plan, _, noflash = _noflash_call(shape, vae_dtype, _attention_budget(vram, weights), out_copy=True,
                                         whole_rows=False)
        tier = plan.tier
    base = conv or 0
    return VAEEstimate(
        name=spec.name, display=spec.display, dtype=str(vae_dtype).replace("torch.", ""), tokens=tokens,
        channels=spec.mid_channels, calls=calls, weights_bytes=weights, comfy_path=paths.vae,
        comfy_attention_bytes=comfy, noflash_attention_bytes=noflash, tier=tier, conv_bytes=conv,
        working_comfy_bytes=max(base, comfy), working_noflash_bytes=max(base, noflash),
    )


# ---------------------------------------------------------------------------------------------- entry point


def _parse_dtype(dtype: Union[str, torch.dtype]) -> Tuple[str, torch.dtype]:
    torch_dtype = parse_dtype(dtype, allowed=_DTYPES)
    return dtype_name(torch_dtype), torch_dtype


def _weight_format(name: str, what: str) -> str:
    key = str(name).strip().lower().replace("torch.", "")
    key = _DTYPE_ALIASES.get(key, key)
    if key.startswith(("fp8", "float8")):
        key = "fp8"
    if key not in _WEIGHT_BYTES:
        raise ValueError(f"unknown {what} format {name!r}; use fp8, fp16, bf16 or fp32")
    return key


def _encoder_specs(fam: ModelFamily,
                   text_encoders: Union[None, str, Sequence[Union[str, TextEncoderSpec]]]) -> List[TextEncoderSpec]:
    if text_encoders is None or (isinstance(text_encoders, str) and text_encoders.strip().lower() == "auto"):
        return [get_encoder(k) for k in fam.text_encoders]
    if isinstance(text_encoders, str):
        from .encoders import parse_encoders

        return [get_encoder(k) for k in parse_encoders(text_encoders)]
    return [e if isinstance(e, TextEncoderSpec) else get_encoder(e) for e in text_encoders]


def estimate_run(
    model: str,
    width: int,
    height: int,
    frames: int = 1,
    batch: int = 1,
    dtype: str = "fp16",
    vram_bytes: Optional[int] = None,
    *,
    device: Union[None, str, torch.device, DeviceProfile] = THIS_MACHINE,
    text_encoders: Union[None, str, Sequence[Union[str, TextEncoderSpec]]] = "auto",
    prompt_tokens: int = 256,
    vae: Union[None, str, VAESpec] = "auto",
    weights: Optional[str] = None,
    text_encoder_weights: str = "fp16",
) -> RunEstimate:
    """Predict the memory of one run on ``device`` and whether it fits.

    Args:
        model: a key of :data:`~noflash_core.video.families.MODEL_FAMILIES`, e.g. ``"wan2.2-5b"``.
        width, height: output pixels.
        frames: output frames (1 for image models).
        batch: batch of the transformer call (2 when CFG runs cond and uncond together).
        dtype: ``"fp16"``, ``"bf16"`` or ``"fp32"``: the diffusion model's activations and weights.
        vram_bytes: overrides the device's memory (a preset's, or this machine's total).
        device: a preset (``"gfx906"``, ``"gfx1030"``, ``"gfx1010"``, ``"mps"``, ``"arc"``, ``"cpu"``),
            ``"this machine"``, a ``torch.device`` or a ``DeviceProfile``.
        text_encoders: ``"auto"`` (the family's), ``"none"``, ``"clip-l+t5-xxl"`` style keys, or specs.
        prompt_tokens: prompt length in tokens before the encoder's padding and template.
        vae: ``"auto"`` (the family's), ``"none"``, a key of :data:`~noflash_core.video.encoders.VAES` or a spec.
        weights: the diffusion model's weight format when it differs from ``dtype`` (``"fp8"`` for fp8 files).
        text_encoder_weights: the text encoders' weight format (``"fp16"``; ``"fp8"`` for fp8-scaled files).
            ComfyUI computes text encoders in fp32 either way.

    Raises:
        ValueError: unknown model, device, encoder, VAE or dtype, or a size that makes no latent.
    """
    fam = get_family(model)
    name, torch_dtype = _parse_dtype(dtype)
    if batch <= 0:
        raise ValueError(f"batch must be positive, got {batch}")
    target, profile = resolve_target(device, vram_bytes)
    formats = (_weight_format(weights or name, "weights"),
               _weight_format(text_encoder_weights, "text_encoder_weights"))
    encoders = _encoder_specs(fam, text_encoders)
    vae_spec = None if vae is None or vae == "none" else (
        get_vae(fam.vae) if vae == "auto" else (vae if isinstance(vae, VAESpec) else get_vae(vae)))
    with math_reductions(True), simulate_device(profile):
        return _estimate(fam, width, height, frames, batch, name, torch_dtype, target, profile, encoders,
                         max(1, int(prompt_tokens)), vae_spec, formats)


@dataclass(frozen=True)
class _Geometry:
    fam: ModelFamily
    grid: Tuple[int, int, int]
    batch: int
    dtype: torch.dtype
    elt: int
    paths: ComfyPaths
    frames: int = 1


@dataclass
class _Blocks:
    attention: List[AttentionEstimate]
    ffn: List[FFNEstimate]
    activation_bytes: int
    working: Tuple[int, int, int]  # ComfyUI + whole FFN, noflash + whole FFN, noflash + chunked FFN
    notes: List[str]


def _estimate_blocks(g: _Geometry, vram: Optional[int], loaded_weights: int) -> _Blocks:
    """Every stage's attention calls and FFN, with ``loaded_weights`` on the device."""
    fam = g.fam
    out = _Blocks([], [], 0, (0, 0, 0), [])
    phases: Tuple[List[int], List[int], List[int]] = ([], [], [])
    # Tokens per call (reference images, audio streams, padding) come from the family (families.attention_calls).
    for stage_calls in attention_calls(fam, g.grid, g.frames):
        stage, q_len = stage_calls.stage, stage_calls.tokens
        act = g.batch * q_len * stage.heads * stage.head_dim * g.elt
        out.activation_bytes = max(out.activation_bytes, 5 * act)
        budget = _attention_budget(vram, loaded_weights + 5 * act)
        free = _free(vram, loaded_weights + 5 * act)
        stage_comfy = stage_noflash = 0
        for call in stage_calls.calls:
            name = call.name
            shape = AttentionShape(g.batch, call.heads, call.q_len, call.kv_len, call.head_dim)
            est = _estimate_attention(name, shape, g.dtype, budget, g.paths, free, fam.skip_reshape)
            out.attention.append(est)
            stage_comfy = max(stage_comfy, est.comfy_bytes)
            stage_noflash = max(stage_noflash, est.peak_bytes)
            if not est.verified:
                out.notes.append(f"{name}: the fake-run extrapolation was not verified; its peak is approximate")
        chunks = _ffn_chunks(g.batch, q_len, stage.ffn_dim, fam.ffn_kind, g.elt, budget)
        ffn = _estimate_ffn(stage, fam.ffn_kind, g.batch, q_len, g.dtype, chunks)
        out.ffn.append(ffn)
        phases[0].extend([5 * act + stage_comfy, 2 * act + ffn.whole_bytes])
        phases[1].extend([5 * act + stage_noflash, 2 * act + ffn.whole_bytes])
        phases[2].extend([5 * act + stage_noflash, 2 * act + ffn.chunked_bytes])
    out.working = (max(phases[0]), max(phases[1]), max(phases[2]))
    return out


def _fits(vram: Optional[int], need: int) -> Optional[bool]:
    return None if vram is None else need <= vram


def _estimate(fam: ModelFamily, width: int, height: int, frames: int, batch: int, dtype_name: str,
              torch_dtype: torch.dtype, target: TargetDevice, profile: DeviceProfile,
              encoders: List[TextEncoderSpec], prompt_tokens: int, vae_spec: Optional[VAESpec],
              formats: Tuple[str, str]) -> RunEstimate:
    vram = target.vram_bytes
    latent, grid = _latent_and_grid(fam, width, height, frames)
    elt = torch_dtype.itemsize
    weight_elt, te_weight_elt = _WEIGHT_BYTES[formats[0]], _WEIGHT_BYTES[formats[1]]
    weights = int(fam.nominal_params * weight_elt)
    block_weights = int(math.ceil(weights / max(1, fam.layers)))
    geometry = _Geometry(fam, grid, batch, torch_dtype, elt, target.paths, frames)

    weights_resident = vram is None or weights < vram
    blocks = _estimate_blocks(geometry, vram, weights if weights_resident else block_weights)
    if weights_resident and vram is not None and weights + blocks.working[2] > vram:
        blocks = _estimate_blocks(geometry, vram, block_weights)  # ComfyUI streams the weights instead
        weights_resident = False
    loaded = weights if weights_resident else block_weights
    fits = [_fits(vram, loaded + w) for w in blocks.working]
    notes = [target.note] + list(blocks.notes)
    if not weights_resident:
        notes.append(
            f"weights ({format_bytes(weights)}) do not fit next to the working set: assumed streamed block by "
            "block (ComfyUI low-VRAM mode), which is much slower"
        )
    if fam.joint_text_tokens and fam.name == "qwen-image":
        notes.append("Qwen-Image's prompt length varies; the transformer assumes 256 text tokens")
    if fam.assumed:
        notes.append(f"{fam.display}: assumed {'; '.join(fam.assumed)}")

    denoise_nodes = ("Attention Patcher",) if fits[1] or vram is None else ("Attention Patcher", "FFN Chunker")
    phases = [Phase("denoise", loaded + blocks.working[0],
                    loaded + (blocks.working[1] if denoise_nodes == ("Attention Patcher",) else blocks.working[2]),
                    fits[0], fits[1] if denoise_nodes == ("Attention Patcher",) else fits[2], denoise_nodes)]

    te_rows: List[TextEncoderEstimate] = []
    if encoders:
        te_weights = sum(int(e.params * te_weight_elt) for e in encoders)
        te_rows = [_estimate_text_encoder(e, prompt_tokens, target.paths, vram, te_weights, te_weight_elt)
                   for e in encoders]
        work_comfy = max(r.working_comfy_bytes for r in te_rows)
        work_noflash = max(r.working_noflash_bytes for r in te_rows)
        te_loaded = te_weights
        if vram is not None and te_weights + work_noflash > vram:
            # ComfyUI loads the text encoder partially and streams the rest (low-VRAM mode): one layer's share.
            te_loaded = max(int(e.params * te_weight_elt / e.layers) for e in encoders)
            notes.append(f"text-encoder weights ({format_bytes(te_weights)}) do not fit next to its working set: "
                         "assumed streamed layer by layer (ComfyUI low-VRAM mode), which is slower")
        comfy, noflash = te_loaded + work_comfy, te_loaded + work_noflash
        phases.append(Phase("text encoder", comfy, noflash, _fits(vram, comfy), _fits(vram, noflash),
                            ("CLIP Patcher",)))
        if target.paths.text == "basic" and any(r.comfy_attention_bytes > 2 * r.noflash_attention_bytes
                                                 for r in te_rows):
            notes.append("the text encoder runs ComfyUI's attention_basic here (full scores per layer); "
                         "NoFlash CLIP Patcher replaces it")

    vae_row = None
    if vae_spec is not None:
        vae_row = _estimate_vae(vae_spec, fam, latent, width, height, frames, batch, profile, target.paths, vram)
        comfy = vae_row.weights_bytes + vae_row.working_comfy_bytes
        noflash = vae_row.weights_bytes + vae_row.working_noflash_bytes
        phases.append(Phase("VAE decode", comfy, noflash, _fits(vram, comfy), _fits(vram, noflash),
                            ("VAE Patcher",) if vae_row.channels else ()))
        if vae_row.conv_bytes is None:
            notes.append(f"{vae_row.display}: only its attention and weights are estimated (decoder "
                         "convolutions not measured)")

    verdict, verdict_text, advice = _verdict(phases, vram, target)
    return RunEstimate(
        model=fam.name, display=fam.display, width=width, height=height, frames=frames, batch=batch,
        dtype=dtype_name, device=target, latent_shape=latent, token_grid=grid,
        video_tokens=grid[0] * grid[1] * grid[2], text_tokens=fam.joint_text_tokens,
        tokens_per_call=max(a.q_len for a in blocks.attention), vram_bytes=vram, weights_bytes=weights,
        block_weights_bytes=block_weights, activation_bytes=blocks.activation_bytes,
        attention=tuple(blocks.attention), ffn=tuple(blocks.ffn), working_comfy_bytes=blocks.working[0],
        working_noflash_bytes=blocks.working[1], working_noflash_chunked_bytes=blocks.working[2],
        weights_resident=weights_resident, fits_comfy=fits[0], fits_noflash=fits[1], fits_noflash_chunked=fits[2],
        weights_format=formats[0], text_encoder_weights=formats[1],
        prompt_tokens=prompt_tokens, text_encoders=tuple(te_rows), vae=vae_row, phases=tuple(phases),
        verdict=verdict, verdict_text=verdict_text, advice=advice, notes=tuple(notes),
    )


def _verdict(phases: List[Phase], vram: Optional[int], target: TargetDevice) -> Tuple[Optional[str], str, str]:
    """``(verdict, one line, what to change)``."""
    if vram is None:
        return None, "VRAM unknown: no verdict (give --vram or pick a device profile)", ""
    card = f"{format_bytes(vram)} ({target.key})"
    peak = max(phases, key=lambda p: p.comfy_bytes)
    if all(p.fits_comfy for p in phases):
        return ("fits", f"Fits in {card} with ComfyUI's own attention (largest: {peak.name}, "
                f"{format_bytes(peak.comfy_bytes)})", "")
    if all(p.fits_noflash for p in phases):
        needed = [p for p in phases if not p.fits_comfy]
        nodes = []
        for p in needed:
            nodes.extend(n for n in p.nodes if n not in nodes)
        changes = "; ".join(f"{p.name} {format_bytes(p.comfy_bytes)} -> {format_bytes(p.noflash_bytes)}"
                            for p in needed)
        return ("noflash", f"Fits in {card} only with noflash: " + ", ".join(f"NoFlash {n}" for n in nodes),
                f"Add {', '.join('NoFlash ' + n for n in nodes)} ({changes}).")
    failing = [p for p in phases if not p.fits_noflash]
    advice = []
    for p in failing:
        if p.name == "denoise":
            advice.append(f"denoise needs {format_bytes(p.noflash_bytes)} even with noflash: lower the resolution "
                          "or frames (tokens grow with both), use fp8 weights, or a card with more memory")
        elif p.name == "text encoder":
            advice.append(f"the text encoder needs {format_bytes(p.noflash_bytes)}: use an fp8 text-encoder file or "
                          "a shorter prompt")
        else:
            advice.append(f"VAE decode needs {format_bytes(p.noflash_bytes)}: use VAE Decode (Tiled)")
    return ("no", f"Does not fit in {card}, even with noflash ({', '.join(p.name for p in failing)})",
            "; ".join(advice) + ".")
