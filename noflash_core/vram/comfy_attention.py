"""The attention ComfyUI itself runs on a device, and the working memory of one call of it.

ComfyUI 0.3.64 picks (``comfy/model_management.py``, ``comfy/ldm/modules/attention.py``,
``comfy/ldm/modules/diffusionmodules/model.py``):

- diffusion models: ``attention_pytorch`` (torch SDPA) where PyTorch attention is enabled: NVIDIA, Intel XPU, and
  AMD gfx90a/942/1100/1101/1151 (with triton and torch >= 2.7); else ``attention_sub_quad``;
- text encoders (``small_input=True``): ``attention_pytorch`` there, else ``attention_basic``;
- VAEs: ``pytorch_attention`` where PyTorch attention is enabled and the GPU is not AMD, else ``normal_attention``
  (split attention in slices).

Where torch SDPA has no fused kernel (the presets in :data:`noflash_core.device.PRESETS`), SDPA means the math
backend, and ComfyUI turns on ``allow_fp16_bf16_reduction_math_sdp``: fp16/bf16 scores stay in half precision.
:func:`math_reductions` fixes that flag for a computation, so an estimate does not depend on whether
``comfy.model_management`` happens to be imported.

The byte counts are derived from ComfyUI's code, tensor by tensor, and are checked against the live-bytes tracker
on ComfyUI's own functions in ``tests/comfy/test_comfyui_probe.py``. They count what the call allocates (output
included, inputs excluded), as :mod:`noflash_core.memory.fake_peak` does for noflash.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Iterator

import torch

from ..device import DeviceProfile

__all__ = [
    "ComfyPaths",
    "PATH_NAMES",
    "basic_bytes",
    "comfy_paths",
    "fused_sdpa_bytes",
    "math_reductions",
    "sub_quad_bytes",
    "sub_quad_chunks",
    "vae_split_bytes",
    "vae_split_slice",
]

PATH_NAMES = {
    "sub_quad": "sub-quadratic",
    "basic": "attention_basic",
    "split": "split attention",
    "sdpa": "torch SDPA (fused)",
    "sdpa_math": "torch math SDPA",
}
"""Readable names of ComfyUI's attention paths."""

_PYTORCH_ATTENTION_ROCM = ("gfx90a", "gfx942", "gfx1100", "gfx1101", "gfx1151")
_SUB_QUAD_CHUNKS = (4096, 2048, 1024, 512, 256)


@dataclass(frozen=True)
class ComfyPaths:
    """ComfyUI's attention on one device.

    Attributes:
        diffusion: ``"sub_quad"``, ``"sdpa"`` or ``"sdpa_math"``.
        text: ``"basic"``, ``"sdpa"`` or ``"sdpa_math"``.
        vae: ``"split"``, ``"sdpa"`` or ``"sdpa_math"``.
        upcast: ComfyUI computes fp16 attention scores in fp32 there (macOS 14.5 and later forces it).
    """

    diffusion: str
    text: str
    vae: str
    upcast: bool = False


def comfy_paths(profile: DeviceProfile) -> ComfyPaths:
    """The attention ComfyUI 0.3.64 runs on ``profile``'s device with its default flags."""
    arch = (profile.arch or "").split(":")[0]
    pytorch = profile.kind in ("cuda", "xpu") or (profile.kind == "rocm" and arch in _PYTORCH_ATTENTION_ROCM)
    sdpa = "sdpa" if profile.efficient_sdpa else "sdpa_math"
    return ComfyPaths(
        diffusion=sdpa if pytorch else "sub_quad",
        text=sdpa if pytorch else "basic",
        vae=sdpa if pytorch and profile.kind != "rocm" else "split",
        upcast=profile.kind == "mps",
    )


@contextlib.contextmanager
def math_reductions(allowed: bool = True) -> Iterator[None]:
    """Run with torch's ``allow_fp16_bf16_reduction_math_sdp`` set to ``allowed`` (ComfyUI sets it True)."""
    cuda = torch.backends.cuda
    if not hasattr(cuda, "allow_fp16_bf16_reduction_math_sdp"):
        yield
        return
    before = cuda.fp16_bf16_reduction_math_sdp_allowed()
    cuda.allow_fp16_bf16_reduction_math_sdp(allowed)
    try:
        yield
    finally:
        cuda.allow_fp16_bf16_reduction_math_sdp(before)


def fused_sdpa_bytes(batch: int, heads: int, q_len: int, v_dim: int, elt: int) -> int:
    """A fused SDPA kernel: its output and the fp32 log-sum-exp rows."""
    return batch * heads * q_len * (v_dim * elt + 4)


def sub_quad_chunks(bh: int, kv_len: int, elt: int, free_bytes: int) -> tuple:
    """``(query_chunk, kv_chunk)`` that ``attention_sub_quad`` picks: the largest query chunk whose
    ``4 · bh · chunk · kv_len · elt`` fits in free memory with all keys, else 512 and ``floor(sqrt(kv_len))``."""
    for chunk in _SUB_QUAD_CHUNKS:
        if free_bytes / (bh * elt * chunk * 4.0) >= kv_len:
            return chunk, kv_len
    return 512, max(1, min(int(math.sqrt(kv_len)), kv_len))


