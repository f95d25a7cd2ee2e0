"""The feed-forward of a transformer stage, whole and in token chunks, measured on fake tensors.

The module is a real ``nn.Module`` (GELU MLP, or SD's GEGLU) on meta tensors under the live-bytes tracker; the
chunked run is :func:`noflash_core.ffn.chunk.chunked_forward`, what the NoFlash FFN Chunker installs.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from ..memory.fake_peak import plain_grad_mode
from ..memory.tracker import LiveBytesTracker
from ..video.families import AttentionStage
from .calls import UNLIMITED
from .results import FFNEstimate

__all__ = ["estimate_ffn", "ffn_chunks"]

_MAX_FFN_CHUNKS = 64  # past this, per-chunk overhead grows and the output buffer dominates anyway
_META = torch.device("meta")


class _GEGLUFeedForward(nn.Module):
    """SD-style feed-forward: Linear to 2×width, ``a * gelu(gate)``, Linear back. Shapes ``(B, N, dim)``."""

    def __init__(self, dim: int, width: int, **kw) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, 2 * width, **kw)
        self.out = nn.Linear(width, dim, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, gate = self.proj(x).chunk(2, dim=-1)
        return self.out(a * nn.functional.gelu(gate))


def _ffn_module(kind: str, dim: int, width: int, dtype: torch.dtype) -> nn.Module:
    kw = {"dtype": dtype, "device": _META}
    if kind == "geglu":
        return _GEGLUFeedForward(dim, width, **kw)
    return nn.Sequential(nn.Linear(dim, width, **kw), nn.GELU(approximate="tanh"), nn.Linear(width, dim, **kw))


def ffn_chunks(batch: int, tokens: int, width: int, kind: str, elt: int, budget: Optional[int]) -> int:
    """Chunks so one chunk's intermediates take at most half the budget (ffn_chunk's adaptive rule)."""
    per_token = batch * width * (3 if kind == "geglu" else 2) * elt
    if budget is None or budget >= UNLIMITED:
        return 8
    return max(2, min(_MAX_FFN_CHUNKS, tokens, math.ceil(tokens * per_token / max(1, budget // 2))))


def estimate_ffn(stage: AttentionStage, kind: str, batch: int, tokens: int, dtype: torch.dtype,
                 chunks: int) -> FFNEstimate:
    """Peak bytes of the stage's FFN on ``(batch, tokens, heads · head_dim)`` fake input, whole and in ``chunks``
    chunks (output included, input excluded)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from ..ffn.chunk import chunked_forward

    dim = stage.heads * stage.head_dim
    peaks = []
    with plain_grad_mode(), FakeTensorMode():
        module = _ffn_module(kind, dim, stage.ffn_dim, dtype)
        x = torch.empty(batch, tokens, dim, dtype=dtype, device=_META)
        for fn in (module, chunked_forward(module, chunks)):
            with LiveBytesTracker() as tracker:
                out = fn(x)
                del out
            peaks.append(tracker.peak_bytes)
    return FFNEstimate(tokens, stage.ffn_dim, kind, peaks[0], peaks[1], chunks)
