"""Ring attention: exact sequence-parallel attention where K/V blocks travel around the ranks.

Algorithm: Ring Attention with blockwise transformers (Liu, Zaharia & Abbeel 2023, arXiv:2310.01889), with the
flash-attention style backward of ring-flash-attention. Rank ``r`` of ``P`` holds the contiguous shard of tokens
``[r*N/P, (r+1)*N/P)`` of q, k and v. In step ``t`` it attends its queries to the K/V block of rank ``(r - t) mod P``
with noflash's tiles (:func:`noflash_core.dispatch.forward_tiles`, which also returns the row log-sum-exp), while
the block for step ``t + 1`` is already on the wire. Partial results merge exactly through the log-sum-exp::

    lse = logaddexp(lse_a, lse_b),  out = exp(lse_a - lse) * out_a + exp(lse_b - lse) * out_b

(the online-softmax rescaling of Milakov & Gimelshein 2018 / FlashAttention, Dao et al. 2022).

Backward recomputes each step's tiles from the saved q, the merged output and lse
(:func:`noflash_core.dispatch.attention_backward`); the dK/dV contributions to a block travel with it around the
ring and arrive back at its owner. No rank ever holds more than two K/V blocks (the one in use and the next), so
per-rank memory is O(N/P). Step tiles that run out of memory are retried with smaller ones (unless both blocks
were pinned).

Causal: with contiguous shards rank ``r`` only needs the blocks of ranks ``<= r``: step 0 (its own block) runs
with the causal diagonal, steps ``t <= r`` attend fully, and the fully masked steps are neither computed nor sent.
That makes the causal ring a pipeline: rank ``r`` does ``r + 1`` steps (the load is unbalanced; a zigzag layout
would balance it but breaks the contiguous shard contract, so it is not offered).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch
import torch.distributed as dist

from ..dispatch import attention_backward, forward_tiles, plan_attention, report_plan
from ..planner import Plan
from ..problem import AttentionProblem, build_problem
from ..tiles import TileMath
from ._checks import CallInfo, GroupInfo, check_call, group_info
from ._p2p import StepMessages

__all__ = ["merge_partials", "ring_attention"]

Tensor = torch.Tensor


def merge_partials(
    out: Optional[Tensor], lse: Optional[Tensor], block_out: Tensor, block_lse: Tensor
) -> Tuple[Tensor, Tensor]:
    """Merge one block's attention into the running result, exactly, through the log-sum-exp.

    Args:
        out: running output ``(..., L, Ev)`` in the accumulation dtype (updated in place), or None for the first.
        lse: running row log-sum-exp ``(..., L)``, or None.
        block_out: this block's normalised output ``(..., L, Ev)``.
        block_lse: this block's row log-sum-exp ``(..., L)``; ``-inf`` where the block has no unmasked key.

    Returns:
        The merged ``(out, lse)``; rows that are ``-inf`` in both stay ``-inf`` with output 0.
    """
    if out is None:
        return block_out.to(block_lse.dtype).clone(), block_lse.clone()
    new = torch.logaddexp(lse, block_lse)
    safe = torch.where(torch.isneginf(new), 0.0, new)
    out.mul_((lse - safe).exp_().unsqueeze(-1))
    out.add_(block_out.to(out.dtype) * (block_lse - safe).exp_().unsqueeze(-1))
    return out, new


@dataclass(frozen=True)
class _Schedule:
    """Who computes, sends and receives what in each step of a ring of ``size`` ranks, seen from ``rank``.

    In step ``t`` rank ``r`` holds the K/V block of rank ``(r - t) mod P``. Causal: rank ``r`` needs the blocks of
    ranks ``<= r`` only, i.e. steps ``t <= r``.
    """

    rank: int
    size: int
    causal: bool

    def _needs(self, rank: int, step: int) -> bool:
        return not self.causal or step <= rank

    def computes(self, t: int) -> bool:
        return self._needs(self.rank, t)

    def sends_kv(self, t: int) -> bool:
        return t < self.size - 1 and self._needs((self.rank + 1) % self.size, t + 1)

    def receives_kv(self, t: int) -> bool:
        return t < self.size - 1 and self._needs(self.rank, t + 1)

    def dkv_destination(self, t: int) -> Optional[int]:
        """Where the dK/dV accumulator of step ``t``'s block goes next, or None when it is complete and ours."""
        if self.size == 1:
            return None
        if not self.causal:
            return (self.rank + 1) % self.size
        if self.rank < self.size - 1:
            return self.rank + 1
        owner = self.size - 1 - t  # the last rank completes block (P-1-t) and sends it home
        return None if owner == self.rank else owner

    def partial_dkv_source(self, t: int) -> Optional[int]:
        """The rank whose step-``t`` accumulator this rank continues in step ``t + 1``."""
        if self.size == 1 or t >= self.size - 1:
            return None
        if not self.causal:
            return (self.rank - 1) % self.size
        return self.rank - 1 if 1 <= self.rank and t <= self.rank - 1 else None

    def final_dkv_source(self, t: int) -> Optional[int]:
        """The rank that sends this rank its own block's complete dK/dV in step ``t``."""
        if self.size == 1:
            return None
        if not self.causal:
            return (self.rank - 1) % self.size if t == self.size - 1 else None
        last = self.size - 1
        return last if self.rank < last and t == last - self.rank else None


