"""The O(N)-memory backward of tiers 1 and 2: exact gradients, gradcheck, dropout replay, memory, training.

Every gradient comparison states the tier that ran (telemetry). The ``"auto"`` column runs under a budget one byte
below math SDPA's predicted forward-and-backward peak, so it must run tier 1 or 2; one more "auto" case runs past
the fast path with the default budget. Tensors live on ``NOFLASH_TEST_DEVICE`` (default cpu).
"""

from __future__ import annotations

import pytest
import torch

from noflash_core import scaled_dot_product_attention as sdpa
from tests.support.device import DEVICE, measure_peak, skip_unless_supported
from tests.support.reference import math_sdpa
from tests.support.tiers import AUTO_TIERS, TierLog, budget_below_math
from tests.support.training import adam_losses, assert_same_training

BLOCKS = dict(block_m=16, block_n=32)


def _grads(fn, inputs, weights):
    return torch.autograd.grad((fn() * weights).sum(), inputs)


def _randn(*shape, g=None, dtype=torch.float64, grad=False):
    return torch.randn(*shape, generator=g, dtype=dtype).to(DEVICE).requires_grad_(grad)


def _inputs(shape_q, shape_k, ev, seed=0):
    skip_unless_supported(torch.float64)
    g = torch.Generator().manual_seed(seed)
    q = _randn(*shape_q, g=g, grad=True)
    k = _randn(*shape_k, g=g, grad=True)
    v = _randn(*shape_k[:-1], ev, g=g, grad=True)
    return q, k, v


def _grads_and_tier(tier, q, k, v, weights, mask=None, inputs=None, **kwargs):
    """Our gradients (of q, k, v, or of ``inputs``) and the tier that ran; "auto" under a budget math cannot meet."""
    if tier == "auto":
        options = {"budget_bytes": budget_below_math(q, k, v, mask, kwargs.get("is_causal", False),
                                                     kwargs.get("enable_gqa", False), requires_grad=True)}
    else:
        options = {"tier": tier, **BLOCKS}
    with TierLog() as log:
        grads = _grads(lambda: sdpa(q, k, v, mask, **options, **kwargs), inputs or (q, k, v), weights)
    ran = log.only_tier()
    if tier == "auto":
        AUTO_TIERS[ran] += 1
        assert ran in (1, 2), f"auto ran tier {ran} under grad and a budget below math's peak"
    else:
        assert ran == tier, f"asked for tier {tier}, ran tier {ran}"
    return grads


CASES = {
    "plain": ((2, 3, 70, 16), (2, 3, 90, 16), 24, {}),
    "3d": ((3, 50, 16), (3, 70, 16), 16, {}),
    "5d": ((2, 2, 2, 40, 8), (2, 2, 2, 50, 8), 8, {}),
    "causal_L<S": ((1, 2, 40, 16), (1, 2, 90, 16), 16, {"is_causal": True}),
    "causal_L>S": ((1, 2, 90, 16), (1, 2, 40, 16), 16, {"is_causal": True}),
    "gqa": ((2, 6, 50, 16), (2, 2, 70, 16), 12, {"enable_gqa": True}),
    "gqa_causal": ((1, 4, 50, 16), (1, 1, 70, 16), 12, {"enable_gqa": True, "is_causal": True}),
}
MASKS = [(90,), (70, 90), (2, 1, 1, 90), (2, 1, 70, 90), (2, 3, 70, 90), (2, 3, 1, 90), (1, 1, 1, 1)]


