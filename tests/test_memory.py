"""Memory is a feature: O(N) growth, the planner's budget, the OOM retry cascade and no leaks.

Measured with the live-bytes tracker (exact on CPU); the 16K-token checks run the real code on FakeTensors.
"""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import noflash_core as nc
from noflash_core import telemetry
from noflash_core.memory.tracker import LiveBytesTracker, MemoryBudget
from noflash_core.planner import predict_peak_bytes
from noflash_core.problem import build_problem
from tests.support.reference import assert_close_to_reference

MiB = 1024 * 1024


def _qkv(n: int, h: int = 4, e: int = 32, dtype=torch.float32, grad: bool = False):
    g = torch.Generator().manual_seed(n)
    return [torch.randn(1, h, n, e, generator=g, dtype=dtype).requires_grad_(grad) for _ in range(3)]


def _peak(fn, *args, **kwargs) -> int:
    with LiveBytesTracker() as tracker:
        out = fn(*args, **kwargs)
        del out
    return tracker.peak_bytes


@pytest.mark.parametrize("tier", [1, 2, 3])
def test_forward_peak_grows_linearly(tier):
    peaks = []
    for n in (1024, 2048):
        q, k, v = _qkv(n)
        peaks.append(_peak(nc.scaled_dot_product_attention, q, k, v, tier=tier, block_m=64, block_n=128))
    assert peaks[1] <= 2.2 * peaks[0], peaks


def test_math_peak_is_quadratic_for_contrast():
    from tests.support.reference import math_sdpa

    peaks = []
    for n in (512, 1024):
        q, k, v = _qkv(n)
        peaks.append(_peak(math_sdpa, q, k, v))
    assert peaks[1] >= 3.5 * peaks[0]
    assert peaks[1] >= 2 * 4 * 1024 * 1024 * 4  # scores + softmax: 2 * H * L * S * 4 bytes


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("budget_mib", [1, 2, 4, 8, 32])
def test_auto_plan_stays_within_budget(budget_mib, grad):
    q, k, v = _qkv(1024, grad=grad)
    budget = budget_mib * MiB
    p = nc.plan(q, k, v, budget_bytes=budget)
    with LiveBytesTracker() as tracker:
        out = nc.scaled_dot_product_attention(q, k, v, budget_bytes=budget)
        if grad:
            out.sum().backward()
        del out
    if p.fits:
        assert tracker.peak_bytes <= budget, (p, tracker.peak_bytes)
    # The prediction is conservative and not wildly so.
    assert tracker.peak_bytes <= p.peak_bytes <= 1.5 * tracker.peak_bytes + 256 * 1024, (p, tracker.peak_bytes)


@pytest.mark.parametrize("tier,grad", [(1, False), (2, False), (3, False), (1, True), (2, True)])
@pytest.mark.parametrize("mask", [None, "bool", "float"])
def test_prediction_bounds_measurement(tier, grad, mask):
    q, k, v = _qkv(768, grad=grad)
    m = None
    if mask == "bool":
        m = torch.rand(768, 768) > 0.2
    elif mask == "float":
        m = torch.randn(1, 1, 768, 768)
    problem = build_problem(q, k, v, m)
    predicted = predict_peak_bytes(problem, tier, 64, 128, requires_grad=grad)
    with LiveBytesTracker() as tracker:
        out = nc.scaled_dot_product_attention(q, k, v, m, tier=tier, block_m=64, block_n=128)
        if grad:
            out.sum().backward()
        del out
    assert tracker.peak_bytes <= predicted <= 1.5 * tracker.peak_bytes + 256 * 1024, (predicted, tracker.peak_bytes)


def _fake_peak(n: int, tier, grad: bool = False, **kwargs):
    with FakeTensorMode():
        q, k, v = (torch.empty(1, 16, n, 64, requires_grad=grad) for _ in range(3))
        with LiveBytesTracker() as tracker:
            out = nc.scaled_dot_product_attention(q, k, v, tier=tier, **kwargs)
            out_bytes = out.numel() * out.element_size()
            if grad:
                out.backward(torch.empty_like(out))
            del out
    return tracker.peak_bytes, out_bytes


def test_16k_tokens_default_auto_plan_within_256_mib():
    peak, _ = _fake_peak(16384, "auto")
    assert peak <= 256 * MiB, peak / MiB


