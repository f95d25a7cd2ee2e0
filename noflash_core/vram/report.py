"""What an estimate looks like: the text report (CLI, and the VRAM Probe's full text) and the chart data the
ComfyUI extension draws (one bar per component against a line at the card's VRAM, and a one-line verdict).

Both are made from a :class:`~noflash_core.vram.results.RunEstimate` only (read by attribute; this module does not
import the result types), so the CLI and the node show the same numbers.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

from ..units import format_bytes
from .comfy_attention import PATH_NAMES

__all__ = ["CHART_VERSION", "chart", "report_text"]

CHART_VERSION = 1


_fmt = format_bytes


def _fits(fits: Optional[bool]) -> str:
    return "?" if fits is None else ("fits" if fits else "does NOT fit")


def _plan(tier: int, block_m: int, block_n: int) -> str:
    return "torch SDPA (small)" if tier == 0 else f"tier {tier}, blocks {block_m}x{block_n}"


def _title(r) -> str:
    frames = f", {r.frames} frames" if r.frames > 1 else ""
    return f"{r.display}: {r.width}x{r.height}{frames}, batch {r.batch}, {r.dtype}"


def _header(r) -> List[str]:
    paths = r.device.paths
    lines = [
        _title(r),
        f"  target: {r.device.note}",
        f"  ComfyUI's attention there: denoise {PATH_NAMES[paths.diffusion]}, text encoder {PATH_NAMES[paths.text]}, "
        f"VAE {PATH_NAMES[paths.vae]}",
        f"  math SDPA figures: {r.precision}",
        "",
        f"VERDICT: {r.verdict_text}",
    ]
    if r.advice:
        lines.append(f"  {r.advice}")
    return lines


def _memory(r) -> str:
    memory = "system RAM" if r.device.kind == "cpu" else "VRAM"
    return f"unknown {memory}" if r.vram_bytes is None else f"{_fmt(r.vram_bytes)} {memory}"


def _denoise_lines(r) -> List[str]:
    d = r.denoise
    c, t, h, w = d.latent_shape
    lines = [
        "",
        "Denoise (one transformer block at a time)",
        f"  latent {c}x{t}x{h}x{w} -> token grid {d.token_grid[0]}x{d.token_grid[1]}x{d.token_grid[2]} = "
        f"{d.video_tokens:,} tokens" + (f" + {d.text_tokens} text tokens" if d.text_tokens else ""),
        f"  tokens per attention call: {d.tokens_per_call:,}",
        f"  weights: {_fmt(d.weights_bytes)} ({d.weights_format}, "
        f"{'resident' if d.weights_resident else 'streamed'}); "
        f"activations around attention: {_fmt(d.activation_bytes)}",
        "",
        f"  attention call          ComfyUI ({PATH_NAMES[r.device.paths.diffusion]}){'':<4} math SDPA    "
        "noflash plan                        noflash",
    ]
    for a in d.attention:
        budget = "" if a.budget_bytes is None else f" (budget {_fmt(a.budget_bytes)})"
        lines.append(
            f"  {a.name:<22}  {_fmt(a.comfy_bytes):>12}{'':<16} {_fmt(a.math_bytes):>10}   "
            f"{_plan(a.tier, a.block_m, a.block_n) + budget:<34} {_fmt(a.peak_bytes):>10}"
        )
        lines.append(f"    ({a.batch}x{a.heads} heads, L={a.q_len:,}, S={a.kv_len:,}, head dim {a.head_dim})")
    for i, f in enumerate(d.ffn):
        label = f"FFN{'' if len(d.ffn) == 1 else f' stage {i + 1}'}"
        lines.append(
            f"  {label}: width {f.width} ({f.kind}), {f.tokens:,} tokens: whole {_fmt(f.whole_bytes)}, "
            f"in {f.chunks} chunks {_fmt(f.chunked_bytes)}"
        )
    lines.append(f"  peak memory (weights included) against {_memory(r)}:")
    for label, work, fits in (
        ("ComfyUI attention, whole FFN", d.working_comfy_bytes, d.fits_comfy),
        ("noflash, whole FFN", d.working_noflash_bytes, d.fits_noflash),
        ("noflash, chunked FFN", d.working_noflash_chunked_bytes, d.fits_noflash_chunked),
    ):
        lines.append(f"    {label:<30} {_fmt(d.loaded_bytes + work):>10}   {_fits(fits)}")
    return lines


def _text_encoder_lines(r) -> List[str]:
    if not r.text_encoders:
        return []
    lines = ["", f"Text encoder (prompt of {r.prompt_tokens} tokens, fp32 activations, "
                 f"{r.text_encoder_weights} weights)"]
    for e in r.text_encoders:
        lines.append(
            f"  {e.display}: {e.batch} x {e.tokens:,} tokens, {e.heads} heads of {e.head_dim}, weights "
            f"{_fmt(e.weights_bytes)}; attention call: {PATH_NAMES[e.comfy_path]} "
            f"{_fmt(e.comfy_attention_bytes)}, noflash {_fmt(e.noflash_attention_bytes)} "
            f"({_plan(e.tier, 0, 0) if e.tier == 0 else f'tier {e.tier}'})"
        )
    return lines


def _vae_lines(r) -> List[str]:
    v = r.vae
    if v is None:
        return []
    lines = ["", f"VAE decode ({v.display}, {v.dtype})"]
    if v.channels:
        lines.append(
            f"  mid-block attention: {v.tokens:,} tokens x {v.channels} channels, {v.calls} call(s): "
            f"{PATH_NAMES[v.comfy_path]} {_fmt(v.comfy_attention_bytes)}, noflash "
            f"{_fmt(v.noflash_attention_bytes)} (tier {v.tier})"
        )
    else:
        lines.append("  no attention in this decoder")
    lines.append(f"  weights {_fmt(v.weights_bytes)}; decoder convolutions "
                 f"{'not measured' if v.conv_bytes is None else _fmt(v.conv_bytes)}")
    return lines


def _phase_lines(r) -> List[str]:
    lines = ["", f"Phases (each has to fit on its own; weights included) against {_memory(r)}:"]
    for p in r.phases:
        lines.append(f"  {p.name:<13} ComfyUI {_fmt(p.comfy_bytes):>10} {_fits(p.fits_comfy):<13} "
                     f"noflash {_fmt(p.noflash_bytes):>10} {_fits(p.fits_noflash):<13} "
                     f"({', '.join('NoFlash ' + n for n in p.nodes) or 'nothing to patch'})")
    lines.extend(f"  note: {note}" for note in r.notes)
    return lines


def report_text(r) -> str:
    """The human-readable report of a :class:`~noflash_core.vram.results.RunEstimate`: the verdict, then each
    phase (denoise, text encoder, VAE decode) in detail, then the phases side by side and the notes."""
    sections = (_header, _denoise_lines, _text_encoder_lines, _vae_lines, _phase_lines)
    return "\n".join(line for section in sections for line in section(r))


def _component(name: str, label: str, n: int, kind: str, phase: str, path: Optional[str],
               fits: Optional[bool] = None, detail: str = "") -> Dict[str, Any]:
    return {"name": name, "label": label, "bytes": int(n), "kind": kind, "phase": phase, "path": path,
            "fits": fits, "detail": detail}


def _denoise_parts(r) -> List[Dict[str, Any]]:
    """The denoise step's pieces: loaded weights, activations, the largest attention call both ways, the FFN."""
    d = r.denoise
    ffn_chunked = max(f.chunked_bytes for f in d.ffn)
    return [
        _component("weights", "weights" + ("" if d.weights_resident else " (streamed)"), d.loaded_bytes, "part",
                   "denoise", None, detail=f"{r.display}, {r.dtype}"),
        _component("activations", "activations", d.activation_bytes, "part", "denoise", None,
                   detail="around one attention call"),
        _component("attention_comfy", f"attention · ComfyUI {PATH_NAMES[r.device.paths.diffusion]}",
                   max(a.comfy_bytes for a in d.attention), "part", "denoise", "comfy",
                   detail=f"{d.tokens_per_call:,} tokens per call"),
        _component("attention_noflash", "attention · noflash", max(a.peak_bytes for a in d.attention), "part",
                   "denoise", "noflash", detail=", ".join(f"{a.name}: tier {a.tier}" for a in d.attention)),
        _component("ffn", "FFN", max(f.whole_bytes for f in d.ffn), "part", "denoise", None,
                   detail=f"chunked: {_fmt(ffn_chunked)}"),
    ]


