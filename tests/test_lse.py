"""attention_with_lse: the output and the row log-sum-exp against float64 references, and gradients through both."""

from __future__ import annotations

import math

import pytest
import torch

import noflash_core
from noflash_core import attention_with_lse
from noflash_core.planner import plan_problem
from noflash_core.problem import build_problem
from tests.support.reference import assert_close_to_reference, tolerance

CASES = {
    "plain": dict(q=(2, 3, 37, 16), kv=(2, 3, 45, 16), ev=16),
    "causal": dict(q=(2, 3, 37, 16), kv=(2, 3, 45, 16), ev=16, is_causal=True),
    "gqa_ev": dict(q=(1, 4, 29, 8), kv=(1, 2, 31, 8), ev=12, enable_gqa=True),
    "bool_mask": dict(q=(2, 2, 21, 8), kv=(2, 2, 26, 8), ev=8, mask="bool"),
    "float_mask": dict(q=(2, 2, 21, 8), kv=(2, 2, 26, 8), ev=8, mask="float"),
    "no_batch": dict(q=(3, 19, 8), kv=(3, 23, 8), ev=6),
}


def _inputs(case, dtype, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(case["q"], generator=g, dtype=torch.float64).to(dtype)
    k = torch.randn(case["kv"], generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn((*case["kv"][:-1], case["ev"]), generator=g, dtype=torch.float64).to(dtype)
    mask = None
    length, s = case["q"][-2], case["kv"][-2]
    if case.get("mask") == "bool":
        mask = torch.rand(length, s, generator=g) > 0.3
        mask[:, 0] = True
    elif case.get("mask") == "float":
        mask = torch.randn(length, s, generator=g, dtype=torch.float64).to(dtype)
    for t in (q, k, v):
        t.requires_grad_(requires_grad)
    kwargs = {"is_causal": case.get("is_causal", False), "enable_gqa": case.get("enable_gqa", False)}
    return q, k, v, mask, kwargs


def _lse_f64(q, k, v, mask, is_causal=False, enable_gqa=False, dtype=torch.float64):
    """The log-sum-exp of the scaled scores, computed the textbook way in ``dtype``."""
    q, k = q.detach().to(dtype), k.detach().to(dtype)
    if enable_gqa:
        k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if is_causal:
        scores = scores.masked_fill(~torch.ones(scores.shape[-2:], dtype=torch.bool).tril(), float("-inf"))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.to(dtype)
    return scores.logsumexp(-1)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", sorted(CASES))
def test_forward_matches_reference(name, dtype):
    q, k, v, mask, kw = _inputs(CASES[name], dtype)
    out, lse = attention_with_lse(q, k, v, mask, **kw)
    assert_close_to_reference(out, q, k, v, mask, **kw)
    truth = _lse_f64(q, k, v, mask, **kw)
    assert lse.shape == truth.shape == out.shape[:-1]
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    err = (lse.double() - truth).abs().max().item()
    # The lse's own "math" error: the same formula evaluated in the input dtype.
    tol = tolerance(_lse_f64(q, k, v, mask, dtype=dtype, **kw), truth)
    assert err <= tol, (err, tol)


def test_fully_masked_rows_give_minus_inf_and_zero_output():
    q, k, v, _, _ = _inputs(CASES["bool_mask"], torch.float64, requires_grad=True)
    mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool)
    mask[3] = False
    out, lse = attention_with_lse(q, k, v, mask)
    assert torch.isneginf(lse[..., 3]).all() and torch.isfinite(lse[..., :3]).all()
    assert (out[..., 3, :] == 0).all()
    (out.sum() + lse[..., :3].sum()).backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
    assert (q.grad[..., 3, :] == 0).all()


@pytest.mark.parametrize("name", ["plain", "causal", "gqa_ev", "bool_mask", "float_mask"])
def test_gradcheck_through_out_and_lse(name):
    case = dict(CASES[name])
    case["q"] = (*case["q"][:-2], 5, case["q"][-1] // 2)
    case["kv"] = (*case["kv"][:-2], 7, case["kv"][-1] // 2)
    case["ev"] = 3
    q, k, v, mask, kw = _inputs(case, torch.float64, requires_grad=True)
    if mask is not None:
        mask = mask[:5, :7]
        if mask.dtype != torch.bool:
            mask.requires_grad_(True)

    def fn(q, k, v, mask):
        out, lse = attention_with_lse(q, k, v, mask, **kw)
        return out, lse

    assert torch.autograd.gradcheck(fn, (q, k, v, mask))


@pytest.mark.parametrize("name", ["causal", "gqa_ev"])
def test_fp32_gradients_of_a_loss_using_lse(name):
    """fp32 gradients of ``sum(out * w) + sum(lse * u)`` against float64, tolerance from float32 math's error."""
    q, k, v, mask, kw = _inputs(CASES[name], torch.float32, requires_grad=True)
    g = torch.Generator().manual_seed(1)

    def loss_of(out, lse):
        w = torch.randn(out.shape, generator=g.manual_seed(1), dtype=torch.float64).to(out.dtype)
        u = torch.randn(lse.shape, generator=g.manual_seed(2), dtype=torch.float64).to(lse.dtype)
        return (out * w).sum() + (lse * u).sum()

    def reference(dtype):
        leaves = [t.detach().to(dtype).requires_grad_(True) for t in (q, k, v)]
        qq, kk, vv = leaves
        if kw["enable_gqa"]:
            rep = qq.shape[-3] // kk.shape[-3]
            kk, vv = kk.repeat_interleave(rep, -3), vv.repeat_interleave(rep, -3)
        scores = qq @ kk.transpose(-1, -2) / math.sqrt(qq.shape[-1])
        if kw["is_causal"]:
            scores = scores.masked_fill(~torch.ones(scores.shape[-2:], dtype=torch.bool).tril(), float("-inf"))
        loss_of(torch.softmax(scores, -1) @ vv, scores.logsumexp(-1)).backward()
        return [t.grad for t in leaves]

    loss_of(*attention_with_lse(q, k, v, mask, **kw)).backward()
    truth, math32 = reference(torch.float64), reference(torch.float32)
    for ours, exact, m32 in zip((q.grad, k.grad, v.grad), truth, math32):
        err = (ours.double() - exact).abs().max().item()
        tol = tolerance(m32, exact)
        assert err <= tol, (err, tol)


def test_plan_uses_a_tier_with_lse():
    """The lse needs tier 1 or 2: never torch's SDPA (tier 0) nor the in-place tier 3, small or large."""
    for length in (8, 4096):
        q = torch.empty(1, 8, length, 64, device="meta")
        problem = build_problem(q, q, q)
        for grad in (False, True):
            assert plan_problem(problem, requires_grad=grad, need_lse=True).tier in (1, 2)
        assert noflash_core.plan(q, q, q, return_lse=True).tier in (1, 2)
    with pytest.raises(ValueError, match="no log-sum-exp"):
        noflash_core.attention(torch.randn(1, 2, 8, 4), *[torch.randn(1, 2, 8, 4)] * 2, tier=3, return_lse=True)


def test_public_and_errors_like_sdpa():
    assert "attention_with_lse" in noflash_core.__all__
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(RuntimeError, match="same dtype"):
        attention_with_lse(q, q.double(), q)
    with pytest.raises(RuntimeError, match="is_causal"):
        attention_with_lse(q, q, q, torch.ones(4, 4, dtype=torch.bool), is_causal=True)