def _pass_kv(
    gi: GroupInfo, sched: _Schedule, t: int, k: Tensor, v: Tensor
) -> Tuple[StepMessages, Optional[Tuple[Tensor, Tensor]]]:
    """Post step ``t``'s K/V transfer around the ring: ``k``/``v`` to the next rank when it needs them, and
    buffers for the previous rank's block when we do. Returns the started messages and those buffers (None when
    nothing comes); the buffers hold the block after ``msgs.wait()``."""
    msgs = StepMessages(gi)
    if sched.sends_kv(t):
        nxt = (gi.rank + 1) % gi.size
        msgs.send(k, nxt)
        msgs.send(v, nxt)
    incoming = None
    if sched.receives_kv(t):
        prv = (gi.rank - 1) % gi.size
        incoming = (msgs.recv(k, prv), msgs.recv(v, prv))
    msgs.start()
    return msgs, incoming


def _step_problem(q: Tensor, k: Tensor, v: Tensor, diagonal_causal: bool, scale: float) -> AttentionProblem:
    return AttentionProblem(q, k, v, None, diagonal_causal, scale, ())


class _RingAttention(torch.autograd.Function):
    """Canonical q ``(B, H, G, Ls, E)``, k ``(B, H, Ss, E)``, v ``(B, H, Ss, Ev)`` shards -> out shard
    ``(B, H, G, Ls, Ev)`` and its rows' global log-sum-exp ``(B, H, G, Ls)``, both differentiable."""

    @staticmethod
    def forward(ctx, q, k, v, gi: GroupInfo, causal: bool, scale: float, plan: Plan, pinned: bool):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        sched = _Schedule(gi.rank, gi.size, causal)
        out = lse = None
        k_cur, v_cur = k, v
        for t in range(gi.size):
            msgs, incoming = _pass_kv(gi, sched, t, k_cur, v_cur)
            if sched.computes(t):  # overlapped with the transfer of the next block
                problem = _step_problem(q, k_cur, v_cur, causal and t == 0, scale)
                block_out, block_lse, _ = forward_tiles(problem, plan, pinned=pinned)
                out, lse = merge_partials(out, lse, block_out, block_lse)
                del block_out, block_lse
            msgs.wait()
            if incoming is not None:
                k_cur, v_cur = incoming
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.params = (gi, causal, scale, plan, pinned)
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse = ctx.saved_tensors
        gi, causal, scale, plan, pinned = ctx.params
        grad_out = torch.zeros_like(out) if grad_out is None else grad_out.contiguous()
        acc = TileMath.for_inputs(q, k, v).acc_dtype
        sched = _Schedule(gi.rank, gi.size, causal)
        dq = torch.zeros(q.shape, dtype=acc, device=q.device)
        k_cur, v_cur = k, v
        pending: Optional[StepMessages] = None  # the previous step's dK/dV messages
        partial_in = final = None
        for t in range(gi.size):
            msgs, incoming = _pass_kv(gi, sched, t, k_cur, v_cur)
            dk_acc = dv_acc = None
            if sched.computes(t):  # overlapped with the K/V transfer and the previous dK/dV transfer
                problem = _step_problem(q, k_cur, v_cur, causal and t == 0, scale)
                dq_t, dk_t, dv_t, _ = attention_backward(problem, out, lse, grad_out, plan, grad_lse=grad_lse,
                                                         pinned=pinned)
                dq.add_(dq_t)
                dk_acc, dv_acc = dk_t.to(acc), dv_t.to(acc)
                del dq_t, dk_t, dv_t
            if pending is not None:
                pending.wait()
                pending = None
            if dk_acc is not None and t > 0:
                dk_acc.add_(partial_in[0])
                dv_acc.add_(partial_in[1])
            partial_in = None
            dkv = StepMessages(gi)
            if dk_acc is not None:
                dest = sched.dkv_destination(t)
                if dest is None:
                    final = (dk_acc, dv_acc)
                else:
                    dkv.send(dk_acc, dest)
                    dkv.send(dv_acc, dest)
            src = sched.partial_dkv_source(t)
            if src is not None:
                partial_in = (dkv.recv(k, src, acc), dkv.recv(v, src, acc))
            src = sched.final_dkv_source(t)
            if src is not None:
                final = (dkv.recv(k, src, acc), dkv.recv(v, src, acc))
            pending = dkv.start()
            msgs.wait()
            if incoming is not None:
                k_cur, v_cur = incoming
        if pending is not None:
            pending.wait()
        dk, dv = final
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None


