"""``python -m noflash_core.bench``: run the attention benchmark and write md/json/png results.

Examples::

    python -m noflash_core.bench --quick
    python -m noflash_core.bench --sizes 2048,4096 --threads 2 --out bench/out/focus
    python -m noflash_core.bench --comfy /path/to/ComfyUI --dtype fp16 --device cuda
    python -m noflash_core.bench --overhead --threads 1
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
from typing import List, Optional

import torch

from ..device import resolve_device
from ..units import parse_bytes, parse_dtype
from .config import ALL_IMPLS, DEFAULT_SIZES, QUICK_SIZES, BenchConfig, parse_sizes
from .plots import write_plots
from .report import render_markdown, write_json, write_markdown
from .suite import run_bench

__all__ = ["build_parser", "main"]

logger = logging.getLogger("noflash_core.bench")


def _csv(text: str) -> List[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


def build_parser() -> argparse.ArgumentParser:
    """The CLI's argument parser."""
    p = argparse.ArgumentParser(
        prog="python -m noflash_core.bench",
        description="Time and memory of math SDPA, torch SDPA, noflash tiers and ComfyUI attention.",
    )
    p.add_argument("--quick", action="store_true", help=f"N in {list(QUICK_SIZES)}, 3 repeats (minutes on 2 cores)")
    p.add_argument("--sizes", "-n", type=parse_sizes, help=f"comma list of N (default {list(DEFAULT_SIZES)})")
    p.add_argument("--batch", "-B", type=int, default=1)
    p.add_argument("--heads", "-H", type=int, default=16)
    p.add_argument("--head-dim", "-D", type=int, default=64)
    p.add_argument("--dtype", type=parse_dtype, help="fp32, fp16, bf16, fp64 (default fp32 on CPU, fp16 on GPU)")
    p.add_argument("--device", help="cpu, cuda, cuda:1, xpu, mps (default: the accelerator if any, else cpu)")
    p.add_argument("--impls", type=_csv, default=list(ALL_IMPLS), help=f"comma list from {','.join(ALL_IMPLS)}")
    p.add_argument("--modes", type=_csv, default=["fwd", "fwd+bwd"], help="fwd, fwd+bwd or both (default both)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls before timing (default 1)")
    p.add_argument("--repeats", type=int, help="timed calls per cell; the median is reported (default 5, quick 3)")
    p.add_argument("--time-cap", type=float, help="seconds: skip a cell predicted slower (default 60, quick 20)")
    p.add_argument("--mem-cap", type=parse_bytes, help="skip O(N²) cells predicted above this (default: half free)")
    p.add_argument("--threads", type=int, help="torch threads for every implementation (default: torch's)")
    p.add_argument(
        "--comfy",
        metavar="PATH",
        default=os.environ.get("COMFYUI_PATH") or None,
        help="ComfyUI checkout to import its attention from (default: $COMFYUI_PATH)",
    )
    p.add_argument("--out", default=os.path.join("bench", "out"), help="output folder (default bench/out)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-check", action="store_true", help="skip the accuracy comparison")
    p.add_argument(
        "--overhead",
        action="store_true",
        help="instead of the table: per-call time of noflash vs torch's math SDPA on a decode-sized call "
        "(L=1; S=512 or each of --sizes), alternating calls (--repeats of each, default 2000)",
    )
    p.add_argument("--verbose", "-v", action="store_true")
    return p


def _run_overhead(args: argparse.Namespace) -> int:
    from .overhead import measure_overhead

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device or None)
    dtype = args.dtype or (torch.float32 if device.type == "cpu" else torch.float16)
    for kv_len in args.sizes or [512]:
        result = measure_overhead(
            q_len=1, kv_len=kv_len, batch=args.batch, heads=args.heads, head_dim=args.head_dim, dtype=dtype,
            device=device, calls=args.repeats or 2000, seed=args.seed,
        )
        sys.stdout.write(result.to_text() + "\n")
    return 0


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """Turn parsed arguments into a :class:`BenchConfig`."""
    modes = list(args.modes)
    for m in modes:
        if m not in ("fwd", "fwd+bwd"):
            raise SystemExit(f"--modes: unknown mode {m!r}; use fwd and/or fwd+bwd")
    unknown = [i for i in args.impls if i not in ALL_IMPLS]
    if unknown:
        raise SystemExit(f"--impls: unknown {unknown}; choose from {', '.join(ALL_IMPLS)}")
    return BenchConfig(
        batch=args.batch,
        heads=args.heads,
        head_dim=args.head_dim,
        sizes=list(args.sizes or (QUICK_SIZES if args.quick else DEFAULT_SIZES)),
        dtype=args.dtype,
        device=args.device,
        impls=list(args.impls),
        modes=modes,
        warmup=args.warmup,
        repeats=args.repeats or (3 if args.quick else 5),
        time_cap_s=args.time_cap or (20.0 if args.quick else 60.0),
        mem_cap_bytes=args.mem_cap,
        threads=args.threads,
        seed=args.seed,
        comfy_path=args.comfy,
        check=not args.no_check,
    )


def main(argv: Optional[List[str]] = None) -> int:
    """Run the benchmark; returns the process exit code."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(message)s",
        stream=sys.stderr,
    )
    if args.overhead:
        return _run_overhead(args)
    cfg = config_from_args(args)
    command = "python -m noflash_core.bench " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])
    )
    os.makedirs(args.out, exist_ok=True)
    result = run_bench(cfg, progress=not args.no_progress)
    plots = [] if args.no_plots else write_plots(result, args.out)
    md = write_markdown(result, os.path.join(args.out, "results.md"), command.strip(), plots)
    js = write_json(result, os.path.join(args.out, "results.json"), command.strip())
    sys.stdout.write(render_markdown(result, command.strip(), plots) + "\n")
    logger.info("wrote %s", ", ".join([md, js, *plots]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
