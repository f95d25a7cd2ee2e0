"""Fake-tensor peak prediction against the live-bytes tracker on real tensors (scaled-down sizes)."""

from __future__ import annotations

import logging

import pytest
import torch

from noflash_core.bench.crosscheck import real_peak_bytes
from noflash_core.memory.fake_peak import (
    AttentionShape,
    fake_peak_bytes,
    math_sdpa,
    predict_math_peak,
    predict_plan_peak,
)
from noflash_core.sdpa import scaled_dot_product_attention

BUDGET = 8 << 20


_real_peak = real_peak_bytes


CASES = [
    # (tier, block_m, block_n, dtype, requires_grad)
    ("auto", None, None, torch.float32, False),
    ("auto", None, None, torch.float32, True),
    ("auto", None, None, torch.float16, False),
    (1, 64, None, torch.float32, False),
    (1, 64, None, torch.float16, True),
    (2, 64, 128, torch.float32, False),
    (2, 64, 128, torch.float32, True),
    (2, 128, 256, torch.float16, True),
    (3, 64, None, torch.float32, False),
    (3, 64, None, torch.float16, False),
]


@pytest.mark.parametrize("tier,block_m,block_n,dtype,requires_grad", CASES)
def test_extrapolated_prediction_matches_tracker_within_5_percent(tier, block_m, block_n, dtype, requires_grad):
    shape = AttentionShape(1, 2, 1500, 1300, 32)
    plan, predicted = predict_plan_peak(shape, dtype=dtype, requires_grad=requires_grad, budget_bytes=BUDGET, tier=tier,
                                        block_m=block_m, block_n=block_n,
                                        max_direct_tiles=0)  # force the fit-and-extrapolate path
    assert predicted.method == "affine" and predicted.verified

    def fixed(q, k, v):
        return scaled_dot_product_attention(
            q, k, v, tier=plan.tier, block_m=plan.block_m, block_n=plan.block_n, budget_bytes=BUDGET
        )

    real = _real_peak(fixed, shape, dtype, requires_grad)
    assert abs(predicted.peak_bytes - real) <= 0.05 * real, (plan, predicted, real)


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_math_prediction_is_exact(dtype, requires_grad):
    shape = AttentionShape(1, 4, 384, 320, 32)
    predicted = predict_math_peak(shape, dtype=dtype, requires_grad=requires_grad)
    assert predicted.method == "direct"
    assert predicted.peak_bytes == _real_peak(math_sdpa, shape, dtype, requires_grad)


@pytest.mark.parametrize("requires_grad", [False, True])
def test_direct_run_for_few_tiles_is_the_real_peak(requires_grad):
    shape = AttentionShape(1, 2, 256, 256, 32)
    plan, predicted = predict_plan_peak(shape, tier=2, block_m=64, block_n=64, budget_bytes=BUDGET,
                                        requires_grad=requires_grad)
    assert predicted.method == "direct" and predicted.verified

    def pinned(q, k, v):
        return scaled_dot_product_attention(q, k, v, tier=2, block_m=64, block_n=64, budget_bytes=BUDGET)

    # A direct run counts the bytes of the very allocations the tiles make: the tracker on real tensors agrees.
    assert predicted.peak_bytes == _real_peak(pinned, shape, torch.float32, requires_grad)


def _toy_tiled(q, k, v, block_m=32):
    """Query-chunked attention: peak = output + one (block_m, S) scores block and its softmax."""
    out = q.new_empty(q.shape[:-1] + (v.shape[-1],))
    for i in range(0, q.shape[-2], block_m):
        scores = q[..., i : i + block_m, :] @ k.transpose(-1, -2)
        out[..., i : i + block_m, :] = scores.softmax(-1) @ v
        del scores
    return out


def test_affine_fit_extrapolates_a_known_function():
    shape = AttentionShape(1, 2, 3000, 2000, 16)
    predicted = fake_peak_bytes(_toy_tiled, shape, tile=(32, None), max_direct_tiles=0)
    assert predicted.method == "affine" and predicted.runs == 5
    out_bytes = 2 * 3000 * 16 * 4
    block = 2 * 32 * 2000 * 4
    assert (
        predicted.peak_bytes == out_bytes + 2 * block + 2 * 32 * 16 * 4
        or abs(predicted.peak_bytes - _real_peak(_toy_tiled, shape, torch.float32, False))
        <= 0.001 * predicted.peak_bytes
    )


def test_failed_check_falls_back_to_a_direct_run(caplog):
    def phase_switch(q, k, v):
        # quadratic scratch only past 120 queries: not affine across the fitting grid
        if q.shape[-2] > 120:
            scratch = q.new_empty(q.shape[-2], q.shape[-2])
            del scratch
        return _toy_tiled(q, k, v)

    shape = AttentionShape(1, 1, 500, 500, 16)
    with caplog.at_level(logging.WARNING, logger="noflash_core.memory.fake_peak"):
        # 16 x 16 tiles: more than 20 (so it fits), at most 16 x 20 (so it may fall back to a direct run)
        predicted = fake_peak_bytes(phase_switch, shape, tile=(32, 32), max_direct_tiles=20)
        unverified = fake_peak_bytes(phase_switch, shape, tile=(32, 32), max_direct_tiles=1)
    assert not unverified.verified and unverified.method == "affine"
    assert predicted.method == "direct" and predicted.verified
    assert predicted.peak_bytes == _real_peak(phase_switch, shape, torch.float32, False)
    assert "off by" in caplog.text
