"""``python -m noflash_core.tune``: measure the exact plans of some call shapes on this device and remember the
fastest.

Examples::

    python -m noflash_core.tune --heads 16 --tokens 2048,4096 --head-dim 64 --dtype float32
    python -m noflash_core.tune --heads 16 --tokens 2048,4096 --head-dim 64 --dtype float32 --causal --verify
    python -m noflash_core.tune --model wan2.2-5b --width 1280 --height 704 --frames 121
    python -m noflash_core.tune --export my-gpu.json
    python -m noflash_core.tune --show
    python -m noflash_core.tune --reset
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
import time
from typing import List, Optional, Tuple

import torch

from ..device import resolve_device
from .signature import Signature, device_identity, device_key
from .store import cache_path, update_document

__all__ = ["build_parser", "main"]

_log = logging.getLogger("noflash_core.tune")
_DTYPES = ("float16", "bfloat16", "float32", "float64")


def _ints(text: str) -> List[int]:
    try:
        values = [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m noflash_core.tune", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    shape = p.add_argument_group("call shapes")
    shape.add_argument("--heads", type=int, help="query heads H")
    shape.add_argument("--kv-heads", type=int, help="key/value heads (GQA; default H)")
    shape.add_argument("--tokens", type=_ints, help="query lengths L, comma list")
    shape.add_argument("--kv-tokens", type=int, help="key length S (default: each L)")
    shape.add_argument("--head-dim", type=int, help="head size E (and Ev)")
    shape.add_argument("--batch", type=int, default=1)
    shape.add_argument("--dtype", choices=_DTYPES, help="default float16 on a GPU, float32 on CPU")
    shape.add_argument("--causal", action="store_true")
    shape.add_argument("--grad", action="store_true", help="tune forward + backward (training)")
    run = p.add_argument_group("a video run (the shapes the video planner predicts)")
    run.add_argument("--model", help="e.g. wan2.2-5b (python -m noflash_core.video --help lists them)")
    run.add_argument("--width", type=int)
    run.add_argument("--height", type=int)
    run.add_argument("--frames", type=int, default=1)
    run.add_argument("--prompt-tokens", type=int, default=256)
    how = p.add_argument_group("how")
    how.add_argument("--device", help="cpu, cuda, cuda:1, xpu, mps (default: the accelerator, else cpu)")
    how.add_argument("--budget-mb", type=float, help="working-memory budget (default: the planner's)")
    how.add_argument("--candidates", type=int, default=8, help="plans to measure per shape (default 8)")
    how.add_argument("--repeats", type=int, default=3, help="timed interleaved rounds (default 3)")
    how.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    how.add_argument("--threads", type=int, help="torch threads (CPU)")
    other = p.add_argument_group("other modes")
    other.add_argument("--verify", action="store_true", help="instead of tuning: time the tuned auto plan against "
                       "a grid of pinned exact plans and check it is within 10%% of the fastest")
    other.add_argument("--grid", type=int, default=12, help="--verify: pinned plans in the grid (default 12)")
    other.add_argument("--out", help="--verify: folder for results.md and results.json")
    other.add_argument("--dry-run", action="store_true", help="list the signatures that would be tuned and exit")
    other.add_argument("--export", metavar="FILE", help="write this device's tuned entries as JSON and exit")
    other.add_argument("--show", action="store_true", help="print the cache path and this device's entries")
    other.add_argument("--reset", action="store_true", help="remove this device's entries from the cache")
    return p


def _signatures(args: argparse.Namespace, dtype: str) -> List[Tuple[str, Signature]]:
    if args.model:
        if not (args.width and args.height):
            raise SystemExit("--model needs --width and --height (and --frames for video)")
        from .workflow import workflow_signatures

        return workflow_signatures(args.model, args.width, args.height, args.frames, batch=args.batch,
                                   dtype=args.dtype or "fp16", prompt_tokens=args.prompt_tokens)
    if not (args.heads and args.tokens and args.head_dim):
        raise SystemExit("give --heads, --tokens and --head-dim (or --model with --width/--height/--frames)")
    kv_heads = args.kv_heads or args.heads
    if args.heads % kv_heads:
        raise SystemExit(f"--heads {args.heads} must be a multiple of --kv-heads {kv_heads}")
    g = args.heads // kv_heads
    mask = "none"
    return [(f"B={args.batch} H={args.heads} L={n}{' causal' if args.causal else ''}",
             Signature(dtype, args.batch * kv_heads, g, n, args.kv_tokens or n, args.head_dim, args.head_dim, mask,
                       args.causal, args.grad)) for n in args.tokens]


def _tune(args: argparse.Namespace, device: torch.device, sigs: List[Tuple[str, Signature]]) -> int:
    from .report import result_table
    from .tuner import save_results, tune_signature

    budget = int(args.budget_mb * 2**20) if args.budget_mb else None
    results = []
    for label, sig in sigs:
        _log.info("tuning %s (%s) ...", label, sig.key())
        start = time.monotonic()
        r = tune_signature(sig, device, budget_bytes=budget, max_candidates=args.candidates, warmup=args.warmup,
                           repeats=args.repeats)
        results.append(r)
        sys.stdout.write(result_table(label, r) + f"\n({time.monotonic() - start:.0f} s)\n\n")
        save_results([r])  # after each shape, so an interrupted run keeps what it measured
    sys.stdout.write(f"Tuning cache: {cache_path()}\n")
    return 0 if all(r.winner is not None or r.mode == "not tuned" for r in results) else 1


def _verify(args: argparse.Namespace, device: torch.device, sigs: List[Tuple[str, Signature]], command: str) -> int:
    from ..bench.device import describe_machine, load_average
    from .verify import render_verify, verify_signature, write_verify

    load0 = load_average()
    rows = [verify_signature(label, sig, device, grid_size=args.grid, warmup=args.warmup, repeats=args.repeats)
            for label, sig in sigs]
    machine = describe_machine(device)
    header = ["# Tuned auto plan vs a grid of pinned exact plans", "",
              f"Machine: {machine.get('cpu') or machine.get('gpu')} ({device}), torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads; load average {load0} at start, {load_average()} at end. "
              f"Each time is the median of {args.repeats} interleaved rounds after {args.warmup} warm-up (a plan "
              "whose fastest call is over 3× the fastest call of any plan stops being timed: it cannot be the "
              "fastest); 'spread' is (max - min) / median of the auto call's rounds.", "", "```", command, "```", ""]
    text = render_verify(rows, header)
    sys.stdout.write(text)
    if args.out:
        meta = {"command": command, "machine": machine, "load_at_start": load0, "load_at_end": load_average()}
        _log.info("wrote %s", ", ".join(write_verify(rows, args.out, header, meta)))
    return 0 if all(r.passed for r in rows) else 1


def _show_or_reset(args: argparse.Namespace, device: torch.device) -> int:
    from .share import device_entries, export_entries

    if args.export:
        n = export_entries(args.export, device)
        sys.stdout.write(f"wrote {n} tuned entries of {device} to {args.export}\n")
        return 0
    identity = device_identity(device)
    if identity is None:
        raise SystemExit(f"nothing is tuned on {device} (a meta or simulated device)")
    if args.reset:
        path = cache_path()
        if os.path.exists(path):
            update_document(path, lambda doc: doc["devices"].pop(device_key(identity), None))
        sys.stdout.write(f"removed the tuned entries of {device} from {path}\n")
        return 0
    data = device_entries(device)
    sys.stdout.write(f"Tuning cache: {cache_path()}\nDevice: {device_key(identity)}\n")
    for key, entry in sorted(data["entries"].items()):
        best = entry.get("plans", [{}])[0]
        sys.stdout.write(f"  {key}: tier {best.get('tier')} {best.get('block_m')}x{best.get('block_n')} "
                         f"h{best.get('block_h')} {best.get('median_ms')} ms ({entry.get('mode')})\n")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """Run the CLI; returns the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device or None)
    if args.export or args.show or args.reset:
        return _show_or_reset(args, device)
    dtype = args.dtype or ("float32" if device.type == "cpu" else "float16")
    sigs = _signatures(args, dtype)
    command = "python -m noflash_core.tune " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    if args.dry_run:
        sys.stdout.write("".join(f"{label}: {sig.key()} (L={sig.l}, S={sig.s})\n" for label, sig in sigs))
        return 0
    if args.verify:
        return _verify(args, device, sigs, command)
    return _tune(args, device, sigs)
