"""Forward conformance of every tier against torch's math SDPA and a float64 reference.

Small blocks (block_m=16, block_n=32) force many tiles, partial last tiles and tile skipping. Every call states the
tier that ran (telemetry): a pinned column must run its tier, and the ``"auto"`` column runs under a budget one byte
below math SDPA's predicted peak, so that it must run one of our tiers and never compares math with itself.
``test_auto_beyond_the_fast_path`` runs "auto" with the default budget at a size past the fast path, and
``test_auto_fast_path_is_torch_math`` keeps the two problems that are meant to go to torch (tier 0).
Tensors live on ``NOFLASH_TEST_DEVICE`` (default cpu).
"""

from __future__ import annotations

import math

import pytest
import torch

from noflash_core import scaled_dot_product_attention as sdpa
from tests.support.device import DEVICE, skip_unless_supported
from tests.support.reference import assert_close_to_reference, math_sdpa
from tests.support.tiers import AUTO_TIERS, budget_below_math, run_sdpa

TIERS = [1, 2, 3, "auto"]
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
BLOCKS = dict(block_m=16, block_n=32)


def _run(tier, q, k, v, attn_mask=None, **kwargs):
    """One column of the matrix. Asserts which tier ran: the pinned one, or for "auto" a tiled one."""
    if tier != "auto":
        out, ran = run_sdpa(q, k, v, attn_mask, tier=tier, **BLOCKS, **kwargs)
        assert ran == tier, f"asked for tier {tier}, ran tier {ran}"
        return out
    budget = budget_below_math(q, k, v, attn_mask, kwargs.get("is_causal", False), kwargs.get("enable_gqa", False))
    out, ran = run_sdpa(q, k, v, attn_mask, tier="auto", budget_bytes=budget, **kwargs)
    AUTO_TIERS[ran] += 1
    assert ran in (1, 2, 3), f"auto ran tier {ran} under a budget below math's peak: math compared with itself"
    return out


def _qkv(shape_q, shape_k, ev=None, dtype=torch.float32, seed=0):
    skip_unless_supported(dtype)
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(shape_q, generator=g, dtype=torch.float64).to(DEVICE, dtype)
    k = torch.randn(shape_k, generator=g, dtype=torch.float64).to(DEVICE, dtype)
    shape_v = tuple(shape_k[:-1]) + ((ev if ev is not None else shape_k[-1]),)
    v = torch.randn(shape_v, generator=g, dtype=torch.float64).to(DEVICE, dtype)
    return q, k, v


