"""No host syncs in the engine: a GPU queue never stalls on a value read back mid-call.

A TorchDispatchMode counts the ops that read a device value on the host (``aten._local_scalar_dense``, which
``.item()``, ``bool()``, ``float()`` and ``int()`` of a tensor all dispatch to, plus ``is_nonzero`` and ``item``
should a build dispatch those) while the engine runs masked (bool and float masks), causal and dropout calls of
every tier, forward and backward. The count is 0, except exactly one per call for bf16 inputs on a device without
bf16 (the range check that picks fp16 or fp32 operands), simulated with gfx906's profile.
"""

from __future__ import annotations

import pytest
import torch

import noflash_core as nc
from noflash_core import tiles
from noflash_core.device import get_preset
from tests.support.ops import OpCounter


def _inputs(dtype=torch.float32, grad=False, hq=4, hk=4):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, hq, 96, 16, generator=g).to(dtype).requires_grad_(grad)
    k = torch.randn(2, hk, 80, 16, generator=g).to(dtype).requires_grad_(grad)
    v = torch.randn(2, hk, 80, 16, generator=g).to(dtype).requires_grad_(grad)
    return q, k, v


def _variants(dtype):
    keep = torch.rand(2, 1, 96, 80, generator=torch.Generator().manual_seed(1)) > 0.3
    keep[:, :, ::5] = False  # fully masked rows
    pad = torch.ones(2, 1, 1, 80, dtype=torch.bool)
    pad[1, ..., 60:] = False  # key padding
    float_mask = torch.zeros(keep.shape, dtype=dtype).masked_fill(~keep, float("-inf"))
    return {
        "bool": dict(attn_mask=keep),
        "pad": dict(attn_mask=pad),
        "float": dict(attn_mask=float_mask),
        "causal": dict(is_causal=True),
        "dropout": dict(dropout_p=0.25),
        "gqa_causal_dropout": dict(is_causal=True, dropout_p=0.1, enable_gqa=True),
    }


def _run(tier, variant, dtype, grad):
    hk = 2 if "gqa" in variant else 4
    q, k, v = _inputs(dtype, grad, hk=hk)
    kwargs = _variants(dtype)[variant]
    blocks = {} if tier == "auto" else dict(block_m=32, block_n=32)
    counter = OpCounter()
    with counter:
        out = nc.scaled_dot_product_attention(q, k, v, tier=tier, **blocks, **kwargs)
    forward = counter.syncs
    backward = None
    if grad:
        counter = OpCounter()
        with counter:
            out.backward(torch.ones_like(out))
        backward = counter.syncs
        assert q.grad is not None and torch.isfinite(q.grad).all()
    return forward, backward, out


VARIANTS = ["bool", "pad", "float", "causal", "dropout", "gqa_causal_dropout"]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("tier", [1, 2, 3, "auto"])
def test_forward_has_no_host_sync(tier, variant):
    with torch.no_grad():
        forward, _, out = _run(tier, variant, torch.float32, grad=False)
    assert forward == 0
    assert out.shape == (2, 4, 96, 16)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("tier", [1, 2])
def test_forward_and_backward_have_no_host_sync(tier, variant):
    forward, backward, _ = _run(tier, variant, torch.float32, grad=True)
    assert (forward, backward) == (0, 0)


@pytest.mark.parametrize("tier", [1, 2, 3])
def test_gpu_profile_fp16_has_no_host_sync(monkeypatch, tier):
    # fp16 on a GPU profile: half operands with fp32-output matmuls, still nothing read back.
    monkeypatch.setattr(tiles, "device_profile", lambda device: get_preset("gfx906"))
    with torch.no_grad():
        for variant in ("bool", "pad", "causal", "dropout"):
            forward, _, _ = _run(tier, variant, torch.float16, grad=False)
            assert forward == 0, variant


@pytest.mark.parametrize("tier", [1, 2, 3])
def test_bf16_without_bf16_hardware_reads_back_once_per_call(monkeypatch, tier):
    monkeypatch.setattr(tiles, "device_profile", lambda device: get_preset("gfx906"))
    grad = tier != 3
    for variant in ("bool", "float", "causal", "dropout"):
        forward, backward, _ = _run(tier, variant, torch.bfloat16, grad=grad)
        assert forward == 1, variant
        if grad:
            assert backward == 1, variant


def test_bf16_with_bf16_hardware_reads_nothing(monkeypatch):
    monkeypatch.setattr(tiles, "device_profile", lambda device: get_preset("mps"))
    forward, backward, _ = _run(2, "bool", torch.bfloat16, grad=True)
    assert (forward, backward) == (0, 0)
