"""``python -m noflash_core.video``: will this video or image run fit on my card?

Example::

    python -m noflash_core.video --model wan2.2-5b --width 1280 --height 704 --frames 121 --batch 2 \\
        --dtype fp16 --device gfx1030

Prints a verdict (fits / fits only with noflash / does not fit, and what to change), then the denoising step
(tokens per attention call, ComfyUI's own attention on that card, math SDPA, noflash's plan, the FFN with and
without chunking), the text encoders at the prompt's length and the VAE decode, each with weights included.
``--device`` takes a GPU profile (``gfx906``, ``gfx1030``, ... or the whole label ``--list`` prints, e.g.
``"gfx1030 · AMD Radeon RX 6800/6800 XT/6900 XT (RDNA2, 16 GiB)"``) or ``this-machine``; ``--vram`` overrides its
memory. ``--list`` shows the model, encoder and device tables.

The estimate itself is :func:`noflash_core.vram.estimate_run`; this module only parses and prints.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import List, Optional

__all__ = ["main"]


def _parse_bytes(text: str) -> int:
    from ..units import parse_bytes

    try:
        return parse_bytes(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _model_table() -> str:
    from ..video.encoders import TEXT_ENCODERS, VAES
    from ..video.families import MODEL_FAMILIES
    from .target import device_choices

    rows = [
        "model              VAE (t, px, ch)  patch    heads x dim   FFN      blocks  text  name",
    ]
    for f in MODEL_FAMILIES.values():
        s = f.stages[0]
        text = f"+{f.joint_text_tokens}" if f.joint_text_tokens else (f"x{f.cross_tokens}" if f.cross_tokens else "-")
        rows.append(
            f"{f.name:<18} {f.vae_temporal:>2}, {f.vae_spatial:>2}, {f.latent_channels:>3}     "
            f"{'x'.join(map(str, f.patch)):<8} {s.heads:>3} x {s.head_dim:<5}   {s.ffn_dim:<7}  {f.layers:>4}  "
            f"{text:>5}  {f.display}"
        )
    rows.append("text: +N joins self-attention (MMDiT), xN is the cross-attention key length.")
    rows.append("")
    rows.append("text encoders (--text-encoders a+b): " + ", ".join(TEXT_ENCODERS))
    rows.append("VAEs (--vae): " + ", ".join(VAES))
    rows.append("")
    rows.append("devices (--device takes the name before the dot, or the whole line):")
    rows.extend("  " + choice for choice in device_choices())
    return "\n".join(rows)


def build_parser() -> argparse.ArgumentParser:
    """The CLI's argument parser."""
    from ..device import PRESETS
    from ..video.families import family_names

    p = argparse.ArgumentParser(
        prog="python -m noflash_core.video",
        description="Predict attention and FFN memory of a diffusion run (fake tensors, nothing allocated).",
    )
    p.add_argument("--model", "-m", help=f"one of: {', '.join(family_names())}")
    p.add_argument("--width", "-W", type=int, help="output width in pixels")
    p.add_argument("--height", "-H", type=int, help="output height in pixels")
    p.add_argument("--frames", "-f", type=int, default=1, help="output frames (default 1)")
    p.add_argument("--batch", "-b", type=int, default=1, help="transformer batch (2 with CFG; default 1)")
    p.add_argument("--dtype", default="fp16", help="fp16, bf16 or fp32 (default fp16)")
    p.add_argument("--vram", type=_parse_bytes, help="device memory, e.g. 16GiB, 12GB, 8192MiB (overrides the "
                   "device's)")
    p.add_argument("--device", default="this-machine",
                   help=f"GPU profile to plan for: {', '.join(PRESETS)} (--list names the cards), or "
                   "this-machine (default)")
    p.add_argument("--text-encoders", default="auto",
                   help="auto (the model's), none, or keys joined by '+', e.g. clip-l+t5-xxl")
    p.add_argument("--prompt-tokens", type=int, default=256, help="prompt length in tokens (default 256)")
    p.add_argument("--vae", default="auto", help="auto (the model's), none, or a VAE key")
    p.add_argument("--weights", help="the diffusion model's weight format if not --dtype: fp8, fp16, bf16, fp32")
    p.add_argument("--text-encoder-weights", default="fp16",
                   help="the text encoders' weight format: fp16 (default) or fp8 (fp8-scaled files)")
    p.add_argument("--json", action="store_true", help="print the estimate as JSON")
    p.add_argument("--list", action="store_true", help="list the model families and exit")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    """Run the planner CLI; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    if args.list:
        sys.stdout.write(_model_table() + "\n")
        return 0
    missing = [name for name in ("model", "width", "height") if getattr(args, name) is None]
    if missing:
        parser.error("the following arguments are required: " + ", ".join("--" + m for m in missing))
    from .estimate import estimate_run

    try:
        est = estimate_run(
            args.model,
            args.width,
            args.height,
            frames=args.frames,
            batch=args.batch,
            dtype=args.dtype,
            vram_bytes=args.vram,
            device=args.device,
            text_encoders=args.text_encoders,
            prompt_tokens=args.prompt_tokens,
            vae=args.vae,
            weights=args.weights,
            text_encoder_weights=args.text_encoder_weights,
        )
    except ValueError as exc:
        parser.error(str(exc))
    if args.json:
        sys.stdout.write(json.dumps(est.to_dict(), indent=1) + "\n")
    else:
        sys.stdout.write(est.to_text() + "\n")
    return 0

