"""Tile-level building blocks shared by the tiers and the backward pass.

A tile is a block of ``bm`` query rows by ``bn`` key columns of one canonical problem (see ``problem.py``);
scores tiles have shape ``(b, h, G, bm, bn)``, where ``(b, h)`` is a chunk of the ``(B, H)`` batch-head pairs
(:func:`head_chunks`).

Precision follows torch's math backend: scores, softmax statistics and accumulators are fp32 for fp16/bf16 inputs
(fp64 for fp64 inputs). Where the device has a matmul with an fp32 output from half inputs, the operands stay in
half precision; elsewhere (CPU) they are upcast once.

Nothing here reads a tensor's values on the host inside a tile loop: which tiles run follows from shapes and causal
geometry alone, masks are applied to every tile they touch (a tile that a mask hides entirely is computed and
comes out as zero weight), and the one value-dependent decision (bf16 operands on a device without bf16) is made
once per call in :meth:`TileMath.for_inputs`.
"""

# implementation of:
#   online softmax (running row max and row sum, the accumulator rescaled when the max grows):
#     Milakov and Gimelshein 2018, "Online normalizer calculation for softmax", https://arxiv.org/abs/1805.02867
#   tiling over queries and keys with a per-row log-sum-exp, forward and backward:
#     Dao 2023, "FlashAttention-2: Faster Attention with Better Parallelism and Work Partitioning",
#     https://arxiv.org/abs/2307.08691
#   dropout keep decisions: the element's global index hashed with the 32-bit finalizer (fmix32) of
#     MurmurHash3 (Appleby 2011, https://github.com/aappleby/smhasher), keyed by a per-call seed

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Tuple

import torch

from .device import device_profile

__all__ = [
    "NEG_INF",
    "CausalTile",
    "DropoutSpec",
    "HeadChunk",
    "TileMasks",
    "TileMath",
    "causal_tile",
    "dropout_keep_scale",
    "guard_dead_rows",
    "zero_dead_rows_",
    "head_chunks",
    "head_index",
    "mask_tile",
    "row_blocks",
    "visible_keys",
]

