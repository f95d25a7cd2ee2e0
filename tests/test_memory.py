"""Memory is a feature: O(N) growth, the planner's budget, the OOM retry cascade and no leaks.

Measured with the live-bytes tracker (exact, any device) and, on CUDA, ROCm and XPU, with the allocator's
``max_memory_allocated`` too (``NOFLASH_TEST_DEVICE``). On the CPU the 16K-token checks run the real code on
``meta`` tensors under ``simulate_device("cpu")``; on a GPU they run for real.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

import noflash_core as nc
from noflash_core.memory.tracker import LiveBytesTracker, MemoryBudget
from noflash_core.planner import predict_peak_bytes
from noflash_core.problem import build_problem
from tests.support.device import DEVICE, measure_peak
from tests.support.reference import assert_close_to_reference
from tests.support.tiers import TierLog

MiB = 1024 * 1024
_ALLOCATOR_SLACK = 1.05
"""The device allocator rounds every block up (to 512 bytes on CUDA): allow 5% over the tracker's bound."""


def _qkv(n: int, h: int = 4, e: int = 32, dtype=torch.float32, grad: bool = False):
    g = torch.Generator().manual_seed(n)
    return [torch.randn(1, h, n, e, generator=g, dtype=dtype).to(DEVICE).requires_grad_(grad) for _ in range(3)]


def _peak(fn, *args, **kwargs):
    with measure_peak() as peak:
        out = fn(*args, **kwargs)
        del out
    return peak


def _assert_within(peak, bound: int) -> None:
    """The tracker's peak is within ``bound``, and so is the allocator's (with its rounding) where it counts."""
    assert peak.tracker <= bound, (peak, bound)
    if peak.device is not None:
        assert peak.device <= _ALLOCATOR_SLACK * bound + MiB, (peak, bound)


@pytest.mark.parametrize("tier", [1, 2, 3])
def test_forward_peak_grows_linearly(tier):
    peaks = []
    for n in (1024, 2048):
        q, k, v = _qkv(n)
        peaks.append(_peak(nc.scaled_dot_product_attention, q, k, v, tier=tier, block_m=64, block_n=128))
    assert peaks[1].tracker <= 2.2 * peaks[0].tracker, peaks
    if peaks[0].device is not None:
        assert peaks[1].device <= 2.2 * peaks[0].device, peaks


def test_math_peak_is_quadratic_for_contrast():
    from tests.support.reference import math_sdpa

    peaks = []
    for n in (512, 1024):
        q, k, v = _qkv(n)
        peaks.append(_peak(math_sdpa, q, k, v).tracker)
    assert peaks[1] >= 3.5 * peaks[0]
    assert peaks[1] >= 2 * 4 * 1024 * 1024 * 4  # scores + softmax: 2 * H * L * S * 4 bytes


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("budget_mib", [1, 2, 4, 8, 32])
def test_auto_plan_stays_within_budget(budget_mib, grad):
    q, k, v = _qkv(1024, grad=grad)
    budget = budget_mib * MiB
    p = nc.plan(q, k, v, budget_bytes=budget)
    with measure_peak() as peak, TierLog() as log:
        out = nc.scaled_dot_product_attention(q, k, v, budget_bytes=budget)
        if grad:
            out.sum().backward()
        del out
    assert log.only_tier() == p.tier != 0, (p, log.tiers)
    if p.fits:
        _assert_within(peak, budget)
    # The prediction is conservative and not wildly so.
    _assert_within(peak, p.peak_bytes)
    assert p.peak_bytes <= 1.5 * peak.tracker + 256 * 1024, (p, peak)


@pytest.mark.parametrize("tier,grad", [(1, False), (2, False), (3, False), (1, True), (2, True)])
@pytest.mark.parametrize("mask", [None, "bool", "float"])
def test_prediction_bounds_measurement(tier, grad, mask):
    q, k, v = _qkv(768, grad=grad)
    m = None
    if mask == "bool":
        m = (torch.rand(768, 768) > 0.2).to(DEVICE)
    elif mask == "float":
        m = torch.randn(1, 1, 768, 768).to(DEVICE)
    problem = build_problem(q, k, v, m)
    predicted = predict_peak_bytes(problem, tier, 64, 128, requires_grad=grad)
    with measure_peak() as peak:
        out = nc.scaled_dot_product_attention(q, k, v, m, tier=tier, block_m=64, block_n=128)
        if grad:
            out.sum().backward()
        del out
    _assert_within(peak, predicted)
    assert predicted <= 1.5 * peak.tracker + 256 * 1024, (predicted, peak)


