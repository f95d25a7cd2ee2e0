"""FFN Chunker: run each eligible feed-forward of the diffusion model in token chunks, on a clone only."""

from __future__ import annotations

import logging
from typing import Any, Optional

import torch
from comfy_api.latest import io

from ..noflash_core.comfy.op_telemetry import FFNMonitor, ffn_intermediate_bytes
from ..noflash_core.ffn.chunk import ChunkedForward
from ..noflash_core.ffn.detect import find_ffn_modules
from ._glue import attach_run_callbacks, publish_status, run_context
from ._schema import model_patch_schema, node_id

__all__ = ["FFN_CALLBACK_KEY", "MonitoredChunkedForward", "NoFlashFFNChunker", "chunk_ffns"]

logger = logging.getLogger(__name__)

FFN_CALLBACK_KEY = "noflash_ffn"


class MonitoredChunkedForward(ChunkedForward):
    """A :class:`ChunkedForward` that reports each call (tokens, chunks, intermediate bytes) to an FFN monitor."""

    monitor: Optional[FFNMonitor] = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        before = self.chunked_calls
        out = super().__call__(*args, **kwargs)
        x = args[0] if len(args) == 1 and not kwargs else None
        if self.monitor is not None and isinstance(x, torch.Tensor) and x.dim() >= 2:
            tokens = x.shape[-2]
            chunk = self.last_split[1] if self.chunked_calls != before and self.last_split else None
            width = self.info.width_per_token
            self.monitor.record(x.device, tokens, chunk, ffn_intermediate_bytes(x, width, tokens),
                                ffn_intermediate_bytes(x, width, chunk or tokens))
        return out


def chunk_ffns(model, num_chunks: int, producer: Optional[str] = None):
    """A clone of ``model`` whose feed-forward modules run in chunks; ``(clone, number of modules wrapped)``.

    Each sampling run of the clone is published as an ``"ffn"`` status tagged with ``producer`` (the node id).
    """
    m = model.clone()
    diffusion_model = m.get_model_object("diffusion_model")
    names = find_ffn_modules(diffusion_model)
    monitor = FFNMonitor(type(m.model).__name__, publish=publish_status, node_id=producer, context=run_context,
                         modules=len(names), num_chunks=num_chunks)
    for name in names:
        wrapper = MonitoredChunkedForward(diffusion_model.get_submodule(name), num_chunks, name=name)
        wrapper.monitor = monitor
        m.add_object_patch(f"diffusion_model.{name}.forward", wrapper)
    attach_run_callbacks(m, monitor, FFN_CALLBACK_KEY)
    return m, len(names)


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
        )

    @classmethod
    def execute(cls, model, num_chunks: int) -> io.NodeOutput:
        m, wrapped = chunk_ffns(model, num_chunks, node_id(cls))
        logger.info("noflash: FFN Chunker wraps %d feed-forward modules (num_chunks=%s)", wrapped,
                    num_chunks or "adaptive")
        return io.NodeOutput(m)