def _ring_rule(info: CallInfo, size: int) -> Optional[str]:
    length, s = info.shapes[0][-2], info.shapes[1][-2]
    if info.is_causal and length != s:
        return (
            f"is_causal=True needs query and key/value shards of one sequence (equal lengths), got query length "
            f"{length} and key length {s} per rank. Shard q, k and v the same way, or drop is_causal."
        )
    return None


def ring_attention(
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
    return_lse: bool = False,
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    r"""Exact attention over a sequence sharded across the ranks of ``group``; K/V blocks travel a ring.

    Shard contract: with ``P`` ranks and a sequence of ``N`` tokens, rank ``r`` passes tokens
    ``[r*N/P, (r+1)*N/P)`` on dim -2 of query, key and value, and gets back the same tokens of the output of
    ``scaled_dot_product_attention`` over the whole sequence. Gradients of its query, key and value shards equal
    the matching slices of the full attention's gradients. Every rank must call it (and its backward) together.

    Args:
        query: ``(N, ..., Hq, L/P, E)``.
        key: ``(N, ..., H, S/P, E)``.
        value: ``(N, ..., H, S/P, Ev)``.
        group: the process group (default: the world).
        is_causal: causal over the global positions (needs ``L == S``); fully masked steps are skipped.
        scale: defaults to ``1 / sqrt(E)``.
        enable_gqa: query head ``h`` uses key/value head ``h // (Hq // H)``.
        budget_bytes: working-memory budget for one step's tiles (default: ``NOFLASH_BUDGET_MB`` or the device's).
        block_m, block_n: pin the tile sizes (default: planned from the budget).
        return_lse: also return the log-sum-exp of this shard's rows over the whole sequence (differentiable).

    Returns:
        ``(N, ..., Hq, L/P, Ev)`` in the query's dtype; with ``return_lse`` also ``lse`` ``(N, ..., Hq, L/P)`` in
        float32 (float64 for float64 inputs).

    Raises:
        RuntimeError (TypeError for non-tensors) on every rank when any rank's input is bad or the ranks disagree
        (shapes, dtype, device type, flags, scale, whether a backward will run); checked with one small
        ``all_gather`` before the K/V blocks move, so no rank is left waiting.
    """
    gi = group_info("ring_attention", group)
    info = check_call("ring_attention", gi, query, key, value, is_causal, enable_gqa, scale, _ring_rule)
    problem = build_problem(query, key, value, None, bool(is_causal), scale, enable_gqa)
    # Both blocks pinned: exactly those tiles (tier 2, the tier with a key block), never changed on out-of-memory.
    pinned = block_m is not None and block_n is not None
    plan = plan_attention(query, key, value, None, 0.0, bool(is_causal), scale, enable_gqa,
                          tier=2 if pinned else "auto", block_m=block_m, block_n=block_n, budget_bytes=budget_bytes,
                          return_lse=True, requires_grad=info.needs_grad)
    report_plan(plan, query, key, reason=f"ring_attention step tiles (rank {gi.rank} of {gi.size}): {plan.reason}")
    out, lse = _RingAttention.apply(
        problem.query, problem.key, problem.value, gi, bool(is_causal), problem.scale, plan, pinned,
    )
    out = out.reshape(problem.out_shape)
    return (out, lse.reshape(problem.out_shape[:-1])) if return_lse else out