@pytest.mark.parametrize("tier", [1, 2, "auto"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_gradients_match_math_float64(tier, name):
    shape_q, shape_k, ev, kwargs = CASES[name]
    q, k, v = _inputs(shape_q, shape_k, ev)
    weights = _randn(*shape_q[:-1], ev)
    ours = _grads_and_tier(tier, q, k, v, weights, **kwargs)
    theirs = _grads(lambda: math_sdpa(q, k, v, **kwargs), (q, k, v), weights)
    for a, b in zip(ours, theirs):
        assert (a - b).abs().max().item() <= 1e-9


@pytest.mark.parametrize("kwargs", [{}, {"is_causal": True}], ids=["plain", "causal"])
def test_auto_gradients_beyond_the_fast_path(kwargs):
    # 4 x 768 x 768 fp32 scores are 9 MiB, above the fast path's 8 MiB: the default budget tiles.
    q, k, v = _inputs((1, 4, 768, 32), (1, 4, 768, 32), 32)
    weights = _randn(1, 4, 768, 32)
    with TierLog() as log:
        ours = _grads(lambda: sdpa(q, k, v, **kwargs), (q, k, v), weights)
    ran = log.only_tier()
    AUTO_TIERS[ran] += 1
    assert ran in (1, 2), f"auto ran tier {ran} past the fast path"
    theirs = _grads(lambda: math_sdpa(q, k, v, **kwargs), (q, k, v), weights)
    for a, b in zip(ours, theirs):
        assert (a - b).abs().max().item() <= 1e-9


@pytest.mark.parametrize("tier", [1, 2])
@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("shape", MASKS, ids=str)
def test_mask_gradients(tier, kind, shape):
    q, k, v = _inputs((2, 3, 70, 16), (2, 3, 90, 16), 16)
    g = torch.Generator().manual_seed(1)
    keep = torch.rand(shape, generator=g) > 0.3
    if kind == "bool":
        mask = keep.to(DEVICE)
        inputs = (q, k, v)
    else:
        mask = torch.randn(shape, generator=g, dtype=torch.float64).masked_fill(~keep, float("-inf"))
        mask = mask.to(DEVICE).requires_grad_()
        inputs = (q, k, v, mask)
    weights = _randn(2, 3, 70, 16)
    ours = _grads_and_tier(tier, q, k, v, weights, mask, inputs)
    theirs = _grads(lambda: math_sdpa(q, k, v, mask), inputs, weights)
    for a, b in zip(ours, theirs):
        assert a.shape == b.shape
        assert (a - b).abs().max().item() <= 1e-9


@pytest.mark.parametrize("tier", [1, 2])
def test_fully_masked_rows_have_zero_gradient(tier):
    q, k, v = _inputs((1, 2, 40, 16), (1, 2, 50, 16), 16)
    keep = torch.ones(40, 50, dtype=torch.bool, device=DEVICE)
    keep[::4] = False
    out = sdpa(q, k, v, keep, tier=tier, **BLOCKS)
    (gq,) = torch.autograd.grad(out.sum(), (q,))
    assert torch.isfinite(gq).all() and (gq[:, :, ::4] == 0).all()


@pytest.mark.parametrize("tier", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_low_precision_gradients_close_to_math(tier, dtype):
    q, k, v = (t.detach().to(dtype).requires_grad_() for t in _inputs((1, 2, 64, 32), (1, 2, 80, 32), 32))
    weights = _randn(1, 2, 64, 32)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    exact = _grads(lambda: math_sdpa(q64, k64, v64), (q64, k64, v64), weights)
    ours = _grads(lambda: sdpa(q, k, v, tier=tier, **BLOCKS), (q, k, v), weights.to(dtype))
    theirs = _grads(lambda: math_sdpa(q, k, v), (q, k, v), weights.to(dtype))
    for a, b, c in zip(ours, theirs, exact):
        assert a.dtype == dtype
        math_err = (b.double() - c).abs().max().item()
        floor = 4 * torch.finfo(dtype).eps * c.abs().max().item()
        assert (a.double() - c).abs().max().item() <= 4 * math_err + floor


@pytest.mark.parametrize("tier", [1, 2])
def test_gradcheck(tier):
    q, k, v = _inputs((1, 2, 6, 4), (1, 2, 7, 4), 3)
    mask = _randn(1, 1, 6, 7, grad=True)

    def fn(q, k, v, mask):
        return sdpa(q, k, v, mask, tier=tier, block_m=4, block_n=3)

    assert torch.autograd.gradcheck(fn, (q, k, v, mask))


@pytest.mark.parametrize("tier", [1, 2])
def test_gradcheck_with_dropout(tier):
    q, k, v = _inputs((1, 2, 6, 4), (1, 2, 7, 4), 5)

    def fn(q, k, v):
        torch.manual_seed(1234)  # the same keep-mask on every evaluation
        return sdpa(q, k, v, dropout_p=0.4, tier=tier, block_m=4, block_n=3)

    assert torch.autograd.gradcheck(fn, (q, k, v))


@pytest.mark.parametrize("tier", [1, 2])
def test_dropout_backward_replays_forward_mask(tier):
    # Gradients with dropout equal autograd through an explicit reference that uses the same keep-mask.
    q, k, v = _inputs((1, 2, 20, 8), (1, 2, 30, 8), 8)
    torch.manual_seed(5)
    out = sdpa(q, k, v, dropout_p=0.5, tier=tier, **BLOCKS)
    # Recover the keep-mask: with V = identity the output is the dropped weights.
    eye = torch.eye(30, dtype=torch.float64, device=DEVICE).expand(1, 2, 30, 30)
    torch.manual_seed(5)
    dropped = sdpa(q.detach(), k.detach(), eye, dropout_p=0.5, tier=tier, **BLOCKS)
    scale = (dropped != 0).double() / 0.5
    weights = torch.randn_like(out)
    ours = torch.autograd.grad((out * weights).sum(), (q, k, v))
    probs = torch.softmax(q @ k.transpose(-1, -2) / 8**0.5, -1)
    ref = (probs * scale) @ v
    theirs = torch.autograd.grad((ref * weights).sum(), (q, k, v))
    assert torch.allclose(out, ref, atol=1e-12, rtol=0)
    for a, b in zip(ours, theirs):
        assert (a - b).abs().max().item() <= 1e-10


def test_double_backward_raises_clearly():
    q, k, v = _inputs((1, 1, 8, 4), (1, 1, 8, 4), 4)
    out = sdpa(q, k, v, tier=1)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(out.sum(), (q,), create_graph=True)


def _fwd_bwd_peak(n: int, tier: int):
    q, k, v = (_randn(1, 4, n, 32, dtype=torch.float32, grad=True) for _ in range(3))
    grad = _randn(1, 4, n, 32, dtype=torch.float32)
    with measure_peak() as peak:
        out = sdpa(q, k, v, tier=tier, block_m=64, block_n=128)
        out.backward(grad)
        del out
    return peak


@pytest.mark.parametrize("tier", [1, 2])
def test_forward_backward_peak_grows_linearly(tier):
    small, large = _fwd_bwd_peak(1024, tier), _fwd_bwd_peak(2048, tier)
    assert large.tracker <= 2.3 * small.tracker, (small, large)
    if small.device is not None:  # the allocator's own count, where the device keeps one
        assert large.device <= 2.3 * small.device, (small, large)


@pytest.mark.parametrize("tier", [1, 2])
def test_saved_for_backward_is_output_plus_lse(tier):
    n, h, e = 1024, 4, 32
    q, k, v = (_randn(1, h, n, e, dtype=torch.float32, grad=True) for _ in range(3))
    with measure_peak() as peak:
        out = sdpa(q, k, v, tier=tier, block_m=64, block_n=128)
    out_bytes = out.numel() * out.element_size()
    lse_bytes = h * n * 4
    assert peak.live <= out_bytes + lse_bytes + 64 * 1024, (peak, out_bytes, lse_bytes)
    del out


class _Block(torch.nn.Module):
    def __init__(self, dim: int, heads: int, attention) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = torch.nn.LayerNorm(dim)
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.proj = torch.nn.Linear(dim, dim)
        self.norm2 = torch.nn.LayerNorm(dim)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(dim, 2 * dim), torch.nn.GELU(), torch.nn.Linear(2 * dim, dim))
        self.attention = attention

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = self.attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, n, d)
        x = x + self.proj(a)
        return x + self.mlp(self.norm2(x))


def _train(attention, steps: int = 3, n: int = 4096):
    torch.manual_seed(0)
    model = _Block(32, 2, attention).to(DEVICE)
    x, target = torch.randn(1, n, 32).to(DEVICE), torch.randn(1, n, 32).to(DEVICE)
    return adam_losses(model, model.parameters(), x, target, steps, lr=1e-3)


def test_training_loop_matches_math():
    with TierLog() as log:
        ours = _train(lambda *a, **kw: sdpa(*a, **kw))
    assert set(log.tiers) <= {1, 2}, log.by_tier()  # 4096 tokens: auto tiles
    assert_same_training(ours, _train(math_sdpa))
