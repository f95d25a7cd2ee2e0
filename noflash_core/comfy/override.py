"""The per-model attention override that ComfyUI's ``wrap_attn`` calls, built on plain tensors.

ComfyUI decorates every attention implementation (``attention_sub_quad``, ``attention_pytorch``, ...) with
``wrap_attn``. When a call site passes ``transformer_options=`` holding ``"optimized_attention_override"``, the
decorator returns ``override(func, *args, **kwargs)`` instead of ``func(*args, **kwargs)``, where ``func`` is
ComfyUI's own (undecorated) implementation and ``kwargs`` already carries ``_inside_attn_wrapper=True``.

:func:`make_attention_override` builds such an override. It never imports ComfyUI: the node glue in ``nodes/``
stores the returned function in a ``ModelPatcher`` clone's ``transformer_options``. ``clone()`` deep-copies the
options but keeps plain functions, so all state lives in the closure (config, chained override, recorder). The
calls it computes go through noflash's one dispatch path (``sdpa._attention``), which returns the plan that ran;
the recorder's record is made from that plan.

Call forms (``b`` batch, ``h`` heads, ``d``/``dv`` head dims, ``n_q``/``n_k`` token counts):
    - q ``(b, n_q, h*d)``, k ``(b, n_k, h*d)``, v ``(b, n_k, h*dv)``; or ``(b, h, n, d)`` when ``skip_reshape``.
    - Output ``(b, n_q, h*dv)``, or ``(b, h, n_q, dv)`` when ``skip_output_reshape``; always in q's dtype.
    - ``heads`` and ``mask`` positional (4th, 5th) or keyword, as in ComfyUI's signature
      ``(q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False, skip_output_reshape=False)``.
    - ComfyUI 0.33+ keywords, read from ``kwargs`` as its ``attention_pytorch``/``attention_basic`` read them:
      ``scale=`` (the softmax scale; default ``d ** -0.5``) and ``enable_gqa=True`` (grouped-query attention:
      k and v carry ``h_kv`` heads, ``h % h_kv == 0``). In the ``(b, n, h*d)`` layout ComfyUI derives
      ``h_kv = k.shape[-1] // d`` with ``d = q.shape[-1] // heads`` (``_reshape_qkv_to_heads``); so does this
      override. k and v go to the dispatcher at their own head count with ``enable_gqa=True``: they are never
      repeated to ``h`` heads (ComfyUI's ``repeat_kv_for_gqa`` copy is what noflash saves).
      ``low_precision_attention=`` is ignored: noflash is exact.
    - q/k/v wrapped in ComfyUI 0.33's ``AttentionTensorContainer``: ``wrap_attn`` unwraps them before it calls the
      override (the override has no ``container_function``). A container function would save nothing: the tiles
      read q, k and v until the last block, and the wrapper's argument tuple holds them exactly that long; and
      ``wrap_attn`` calls a container function without ComfyUI's ``func``, so calls the override does not compute
      could not be sent on.

Any call form the override does not understand (a layout ComfyUI does not define, head counts that do not
divide) goes to ComfyUI's own function unchanged, which computes it or raises its own error.

Masks mean what ComfyUI's ``attention_pytorch`` makes of them: a 2-D ``(Lq, Lk)`` mask becomes ``(1, 1, Lq, Lk)``,
a 3-D ``(b, Lq|1, Lk)`` mask gets a heads axis ``(b, 1, Lq|1, Lk)``, 4-D stays; then SDPA broadcasting applies.
Bool masks keep True positions; float masks are added to the scores (``-inf`` and ``-finfo.max`` both mask).

``attn_precision=torch.float32`` (SD2.x, SVD, LTXV; ``--force-upcast-attention``) asks for fp32 scores and softmax.
The tiles always keep scores, softmax statistics and accumulators in fp32 for fp16/bf16 inputs, so the request is
met without upcasting the inputs; ``--dont-upcast-attention`` cannot make them less precise.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple, Union

import torch

from ..telemetry import CallRecord
from .memory import FreeMemory, comfy_budget_bytes

__all__ = [
    "OverrideConfig",
    "make_attention_override",
    "is_noflash_override",
    "override_config",
    "override_previous",
    "override_recorder",
    "override_name",
    "rebuild_override",
    "normalize_comfy_mask",
]

logger = logging.getLogger(__name__)

Override = Callable[..., torch.Tensor]
Recorder = Callable[[CallRecord], None]

# ComfyUI's attention signature after (q, k, v): the order in which positional arguments bind.
_PARAM_ORDER = ("heads", "mask", "attn_precision", "skip_reshape", "skip_output_reshape")
_TIERS = ("auto", 1, 2, 3)


@dataclass(frozen=True)
class OverrideConfig:
    """What the override does with a call.

    Attributes:
        enabled: False sends every call on (to a chained override, else to ComfyUI's ``func``).
        min_tokens: calls whose longer side ``max(n_q, n_k)`` is below this go on to ``func`` as well.
        budget_bytes: working-memory budget for the planner; None lets the planner pick
            (``NOFLASH_BUDGET_MB``, else a fraction of free device memory).
        tier: ``"auto"``, 1, 2 or 3.
        block_m: query block size; None lets the planner pick.
        block_n: key block size; None lets the planner pick.
    """

    enabled: bool = True
    min_tokens: int = 1024
    budget_bytes: Optional[int] = None
    tier: Union[str, int] = "auto"
    block_m: Optional[int] = None
    block_n: Optional[int] = None

    def __post_init__(self) -> None:
        if self.tier not in _TIERS:
            raise ValueError(f"tier must be one of 'auto', 1, 2, 3; got {self.tier!r}")
        if self.min_tokens < 0:
            raise ValueError(f"min_tokens must be >= 0, got {self.min_tokens}")
        if self.budget_bytes is not None and self.budget_bytes <= 0:
            raise ValueError(f"budget_bytes must be positive or None (planner default), got {self.budget_bytes}")
        for name in ("block_m", "block_n"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive or None (planner default), got {value}")


@dataclass(frozen=True)
class _Call:
    """A ComfyUI attention call bound to names."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    heads: Optional[int]
    mask: Optional[torch.Tensor]
    skip_reshape: bool
    skip_output_reshape: bool
    scale: Optional[float] = None
    enable_gqa: bool = False


def _bind_call(args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> _Call:
    """Bind ``override(func, *args, **kwargs)``'s arguments the way ComfyUI's signature does."""
    if len(args) < 3:
        raise TypeError(f"attention call needs q, k, v positionally; got {len(args)} positional arguments")
    named = dict(zip(_PARAM_ORDER, args[3:]))
    for name in _PARAM_ORDER:
        if name in kwargs:
            named[name] = kwargs[name]
    heads = named.get("heads")
    return _Call(
        q=args[0],
        k=args[1],
        v=args[2],
        heads=None if heads is None else int(heads),
        mask=named.get("mask"),
        skip_reshape=bool(named.get("skip_reshape", False)),
        skip_output_reshape=bool(named.get("skip_output_reshape", False)),
        scale=kwargs.get("scale"),
        enable_gqa=bool(kwargs.get("enable_gqa", False)),
    )


def _unflatten_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """``(b, n, h*d)`` → ``(b, h, n, d)`` (a view where strides allow).

    A tensor with more dims, such as SD3's value ``(b, n, h, d)``, is first flattened to ``(b, n, h*d)``: ComfyUI's
    own implementations ``reshape(b, -1, heads, dim_head)`` every operand, which reads it the same way.
    """
    if t.dim() > 3:
        t = t.flatten(2)
    return t.unflatten(-1, (heads, t.shape[-1] // heads)).transpose(1, 2)


def _gqa_heads(hq: int, hk: int, hv: int) -> bool:
    """Whether k/v head counts form a grouped-query call ComfyUI accepts (``comfy.ops.gqa_repeat_factor``)."""
    return hk > 0 and hk == hv and hq % hk == 0


def _skip_reshape_qkv(call: _Call) -> Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The ``skip_reshape`` layout ``(b, h, n, d)``; with ``enable_gqa`` k and v keep their ``h_kv`` heads."""
    q, k, v = call.q, call.k, call.v
    if not q.dim() == k.dim() == v.dim() == 4:
        return None
    if call.enable_gqa and not _gqa_heads(q.shape[1], k.shape[1], v.shape[1]):
        return None
    return q, k, v


def _kv_heads(call: _Call, dim_head: int) -> Optional[Tuple[int, int]]:
    """Heads of k and v in the ``(b, n, h*d)`` layout; None when ComfyUI's own reshape would not read them."""
    k, v, heads = call.k, call.v, call.heads
    if call.enable_gqa:
        # ComfyUI 0.33 ``_reshape_qkv_to_heads``: h_kv = width // dim_head, with dim_head taken from q.
        if k.dim() != 3 or v.dim() != 3 or k.shape[-1] % dim_head or v.shape[-1] % dim_head:
            return None
        hk, hv = k.shape[-1] // dim_head, v.shape[-1] // dim_head
        return (hk, hv) if _gqa_heads(heads, hk, hv) else None
    if k.shape[2:].numel() != heads * dim_head or v.shape[2:].numel() % heads:
        return None  # k must match q's head dim; v may have its own (h * dv)
    return heads, heads


def _to_bhnd(call: _Call) -> Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """q, k, v as ``(b, h, n, d)`` (k, v with ``h_kv`` heads under GQA); None when the layout is not ComfyUI's."""
    q, k, v = call.q, call.k, call.v
    if not all(isinstance(t, torch.Tensor) for t in (q, k, v)):
        return None
    if call.skip_reshape:
        return _skip_reshape_qkv(call)
    heads = call.heads
    if heads is None or heads <= 0 or q.dim() != 3 or min(k.dim(), v.dim()) < 3 or q.shape[-1] % heads:
        return None
    if q.shape[0] != k.shape[0] or q.shape[0] != v.shape[0]:
        return None
    kv_heads = _kv_heads(call, q.shape[-1] // heads)
    if kv_heads is None:
        return None
    return _unflatten_heads(q, heads), _unflatten_heads(k, kv_heads[0]), _unflatten_heads(v, kv_heads[1])


def normalize_comfy_mask(mask: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    """Give a ComfyUI attention mask the rank ``attention_pytorch`` gives it before SDPA.

    Args:
        mask: None, bool (True keeps) or float (added); ``(Lq, Lk)``, ``(b, Lq|1, Lk)`` or 4-D
            ``(b|1, h|1, Lq|1, Lk)``.
        dtype: the query dtype; float masks of another dtype are cast to it.

    Returns:
        None, or a mask that broadcasts against scores ``(b, h, Lq, Lk)``: 2-D → ``(1, 1, Lq, Lk)``,
        3-D → ``(b, 1, Lq|1, Lk)``, 4-D unchanged.
    """
    if mask is None:
        return None
    if mask.dim() == 2:
        mask = mask.unsqueeze(0)
    if mask.dim() == 3:
        mask = mask.unsqueeze(1)
    if mask.dtype != torch.bool and mask.dtype != dtype:
        mask = mask.to(dtype)
    return mask


def _merge_heads(out: torch.Tensor) -> torch.Tensor:
    """``(b, h, n, dv)`` → ``(b, n, h*dv)``."""
    return out.transpose(1, 2).flatten(2)


_warned_forms: set = set()


def _shape_of(t: Any) -> Tuple[int, ...]:
    return tuple(t.shape) if isinstance(t, torch.Tensor) else ()


def _warn_unknown_form(call: _Call) -> None:
    """Log once per call form that the override did not understand (it then runs ComfyUI's own attention)."""
    form = (_shape_of(call.q)[1:], _shape_of(call.k)[1:], _shape_of(call.v)[1:], call.heads, call.skip_reshape,
            call.enable_gqa)
    if form not in _warned_forms:
        _warned_forms.add(form)
        logger.warning(
            "noflash: attention call not understood (q %s, k %s, v %s, heads=%s, skip_reshape=%s, enable_gqa=%s); "
            "ComfyUI's own attention runs it", *(_shape_of(t) for t in (call.q, call.k, call.v)), call.heads,
            call.skip_reshape, call.enable_gqa,
        )


def _dispatch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask, call: _Call, config: OverrideConfig,
              budget_bytes: Optional[int]):
    """The dispatcher on ``(b, h, n, d)`` tensors (k, v at their own head count): ``(output, plan that ran)``."""
    from ..sdpa import _attention

    return _attention(q, k, v, mask, scale=call.scale, enable_gqa=call.enable_gqa, tier=config.tier,
                      block_m=config.block_m, block_n=config.block_n, budget_bytes=budget_bytes)


def _run_tiles(call: _Call, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, config: OverrideConfig,
               free_memory: Optional[FreeMemory]):
    """Compute a call with noflash: ``(output in ComfyUI's layout and q's dtype, plan that ran)``."""
    mask = normalize_comfy_mask(call.mask, q.dtype)
    budget = config.budget_bytes
    if budget is None:
        budget = comfy_budget_bytes(q.device, free_memory)
    out, plan = _dispatch(q, k, v, mask, call, config, budget)
    out = out.to(q.dtype)  # under autocast the dispatcher computes in the autocast dtype
    if not call.skip_output_reshape:
        out = _merge_heads(out)
    return out, plan


def make_attention_override(
    config: Optional[OverrideConfig] = None,
    *,
    previous: Optional[Override] = None,
    recorder: Optional[Recorder] = None,
    free_memory: Optional[FreeMemory] = None,
) -> Override:
    """Build an ``optimized_attention_override`` for ComfyUI.

    Args:
        config: what to do with calls (see :class:`OverrideConfig`); defaults to ``OverrideConfig()``.
        previous: an override another pack installed before; calls we do not compute go to
            ``previous(func, *args, **kwargs)`` instead of ``func(*args, **kwargs)``.
        recorder: called with a :class:`~noflash_core.telemetry.CallRecord` after every call; for calls the
            tiles computed, the tier and blocks are the plan the dispatcher returned.
        free_memory: ``free_memory(device) -> bytes``, ComfyUI's own free-memory reading (0.33's
            ``ModelPatcher.get_free_memory``, which counts what comfy-aimdo's dynamic VRAM can give back); when
            ``config.budget_bytes`` is None the budget is a share of it (:func:`~.memory.comfy_budget_bytes`).

    Returns:
        ``override(func, *args, **kwargs) -> Tensor``. It carries ``noflash_config``, ``noflash_previous``,
        ``noflash_recorder`` and ``noflash_free_memory`` attributes so a later node can rebuild it
        (:func:`rebuild_override`), and ``memory_efficient`` (True when enabled) for ComfyUI versions that read it
        (0.3.64 and 0.33 do not; :mod:`~noflash_core.comfy.memory` covers those).
    """
    config = OverrideConfig() if config is None else config

    def send_on(func: Callable[..., torch.Tensor], args, kwargs) -> torch.Tensor:
        # kwargs still holds _inside_attn_wrapper=True from ComfyUI's wrapper: pass it on unchanged.
        if previous is not None:
            return previous(func, *args, **kwargs)
        return func(*args, **kwargs)

    def record(path: str, tier: int, blocks: Tuple[int, int], q, k, reason: str) -> None:
        if recorder is not None:
            recorder(CallRecord.of_call(path, tier, blocks, q, k, reason))

    def noflash_attention_override(func: Callable[..., torch.Tensor], *args, **kwargs) -> torch.Tensor:
        call = _bind_call(args, kwargs)
        qkv = _to_bhnd(call)
        if qkv is None:
            _warn_unknown_form(call)
            out = send_on(func, args, kwargs)
            record("comfy", 0, (0, 0), call.q, call.k, "call form not understood")
            return out
        q, k, v = qkv
        reason = ""
        if not config.enabled:
            reason = "disabled"
        elif max(q.shape[-2], k.shape[-2]) < config.min_tokens:
            reason = "below min_tokens"
        if reason:
            out = send_on(func, args, kwargs)
            record("comfy", 0, (0, 0), q, k, reason)
            return out
        out, plan = _run_tiles(call, q, k, v, config, free_memory)
        if recorder is not None:
            recorder(CallRecord.of_plan("noflash", plan, q, k))
        return out

    noflash_attention_override.noflash_config = config
    noflash_attention_override.noflash_previous = previous
    noflash_attention_override.noflash_recorder = recorder
    noflash_attention_override.noflash_free_memory = free_memory
    noflash_attention_override.memory_efficient = config.enabled
    return noflash_attention_override


def is_noflash_override(fn: Any) -> bool:
    """Whether ``fn`` was built by :func:`make_attention_override`."""
    return callable(fn) and isinstance(getattr(fn, "noflash_config", None), OverrideConfig)


def override_config(fn: Override) -> OverrideConfig:
    """The config of a noflash override."""
    return fn.noflash_config


def override_previous(fn: Override) -> Optional[Override]:
    """The override a noflash override chains to (None when it calls ComfyUI's ``func`` directly)."""
    return fn.noflash_previous


def override_recorder(fn: Override) -> Optional[Recorder]:
    """The telemetry recorder of a noflash override."""
    return fn.noflash_recorder


def rebuild_override(fn: Override, **changes: Any) -> Override:
    """A new noflash override like ``fn`` with some config fields changed (same chain and recorder)."""
    if not is_noflash_override(fn):
        raise ValueError("rebuild_override needs an override made by make_attention_override")
    config = dataclasses.replace(fn.noflash_config, **changes)
    return make_attention_override(
        config, previous=fn.noflash_previous, recorder=fn.noflash_recorder,
        free_memory=getattr(fn, "noflash_free_memory", None),
    )


def override_name(fn: Any) -> str:
    """A short name for an attention override, for logs and the status badge.

    ComfyUI's ``set_model_optimized_attention`` (the ``ModelAttentionBackend`` node) wraps the attention function
    it was given in a closure: that function's name is returned (e.g. ``"attention_pytorch"``). Otherwise the
    override's own qualified name; ``"none"`` for None.
    """
    if fn is None:
        return "none"
    if is_noflash_override(fn):
        return "noflash"
    for cell in getattr(fn, "__closure__", None) or ():
        try:
            inner = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        if callable(inner) and getattr(inner, "__name__", "").startswith("attention"):
            return inner.__name__
    return getattr(fn, "__qualname__", None) or type(fn).__name__
