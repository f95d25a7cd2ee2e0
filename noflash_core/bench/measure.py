"""Time and peak memory of one benchmark cell (one implementation, one N, forward or forward+backward)."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch

from .device import PeakMemory, synchronize
from .runners import Implementation

__all__ = [
    "Inputs",
    "Measurement",
    "finish",
    "first_call",
    "make_inputs",
    "measure_cell",
    "timed_call",
    "timed_call_with_cpu",
]


@dataclass
class Inputs:
    """``q, k, v`` of shape ``(B, H, N, D)`` and, for backward, the output gradient."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    grad_out: Optional[torch.Tensor]


@dataclass
class Measurement:
    """Result of :func:`measure_cell`.

    Attributes:
        times_s: every timed call, in seconds.
        median_s: their median.
        peak_bytes: peak allocated inside the first (untimed) call; inputs excluded, output and grads in.
        memory_method: ``"tracker"`` (live-bytes tracker) or ``"allocator"`` (max_memory_allocated).
        output: the forward output of the first call (kept only when asked for, to check accuracy).
    """

    times_s: List[float] = field(default_factory=list)
    median_s: float = float("nan")
    peak_bytes: int = 0
    memory_method: str = ""
    output: Optional[torch.Tensor] = None


def make_inputs(
    batch: int,
    heads: int,
    n: int,
    head_dim: int,
    *,
    dtype: torch.dtype,
    device: torch.device,
    backward: bool,
    seed: int = 0,
) -> Inputs:
    """Random ``(batch, heads, n, head_dim)`` inputs (same values for every implementation at one seed)."""
    gen = torch.Generator(device="cpu").manual_seed(seed + n)
    shape = (batch, heads, n, head_dim)

    def rand() -> torch.Tensor:
        t = torch.randn(shape, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)
        return t.requires_grad_(backward)

    q, k, v = rand(), rand(), rand()
    grad_out = torch.randn(shape, generator=gen).to(device=device, dtype=dtype) if backward else None
    return Inputs(q, k, v, grad_out)


def _call(impl: Implementation, inputs: Inputs, backward: bool, keep_output: bool) -> Optional[torch.Tensor]:
    """One call; for backward the input grads are cleared first and the output is dropped."""
    if backward:
        for t in (inputs.q, inputs.k, inputs.v):
            t.grad = None
        out = impl.fn(inputs.q, inputs.k, inputs.v)
        out.backward(inputs.grad_out)
        del out
        return None
    with torch.no_grad():
        out = impl.fn(inputs.q, inputs.k, inputs.v)
    return out if keep_output else None


def first_call(
    impl: Implementation,
    inputs: Inputs,
    *,
    backward: bool,
    device: torch.device,
    warmup: int = 1,
    keep_output: bool = False,
) -> Measurement:
    """The untimed warm-up calls; the first one measures peak memory (and keeps the output if asked).

    Memory is measured on an untimed call, so the tracker's dispatch overhead never enters the times.
    """
    result = Measurement()
    with PeakMemory(device) as mem:
        out = _call(impl, inputs, backward, keep_output)
    result.peak_bytes = mem.peak_bytes
    result.memory_method = mem.method
    result.output = out
    del out
    for _ in range(max(0, warmup - 1)):
        _call(impl, inputs, backward, False)
    return result


def timed_call(impl: Implementation, inputs: Inputs, *, backward: bool, device: torch.device) -> float:
    """Seconds for one call, synchronised before and after."""
    return timed_call_with_cpu(impl, inputs, backward=backward, device=device)[0]


def timed_call_with_cpu(
    impl: Implementation, inputs: Inputs, *, backward: bool, device: torch.device
) -> Tuple[float, float]:
    """``(wall seconds, process CPU seconds)`` for one call.

    On CPU, CPU time / (wall time x threads) is the share of the cores the call got: about 1 for parallel code on
    an idle machine, well below when another process took the cores and inflated the wall time.
    """
    synchronize(device)
    cpu0 = time.process_time()
    start = time.perf_counter()
    _call(impl, inputs, backward, False)
    synchronize(device)
    return time.perf_counter() - start, time.process_time() - cpu0


def finish(result: Measurement) -> Measurement:
    """Set the median from the timed calls."""
    if result.times_s:
        result.median_s = statistics.median(result.times_s)
    return result


def measure_cell(
    impl: Implementation,
    inputs: Inputs,
    *,
    backward: bool,
    device: torch.device,
    warmup: int = 1,
    repeats: int = 5,
    min_repeats: int = 2,
    time_cap_s: float = 60.0,
    keep_output: bool = False,
) -> Measurement:
    """One implementation alone: warm up (memory on the first call), then time up to ``repeats`` calls.

    Timing stops early, after at least ``min_repeats`` calls, once the timed calls have taken ``time_cap_s``.
    The suite interleaves implementations instead (see ``suite``); this is the single-cell form.
    """
    result = first_call(impl, inputs, backward=backward, device=device, warmup=warmup, keep_output=keep_output)
    for i in range(max(1, repeats)):
        if i >= min_repeats and sum(result.times_s) >= time_cap_s:
            break
        result.times_s.append(timed_call(impl, inputs, backward=backward, device=device))
    if backward:
        for t in (inputs.q, inputs.k, inputs.v):
            t.grad = None
    return finish(result)
