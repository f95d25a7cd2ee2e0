"""The tiled attention as two registered torch ops, ``noflash::attention_forward`` and ``noflash::attention_backward``.

Registering them with ``torch.library.custom_op`` (and fake implementations) makes ``torch.compile`` see one op per
call, with no graph break, and gives autograd an O(N)-memory backward:

* the forward saves only q, k, v, the mask, the output and the per-row log-sum-exp (plus the dropout seed, an int);
* the backward recomputes each tile (see ``backward.py``) and retries with fewer batch-head pairs per step, then
  halved blocks, on ``torch.OutOfMemoryError`` (the policy of ``oom.py``, shared with the forward), unless the blocks
  were pinned.

Both ops work on the canonical layout of ``problem.py``.
"""

from __future__ import annotations

import re
from typing import Iterator, Optional, Tuple

import torch

from .backward import attention_backward
from .chunk_setup import ForwardSpec
from .oom import retry_out_of_memory
from .planner import MIN_BLOCK
from .problem import AttentionProblem, tier3_grad_error
from .tier1 import tier1_forward
from .tier2 import tier2_forward
from .tier3 import tier3_forward
from .tiles import DropoutSpec

__all__ = [
    "attention_backward_op",
    "attention_forward_op",
    "attention_with_lse_op",
    "backward_with_retry",
    "run_forward",
]

Tensor = torch.Tensor


def _op_namespace(package: str) -> str:
    """``noflash`` for ``import noflash_core``; a namespace of its own for every other copy of the package.

    A process can hold two copies: ``noflash_core`` and the node pack's ``<pack>.noflash_core`` inside ComfyUI.
    Both defining ``noflash::attention_forward`` would make one copy's registration replace the other's, and when
    that copy is garbage-collected its kernels are deregistered under the other copy's feet (a crash, not an
    error). So each copy registers under its own namespace.
    """
    if package == "noflash_core":
        return "noflash"
    prefix = package[: -len(".noflash_core")] if package.endswith(".noflash_core") else package
    return "noflash_" + re.sub(r"\W", "_", prefix).strip("_").lower()


OP_NAMESPACE = _op_namespace(__name__.rpartition(".")[0])
"""The torch op namespace of this copy's ops (``noflash`` for ``import noflash_core``)."""


def _problem(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], is_causal: bool, scale: float):
    return AttentionProblem(q, k, v, mask, is_causal, scale, ())


def _dropout(p: float, seed: int) -> Optional[DropoutSpec]:
    return DropoutSpec(p, seed) if p > 0.0 else None


def run_forward(
    problem: AttentionProblem,
    tier: int,
    block_m: int,
    block_n: int,
    dropout: Optional[DropoutSpec],
    need_lse: bool,
    block_h: int = 0,
) -> Tuple[Tensor, Optional[Tensor]]:
    """Run one tier's forward on a canonical problem: ``out (B, H, G, L, Ev)`` and ``lse (B, H, G, L)`` or None.
    ``block_h`` batch-head pairs run per step (0: all)."""
    spec = ForwardSpec(block_m, block_n, block_h, dropout, need_lse)
    if tier == 1:
        return tier1_forward(problem, spec)
    if tier == 2:
        return tier2_forward(problem, spec)
    if tier == 3:
        return tier3_forward(problem, spec), None
    raise ValueError(f"tier must be 1, 2 or 3, got {tier!r}")


@torch.library.custom_op(f"{OP_NAMESPACE}::attention_forward", mutates_args=())
def attention_forward_op(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Optional[Tensor],
    is_causal: bool,
    scale: float,
    dropout_p: float,
    seed: int,
    tier: int,
    block_m: int,
    block_n: int,
    pinned: bool,
    block_h: int = 0,
) -> Tuple[Tensor, Tensor]:
    """Canonical forward: q ``(B, H, G, L, E)``, k ``(B, H, S, E)``, v ``(B, H, S, Ev)``, mask
    ``(Bm, Hm, Gm, Lm, Sm)``. Returns ``out (B, H, G, L, Ev)`` and ``lse (B, H, G, L)`` (empty for tier 3)."""
    problem = _problem(q, k, v, mask, is_causal, scale)
    out, lse = run_forward(problem, tier, block_m, block_n, _dropout(dropout_p, seed), tier != 3, block_h)
    if lse is None:
        lse = q.new_empty((0,), dtype=torch.float32)
    return out, lse


