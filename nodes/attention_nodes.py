"""Attention Patcher and Tier Selector: MODEL → MODEL clones whose attention runs noflash's exact tiles."""

from __future__ import annotations

from comfy_api.latest import io

from ..noflash_core.comfy.override import OverrideConfig
from ._glue import patch_attention, repin_attention
from ._schema import model_patch_schema, node_id

__all__ = ["NoFlashAttentionPatcher", "NoFlashTierSelector"]

_MIB = 1 << 20


class NoFlashAttentionPatcher(io.ComfyNode):
    """Returns a clone of the model whose attention runs noflash's exact O(N)-memory tiles instead of ComfyUI's
    sub-quadratic/split/pytorch attention. The input model is not changed."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return model_patch_schema(
            cls, "NoFlash Attention Patcher", "The diffusion model to patch (it is cloned, never mutated).",
            io.Boolean.Input(
                "enabled", default=True,
                tooltip="Off passes every attention call on to ComfyUI's own attention (or to the override "
                "another pack installed before)."),
            io.Int.Input(
                "min_tokens", default=1024, min=0, max=1 << 24, step=64,
                tooltip="Calls whose longer side (query or key tokens) is below this use ComfyUI's own "
                "attention; small calls fit anyway and the fused paths are faster there. The default suits "
                "image and video models: leave it."),
            io.Int.Input(
                "budget_mb", default=0, min=0, max=1 << 20, step=64,
                tooltip="Working-memory budget per attention call in MiB. 0 = automatic "
                "(NOFLASH_BUDGET_MB, else a fraction of free VRAM): leave it."),
        )

    @classmethod
    def execute(cls, model, enabled: bool, min_tokens: int, budget_mb: int) -> io.NodeOutput:
        config = OverrideConfig(
            enabled=enabled, min_tokens=min_tokens, budget_bytes=budget_mb * _MIB if budget_mb > 0 else None
        )
        return io.NodeOutput(patch_attention(model, config, node_id(cls)))


class NoFlashTierSelector(io.ComfyNode):
    """Pins the noflash tier (and optionally block sizes) on a clone of the model. Patches the model with default
    settings first when no NoFlash Attention Patcher ran on it."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return model_patch_schema(
            cls, "NoFlash Tier Selector", "A model, patched by NoFlash Attention Patcher or not.",
            io.Combo.Input(
                "tier", options=["auto", "1", "2", "3"], default="auto",
                tooltip="auto: the fastest tier whose memory fits the budget. 1: query-chunked. "
                "2: online softmax over key tiles (least memory with speed). 3: least memory, chunks of (batch, head) "
                "pairs in one reused score buffer, inference only. Leave it on auto; pin a tier only to compare."),
            io.Int.Input("block_m", default=0, min=0, max=65536, step=16,
                         tooltip="Query rows per tile. 0 = automatic (the planner chooses): leave it."),
            io.Int.Input("block_n", default=0, min=0, max=65536, step=16,
                         tooltip="Key columns per tile, used by tier 2 only (tiers 1 and 3 take whole key rows); "
                         "0 = automatic (the planner chooses): leave it."),
        )

    @classmethod
    def execute(cls, model, tier: str, block_m: int, block_n: int) -> io.NodeOutput:
        pinned = "auto" if tier == "auto" else int(tier)
        m = repin_attention(model, node_id(cls), tier=pinned, block_m=block_m or None, block_n=block_n or None)
        return io.NodeOutput(m)
