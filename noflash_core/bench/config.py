"""Benchmark settings, defaults per device, and parsing of the CLI's list of sizes."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Tuple

import torch

from ..device import resolve_device

__all__ = [
    "ALL_IMPLS",
    "BenchConfig",
    "DEFAULT_SIZES",
    "QUICK_SIZES",
    "parse_sizes",
]

DEFAULT_SIZES: Tuple[int, ...] = (256, 512, 1024, 2048, 4096, 8192, 16384)
QUICK_SIZES: Tuple[int, ...] = (256, 512, 1024, 2048)

# Order of rows and plot lines. "torch" is torch's default SDPA (the fused kernel where one exists).
ALL_IMPLS: Tuple[str, ...] = (
    "math",
    "torch",
    "noflash-t1",
    "noflash-t2",
    "noflash-t3",
    "noflash-auto",
    "comfy-subquad",
    "comfy-split",
)

def parse_sizes(text: str) -> List[int]:
    """``"256,512,1k,2048"`` -> ``[256, 512, 1024, 2048]`` (``k`` means ×1024).

    Raises:
        ValueError: an entry is not a positive integer.
    """
    sizes = []
    for part in text.split(","):
        part = part.strip().lower()
        if not part:
            continue
        mult = 1024 if part.endswith("k") else 1
        value = int(part[:-1] if mult > 1 else part) * mult
        if value <= 0:
            raise ValueError(f"sequence lengths must be positive, got {part!r}")
        sizes.append(value)
    if not sizes:
        raise ValueError("empty list of sequence lengths")
    return sizes


@dataclass
class BenchConfig:
    """What to run.

    Attributes:
        batch, heads, head_dim: ``q, k, v = (batch, heads, N, head_dim)`` for every N in ``sizes``.
        sizes: sequence lengths (self-attention, L = S = N).
        dtype: input dtype; None means fp32 on CPU, fp16 elsewhere.
        device: torch device string; None means the accelerator if there is one, else CPU.
        impls: implementations to run (subset of :data:`ALL_IMPLS`); unavailable ones are noted and skipped.
        modes: ``"fwd"`` and/or ``"fwd+bwd"``.
        warmup: untimed calls before timing (the first also measures memory).
        repeats: timed calls; the median is reported.
        min_repeats: the fewest timed calls, even when ``time_cap_s`` is reached.
        time_cap_s: skip a cell whose single call is predicted to take longer than this (from the previous N,
            assuming O(N²) time); also stops repeating once a cell has run this long.
        mem_cap_bytes: skip a quadratic-memory cell whose predicted peak exceeds this; None means half the
            free memory of the device.
        threads: torch intra-op threads for the whole run (same for every implementation); None keeps torch's.
        seed: input RNG seed.
        comfy_path: a ComfyUI checkout to import ``comfy`` from (None: only if already importable).
        check: compare each forward output with torch's default SDPA and record the max abs error.
        min_cpu_share: on CPU, re-time a call whose process CPU time is below this share of wall time x
            threads (another process took the cores).
        contention_retries: the most re-timed calls per cell.
    """

    batch: int = 1
    heads: int = 16
    head_dim: int = 64
    sizes: List[int] = field(default_factory=lambda: list(DEFAULT_SIZES))
    dtype: Optional[torch.dtype] = None
    device: Optional[str] = None
    impls: List[str] = field(default_factory=lambda: list(ALL_IMPLS))
    modes: List[str] = field(default_factory=lambda: ["fwd", "fwd+bwd"])
    warmup: int = 1
    repeats: int = 5
    min_repeats: int = 2
    time_cap_s: float = 60.0
    mem_cap_bytes: Optional[int] = None
    threads: Optional[int] = None
    seed: int = 0
    comfy_path: Optional[str] = None
    check: bool = True
    min_cpu_share: float = 0.7
    contention_retries: int = 4

    def resolved_device(self) -> torch.device:
        """The device to run on (see :func:`noflash_core.device.resolve_device`)."""
        return resolve_device(self.device or None)

    def resolved_dtype(self) -> torch.dtype:
        """The input dtype (fp32 on CPU, fp16 elsewhere, unless set)."""
        if self.dtype is not None:
            return self.dtype
        return torch.float32 if self.resolved_device().type == "cpu" else torch.float16

    def to_dict(self) -> Dict[str, object]:
        """Plain-data form for the JSON report."""
        d = asdict(self)
        d["dtype"] = str(self.resolved_dtype()).replace("torch.", "")
        d["device"] = str(self.resolved_device())
        return d
