"""What ComfyUI should reserve for a sampling step when noflash computes the model's attention.

ComfyUI sizes its model loading with ``BaseModel.memory_required(input_shape, cond_shapes)`` (``comfy/model_base.py``,
the same in 0.3.64 and 0.33): ``sampler_helpers.estimate_memory`` asks it before the model is loaded (how much of
the model to load, ``load_models_gpu``), and ``samplers.calc_cond_batch`` asks it every step (how many conds to
batch). Unless xformers or PyTorch's flash attention is on, it assumes quadratic attention:
``area · 0.15 · memory_usage_factor`` MiB, where ``area`` is batch × latent elements per channel. With memory-efficient
attention it plans ``area · element size · 0.01 · memory_usage_factor`` MiB, about 7.5× less in 16-bit. On the GPUs
noflash serves the quadratic branch runs, so ComfyUI loads models partially and streams weights every step
(ComfyUI issue 15585) although noflash's attention needs O(N) memory.

:func:`efficient_memory_required` is that memory-efficient estimate, computed from the model's own
``memory_usage_factor`` (ComfyUI calibrates it per model family) and inference dtype, with the reference-latent
conds ComfyUI counts (``memory_usage_factor_conds``). It is never above ComfyUI's own figure. The check that it is
what noflash really needs is a test: for Wan 2.2 5B at 1280×704×121 it is within 2× of the working set that
:mod:`noflash_core.vram` predicts for one block (activations, noflash's planned attention calls on fake
tensors, the FFN); see ``tests/comfy/test_comfyui_033_calls.py``. The estimator itself is not used at run time:
it knows only the families in its table and plans on fake tensors, while ComfyUI asks every step.

:func:`planned_memory` puts the estimate on one model for the duration of one sampling run; the node glue calls it
from an ``OUTER_SAMPLE`` wrapper of the patched clone, so the original model and other clones keep ComfyUI's figure.
An object patch (``add_object_patch("memory_required", ...)``) would not do: ComfyUI applies object patches when it
loads the model, which is after ``estimate_memory`` asked.

:func:`comfy_budget_bytes` is the attention budget from ComfyUI's own free-memory reading: under ComfyUI 0.33's
dynamic VRAM (comfy-aimdo) weights sit in memory aimdo can give back, which ``ModelPatcher.get_free_memory`` counts
and ``torch.cuda.mem_get_info`` does not. The node glue supplies that reading only while aimdo is on.

Nothing here imports ComfyUI: its objects are passed in.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import torch

from ..budget import FREE_MEMORY_FRACTION

__all__ = [
    "EFFICIENT_MIB_PER_ELEMENT_BYTE",
    "comfy_budget_bytes",
    "efficient_memory_required",
    "inference_dtype",
    "memory_input_shapes",
    "planned_memory",
]

logger = logging.getLogger(__name__)

EFFICIENT_MIB_PER_ELEMENT_BYTE = 0.01
"""MiB per latent element and element byte, times ``memory_usage_factor``: the coefficient of ComfyUI's
``memory_required`` for memory-efficient attention (``model_base.py``, 0.3.64 and 0.33)."""

_MIB = 1 << 20
_BUDGET_STEP = 64 * _MIB  # budgets are rounded down to this, so the dispatcher's plan cache keeps hitting
_MIN_BUDGET = _MIB
_ATTR = "memory_required"

FreeMemory = Callable[[torch.device], Optional[int]]


def inference_dtype(model: Any) -> torch.dtype:
    """The dtype a ComfyUI ``BaseModel`` computes in: ``get_dtype_inference()`` (0.33), else the manual-cast
    dtype or ``get_dtype()`` (0.3.64)."""
    if hasattr(model, "get_dtype_inference"):
        return model.get_dtype_inference()
    cast = getattr(model, "manual_cast_dtype", None)
    return cast if cast is not None else model.get_dtype()


def memory_input_shapes(model: Any, input_shape: Sequence[int],
                        cond_shapes: Optional[Mapping[str, Any]] = None) -> list:
    """``input_shape`` plus the cond shapes the model counts (``memory_usage_factor_conds``, each passed through
    ``memory_usage_shape_process`` where the model has one), as ComfyUI's ``memory_required`` reads them."""
    shapes = [list(input_shape)]
    cond_shapes = cond_shapes or {}
    process = getattr(model, "memory_usage_shape_process", {}) or {}
    for name in getattr(model, "memory_usage_factor_conds", ()) or ():
        found = cond_shapes.get(name)
        if found is None:
            continue
        if name in process:
            found = [process[name](s) for s in found]
        shapes.extend(list(s) for s in found)
    return shapes


