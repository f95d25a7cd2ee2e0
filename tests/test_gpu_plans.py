"""GPU-shaped plans, checked without a GPU: the real engine runs end to end on meta tensors under simulated GPU
profiles, while a dispatch mode counts launched ops and GEMM shapes and the live-bytes tracker measures the peak.

Targets for every workload (video, image, LLM prefill, text encoder):

* score GEMMs have at least 128 rows (``G * block_m``; or ``G * L`` when that is shorter): the planner chunks
  batch-head pairs, never rows, to fit its preferred step;
* at most 2 launched ops per GFLOP of attention work (``4 * B * Hq * L * S * D / 1e9``, halved for causal);
* the measured peak stays within the budget, and the planner's prediction bounds it (at most 1.5x above).

Also here: exactness of chunked batch-head pairs (forward, backward, masks, dropout) on real CPU tensors, and the
out-of-memory retry on meta tensors.
"""

from __future__ import annotations

import math

import pytest
import torch

import noflash_core as nf
from noflash_core import planner, telemetry
from noflash_core.attention_op import run_forward
from noflash_core.backward import attention_backward
from noflash_core.memory.tracker import LiveBytesTracker, MemoryBudget
from noflash_core.problem import build_problem
from noflash_core.tiles import DropoutSpec
from tests.support.ops import OpCounter
from tests.support.reference import assert_close_to_reference, math_sdpa

PROFILES = ["gfx906", "gfx1030"]

# name: (query shape, key/value shape, dtype, SDPA keyword arguments, key-padding mask)
WORKLOADS = {
    "wan21_14b_720p_self": ((1, 40, 75600, 128), (1, 40, 75600, 128), torch.float16, {}, False),
    "wan21_14b_720p_cross": ((1, 40, 75600, 128), (1, 40, 512, 128), torch.float16, {}, False),
    "wan22_5b_720p_self": ((1, 24, 27280, 128), (1, 24, 27280, 128), torch.float16, {}, False),
    "flux_1536_fp16": ((1, 24, 9728, 128), (1, 24, 9728, 128), torch.float16, {}, False),
    "flux_1536_bf16": ((1, 24, 9728, 128), (1, 24, 9728, 128), torch.bfloat16, {}, False),
    "llm_32k_causal_gqa": (
        (1, 28, 32768, 128), (1, 4, 32768, 128), torch.float16, {"is_causal": True, "enable_gqa": True}, False,
    ),
    "text_encoder_4096_padded": ((2, 32, 4096, 128), (2, 32, 4096, 128), torch.float16, {}, True),
}


def _gflop(q_shape, k_shape, causal: bool) -> float:
    b, hq, length, d = q_shape
    work = 4 * b * hq * length * k_shape[2] * d / 1e9
    return work / 2 if causal else work


def _records():
    seen = []
    return seen, telemetry.subscribe(seen.append)


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("name", sorted(WORKLOADS))
def test_gpu_workload_plan_shapes_ops_and_peak(profile, name):
    q_shape, k_shape, dtype, kwargs, padded = WORKLOADS[name]
    with nf.simulate_device(profile):
        q = torch.empty(q_shape, dtype=dtype, device="meta")
        k = torch.empty(k_shape, dtype=dtype, device="meta")
        mask = None
        if padded:
            mask = torch.empty(q_shape[0], 1, 1, k_shape[2], dtype=torch.bool, device="meta")
        plan = nf.plan(q, k, k, mask, **kwargs)
        counter = OpCounter()
        seen, unsubscribe = _records()
        try:
            with LiveBytesTracker() as tracker, counter:
                out = nf.scaled_dot_product_attention(q, k, k, mask, **kwargs)
                del out
        finally:
            unsubscribe()
    assert seen[-1].tier == plan.tier == 1, plan  # GPU order: tier 1 first, and it fits
    g = q_shape[1] // k_shape[1]
    assert counter.min_gemm_rows >= min(128, g * q_shape[2]), (plan, sorted(set(counter.gemms))[:4])
    gflop = _gflop(q_shape, k_shape, kwargs.get("is_causal", False))
    assert counter.launches <= 2 * gflop, (counter.launches, gflop, counter.by_op)
    assert counter.syncs == 0
    assert tracker.peak_bytes <= plan.budget_bytes
    assert tracker.peak_bytes <= plan.peak_bytes <= 1.5 * tracker.peak_bytes, (plan, tracker.peak_bytes)


