"""Will a diffusion run fit? Attention and feed-forward memory of one model at one resolution and length.

:func:`estimate_run` turns a model family (:mod:`noflash_core.video.families`), a resolution, a frame count and
a batch into the attention calls and feed-forward activations of one transformer block, and predicts the
memory of each by running the real code on fake tensors (:mod:`noflash_core.memory.fake_peak`): torch's math SDPA,
noflash's planned tier, and the FFN with and without :mod:`noflash_core.ffn.chunk` chunking. Nothing is
allocated, so a 75k-token Wan 14B call is planned in about a second on a CPU.

Memory model of one block (working bytes on top of the weights):

- attention phase: ``5 × act`` (residual ``x``, its normalised copy, ``q``, ``k``, ``v``; ``act`` =
  batch × tokens × width × element size) plus the attention call's peak, output included;
- feed-forward phase: ``2 × act`` (``x`` and its normalised copy) plus the FFN's peak, output included.

Weights count in full when they fit next to the working set, else one block's share (ComfyUI's low-VRAM mode
streams the others in). The noflash attention budget is the planner's default share
(:data:`noflash_core.budget.FREE_MEMORY_FRACTION`) of what is left at attention time. The VAE decode, text
encoders and allocator fragmentation are not included.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Tuple, Union

import torch
from torch import nn

from ..memory.fake_peak import AttentionShape, predict_math_peak, predict_plan_peak
from ..memory.tracker import LiveBytesTracker
from ..units import dtype_name, format_bytes, parse_dtype
from .families import AttentionStage, ModelFamily, get_family

__all__ = ["AttentionEstimate", "FFNEstimate", "RunEstimate", "estimate_run", "format_bytes"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_UNLIMITED = 1 << 60
_MAX_FFN_CHUNKS = 64  # past this, per-chunk overhead grows and the output buffer dominates anyway
_GiB = 1024**3


@dataclass(frozen=True)
class AttentionEstimate:
    """One attention call of a block.

    Attributes:
        name: ``"self"`` or ``"cross"``, with the stage for multi-stage models.
        batch, heads, q_len, kv_len, head_dim: the call's shape.
        math_bytes: torch math SDPA's peak for the call (fake run).
        tier, block_m, block_n: noflash's plan under ``budget_bytes``.
        peak_bytes: that plan's peak (fake run of the real code).
        planner_bytes: the planner's own prediction for it.
        budget_bytes: the budget the plan was made for (None: unlimited).
        verified: False when the extrapolated fake peak failed its check.
    """

    name: str
    batch: int
    heads: int
    q_len: int
    kv_len: int
    head_dim: int
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
class RunEstimate:
    """Memory estimate of one run; see the module docstring for the model.

    The three verdicts compare the peak working set plus weights with ``vram_bytes``: math SDPA with the
    whole FFN (what runs without noflash), noflash attention with the whole FFN, and noflash attention with
    the chunked FFN. They are None when no VRAM size is known.
    """

    model: str
    display: str
    width: int
    height: int
    frames: int
    batch: int
    dtype: str
    device: str
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
    working_math_bytes: int
    working_noflash_bytes: int
    working_noflash_chunked_bytes: int
    weights_resident: bool
    fits_math: Optional[bool]
    fits_noflash: Optional[bool]
    fits_noflash_chunked: Optional[bool]
    notes: Tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> Dict[str, object]:
        """Plain-data form (JSON-ready)."""
        return asdict(self)

    def to_text(self) -> str:
        """A human-readable report."""
        return "\n".join(_report_lines(self))


# ---------------------------------------------------------------------------------------------- geometry


def _latent_and_grid(
    fam: ModelFamily, width: int, height: int, frames: int
) -> Tuple[Tuple[int, int, int, int], Tuple[int, int, int]]:
    """Latent ``(C, T, H, W)`` as ComfyUI's empty-latent nodes make it, and the token grid ``(t, h, w)``."""
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


def _stage_tokens(grid: Tuple[int, int, int], stage: AttentionStage) -> int:
    t, h, w = grid
    d = stage.downsample
    for _ in range(int(math.log2(d))):  # stride-2 convs with padding 1: ceil(x / 2) per level
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    return t * h * w


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


