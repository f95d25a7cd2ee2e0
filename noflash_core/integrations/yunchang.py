"""Run yunchang's sequence-parallel attention (and so xDiT's and Raylight's) on noflash, without flash-attn.

yunchang (the USP library: Ulysses + Ring, Fang & Zhao 2024, arXiv:2405.07719) picks its local attention with
``yunchang.kernels.select_flash_attn_impl(attn_type, stage)``. On GPUs without flash-attn that dead-ends: its torch
path calls ``torch.ops.aten._scaled_dot_product_flash_attention`` (absent on gfx906/RDNA2), its math mode returns
zeros as the log-sum-exp (so ring merges are wrong), and its torch ring has no backward.

:func:`enable` makes the attention types it takes over (by default the ``TORCH_*`` types, plus ``FA``/``FA3`` when
their package is not installed) use noflash:

* the stage functions: ``"fwd-only"`` returns noflash's exact output and its real log-sum-exp
  (:func:`noflash_core.attention` with ``return_lse=True``), ``"bwd-only"`` runs noflash's tiled backward
  (:func:`noflash_core.dispatch.attention_backward`) from a given output and lse (flash-attn's contract, filling
  the ``block_d*`` buffers), ``"fwd-bwd"`` is noflash's differentiable SDPA;
  rings that call them step by step (xDiT's ``xdit_ring_flash_attn_func``, yunchang's ``ring_flash_attn_func``)
  then merge correct partials;
* ``LongContextAttention`` (Ulysses x Ring) runs its ring part with :func:`noflash_core.distributed.ring_attention`
  (exact forward and backward, any backend), and ``UlyssesAttention`` its local attention with noflash.

The seams are yunchang 0.6.4's module globals (``pytorch_attn_forward``/``pytorch_attn_backward`` and, without
flash-attn, ``flash_attn_forward``/``flash_attn_backward`` in ``yunchang.kernels``), the ``select_flash_attn_impl``
name in every already-imported ``yunchang``/``xfuser`` module, and the two layers' ``forward``. :func:`disable`
puts every one of them back. Tensors use yunchang's layout ``(batch, seq, heads, head_dim)``; the lse is
``(batch, heads, seq)`` float32 (float64 for float64 inputs), as flash-attn returns it.

Not supported (raises ``NotImplementedError`` naming the option): dropout, sliding windows, softcap, ALiBi, and a
causal zigzag/stripe ring (their token order is not contiguous; the non-causal ones are fine, as attention without
a mask does not depend on the order of the keys).
"""

from __future__ import annotations

import functools
import logging
import sys
import threading
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch

from ..dispatch import attention, attention_backward, plan_attention
from ..distributed.ring import ring_attention
from ..problem import build_problem

__all__ = ["SUPPORTED_VERSION", "disable", "enable", "is_enabled", "taken_over"]

SUPPORTED_VERSION = "0.6.4"
_TORCH_TYPES = ("TORCH_MATH", "TORCH_FLASH", "TORCH_EFFICIENT", "TORCH_CUDNN")
_log = logging.getLogger(__name__)
_lock = threading.Lock()
_state: Dict[str, Any] = {"enabled": False, "types": frozenset(), "undo": []}

Tensor = torch.Tensor


def _yunchang():
    try:
        import yunchang  # noqa: F401  (imports its submodules, which enable() looks up in sys.modules)
        import yunchang.hybrid.attn_layer  # noqa: F401
        import yunchang.kernels  # noqa: F401
        import yunchang.ulysses.attn_layer  # noqa: F401
    except ImportError as exc:
        raise ImportError(
            f"noflash_core.integrations.yunchang needs yunchang (pip install yunchang=={SUPPORTED_VERSION}; "
            "flash-attn is not needed)."
        ) from exc
    return sys.modules["yunchang"]


