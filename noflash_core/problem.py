"""Validate SDPA arguments and bring them into one canonical layout.

Every tier works on the same five-dimensional view of the problem, so the tiers never see batch dims, GQA or
broadcasting:

* query ``(B, H, G, L, E)``: ``B`` flattens the leading batch dims, ``H`` is the number of key/value heads and
  ``G`` the number of query heads per key/value head (``G = 1`` without GQA).
* key ``(B, H, S, E)`` and value ``(B, H, S, Ev)``.
* mask ``(Bm, Hm, Gm, Lm, Sm)`` where every dim is either 1 (broadcast) or the full size.
* output ``(B, H, G, L, Ev)``, reshaped back to torch's output shape ``(*batch, Hq, L, Ev)`` at the end.

What depends only on the shapes, dtypes, devices and flags of a call (the validation and the recipe of views above)
is computed once per such signature and cached, so a repeated call only re-applies a few views.

All reshapes are differentiable torch ops, so autograd maps gradients back to the caller's shapes (including the
sum over broadcast mask dims).

Error messages name the argument and the fix, and use the exception type torch's SDPA raises (RuntimeError).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Hashable, NamedTuple, Optional, Tuple

import torch

from .caches import register
from .tracing import is_compiling

__all__ = ["AttentionProblem", "Dims", "build_problem", "call_signature", "tier3_grad_error", "validate_arguments"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_CACHE_SIZE = 512


class Dims(NamedTuple):
    """The sizes of a canonical problem: batch ``b``, key/value heads ``h``, query heads per key/value head ``g``,
    query length ``l``, key length ``s``, head size ``e`` and value head size ``ev``."""

    b: int
    h: int
    g: int
    l: int  # noqa: E741 - the paper's name for the query length
    s: int
    e: int
    ev: int


@dataclass(frozen=True)
class AttentionProblem:
    """The canonical view of one SDPA call.

    Attributes:
        query: ``(B, H, G, L, E)``.
        key: ``(B, H, S, E)``.
        value: ``(B, H, S, Ev)``.
        mask: ``(Bm, Hm, Gm, Lm, Sm)`` bool or float, or None.
        is_causal: top-left aligned causal masking.
        scale: multiplier of ``q @ k^T``.
        out_shape: the shape torch's SDPA returns, ``(*batch, Hq, L, Ev)``.
    """

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    mask: Optional[torch.Tensor]
    is_causal: bool
    scale: float
    out_shape: Tuple[int, ...]

    @property
    def dims(self) -> Dims:
        """``Dims(b, h, g, l, s, e, ev)``; unpacks as ``b, h, g, length, s, e, ev = problem.dims``."""
        b, h, g, length, e = self.query.shape
        return Dims(b, h, g, length, self.key.shape[-2], e, self.value.shape[-1])


def tier3_grad_error() -> RuntimeError:
    """The one refusal of tier 3 under grad (tier 3 keeps no softmax statistics, so it has no backward)."""
    return RuntimeError(
        "noflash tier 3 is inference-only: it keeps no softmax statistics, so it cannot run backward. Use tier=1, "
        "tier=2 or tier='auto' for inputs that require grad, or call it under torch.no_grad()."
    )


def _check_operands(query, key, value) -> None:
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"scaled_dot_product_attention: {name} must be a Tensor, got {type(t).__name__}.")
    if min(query.dim(), key.dim(), value.dim()) < 2:
        raise RuntimeError(
            "scaled_dot_product_attention: query, key and value must be at least 2-D (..., L|S, E), got "
            f"query.dim()={query.dim()}, key.dim()={key.dim()}, value.dim()={value.dim()}. Add a sequence dim."
        )
    if not (query.dtype == key.dtype == value.dtype):
        raise RuntimeError(
            "scaled_dot_product_attention: query, key and value must have the same dtype, got "
            f"query.dtype={query.dtype}, key.dtype={key.dtype}, value.dtype={value.dtype}. Cast them to one dtype."
        )
    if query.dtype not in _FLOAT_DTYPES:
        raise RuntimeError(
            f"scaled_dot_product_attention: query dtype {query.dtype} is not supported; use float16, bfloat16, "
            "float32 or float64."
        )
    if not (query.device == key.device == value.device):
        raise RuntimeError(
            "scaled_dot_product_attention: query, key and value must be on one device, got "
            f"{query.device}, {key.device}, {value.device}. Move them with .to(device)."
        )


def _check_sizes(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
    if query.shape[-1] != key.shape[-1]:
        raise RuntimeError(
            f"scaled_dot_product_attention: query's last dim (E={query.shape[-1]}) must equal key's last dim "
            f"(E={key.shape[-1]}). Project query and key to the same head size."
        )
    if key.shape[-2] != value.shape[-2]:
        raise RuntimeError(
            f"scaled_dot_product_attention: key and value must have the same sequence length, got key S="
            f"{key.shape[-2]} and value S={value.shape[-2]}."
        )


def _check_gqa_heads(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
    if query.dim() >= 3:
        hq = query.shape[-3]
        hk = key.shape[-3] if key.dim() >= 3 else 1
        hv = value.shape[-3] if value.dim() >= 3 else 1
        if hq % hk != 0 or hq % hv != 0:
            raise RuntimeError(
                f"scaled_dot_product_attention: with enable_gqa=True the number of query heads ({hq}) must be a "
                f"multiple of the key heads ({hk}) and the value heads ({hv}). Use a head count that divides."
            )


def _check_mask(query: torch.Tensor, attn_mask, is_causal: bool) -> None:
    if not isinstance(attn_mask, torch.Tensor):
        raise TypeError("scaled_dot_product_attention: attn_mask must be a Tensor or None.")
    if attn_mask.dtype != torch.bool and attn_mask.dtype != query.dtype:
        raise RuntimeError(
            "scaled_dot_product_attention: attn_mask must be bool or have query's dtype, got "
            f"attn_mask.dtype={attn_mask.dtype} and query.dtype={query.dtype}. Cast the mask with "
            ".to(query.dtype), or pass a bool mask (True = takes part)."
        )
    if is_causal:
        raise RuntimeError(
            "scaled_dot_product_attention: attn_mask and is_causal=True were both given. Pass only one: fold "
            "the causal pattern into attn_mask, or drop attn_mask."
        )


def validate_arguments(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: Optional[torch.Tensor], is_causal: bool,
    enable_gqa: bool,
) -> None:
    """Raise RuntimeError (TypeError for non-tensors), as torch's SDPA does, for arguments it rejects; the
    message names the argument and the fix."""
    _check_operands(query, key, value)
    _check_sizes(query, key, value)
    if attn_mask is not None:
        _check_mask(query, attn_mask, is_causal)
    if enable_gqa:
        _check_gqa_heads(query, key, value)


def _split_heads(t: torch.Tensor) -> Tuple[Tuple[int, ...], int]:
    """Return ``(batch_shape, heads)`` of a ``(*batch, H, N, E)`` tensor (2-D tensors have one head)."""
    if t.dim() == 2:
        return (), 1
    return tuple(t.shape[:-3]), t.shape[-3]


def _broadcast(shapes, what: str) -> Tuple[int, ...]:
    try:
        return tuple(torch.broadcast_shapes(*shapes))
    except RuntimeError as exc:
        raise RuntimeError(
            f"scaled_dot_product_attention: the {what} of query, key and value do not broadcast "
            f"({', '.join(str(tuple(s)) for s in shapes)}). Give them equal or size-1 batch dims."
        ) from exc


@dataclass(frozen=True)
class _Layout:
    """The views that bring one call signature into the canonical layout (sizes only, no tensors)."""

    batch: Tuple[int, ...]
    flat_batch: int
    hq: int
    hk: int
    hv: int
    hout: int
    h: int
    g: int
    length: int
    e: int
    mask_rank_shape: Optional[Tuple[int, ...]]  # the mask with leading 1s up to the attention rank
    mask_batch_is_one: bool
    out_shape: Tuple[int, ...]


def _mask_rank_shape(mask: torch.Tensor, target: Tuple[int, ...]) -> Tuple[int, ...]:
    """The mask's shape padded to ``target``'s rank; RuntimeError naming attn_mask when it does not broadcast."""
    try:
        ok = tuple(torch.broadcast_shapes(tuple(mask.shape), target)) == target
    except RuntimeError:
        ok = False
    if not ok:
        raise RuntimeError(
            f"scaled_dot_product_attention: attn_mask of shape {tuple(mask.shape)} does not broadcast to the "
            f"attention shape (*batch, heads, L, S) = {target}. Give it size-1 or full dims, e.g. (L, S), "
            f"(1, 1, L, S) or (B, 1, 1, S)."
        )
    return (1,) * (len(target) - mask.dim()) + tuple(mask.shape)


def _compute_layout(query, key, value, attn_mask, enable_gqa: bool) -> _Layout:
    bq, hq = _split_heads(query)
    bk, hk = _split_heads(key)
    bv, hv = _split_heads(value)
    batch = _broadcast([bq, bk, bv], "batch dims")
    length, e = query.shape[-2:]
    s, ev = value.shape[-2:]
    if enable_gqa and (hq != hk or hq != hv):
        h = max(hk, hv)
        if h % min(hk, hv) != 0:
            raise RuntimeError(
                f"scaled_dot_product_attention: key heads ({hk}) and value heads ({hv}) must divide each other "
                "for enable_gqa=True."
            )
        g = hq // h
        hout = hq
    else:
        hout = _broadcast([(hq,), (hk,), (hv,)], "head counts (without enable_gqa=True)")[0]
        if hk == hv == 1 and hq > 1:
            h, g = 1, hq  # broadcast keys are GQA with one key/value head: no copy of k and v.
        else:
            h, g = hout, 1
    mask_shape = None
    if attn_mask is not None:
        mask_shape = _mask_rank_shape(attn_mask, (*batch, hout, length, s))
    ndim = max(query.dim(), key.dim(), value.dim())
    out_shape = (*batch, hout, length, ev)[-ndim:] if ndim >= 3 else (length, ev)
    return _Layout(
        batch=batch, flat_batch=math.prod(batch), hq=hq, hk=hk, hv=hv, hout=hout, h=h, g=g, length=length, e=e,
        mask_rank_shape=mask_shape, mask_batch_is_one=mask_shape is None or all(d == 1 for d in mask_shape[:-3]),
        out_shape=tuple(out_shape),
    )


def _expand_heads(t: torch.Tensor, lay: _Layout, heads: int) -> torch.Tensor:
    """``(*b, h, N, E)`` -> ``(B, H, N, E)``; GQA head ``i`` reads head ``i // (H / h)``."""
    t = t if t.dim() >= 3 else t.unsqueeze(0)
    t = t.expand(*lay.batch, heads, *t.shape[-2:]).reshape(lay.flat_batch, heads, *t.shape[-2:])
    if heads != lay.h:
        rep = lay.h // heads
        t = t.unsqueeze(2).expand(-1, heads, rep, *t.shape[-2:]).reshape(t.shape[0], lay.h, *t.shape[-2:])
    return t