@pytest.mark.parametrize("tier", TIERS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_basic_shapes(tier, dtype):
    q, k, v = _qkv((2, 3, 70, 24), (2, 3, 90, 24), ev=40, dtype=dtype)
    assert_close_to_reference(_run(tier, q, k, v), q, k, v)


@pytest.mark.parametrize("tier", TIERS)
@pytest.mark.parametrize(
    "shape_q,shape_k",
    [
        ((50, 16), (70, 16)),  # 2-D
        ((3, 50, 16), (3, 70, 16)),  # 3-D
        ((2, 2, 3, 50, 16), (2, 2, 3, 70, 16)),  # 5-D: two batch dims
        ((2, 2, 2, 3, 50, 16), (2, 2, 2, 3, 70, 16)),  # 6-D
        ((2, 3, 50, 16), (3, 70, 16)),  # rank mismatch: key broadcasts over batch
        ((2, 3, 50, 16), (1, 3, 70, 16)),  # size-1 batch broadcast
        ((2, 4, 50, 16), (2, 1, 70, 16)),  # one key head broadcast over query heads
        ((1, 1, 1, 16), (1, 1, 70, 16)),  # decode, L=1
        ((1, 2, 70, 16), (1, 2, 1, 16)),  # S=1
    ],
)
def test_batch_dims_and_broadcast(tier, shape_q, shape_k):
    q, k, v = _qkv(shape_q, shape_k, dtype=torch.float64)
    assert_close_to_reference(_run(tier, q, k, v), q, k, v)


@pytest.mark.parametrize("tier", TIERS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lq,lk", [(70, 70), (40, 90), (90, 40), (1, 33), (33, 1)])
def test_causal_top_left(tier, dtype, lq, lk):
    q, k, v = _qkv((2, 2, lq, 16), (2, 2, lk, 16), dtype=dtype)
    assert_close_to_reference(_run(tier, q, k, v, is_causal=True), q, k, v, is_causal=True)


MASK_SHAPES = [
    (90,),
    (1, 90),
    (70, 90),
    (2, 1, 1, 90),
    (2, 1, 70, 90),
    (2, 3, 70, 90),
    (2, 3, 1, 90),
    (3, 70, 90),
    (1, 1, 1, 1),
    (2, 1, 70, 1),
]


def _mask(shape, kind, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    if kind == "bool":
        return (torch.rand(shape, generator=g) > 0.3).to(DEVICE)
    m = torch.randn(shape, generator=g, dtype=torch.float64) * 2
    m = m.masked_fill(torch.rand(shape, generator=g) < 0.2, float("-inf"))
    return m.to(DEVICE, dtype)


@pytest.mark.parametrize("tier", TIERS)
@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("shape", MASK_SHAPES, ids=str)
def test_mask_broadcast_shapes(tier, kind, shape):
    q, k, v = _qkv((2, 3, 70, 16), (2, 3, 90, 16), dtype=torch.float32)
    m = _mask(shape, kind, torch.float32)
    assert_close_to_reference(_run(tier, q, k, v, m), q, k, v, m)


@pytest.mark.parametrize("tier", TIERS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_fully_masked_rows_give_zero(tier, dtype, kind):
    q, k, v = _qkv((2, 2, 40, 16), (2, 2, 70, 16), dtype=dtype)
    keep = (torch.rand(2, 1, 40, 70, generator=torch.Generator().manual_seed(3)) > 0.5).to(DEVICE)
    keep[:, :, ::3] = False  # every third query row sees nothing
    keep[1] = False  # a whole batch item sees nothing
    m = keep if kind == "bool" else torch.zeros_like(keep, dtype=dtype).masked_fill(~keep, float("-inf"))
    out = _run(tier, q, k, v, m)
    assert torch.isfinite(out).all()
    assert (out[:, :, ::3] == 0).all() and (out[1] == 0).all()
    assert_close_to_reference(out, q, k, v, m)


@pytest.mark.parametrize("tier", TIERS)
def test_mask_with_large_negative_values(tier):
    # LTXV-style masks use -finfo.max instead of -inf; masked values of V must not leak.
    q, k, v = _qkv((1, 2, 40, 16), (1, 2, 64, 16), dtype=torch.float32)
    m = torch.zeros(1, 1, 1, 64, device=DEVICE)
    m[..., 32:] = -torch.finfo(torch.float32).max
    v = v.clone()
    v[..., 32:, :] = 1e4
    assert_close_to_reference(_run(tier, q, k, v, m), q, k, v, m)


@pytest.mark.parametrize("tier", TIERS)
@pytest.mark.parametrize("hq,hk,hv", [(6, 2, 2), (6, 3, 3), (4, 1, 1), (4, 4, 4), (8, 4, 2)])
def test_gqa(tier, hq, hk, hv):
    g = torch.Generator().manual_seed(5)
    skip_unless_supported(torch.float64)
    q = torch.randn(2, hq, 50, 16, generator=g, dtype=torch.float64).to(DEVICE)
    k = torch.randn(2, hk, 70, 16, generator=g, dtype=torch.float64).to(DEVICE)
    v = torch.randn(2, hv, 70, 12, generator=g, dtype=torch.float64).to(DEVICE)
    m = (torch.rand(2, hq, 50, 70, generator=g) > 0.3).to(DEVICE)
    for kw in (dict(), dict(is_causal=True), dict(attn_mask=m)):
        assert_close_to_reference(_run(tier, q, k, v, enable_gqa=True, **kw), q, k, v, enable_gqa=True, **kw)


@pytest.mark.parametrize("tier", TIERS)
@pytest.mark.parametrize("scale", [0.0, 0.05, 1.0, -0.3])
def test_explicit_scale(tier, scale):
    q, k, v = _qkv((1, 2, 40, 16), (1, 2, 50, 16), dtype=torch.float64)
    assert_close_to_reference(_run(tier, q, k, v, scale=scale), q, k, v, scale=scale)


@pytest.mark.parametrize("tier", TIERS)
def test_large_scores_in_half_precision(tier):
    # Scores far beyond fp16's range: math keeps fp32 scores, and so must we (no inf/NaN from a cast).
    q, k, v = _qkv((1, 2, 40, 64), (1, 2, 50, 64), dtype=torch.float32)
    for dtype in (torch.bfloat16, torch.float16):
        qq, kk, vv = (q * 30).to(dtype), (k * 30).to(dtype), v.to(dtype)
        out = _run(tier, qq, kk, vv)
        assert torch.isfinite(out).all()
        assert_close_to_reference(out, qq, kk, vv)


@pytest.mark.parametrize("tier", TIERS)
def test_inputs_not_modified(tier):
    q, k, v = _qkv((2, 2, 40, 16), (2, 2, 50, 16))
    m = torch.randn(2, 1, 40, 50, device=DEVICE)
    before = [t.clone() for t in (q, k, v, m)]
    _run(tier, q, k, v, m)
    for a, b in zip(before, (q, k, v, m)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("tier", TIERS)
def test_non_contiguous_inputs(tier):
    q, k, v = _qkv((2, 40, 3, 16), (2, 50, 3, 16))
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, N, E) views of (B, N, H, E)
    assert not q.is_contiguous()
    assert_close_to_reference(_run(tier, q, k, v), q, k, v)


def test_autocast_matches_torch():
    q, k, v = _qkv((1, 2, 64, 32), (1, 2, 64, 32))
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        ours = sdpa(q, k, v, tier=2, block_m=16, block_n=32)
        theirs = math_sdpa(q, k, v)
        if DEVICE.type != "mps":
            assert sdpa(q.double(), k.double(), v.double(), tier=2).dtype == torch.float64  # autocast leaves fp64
    assert ours.dtype == theirs.dtype == torch.bfloat16
    assert_close_to_reference(ours, q.bfloat16(), k.bfloat16(), v.bfloat16())


def test_dropout_zero_equals_no_dropout():
    q, k, v = _qkv((1, 2, 40, 16), (1, 2, 50, 16), dtype=torch.float64)
    for tier in (1, 2, 3):
        assert torch.equal(_run(tier, q, k, v, dropout_p=0.0), _run(tier, q, k, v))


@pytest.mark.parametrize("tier", [1, 2, 3])
def test_dropout_one_gives_zero(tier):
    q, k, v = _qkv((1, 2, 40, 16), (1, 2, 50, 16))
    zeros = torch.zeros(1, 2, 40, 16, device=DEVICE)
    assert torch.equal(_run(tier, q, k, v, dropout_p=1.0), zeros)
    assert torch.equal(math_sdpa(q, k, v, dropout_p=1.0), zeros)


@pytest.mark.parametrize("tier", [1, 2, 3])
def test_dropout_same_seed_same_output_and_tiling_independent(tier):
    q, k, v = _qkv((1, 2, 40, 16), (1, 2, 50, 16), dtype=torch.float64)
    torch.manual_seed(7)
    a = _run(tier, q, k, v, dropout_p=0.3)
    torch.manual_seed(7)
    b = sdpa(q, k, v, dropout_p=0.3, tier=tier, block_m=8, block_n=16)
    torch.manual_seed(8)
    c = _run(tier, q, k, v, dropout_p=0.3)
    assert torch.allclose(a, b, atol=1e-12, rtol=0)
    assert not torch.allclose(a, c)
    for other in (1, 2, 3):  # every tier draws the same mask from the same seed
        torch.manual_seed(7)
        assert torch.allclose(sdpa(q, k, v, dropout_p=0.3, tier=other, block_m=16, block_n=32), a, atol=1e-12, rtol=0)


def test_dropout_distribution():
    # With V = identity the output rows are the dropped attention weights themselves.
    s = 64
    q, k, _ = _qkv((1, 4, 48, s), (1, 4, s, s), dtype=torch.float64)
    v = torch.eye(s, dtype=torch.float64, device=DEVICE).expand(1, 4, s, s)
    p = 0.25
    probs = math_sdpa(q, k, v)
    torch.manual_seed(0)
    total = torch.zeros_like(probs)
    runs = 200
    zero_frac = []
    for _ in range(runs):
        out = sdpa(q, k, v, dropout_p=p, tier=2, block_m=16, block_n=32)
        kept = out != 0
        zero_frac.append(1.0 - kept.double().mean().item())
        # Kept weights are rescaled by exactly 1/(1-p).
        assert torch.allclose(out[kept], probs[kept] / (1 - p), rtol=1e-12, atol=0)
        total += out
    n = probs.numel()
    frac = sum(zero_frac) / runs
    assert abs(frac - p) < 4 * math.sqrt(p * (1 - p) / (n * runs))
    mean = total / runs
    # E[out] = no-dropout output; the std error of the mean of one weight is w*sqrt(p/(1-p)/runs).
    stderr = probs * math.sqrt(p / (1 - p) / runs)
    assert ((mean - probs).abs() <= 5 * stderr + 1e-12).double().mean() > 0.999


def test_dropout_negative_is_no_dropout():
    q, k, v = _qkv((1, 2, 40, 16), (1, 2, 50, 16), dtype=torch.float64)
    assert_close_to_reference(sdpa(q, k, v, dropout_p=-0.1, tier=2), q, k, v)


@pytest.mark.parametrize("tier", [1, 2, 3])  # "auto" sends an empty query to torch: there is nothing to tile
def test_empty_sequences(tier):
    q, k, v = _qkv((1, 2, 0, 16), (1, 2, 5, 16))
    assert _run(tier, q, k, v).shape == (1, 2, 0, 16)


@pytest.mark.parametrize("tier", TIERS)
@pytest.mark.parametrize("is_causal", [False, True])
def test_no_keys_gives_zero(tier, is_causal):
    q, k, v = _qkv((2, 3, 20, 8), (2, 3, 0, 8), dtype=torch.float64)
    out = _run(tier, q, k, v, is_causal=is_causal)
    assert torch.equal(out, math_sdpa(q, k, v, is_causal=is_causal))


@pytest.mark.parametrize("tier", TIERS)
def test_nan_and_inf_inputs_propagate_like_math(tier):
    # torch's fused CPU kernel returns 0 here; the math backend (our reference) returns NaN.
    _, k, v = _qkv((1, 1, 3, 4), (1, 1, 6, 4), dtype=torch.float64)
    for fill in (float("nan"), float("inf")):
        q = torch.full((1, 1, 3, 4), fill, dtype=torch.float64, device=DEVICE)
        out = _run(tier, q, k, v)
        assert torch.isnan(out).all() and torch.isnan(math_sdpa(q, k, v)).all()


@pytest.mark.parametrize("tier", TIERS)
def test_masks_mixing_broadcast_and_full_batch_dims(tier):
    q, k, v = _qkv((2, 3, 4, 20, 8), (2, 3, 4, 30, 8), dtype=torch.float64)
    masks = (torch.rand(2, 1, 4, 20, 30) > 0.3, torch.randn(1, 3, 1, 20, 30, dtype=torch.float64))
    for m in (m.to(DEVICE) for m in masks):
        assert_close_to_reference(_run(tier, q, k, v, m), q, k, v, m)


# ---- "auto" past the fast path, and the fast path itself --------------------------------------------------------


BEYOND = ((1, 4, 768, 32), (1, 4, 768, 32))
"""Past the fast path with the default budget: 4 x 768 x 768 fp32 scores are 9 MiB, above its 8 MiB."""


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variant", ["none", "causal", "bool", "float", "gqa"])
def test_auto_beyond_the_fast_path(dtype, variant):
    shape_q, shape_k = BEYOND
    if variant == "gqa":
        shape_k = (1, 2, 768, 32)
    q, k, v = _qkv(shape_q, shape_k, dtype=dtype)
    kwargs = {"is_causal": variant == "causal", "enable_gqa": variant == "gqa"}
    mask = {"bool": _mask((1, 768, 768), "bool", dtype), "float": _mask((768, 768), "float", dtype)}.get(variant)
    out, ran = run_sdpa(q, k, v, mask, **kwargs)
    AUTO_TIERS[ran] += 1
    assert ran in (1, 2, 3), f"auto ran tier {ran} past the fast path"
    assert_close_to_reference(out, q, k, v, mask, **kwargs)


@pytest.mark.parametrize("shape_q,shape_k", [((1, 4, 1, 32), (1, 4, 512, 32)), ((2, 3, 70, 24), (2, 3, 90, 24))],
                         ids=["decode", "trivially_small"])
def test_auto_fast_path_is_torch_math(shape_q, shape_k):
    q, k, v = _qkv(shape_q, shape_k)
    out, ran = run_sdpa(q, k, v)
    assert ran == 0, f"a {shape_q} x {shape_k} problem should go to torch's math SDPA, ran tier {ran}"
    assert torch.equal(out, math_sdpa(q, k, v))