def _check_unsupported(dropout_p=0.0, window_size=(-1, -1), softcap=None, alibi_slopes=None) -> None:
    if dropout_p:
        raise NotImplementedError("noflash's yunchang adapter has no dropout; pass dropout_p=0.0.")
    if window_size is not None and tuple(window_size) != (-1, -1):
        raise NotImplementedError("noflash's yunchang adapter has no sliding window; pass window_size=(-1, -1).")
    if softcap:
        raise NotImplementedError("noflash's yunchang adapter has no softcap; pass softcap=0.0.")
    if alibi_slopes is not None:
        raise NotImplementedError("noflash's yunchang adapter has no ALiBi; pass alibi_slopes=None.")


def _heads_first(*tensors: Tensor) -> List[Tensor]:
    """yunchang's ``(b, s, h, d)`` -> SDPA's ``(b, h, s, d)`` (views)."""
    return [t.transpose(1, 2) for t in tensors]


def _check_causal_lengths(causal: bool, q: Tensor, k: Tensor) -> None:
    # flash-attn aligns a causal mask bottom-right, torch top-left; they agree when the lengths are equal.
    if causal and q.shape[1] != k.shape[1]:
        raise NotImplementedError(
            f"causal attention with query length {q.shape[1]} != key length {k.shape[1]}: flash-attn and torch "
            "align the mask differently; noflash's yunchang adapter supports equal lengths only."
        )


def local_forward(
    q: Tensor, k: Tensor, v: Tensor, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
    softcap=None, alibi_slopes=None, return_softmax=False, *args, **kwargs,
) -> Tuple[Tensor, Tensor]:
    """yunchang's ``"fwd-only"`` stage: q ``(b, s, hq, d)``, k/v ``(b, s, h, d)`` -> out ``(b, s, hq, dv)`` and
    the row log-sum-exp ``(b, hq, s)`` (float32, float64 for float64 inputs)."""
    _check_unsupported(dropout_p, window_size, softcap, alibi_slopes)
    _check_causal_lengths(causal, q, k)
    qh, kh, vh = _heads_first(q, k, v)
    out, lse, _ = attention(
        qh, kh, vh, is_causal=bool(causal), scale=softmax_scale, enable_gqa=qh.shape[1] != kh.shape[1],
        return_lse=True,
    )
    return out.transpose(1, 2).contiguous(), lse


def local_backward(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, softmax_lse: Tensor, block_dq_buffer=None,
    block_dk_buffer=None, block_dv_buffer=None, dropout_p=0.0, softmax_scale=None, bwd_causal=None,
    window_size=None, softcap=None, alibi_slopes=None, deterministic=False, rng_state=None, *args, causal=None,
    **kwargs,
) -> Tuple[Tensor, Tensor, Tensor]:
    """yunchang's ``"bwd-only"`` stage, flash-attn's contract: the gradients of one block of keys given the final
    ``out`` and ``softmax_lse`` ``(b, hq, s)``; written into the ``block_d*`` buffers when given, and returned."""
    _check_unsupported(dropout_p, window_size, softcap, alibi_slopes)
    is_causal = bool(bwd_causal if bwd_causal is not None else causal)
    _check_causal_lengths(is_causal, q, k)
    qh, kh, vh, oh, dh = _heads_first(q, k, v, out, dout)
    gqa = qh.shape[1] != kh.shape[1]
    problem = build_problem(qh, kh, vh, None, is_causal, softmax_scale, gqa)
    b, h, g, length, _, _, ev = problem.dims
    plan = plan_attention(qh, kh, vh, None, 0.0, is_causal, softmax_scale, gqa, return_lse=True, requires_grad=True)
    out5 = oh.reshape(b, h, g, length, ev)
    lse5 = softmax_lse.reshape(b, h, g, length)
    dout5 = dh.reshape(b, h, g, length, ev).contiguous()
    dq, dk, dv, _ = attention_backward(problem, out5, lse5, dout5, plan)
    grads = (
        dq.reshape(qh.shape).transpose(1, 2), dk.reshape(kh.shape).transpose(1, 2),
        dv.reshape(vh.shape).transpose(1, 2),
    )
    for buf, grad in zip((block_dq_buffer, block_dk_buffer, block_dv_buffer), grads):
        if buf is not None:
            buf.copy_(grad)
    return grads


