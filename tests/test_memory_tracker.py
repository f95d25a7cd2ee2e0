"""Tests for noflash_core.memory.tracker: exact live-bytes accounting and the OOM-raising budget."""

from __future__ import annotations

import gc
import logging

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.nn.attention import SDPBackend, sdpa_kernel

from noflash_core.memory.tracker import LiveBytesTracker, MemoryBudget

logger = logging.getLogger(__name__)

GiB = 1 << 30


# ---------------------------------------------------------------------------------------------- counting
@pytest.mark.parametrize(
    "dtype, itemsize",
    [
        (torch.float32, 4),
        (torch.float16, 2),
        (torch.bfloat16, 2),
        (torch.float64, 8),
        (torch.int8, 1),
        (torch.bool, 1),
        (torch.int64, 8),
    ],
)
def test_empty_is_counted_exactly(dtype: torch.dtype, itemsize: int) -> None:
    with LiveBytesTracker() as tr:
        x = torch.empty(1024, dtype=dtype)
        assert tr.live_bytes == 1024 * itemsize
        assert tr.allocations == 1
        del x
    assert tr.live_bytes == 0
    assert tr.peak_bytes == 1024 * itemsize
    assert tr.frees == 1


def test_float32_1024_is_4096_bytes() -> None:
    with LiveBytesTracker() as tr:
        x = torch.empty(1024, dtype=torch.float32)
        assert tr.live_bytes == 4096
    del x


def test_factory_functions() -> None:
    with LiveBytesTracker() as tr:
        tensors = [
            torch.zeros(10, 10),
            torch.ones(3, 5, dtype=torch.float64),
            torch.randn(7),
            torch.full((4,), 2.0),
            torch.arange(16),  # int64
            torch.empty_like(torch.empty(0)),
            torch.tensor([1.0, 2.0, 3.0]),  # via aten.lift_fresh
        ]
        expected = 400 + 120 + 28 + 16 + 128 + 0 + 0 + 12
        assert tr.live_bytes == expected
        del tensors
    assert tr.live_bytes == 0


def test_views_are_not_double_counted() -> None:
    with LiveBytesTracker() as tr:
        x = torch.randn(8, 16)
        base = tr.live_bytes
        assert base == 8 * 16 * 4
        views = [
            x.view(16, 8),
            x[2:5],
            x.t(),
            x.reshape(128),
            x.unsqueeze(0).expand(3, 8, 16),
            x.detach(),
            *x.unbind(0),
            *x.split(3),
            x.as_strided((4,), (2,)),
            x.view(torch.int32),
        ]
        assert tr.live_bytes == base
        assert tr.allocations == 1
        del x
        assert tr.live_bytes == base  # the views keep the storage alive
        views.pop()
        assert tr.live_bytes == base
        del views
        assert tr.live_bytes == 0


def test_copies_are_counted() -> None:
    with LiveBytesTracker() as tr:
        x = torch.randn(64)  # 256
        same = x.float()  # no-op: returns x itself
        assert tr.live_bytes == 256
        d = x.to(torch.float64)  # 512
        h = x.half()  # 128
        c = x.clone()  # 256
        nc = torch.randn(8, 8).t()  # 256
        cc = nc.contiguous()  # 256
        assert tr.live_bytes == 256 + 512 + 128 + 256 + 256 + 256
        del same, d, h, c, nc, cc, x
    assert tr.live_bytes == 0


def test_inplace_and_out_into_tracked_storage_add_nothing() -> None:
    with LiveBytesTracker() as tr:
        x = torch.randn(100)
        y = torch.empty(100)
        before = tr.live_bytes
        n_alloc = tr.allocations
        x.add_(1.0).mul_(2.0)
        x[10:20].zero_()
        torch.add(x, x, out=y)
        torch.mul(x, 3.0, out=y[:])
        assert tr.live_bytes == before
        assert tr.allocations == n_alloc


def test_preexisting_storages_are_not_counted() -> None:
    x = torch.randn(256)
    out = torch.empty(256)
    with LiveBytesTracker() as tr:
        x.add_(1.0)
        v = x[3:].view(-1)
        torch.sub(x, 1.0, out=out)
        x.resize_(300)  # growth of an untracked storage: not counted (documented)
        assert tr.live_bytes == 0
        assert tr.allocations == 0
        y = x + 1  # a new storage computed from old ones is counted
        assert tr.live_bytes == 300 * 4
    del v, y


def test_resize_growth_is_counted() -> None:
    with LiveBytesTracker() as tr:
        e = torch.empty(0)
        assert tr.live_bytes == 0
        e.resize_(1000)
        assert tr.live_bytes == 4000
        e.resize_(10)  # shrinking the tensor keeps the storage
        assert tr.live_bytes == 4000
        e.resize_(2000)
        assert tr.live_bytes == 8000
        out = torch.empty(0, dtype=torch.float64)
        torch.add(torch.zeros(5, dtype=torch.float64), 1.0, out=out)  # out= resizes its output
        assert tr.live_bytes == 8000 + 40
        assert tr.allocations == 3
        del e, out
    assert tr.live_bytes == 0


