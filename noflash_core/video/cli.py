"""``python -m noflash_core.video``: will this video or image run fit in my VRAM?

Example::

    python -m noflash_core.video --model wan2.2-5b --width 1280 --height 704 --frames 121 --batch 2 \\
        --dtype fp16 --vram 16GiB

Prints the tokens per attention call, what torch's math SDPA would need, noflash's plan (tier, blocks, peak),
the FFN intermediate with and without chunking, and whether the run fits. ``--list`` shows the model table.

The estimate itself is :func:`noflash_core.video.estimator.estimate_run`; this module only parses and prints.
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
    from .families import MODEL_FAMILIES

    rows = [
        "model          VAE (t, px, ch)  patch    heads x dim   FFN      blocks  text  name",
    ]
    for f in MODEL_FAMILIES.values():
        s = f.stages[0]
        text = f"+{f.joint_text_tokens}" if f.joint_text_tokens else (f"x{f.cross_tokens}" if f.cross_tokens else "-")
        rows.append(
            f"{f.name:<14} {f.vae_temporal:>2}, {f.vae_spatial:>2}, {f.latent_channels:>3}     "
            f"{'x'.join(map(str, f.patch)):<8} {s.heads:>3} x {s.head_dim:<5}   {s.ffn_dim:<7}  {f.layers:>4}  "
            f"{text:>5}  {f.display}"
        )
    rows.append("text: +N joins self-attention (MMDiT), xN is the cross-attention key length.")
    return "\n".join(rows)


def build_parser() -> argparse.ArgumentParser:
    """The CLI's argument parser."""
    from .families import family_names

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
    p.add_argument("--vram", type=_parse_bytes, help="device memory, e.g. 16GiB, 12GB, 8192MiB")
    p.add_argument("--device", default="cuda", help="device type the plan is for (default cuda)")
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
    from .estimator import estimate_run

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
        )
    except ValueError as exc:
        parser.error(str(exc))
    if args.json:
        sys.stdout.write(json.dumps(est.to_dict(), indent=1) + "\n")
    else:
        sys.stdout.write(est.to_text() + "\n")
    return 0