NEG_INF = float("-inf")
LOG2E = 1.4426950408889634
"""``log2(e)``: scores scaled by it give ``exp(x) = exp2(x * log2(e))``."""
LN2 = 0.6931471805599453
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
    def for_inputs(
        query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, read_values: bool = True
    ) -> TileMath:
        """Pick the precision policy for inputs of ``query.dtype`` on ``query.device``.

        bf16 on a device without bf16 hardware runs in fp16 where every value fits fp16's range, else in fp32.
        Deciding that reads one number back from the device (the call's only host sync); call this once per call.
        ``read_values=False`` (the planner) reads nothing and assumes the larger fp32 operands. Meta tensors (a
        simulated device) have no values: they get the fp16 operands a real run would mostly use.
        """
        dtype = query.dtype
        if dtype not in _HALF:
            return TileMath(dtype, dtype)
        profile = device_profile(query.device)
        if not profile.half_out_fp32:
            return TileMath(torch.float32, torch.float32)
        if dtype == torch.bfloat16 and not profile.bf16:
            if query.device.type == "meta":
                return TileMath(torch.float32, torch.float16)
            if not read_values:
                return TileMath(torch.float32, torch.float32)
            biggest = torch.stack([t.detach().abs().amax().float() for t in (query, key, value)]).amax()
            fits = bool(biggest < _FP16_MAX)  # the one host read of the call
            return TileMath(torch.float32, torch.float16 if fits else torch.float32)
        return TileMath(torch.float32, dtype)

    def operand(self, t: torch.Tensor) -> torch.Tensor:
        """Convert ``t`` to the operand dtype (no copy when it already is)."""
        return t if t.dtype == self.operand_dtype else t.to(self.operand_dtype)

    def matmul(self, a: torch.Tensor, b: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``a @ b`` with an ``acc_dtype`` result; batch dims of a and b must match, shapes ``(..., m, k)``.

        ``out`` (contiguous, ``acc_dtype``) receives the result without a temporary.
        """
        if a.dtype == self.acc_dtype and b.dtype == self.acc_dtype:
            return torch.matmul(a, b, out=out)
        if a.dtype != b.dtype:
            a, b = a.to(self.operand_dtype), b.to(self.operand_dtype)
        lead = a.shape[:-2]
        a3, b3 = a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:])
        if out is not None:
            torch.bmm(a3, b3, out_dtype=self.acc_dtype, out=out.view(a3.shape[0], a3.shape[1], b3.shape[2]))
            return out
        result = torch.bmm(a3, b3, out_dtype=self.acc_dtype)
        return result.reshape(*lead, *result.shape[-2:])


# ---------------------------------------------------------------------------------------------- geometry


class CausalTile(enum.IntEnum):
    """Where a tile lies against the top-left aligned causal diagonal (row ``i`` sees keys ``j <= i``)."""

    HIDDEN = 0
    """Every position is above the diagonal: the tile is skipped."""
    VISIBLE = 1
    """Every position is on or below the diagonal: no causal mask is needed."""
    PARTIAL = 2
    """The tile crosses the diagonal: the positions right of it are hidden."""


def causal_tile(i0: int, i1: int, j0: int, j1: int) -> CausalTile:
    """Classify the tile of rows ``i0:i1`` and keys ``j0:j1`` under top-left causal masking."""
    if j0 > i1 - 1:
        return CausalTile.HIDDEN
    if j1 - 1 <= i0:
        return CausalTile.VISIBLE
    return CausalTile.PARTIAL



def visible_keys(i1: int, s: int, is_causal: bool) -> int:
    """The end of the keys that query rows below ``i1`` can see: ``min(S, i1)`` under top-left causal masking (key
    blocks from there on are :attr:`CausalTile.HIDDEN` for the block), else ``S``."""
    return min(s, i1) if is_causal else s


def row_blocks(length: int, block_m: int, *, overlap_last: bool = False) -> Iterator[Tuple[int, int]]:
    """``(i0, i1)`` query-row blocks of ``block_m`` rows covering ``0:length``.

    With ``overlap_last`` (forward passes only, which overwrite rows rather than accumulate) a short last block is
    moved back to end at ``length``, so every block has ``min(block_m, length)`` rows and no score GEMM is thin;
    the overlapping rows are computed twice and written twice.
    """
    block_m = max(1, int(block_m))
    for i0 in range(0, length, block_m):
        i1 = min(length, i0 + block_m)
        if overlap_last and i1 - i0 < block_m and length >= block_m:
            yield length - block_m, length
        else:
            yield i0, i1


@dataclass(frozen=True)
class HeadChunk:
    """A block of ``(batch, kv head)`` pairs processed together: ``batch`` and ``heads`` slice the ``B`` and ``H``
    dims of the canonical tensors; ``first`` is the flat index ``b * H + h`` of its first pair."""

    batch: slice
    heads: slice
    first: int

    def of(self, t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """The chunk's view of a ``(B, H, ...)`` tensor."""
        return None if t is None else t[self.batch, self.heads]

    def of_mask(self, m: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """The chunk's view of a ``(Bm, Hm, ...)`` mask, whose size-1 (broadcast) dims are kept."""
        if m is None:
            return None
        if m.shape[0] != 1:
            m = m[self.batch]
        if m.shape[1] != 1:
            m = m[:, self.heads]
        return m


def head_chunks(b: int, h: int, block_h: int) -> List[HeadChunk]:
    """Split the ``b * h`` batch-head pairs into chunks of at most ``block_h`` (0 or more than ``b * h``: one
    chunk). A chunk is whole batch items when ``block_h >= h``, else heads of one batch item, so every chunk is
    a plain slice of both dims."""
    if block_h <= 0 or block_h >= b * h:
        return [HeadChunk(slice(None), slice(None), 0)]
    if block_h >= h:
        step = block_h // h
        return [HeadChunk(slice(b0, min(b, b0 + step)), slice(None), b0 * h) for b0 in range(0, b, step)]
    return [
        HeadChunk(slice(bi, bi + 1), slice(h0, min(h, h0 + block_h)), bi * h + h0)
        for bi in range(b)
        for h0 in range(0, h, block_h)
    ]


# ---------------------------------------------------------------------------------------------- masks


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


def guard_dead_rows(stat: torch.Tensor, dead: float, safe: float) -> torch.Tensor:
    """The fully-masked-row guard: ``stat`` with every ``dead`` entry replaced by ``safe``.

    A row that a mask hides entirely has row max ``-inf`` and row sum 0. Its weights must come out 0 (as torch's
    ``_safe_softmax`` gives), not NaN, so every tier guards its statistics with this one function:

    * row max: ``-inf -> 0``, so ``exp(scores - max)`` is ``exp(-inf) = 0`` instead of ``exp(NaN)``;
    * row sum: ``0 -> 1``, so the zero accumulator divides to 0;
    * backward log-sum-exp: ``-inf -> +inf``, so the recomputed ``P = exp(scores - lse)`` is 0.

    Tier 3 normalises with torch's softmax instead and keeps no statistics; it zeroes the output rows whose max
    is -inf with :func:`zero_dead_rows_`, the same rule. Both are device-side: no host sync.
    """
    return torch.where(stat == dead, safe, stat)


def zero_dead_rows_(out: torch.Tensor, row_max: torch.Tensor) -> torch.Tensor:
    """Zero the rows of ``out`` whose score row max is -inf (every key hidden), in place: the fully-masked-row
    rule of :func:`guard_dead_rows` for a softmax that left those rows NaN."""
    return out.masked_fill_(row_max == NEG_INF, 0.0)


_CAUSAL_CACHE = 4  # hidden-position masks kept per call (tile shapes repeat along the diagonal)


class TileMasks:
    """The masks of one call, prepared once, then applied to scores tiles.

    * A float mask is added as it is.
    * A bool mask that does not vary over query rows (a key-padding mask, ``Lm == 1``) becomes an additive 0/-inf
      bias once per call (``O(S)`` bytes), so every tile is one add. torch's math backend also adds a bool mask as
      0/-inf, so the result is the same bit for bit.
    * A bool mask that varies over rows fills its False positions with -inf per tile.
    * Causal masking fills only the columns right of the diagonal, in tiles that cross it, from a small cache of
      hidden-position masks (the diagonal tiles repeat their shape).

    None of it reads values on the host. A tile that the mask hides entirely is still computed (its weights come
    out 0); skipping it would need a host read, a device sync, per call.

    The masks also fix the exponential's base. Hidden positions are -inf, and ``exp`` of -inf (or of anything that
    underflows) takes a slow path in CPU vector math, several times slower than a finite input, while ``exp2`` does
    not. So scores are kept in base-2 units (``q`` scaled by ``scale * log2(e)``, then ``exp2``), as
    FlashAttention-2 does on GPUs, whenever the masks are ours (bool masks and causal: 0 and -inf, the same in
    either base). A caller's float mask is added in natural units instead (``scale`` alone, then ``exp``): its
    finite values times ``log2(e)`` could overflow to -inf, and a row masked entirely by ``-finfo.max`` must stay a
    uniform average, as in torch's math backend.

    Attributes:
        mask: the prepared mask ``(Bm, Hm, Gm, Lm|1, Sm|1)``, float (added) or bool (kept), or None.
        is_causal: top-left causal masking.
        can_die: whether a query row can have every key hidden (a mask is present).
        units: what one natural-log unit of a score is in the working units: ``log2(e)`` or 1.
    """

    def __init__(self, mask: Optional[torch.Tensor], is_causal: bool, acc_dtype: torch.dtype) -> None:
        self.base2 = mask is None or mask.dtype == torch.bool
        if mask is not None and mask.dtype == torch.bool and mask.shape[-2] == 1:
            mask = torch.zeros(mask.shape, dtype=acc_dtype, device=mask.device).masked_fill_(
                mask.logical_not(), NEG_INF
            )
        self.mask = mask
        self.is_causal = bool(is_causal)
        self.can_die = mask is not None
        self.units = LOG2E if self.base2 else 1.0
        self._hidden: Dict[Tuple[int, int, int], torch.Tensor] = {}

    def for_chunk(self, chunk: HeadChunk) -> TileMasks:
        """The same masks restricted to one :class:`HeadChunk` (views; the causal cache is shared)."""
        sub = TileMasks.__new__(TileMasks)
        sub.__dict__.update(self.__dict__)
        sub.mask = chunk.of_mask(self.mask)
        return sub

    def exp_(self, x: torch.Tensor) -> torch.Tensor:
        """``exp`` of natural-unit ``x / units`` in place: ``exp2_`` in base-2 units, else ``exp_``."""
        return x.exp2_() if self.base2 else x.exp_()

    def lse(self, row_max: torch.Tensor, row_sum: torch.Tensor) -> torch.Tensor:
        """The natural log-sum-exp of rows from their working-unit max (guarded) and their sum."""
        return row_max * (1.0 / self.units) + row_sum.log()

    def apply(self, scores: torch.Tensor, i0: int, i1: int, j0: int, j1: int) -> None:
        """Mask the scores tile ``(b, h, G, i1 - i0, j1 - j0)`` of rows ``i0:i1`` and keys ``j0:j1`` in place."""
        if self.mask is not None:
            tile = mask_tile(self.mask, i0, i1, j0, j1)
            if tile.dtype == torch.bool:
                scores.masked_fill_(tile.logical_not(), NEG_INF)
            else:
                scores.add_(tile)
        if self.is_causal:
            state = causal_tile(i0, i1, j0, j1)
            if state is CausalTile.PARTIAL:
                self.apply_causal(scores, i0, i1, j0, j1)
            elif state is CausalTile.HIDDEN:  # the tiers never visit these; correct if one does
                scores.fill_(NEG_INF)

    def apply_causal(self, scores: torch.Tensor, i0: int, i1: int, j0: int, j1: int) -> None:
        """Hide the positions right of the causal diagonal in a :attr:`CausalTile.PARTIAL` tile: only its columns
        from ``max(j0, i0 + 1)`` on, from a cached upper-triangular mask."""
        c0 = max(j0, i0 + 1)  # the first key some row of the tile cannot see
        if c0 >= j1:
            return
        rows, cols, delta = i1 - i0, j1 - c0, i0 - c0
        key = (rows, cols, delta)
        hidden = self._hidden.get(key)
        if hidden is None:
            # Column c of the sub-tile is key c0 + c, row r is query i0 + r: hidden where c - r > i0 - c0.
            hidden = torch.ones(rows, cols, dtype=torch.bool, device=scores.device).triu_(delta + 1)
            if len(self._hidden) >= _CAUSAL_CACHE:
                self._hidden.clear()
            self._hidden[key] = hidden
        scores[..., c0 - j0 :].masked_fill_(hidden, NEG_INF)


# ---------------------------------------------------------------------------------------------- dropout


@dataclass(frozen=True)
class DropoutSpec:
    """Counter-based dropout: the keep decision of element ``(b, h, g, i, j)`` is a hash of its global index.

    The same seed gives the same mask whatever the tiling, so forward and backward (and an OOM retry with other
    block sizes) agree without storing the mask.
    """

    p: float
    seed: int

    @staticmethod
    def draw(p: float) -> DropoutSpec:
        """A spec with a fresh seed from torch's default CPU generator (so ``torch.manual_seed`` reproduces it).

        The seed is drawn on the CPU and read from host memory (``tolist``): no device sync, no dispatched read.
        """
        seed = torch.randint(0, 2**62, (1,), device="cpu").tolist()[0]
        return DropoutSpec(float(p), int(seed))


_M32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``(x * c) mod 2**32`` for ``0 <= x < 2**32`` in int64 without overflow."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _M32


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finalizer (Appleby): an avalanche of a 32-bit integer in int64 arithmetic."""
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def head_index(b: int, h: int, g: int, device: torch.device, offset: int = 0) -> torch.Tensor:
    """Flat output-head numbers ``(b, h, G, 1, 1)`` (int64) for :func:`dropout_keep_scale`, from ``offset``."""
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
        heads: flat output-head numbers ``(b, h, G, 1, 1)`` from :func:`head_index`.
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