def test_multi_output_ops() -> None:
    x = torch.randn(50)
    with LiveBytesTracker() as tr:
        values, indices = torch.sort(x)
        assert tr.live_bytes == 50 * 4 + 50 * 8
        assert tr.allocations == 2
        del values
        assert tr.live_bytes == 50 * 8
        del indices
    assert tr.live_bytes == 0


def test_autograd_backward_is_tracked() -> None:
    x = torch.randn(32, requires_grad=True)
    with LiveBytesTracker() as tr:
        y = (x * x).sum()
        y.backward()
        del y
        gc.collect()
        assert x.grad is not None
        assert tr.peak_bytes >= 32 * 4
    assert tr.live_bytes == 32 * 4  # only x.grad is left
    x.grad = None
    assert tr.live_bytes == 0


# ---------------------------------------------------------------------------------------------- peak
def test_peak_and_reset_peak() -> None:
    with LiveBytesTracker() as tr:
        a = torch.empty(1024)  # 4096
        b = torch.empty(2048)  # 8192
        del a
        assert (tr.live_bytes, tr.peak_bytes) == (8192, 12288)
        tr.reset_peak()
        assert tr.peak_bytes == 8192
        c = torch.empty(256)
        assert tr.peak_bytes == 8192 + 1024
        del b, c
    assert tr.live_bytes == 0
    assert tr.peak_bytes == 8192 + 1024


def test_reenter_resets_peak_keeps_live() -> None:
    tr = LiveBytesTracker()
    with tr:
        keep = torch.empty(100)
        tmp = torch.empty(1000)
        del tmp
    assert (tr.live_bytes, tr.peak_bytes) == (400, 4400)
    with tr:
        assert tr.peak_bytes == 400
        t2 = torch.empty(50)
        assert tr.live_bytes == 600
    del keep, t2
    assert tr.live_bytes == 0


def test_frees_after_exit_are_observed() -> None:
    with LiveBytesTracker() as tr:
        x = torch.empty(10, 10)
    assert tr.live_bytes == 400
    del x
    assert tr.live_bytes == 0
    assert tr.live_storages == 0


def test_nested_trackers() -> None:
    with LiveBytesTracker() as outer:
        a = torch.empty(100)
        with LiveBytesTracker() as inner:
            b = torch.empty(200)
            v = a.view(10, 10)
            assert inner.live_bytes == 800
            assert outer.live_bytes == 1200
        c = torch.empty(300)
        assert inner.live_bytes == 800
        assert outer.live_bytes == 2400
        del b
        assert (inner.live_bytes, outer.live_bytes) == (0, 1600)
        del a, v, c
    assert outer.live_bytes == 0
    assert outer.peak_bytes == 2400


def test_no_leak_over_1000_ops() -> None:
    x = torch.randn(16, 16)
    with LiveBytesTracker() as tr:
        base = tr.live_bytes
        for i in range(1000):
            y = (x + i).relu_()
            z = y.view(-1)[::2] * 2.0
            del y, z
        assert tr.live_bytes == base
        assert tr.live_storages == 0
        assert tr.allocations == 2000
        assert tr.frees == 2000
        assert tr.peak_bytes == 16 * 16 * 4 + 128 * 4