def _long_peak(n: int, tier, grad: bool = False, **kwargs):
    """Peak of one (1, 16, n, 64) fp32 call (and its backward): the real code on ``meta`` tensors planned as the
    CPU when the test device is the CPU (no data, same allocations), real tensors on a GPU."""
    on_cpu = DEVICE.type == "cpu"
    with nc.simulate_device("cpu") if on_cpu else contextlib.nullcontext():
        device = "meta" if on_cpu else DEVICE
        q, k, v = (torch.empty(1, 16, n, 64, device=device).normal_().requires_grad_(grad) for _ in range(3))
        plan = nc.plan(q, k, v, tier=tier, budget_bytes=kwargs.get("budget_bytes"))
        with measure_peak() as peak:
            out = nc.scaled_dot_product_attention(q, k, v, tier=tier, **kwargs)
            out_bytes = out.numel() * out.element_size()
            if grad:
                out.backward(torch.ones_like(out))
            del out
    return peak, out_bytes, plan


def test_16k_tokens_auto_plan_within_a_256_mib_budget():
    peak, _, plan = _long_peak(16384, "auto", budget_bytes=256 * MiB)  # 256 MiB is the CPU default
    assert plan.tier != 0 and plan.fits, plan
    _assert_within(peak, 256 * MiB)


def test_16k_tokens_tier2_default_blocks_within_the_prediction_and_64_mib_on_cpu():
    peak, out_bytes, plan = _long_peak(16384, 2)
    _assert_within(peak, plan.peak_bytes)
    if DEVICE.type == "cpu":  # a GPU's default blocks are bigger on purpose
        assert peak.tracker - out_bytes <= 64 * MiB, (peak.tracker - out_bytes) / MiB


def test_8k_tokens_forward_backward_within_512_mib():
    peak, _, _ = _long_peak(8192, "auto", grad=True, budget_bytes=256 * MiB)
    _assert_within(peak, 512 * MiB)


def test_oom_retry_with_halved_blocks():
    q, k, v = _qkv(1024)
    first = nc.plan(q, k, v, tier=1, budget_bytes=10**12)
    with TierLog() as log, MemoryBudget(first.peak_bytes // 2) as budget:
        out = nc.scaled_dot_product_attention(q, k, v, tier=1, budget_bytes=10**12)
    assert budget.ooms_raised >= 1
    assert log.records[-1].tier == 1 and log.records[-1].block_m < first.block_m
    assert_close_to_reference(out, q, k, v)


def test_oom_falls_to_next_tier():
    # Under grad the order is tier 1 then tier 2. Allow less than tier 1's smallest forward actually needs.
    q, k, v = _qkv(2048, grad=True)
    with LiveBytesTracker() as tracker:
        out = nc.scaled_dot_product_attention(q, k, v, tier=1, block_m=16)
        del out
    with TierLog() as log, MemoryBudget(tracker.peak_bytes - 256 * 1024) as budget:
        out = nc.scaled_dot_product_attention(q, k, v, budget_bytes=10**12)
    assert budget.ooms_raised >= 2
    assert log.only_tier() == 2
    assert_close_to_reference(out, q, k, v)


def test_oom_everywhere_raises_clear_error_and_leaks_nothing():
    q, k, v = _qkv(1024)
    with LiveBytesTracker() as outer:
        with MemoryBudget(64 * 1024):  # below every plan: the first (planned for 1 MiB) and each smaller one
            with pytest.raises(torch.OutOfMemoryError) as info:
                nc.scaled_dot_product_attention(q, k, v, budget_bytes=MiB)
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
    q2, k2, v2 = (t.detach().cpu().double().requires_grad_() for t in (q, k, v))
    torch.nn.functional.scaled_dot_product_attention(q2, k2, v2).sum().backward()
    for ours, exact in ((q.grad, q2.grad), (k.grad, k2.grad), (v.grad, v2.grad)):
        assert (ours.cpu().double() - exact).abs().max().item() < 1e-4


def test_calls_return_to_baseline():
    # A leak is memory a returned call still holds. After one warm-up call of each kind (caches fill then), every
    # further call must free each storage it allocated: the tracker sees that after a single call, not 1000.
    q, k, v = _qkv(64, h=2, e=8, grad=True)
    mask = (torch.rand(64, 64, generator=torch.Generator().manual_seed(0)) > 0.2).to(DEVICE)
    calls = [dict(tier=t, block_m=16, block_n=16) for t in (1, 2, 3)]
    calls += [dict(tier="auto", budget_bytes=64 * 1024), dict(tier=2, attn_mask=mask), dict(tier=1, dropout_p=0.2)]

    def run(kwargs, grad):
        with torch.set_grad_enabled(grad and kwargs["tier"] != 3):
            out = nc.scaled_dot_product_attention(q, k, v, **kwargs)
            if out.requires_grad:
                out.sum().backward()
        del out
        for t in (q, k, v):
            t.grad = None

    for kwargs in calls:
        for grad in (False, True):
            run(kwargs, grad)
    with LiveBytesTracker() as tracker, TierLog() as log:
        for kwargs in calls:
            for grad in (False, True):
                run(kwargs, grad)
                assert (tracker.live_bytes, tracker.live_storages) == (0, 0), (kwargs, grad, tracker)
    assert tracker.allocations == tracker.frees > 0
    assert 0 not in log.tiers, log.by_tier()
