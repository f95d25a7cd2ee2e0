"""Example and bench for sequence-parallel attention: run it under ``torchrun`` on GPUs, or ``--spawn P`` on CPU.

    torchrun --nproc-per-node 4 -m noflash_core.distributed --tokens 75600 --heads 40 --head-dim 128 --dtype float16
    python -m noflash_core.distributed --spawn 4 --tokens 2048 --heads 4 --head-dim 64 --backward --check

Every rank builds its contiguous shard of one random sequence (the same seed everywhere), runs ``ring_attention``
and/or ``ulysses_attention`` (forward, optionally backward), and reports its time per call (median of
``--repeat``), its peak memory above its input shards (``torch.cuda.max_memory_allocated`` on GPUs; the live-bytes
tracker on CPU), the size of those shards, and the bytes it sends per call, from the formulas in
:func:`sent_bytes`. ``--check`` compares with full-sequence math SDPA (small N only).

Windows: PyTorch's Windows builds have no NCCL (nor do ZLUDA or ROCm-on-Windows), so only gloo works there: ranks
started by ``torchrun`` fall back to gloo and compute on the CPU, and ``--spawn P`` (gloo, a file rendezvous in a
temporary directory) runs as on Linux.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import pathlib
import statistics
import tempfile
import time
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from ..memory.tracker import LiveBytesTracker
from ..units import format_bytes
from .ring import ring_attention
from .ulysses import ulysses_attention

__all__ = ["main", "sent_bytes"]

_log = logging.getLogger("noflash_core.distributed")
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}
_CHECK_MAX_TOKENS = 8192


def sent_bytes(mode: str, tokens: int, hq: int, hk: int, e: int, ev: int, elt: int, p: int, backward: bool) -> int:
    """Bytes one rank sends per attention call (non-causal; a causal ring sends at most this).

    Ring: ``P - 1`` steps each pass a K/V block of ``N/P * Hk * (E + Ev)`` elements; the backward passes K/V again
    plus the fp32 dK/dV accumulators ``P`` times. Ulysses: each all-to-all keeps ``1/P`` of the rank's shard and
    sends the rest; forward moves q, k, v and the output, backward their gradients.
    """
    n = tokens // p
    if mode == "ring":
        kv = n * hk * (e + ev)
        total = (p - 1) * kv * elt
        if backward:
            total += (p - 1) * kv * elt + p * kv * 4
        return total
    shard = n * (hq * e + hk * e + hk * ev + hq * ev)
    total = (p - 1) * shard * elt // p
    return total * 2 if backward else total


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m noflash_core.distributed", description=__doc__.split("\n\n")[0])
    ap.add_argument("--mode", choices=("ring", "ulysses", "both"), default="both")
    ap.add_argument("--tokens", type=int, default=4096, help="global sequence length N (divisible by P)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=8, help="query heads")
    ap.add_argument("--kv-heads", type=int, default=None, help="key/value heads (GQA); default: --heads")
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--dtype", choices=sorted(_DTYPES), default=None, help="default: float16 on GPU, float32 on CPU")
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--backward", action="store_true", help="also run the backward")
    ap.add_argument("--block", type=int, default=None, help="pin the tile size (default: planned)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--check", action="store_true", help=f"compare with full math SDPA (N <= {_CHECK_MAX_TOKENS})")
    ap.add_argument("--spawn", type=int, default=None, metavar="P", help="start P local gloo processes (CPU)")
    return ap


def _device() -> torch.device:
    if torch.cuda.is_available() and dist.get_backend() != "gloo":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _inputs(args, device, dtype, rank: int, p: int):
    g = torch.Generator().manual_seed(0)
    hk = args.kv_heads or args.heads
    shapes = [(args.batch, args.heads, args.tokens, args.head_dim), (args.batch, hk, args.tokens, args.head_dim),
              (args.batch, hk, args.tokens, args.head_dim), (args.batch, args.heads, args.tokens, args.head_dim)]
    n = args.tokens // p
    rows = slice(rank * n, (rank + 1) * n)
    # Only this rank's rows are kept; the full tensors exist only with --check (small N).
    full = [torch.randn(s, generator=g) for s in shapes] if args.check else None
    if full is None:
        shard = [torch.randn(*s[:2], n, s[3], generator=torch.Generator().manual_seed(i * 1000 + rank))
                 for i, s in enumerate(shapes)]
    else:
        shard = [t[:, :, rows] for t in full]
    return [t.to(device, dtype).contiguous() for t in shard], full, rows


@contextlib.contextmanager
def _peak(device: torch.device):
    box: Dict[str, int] = {}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        yield box
        torch.cuda.synchronize(device)
        box["peak"] = torch.cuda.max_memory_allocated(device) - base
    else:
        with LiveBytesTracker() as tracker:
            yield box
        box["peak"] = tracker.peak_bytes


def _run_mode(fn, args, device, dtype, rank: int, p: int) -> Dict[str, float]:
    shard, full, rows = _inputs(args, device, dtype, rank, p)
    q, k, v, dout = shard
    kw = dict(is_causal=args.causal, enable_gqa=(args.kv_heads or args.heads) != args.heads,
              block_m=args.block, block_n=args.block)
    times: List[float] = []
    for _ in range(args.repeat):
        leaves = [t.detach().requires_grad_(args.backward) for t in (q, k, v)]
        dist.barrier()
        start = time.perf_counter()
        with _peak(device) as mem:
            out = fn(*leaves, **kw)
            if args.backward:
                out.backward(dout)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    inputs = sum(t.numel() * t.element_size() for t in shard)
    res = {"seconds": statistics.median(times), "peak_bytes": mem["peak"], "input_bytes": inputs}
    if full is not None:
        from ..sdpa import original_sdpa

        ref = original_sdpa(*(t.double() for t in full[:3]), is_causal=args.causal, enable_gqa=kw["enable_gqa"])
        res["max_abs_error"] = (out.detach().double().cpu() - ref[:, :, rows]).abs().max().item()
    return res


def _rank_main(rank: Optional[int], p: Optional[int], args, init_file: Optional[str] = None) -> None:
    if init_file is not None:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // p))  # P processes share the cores
        # as_uri: file:///C:/... on Windows (a bare "file://" + path is not a valid URI there)
        dist.init_process_group("gloo", init_method=pathlib.Path(init_file).as_uri(), rank=rank, world_size=p)
    elif not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"  # Windows: gloo
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    rank, p = dist.get_rank(), dist.get_world_size()
    logging.basicConfig(level=logging.INFO, format=f"[rank {rank}] %(message)s")
    if args.tokens % p:
        raise SystemExit(f"--tokens {args.tokens} must be divisible by the number of ranks ({p}).")
    if args.check and args.tokens > _CHECK_MAX_TOKENS:
        raise SystemExit(f"--check builds the full attention; use --tokens <= {_CHECK_MAX_TOKENS}.")
    device = _device()
    dtype = _DTYPES[args.dtype] if args.dtype else (torch.float16 if device.type == "cuda" else torch.float32)
    modes = ("ring", "ulysses") if args.mode == "both" else (args.mode,)
    hk = args.kv_heads or args.heads
    for mode in modes:
        fn = ring_attention if mode == "ring" else ulysses_attention
        res = _run_mode(fn, args, device, dtype, rank, p)
        sent = sent_bytes(mode, args.tokens, args.heads, hk, args.head_dim, args.head_dim, dtype.itemsize, p,
                          args.backward)
        extra = f", max abs error {res['max_abs_error']:.2e}" if "max_abs_error" in res else ""
        _log.info(
            "%s P=%d N=%d %s%s: %.3f s per call, peak %s above its %s of shards, sends %s per call%s", mode, p,
            args.tokens, str(dtype).replace("torch.", ""), " fwd+bwd" if args.backward else "", res["seconds"],
            format_bytes(res["peak_bytes"]), format_bytes(res["input_bytes"]),
            format_bytes(sent), extra,
        )
    dist.destroy_process_group()


def main(argv: Optional[List[str]] = None) -> None:
    args = _parser().parse_args(argv)
    if args.spawn:
        import torch.multiprocessing as mp

        with tempfile.TemporaryDirectory() as tmp:
            mp.spawn(_rank_main, args=(args.spawn, args, os.path.join(tmp, "rendezvous")), nprocs=args.spawn)
        return
    _rank_main(None, None, args)
