"""The ComfyUI attention override on plain tensors, against a reference of ComfyUI's ``attention_pytorch``.

No ComfyUI needed: ``_comfy_attention_pytorch`` below re-states what ComfyUI's ``attention_pytorch`` does with a
call (layouts, heads, mask ranks, output layout), computed with torch's own SDPA. The override must give the same
result on every call form ComfyUI's models use, within the tolerance derived from torch's own error against a
float64 run of that reference.

Every computed call states its tier (the override's recorder). The overrides under test get a budget of
:data:`BUDGET`, below math SDPA's peak for every call here, so that "auto" runs one of our tiers and never
compares torch with itself. ComfyUI's ``ModelPatcher.clone()`` deep copy is tested in a real ComfyUI
(``tests/comfy/test_comfyui_models.py``).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from noflash_core.comfy.memory import comfy_budget_bytes, efficient_memory_required, planned_memory
from noflash_core.comfy.override import (
    OverrideConfig,
    is_noflash_override,
    make_attention_override,
    normalize_comfy_mask,
    override_config,
    override_name,
    override_previous,
    override_recorder,
    rebuild_override,
)
from noflash_core.memory.tracker import LiveBytesTracker
from noflash_core.telemetry import CallRecord
from tests.support.reference import tolerance

TORCH_SDPA = F.scaled_dot_product_attention

BUDGET = 4 * 1024
"""Bytes: below math SDPA's peak for every call in this file, so "auto" must tile."""


