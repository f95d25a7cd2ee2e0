"""Attention Patcher and Tier Selector: MODEL → MODEL clones whose attention runs noflash's exact tiles."""

from __future__ import annotations

from comfy.patcher_extension import WrappersMP
from comfy_api.latest import io

from ..noflash_core.comfy.override import override_recorder
from ..noflash_core.tune.firstrun import FirstRunPolicy, FirstRunTuner, forget_plans
from ..noflash_core.tune.session import tuning_hook
from ._glue import current_override, patch_attention, publish_status, repin_attention
from ._schema import model_patch_schema, node_id, routing_config, routing_inputs

__all__ = ["NoFlashAttentionPatcher", "NoFlashTierSelector"]

_TUNE_KEY = "noflash_tune"
_POLICY = FirstRunPolicy()


def _first_run_tuning(m, node: str) -> None:
    """Wrap the clone's model calls so the planner tunes each new attention signature once (see
    ``noflash_core/tune/firstrun.py`` for the bound); the badge shows "tuning", then "tuned"."""
    monitor = getattr(override_recorder(current_override(m)), "__self__", None)  # the RunMonitor of the clone

    def on_state(state: str, signature: str) -> None:
        status = monitor.status() if monitor is not None else {"node_id": node}
        publish_status({**status, "plan_source": state, "tuning_signature": signature})

    tuner = FirstRunTuner(_POLICY, on_state=on_state)
    forget_plans()  # plans cached before tuning was switched on would never reach the tuner

    def tune_wrapper(executor, *args, **kwargs):
        with tuning_hook(tuner):
            return executor(*args, **kwargs)

    m.add_wrapper_with_key(WrappersMP.APPLY_MODEL, _TUNE_KEY, tune_wrapper)


class NoFlashAttentionPatcher(io.ComfyNode):
    """Returns a clone of the model whose attention runs noflash's exact O(N)-memory tiles instead of ComfyUI's
    sub-quadratic/split/pytorch attention. The input model is not changed."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return model_patch_schema(
            cls, "NoFlash Attention Patcher", "The diffusion model to patch (it is cloned, never mutated).",
            *routing_inputs(
                "Off passes every attention call on to ComfyUI's own attention (or to the override another pack "
                "installed before).",
                "Calls whose longer side (query or key tokens) is below this use ComfyUI's own attention; small calls "
                "fit anyway and the fused paths are faster there. The default suits image and video models: leave it.",
            ),
            io.Combo.Input(
                # optional: API-format prompts saved before this input existed still run
                "tune", options=["off", "first run"], default="off", optional=True,
                tooltip=f"first run: the first sampling step times up to {_POLICY.max_candidates} exact plans "
                f"for each new attention shape (at most {_POLICY.step_multiple:g}x that call's untuned time) and "
                "remembers the fastest in the tuning cache; later runs start tuned. off: measure nothing (plans "
                "already in the cache are still used): leave it off unless you want to measure."),
        )

    @classmethod
    def execute(cls, model, enabled: bool, min_tokens: int, budget_mb: int, tune: str = "off") -> io.NodeOutput:
        m = patch_attention(model, routing_config(enabled, min_tokens, budget_mb), node_id(cls))
        m.remove_wrappers_with_key(WrappersMP.APPLY_MODEL, _TUNE_KEY)
        if tune == "first run":
            _first_run_tuning(m, node_id(cls))
        return io.NodeOutput(m)


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
