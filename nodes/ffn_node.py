"""FFN Chunker: run each eligible feed-forward of the diffusion model in token chunks, on a clone only."""

from __future__ import annotations

import logging

from comfy_api.latest import io

from ..noflash_core.ffn.chunk import chunked_forward
from ..noflash_core.ffn.detect import find_ffn_modules
from ._schema import model_patch_schema

__all__ = ["NoFlashFFNChunker"]

logger = logging.getLogger(__name__)


class NoFlashFFNChunker(io.ComfyNode):
    """Runs each eligible feed-forward block of the diffusion model in chunks along the tokens, cutting its
    intermediate activation by the chunk count. Each wrapped block checks itself against the unchunked result on
    its first call and passes through if they differ. Only the returned clone is patched (object patches, undone
    when the model unloads)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return model_patch_schema(
            cls, "NoFlash FFN Chunker", "The diffusion model (cloned, never mutated).",
            io.Int.Input("num_chunks", default=0, min=0, max=1024,
                         tooltip="Token chunks per feed-forward call. 0 = adaptive, sized from the memory budget "
                         "(NOFLASH_FFN_CHUNKS sets the default): leave it."),
            with_node_id=False,
        )

    @classmethod
    def execute(cls, model, num_chunks: int) -> io.NodeOutput:
        m = model.clone()
        diffusion_model = m.get_model_object("diffusion_model")
        names = find_ffn_modules(diffusion_model)
        for name in names:
            module = diffusion_model.get_submodule(name)
            m.add_object_patch(f"diffusion_model.{name}.forward", chunked_forward(module, num_chunks))
        logger.info("noflash: FFN Chunker wraps %d feed-forward modules (num_chunks=%s)", len(names),
                    num_chunks or "adaptive")
        return io.NodeOutput(m)
