"""The hot path's caches: the bucketed default budget, the time-cached free-memory reader, and clear_caches()."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import noflash_core as nc
from noflash_core import budget, caches, dispatch, problem
from noflash_core.budget import FreeMemoryReader, bucket_bytes
from noflash_core.device import get_preset

MiB = 1 << 20


class _Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class _FakeGpu:
    """Free memory of a stand-in GPU: the budget reads it through ``budget.free_memory`` and counts the reads."""

    def __init__(self, free: int) -> None:
        self.free = free
        self.reads = 0

    def __call__(self, profile) -> int:
        self.reads += 1
        return self.free


@pytest.fixture
def fake_gpu(monkeypatch):
    """CPU tensors whose default budget comes from a live-read GPU profile (not simulated, so it is cached)."""
    gpu = replace(get_preset("gfx906"), name="cuda:7", kind="rocm", simulated=False)
    monkeypatch.setattr(budget, "device_profile", lambda device: gpu)
    monkeypatch.delenv("NOFLASH_BUDGET_MB", raising=False)
    clock, fake = _Clock(), _FakeGpu(8 * MiB)
    monkeypatch.setattr(budget, "free_memory", FreeMemoryReader(read=fake, clock=clock))
    nc.clear_caches()
    yield fake, clock
    nc.clear_caches()


def test_bucket_rounds_down_by_at_most_an_eighth_octave():
    grid = [int(1.0905**i) for i in range(80, 300)]
    for n in [1000, 4097, MiB - 1, MiB, 3 * MiB + 17, 10**9, 7 * 2**30 + 5] + grid:
        b = bucket_bytes(n)
        assert n * 2 ** (-1 / 8) <= b <= n and bucket_bytes(b) == b, n
    assert [bucket_bytes(n) for n in (MiB, MiB + 1000, MiB + 80_000)] == [MiB, MiB, MiB]
    assert bucket_bytes(MiB + 100_000) > MiB  # the next step, 2 ** (20 + 1/8), is 1.0905 MiB
    assert bucket_bytes(0) == 0 and bucket_bytes(1) == 1


def test_reader_reads_once_per_interval_per_device():
    clock, fake = _Clock(), _FakeGpu(5 * MiB)
    reader = FreeMemoryReader(read=fake, clock=clock, max_age_s=0.25)
    gpu = replace(get_preset("gfx906"), name="cuda:0", simulated=False)
    other = replace(gpu, name="cuda:1")
    for step in range(1000):  # one second of calls, one per millisecond
        clock.t = 1000.0 + step / 1000
        assert reader(gpu) == 5 * MiB
    assert fake.reads == 4  # at 0, 0.25, 0.5 and 0.75 s
    reader(other)
    assert fake.reads == 5
    fake.free = MiB
    assert reader(gpu) == 5 * MiB  # still fresh
    clock.t += 0.25
    assert reader(gpu) == MiB
    reader.clear()
    reader(gpu)
    assert fake.reads == 7


def test_fixed_figures_are_never_cached():
    fake = _FakeGpu(MiB)
    reader = FreeMemoryReader(read=fake, clock=_Clock())
    preset = get_preset("gfx906")  # simulated: a fixed figure a test may change
    assert reader(preset) == preset.free_bytes and reader(preset.with_memory(free_bytes=MiB)) == MiB
    assert reader(nc.device_profile("cpu")) == nc.device_profile("cpu").free_bytes
    assert fake.reads == 0


def _inputs():
    return [torch.randn(1, 4, 512, 32, generator=torch.Generator().manual_seed(i)) for i in range(3)]


def test_a_burst_of_calls_reads_free_memory_once(fake_gpu):
    fake, clock = fake_gpu
    q, k, v = _inputs()
    plans = [nc.attention(q, k, v).plan for _ in range(50)]
    assert fake.reads == 1 and all(p is plans[0] for p in plans)
    assert plans[0].tier != 0 and plans[0].budget_bytes == bucket_bytes(4 * MiB)  # half of the 8 MiB free
    clock.t += 0.3
    nc.attention(q, k, v)
    assert fake.reads == 2


def test_free_memory_moving_within_a_bucket_hits_the_plan_cache(fake_gpu, monkeypatch):
    fake, clock = fake_gpu
    q, k, v = _inputs()
    planned = []
    real_plan_problem = dispatch.plan_problem
    monkeypatch.setattr(dispatch, "plan_problem", lambda *a, **kw: planned.append(1) or real_plan_problem(*a, **kw))
    first = nc.attention(q, k, v).plan
    for free in (3_300_000, 3_500_000, 3_250_000):  # all in the bucket [2 ** 21.625, 2 ** 21.75) bytes
        fake.free = 2 * free
        clock.t += 1.0
        result = nc.attention(q, k, v)
        assert result.plan.budget_bytes <= free  # the plan was made for the bucket's lower edge
    assert len(planned) == 2 and result.plan is not first  # 8 MiB free planned once, the ~3.1 MiB bucket once
    fake.free = 2 * MiB
    clock.t += 1.0
    small = nc.attention(q, k, v).plan
    assert len(planned) == 3 and small.budget_bytes == MiB and small.peak_bytes <= MiB


def test_clear_caches_empties_every_cache(fake_gpu):
    fake, clock = fake_gpu
    q, k, v = _inputs()
    nc.attention(q, k, v)
    cleared = []
    caches.register(lambda: cleared.append(1))
    assert dispatch._plans and problem._layouts and budget.free_memory._seen
    nc.clear_caches()
    assert not dispatch._plans and not problem._layouts and not budget.free_memory._seen and cleared == [1]
    nc.attention(q, k, v)  # plans and reads again, even within the reading's interval
    assert fake.reads == 2 and dispatch._plans
    assert "clear_caches" in nc.__all__ and "attention" in nc.__all__
