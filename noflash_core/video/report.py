"""What an estimate looks like: the text report (CLI, and the VRAM Probe's full text) and the chart data the
ComfyUI extension draws (one bar per component against a line at the card's VRAM, and a one-line verdict).

Both are made from a :class:`~noflash_core.video.estimator.RunEstimate` only, so the CLI and the node show the
same numbers.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

from .comfy_attention import PATH_NAMES

__all__ = ["CHART_VERSION", "chart", "report_text"]

CHART_VERSION = 1


def _fmt(n: Optional[float]) -> str:
    from .estimator import format_bytes

    return format_bytes(n)


def _fits(fits: Optional[bool]) -> str:
    return "?" if fits is None else ("fits" if fits else "does NOT fit")


def _plan(tier: int, block_m: int, block_n: int) -> str:
    return "torch SDPA (small)" if tier == 0 else f"tier {tier}, blocks {block_m}x{block_n}"


def _title(r) -> str:
    frames = f", {r.frames} frames" if r.frames > 1 else ""
    return f"{r.display}: {r.width}x{r.height}{frames}, batch {r.batch}, {r.dtype}"


def report_text(r) -> str:
    """The human-readable report of a :class:`~noflash_core.video.estimator.RunEstimate`."""
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
    c, t, h, w = r.latent_shape
    lines += [
        "",
        "Denoise (one transformer block at a time)",
        f"  latent {c}x{t}x{h}x{w} -> token grid {r.token_grid[0]}x{r.token_grid[1]}x{r.token_grid[2]} = "
        f"{r.video_tokens:,} tokens" + (f" + {r.text_tokens} text tokens" if r.text_tokens else ""),
        f"  tokens per attention call: {r.tokens_per_call:,}",
        f"  weights: {_fmt(r.weights_bytes)} ({r.weights_format}, "
        f"{'resident' if r.weights_resident else 'streamed'}); "
        f"activations around attention: {_fmt(r.activation_bytes)}",
        "",
        f"  attention call          ComfyUI ({PATH_NAMES[paths.diffusion]}){'':<4} math SDPA    noflash plan"
        "                        noflash",
    ]
    for a in r.attention:
        budget = "" if a.budget_bytes is None else f" (budget {_fmt(a.budget_bytes)})"
        lines.append(
            f"  {a.name:<22}  {_fmt(a.comfy_bytes):>12}{'':<16} {_fmt(a.math_bytes):>10}   "
            f"{_plan(a.tier, a.block_m, a.block_n) + budget:<34} {_fmt(a.peak_bytes):>10}"
        )
        lines.append(f"    ({a.batch}x{a.heads} heads, L={a.q_len:,}, S={a.kv_len:,}, head dim {a.head_dim})")
    for i, f in enumerate(r.ffn):
        label = f"FFN{'' if len(r.ffn) == 1 else f' stage {i + 1}'}"
        lines.append(
            f"  {label}: width {f.width} ({f.kind}), {f.tokens:,} tokens: whole {_fmt(f.whole_bytes)}, "
            f"in {f.chunks} chunks {_fmt(f.chunked_bytes)}"
        )
    memory = "system RAM" if r.device.kind == "cpu" else "VRAM"
    vram = f"unknown {memory}" if r.vram_bytes is None else f"{_fmt(r.vram_bytes)} {memory}"
    loaded = r.weights_bytes if r.weights_resident else r.block_weights_bytes
    lines.append(f"  peak memory (weights included) against {vram}:")
    for label, work, fits in (
        ("ComfyUI attention, whole FFN", r.working_comfy_bytes, r.fits_comfy),
        ("noflash, whole FFN", r.working_noflash_bytes, r.fits_noflash),
        ("noflash, chunked FFN", r.working_noflash_chunked_bytes, r.fits_noflash_chunked),
    ):
        lines.append(f"    {label:<30} {_fmt(loaded + work):>10}   {_fits(fits)}")
    if r.text_encoders:
        lines += ["", f"Text encoder (prompt of {r.prompt_tokens} tokens, fp32 activations, "
                      f"{r.text_encoder_weights} weights)"]
        for e in r.text_encoders:
            lines.append(
                f"  {e.display}: {e.batch} x {e.tokens:,} tokens, {e.heads} heads of {e.head_dim}, weights "
                f"{_fmt(e.weights_bytes)}; attention call: {PATH_NAMES[e.comfy_path]} "
                f"{_fmt(e.comfy_attention_bytes)}, noflash {_fmt(e.noflash_attention_bytes)} "
                f"({_plan(e.tier, 0, 0) if e.tier == 0 else f'tier {e.tier}'})"
            )
    if r.vae is not None:
        v = r.vae
        lines += ["", f"VAE decode ({v.display}, {v.dtype})"]
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
    lines += ["", f"Phases (each has to fit on its own; weights included) against {vram}:"]
    for p in r.phases:
        lines.append(f"  {p.name:<13} ComfyUI {_fmt(p.comfy_bytes):>10} {_fits(p.fits_comfy):<13} "
                     f"noflash {_fmt(p.noflash_bytes):>10} {_fits(p.fits_noflash):<13} "
                     f"({', '.join('NoFlash ' + n for n in p.nodes) or 'nothing to patch'})")
    for note in r.notes:
        lines.append(f"  note: {note}")
    return "\n".join(lines)


def _component(name: str, label: str, n: int, kind: str, phase: str, path: Optional[str],
               fits: Optional[bool] = None, detail: str = "") -> Dict[str, Any]:
    return {"name": name, "label": label, "bytes": int(n), "kind": kind, "phase": phase, "path": path,
            "fits": fits, "detail": detail}


def chart(r) -> Dict[str, Any]:
    """Chart data for the browser: components (bytes), the card's VRAM, the verdict and the full text.

    ``kind`` is ``"part"`` for a piece of the denoise step and ``"total"`` for a phase's peak with its weights;
    ``path`` is ``"comfy"``, ``"noflash"`` or None.
    """
    paths = r.device.paths
    loaded = r.weights_bytes if r.weights_resident else r.block_weights_bytes
    comfy_attn = max(a.comfy_bytes for a in r.attention)
    noflash_attn = max(a.peak_bytes for a in r.attention)
    ffn_whole = max(f.whole_bytes for f in r.ffn)
    ffn_chunked = max(f.chunked_bytes for f in r.ffn)
    comps: List[Dict[str, Any]] = [
        _component("weights", "weights" + ("" if r.weights_resident else " (streamed)"), loaded, "part", "denoise",
                   None, detail=f"{r.display}, {r.dtype}"),
        _component("activations", "activations", r.activation_bytes, "part", "denoise", None,
                   detail="around one attention call"),
        _component("attention_comfy", f"attention · ComfyUI {PATH_NAMES[paths.diffusion]}", comfy_attn, "part",
                   "denoise", "comfy", detail=f"{r.tokens_per_call:,} tokens per call"),
        _component("attention_noflash", "attention · noflash", noflash_attn, "part", "denoise", "noflash",
                   detail=", ".join(f"{a.name}: tier {a.tier}" for a in r.attention)),
        _component("ffn", "FFN", ffn_whole, "part", "denoise", None,
                   detail=f"chunked: {_fmt(ffn_chunked)}"),
    ]
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