def local_attention(
    q: Tensor, k: Tensor, v: Tensor, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
    softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False, *args, **kwargs,
):
    """yunchang's ``"fwd-bwd"`` stage (Ulysses' local attention): differentiable ``(b, s, h, d)`` attention."""
    _check_unsupported(dropout_p, window_size, softcap, alibi_slopes)
    _check_causal_lengths(causal, q, k)
    qh, kh, vh = _heads_first(q, k, v)
    gqa = qh.shape[1] != kh.shape[1]
    out, lse, _ = attention(qh, kh, vh, is_causal=bool(causal), scale=softmax_scale, enable_gqa=gqa,
                            return_lse=bool(return_attn_probs))
    return (out.transpose(1, 2), lse, None) if return_attn_probs else out.transpose(1, 2)


def ring_function(ring_impl: str = "basic") -> Callable:
    """A drop-in for yunchang's ring functions (``ring_flash_attn_func`` and friends): noflash's exact ring."""

    def ring(
        q: Tensor, k: Tensor, v: Tensor, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
        softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False, group=None, attn_type=None,
        attn_processor=None, *args, **kwargs,
    ):
        _check_unsupported(dropout_p, window_size, softcap, alibi_slopes)
        if causal and ring_impl in ("zigzag", "strip"):
            raise NotImplementedError(
                f"noflash's ring is contiguous; a causal '{ring_impl}' ring needs its own token order. Use "
                "ring_impl_type='basic' with causal=True."
            )
        qh, kh, vh = _heads_first(q, k, v)
        out, lse = ring_attention(
            qh, kh, vh, group=group, is_causal=bool(causal), scale=softmax_scale,
            enable_gqa=qh.shape[1] != kh.shape[1], return_lse=True,
        )
        out = out.transpose(1, 2)
        return (out, lse, None) if return_attn_probs else out

    ring.__name__ = f"noflash_ring_{ring_impl}"
    return ring


def taken_over(attn_type) -> bool:
    """Whether noflash runs ``attn_type`` now (False when the adapter is disabled)."""
    return _state["enabled"] and getattr(attn_type, "name", attn_type) in _state["types"]


def _default_types(yc_globals) -> List[str]:
    types = list(_TORCH_TYPES)
    if not getattr(yc_globals, "HAS_FLASH_ATTN", False):
        types.append("FA")
    if not getattr(yc_globals, "HAS_FLASH_ATTN_HOPPER", False):
        types.append("FA3")
    return types


def _patch(obj, name: str, value) -> None:
    old = getattr(obj, name)
    setattr(obj, name, value)
    _state["undo"].append((obj, name, old))


def _wrap_select(original: Callable) -> Callable:
    @functools.wraps(original)
    def select_flash_attn_impl(impl_type, stage: str = "fwd-bwd", attn_processor=None):
        if taken_over(impl_type):
            fns = {"fwd-only": local_forward, "bwd-only": local_backward, "fwd-bwd": local_attention}
            if stage in fns:
                return fns[stage]
        return original(impl_type, stage, attn_processor)

    select_flash_attn_impl.__wrapped_by_noflash__ = True
    return select_flash_attn_impl


def _wrap_long_context_forward(original: Callable, ring_impls: Dict[Any, str]) -> Callable:
    @functools.wraps(original)
    def forward(self, *args, **kwargs):
        impl = ring_impls.get(self.ring_attn_fn)
        if impl is None or not taken_over(self.attn_type):
            return original(self, *args, **kwargs)
        saved = self.ring_attn_fn
        self.ring_attn_fn = ring_function(impl)
        try:
            return original(self, *args, **kwargs)
        finally:
            self.ring_attn_fn = saved

    return forward