def _estimate_ffn(
    stage: AttentionStage, kind: str, batch: int, tokens: int, dtype: torch.dtype, device: torch.device, chunks: int
) -> FFNEstimate:
    """Peak bytes of the stage's FFN on fake tensors, whole and in ``chunks`` chunks."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from ..ffn.chunk import chunked_forward

    dim = stage.heads * stage.head_dim
    peaks = []
    with FakeTensorMode(), torch.no_grad():
        module = _ffn_module(kind, dim, stage.ffn_dim, dtype, device)
        x = torch.empty(batch, tokens, dim, dtype=dtype, device=device)
        for fn in (module, chunked_forward(module, chunks)):
            with LiveBytesTracker() as tracker:
                out = fn(x)
                del out
            peaks.append(tracker.peak_bytes)
    return FFNEstimate(tokens, stage.ffn_dim, kind, peaks[0], peaks[1], chunks)


# ---------------------------------------------------------------------------------------------- attention


def _warm_device_probes(device: torch.device) -> None:
    """Run one tiny real noflash call so device capability probes are cached from real tensors, not fakes."""
    if device.type == "cpu":
        return
    backend = getattr(torch, device.type, None)
    if backend is None or not backend.is_available():
        return
    from ..sdpa import scaled_dot_product_attention

    x = torch.zeros(1, 1, 32, 16, device=device, dtype=torch.float16)
    scaled_dot_product_attention(x, x, x, tier=2, block_m=16, block_n=16)


def _plannable_device(device: torch.device) -> Tuple[torch.device, Optional[str]]:
    """``device`` when fake tensors of it work in this torch build, else CPU and a note saying so."""
    if device.type in ("cpu", "meta"):
        return torch.device("cpu"), None
    from torch._subclasses.fake_tensor import FakeTensorMode

    try:
        with FakeTensorMode():
            torch.empty(2, 2, device=device)[:, :1]  # indexing needs the device's guard in this build
    except (RuntimeError, AssertionError):
        return torch.device("cpu"), (
            f"this torch build has no {device.type} support, so the plan follows noflash's CPU rules (smaller "
            "blocks, fp32 copies of half operands): a conservative peak"
        )
    return device, None


def _estimate_attention(
    name: str, shape: AttentionShape, dtype: torch.dtype, device: torch.device, budget: Optional[int]
) -> AttentionEstimate:
    math_peak = predict_math_peak(shape, dtype=dtype, device=device)
    plan, peak = predict_plan_peak(shape, dtype=dtype, device=device, budget_bytes=budget or _UNLIMITED)
    return AttentionEstimate(
        name=name,
        batch=shape.batch,
        heads=shape.heads,
        q_len=shape.q_len,
        kv_len=shape.kv_len,
        head_dim=shape.head_dim,
        math_bytes=math_peak.peak_bytes,
        tier=plan.tier,
        block_m=plan.block_m,
        block_n=plan.block_n,
        peak_bytes=peak.peak_bytes,
        planner_bytes=plan.peak_bytes,
        budget_bytes=budget,
        verified=peak.verified,
    )


def _attention_budget(vram: Optional[int], resident: int) -> Optional[int]:
    """The planner's default budget at attention time: its share of what is free then."""
    if vram is None:
        return None
    from ..budget import FREE_MEMORY_FRACTION

    return max(1 << 20, int((vram - resident) * FREE_MEMORY_FRACTION))


# ---------------------------------------------------------------------------------------------- entry point


def _parse_dtype(dtype: Union[str, torch.dtype]) -> Tuple[str, torch.dtype]:
    torch_dtype = parse_dtype(dtype, allowed=_DTYPES)
    return dtype_name(torch_dtype), torch_dtype


