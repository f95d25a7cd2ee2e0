"""Ulysses attention: trade the sequence shard for a head shard with all-to-all, attend locally, trade back.

Algorithm: DeepSpeed-Ulysses (Jacobs et al. 2023, arXiv:2309.14509). Rank ``r`` of ``P`` holds tokens
``[r*N/P, (r+1)*N/P)`` of every head. One ``all_to_all`` per tensor turns that into all ``N`` tokens of heads
``[r*H/P, (r+1)*H/P)``; the local attention is noflash's exact O(N)-memory SDPA (tiled, never the ``N^2`` score
matrix that math SDPA would build per rank); a last ``all_to_all`` returns the output to sequence shards. The
all-to-alls are autograd functions whose backward is the opposite all-to-all.

Needs the query heads and the key/value heads to divide by ``P``; with GQA, rank ``r``'s query heads use exactly
its own key/value heads, so GQA stays local.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from ..dispatch import attention
from ._checks import CallInfo, GroupInfo, check_call, group_info

__all__ = ["ulysses_attention"]

Tensor = torch.Tensor


def _all_to_all(x: Tensor, gi: GroupInfo, scatter_dim: int, gather_dim: int) -> Tensor:
    """Split ``x`` in ``P`` chunks along ``scatter_dim``, send chunk ``j`` to rank ``j``, and concatenate what
    arrives along ``gather_dim`` in rank order."""
    send = torch.stack(x.tensor_split(gi.size, dim=scatter_dim)).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=gi.group)
    return torch.cat(recv.unbind(0), dim=gather_dim)


class _AllToAll(torch.autograd.Function):
    """Differentiable all-to-all: the gradient goes back with the scatter and gather dims swapped."""

    @staticmethod
    def forward(ctx, x: Tensor, gi: GroupInfo, scatter_dim: int, gather_dim: int) -> Tensor:
        ctx.params = (gi, scatter_dim, gather_dim)
        return _all_to_all(x, gi, scatter_dim, gather_dim)

    @staticmethod
    def backward(ctx, grad: Tensor):
        gi, scatter_dim, gather_dim = ctx.params
        return _all_to_all(grad.contiguous(), gi, gather_dim, scatter_dim), None, None, None


def _ulysses_rule(info: CallInfo, size: int) -> Optional[str]:
    for name, shape in zip(("query", "key", "value"), info.shapes):
        if len(shape) < 3:
            return (
                f"{name} has no head dim (shape {shape}); Ulysses splits heads, so pass (..., heads, L/P, E), or use "
                "ring_attention."
            )
        if shape[-3] % size != 0:
            return (
                f"the number of {name} heads ({shape[-3]}) must be divisible by the group size P={size}: each rank "
                f"attends H/P heads. Use a group size that divides the head counts, or ring_attention (no head "
                "constraint)."
            )
    return None


def ulysses_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    *,
    group: Optional[dist.ProcessGroup] = None,
    is_causal: bool = False,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
    budget_bytes: Optional[int] = None,
    block_m: Optional[int] = None,
    block_n: Optional[int] = None,
) -> Tensor:
    r"""Exact attention over a sequence sharded across the ranks of ``group``, by all-to-all over heads.

    Shard contract: as :func:`noflash_core.distributed.ring_attention`: rank ``r`` passes tokens
    ``[r*N/P, (r+1)*N/P)`` on dim -2 and gets the same tokens of the full attention's output; gradients are the
    matching slices of the full attention's gradients.

    Args:
        query: ``(N, ..., Hq, L/P, E)``; ``Hq`` divisible by ``P``.
        key: ``(N, ..., H, S/P, E)``; ``H`` divisible by ``P``.
        value: ``(N, ..., H, S/P, Ev)``.
        group: the process group (default: the world).
        is_causal: causal over the global positions.
        scale: defaults to ``1 / sqrt(E)``.
        enable_gqa: query head ``h`` uses key/value head ``h // (Hq // H)``.
        budget_bytes: working-memory budget of the local attention (default: ``NOFLASH_BUDGET_MB`` or the device's).
        block_m, block_n: pin the local attention's tile sizes (default: planned from the budget).

    Returns:
        ``(N, ..., Hq, L/P, Ev)`` in the query's dtype.

    Raises:
        RuntimeError (TypeError for non-tensors) on every rank when a head count does not divide by ``P``, any
        rank's input is bad, or the ranks disagree; checked with one small ``all_gather`` before any all-to-all.
    """
    gi = group_info("ulysses_attention", group)
    check_call("ulysses_attention", gi, query, key, value, is_causal, enable_gqa, scale, _ulysses_rule)
    if gi.size == 1:
        return attention(
            query, key, value, is_causal=bool(is_causal), scale=scale, enable_gqa=enable_gqa, budget_bytes=budget_bytes,
            block_m=block_m, block_n=block_n,
        ).out
    q, k, v = (_AllToAll.apply(t, gi, -3, -2) for t in (query, key, value))
    out = attention(
        q, k, v, is_causal=bool(is_causal), scale=scale, enable_gqa=enable_gqa, budget_bytes=budget_bytes,
        block_m=block_m, block_n=block_n,
    ).out
    return _AllToAll.apply(out, gi, -2, -3)