def _wrap_ulysses_forward(original: Callable) -> Callable:
    @functools.wraps(original)
    def forward(self, *args, **kwargs):
        if not taken_over(self.attn_type):
            return original(self, *args, **kwargs)
        saved = self.__dict__.get("attn_fn")
        self.attn_fn = local_attention
        try:
            return original(self, *args, **kwargs)
        finally:
            self.attn_fn = saved

    return forward


def enable(attn_types: Optional[Iterable] = None) -> None:
    """Make yunchang's layers and stage functions run noflash for ``attn_types``.

    Args:
        attn_types: the ``yunchang.kernels.AttnType`` members (or their names) to take over. Default: the torch
            types (``TORCH_MATH``, ``TORCH_FLASH``, ``TORCH_EFFICIENT``, ``TORCH_CUDNN``), plus ``FA`` when flash-attn
            is not installed and ``FA3`` when flash-attn 3 is not.

    Call it before building the model (xDiT's and Raylight's layers pick their functions when they are built;
    ``LongContextAttention`` and ``UlyssesAttention`` built earlier are covered too). Calling it again replaces
    the set of types. Logs a warning for yunchang versions other than ``SUPPORTED_VERSION``.
    """
    yc = _yunchang()
    kernels = sys.modules["yunchang.kernels"]
    with _lock:
        if _state["enabled"]:
            _disable_locked()
        if getattr(yc, "__version__", None) != SUPPORTED_VERSION:
            _log.warning(
                "noflash's yunchang adapter was written for yunchang %s, found %s; check the results.",
                SUPPORTED_VERSION, getattr(yc, "__version__", "?"),
            )
        names = _default_types(kernels) if attn_types is None else [getattr(t, "name", t) for t in attn_types]
        known = {m.name for m in kernels.AttnType}
        unknown = sorted(set(names) - known)
        if unknown:
            raise ValueError(f"unknown yunchang AttnType(s) {unknown}; choose from {sorted(known)}.")
        _state["types"] = frozenset(names)
        _patch(kernels, "pytorch_attn_forward", local_forward)
        _patch(kernels, "pytorch_attn_backward", local_backward)
        if "FA" in names:
            _patch(kernels, "flash_attn_forward", local_forward)
            _patch(kernels, "flash_attn_backward", local_backward)
        original_select = kernels.select_flash_attn_impl
        wrapped = _wrap_select(original_select)
        for mod_name, mod in list(sys.modules.items()):
            if mod is not None and mod_name.split(".")[0] in ("yunchang", "xfuser"):
                if getattr(mod, "select_flash_attn_impl", None) is original_select:
                    _patch(mod, "select_flash_attn_impl", wrapped)
        ring_mod = sys.modules["yunchang.ring"]
        ring_impls = {
            getattr(ring_mod, fn): impl
            for fn, impl in (
                ("ring_flash_attn_func", "basic"), ("ring_pytorch_attn_func", "basic"),
                ("zigzag_ring_flash_attn_func", "zigzag"), ("stripe_flash_attn_func", "strip"),
            )
            if hasattr(ring_mod, fn)
        }
        hybrid = sys.modules["yunchang.hybrid.attn_layer"]
        _patch(hybrid.LongContextAttention, "forward",
               _wrap_long_context_forward(hybrid.LongContextAttention.forward, ring_impls))
        ulysses = sys.modules["yunchang.ulysses.attn_layer"]
        _patch(ulysses.UlyssesAttention, "forward", _wrap_ulysses_forward(ulysses.UlyssesAttention.forward))
        _state["enabled"] = True
    _log.info("noflash runs yunchang attention types %s", ", ".join(sorted(names)))


def _disable_locked() -> None:
    for obj, name, old in reversed(_state["undo"]):
        setattr(obj, name, old)
    _state["undo"] = []
    _state["enabled"] = False
    _state["types"] = frozenset()


def disable() -> None:
    """Undo :func:`enable`: every patched name gets its original back. A no-op when not enabled."""
    with _lock:
        if _state["enabled"]:
            _disable_locked()


def is_enabled() -> bool:
    """Whether :func:`enable` is in effect."""
    return _state["enabled"]