def estimate_run(
    model: str,
    width: int,
    height: int,
    frames: int = 1,
    batch: int = 1,
    dtype: str = "fp16",
    vram_bytes: Optional[int] = None,
    *,
    device: Union[str, torch.device] = "cuda",
) -> RunEstimate:
    """Predict attention and FFN memory of one denoising step and whether it fits in ``vram_bytes``.

    Args:
        model: a key of :data:`~noflash_core.video.families.MODEL_FAMILIES`, e.g. ``"wan2.2-5b"``.
        width, height: output pixels.
        frames: output frames (1 for image models).
        batch: batch of the transformer call (2 when CFG runs cond and uncond together).
        dtype: ``"fp16"``, ``"bf16"`` or ``"fp32"``: activations and weights.
        vram_bytes: device memory; None gives the numbers without a verdict (and an unlimited budget).
        device: the device type the plan is made for (fake tensors: this device need not be present).

    Returns:
        A :class:`RunEstimate`.

    Raises:
        ValueError: unknown model or dtype, or a size that makes no latent.
    """
    fam = get_family(model)
    name, torch_dtype = _parse_dtype(dtype)
    if batch <= 0:
        raise ValueError(f"batch must be positive, got {batch}")
    if vram_bytes is not None and vram_bytes <= 0:
        raise ValueError(f"vram_bytes must be positive, got {vram_bytes}")
    dev, device_note = _plannable_device(torch.device(device))
    _warm_device_probes(dev)
    latent, grid = _latent_and_grid(fam, width, height, frames)
    elt = torch.empty((), dtype=torch_dtype, device="meta").element_size()
    weights = int(fam.nominal_params * elt)
    block_weights = int(math.ceil(weights / max(1, fam.layers)))
    geometry = _Geometry(fam, grid, batch, torch_dtype, elt, dev)

    weights_resident = vram_bytes is None or weights < vram_bytes
    blocks = _estimate_blocks(geometry, vram_bytes, weights if weights_resident else block_weights)
    if weights_resident and vram_bytes is not None and weights + blocks.working[2] > vram_bytes:
        blocks = _estimate_blocks(geometry, vram_bytes, block_weights)  # ComfyUI streams the weights instead
        weights_resident = False
    loaded = weights if weights_resident else block_weights
    verdicts = [None if vram_bytes is None else loaded + w <= vram_bytes for w in blocks.working]
    notes = ([device_note] if device_note else []) + list(blocks.notes)
    if not weights_resident:
        notes.append(
            f"weights ({format_bytes(weights)}) do not fit next to the working set: assumed streamed block by "
            "block (ComfyUI low-VRAM mode), which is much slower"
        )
    if fam.name == "qwen-image":
        notes.append("Qwen-Image's prompt length varies; 256 text tokens are assumed")
    return RunEstimate(
        model=fam.name,
        display=fam.display,
        width=width,
        height=height,
        frames=frames,
        batch=batch,
        dtype=name,
        device=str(dev),
        latent_shape=latent,
        token_grid=grid,
        video_tokens=grid[0] * grid[1] * grid[2],
        text_tokens=fam.joint_text_tokens,
        tokens_per_call=max(a.q_len for a in blocks.attention),
        vram_bytes=vram_bytes,
        weights_bytes=weights,
        block_weights_bytes=block_weights,
        activation_bytes=blocks.activation_bytes,
        attention=tuple(blocks.attention),
        ffn=tuple(blocks.ffn),
        working_math_bytes=blocks.working[0],
        working_noflash_bytes=blocks.working[1],
        working_noflash_chunked_bytes=blocks.working[2],
        weights_resident=weights_resident,
        fits_math=verdicts[0],
        fits_noflash=verdicts[1],
        fits_noflash_chunked=verdicts[2],
        notes=tuple(notes),
    )


@dataclass(frozen=True)
class _Geometry:
    fam: ModelFamily
    grid: Tuple[int, int, int]
    batch: int
    dtype: torch.dtype
    elt: int
    device: torch.device


@dataclass
class _Blocks:
    attention: List[AttentionEstimate]
    ffn: List[FFNEstimate]
    activation_bytes: int
    working: Tuple[int, int, int]  # math + whole FFN, noflash + whole FFN, noflash + chunked FFN
    notes: List[str]