def chart(r) -> Dict[str, Any]:
    """Chart data for the browser: components (bytes), the card's VRAM, the verdict and the full text.

    ``kind`` is ``"part"`` for a piece of the denoise step and ``"total"`` for a phase's peak with its weights;
    ``path`` is ``"comfy"``, ``"noflash"`` or None.
    """
    paths = r.device.paths
    comps = _denoise_parts(r)
    comfy_names = {"denoise": PATH_NAMES[paths.diffusion], "text encoder": PATH_NAMES[paths.text],
                   "VAE decode": PATH_NAMES[paths.vae]}
    for p in r.phases:
        key = p.name.split()[0].lower()
        comps.append(_component(f"{key}_comfy", f"{p.name} · ComfyUI", p.comfy_bytes, "total", p.name, "comfy",
                                p.fits_comfy, f"ComfyUI's {comfy_names[p.name]}, weights included"))
        comps.append(_component(f"{key}_noflash", f"{p.name} · noflash", p.noflash_bytes, "total", p.name,
                                "noflash", p.fits_noflash,
                                "with " + (", ".join("NoFlash " + n for n in p.nodes) or "nothing to patch")))
    frames = f" · {r.frames} frames" if r.frames > 1 else ""
    return {
        "version": CHART_VERSION,
        "title": f"{r.display} · {r.width}×{r.height}{frames} · batch {r.batch} · {r.dtype}",
        "device": {"key": r.device.key, "description": r.device.description, "kind": r.device.kind,
                   "simulated": r.device.simulated, "note": r.device.note},
        "vram_bytes": r.vram_bytes,
        "verdict": r.verdict,
        "verdict_text": r.verdict_text,
        "advice": r.advice,
        "precision": r.precision,
        "components": comps,
        "text": report_text(r),
    }
