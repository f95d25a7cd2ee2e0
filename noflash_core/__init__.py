"""noflash_core: exact, O(N)-memory scaled-dot-product attention in pure PyTorch.

For GPUs where torch has no fused attention kernel (AMD gfx906/RDNA1/RDNA2 under ROCm, Intel Arc, Apple MPS, older
NVIDIA), where ``torch.nn.functional.scaled_dot_product_attention`` falls back to the math kernel and builds the
full ``L x S`` score matrix. Importing this package changes nothing; ``enable()`` or ``import noflash_core.auto``
patches torch's SDPA globally. :func:`attention` is the engine's one entry: the output, the row log-sum-exp when
asked, and the plan that ran.
"""

from .caches import clear_caches
from .device import DeviceProfile, device_profile, device_report, simulate_device
from .dispatch import AttentionResult, attention
from .ffn.chunk import chunked_forward
from .ffn.detect import find_ffn_modules
from .ffn.patch import FFNPatchHandle, patch_ffn
from .lse import attention_with_lse
from .patch import disable, enable, is_enabled, patched
from .planner import Plan, plan
from .sdpa import scaled_dot_product_attention

__version__ = "0.1.0"

__all__ = [
    "AttentionResult",
    "DeviceProfile",
    "FFNPatchHandle",
    "Plan",
    "__version__",
    "attention",
    "attention_with_lse",
    "chunked_forward",
    "clear_caches",
    "device_profile",
    "device_report",
    "disable",
    "enable",
    "find_ffn_modules",
    "is_enabled",
    "patch_ffn",
    "patched",
    "plan",
    "scaled_dot_product_attention",
    "simulate_device",
]
