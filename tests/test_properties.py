"""Property-based conformance: random shapes, masks, causal, GQA, Ev != E, tiers and block sizes.

Every example states the tier that ran (telemetry): a pinned tier must run, and "auto" runs under a budget one
byte below math SDPA's predicted peak, so that it runs one of our tiers rather than math against itself.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from noflash_core import scaled_dot_product_attention as sdpa
from tests.support.device import DEVICE
from tests.support.reference import assert_close_to_reference, math_sdpa
from tests.support.tiers import AUTO_TIERS, TierLog, budget_below_math


def _supported(dtype: torch.dtype) -> bool:
    return not (DEVICE.type == "mps" and dtype == torch.float64)  # MPS has no float64


SETTINGS = dict(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)


@st.composite
def problems(draw):
    batch = tuple(draw(st.lists(st.integers(1, 2), min_size=0, max_size=2)))
    hk = draw(st.integers(1, 3))
    gqa = draw(st.booleans())
    hq = hk * (draw(st.integers(1, 3)) if gqa else 1)
    length = draw(st.integers(1, 48))
    s = draw(st.integers(1, 48))
    e = draw(st.integers(1, 20))
    ev = draw(st.integers(1, 20))
    dtype = draw(st.sampled_from([t for t in (torch.float64, torch.float32, torch.bfloat16) if _supported(t)]))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(*batch, hq, length, e, generator=g, dtype=torch.float64).to(DEVICE, dtype)
    k = torch.randn(*batch, hk, s, e, generator=g, dtype=torch.float64).to(DEVICE, dtype)
    v = torch.randn(*batch, hk, s, ev, generator=g, dtype=torch.float64).to(DEVICE, dtype)
    kind = draw(st.sampled_from(["none", "causal", "bool", "float"]))
    kwargs = {"enable_gqa": gqa}
    if kind == "causal":
        kwargs["is_causal"] = True
    elif kind in ("bool", "float"):
        full = (*batch, hq, length, s)
        shape = tuple(d if draw(st.booleans()) else 1 for d in full)
        shape = shape[draw(st.integers(0, len(shape) - 1)):]  # fewer dims broadcast too
        keep = torch.rand(shape, generator=g) > draw(st.sampled_from([0.0, 0.3, 0.9, 1.0]))
        if kind == "bool":
            kwargs["attn_mask"] = keep.to(DEVICE)
        else:
            noise = torch.randn(shape, generator=g, dtype=torch.float64)
            kwargs["attn_mask"] = noise.masked_fill(~keep, float("-inf")).to(DEVICE, dtype)
    tier = draw(st.sampled_from([1, 2, 3, "auto"]))
    blocks = {} if tier == "auto" else {"block_m": draw(st.integers(1, 40)), "block_n": draw(st.integers(1, 40))}
    return q, k, v, kwargs, tier, blocks


def _ours(q, k, v, kwargs, tier, blocks, requires_grad=False):
    """Our output, and an assertion on the tier that ran."""
    if tier == "auto":
        blocks = {"budget_bytes": budget_below_math(q, k, v, kwargs.get("attn_mask"), kwargs.get("is_causal", False),
                                                    kwargs["enable_gqa"], requires_grad)}
    with TierLog() as log:
        out = sdpa(q, k, v, tier=tier, **blocks, **kwargs)
    ran = log.only_tier()
    if tier == "auto":
        AUTO_TIERS[ran] += 1
        assert ran in ((1, 2) if requires_grad else (1, 2, 3)), f"auto ran tier {ran} under a budget below math's"
    else:
        assert ran == tier, f"asked for tier {tier}, ran tier {ran}"
    return out


@settings(**SETTINGS)
@given(problems())
def test_forward_matches_torch(case):
    q, k, v, kwargs, tier, blocks = case
    assert_close_to_reference(_ours(q, k, v, kwargs, tier, blocks), q, k, v, **kwargs)


@settings(**{**SETTINGS, "max_examples": 40})
@given(problems())
def test_backward_matches_torch_in_float64(case):
    if DEVICE.type == "mps":
        pytest.skip("MPS has no float64")
    q, k, v, kwargs, tier, blocks = case
    if tier == 3:
        tier = 1
    q, k, v = (t.double().requires_grad_() for t in (q, k, v))
    mask = kwargs.get("attn_mask")
    if mask is not None and mask.dtype != torch.bool:
        kwargs["attn_mask"] = mask = mask.double().requires_grad_()
    inputs = [t for t in (q, k, v, mask) if t is not None and t.requires_grad]
    weights = torch.randn(*q.shape[:-1], v.shape[-1], dtype=torch.float64, device=DEVICE)
    ours = torch.autograd.grad((_ours(q, k, v, kwargs, tier, blocks, True) * weights).sum(), inputs)
    theirs = torch.autograd.grad((math_sdpa(q, k, v, **kwargs) * weights).sum(), inputs)
    for a, b in zip(ours, theirs):
        assert a.shape == b.shape
        assert (a - b).abs().max().item() <= 1e-9