# ---------------------------------------------------------------------------------------------- fake tensors
def test_fake_mode_outside_tracker() -> None:
    with FakeTensorMode():
        with LiveBytesTracker() as tr:
            a = torch.empty(GiB // 4)  # 1 GiB that never exists
            b = a * 2
            v = b.view(-1)[1:]
            assert tr.live_bytes == 2 * GiB
            del a
            assert tr.live_bytes == GiB
            del b
            assert tr.live_bytes == GiB  # v keeps b's storage alive
            del v
            assert tr.live_bytes == 0
    assert tr.peak_bytes == 2 * GiB


def test_fake_mode_inside_tracker() -> None:
    with LiveBytesTracker() as tr:
        with FakeTensorMode():
            a = torch.empty(8, GiB // 32, dtype=torch.float16)  # 512 MiB
            b = a.float()  # 1 GiB
            b.add_(1.0)
            assert tr.live_bytes == GiB + GiB // 2
            del a, b
    assert tr.live_bytes == 0
    assert tr.peak_bytes == GiB + GiB // 2


def test_fake_tensors_from_real() -> None:
    real = torch.randn(1000)
    with FakeTensorMode() as mode:
        fake = mode.from_tensor(real)
        with LiveBytesTracker() as tr:
            v = fake[10:]
            assert tr.live_bytes == 0  # converted before entering: pre-existing
            w = fake + 1
            assert tr.live_bytes == 4000
            del v, w
    assert tr.live_bytes == 0


# ---------------------------------------------------------------------------------------------- budget
def test_budget_raises_and_does_not_count() -> None:
    with MemoryBudget(10_000) as bud:
        a = torch.empty(2000)  # 8000
        with pytest.raises(torch.OutOfMemoryError) as info:
            torch.empty(1000)  # +4000 > 10000
        msg = str(info.value)
        assert "8000" in msg and "4000" in msg and "10000" in msg
        assert bud.live_bytes == 8000
        assert bud.peak_bytes == 8000
        assert bud.ooms_raised == 1
        b = torch.empty(500)  # 8000 + 2000 fits exactly
        assert bud.live_bytes == 10_000
        del a, b
    assert bud.live_bytes == 0


def test_budget_out_of_memory_error_is_runtime_error() -> None:
    with MemoryBudget(0) as bud:
        with pytest.raises(RuntimeError):
            torch.zeros(1)
        torch.empty(0)  # zero bytes always fit
    assert bud.ooms_raised == 1


def test_budget_below_limit_never_raises() -> None:
    x = torch.randn(64, 64)
    with MemoryBudget(64 * 64 * 4 * 3) as bud:
        for _ in range(100):
            y = x @ x
            z = y.relu()
            del y, z
    assert bud.ooms_raised == 0
    assert bud.peak_bytes == 64 * 64 * 4 * 2


def test_budget_rejected_output_is_freed() -> None:
    with LiveBytesTracker() as outer:
        with MemoryBudget(1000):
            keep = torch.empty(200)
            with pytest.raises(torch.OutOfMemoryError):
                torch.empty(100)
            # the outer tracker saw the rejected tensor being allocated and already freed
            assert outer.live_bytes == 800
        assert outer.peak_bytes == 1200
    del keep


def test_budget_arm_and_disarm() -> None:
    bud = MemoryBudget(None)
    with bud:
        a = torch.empty(1000)  # unlimited
        bud.limit_bytes = 4500
        with pytest.raises(torch.OutOfMemoryError):
            torch.empty(1000)
        b = torch.empty(100)
        bud.limit_bytes = None
        c = torch.empty(10_000)
        assert bud.live_bytes == 4000 + 400 + 40_000
    assert bud.ooms_raised == 1
    del a, b, c
    with pytest.raises(ValueError):
        MemoryBudget(-1)


def test_budget_under_fake_mode() -> None:
    with FakeTensorMode():
        with MemoryBudget(4 * GiB) as bud:
            a = torch.empty(GiB // 4)  # 1 GiB
            with pytest.raises(torch.OutOfMemoryError):
                torch.empty(GiB)  # 4 GiB more
            b = a * 3
            assert bud.live_bytes == 2 * GiB
            del a, b
    assert bud.live_bytes == 0


def test_budget_supports_retry_with_smaller_chunks() -> None:
    """The pattern the OOM-retry logic uses: catch, free, halve, retry."""
    x = torch.randn(256, 64)
    w = torch.randn(64, 256)

    def chunked(chunk: int) -> torch.Tensor:
        out = torch.empty(256, 256)
        for i in range(0, 256, chunk):
            out[i : i + chunk] = (x[i : i + chunk] @ w).exp()
        return out

    with MemoryBudget(256 * 256 * 4 + 32 * 256 * 4 * 2) as bud:
        chunk, tried = 256, []
        while True:
            tried.append(chunk)
            try:
                res = chunked(chunk)
                break
            except torch.OutOfMemoryError:
                chunk //= 2
    assert tried == [256, 128, 64, 32]
    assert bud.ooms_raised == 3
    torch.testing.assert_close(res, (x @ w).exp())


# ---------------------------------------------------------------------------------------------- validation
def test_math_sdpa_peak_matches_theory() -> None:
    """Math SDPA holds the scores and the softmax output at once: about 2*B*H*L*S*4 bytes in fp32.

    The measured peak (torch 2.13, CPU) is exactly 2*B*H*L*S*4 + B*H*L*E*4: at ``_safe_softmax`` the bmm
    scores (B*H*L*S) and the probabilities (B*H*L*S) are both alive, plus the query scaled by sqrt(scale)
    (B*H*L*E), which the decomposition still holds. For L=S=512, E=64 that is 2.125x of B*H*L*S*4.
    """
    B, H, L, S, E = 1, 4, 512, 512, 64
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, L, E, generator=gen)
    k = torch.randn(B, H, S, E, generator=gen)
    v = torch.randn(B, H, S, E, generator=gen)
    scores = B * H * L * S * 4
    with sdpa_kernel(SDPBackend.MATH):
        with LiveBytesTracker() as tr:
            out = F.scaled_dot_product_attention(q, k, v)
    ratio = tr.peak_bytes / scores
    logger.info("math SDPA peak %d bytes = %.4f x B*H*L*S*4", tr.peak_bytes, ratio)
    assert 1.9 <= ratio <= 2.6
    assert tr.peak_bytes >= 2 * scores  # scores and probabilities coexist
    assert tr.live_bytes == out.numel() * 4  # only the output is left
    del out
    assert tr.live_bytes == 0


def test_math_sdpa_peak_is_deterministic() -> None:
    q = torch.randn(1, 2, 128, 32)
    peaks = []
    for _ in range(3):
        with sdpa_kernel(SDPBackend.MATH), LiveBytesTracker() as tr:
            F.scaled_dot_product_attention(q, q, q)
        peaks.append(tr.peak_bytes)
    assert len(set(peaks)) == 1
