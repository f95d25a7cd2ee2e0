"""Attention Patcher and Tier Selector: MODEL → MODEL clones whose attention runs noflash's exact tiles."""

from __future__ import annotations

from typing import Optional

from comfy_api.latest import io

from ..noflash_core.comfy.override import OverrideConfig
from ._glue import patch_attention, repin_attention

__all__ = ["NoFlashAttentionPatcher", "NoFlashTierSelector"]

_CATEGORY = "advanced/noflash"
_MIB = 1 << 20


def _node_id(cls) -> Optional[str]:
    """The executing node's id (None when called outside ComfyUI's executor, as in tests)."""
    hidden = getattr(cls, "hidden", None)
    return getattr(hidden, "unique_id", None) if hidden is not None else None


class NoFlashAttentionPatcher(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NoFlashAttentionPatcher",
            display_name="NoFlash Attention Patcher",
            category=_CATEGORY,
            description="Returns a clone of the model whose attention runs noflash's exact O(N)-memory tiles "
            "instead of ComfyUI's sub-quadratic/split/pytorch attention. The input model is not changed.",
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model to patch (it is cloned, never mutated)."),
                io.Boolean.Input(
                    "enabled", default=True,
                    tooltip="Off passes every attention call on to ComfyUI's own attention (or to the override "
                    "another pack installed before)."),
                io.Int.Input(
                    "min_tokens", default=1024, min=0, max=1 << 24, step=64,
                    tooltip="Calls whose longer side (query or key tokens) is below this use ComfyUI's own "
                    "attention; small calls fit anyway and the fused paths are faster there."),
                io.Int.Input(
                    "budget_mb", default=0, min=0, max=1 << 20, step=64,
                    tooltip="Working-memory budget per attention call in MiB. 0 = automatic "
                    "(NOFLASH_BUDGET_MB, else a fraction of free VRAM)."),
            ],
            outputs=[io.Model.Output(display_name="model")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, enabled: bool, min_tokens: int, budget_mb: int) -> io.NodeOutput:
        config = OverrideConfig(
            enabled=enabled, min_tokens=min_tokens, budget_bytes=budget_mb * _MIB if budget_mb > 0 else None
        )
        return io.NodeOutput(patch_attention(model, config, _node_id(cls)))


class NoFlashTierSelector(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NoFlashTierSelector",
            display_name="NoFlash Tier Selector",
            category=_CATEGORY,
            description="Pins the noflash tier (and optionally block sizes) on a clone of the model. Patches the "
            "model with default settings first when no NoFlash Attention Patcher ran on it.",
            inputs=[
                io.Model.Input("model", tooltip="A model, patched by NoFlash Attention Patcher or not."),
                io.Combo.Input(
                    "tier", options=["auto", "1", "2", "3"], default="auto",
                    tooltip="auto: the fastest tier whose memory fits the budget. 1: query-chunked. "
                    "2: online softmax over key tiles (least memory with speed). 3: in-place minimum memory."),
                io.Int.Input("block_m", default=0, min=0, max=65536, step=16,
                             tooltip="Query rows per tile; 0 lets the planner choose."),
                io.Int.Input("block_n", default=0, min=0, max=65536, step=16,
                             tooltip="Key columns per tile, used by tier 2 only (tiers 1 and 3 take whole key rows); "
                             "0 lets the planner choose."),
            ],
            outputs=[io.Model.Output(display_name="model")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, tier: str, block_m: int, block_n: int) -> io.NodeOutput:
        pinned = "auto" if tier == "auto" else int(tier)
        m = repin_attention(model, _node_id(cls), tier=pinned, block_m=block_m or None, block_n=block_n or None)
        return io.NodeOutput(m)