def efficient_memory_required(model: Any, input_shape: Sequence[int],
                              cond_shapes: Optional[Mapping[str, Any]] = None) -> float:
    """Bytes one step needs when attention is memory-efficient (noflash's tiles).

    Args:
        model: a ComfyUI ``BaseModel`` (reads ``memory_usage_factor``, its dtype and cond settings).
        input_shape: the latent batch ``(b, c, *spatial)``.
        cond_shapes: cond name → list of shapes, as ComfyUI passes them.

    Returns:
        ``Σ b·prod(spatial) · element size · 0.01 · memory_usage_factor`` MiB, in bytes.
    """
    area = sum(s[0] * math.prod(s[2:]) for s in memory_input_shapes(model, input_shape, cond_shapes))
    elt = inference_dtype(model).itemsize
    return area * elt * EFFICIENT_MIB_PER_ELEMENT_BYTE * float(model.memory_usage_factor) * _MIB


class _NoflashMemoryRequired:
    """``memory_required`` for one run: the lower of ComfyUI's own figure and :func:`efficient_memory_required`."""

    def __init__(self, model: Any, original: Callable[..., float]) -> None:
        self.model = model
        self.original = original

    def __call__(self, input_shape, cond_shapes=None) -> float:
        cond_shapes = {} if cond_shapes is None else cond_shapes
        comfy = self.original(input_shape, cond_shapes=cond_shapes)
        return min(comfy, efficient_memory_required(self.model, input_shape, cond_shapes))


@contextlib.contextmanager
def planned_memory(model: Any) -> Iterator[None]:
    """While the block runs, ``model.memory_required`` answers with :func:`efficient_memory_required` (never more
    than ComfyUI's own figure); afterwards the model is exactly as before, also when the block raises.

    ``model`` is the ``BaseModel`` of the patched clone (``ModelPatcher.model``), which every clone shares: call
    this only around that clone's own sampling run (one thread, as ComfyUI executes prompts).
    """
    had = _ATTR in vars(model)
    previous = vars(model).get(_ATTR)
    original = getattr(model, _ATTR)
    object.__setattr__(model, _ATTR, _NoflashMemoryRequired(model, original))
    try:
        yield
    finally:
        if had:
            object.__setattr__(model, _ATTR, previous)
        else:
            vars(model).pop(_ATTR, None)


def comfy_budget_bytes(device: torch.device, free_memory: Optional[FreeMemory]) -> Optional[int]:
    """The attention budget from ComfyUI's free-memory reading, or None to let the planner read free memory.

    None when ``free_memory`` is None or returns None, on CPU (the planner's CPU constant applies), or when
    ``NOFLASH_BUDGET_MB`` is set (the planner reads it). Otherwise :data:`~noflash_core.budget.FREE_MEMORY_FRACTION` of
    ``free_memory(device)``, rounded down to 64 MiB (at least 1 MiB).
    """
    if free_memory is None or device.type in ("cpu", "meta") or os.environ.get("NOFLASH_BUDGET_MB", "").strip():
        return None
    try:
        free = free_memory(device)
    except Exception as exc:  # noqa: BLE001 - a failing reader must not fail the attention call
        logger.debug("noflash: ComfyUI's free-memory reading failed (%s); the planner reads it", exc)
        return None
    if free is None:
        return None
    budget = int(int(free) * FREE_MEMORY_FRACTION)
    if budget > _BUDGET_STEP:
        budget -= budget % _BUDGET_STEP
    return max(_MIN_BUDGET, budget)
