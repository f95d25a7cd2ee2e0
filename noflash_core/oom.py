"""Out-of-memory helpers: give cached blocks back to the device allocator before a retry."""

from __future__ import annotations

import gc

import torch

__all__ = ["free_cached_memory"]


def free_cached_memory(device: torch.device) -> None:
    """Collect garbage and empty the caching allocator of ``device`` (a no-op on CPU)."""
    gc.collect()
    kind = torch.device(device).type
    if kind == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()
    elif kind == "mps" and hasattr(torch, "mps"):
        torch.mps.empty_cache()
    elif kind == "xpu" and hasattr(torch, "xpu") and torch.xpu.is_available():
        torch.xpu.empty_cache()
