"""The schema conventions of the pack's nodes: category, node id = class name, description = docstring; the
schema every MODEL -> MODEL node shares (one MODEL input first, one MODEL output); and the routing inputs every
attention patcher shares (``enabled``, ``min_tokens``, ``budget_mb``) with the config they make."""

from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple

from comfy_api.latest import io

from ..noflash_core.comfy.override import OverrideConfig

__all__ = ["CATEGORY", "model_patch_schema", "node_id", "node_schema", "routing_config", "routing_inputs"]

CATEGORY = "advanced/noflash"
_MIB = 1 << 20


def node_schema(
    cls: type, display_name: str, inputs: Sequence[io.Input], outputs: Sequence[io.Output], **options
) -> io.Schema:
    """``io.Schema`` of one of the pack's nodes: the node id is the class name, the description its docstring
    (whitespace folded), the category :data:`CATEGORY`; ``options`` go to ``io.Schema`` as they are (``hidden``,
    ``is_output_node``)."""
    return io.Schema(
        node_id=cls.__name__, display_name=display_name, category=CATEGORY, description=" ".join(cls.__doc__.split()),
        inputs=list(inputs), outputs=list(outputs), **options,
    )


def model_patch_schema(
    cls: type, display_name: str, model_tooltip: str, *inputs: io.Input, with_node_id: bool = True
) -> io.Schema:
    """``io.Schema`` of a node that returns a patched clone of its MODEL input: the node id is the class name, the
    description its docstring, the first input the MODEL. ``with_node_id`` adds the executing node's id as a hidden
    input (the attention nodes tag their runs' status with it, for the badge)."""
    return node_schema(
        cls, display_name, [io.Model.Input("model", tooltip=model_tooltip), *inputs],
        [io.Model.Output(display_name="model", tooltip="A patched clone of the model; connect it where the model "
                         "went (the input model is unchanged).")],
        hidden=[io.Hidden.unique_id] if with_node_id else None,
    )


def node_id(cls) -> Optional[str]:
    """The executing node's id (None when called outside ComfyUI's executor, as in tests)."""
    hidden = getattr(cls, "hidden", None)
    return getattr(hidden, "unique_id", None) if hidden is not None else None


def routing_inputs(enabled_tip: str, min_tokens_tip: str) -> Tuple[io.Input, io.Input, io.Input]:
    """The inputs that decide which attention calls a patcher routes to noflash, in this order: ``enabled``
    (default on), ``min_tokens`` (calls shorter than this stay with ComfyUI; default 1024) and ``budget_mb`` (MiB of
    working memory per call, 0 = automatic). Every attention patcher declares them through this function, so they
    are the same on every node (only the two tooltips say what the node patches). :func:`routing_config` turns the
    values into the override's config."""
    return (
        io.Boolean.Input("enabled", default=True, tooltip=enabled_tip),
        io.Int.Input("min_tokens", default=1024, min=0, max=1 << 24, step=64, tooltip=min_tokens_tip),
        io.Int.Input("budget_mb", default=0, min=0, max=1 << 20, step=64,
                     tooltip="Working-memory budget per attention call in MiB. 0 = automatic "
                     "(NOFLASH_BUDGET_MB, else a fraction of free VRAM): leave it."),
    )


def routing_config(enabled: bool, min_tokens: int, budget_mb: int, **fields: Any) -> OverrideConfig:
    """The :class:`OverrideConfig` of the :func:`routing_inputs` values: ``budget_mb`` MiB become bytes, 0 (or less)
    means automatic (``budget_bytes=None``); ``fields`` are further config fields as they are."""
    budget = budget_mb * _MIB if budget_mb > 0 else None
    return OverrideConfig(enabled=enabled, min_tokens=min_tokens, budget_bytes=budget, **fields)
