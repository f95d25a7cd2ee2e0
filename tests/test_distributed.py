"""ring_attention and ulysses_attention on 2 and 4 real gloo processes against full-sequence math SDPA.

One spawn per group size runs every scenario (the spawn and the imports dominate the cost); the tests below then
check each scenario's numbers. Each rank passes its contiguous shard (tokens ``[r*N/P, (r+1)*N/P)`` on dim -2) and
compares its output and its q/k/v gradients with the matching slices of full attention:

* float64: relative error at most 1e-9;
* float32: the tolerance of ``tests/support/reference.py``, from float32 math SDPA's own error against float64.

Bad input must raise the same error on every rank, and the group must still work afterwards (nothing hung, no
message left in flight). Memory: per-rank peak live bytes of forward + backward at a fixed N, measured with the
live-bytes tracker: P=4 at most 0.6 x P=2.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from noflash_core import attention_with_lse, telemetry
from noflash_core.distributed import merge_partials, ring_attention, ulysses_attention
from noflash_core.distributed.bench import sent_bytes
from noflash_core.memory.tracker import LiveBytesTracker
from tests.support.distributed import run_ranks_once
from tests.support.reference import math_sdpa, tolerance

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FNS = {"ring": ring_attention, "ulysses": ulysses_attention}
# name: (batch, query heads, key/value heads, E, Ev, is_causal, enable_gqa)
CASES = {
    "plain": (2, 4, 4, 8, 8, False, False),
    "causal": (2, 4, 4, 8, 8, True, False),
    "gqa": (1, 8, 4, 8, 8, False, True),
    "ev_ne_e": (2, 4, 4, 8, 12, False, False),
    "causal_gqa_ev": (1, 8, 4, 16, 6, True, True),
}
DTYPES = {"float64": torch.float64, "float32": torch.float32}
TOKENS_PER_RANK = 20  # not a multiple of the 16-row blocks: partial tiles on every rank
TINY_BUDGET = 4096  # forces the smallest tiles, so every step runs several tiles (and Ulysses never takes tier 0)
FP64_REL = 1e-9
MEMORY_TOKENS = 2048
MEMORY_HEADS = 4
# Pinned tiles, so both group sizes run the same tiles and only the O(N/P) part differs. Ring tiles are a constant
# per rank (the shards are not), so they are kept small; Ulysses tiles shrink with its H/P heads anyway.
MEMORY_BLOCKS = {"ring": 64, "ulysses": 128}
MEMORY_RATIO = 0.6


def _full_inputs(case, dtype, world_size, seed=0):
    b, hq, hk, e, ev, _, _ = case
    n = TOKENS_PER_RANK * world_size
    g = torch.Generator().manual_seed(seed)
    shapes = [(b, hq, n, e), (b, hk, n, e), (b, hk, n, ev), (b, hq, n, ev)]
    return [torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in shapes]


def _grads_of(fn, q, k, v, dout, **kw):
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    out = fn(*leaves, **kw)
    out.backward(dout)
    return [out.detach()] + [t.grad for t in leaves]


def _compare(rank, world_size, fn_name, case_name, dtype_name):
    case, dtype = CASES[case_name], DTYPES[dtype_name]
    *_, causal, gqa = case
    q, k, v, dout = _full_inputs(case, dtype, world_size)
    kw = dict(is_causal=causal, enable_gqa=gqa)
    truth = _grads_of(math_sdpa, *(t.double() for t in (q, k, v, dout)), **kw)
    math = _grads_of(math_sdpa, q, k, v, dout, **kw)
    rows = slice(rank * TOKENS_PER_RANK, (rank + 1) * TOKENS_PER_RANK)
    shard = [t[..., rows, :] for t in (q, k, v, dout)]
    tiers = []
    unsubscribe = telemetry.subscribe(lambda rec: tiers.append(rec.tier))
    try:
        ours = _grads_of(FNS[fn_name], *shard, budget_bytes=TINY_BUDGET, **kw)
    finally:
        unsubscribe()
    report = {"tiers": tiers}
    for name, got, exact, m in zip(("out", "dq", "dk", "dv"), ours, truth, math):
        exact, m = exact[..., rows, :], m[..., rows, :]
        assert got.shape == exact.shape and got.dtype == dtype, (name, got.shape, exact.shape, got.dtype)
        err = (got.double() - exact).abs().max().item()
        if dtype == torch.float64:
            report[name] = (err / exact.abs().max().item(), FP64_REL)
        else:
            report[name] = (err, tolerance(m, exact))
    return report


def _ring_lse(rank, world_size, case_name):
    """ring_attention(return_lse=True) against attention_with_lse on the whole sequence, float64, with a loss that
    uses both outputs (the lse's gradient enters every ring step's backward)."""
    case = CASES[case_name]
    *_, causal, gqa = case
    q, k, v, dout = _full_inputs(case, torch.float64, world_size)
    dlse = torch.randn(dout.shape[:-1], dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    rows = slice(rank * TOKENS_PER_RANK, (rank + 1) * TOKENS_PER_RANK)

    def run(fn, q, k, v, dout, dlse, **kw):
        leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
        out, lse = fn(*leaves, is_causal=causal, enable_gqa=gqa, **kw)
        ((out * dout).sum() + (lse * dlse).sum()).backward()
        return [out.detach(), lse.detach()] + [t.grad for t in leaves]

    full = run(attention_with_lse, q, k, v, dout, dlse)
    shard = [t[..., rows, :] for t in (q, k, v, dout)]
    ours = run(ring_attention, *shard, dlse[..., rows], return_lse=True, budget_bytes=TINY_BUDGET)
    report = {}
    for name, got, exact in zip(("out", "lse", "dq", "dk", "dv"), ours, full):
        exact = exact[..., rows] if name == "lse" else exact[..., rows, :]
        report[name] = ((got - exact).abs().max().item() / exact.abs().max().item(), FP64_REL)
    return report


def _accuracy_scenarios(rank, world_size):
    res = {
        (fn, case, dt): _compare(rank, world_size, fn, case, dt)
        for fn in FNS for case in CASES for dt in DTYPES
    }
    for case in ("plain", "causal_gqa_ev"):
        res[("ring_lse", case)] = _ring_lse(rank, world_size, case)
    return res


def _error_cases(rank, world_size):
    """name -> (function, this rank's args, kwargs). The odd rank out is the last one."""
    last = rank == world_size - 1
    n = 8

    def t(*shape, dtype=torch.float64):
        return torch.randn(*shape, dtype=dtype)

    good = (t(1, 4, n, 8), t(1, 4, n, 8), t(1, 4, n, 8))
    odd_len = (t(1, 4, n + (1 if last else 0), 8), t(1, 4, n, 8), t(1, 4, n, 8))
    odd_dtype = tuple(x.float() if last else x for x in good)
    three_heads = (t(1, 3, n, 8), t(1, 3, n, 8), t(1, 3, n, 8))
    kv_heads = max(1, world_size // 2)  # query heads divide by P, key/value heads do not
    gqa_bad = (t(1, 2 * world_size, n, 8), t(1, kv_heads, n, 8), t(1, kv_heads, n, 8))
    not_tensor = (good[0].tolist() if last else good[0], good[1], good[2])
    grad_on_one = tuple(x.clone().requires_grad_(last) for x in good)
    cross_causal = (t(1, 4, n, 8), t(1, 4, n + 2, 8), t(1, 4, n + 2, 8))
    return {
        "ring_wrong_shape_on_one_rank": (ring_attention, odd_len, {}),
        "ulysses_wrong_shape_on_one_rank": (ulysses_attention, odd_len, {}),
        "ring_dtype_on_one_rank": (ring_attention, odd_dtype, {}),
        "ulysses_heads_not_divisible": (ulysses_attention, three_heads, {}),
        "ulysses_gqa_kv_heads_not_divisible": (ulysses_attention, gqa_bad, {"enable_gqa": True}),
        "ring_is_causal_on_one_rank": (ring_attention, good, {"is_causal": last}),
        "ring_not_a_tensor_on_one_rank": (ring_attention, not_tensor, {}),
        "ulysses_requires_grad_on_one_rank": (ulysses_attention, grad_on_one, {}),
        "ring_causal_cross_lengths": (ring_attention, cross_causal, {"is_causal": True}),
        "ring_local_dtype_mismatch": (ring_attention, (good[0], good[1].float(), good[2]), {}),
    }


def _error_scenarios(rank, world_size):
    raised = {}
    for name, (fn, args, kw) in _error_cases(rank, world_size).items():
        try:
            fn(*args, **kw)
            raised[name] = None
        except Exception as exc:  # recorded and compared across ranks by the parent
            raised[name] = (type(exc).__name__, str(exc))
    # The group is still in step afterwards: a real call works on every rank.
    x = torch.randn(1, 2, 4, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(rank))
    raised["after"] = tuple(ring_attention(x, x, x).shape)
    return raised


def _peak_bytes(fn_name, world_size, rank):
    """Peak live bytes of one rank through forward and backward, its own shards and gradients included."""
    n_local = MEMORY_TOKENS // world_size
    g = torch.Generator().manual_seed(rank)
    with LiveBytesTracker() as tracker:
        q, k, v, dout = (torch.randn(1, MEMORY_HEADS, n_local, 64, generator=g) for _ in range(4))
        for t in (q, k, v):
            t.requires_grad_(True)
        block = MEMORY_BLOCKS[fn_name]
        out = FNS[fn_name](q, k, v, is_causal=False, block_m=block, block_n=block)
        out.backward(dout)
        del out
    return tracker.peak_bytes


def _memory_scenarios(rank, world_size):
    return {name: _peak_bytes(name, world_size, rank) for name in FNS}


COMM_SHAPE = dict(tokens=64, hq=8, hk=4, e=8, ev=12)


def _comm_scenarios(rank, world_size):
    """Bytes this rank actually sends in one non-causal forward + backward, counted at the send calls."""
    from unittest import mock

    from noflash_core.distributed import _p2p, ulysses

    sent = {"ring": 0, "ulysses": 0}
    real_send, real_a2a = _p2p.StepMessages.send, ulysses.dist.all_to_all_single

    def count_send(self, tensor, to_rank):
        sent["ring"] += tensor.numel() * tensor.element_size()
        return real_send(self, tensor, to_rank)

    def count_a2a(output, input, *args, **kwargs):  # the chunk kept on this rank does not travel
        sent["ulysses"] += input.numel() * input.element_size() * (world_size - 1) // world_size
        return real_a2a(output, input, *args, **kwargs)

    c = COMM_SHAPE
    n = c["tokens"] // world_size
    g = torch.Generator().manual_seed(rank)
    dims = ((c["hq"], c["e"]), (c["hk"], c["e"]), (c["hk"], c["ev"]))
    q, k, v = (torch.randn(1, h, n, d, generator=g) for h, d in dims)
    with mock.patch.object(_p2p.StepMessages, "send", count_send), \
            mock.patch.object(ulysses.dist, "all_to_all_single", count_a2a):
        for fn in FNS.values():
            leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
            fn(*leaves, enable_gqa=True).sum().backward()
    return sent


def _all_scenarios(rank, world_size):
    return {
        "accuracy": _accuracy_scenarios(rank, world_size),
        "errors": _error_scenarios(rank, world_size),
        "memory": _memory_scenarios(rank, world_size),
        "comm": _comm_scenarios(rank, world_size),
    }


def _results(world_size):
    return run_ranks_once(_all_scenarios, world_size, timeout_s=400)


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("fn", sorted(FNS))
@pytest.mark.parametrize("world_size", [2, 4])
def test_matches_full_attention(world_size, fn, case, dtype):
    for rank, res in enumerate(_results(world_size)):
        report = res["accuracy"][(fn, case, dtype)]
        assert report["tiers"] and all(t in (1, 2) for t in report["tiers"]), report["tiers"]  # noflash tiles ran
        for name in ("out", "dq", "dk", "dv"):
            err, tol = report[name]
            assert err <= tol, f"rank {rank} {name}: error {err:.3e} > {tol:.3e}"


@pytest.mark.parametrize("case", ["plain", "causal_gqa_ev"])
@pytest.mark.parametrize("world_size", [2, 4])
def test_ring_lse_output_and_its_gradient(world_size, case):
    for rank, res in enumerate(_results(world_size)):
        for name, (err, tol) in res["accuracy"][("ring_lse", case)].items():
            assert err <= tol, f"rank {rank} {name}: relative error {err:.3e} > {tol:.3e}"


ERROR_CASES = {
    "ring_wrong_shape_on_one_rank": ("RuntimeError", "query shapes differ across ranks"),
    "ulysses_wrong_shape_on_one_rank": ("RuntimeError", "query shapes differ across ranks"),
    "ring_dtype_on_one_rank": ("RuntimeError", "dtype differs across ranks"),
    "ulysses_heads_not_divisible": ("RuntimeError", "query heads (3) must be divisible by the group size"),
    "ulysses_gqa_kv_heads_not_divisible": ("RuntimeError", "key heads"),
    "ring_is_causal_on_one_rank": ("RuntimeError", "is_causal differs across ranks"),
    "ring_not_a_tensor_on_one_rank": ("TypeError", "query must be a Tensor"),
    "ulysses_requires_grad_on_one_rank": ("RuntimeError", "needs_grad differs across ranks"),
    "ring_causal_cross_lengths": ("RuntimeError", "is_causal=True needs query and key/value shards"),
    "ring_local_dtype_mismatch": ("RuntimeError", "one floating dtype"),
}


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
@pytest.mark.parametrize("world_size", [2, 4])
def test_bad_input_raises_the_same_error_on_every_rank(world_size, case):
    results = _results(world_size)
    raised = [res["errors"][case] for res in results]
    assert all(r is not None for r in raised), raised
    assert len(set(raised)) == 1, raised  # same type and message everywhere
    exc_type, message = raised[0]
    want_type, want_text = ERROR_CASES[case]
    assert exc_type == want_type and want_text in message, raised[0]
    assert all(res["errors"]["after"] == (1, 2, 4, 8) for res in results)  # the group still works


@pytest.mark.parametrize("fn", sorted(FNS))
def test_per_rank_memory_shrinks_with_more_ranks(fn):
    peak2 = max(res["memory"][fn] for res in _results(2))
    peak4 = max(res["memory"][fn] for res in _results(4))
    assert peak4 <= MEMORY_RATIO * peak2, (peak2, peak4, peak4 / peak2)


@pytest.mark.parametrize("fn", sorted(FNS))
@pytest.mark.parametrize("world_size", [2, 4])
def test_sent_bytes_formula_matches_what_is_sent(world_size, fn):
    c = COMM_SHAPE
    want = sent_bytes(fn, c["tokens"], c["hq"], c["hk"], c["e"], c["ev"], 4, world_size, backward=True)
    assert [res["comm"][fn] for res in _results(world_size)] == [want] * world_size


def test_bench_command_runs_and_checks_on_two_cpu_processes():
    """The README's CPU command (smaller): both modes, forward and backward, against full math SDPA."""
    cmd = [sys.executable, "-m", "noflash_core.distributed", "--spawn", "2", "--tokens", "64", "--heads", "2",
           "--head-dim", "8", "--backward", "--check", "--repeat", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if "max abs error" in ln]
    assert len(lines) == 4 and {ln.split()[2] for ln in lines} == {"ring", "ulysses"}, proc.stderr[-3000:]
    assert all(float(ln.rsplit(" ", 1)[1]) < 1e-5 for ln in lines), lines


def test_merge_partials_is_exact_and_keeps_empty_rows_empty():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(3, 10, dtype=torch.float64, generator=g)
    scores[1, :] = float("-inf")
    values = torch.randn(10, 4, dtype=torch.float64, generator=g)
    out, lse = None, None
    for part in (slice(0, 3), slice(3, 7), slice(7, 10)):
        s = scores[:, part]
        block_lse = s.logsumexp(-1)
        block_out = torch.nan_to_num(torch.softmax(s, -1)) @ values[part]
        out, lse = merge_partials(out, lse, block_out, block_lse)
    full = torch.nan_to_num(torch.softmax(scores, -1)) @ values
    assert torch.allclose(out, full, rtol=0, atol=1e-14)
    assert torch.isneginf(lse[1]) and (out[1] == 0).all()
    assert torch.allclose(lse[[0, 2]], scores[[0, 2]].logsumexp(-1), rtol=0, atol=1e-14)


def test_without_process_group_says_how_to_start_one():
    x = torch.randn(1, 2, 4, 8)
    for fn in FNS.values():
        with pytest.raises(RuntimeError, match="init_process_group"):
            fn(x, x, x)


def test_full_reference_is_math_sdpa():
    """Sanity of the harness's reference: math SDPA in float64 equals the textbook formula."""
    q, k, v, _ = _full_inputs(CASES["causal"], torch.float64, 2)
    scores = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
    scores = scores.masked_fill(~torch.ones(scores.shape[-2:], dtype=torch.bool).tril(), float("-inf"))
    assert torch.allclose(math_sdpa(q, k, v, is_causal=True), torch.softmax(scores, -1) @ v, atol=1e-13)
