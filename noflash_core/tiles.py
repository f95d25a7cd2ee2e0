"""Tile-level building blocks shared by the tiers and the backward pass.

A tile is a block of ``bm`` query rows by ``bn`` key columns of one canonical problem (see ``problem.py``);
scores tiles have shape ``(B, H, G, bm, bn)``.

Precision follows torch's math backend: scores, softmax statistics and accumulators are fp32 for fp16/bf16 inputs
(fp64 for fp64 inputs). Where the device has a matmul with an fp32 output from half inputs, the operands stay in
half precision; elsewhere (CPU) they are upcast once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .device import device_profile

__all__ = [
    "NEG_INF",
    "DropoutSpec",
    "TileMath",
    "causal_tile_state",
    "apply_tile_masks",
    "dropout_keep_scale",
    "head_index",
    "mask_tile",
]

NEG_INF = float("-inf")
_HALF = (torch.float16, torch.bfloat16)
_FP16_MAX = 65504.0


@dataclass(frozen=True)
class TileMath:
    """How a problem's matmuls run.

    Attributes:
        acc_dtype: dtype of scores, statistics and accumulators (fp32, or fp64 for fp64 inputs).
        operand_dtype: dtype q, k and v are converted to before the matmuls.
    """

    acc_dtype: torch.dtype
    operand_dtype: torch.dtype

    @staticmethod
    def for_inputs(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> TileMath:
        """Pick the precision policy for inputs of ``query.dtype`` on ``query.device``."""
        dtype = query.dtype
        if dtype not in _HALF:
            return TileMath(dtype, dtype)
        profile = device_profile(query.device)
        if not profile.half_out_fp32:
            return TileMath(torch.float32, torch.float32)
        if dtype == torch.bfloat16 and not profile.bf16:
            # bf16 without bf16 hardware: fp16 only where every value fits its range, else fp32. Meta tensors
            # (a simulated device) have no values: they plan the fp16 operands a real run would use.
            if query.device.type == "meta":
                return TileMath(torch.float32, torch.float16)
            biggest = max(float(t.detach().abs().amax()) for t in (query, key, value))
            return TileMath(torch.float32, torch.float16 if biggest < _FP16_MAX else torch.float32)
        return TileMath(torch.float32, dtype)

    def operand(self, t: torch.Tensor) -> torch.Tensor:
        """Convert ``t`` to the operand dtype (no copy when it already is)."""
        return t if t.dtype == self.operand_dtype else t.to(self.operand_dtype)

    def matmul(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``a @ b`` with an ``acc_dtype`` result; batch dims of a and b must match, shapes ``(..., m, k)``."""
        if a.dtype == self.acc_dtype and b.dtype == self.acc_dtype:
            return torch.matmul(a, b)
        if a.dtype != b.dtype:
            a, b = a.to(self.operand_dtype), b.to(self.operand_dtype)
        lead = a.shape[:-2]
        out = torch.bmm(a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:]), out_dtype=self.acc_dtype)
        return out.reshape(*lead, *out.shape[-2:])


def mask_tile(mask: Optional[torch.Tensor], i0: int, i1: int, j0: int, j1: int) -> Optional[torch.Tensor]:
    """Slice a canonical mask ``(Bm, Hm, Gm, Lm, Sm)`` to the tile rows ``i0:i1`` and columns ``j0:j1``.

    Returns a view of shape ``(Bm, Hm, Gm, bm|1, bn|1)`` that broadcasts against a scores tile.
    """
    if mask is None:
        return None
    if mask.shape[-2] != 1:
        mask = mask[..., i0:i1, :]
    if mask.shape[-1] != 1:
        mask = mask[..., j0:j1]
    return mask


def causal_tile_state(i0: int, i1: int, j0: int, j1: int) -> int:
    """Classify a tile under top-left causal masking: 0 fully masked, 1 fully visible, 2 partly masked."""
    if j0 > i1 - 1:
        return 0
    if j1 - 1 <= i0:
        return 1
    return 2


def tile_is_dead(mtile: Optional[torch.Tensor]) -> bool:
    """True when a mask tile hides every position (all False, or all -inf)."""
    if mtile is None:
        return False
    if mtile.dtype == torch.bool:
        return not bool(mtile.any())
    return bool((mtile == NEG_INF).all())


def apply_tile_masks(
    scores: torch.Tensor, mtile: Optional[torch.Tensor], causal_state: int, i0: int, j0: int
) -> None:
    """Mask a scores tile ``(B, H, G, bm, bn)`` in place: add a float mask, fill hidden positions with -inf."""
    if mtile is not None:
        if mtile.dtype == torch.bool:
            scores.masked_fill_(mtile.logical_not(), NEG_INF)
        else:
            scores.add_(mtile)
    if causal_state == 2:
        bm, bn = scores.shape[-2:]
        rows = torch.arange(i0, i0 + bm, device=scores.device).unsqueeze(1)
        cols = torch.arange(j0, j0 + bn, device=scores.device).unsqueeze(0)
        scores.masked_fill_(cols > rows, NEG_INF)


@dataclass(frozen=True)
class DropoutSpec:
    """Counter-based dropout: the keep decision of element ``(b, h, g, i, j)`` is a hash of its global index.

    The same seed gives the same mask whatever the tiling, so forward and backward (and an OOM retry with other
    block sizes) agree without storing the mask.
    """

    p: float
    seed: int


_M32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``(x * c) mod 2**32`` for ``0 <= x < 2**32`` in int64 without overflow."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _M32


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def head_index(b: int, h: int, g: int, device: torch.device, offset: int = 0) -> torch.Tensor:
    """Flat output-head numbers ``(B, H, G, 1, 1)`` (int64) for :func:`dropout_keep_scale`."""
    return (torch.arange(b * h * g, device=device, dtype=torch.int64) + offset).view(b, h, g, 1, 1)


def dropout_keep_scale(
    spec: DropoutSpec,
    heads: torch.Tensor,
    length: int,
    s: int,
    i0: int,
    i1: int,
    j0: int,
    j1: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """The dropout multiplier of a tile: ``keep / (1 - p)``, shape ``(*heads.shape[:3], bm, bn)``.

    Args:
        heads: flat output-head numbers ``(B, H, G, 1, 1)`` from :func:`head_index`.
        length, s: L and S of the problem (with the head number they define the global element index).
    """
    device = heads.device
    rows = torch.arange(i0, i1, device=device, dtype=torch.int64)
    cols = torch.arange(j0, j1, device=device, dtype=torch.int64)
    idx = (heads * length + rows.view(1, 1, 1, -1, 1)) * s + cols.view(1, 1, 1, 1, -1)
    seed_lo, seed_hi = spec.seed & _M32, (spec.seed >> 32) & _M32
    x = _fmix32((idx & _M32) ^ seed_lo)
    x = _fmix32(x ^ _fmix32((idx >> 32) ^ seed_hi))
    if spec.p >= 1.0:
        return torch.zeros(x.shape, dtype=dtype, device=device)
    threshold = int(spec.p * 4294967296.0)
    return (x >= threshold).to(dtype) * (1.0 / (1.0 - spec.p))