def _canonical_query(query: torch.Tensor, lay: _Layout) -> torch.Tensor:
    q = query if query.dim() >= 3 else query.unsqueeze(0)
    q = q.expand(*lay.batch, lay.hq, lay.length, lay.e).reshape(lay.flat_batch, lay.hq, lay.length, lay.e)
    if lay.hq != lay.hout:
        q = q.expand(q.shape[0], lay.hout, lay.length, lay.e)
    return q.reshape(q.shape[0], lay.h, lay.g, lay.length, lay.e)


def _canonical_mask(mask: torch.Tensor, lay: _Layout) -> torch.Tensor:
    """A mask that broadcasts to ``(*batch, Hq, L, S)`` as ``(Bm, Hm, Gm, Lm, Sm)``."""
    mh, lm, sm = lay.mask_rank_shape[-3:]
    m = mask.reshape(lay.mask_rank_shape)
    if lay.mask_batch_is_one:
        m = m.reshape(1, mh, lm, sm)
    else:
        m = m.expand(*lay.batch, mh, lm, sm).reshape(lay.flat_batch, mh, lm, sm)
    if mh == 1:
        return m.unsqueeze(2)
    return m.reshape(m.shape[0], lay.h, lay.g, lm, sm)


def call_signature(query, key, value, attn_mask, is_causal: bool, enable_gqa: bool) -> Optional[Tuple[Hashable, ...]]:
    """What a call's validation, layout and plan depend on besides budget and grad: shapes, dtypes, devices and
    flags. None when an argument is not a tensor (such calls are never cached: validation names the problem)."""
    try:
        mask = None if attn_mask is None else (attn_mask.shape, attn_mask.dtype, attn_mask.device)
        return (
            query.shape, key.shape, value.shape, query.dtype, key.dtype, value.dtype,
            query.device, key.device, value.device, mask, bool(is_causal), bool(enable_gqa),
        )
    except AttributeError:
        return None