def test_wan_14b_chunks_heads_not_rows():
    # The case that used to plan block_m=32 (4,726 bmm calls of 32 rows): now 128-row GEMMs over head chunks.
    with nf.simulate_device("gfx906"):
        q = torch.empty(1, 40, 75600, 128, dtype=torch.float16, device="meta")
        plan = nf.plan(q, q, q)
    assert plan.tier == 1 and plan.block_m >= 128 and 1 <= plan.block_h < 40, plan


def test_meta_forward_backward_runs_end_to_end():
    with nf.simulate_device("gfx1030"):
        q, k, v = (torch.empty(1, 24, 4096, 128, dtype=torch.float16, device="meta", requires_grad=True)
                   for _ in range(3))
        plan = nf.plan(q, k, v, is_causal=True)
        counter = OpCounter()
        with LiveBytesTracker() as tracker, counter:
            out = nf.scaled_dot_product_attention(q, k, v, is_causal=True)
            out.backward(torch.empty_like(out))
            del out
    assert q.grad.shape == q.shape and k.grad.device.type == "meta"
    assert counter.syncs == 0
    assert tracker.peak_bytes <= plan.peak_bytes <= 1.5 * tracker.peak_bytes, (plan, tracker.peak_bytes)


# ---------------------------------------------------------------------------------------------- OOM retry on meta


def test_oom_retry_on_meta_with_a_tight_allocator():
    with nf.simulate_device("gfx906"):
        q = torch.empty(1, 24, 8192, 128, dtype=torch.float16, device="meta")
        first = nf.plan(q, q, q)
        seen, unsubscribe = _records()
        try:
            with MemoryBudget(int(first.peak_bytes * 0.8)) as budget:
                out = nf.scaled_dot_product_attention(q, q, q)
        finally:
            unsubscribe()
    assert budget.ooms_raised >= 1
    assert out.shape == q.shape and out.device.type == "meta"
    used = seen[-1]
    assert (used.tier, used.block_m) != (first.tier, first.block_m) or used.reason != first.reason


def test_oom_retry_on_meta_from_a_failing_tier(monkeypatch):
    from noflash_core import attention_op

    real = attention_op.tier1_forward
    calls = []

    def flaky(problem, block_m, *args, **kwargs):
        calls.append(block_m)
        if len(calls) == 1:
            raise torch.OutOfMemoryError("simulated: HIP out of memory")
        return real(problem, block_m, *args, **kwargs)

    monkeypatch.setattr(attention_op, "tier1_forward", flaky)
    with nf.simulate_device("gfx906"):
        q = torch.empty(1, 24, 9728, 128, dtype=torch.float16, device="meta")
        out = nf.scaled_dot_product_attention(q, q, q)
    assert out.shape == q.shape and len(calls) >= 2


def test_gpu_plan_retries_shrink_batch_head_pairs_before_thin_rows():
    with nf.simulate_device("gfx906"):
        q = torch.empty(1, 40, 75600, 128, dtype=torch.float16, device="meta")
        problem = build_problem(q, q, q)
        cands = list(planner.candidate_plans(problem, 8 << 30, False, tiers=(1,)))
    rows_before_floor = [c.block_m for c in cands if c.block_h > 1 or c.block_h == 0]
    assert min(rows_before_floor) >= 128


# ---------------------------------------------------------------------------------------------- chunked pairs, exact


