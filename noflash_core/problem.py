"""Validate SDPA arguments and bring them into one canonical layout.

Every tier works on the same five-dimensional view of the problem, so the tiers never see batch dims, GQA or
broadcasting:

* query ``(B, H, G, L, E)``: ``B`` flattens the leading batch dims, ``H`` is the number of key/value heads and
  ``G`` the number of query heads per key/value head (``G = 1`` without GQA).
* key ``(B, H, S, E)`` and value ``(B, H, S, Ev)``.
* mask ``(Bm, Hm, Gm, Lm, Sm)`` where every dim is either 1 (broadcast) or the full size.
* output ``(B, H, G, L, Ev)``, reshaped back to torch's output shape ``(*batch, Hq, L, Ev)`` at the end.

All reshapes are differentiable torch ops, so autograd maps gradients back to the caller's shapes (including the
sum over broadcast mask dims).

Error messages name the argument and the fix, and use the exception type torch's SDPA raises (RuntimeError).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

__all__ = ["AttentionProblem", "build_problem", "validate_arguments"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


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
    def dims(self) -> Tuple[int, int, int, int, int, int, int]:
        """``(B, H, G, L, S, E, Ev)``."""
        b, h, g, length, e = self.query.shape
        return b, h, g, length, self.key.shape[-2], e, self.value.shape[-1]


def validate_arguments(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: Optional[torch.Tensor],
    dropout_p: float,
    is_causal: bool,
    enable_gqa: bool,
) -> None:
    """Raise RuntimeError, as torch's SDPA does, for arguments it rejects."""
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
    if attn_mask is not None:
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
    if enable_gqa and query.dim() >= 3:
        hq = query.shape[-3]
        hk = key.shape[-3] if key.dim() >= 3 else 1
        hv = value.shape[-3] if value.dim() >= 3 else 1
        if hq % hk != 0 or hq % hv != 0:
            raise RuntimeError(
                f"scaled_dot_product_attention: with enable_gqa=True the number of query heads ({hq}) must be a "
                f"multiple of the key heads ({hk}) and the value heads ({hv}). Use a head count that divides."
            )
    del dropout_p  # any float is accepted; values <= 0 mean no dropout, as in torch.


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


def _expand_heads(t: torch.Tensor, batch: Tuple[int, ...], heads: int, target_heads: int) -> torch.Tensor:
    """``(*b, h, N, E)`` -> ``(B, target_heads, N, E)``; GQA head ``i`` reads head ``i // (target/h)``."""
    t = t if t.dim() >= 3 else t.unsqueeze(0)
    t = t.expand(*batch, heads, *t.shape[-2:])
    t = t.reshape(math.prod(batch), heads, *t.shape[-2:])
    if heads != target_heads:
        rep = target_heads // heads
        t = t.unsqueeze(2).expand(-1, heads, rep, *t.shape[-2:]).reshape(t.shape[0], target_heads, *t.shape[-2:])
    return t


def _normalize_mask(
    mask: torch.Tensor, batch: Tuple[int, ...], hq: int, h: int, g: int, length: int, s: int
) -> torch.Tensor:
    """Bring a mask that broadcasts to ``(*batch, Hq, L, S)`` into ``(Bm, Hm, Gm, Lm, Sm)``."""
    target = (*batch, hq, length, s)
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
    m = mask.reshape((1,) * (len(target) - mask.dim()) + tuple(mask.shape))
    mb, mh, lm, sm = tuple(m.shape[: len(batch)]), m.shape[-3], m.shape[-2], m.shape[-1]
    if all(d == 1 for d in mb):
        m = m.reshape(1, mh, lm, sm)
    else:
        m = m.expand(*batch, mh, lm, sm).reshape(math.prod(batch), mh, lm, sm)
    if mh == 1:
        return m.unsqueeze(2)
    return m.reshape(m.shape[0], h, g, lm, sm)


def build_problem(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: Optional[torch.Tensor] = None,
    is_causal: bool = False,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
) -> AttentionProblem:
    """Validate the shapes of an SDPA call and build its canonical view (see the module docstring).

    Args:
        query: ``(*batch, Hq, L, E)`` (or ``(L, E)``).
        key: ``(*batch, H, S, E)``.
        value: ``(*batch, H, S, Ev)``.
        attn_mask: broadcastable to ``(*batch, Hq, L, S)``.

    Returns:
        The :class:`AttentionProblem`.
    """
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
    q = query if query.dim() >= 3 else query.unsqueeze(0)
    q = q.expand(*batch, hq, length, e).reshape(math.prod(batch), hq, length, e)
    if hq != hout:
        q = q.expand(q.shape[0], hout, length, e)
    q = q.reshape(q.shape[0], h, g, length, e)
    k = _expand_heads(key, batch, hk, h)
    v = _expand_heads(value, batch, hv, h)
    mask = None
    if attn_mask is not None:
        mask = _normalize_mask(attn_mask, batch, hout, h, g, length, s)
    if scale is None:
        scale = 1.0 / math.sqrt(e) if e > 0 else 1.0
    ndim = max(query.dim(), key.dim(), value.dim())
    out_shape = (*batch, hout, length, ev)[-ndim:] if ndim >= 3 else (length, ev)
    return AttentionProblem(q, k, v, mask, bool(is_causal), float(scale), tuple(out_shape))