@attention_forward_op.register_fake
def _(q, k, v, mask, is_causal, scale, dropout_p, seed, tier, block_m, block_n, pinned, block_h=0):
    b, h, g, length, _ = q.shape
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = q.new_empty((b, h, g, length, v.shape[-1]))
    lse = q.new_empty((b, h, g, length) if tier != 3 else (0,), dtype=acc if tier != 3 else torch.float32)
    return out, lse


def _halved_blocks(block_m: int, block_n: int, block_h: int, pairs: int) -> Iterator[Tuple[int, int, int]]:
    """``(block_m, block_n, block_h)`` for backward retries: halve the batch-head pairs per step first (the GEMMs
    keep their shape), then the larger block (down to ``MIN_BLOCK``) until both are minimal."""
    bm, bn, bh = block_m, block_n, block_h if 0 < block_h < pairs else pairs
    while bh > 1:
        bh = max(1, bh // 2)
        yield bm, bn, bh
    while bm > MIN_BLOCK or bn > MIN_BLOCK:
        if bn > bm:
            bn = max(MIN_BLOCK, bn // 2)
        else:
            bm = max(MIN_BLOCK, bm // 2)
        yield bm, bn, bh


def backward_with_retry(
    problem: AttentionProblem,
    out: Tensor,
    lse: Tensor,
    grad_out: Tensor,
    block_m: int,
    block_n: int,
    block_h: int = 0,
    *,
    dropout: Optional[DropoutSpec] = None,
    mask_grad: bool = False,
    grad_lse: Optional[Tensor] = None,
    pinned: bool = False,
) -> Tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
    """The tiled backward of a canonical problem (``backward.py``), retried with fewer batch-head pairs per step,
    then halved blocks, on out-of-memory (never when ``pinned``). Returns ``dq``, ``dk``, ``dv`` and the float
    mask's gradient (None unless ``mask_grad``)."""
    pairs = problem.query.shape[0] * problem.query.shape[1]
    grads, _ = retry_out_of_memory(
        lambda blocks: attention_backward(
            problem, out, lse, grad_out, blocks[0], blocks[1], dropout, mask_grad, grad_lse, blocks[2]
        ),
        (block_m, block_n, block_h),
        lambda: () if pinned else _halved_blocks(block_m, block_n, block_h, pairs),
        problem.query.device,
        what="noflash backward",
    )
    return grads


@torch.library.custom_op(f"{OP_NAMESPACE}::attention_backward", mutates_args=())
def attention_backward_op(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Optional[Tensor],
    out: Tensor,
    lse: Tensor,
    is_causal: bool,
    scale: float,
    dropout_p: float,
    seed: int,
    block_m: int,
    block_n: int,
    mask_grad: bool,
    pinned: bool,
    grad_lse: Optional[Tensor] = None,
    block_h: int = 0,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Canonical backward: ``dq``, ``dk``, ``dv`` and the float mask's gradient (an empty tensor when not asked).
    ``grad_lse`` ``(B, H, G, L)`` is the gradient of the lse output, for callers that return it."""
    dq, dk, dv, dmask = backward_with_retry(
        _problem(q, k, v, mask, is_causal, scale), out, lse, grad_out, block_m, block_n, block_h,
        dropout=_dropout(dropout_p, seed), mask_grad=mask_grad, grad_lse=grad_lse, pinned=pinned,
    )
    if dmask is None:
        dmask = q.new_empty((0,))
    return dq, dk, dv, dmask


@attention_backward_op.register_fake
def _(grad_out, q, k, v, mask, out, lse, is_causal, scale, dropout_p, seed, block_m, block_n, mask_grad, pinned,
      grad_lse=None, block_h=0):
    dmask = mask.new_empty(mask.shape) if (mask_grad and mask is not None) else q.new_empty((0,))
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dmask


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, mask, is_causal, scale, dropout_p, seed, tier, block_m, block_n, pinned, *rest = inputs
    out, lse = output
    if tier == 3:
        ctx.tier3 = True
        return
    ctx.tier3 = False
    ctx.save_for_backward(q, k, v, mask, out, lse)
    ctx.params = (is_causal, scale, dropout_p, seed, block_m, block_n, pinned, rest[0] if rest else 0)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out: Tensor, grad_lse: Optional[Tensor]):
    if ctx.tier3:
        raise tier3_grad_error()
    if torch.is_grad_enabled():
        raise RuntimeError(
            "noflash attention does not support double backward (create_graph=True through attention). Use "
            "torch's math SDPA for higher-order gradients: noflash_core.disable() or call the original function."
        )
    q, k, v, mask, out, lse = ctx.saved_tensors
    is_causal, scale, dropout_p, seed, block_m, block_n, pinned, block_h = ctx.params
    mask_grad = mask is not None and ctx.needs_input_grad[3]
    dq, dk, dv, dmask = attention_backward_op(
        grad_out.contiguous(), q, k, v, mask, out, lse, is_causal, scale, dropout_p, seed, block_m, block_n,
        mask_grad, pinned, None, block_h,
    )
    return dq, dk, dv, (dmask if mask_grad else None), None, None, None, None, None, None, None, None, None


attention_forward_op.register_autograd(_backward, setup_context=_setup_context)


class _AttentionWithLse(torch.autograd.Function):
    """Canonical ``(q, k, v, mask) -> (out, lse)``, differentiable through both outputs: the lse's gradient enters
    the backward as ``dS = P * (dP - (D - dlse))`` (``d lse / d S = P``)."""

    @staticmethod
    def forward(ctx, q, k, v, mask, is_causal: bool, scale: float, dropout_p: float, seed: int, tier: int,
                block_m: int, block_n: int, pinned: bool, block_h: int):
        out, lse = attention_forward_op(q, k, v, mask, is_causal, scale, dropout_p, seed, tier, block_m, block_n,
                                        pinned, block_h)
        ctx.save_for_backward(q, k, v, mask, out, lse)
        ctx.params = (is_causal, scale, dropout_p, seed, block_m, block_n, pinned, block_h)
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out: Optional[Tensor], grad_lse: Optional[Tensor]):
        q, k, v, mask, out, lse = ctx.saved_tensors
        is_causal, scale, dropout_p, seed, block_m, block_n, pinned, block_h = ctx.params
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        mask_grad = mask is not None and ctx.needs_input_grad[3]
        dq, dk, dv, dmask = attention_backward_op(
            grad_out.contiguous(), q, k, v, mask, out, lse, is_causal, scale, dropout_p, seed, block_m, block_n,
            mask_grad, pinned, grad_lse, block_h,
        )
        return (dq, dk, dv, dmask if mask_grad else None) + (None,) * 9


def attention_with_lse_op(
    q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], is_causal: bool, scale: float, dropout_p: float,
    seed: int, tier: int, block_m: int, block_n: int, pinned: bool, block_h: int = 0,
) -> Tuple[Tensor, Tensor]:
    """Canonical forward returning ``out (B, H, G, L, Ev)`` and ``lse (B, H, G, L)``, both differentiable (tiers
    1 and 2); arguments as :func:`attention_forward_op`."""
    return _AttentionWithLse.apply(q, k, v, mask, is_causal, scale, dropout_p, seed, tier, block_m, block_n,
                                   pinned, block_h)