def sub_quad_bytes(batch: int, heads: int, q_len: int, kv_len: int, head_dim: int, v_dim: int, elt: int,
                   free_bytes: int, *, skip_reshape: bool = False, skip_output_reshape: bool = False,
                   upcast: bool = False) -> int:
    """Working bytes of ``attention_sub_quad`` (no mask).

    ``(b, n, h·d)`` operands with ``b > 1`` are copied to ``(b·h, n, d)`` (kept for the whole call). Every query
    chunk makes its scores and their softmax (``2 · b·h · chunk · S``); with key chunks it keeps every key chunk's
    partial output, sum and max, stacks them (twice that) and rescales. The chunk outputs are kept, then
    concatenated (twice the output), and the ``(b, n, h·dv)`` result is one more copy.
    """
    bh = batch * heads
    score_elt = 4 if upcast else elt
    copies = 0
    if not skip_reshape and batch > 1 and heads > 1:
        copies = bh * (q_len * head_dim + kv_len * (head_dim + v_dim)) * elt
    q_chunk, kv_chunk = sub_quad_chunks(bh, kv_len, score_elt, free_bytes)

    def chunk_peak(rows: int) -> int:
        per = bh * rows
        out = per * v_dim * elt
        if kv_chunk >= kv_len:
            scores = per * kv_len * score_elt
            upcast_extra = (bh * (rows + kv_len) * head_dim * 4 + per * kv_len * elt) if upcast else 0
            return max(2 * scores, scores + out) + upcast_extra
        n_kv = math.ceil(kv_len / kv_chunk)
        kept_one = per * (v_dim * elt + elt + score_elt)  # exp_values, exp_weights sum, max per key chunk
        kept = n_kv * kept_one
        argmax = per * (score_elt + 8)  # torch.max values and int64 indices
        summarize = kept + per * kv_chunk * score_elt + argmax
        rescale = 2 * kept + 2 * n_kv * per * score_elt + argmax
        combine = 2 * kept + n_kv * per * score_elt + argmax + 2 * out + per * elt
        return max(summarize, rescale, combine)

    row_bytes = bh * v_dim * elt
    out = q_len * row_bytes
    if q_len <= q_chunk:
        body = chunk_peak(q_len)
    else:
        full, rest = divmod(q_len, q_chunk)
        body = max((full - 1) * q_chunk * row_bytes + chunk_peak(q_chunk), 2 * out)
        if rest:
            body = max(body, full * q_chunk * row_bytes + chunk_peak(rest))
    final = out if skip_output_reshape else 2 * out
    return copies + max(body, final)


def basic_bytes(batch: int, heads: int, q_len: int, kv_len: int, head_dim: int, v_dim: int, elt: int, *,
                skip_reshape: bool = False, mask_copy: bool = False, upcast: bool = False) -> int:
    """Working bytes of ``attention_basic``.

    It copies ``(b, n, h·d)`` operands to ``(b·h, n, d)`` (q and k are freed after the scores), makes the scores
    and their scaled copy, adds a mask (copied to every head when its heads axis broadcasts and ``b > 1``:
    ``mask_copy``), keeps the scores alive next to their softmax, and reshapes the output (another copy).
    """
    bh = batch * heads
    score_elt = 4 if upcast else elt
    scores = bh * q_len * kv_len * score_elt
    q_copy = 0 if skip_reshape else bh * q_len * head_dim * elt
    k_copy = 0 if skip_reshape else bh * kv_len * head_dim * elt
    v_copy = 0 if skip_reshape else bh * kv_len * v_dim * elt
    mask = bh * q_len * kv_len * elt if mask_copy else 0
    out = bh * q_len * v_dim * elt
    converted = bh * q_len * kv_len * elt if score_elt != elt else 0
    upcast_inputs = bh * (q_len + kv_len) * head_dim * 4 if upcast else 0
    phases = (
        q_copy + k_copy + v_copy + max(2 * scores, scores + upcast_inputs),  # einsum, then * scale
        v_copy + mask + 2 * scores,  # mask added in place, softmax next to the scores
        v_copy + mask + scores + converted + out,  # probabilities (cast to v's dtype) @ v
        v_copy + mask + scores + 2 * out,  # the (b, n, h·dv) reshape of the output
    )
    return max(phases)


def vae_split_slice(batch: int, tokens: int, elt: int, free_bytes: int) -> int:
    """Query rows per slice of ComfyUI's VAE ``slice_attention``: the steps double until
    ``modifier · b · N · N · elt`` fits in free memory; slicing only when N divides evenly."""
    size = batch * tokens * tokens * elt
    required = size * (3 if elt == 2 else 2.5)
    steps = 1
    if required > free_bytes:
        steps = 2 ** math.ceil(math.log2(required / max(1, free_bytes)))
    return tokens // steps if tokens % steps == 0 else tokens


def vae_split_bytes(batch: int, channels: int, tokens: int, elt: int, free_bytes: int) -> int:
    """Working bytes of ComfyUI's VAE split attention (``normal_attention``): the zeroed output, then per slice
    the scores and their scaled copy, the softmax next to the scores, the slice's output."""
    rows = vae_split_slice(batch, tokens, elt, free_bytes)
    out = batch * channels * tokens * elt
    slice_scores = batch * rows * tokens * elt
    return out + max(2 * slice_scores, slice_scores + batch * channels * rows * elt)
