"""Benchmark settings, defaults per device, and parsing of the CLI's size and dtype strings."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Tuple

import torch

__all__ = [
    "ALL_IMPLS",
    "BenchConfig",
    "DEFAULT_SIZES",
    "QUICK_SIZES",
    "parse_bytes",
    "parse_dtype",
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

_DTYPES: Dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp64": torch.float64,
    "float64": torch.float64,
}

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}


def parse_bytes(text: str) -> int:
    """``"16GiB"``, ``"512MB"``, ``"1.5g"`` or ``"1024"`` -> bytes.

    Raises:
        ValueError: not a size.
    """
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if m is None or m.group(2).lower() not in _UNITS:
        raise ValueError(f"not a byte size: {text!r} (examples: 16GiB, 512MiB, 8GB, 1024)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def parse_dtype(text: str) -> torch.dtype:
    """``"fp16"``, ``"bf16"``, ``"fp32"``, ``"fp64"`` (or the torch names) -> dtype.

    Raises:
        ValueError: unknown name.
    """
    try:
        return _DTYPES[text.strip().lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {text!r}; use one of fp16, bf16, fp32, fp64") from None


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
        """The device to run on."""
        if self.device:
            return torch.device(self.device)
        if torch.cuda.is_available():
            return torch.device("cuda")
        xpu = getattr(torch, "xpu", None)
        if xpu is not None and xpu.is_available():
            return torch.device("xpu")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")

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