_layouts: Dict[Hashable, _Layout] = {}
register(_layouts.clear)


def _layout(query, key, value, attn_mask, is_causal: bool, enable_gqa: bool, signature) -> _Layout:
    """Validate and lay out a call; cached by :func:`call_signature` (a cached signature has passed validation)."""
    lay = _layouts.get(signature) if signature is not None else None
    if lay is None:
        validate_arguments(query, key, value, attn_mask, is_causal, enable_gqa)
        lay = _compute_layout(query, key, value, attn_mask, enable_gqa)
        if signature is not None and not is_compiling():
            if len(_layouts) >= _CACHE_SIZE:
                _layouts.clear()
            _layouts[signature] = lay
    return lay


def build_problem(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
    is_causal: bool = False, scale: Optional[float] = None, enable_gqa: bool = False, *,
    signature: Optional[Tuple[Hashable, ...]] = None,
) -> AttentionProblem:
    """Validate an SDPA call (as :func:`validate_arguments`, plus shapes) and build its canonical view.

    Args:
        query: ``(*batch, Hq, L, E)`` (or ``(L, E)``).
        key: ``(*batch, H, S, E)``.
        value: ``(*batch, H, S, Ev)``.
        attn_mask: broadcastable to ``(*batch, Hq, L, S)``.
        signature: the call's :func:`call_signature` when the caller has it already.

    Returns:
        The :class:`AttentionProblem`.

    Raises:
        RuntimeError (TypeError for non-tensors): what torch's SDPA rejects, naming the argument and the fix.
    """
    if signature is None and not is_compiling():
        signature = call_signature(query, key, value, attn_mask, is_causal, enable_gqa)
    lay = _layout(query, key, value, attn_mask, is_causal, enable_gqa, signature)
    q = _canonical_query(query, lay)
    k = _expand_heads(key, lay, lay.hk)
    v = _expand_heads(value, lay, lay.hv)
    mask = None if attn_mask is None else _canonical_mask(attn_mask, lay)
    if scale is None:
        scale = 1.0 / math.sqrt(lay.e) if lay.e > 0 else 1.0
    return AttentionProblem(q, k, v, mask, bool(is_causal), float(scale), lay.out_shape)
