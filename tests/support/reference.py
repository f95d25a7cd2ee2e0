"""References and tolerances for comparing noflash attention with torch.

The tolerance of a non-fp64 result is derived from torch's math backend: its own error against a float64 reference,
times a small factor, plus a few ulps of the output's magnitude as a floor (math can be exact by luck). The float64
reference always runs on the CPU (MPS has no float64); math SDPA runs on the inputs' device.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

__all__ = ["FP64_TOL", "assert_close_to_reference", "math_sdpa", "reference_f64", "tolerance"]

FP64_TOL = 1e-10
_FACTOR = 4.0
_ULPS = 4.0


def math_sdpa(*args, **kwargs) -> torch.Tensor:
    """torch's math SDPA backend."""
    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(*args, **kwargs)


def _cpu64(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    if t is None:
        return t
    t = t.detach().cpu()
    return t if t.dtype == torch.bool else t.double()


def reference_f64(q, k, v, attn_mask=None, **kwargs) -> torch.Tensor:
    """Math SDPA on float64 CPU copies of the inputs: the ground truth (on the CPU)."""
    return math_sdpa(_cpu64(q), _cpu64(k), _cpu64(v), _cpu64(attn_mask), **kwargs)


def tolerance(math_out: torch.Tensor, truth: torch.Tensor) -> float:
    """Allowed max-abs error for a result in ``math_out.dtype``: a multiple of math's own max error vs ``truth``."""
    if math_out.dtype == torch.float64:
        return FP64_TOL
    math_err = (_cpu64(math_out) - truth).abs().max().item() if truth.numel() else 0.0
    eps = torch.finfo(math_out.dtype).eps
    scale = truth.abs().max().item() if truth.numel() else 1.0
    return _FACTOR * math_err + _ULPS * eps * max(scale, 1e-3)


def assert_close_to_reference(out: torch.Tensor, q, k, v, attn_mask=None, **kwargs) -> Tuple[float, float]:
    """Assert ``out`` matches torch: same shape, dtype and device, error within :func:`tolerance`.

    Returns (err, tol).
    """
    truth = reference_f64(q, k, v, attn_mask, **kwargs)
    mask = attn_mask.detach() if attn_mask is not None else None
    expected = math_sdpa(q.detach(), k.detach(), v.detach(), mask, **kwargs)
    assert out.shape == expected.shape, (out.shape, expected.shape)
    assert out.dtype == expected.dtype, (out.dtype, expected.dtype)
    assert out.device == expected.device, (out.device, expected.device)
    assert not torch.isnan(out).any() or torch.isnan(expected).any(), "NaN where math has none"
    err = (_cpu64(out) - truth).abs().max().item() if out.numel() else 0.0
    tol = tolerance(expected, truth)
    assert err <= tol, f"max error {err:.3e} > tolerance {tol:.3e} (dtype {out.dtype})"
    return err, tol
