"""torch's own scaled-dot-product attention, as noflash found it: tier 0 and the reference everything else is
measured against.

A leaf module (it imports nothing from the project), so the device probe, the dispatcher, the bench and the memory
predictions can all reach torch's SDPA without importing each other.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

__all__ = ["math_sdpa", "original_sdpa"]

original_sdpa = F.scaled_dot_product_attention
"""torch's own SDPA as it was when noflash_core was imported (the global patch never changes this name)."""


def math_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """torch's own SDPA pinned to the math backend: noflash's tier 0, and the O(N²) reference of the bench and
    the memory predictions; arguments and result as torch's SDPA. It keeps math's semantics on every device
    (torch's fused CPU kernel differs from math on inf/NaN inputs and rejects 1-D masks). Under ``torch.compile``
    the backend choice is left to torch."""
    if torch.compiler.is_compiling():
        return original_sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)
    with sdpa_kernel(SDPBackend.MATH):
        return original_sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)