def _qkv(shape_q, shape_k, grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(shape_q, generator=g, dtype=torch.float64).requires_grad_(grad)
    k = torch.randn(shape_k, generator=g, dtype=torch.float64).requires_grad_(grad)
    v = torch.randn(shape_k, generator=g, dtype=torch.float64).requires_grad_(grad)
    return q, k, v


MASKS = {
    "none": None,
    "batch_rows": lambda: torch.rand(2, 1, 50, 70, generator=torch.Generator().manual_seed(2)) > 0.3,
    "heads": lambda: torch.randn(1, 3, 50, 70, generator=torch.Generator().manual_seed(3), dtype=torch.float64),
    "key_padding": lambda: torch.arange(70).view(1, 1, 1, 70).expand(2, 3, 1, 70) < torch.tensor([60, 45]).view(
        2, 1, 1, 1),
}


@pytest.mark.parametrize("block_h", [1, 2, 3])
@pytest.mark.parametrize("tier", [1, 2])
@pytest.mark.parametrize("mask", sorted(MASKS))
def test_chunked_pairs_forward_and_backward_are_exact(tier, block_h, mask):
    q, k, v = _qkv((2, 3, 50, 16), (2, 3, 70, 16))
    m = MASKS[mask]() if MASKS[mask] else None
    problem = build_problem(q, k, v, m)
    out, lse = run_forward(problem, tier, 16, 32, None, True, block_h)
    assert_close_to_reference(out.reshape(2, 3, 50, 16), q, k, v, m)
    whole, whole_lse = run_forward(problem, tier, 16, 32, None, True, 0)
    assert torch.equal(lse, whole_lse)
    grad_out = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(5))
    chunked = attention_backward(problem, out, lse, grad_out, 16, 32, block_h=block_h)
    reference = attention_backward(problem, whole, whole_lse, grad_out, 16, 32, block_h=0)
    for a, b in zip(chunked[:3], reference[:3]):
        assert (a - b).abs().max().item() <= 1e-12


def test_chunked_pairs_dropout_matches_unchunked():
    q, k, v = _qkv((2, 4, 40, 8), (2, 2, 60, 8))
    problem = build_problem(q, k, v, None, True, None, True)
    spec = DropoutSpec(0.3, 1234)
    a, _ = run_forward(problem, 2, 16, 16, spec, True, 0)
    for tier, block_h in ((2, 1), (2, 3), (1, 1), (1, 2)):
        b, _ = run_forward(problem, tier, 16, 16, spec, True, block_h)
        assert torch.allclose(a, b, atol=1e-12, rtol=0), (tier, block_h)


def test_planned_head_chunks_run_through_autograd(monkeypatch):
    # A tiny preferred step makes the CPU planner chunk pairs; forward and backward go through the registered op.
    monkeypatch.setitem(planner._PREFERRED["cpu"], 2, 4096)
    q, k, v = _qkv((2, 3, 64, 16), (2, 3, 80, 16), grad=True)
    m = torch.randn(2, 1, 64, 80, dtype=torch.float64, requires_grad=True)
    p = nf.plan(q, k, v, m, tier=2)
    assert 0 < p.block_h < 6, p
    out = nf.scaled_dot_product_attention(q, k, v, m, tier=2)
    weights = torch.randn(out.shape, dtype=torch.float64)
    ours = torch.autograd.grad((out * weights).sum(), (q, k, v, m))
    theirs = torch.autograd.grad((math_sdpa(q, k, v, m) * weights).sum(), (q, k, v, m))
    for a, b in zip(ours, theirs):
        assert (a - b).abs().max().item() <= 1e-9


def test_causal_skips_hidden_work():
    # Causal attention multiplies about half the keys: count the GEMM work of tiers 1, 2 and 3 and the backward.
    q, k, v = _qkv((1, 2, 512, 16), (1, 2, 512, 16), grad=True)
    full = 2 * 2 * 512 * 512 * 16  # QK^T and PV multiply-adds, both heads

    def work(fn, *args):
        counter = OpCounter()
        with counter:
            fn(*args)
        return sum(batch * rows * inner * cols for _, batch, rows, inner, cols in counter.gemms)

    def forward(tier):
        with torch.no_grad():
            return nf.scaled_dot_product_attention(q, k, v, is_causal=True, tier=tier, block_m=32, block_n=32)

    for tier in (1, 2, 3):
        done = work(forward, tier)
        assert done <= 0.56 * full, (tier, done / full)
    for tier in (1, 2):
        out = nf.scaled_dot_product_attention(q, k, v, is_causal=True, tier=tier, block_m=32, block_n=32)
        done = work(out.sum().backward)
        assert done <= 0.56 * 2 * full, (tier, done / (2 * full))  # backward: 4 GEMMs per tile
        q.grad = k.grad = v.grad = None
    assert math.isclose(full, 16777216)