def _comfy_attention_pytorch(q, k, v, heads, mask=None, skip_reshape=False, skip_output_reshape=False, scale=None,
                             enable_gqa=False):
    """Reference: ComfyUI's ``attention_pytorch`` semantics (0.33's ``scale``/``enable_gqa`` keywords included),
    computed with torch's SDPA. Under ``enable_gqa`` in the ``(b, n, h*d)`` layout, k and v have
    ``width // d`` heads, ``d`` being q's head dim (ComfyUI's ``_reshape_qkv_to_heads``)."""
    b = q.shape[0]
    if not skip_reshape:
        d = q.shape[2] // heads
        q = q.reshape(b, q.shape[1], heads, d).transpose(1, 2)
        if enable_gqa:
            k, v = (t.reshape(b, t.shape[1], t.shape[2] // d, d).transpose(1, 2) for t in (k, v))
        else:
            k, v = (t.reshape(b, t.shape[1], heads, t.shape[2] // heads).transpose(1, 2) for t in (k, v))
    if mask is not None:
        if mask.dim() == 2:
            mask = mask.unsqueeze(0)
        if mask.dim() == 3:
            mask = mask.unsqueeze(1)
    out = TORCH_SDPA(q, k, v, attn_mask=mask, scale=scale, enable_gqa=enable_gqa)
    if not skip_output_reshape:
        out = out.transpose(1, 2).reshape(b, out.shape[2], -1)
    return out


def _func_must_not_run(*args, **kwargs):
    raise AssertionError("the override sent a call to ComfyUI's func that it should have computed")


def _qkv(b=2, h=3, n_q=40, n_k=40, d=16, dtype=torch.float32, layout="bnd", seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = {"bnd": [(b, n_q, h * d), (b, n_k, h * d)], "bhnd": [(b, h, n_q, d), (b, h, n_k, d)]}[layout]
    q = torch.randn(*shapes[0], generator=g).to(dtype)
    k = torch.randn(*shapes[1], generator=g).to(dtype)
    v = torch.randn(*shapes[1], generator=g).to(dtype)
    return q, k, v


def _assert_matches_comfy(out, q, k, v, heads, mask=None, **layout):
    """``out`` against ``attention_pytorch`` in float64, within 4x torch's own error in ``q.dtype`` (+ 4 ulps)."""
    def f64(t):
        return None if t is None else (t if t.dtype == torch.bool else t.double())

    truth = _comfy_attention_pytorch(f64(q), f64(k), f64(v), heads, f64(mask), **layout)
    theirs = _comfy_attention_pytorch(q, k, v, heads, None if mask is None else mask.to(q.dtype)
                                      if mask.dtype != torch.bool else mask, **layout)
    assert out.shape == truth.shape and out.dtype == q.dtype, (out.shape, truth.shape, out.dtype)
    err = (out.double() - truth).abs().max().item()
    tol = tolerance(theirs, truth)
    assert err <= tol, f"max error {err:.3e} > tolerance {tol:.3e} ({q.dtype})"


class _Override:
    """An override under test with a recorder; each call asserts that noflash computed it, and with which tier."""

    def __init__(self, **config) -> None:
        config.setdefault("min_tokens", 0)
        config.setdefault("budget_bytes", BUDGET)
        self.config = OverrideConfig(**config)
        self.records = []
        self.fn = make_attention_override(self.config, recorder=self.records.append)

    def __call__(self, func, *args, **kwargs):
        before = len(self.records)
        out = self.fn(func, *args, **kwargs)
        (record,) = self.records[before:]
        assert record.path == "noflash", record
        if self.config.tier == "auto":
            assert record.tier in (1, 2, 3), f"auto ran tier {record.tier}: torch compared with itself"
        else:
            assert record.tier == self.config.tier, record
        return out


def _override(**config) -> _Override:
    return _Override(**config)


# ---- layouts and argument forms -------------------------------------------------------------------------


@pytest.mark.parametrize("skip_reshape", [False, True])
@pytest.mark.parametrize("skip_output_reshape", [False, True])
@pytest.mark.parametrize("n_k", [40, 23])
def test_layouts_match_attention_pytorch(skip_reshape, skip_output_reshape, n_k):
    q, k, v = _qkv(n_k=n_k, layout="bhnd" if skip_reshape else "bnd")
    kwargs = dict(skip_reshape=skip_reshape, skip_output_reshape=skip_output_reshape)
    out = _override()(_func_must_not_run, q, k, v, heads=3, _inside_attn_wrapper=True, **kwargs)
    expected_shape = (2, 3, 40, 16) if skip_output_reshape else (2, 40, 48)
    assert tuple(out.shape) == expected_shape
    _assert_matches_comfy(out, q, k, v, 3, **kwargs)


def test_heads_positional_and_keyword_agree():
    q, k, v = _qkv()
    ov = _override()
    by_position = ov(_func_must_not_run, q, k, v, 3, _inside_attn_wrapper=True)
    by_keyword = ov(_func_must_not_run, q, k, v, heads=3, _inside_attn_wrapper=True)
    torch.testing.assert_close(by_position, by_keyword, atol=0, rtol=0)
    _assert_matches_comfy(by_position, q, k, v, 3)


def test_mask_positional_and_keyword_agree():
    q, k, v = _qkv()
    mask = torch.randn(2, 40, 40)
    ov = _override()
    by_position = ov(_func_must_not_run, q, k, v, 3, mask, _inside_attn_wrapper=True)
    by_keyword = ov(_func_must_not_run, q, k, v, 3, mask=mask, _inside_attn_wrapper=True)
    torch.testing.assert_close(by_position, by_keyword, atol=0, rtol=0)
    _assert_matches_comfy(by_position, q, k, v, 3, mask)


def test_all_positional_comfy_signature():
    # (q, k, v, heads, mask, attn_precision, skip_reshape, skip_output_reshape)
    q, k, v = _qkv(layout="bhnd")
    out = _override()(_func_must_not_run, q, k, v, 3, None, torch.float32, True, True, _inside_attn_wrapper=True)
    _assert_matches_comfy(out, q, k, v, 3, skip_reshape=True, skip_output_reshape=True)


def test_value_head_dim_may_differ():
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(1, 30, 2 * 8, generator=g), torch.randn(1, 20, 2 * 8, generator=g)
    v = torch.randn(1, 20, 2 * 12, generator=g)
    out = _override()(_func_must_not_run, q, k, v, heads=2, _inside_attn_wrapper=True)
    assert out.shape == (1, 30, 24)
    _assert_matches_comfy(out, q, k, v, 2)


def test_sd3_value_layout_b_n_h_d():
    # SD3's joint blocks pass q and k as (b, n, h*d) but v straight from split_qkv as (b, n, h, d).
    g = torch.Generator().manual_seed(2)
    q, k = torch.randn(2, 30, 3 * 16, generator=g), torch.randn(2, 30, 3 * 16, generator=g)
    v4 = torch.randn(2, 30, 3, 16, generator=g)
    out = _override()(_func_must_not_run, q, k, v4, heads=3, _inside_attn_wrapper=True)
    _assert_matches_comfy(out, q, k, v4.reshape(2, 30, 48), 3)


def test_non_contiguous_inputs():
    q, k, v = _qkv(layout="bhnd")
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))  # (b, h, n, d) strided views
    assert not q.is_contiguous()
    out = _override()(_func_must_not_run, q, k, v, heads=3, skip_reshape=True, _inside_attn_wrapper=True)
    _assert_matches_comfy(out, q, k, v, 3, skip_reshape=True)


# ---- masks of every form the model families send -------------------------------------------------------


def _mask_cases(b=2, n_q=40, n_k=40):
    g = torch.Generator().manual_seed(7)
    keep_q = torch.rand(b, n_q, n_k, generator=g) > 0.3
    keep_q[..., 0] = True
    pad = torch.ones(b, 1, n_k, dtype=torch.bool)
    pad[1, 0, n_k - 9 :] = False
    ltxv = torch.zeros(b, 1, 1, n_k)
    ltxv[0, ..., n_k - 5 :] = -torch.finfo(torch.float32).max
    hunyuan = torch.zeros(1, 1, n_k)
    hunyuan[..., n_k - 7 :] = float("-inf")
    return {
        "flux_regional_float_(b,L,L)": torch.randn(b, n_q, n_k, generator=g),
        "flux_regional_bool_(b,L,L)": keep_q,
        "ltxv_cross_(b,1,1,Lk)_-finfo.max": ltxv,
        "hunyuan_(1,1,L)_-inf": hunyuan,
        "lumina2_padding_bool_(b,1,L)": pad,
        "lumina2_padding_float_(b,1,L)": torch.where(pad, 0.0, float("-inf")),
        "2d_(Lq,Lk)_float": torch.randn(n_q, n_k, generator=g),
        "2d_(Lq,Lk)_bool": keep_q[0],
        "4d_(b,h,Lq,Lk)_float": torch.randn(b, 3, n_q, n_k, generator=g),
        "4d_(1,1,1,Lk)_bool": pad[1:].unsqueeze(0),
    }


@pytest.mark.parametrize("name", list(_mask_cases()))
@pytest.mark.parametrize("skip_reshape", [False, True])
def test_masks_match_attention_pytorch(name, skip_reshape):
    mask = _mask_cases()[name]
    q, k, v = _qkv(layout="bhnd" if skip_reshape else "bnd")
    out = _override()(_func_must_not_run, q, k, v, 3, mask=mask, skip_reshape=skip_reshape,
                      _inside_attn_wrapper=True)
    _assert_matches_comfy(out, q, k, v, 3, mask, skip_reshape=skip_reshape)


@pytest.mark.parametrize("tier", [1, 2, 3])
@pytest.mark.parametrize("name", ["flux_regional_bool_(b,L,L)", "ltxv_cross_(b,1,1,Lk)_-finfo.max",
                                  "hunyuan_(1,1,L)_-inf", "lumina2_padding_bool_(b,1,L)"])
def test_masks_with_forced_small_tiles(name, tier):
    mask = _mask_cases(n_q=70, n_k=90)[name]
    q, k, v = _qkv(n_q=70, n_k=90)
    ov = _override(tier=tier, block_m=16, block_n=32)
    out = ov(_func_must_not_run, q, k, v, 3, mask=mask, _inside_attn_wrapper=True)
    _assert_matches_comfy(out, q, k, v, 3, mask)


def test_fully_masked_rows_give_zero_like_torch():
    q, k, v = _qkv()
    keep = torch.ones(2, 40, 40, dtype=torch.bool)
    keep[0, 5] = False
    out = _override(tier=2, block_m=16, block_n=16)(_func_must_not_run, q, k, v, 3, keep, _inside_attn_wrapper=True)
    _assert_matches_comfy(out, q, k, v, 3, keep)
    assert torch.isfinite(out).all()
    assert out[0, 5].abs().max() == 0


def test_normalize_comfy_mask_ranks():
    assert normalize_comfy_mask(None, torch.float32) is None
    assert normalize_comfy_mask(torch.zeros(5, 7), torch.float32).shape == (1, 1, 5, 7)
    assert normalize_comfy_mask(torch.zeros(2, 5, 7), torch.float32).shape == (2, 1, 5, 7)
    assert normalize_comfy_mask(torch.zeros(2, 1, 7), torch.float32).shape == (2, 1, 1, 7)
    assert normalize_comfy_mask(torch.zeros(2, 3, 5, 7), torch.float32).shape == (2, 3, 5, 7)
    assert normalize_comfy_mask(torch.zeros(2, 7, dtype=torch.bool), torch.float16).dtype == torch.bool
    assert normalize_comfy_mask(torch.zeros(5, 7), torch.float16).dtype == torch.float16


# ---- dtypes and attn_precision ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dtypes_keep_query_dtype(dtype):
    q, k, v = _qkv(dtype=dtype)
    mask = torch.randn(2, 40, 40).to(dtype)
    out = _override(tier=2, block_m=16, block_n=16)(_func_must_not_run, q, k, v, 3, mask, _inside_attn_wrapper=True)
    _assert_matches_comfy(out, q, k, v, 3, mask)


def test_attn_precision_fp32_scores_do_not_overflow_in_fp16():
    # SD2.x-style: fp16 q.k products far above 65504 overflow fp16 scores; attn_precision=fp32 asks for fp32 ones.
    g = torch.Generator().manual_seed(3)
    q = (torch.randn(1, 64, 2 * 64, generator=g) * 160).half()
    k = (torch.randn(1, 64, 2 * 64, generator=g) * 160).half()
    v = torch.randn(1, 64, 2 * 64, generator=g).half()
    qh, kh = (t.float().view(1, 64, 2, 64).transpose(1, 2) for t in (q, k))
    assert (qh @ kh.mT / 8).abs().max() > 65504  # scaled scores beyond fp16's range
    out = _override(tier=1, block_m=16)(_func_must_not_run, q, k, v, 2, attn_precision=torch.float32,
                                        _inside_attn_wrapper=True)
    ref = _comfy_attention_pytorch(q.double(), k.double(), v.double(), 2)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref, atol=2e-3, rtol=2e-3)


def test_float_mask_of_other_dtype_is_cast():
    q, k, v = _qkv(dtype=torch.float16)
    mask = torch.randn(2, 40, 40)  # fp32 mask with fp16 q
    out = _override()(_func_must_not_run, q, k, v, 3, mask, _inside_attn_wrapper=True)
    _assert_matches_comfy(out, q, k, v, 3, mask.half())


# ---- routing: func, min_tokens, enabled, chaining ----------------------------------------------------------


class _Spy:
    def __init__(self, name="func"):
        self.calls = []
        self.name = name

    def __call__(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        q, k, v = args[:3]
        heads = args[3] if len(args) > 3 else kwargs["heads"]
        mask = args[4] if len(args) > 4 else kwargs.get("mask")
        return _comfy_attention_pytorch(q, k, v, heads, mask, kwargs.get("skip_reshape", False),
                                        kwargs.get("skip_output_reshape", False), kwargs.get("scale"),
                                        kwargs.get("enable_gqa", False))


def test_below_min_tokens_goes_to_func_with_everything_passed_on():
    q, k, v = _qkv(n_q=40, n_k=30)
    func = _Spy()
    options = {"some": "thing"}
    ov = make_attention_override(OverrideConfig(min_tokens=41))
    out = ov(func, q, k, v, 3, transformer_options=options, attn_precision=None, _inside_attn_wrapper=True)
    assert len(func.calls) == 1
    args, kwargs = func.calls[0]
    assert args[0] is q and args[1] is k and args[2] is v and args[3] == 3
    assert kwargs["_inside_attn_wrapper"] is True
    assert kwargs["transformer_options"] is options
    torch.testing.assert_close(out, _comfy_attention_pytorch(q, k, v, 3))


def test_min_tokens_counts_the_longer_side():
    q, k, v = _qkv(n_q=40, n_k=30)
    func = _Spy()
    out = _override(min_tokens=40)(func, q, k, v, heads=3, _inside_attn_wrapper=True)
    assert func.calls == []
    _assert_matches_comfy(out, q, k, v, 3)


def test_disabled_sends_everything_on():
    q, k, v = _qkv()
    func = _Spy()
    make_attention_override(OverrideConfig(enabled=False, min_tokens=0))(func, q, k, v, heads=3,
                                                                         _inside_attn_wrapper=True)
    assert len(func.calls) == 1


def test_chains_a_previous_override_for_calls_it_does_not_compute():
    seen = []

    def previous(func, *args, **kwargs):
        seen.append((func, args, kwargs))
        return func(*args, **kwargs)

    func = _Spy()
    records = []
    ov = make_attention_override(OverrideConfig(min_tokens=100, budget_bytes=BUDGET), previous=previous,
                                 recorder=records.append)
    small = _qkv(n_q=10, n_k=10)
    ov(func, *small, heads=3, _inside_attn_wrapper=True)
    assert len(seen) == 1 and seen[0][0] is func and seen[0][2]["_inside_attn_wrapper"] is True
    assert len(func.calls) == 1
    big = _qkv(n_q=120, n_k=120)
    out = ov(func, *big, heads=3, _inside_attn_wrapper=True)
    assert len(seen) == 1 and len(func.calls) == 1  # computed by noflash, neither previous nor func ran
    assert [r.tier for r in records][0] == 0 and records[1].tier in (1, 2, 3), records
    _assert_matches_comfy(out, *big, 3)
    assert override_previous(ov) is previous


def test_unknown_layout_is_sent_on():
    seen = []
    sentinel = torch.zeros(1)

    def func(*args, **kwargs):
        seen.append(kwargs)
        return sentinel

    q, k, v = _qkv()
    records = []
    ov = make_attention_override(OverrideConfig(min_tokens=0), recorder=records.append)
    # heads missing without skip_reshape: not a call form ComfyUI defines, so ComfyUI decides what to do.
    assert ov(func, q, k, v, _inside_attn_wrapper=True) is sentinel
    assert seen == [{"_inside_attn_wrapper": True}]
    assert [(r.path, r.reason) for r in records] == [("comfy", "call form not understood")]


# ---- telemetry, config, rebuild -----------------------------------------------------------------------


def test_recorder_gets_one_record_per_call():
    records = []
    ov = make_attention_override(OverrideConfig(min_tokens=50, tier=2, block_m=16, block_n=32),
                                 recorder=records.append)
    ov(_Spy(), *_qkv(n_q=10, n_k=10), heads=3, _inside_attn_wrapper=True)
    ov(_func_must_not_run, *_qkv(n_q=64, n_k=96), heads=3, _inside_attn_wrapper=True)
    assert [r.path for r in records] == ["comfy", "noflash"]
    small, big = records
    assert isinstance(small, CallRecord)
    assert (small.tier, small.reason) == (0, "below min_tokens")
    assert (big.tier, big.block_m, big.block_n) == (2, 16, 32)
    assert (big.batch, big.heads, big.q_len, big.kv_len, big.head_dim) == (2, 3, 64, 96, 16)
    assert big.dtype == "float32" and big.device == "cpu"


def test_config_validation():
    with pytest.raises(ValueError, match="tier"):
        OverrideConfig(tier=4)
    with pytest.raises(ValueError, match="min_tokens"):
        OverrideConfig(min_tokens=-1)
    with pytest.raises(ValueError, match="budget_bytes"):
        OverrideConfig(budget_bytes=0)
    with pytest.raises(ValueError, match="block_m"):
        OverrideConfig(block_m=0)


def test_rebuild_keeps_chain_and_recorder():
    records = []

    def previous(func, *args, **kwargs):
        return func(*args, **kwargs)

    ov = make_attention_override(OverrideConfig(min_tokens=0, budget_bytes=BUDGET), previous=previous,
                                 recorder=records.append)
    pinned = rebuild_override(ov, tier=1, block_m=8)
    assert is_noflash_override(pinned) and pinned is not ov
    assert override_config(pinned) == OverrideConfig(min_tokens=0, budget_bytes=BUDGET, tier=1, block_m=8)
    assert override_previous(pinned) is previous and override_recorder(pinned) == records.append
    assert override_config(ov).tier == "auto"  # the original is unchanged
    pinned(_func_must_not_run, *_qkv(), heads=3, _inside_attn_wrapper=True)
    assert records[-1].tier == 1 and records[-1].block_m == 8
    with pytest.raises(ValueError):
        rebuild_override(previous, tier=1)
    assert not is_noflash_override(previous)


# ---- memory at a long sequence ----------------------------------------------------------------------------


def test_long_sequence_memory_far_below_n_squared():
    b, h, n, d = 1, 2, 4096, 32
    q, k, v = _qkv(b=b, h=h, n_q=n, n_k=n, d=d)
    scores_bytes = b * h * n * n * 4
    ov = _override(min_tokens=1024, budget_bytes=4 << 20)
    with LiveBytesTracker() as tracker:
        out = ov(_func_must_not_run, q, k, v, heads=h, _inside_attn_wrapper=True)
        peak = tracker.peak_bytes
    out_bytes = out.numel() * out.element_size()
    assert peak - out_bytes < scores_bytes / 8, (peak, scores_bytes)
    idx = torch.arange(0, n, 97)
    _assert_matches_comfy(out[:, idx], q[:, idx], k, v, h)


# ---- ComfyUI 0.33+ call forms: scale=, enable_gqa= (k/v with fewer heads) ---------------------------------


class _DispatchSpy:
    """Records the shapes and keywords noflash's dispatcher (``noflash_core.attention``, as the override module
    bound it) receives, then runs it."""

    def __init__(self, monkeypatch):
        import noflash_core.comfy.override as override

        self.calls = []
        real = override.attention

        def spy(query, key, value, attn_mask=None, *args, **kwargs):
            self.calls.append({"q": tuple(query.shape), "k": tuple(key.shape), "v": tuple(value.shape),
                               "scale": kwargs.get("scale"), "enable_gqa": kwargs.get("enable_gqa")})
            return real(query, key, value, attn_mask, *args, **kwargs)

        monkeypatch.setattr(override, "attention", spy)


def _gqa_qkv(b=2, hq=8, hkv=2, n_q=40, n_k=40, d=16, layout="bnd", dtype=torch.float32, seed=11):
    g = torch.Generator().manual_seed(seed)
    if layout == "bnd":
        shapes = [(b, n_q, hq * d), (b, n_k, hkv * d), (b, n_k, hkv * d)]
    else:
        shapes = [(b, hq, n_q, d), (b, hkv, n_k, d), (b, hkv, n_k, d)]
    return tuple(torch.randn(*s, generator=g).to(dtype) for s in shapes)


def _gqa_mask_cases(b=2, hq=8, n_q=40, n_k=40):
    """Every mask rank and kind ComfyUI's models send, sized for a (self or cross) GQA call."""
    g = torch.Generator().manual_seed(5)
    keep = torch.rand(b, n_q, n_k, generator=g) > 0.3
    keep[..., 0] = True
    pad = torch.ones(b, 1, n_k, dtype=torch.bool)
    pad[1, 0, n_k - 9:] = False
    causal = torch.ones(n_q, n_k, dtype=torch.bool).tril(n_k - n_q)
    return {
        "none": None,
        "2d_float_(Lq,Lk)": torch.randn(n_q, n_k, generator=g),
        "2d_bool_causal_(Lq,Lk)": causal,
        "3d_float_(b,Lq,Lk)": torch.randn(b, n_q, n_k, generator=g),
        "3d_bool_(b,Lq,Lk)": keep,
        "3d_bool_padding_(b,1,Lk)": pad,
        "3d_float_padding_(1,1,Lk)_-inf": torch.where(pad[1:], 0.0, float("-inf")),
        "4d_float_(b,1,1,Lk)_-finfo.max": torch.where(pad, 0.0, -torch.finfo(torch.float32).max).unsqueeze(1),
        "4d_float_(b,hq,Lq,Lk)": torch.randn(b, hq, n_q, n_k, generator=g),
        "4d_bool_(1,1,Lq,Lk)": causal[None, None],
    }


def test_scale_keyword_is_used_in_both_layouts():
    for layout, kwargs in (("bnd", {}), ("bhnd", {"skip_reshape": True})):
        q, k, v = _qkv(layout=layout)
        out = _override()(_func_must_not_run, q, k, v, 3, scale=0.37, _inside_attn_wrapper=True, **kwargs)
        _assert_matches_comfy(out, q, k, v, 3, scale=0.37, **kwargs)
        default = _override()(_func_must_not_run, q, k, v, 3, _inside_attn_wrapper=True, **kwargs)
        assert (out - default).abs().max() > 0.05  # the scale changed the result (it was not dropped)


@pytest.mark.parametrize("layout", ["bnd", "bhnd"])
@pytest.mark.parametrize("n_k", [40, 23])  # self and cross attention
@pytest.mark.parametrize("mask_name", list(_gqa_mask_cases()))
def test_gqa_every_mask_form_matches_attention_pytorch(layout, n_k, mask_name, monkeypatch):
    if mask_name.startswith(("2d_bool_causal", "4d_bool_(1,1,Lq")) and n_k != 40:
        pytest.skip("the causal masks are square")
    mask = _gqa_mask_cases(n_k=n_k)[mask_name]
    q, k, v = _gqa_qkv(n_k=n_k, layout=layout)
    spy = _DispatchSpy(monkeypatch)
    kwargs = {"skip_reshape": layout == "bhnd", "enable_gqa": True}
    out = _override()(_func_must_not_run, q, k, v, 8, mask=mask, _inside_attn_wrapper=True, **kwargs)
    assert out.shape == (2, 40, 8 * 16)
    _assert_matches_comfy(out, q, k, v, 8, mask, **kwargs)
    # k and v reached the dispatcher at their own 2 heads with enable_gqa=True: never repeated to 8.
    (call,) = spy.calls
    assert call["q"] == (2, 8, 40, 16) and call["k"] == (2, 2, n_k, 16) and call["v"] == (2, 2, n_k, 16)
    assert call["enable_gqa"] is True


@pytest.mark.parametrize("layout", ["bnd", "bhnd"])
@pytest.mark.parametrize("tier", [1, 2, 3])
def test_gqa_with_scale_and_skip_output_reshape_on_every_tier(layout, tier):
    q, k, v = _gqa_qkv(hq=6, hkv=3, n_q=70, n_k=90, layout=layout)
    mask = _gqa_mask_cases(hq=6, n_q=70, n_k=90)["3d_bool_padding_(b,1,Lk)"]
    kwargs = {"skip_reshape": layout == "bhnd", "skip_output_reshape": True, "enable_gqa": True, "scale": 0.2}
    out = _override(tier=tier, block_m=16, block_n=32)(_func_must_not_run, q, k, v, 6, mask,
                                                         _inside_attn_wrapper=True, **kwargs)
    assert out.shape == (2, 6, 70, 16)
    _assert_matches_comfy(out, q, k, v, 6, mask, **kwargs)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gqa_half_precision_keeps_query_dtype(dtype):
    q, k, v = _gqa_qkv(dtype=dtype)
    mask = _gqa_mask_cases()["3d_float_(b,Lq,Lk)"].to(dtype)
    out = _override()(_func_must_not_run, q, k, v, 8, mask, enable_gqa=True, scale=0.3, _inside_attn_wrapper=True)
    _assert_matches_comfy(out, q, k, v, 8, mask, enable_gqa=True, scale=0.3)


def test_gqa_kv_are_not_expanded_in_memory():
    # One long GQA call: repeating k and v to all 16 heads (ComfyUI's repeat_kv_for_gqa) would allocate 15/16 of
    # the full-head k and v (7.5 MiB here). Noflash's peak above its own output stays below a quarter of that
    # (the tiles work within the 1 MiB budget). skip_output_reshape: no merged-heads copy of the output.
    b, hq, hkv, n, d = 1, 16, 1, 2048, 32
    q, k, v = _gqa_qkv(b=b, hq=hq, hkv=hkv, n_q=n, n_k=n, d=d)
    expanded = 2 * b * (hq - hkv) * n * d * 4
    ov = _override(budget_bytes=1 << 20)
    with LiveBytesTracker() as tracker:
        out = ov(_func_must_not_run, q, k, v, hq, enable_gqa=True, skip_output_reshape=True,
                 _inside_attn_wrapper=True)
        peak = tracker.peak_bytes
    assert peak - out.numel() * out.element_size() < expanded / 4, (peak, expanded)
    idx = torch.arange(0, n, 101)
    _assert_matches_comfy(out[:, :, idx], q[:, idx], k, v, hq, enable_gqa=True, skip_output_reshape=True)


@pytest.mark.parametrize("case", ["heads_do_not_divide", "k_v_heads_differ", "k_width_not_head_multiple"])
@pytest.mark.parametrize("layout", ["bnd", "bhnd"])
def test_gqa_forms_comfy_rejects_go_to_func_unchanged(case, layout):
    g = torch.Generator().manual_seed(3)
    d = 16
    hk, hv = {"heads_do_not_divide": (3, 3), "k_v_heads_differ": (2, 4), "k_width_not_head_multiple": (2, 2)}[case]
    if layout == "bnd":
        kw = hk * d + (5 if case == "k_width_not_head_multiple" else 0)
        q, k, v = torch.randn(1, 30, 8 * d, generator=g), torch.randn(1, 30, kw, generator=g), \
            torch.randn(1, 30, hv * d, generator=g)
    elif case == "k_width_not_head_multiple":
        pytest.skip("the skip_reshape layout has no widths")
    else:
        q, k, v = (torch.randn(1, h, 30, d, generator=g) for h in (8, hk, hv))
    sentinel = torch.zeros(1)
    seen = []

    def func(*args, **kwargs):
        seen.append((args, kwargs))
        return sentinel

    records = []
    ov = make_attention_override(OverrideConfig(min_tokens=0), recorder=records.append)
    kwargs = {"skip_reshape": layout == "bhnd", "enable_gqa": True, "scale": 0.5, "_inside_attn_wrapper": True}
    assert ov(func, q, k, v, 8, **kwargs) is sentinel
    (args, got), = seen
    assert args[1] is k and args[2] is v and got == kwargs
    assert records[0].path == "comfy"


def test_k_of_another_width_without_gqa_goes_to_func():
    # Without enable_gqa ComfyUI reshapes k to q's heads and head dim; a k of another width is not a form it
    # defines, so the override must not guess a head count.
    g = torch.Generator().manual_seed(4)
    q, k, v = torch.randn(1, 30, 64, generator=g), torch.randn(1, 30, 32, generator=g), torch.randn(1, 30, 32)
    func = _Spy()
    with pytest.raises(RuntimeError):  # torch's SDPA itself rejects the head dims, as ComfyUI's call would
        make_attention_override(OverrideConfig(min_tokens=0))(func, q, k, v, 4, _inside_attn_wrapper=True)
    assert len(func.calls) == 1


def test_below_min_tokens_passes_scale_and_gqa_on():
    q, k, v = _gqa_qkv(n_q=20, n_k=20)
    func = _Spy()
    ov = make_attention_override(OverrideConfig(min_tokens=1024))
    out = ov(func, q, k, v, 8, enable_gqa=True, scale=0.25, _inside_attn_wrapper=True)
    ((_, kwargs),) = func.calls
    assert kwargs == {"enable_gqa": True, "scale": 0.25, "_inside_attn_wrapper": True}
    _assert_matches_comfy(out, q, k, v, 8, enable_gqa=True, scale=0.25)


def test_override_attributes_for_comfyui():
    ov = make_attention_override(OverrideConfig())
    assert ov.memory_efficient is True and not hasattr(ov, "container_function")
    assert make_attention_override(OverrideConfig(enabled=False)).memory_efficient is False
    assert override_name(ov) == "noflash" and override_name(None) == "none"

    def attention_pytorch(*args, **kwargs):
        return None

    def set_model_optimized_attention(optimized_attention):  # the shape of ComfyUI's ModelPatcher method
        def optimized_attention_override(_, *args, **kwargs):
            return optimized_attention(*args, **kwargs)
        return optimized_attention_override

    assert override_name(set_model_optimized_attention(attention_pytorch)) == "attention_pytorch"


def test_free_memory_reader_sets_the_budget(monkeypatch):
    monkeypatch.delenv("NOFLASH_BUDGET_MB", raising=False)
    meta = torch.device("meta")
    assert comfy_budget_bytes(meta, lambda dev: 1 << 30) is None  # meta/CPU: the planner's own rule
    cuda = torch.device("cuda", 0)
    assert comfy_budget_bytes(cuda, None) is None
    assert comfy_budget_bytes(cuda, lambda dev: None) is None  # no dynamic VRAM: the planner reads free memory
    assert comfy_budget_bytes(cuda, lambda dev: 10 * 2**30 + 12345) == 5 * 2**30
    assert comfy_budget_bytes(cuda, lambda dev: 100) == 1 << 20

    def broken(dev):
        raise RuntimeError("gone")

    assert comfy_budget_bytes(cuda, broken) is None
    monkeypatch.setenv("NOFLASH_BUDGET_MB", "300")
    assert comfy_budget_bytes(cuda, lambda dev: 1 << 30) is None  # the environment wins (the planner reads it)
    ov = make_attention_override(OverrideConfig(), free_memory=lambda dev: 1 << 30)
    assert rebuild_override(ov, tier=2).noflash_free_memory is ov.noflash_free_memory


# ---- ComfyUI's memory planning (noflash_core.comfy.memory), on a stand-in for BaseModel ----------------------


class _BaseModelLike(torch.nn.Module):
    """The attributes ComfyUI's ``BaseModel.memory_required`` reads, and its quadratic-attention formula."""

    memory_usage_factor = 1.3825  # Wan 2.2 5B: dim 3072 / 2222 (supported_models.WAN21_T2V)

    def __init__(self):
        super().__init__()
        self.memory_usage_factor_conds = ("ref_latents",)
        self.memory_usage_shape_process = {}
        self.manual_cast_dtype = None

    def get_dtype(self):
        return torch.bfloat16

    def memory_required(self, input_shape, cond_shapes=None):
        shapes = [input_shape] + list((cond_shapes or {}).get("ref_latents", []))
        area = sum(s[0] * math.prod(s[2:]) for s in shapes)
        return area * 0.15 * self.memory_usage_factor * 2**20


def test_planned_memory_is_per_run_and_restores_the_model():
    model = _BaseModelLike()
    shape = [2, 48, 31, 44, 80]
    comfy = model.memory_required(shape)
    with planned_memory(model):
        planned = model.memory_required(shape)
        with_ref = model.memory_required(shape, cond_shapes={"ref_latents": [[1, 48, 1, 44, 80]]})
    assert planned == pytest.approx(2 * 31 * 44 * 80 * 2 * 0.01 * 1.3825 * 2**20)
    assert comfy / planned == pytest.approx(0.15 / 0.02)  # 7.5x: ComfyUI's quadratic vs efficient in 16-bit
    assert with_ref == pytest.approx(planned * (1 + 44 * 80 / (2 * 31 * 44 * 80)))
    assert "memory_required" not in vars(model) and model.memory_required(shape) == comfy
    with pytest.raises(KeyError):
        with planned_memory(model):
            raise KeyError("boom")
    assert "memory_required" not in vars(model)


def test_planned_memory_never_raises_comfys_figure():
    model = _BaseModelLike()
    model.memory_required = lambda input_shape, cond_shapes=None: 1.0  # e.g. an efficient figure already
    with planned_memory(model):
        assert model.memory_required([1, 16, 8, 8]) == 1.0
    assert model.memory_required([1, 16, 8, 8]) == 1.0  # an instance attribute there before is put back
    assert efficient_memory_required(model, [1, 16, 8, 8]) > 1.0
