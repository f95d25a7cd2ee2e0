"""Status of the nodes that are not attention runs: the FFN Chunker's sampling runs and the CLIP/VAE Patchers'
encodes and decodes. Same status identity as :class:`~noflash_core.comfy.telemetry.RunMonitor` (``kind``,
``node_ids``, ``prompt_id``, ``workflow_id``, ``exec_node_id``), published as the same ``noflash.status`` event.

- :class:`FFNMonitor` (``kind`` ``"ffn"``): per sampling run, how many feed-forward calls ran in how many token
  chunks, and how much intermediate activation the chunking kept from existing at once (the unchunked call's
  hidden activations minus one chunk's; the largest call's figure).
- :class:`EncodeMonitor` (``kind`` ``"clip"`` or ``"vae"``): the last encode or decode, bracketed by the glue
  (:meth:`EncodeMonitor.begin` / :meth:`EncodeMonitor.end`). One operation is everything one executing node does
  with the patched object in one prompt: a tiled decode's tiles and a batch's chunks add up to one status.

Nothing here imports ComfyUI.
"""

from __future__ import annotations

import math
import threading
from typing import Any, Dict, Optional, Tuple

import torch

from .telemetry import RunMonitor, StatusMonitor, read_origin

__all__ = ["EncodeMonitor", "FFNMonitor", "ffn_intermediate_bytes"]


def ffn_intermediate_bytes(x: torch.Tensor, width_per_token: int, tokens: int) -> int:
    """Bytes of a feed-forward's hidden activations for ``tokens`` tokens of ``x`` (``(..., N, C)``).

    ``width_per_token``: elements alive per token and row at the peak (``FFNInfo.width_per_token``).
    """
    n = x.shape[-2] if x.dim() >= 2 else 1
    rows = x.numel() // max(1, n * x.shape[-1])
    return int(rows * width_per_token * x.element_size() * tokens)


class FFNMonitor(StatusMonitor):
    """The FFN Chunker's sampling runs: chunked calls, chunks per call, intermediate bytes saved.

    Args:
        modules: how many feed-forward modules the node wrapped.
        num_chunks: the node's setting (0 = adaptive).
        Other arguments as for :class:`~noflash_core.comfy.telemetry.StatusMonitor`.
    """

    kind = "ffn"

    def __init__(self, label: str = "", *args: Any, modules: int = 0, num_chunks: int = 0, **kwargs: Any) -> None:
        self.modules = int(modules)
        self.num_chunks = int(num_chunks)
        super().__init__(label, *args, **kwargs)

    def _reset_counters(self) -> None:
        self.calls = 0
        self.chunked_calls = 0
        self.chunks = 0
        self.max_tokens = 0
        self.intermediate_bytes = 0
        self.saved_bytes = 0

    def record(self, device: Any, tokens: int, chunk_tokens: Optional[int], full_bytes: int, chunk_bytes: int) -> None:
        """Count one feed-forward call of ``tokens`` tokens; ``chunk_tokens`` None: it ran unchunked."""
        self._ensure_running(device)
        with self._lock:
            self.calls += 1
            self.max_tokens = max(self.max_tokens, int(tokens))
            self.intermediate_bytes = max(self.intermediate_bytes, int(full_bytes))
            if chunk_tokens:
                self.chunked_calls += 1
                self.chunks = max(self.chunks, math.ceil(tokens / chunk_tokens))
                self.saved_bytes = max(self.saved_bytes, int(full_bytes) - int(chunk_bytes))
        self._sample_peak()
        self._emit(force=False)

    def _fields(self) -> Dict[str, Any]:
        return {
            "modules": self.modules,
            "num_chunks": self.num_chunks,
            "calls": self.calls,
            "chunked_calls": self.chunked_calls,
            "chunks": self.chunks,
            "max_tokens": self.max_tokens,
            "intermediate_bytes": self.intermediate_bytes,
            "saved_bytes": self.saved_bytes,
        }


class EncodeMonitor(RunMonitor):
    """The CLIP or VAE Patcher's last encode/decode: tier mix, calls, longest sequence, peak.

    Args:
        kind: ``"clip"`` or ``"vae"``.
        Other arguments as for :class:`~noflash_core.comfy.telemetry.StatusMonitor`.
    """

    def __init__(self, label: str = "", *args: Any, kind: str = "clip", **kwargs: Any) -> None:
        if kind not in ("clip", "vae"):
            raise ValueError(f"kind must be 'clip' or 'vae', got {kind!r}")
        self.kind = kind
        self.op = ""
        self._depth = 0
        self._op_key: Optional[Tuple[Optional[str], Optional[str], str]] = None
        self._bracket_lock = threading.Lock()
        super().__init__(label, *args, **kwargs)

    def begin(self, op: str, device: Any = None) -> None:
        """An encode/decode starts (``op`` ``"encode"`` or ``"decode"``); nested calls count as one."""
        with self._bracket_lock:
            self._depth += 1
            if self._depth > 1:
                return
        origin = read_origin(self.context)
        key = (origin["prompt_id"], origin["exec_node_id"], op)
        if self.run_id and key == self._op_key and origin["prompt_id"] is not None:
            with self._lock:  # the same node of the same prompt again (a batch, another tile pass): add up
                self._running = True
            return
        self.start(None if device is None else torch.device(device), origin=origin)
        self.op = op
        self._op_key = key

    def end(self) -> Optional[Dict[str, Any]]:
        """The encode/decode returned (or raised): publish its status and keep it in the history."""
        with self._bracket_lock:
            self._depth = max(0, self._depth - 1)
            if self._depth:
                return None
        return self.finish()

    def _fields(self) -> Dict[str, Any]:
        fields = super()._fields()
        fields["op"] = self.op
        return fields
