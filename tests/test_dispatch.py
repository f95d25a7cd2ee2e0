"""The one dispatch path, ``noflash_core.attention``: the plan it returns is the plan that ran, cached plans follow
budget and grad, errors are raised on every call, the lse comes from the same path, and the global patch's
pass-through calls are reported as such."""

from __future__ import annotations

import pytest
import torch

import noflash_core as nc
from noflash_core import telemetry
from noflash_core.dispatch import plan_attention
from tests.support.reference import math_sdpa


def _recorded(fn):
    seen = []
    unsubscribe = telemetry.subscribe(seen.append)
    try:
        out = fn()
    finally:
        unsubscribe()
    return out, seen


def test_returned_plan_is_the_one_reported_and_planned():
    q, k, v = (torch.randn(1, 4, 512, 32) for _ in range(3))
    (out, lse, used), seen = _recorded(lambda: nc.attention(q, k, v, budget_bytes=1 << 20))
    assert lse is None and used.tier in (1, 2, 3) and used == nc.plan(q, k, v, budget_bytes=1 << 20)
    assert [(r.path, r.tier, r.block_m, r.block_n) for r in seen] == [("noflash", used.tier, used.block_m,
                                                                       used.block_n)]
    assert (seen[0].batch, seen[0].heads, seen[0].q_len, seen[0].kv_len, seen[0].head_dim) == (1, 4, 512, 512, 32)
    torch.testing.assert_close(out, math_sdpa(q, k, v), atol=2e-6, rtol=2e-5)


def test_cached_plan_follows_the_budget_source_and_grad(monkeypatch):
    q, k, v = (torch.randn(1, 4, 512, 32) for _ in range(3))

    def tier_run(**kw):
        _, seen = _recorded(lambda: nc.scaled_dot_product_attention(q, k, v, **kw).sum().backward()
                            if q.requires_grad else nc.scaled_dot_product_attention(q, k, v, **kw))
        return seen[-1].tier

    monkeypatch.delenv("NOFLASH_BUDGET_MB", raising=False)
    assert tier_run() == 0  # 4 MiB of scores: trivially small for the 256 MiB CPU default
    monkeypatch.setenv("NOFLASH_BUDGET_MB", "0.5")
    assert tier_run() == nc.plan(q, k, v).tier != 0
    monkeypatch.delenv("NOFLASH_BUDGET_MB")
    assert tier_run() == 0
    assert tier_run(budget_bytes=1 << 19) == nc.plan(q, k, v, budget_bytes=1 << 19).tier != 0
    q.requires_grad_()
    grad_plan = nc.plan(q, k, v, budget_bytes=1 << 19)
    assert grad_plan.requires_grad and tier_run(budget_bytes=1 << 19) == grad_plan.tier
    assert q.grad is not None


@pytest.mark.parametrize("tier", ["auto", 2])
def test_errors_are_raised_on_every_call_after_a_cached_one(tier):
    q, k, v = (torch.randn(2, 4, 8, 16) for _ in range(3))
    mask = torch.ones(8, 8, dtype=torch.bool)
    nc.scaled_dot_product_attention(q, k, v, mask, tier=tier)  # cached signature
    for _ in range(2):
        with pytest.raises(RuntimeError, match="is_causal"):
            nc.scaled_dot_product_attention(q, k, v, mask, is_causal=True, tier=tier)
        with pytest.raises(RuntimeError, match="dtype"):
            nc.scaled_dot_product_attention(q, k.double(), v, mask, tier=tier)


def test_tier3_under_grad_is_refused_by_one_message():
    q = torch.randn(1, 2, 64, 16, requires_grad=True)
    with pytest.raises(RuntimeError, match="inference-only") as first:
        nc.scaled_dot_product_attention(q, q, q, tier=3)
    from noflash_core.problem import tier3_grad_error

    assert str(first.value) == str(tier3_grad_error())


def test_patch_passthrough_below_threshold_is_reported_as_torch():
    q, k, v = (torch.randn(1, 2, 32, 16) for _ in range(3))
    with nc.patched(threshold=64):
        out, seen = _recorded(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))
    assert [(r.path, r.tier) for r in seen] == [("torch", 0)] and "threshold 64" in seen[0].reason
    torch.testing.assert_close(out, math_sdpa(q, k, v))


def test_lse_comes_from_the_same_path_and_plan():
    q, k, v = (torch.randn(1, 4, 512, 32, dtype=torch.float64) for _ in range(3))
    (out, lse, used), seen = _recorded(lambda: nc.attention(q, k, v, budget_bytes=1 << 20, return_lse=True))
    assert used.tier in (1, 2) and used == nc.plan(q, k, v, budget_bytes=1 << 20, return_lse=True)
    assert [(r.tier, r.block_m, r.block_n) for r in seen] == [(used.tier, used.block_m, used.block_n)]
    scores = q @ k.transpose(-1, -2) / 32**0.5
    torch.testing.assert_close(lse, scores.logsumexp(-1))
    torch.testing.assert_close(out, math_sdpa(q, k, v))
    assert nc.attention(q, k, v, return_lse=True).plan.tier != 0  # never torch's SDPA: it has no lse
    with pytest.raises(RuntimeError, match="nested"):
        nested = torch.nested.nested_tensor([torch.randn(2, 5, 8), torch.randn(2, 7, 8)], layout=torch.jagged)
        nc.attention(nested, nested, nested, return_lse=True)


def test_plan_attention_is_the_plan_the_call_reuses():
    q, k, v = (torch.randn(1, 2, 300, 16) for _ in range(3))
    nc.clear_caches()
    planned = plan_attention(q, k, v, budget_bytes=3 << 19, tier=2)
    result = nc.attention(q, k, v, budget_bytes=3 << 19, tier=2)
    assert result.plan is planned  # one planning for the VAE's look-ahead and its call
    assert plan_attention(q, k, v, budget_bytes=3 << 19, tier=2, requires_grad=True) is not planned