def _estimate_blocks(g: _Geometry, vram: Optional[int], loaded_weights: int) -> _Blocks:
    """Every stage's attention calls and FFN, with ``loaded_weights`` on the device."""
    fam = g.fam
    out = _Blocks([], [], 0, (0, 0, 0), [])
    phases: Tuple[List[int], List[int], List[int]] = ([], [], [])
    multi = len(fam.stages) > 1
    for i, stage in enumerate(fam.stages):
        q_len = _stage_tokens(g.grid, stage) + fam.joint_text_tokens
        act = g.batch * q_len * stage.heads * stage.head_dim * g.elt
        out.activation_bytes = max(out.activation_bytes, 5 * act)
        budget = _attention_budget(vram, loaded_weights + 5 * act)
        suffix = f" (stage {i + 1}, /{stage.downsample})" if multi else ""
        calls = [("self" + suffix, q_len)]
        if fam.cross_tokens:
            calls.append(("cross" + suffix, fam.cross_tokens))
        stage_math = stage_noflash = 0
        for name, kv_len in calls:
            shape = AttentionShape(g.batch, stage.heads, q_len, kv_len, stage.head_dim)
            est = _estimate_attention(name, shape, g.dtype, g.device, budget)
            out.attention.append(est)
            stage_math = max(stage_math, est.math_bytes)
            stage_noflash = max(stage_noflash, est.peak_bytes)
            if not est.verified:
                out.notes.append(f"{name}: the fake-run extrapolation was not verified; its peak is approximate")
        chunks = _ffn_chunks(g.batch, q_len, stage.ffn_dim, fam.ffn_kind, g.elt, budget)
        ffn = _estimate_ffn(stage, fam.ffn_kind, g.batch, q_len, g.dtype, g.device, chunks)
        out.ffn.append(ffn)
        phases[0].extend([5 * act + stage_math, 2 * act + ffn.whole_bytes])
        phases[1].extend([5 * act + stage_noflash, 2 * act + ffn.whole_bytes])
        phases[2].extend([5 * act + stage_noflash, 2 * act + ffn.chunked_bytes])
    out.working = (max(phases[0]), max(phases[1]), max(phases[2]))
    return out


# ---------------------------------------------------------------------------------------------- report


def _verdict(fits: Optional[bool]) -> str:
    return "?" if fits is None else ("fits" if fits else "does NOT fit")


def _report_lines(r: RunEstimate) -> List[str]:
    c, t, h, w = r.latent_shape
    lines = [
        f"{r.display}: {r.width}x{r.height}, {r.frames} frame(s), batch {r.batch}, {r.dtype}, planned for {r.device}",
        f"  latent {c}x{t}x{h}x{w} -> token grid {r.token_grid[0]}x{r.token_grid[1]}x{r.token_grid[2]} = "
        f"{r.video_tokens:,} tokens" + (f" + {r.text_tokens} text tokens" if r.text_tokens else ""),
        f"  tokens per attention call: {r.tokens_per_call:,}",
        f"  weights: {format_bytes(r.weights_bytes)} ({'resident' if r.weights_resident else 'streamed'}); "
        f"activations around attention: {format_bytes(r.activation_bytes)}",
        "",
        "  attention call          math SDPA     noflash plan                         peak   planner's own",
    ]
    for a in r.attention:
        plan = "torch SDPA (small)" if a.tier == 0 else f"tier {a.tier}, blocks {a.block_m}x{a.block_n}"
        budget = "" if a.budget_bytes is None else f" (budget {format_bytes(a.budget_bytes)})"
        lines.append(
            f"  {a.name:<22}  {format_bytes(a.math_bytes):>10}    {plan + budget:<36} "
            f"{format_bytes(a.peak_bytes):>10}  {format_bytes(a.planner_bytes):>10}"
        )
        lines.append(f"    ({a.batch}x{a.heads} heads, L={a.q_len:,}, S={a.kv_len:,}, head dim {a.head_dim})")
    lines.append("")
    for i, f in enumerate(r.ffn):
        label = f"FFN{'' if len(r.ffn) == 1 else f' stage {i + 1}'}"
        lines.append(
            f"  {label}: width {f.width} ({f.kind}), {f.tokens:,} tokens: whole {format_bytes(f.whole_bytes)}, "
            f"in {f.chunks} chunks {format_bytes(f.chunked_bytes)}"
        )
    lines.append("")
    vram = "unknown VRAM" if r.vram_bytes is None else f"{format_bytes(r.vram_bytes)} VRAM"
    lines.append(f"  peak working memory (+ weights) against {vram}:")
    for label, work, fits in (
        ("math SDPA, whole FFN", r.working_math_bytes, r.fits_math),
        ("noflash, whole FFN", r.working_noflash_bytes, r.fits_noflash),
        ("noflash, chunked FFN", r.working_noflash_chunked_bytes, r.fits_noflash_chunked),
    ):
        lines.append(f"    {label:<22} {format_bytes(work):>10}   {_verdict(fits)}")
    for note in r.notes:
        lines.append(f"  note: {note}")
    return lines