def test_16k_tokens_tier2_default_blocks_within_64_mib_beyond_output():
    peak, out_bytes = _fake_peak(16384, 2)
    assert peak - out_bytes <= 64 * MiB, (peak - out_bytes) / MiB


def test_8k_tokens_forward_backward_within_512_mib():
    peak, _ = _fake_peak(8192, "auto", grad=True)
    assert peak <= 512 * MiB, peak / MiB


def _records():
    seen = []
    return seen, telemetry.subscribe(seen.append)


def test_oom_retry_with_halved_blocks():
    q, k, v = _qkv(1024)
    first = nc.plan(q, k, v, tier=1, budget_bytes=10**12)
    seen, unsubscribe = _records()
    try:
        with MemoryBudget(first.peak_bytes // 2) as budget:
            out = nc.scaled_dot_product_attention(q, k, v, tier=1, budget_bytes=10**12)
    finally:
        unsubscribe()
    assert budget.ooms_raised >= 1
    assert seen[-1].tier == 1 and seen[-1].block_m < first.block_m
    assert_close_to_reference(out, q, k, v)


def test_oom_falls_to_next_tier():
    # Under grad the order is tier 1 then tier 2. Allow less than tier 1's smallest forward actually needs.
    q, k, v = _qkv(2048, grad=True)
    with LiveBytesTracker() as tracker:
        out = nc.scaled_dot_product_attention(q, k, v, tier=1, block_m=16)
        del out
    seen, unsubscribe = _records()
    try:
        with MemoryBudget(tracker.peak_bytes - 256 * 1024) as budget:
            out = nc.scaled_dot_product_attention(q, k, v, budget_bytes=10**12)
    finally:
        unsubscribe()
    assert budget.ooms_raised >= 2
    assert seen[-1].tier == 2
    assert_close_to_reference(out, q, k, v)


def test_oom_everywhere_raises_clear_error_and_leaks_nothing():
    q, k, v = _qkv(1024)
    with LiveBytesTracker() as outer:
        with MemoryBudget(64 * 1024):
            with pytest.raises(torch.OutOfMemoryError) as info:
                nc.scaled_dot_product_attention(q, k, v, budget_bytes=10**12)
    message = str(info.value)
    for words in ("1024", "float32", "budget", "smallest", "tier"):
        assert words in message
    assert outer.live_bytes == 0  # no partial output survives


def test_pinned_plan_is_never_changed():
    q, k, v = _qkv(1024)
    first = nc.plan(q, k, v, tier=1, block_m=256)
    with MemoryBudget(first.peak_bytes // 2) as budget:
        with pytest.raises(torch.OutOfMemoryError):
            nc.scaled_dot_product_attention(q, k, v, tier=1, block_m=256)
    assert budget.ooms_raised == 1


def test_oom_in_backward_retries_with_smaller_blocks():
    q, k, v = _qkv(1024, grad=True)
    out = nc.scaled_dot_product_attention(q, k, v, tier=2, block_m=512)  # blocks not pinned: retry allowed
    problem = build_problem(q, k, v)
    used = nc.plan(q, k, v, tier=2, block_m=512)
    big = predict_peak_bytes(problem, 2, used.block_m, used.block_n, requires_grad=True)
    small = predict_peak_bytes(problem, 2, 64, 128, requires_grad=True)
    with MemoryBudget((big + small) // 2) as budget:
        out.sum().backward()
    assert budget.ooms_raised >= 1
    q2, k2, v2 = (t.detach().double().requires_grad_() for t in (q, k, v))
    torch.nn.functional.scaled_dot_product_attention(q2, k2, v2).sum().backward()
    for ours, exact in ((q.grad, q2.grad), (k.grad, k2.grad), (v.grad, v2.grad)):
        assert (ours.double() - exact).abs().max().item() < 1e-4


def test_thousand_calls_return_to_baseline():
    q, k, v = _qkv(32, h=2, e=8)
    m = torch.rand(32, 32) > 0.2
    with LiveBytesTracker() as tracker:
        for i in range(1000):
            tier = (1, 2, 3, "auto")[i % 4]
            out = nc.scaled_dot_product_attention(q, k, v, m if i % 3 == 0 else None, tier=tier, block_m=16)
            del out
    assert tracker.live_bytes == 0
