"""ComfyUI V3 nodes of the NoFlash pack (glue only: the logic lives in ``noflash_core``).

Importing this package needs ComfyUI (``comfy_api``); the pack's root ``__init__`` imports it only inside ComfyUI.
"""

from __future__ import annotations

from typing import List, Type

from comfy_api.latest import ComfyExtension, io

from .attention_nodes import NoFlashAttentionPatcher, NoFlashTierSelector
from .encoder_nodes import NoFlashCLIPPatcher, NoFlashVAEPatcher
from .ffn_node import NoFlashFFNChunker
from .probe_node import NoFlashVRAMProbe

__all__ = ["NODES", "NoFlashExtension", "comfy_entrypoint"]

NODES: List[Type[io.ComfyNode]] = [
    NoFlashAttentionPatcher,
    NoFlashTierSelector,
    NoFlashFFNChunker,
    NoFlashVRAMProbe,
    NoFlashCLIPPatcher,
    NoFlashVAEPatcher,
]


class NoFlashExtension(ComfyExtension):
    async def get_node_list(self) -> List[Type[io.ComfyNode]]:
        return list(NODES)


async def comfy_entrypoint() -> NoFlashExtension:
    return NoFlashExtension()
