"""The schema conventions of the pack's nodes: category, node id = class name, description = docstring; and the
schema every MODEL -> MODEL node shares (one MODEL input first, one MODEL output)."""

from __future__ import annotations

from typing import Optional, Sequence

from comfy_api.latest import io

__all__ = ["CATEGORY", "model_patch_schema", "node_id", "node_schema"]

CATEGORY = "advanced/noflash"


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
