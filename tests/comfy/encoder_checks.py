"""Checks shared by the CLIP / VAE Patcher tests (``test_comfyui_clip_vae.py``, ``test_comfyui_reach_033.py``):
the exactness tolerance set by ComfyUI's own error, the float64 reference of a CLIP, and a counter of ComfyUI's own
attention calls.

Every comparison has a reference with exact attention: the same model with each attention call computed by math
SDPA in float64. The tolerance is 4x ComfyUI's own error against that reference plus 4 ulps of the output's scale,
as in ``tests/support/reference.py``.
"""

from __future__ import annotations

import tiny_encoders as te
import torch

__all__ = ["CountComfyAttention", "assert_exact", "exact_clip", "tolerance"]


def tolerance(original: torch.Tensor, truth: torch.Tensor) -> float:
    """4x ComfyUI's own max error against the exact-attention run, plus 4 ulps of the output's scale."""
    err = (original.double() - truth.double()).abs().max().item()
    return 4.0 * err + 4.0 * torch.finfo(original.dtype).eps * max(truth.abs().max().item(), 1e-3)


def assert_exact(patched: torch.Tensor, original: torch.Tensor, truth: torch.Tensor) -> None:
    """``patched`` has ``original``'s shape and dtype and is within :func:`tolerance` of the float64 ``truth``."""
    assert patched.shape == original.shape and patched.dtype == original.dtype
    err = (patched.double() - truth.double()).abs().max().item()
    tol = tolerance(original, truth)
    assert err <= tol, f"noflash error {err:.3e} > tolerance {tol:.3e} (ComfyUI's own error sets it)"


def exact_clip(rt, clip):
    """A clone of ``clip`` whose attention is float64 math SDPA (the reference); ``rt`` is the ``comfy`` fixture."""
    clip_mod = rt.module("noflash_core.comfy.clip")
    override = rt.module("noflash_core.comfy.override")
    ref = clip.clone()
    encode = ref.patcher.get_model_object("encode_token_weights")
    ref.patcher.add_object_patch("encode_token_weights", clip_mod.EncodeRouter(
        encode, ref.cond_stage_model, override.OverrideConfig(min_tokens=0), route=te.float64_route))
    return ref


class CountComfyAttention:
    """Counts calls of ComfyUI's own attention functions (module globals the encoders look up per call)."""

    NAMES = ("attention_basic", "attention_pytorch", "attention_sub_quad", "attention_split")

    def __init__(self, monkeypatch):
        import comfy.ldm.modules.attention as attention

        self.calls = 0
        for name in self.NAMES:
            real = getattr(attention, name)
            monkeypatch.setattr(attention, name, self._counting(real))

    def _counting(self, real):
        def counted(*args, **kwargs):
            self.calls += 1
            return real(*args, **kwargs)

        counted.__name__ = real.__name__
        return counted
