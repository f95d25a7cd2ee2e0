"""The yunchang adapter on 4 real gloo processes: yunchang 0.6.4's layers with noflash give single-process results.

Covers ``LongContextAttention`` (Ulysses x Ring) in three splits of 4 ranks, ``UlyssesAttention`` with ``AttnType.FA``
(flash-attn is not installed: the adapter takes it over), and yunchang's own step-by-step ring forward (the loop
xDiT copies), which merges the per-step log-sum-exps that the adapter now returns. Skipped without yunchang.
"""

from __future__ import annotations

import math

import pytest
import torch

from tests.support.distributed import run_ranks_once
from tests.support.reference import math_sdpa, tolerance

pytest.importorskip("yunchang")

WORLD = 4
TOKENS_PER_RANK = 12
SPLITS = {"ulysses2_ring2": (2, 2), "ulysses4": (4, 1), "ring4": (1, 4)}
# name: (query heads, key/value heads, E, Ev, causal)
CASES = {"plain": (4, 4, 8, 8, False), "causal_gqa": (8, 4, 8, 8, True)}


def _full(case, dtype, seed=0):
    hq, hk, e, ev, _ = case
    n = TOKENS_PER_RANK * WORLD
    g = torch.Generator().manual_seed(seed)
    shapes = [(2, n, hq, e), (2, n, hk, e), (2, n, hk, ev), (2, n, hq, ev)]  # yunchang's (b, s, h, d)
    return [torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in shapes]


def _reference(q, k, v, dout, causal):
    """Single-process attention in yunchang's layout: output and q/k/v gradients."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    qh, kh, vh = (t.transpose(1, 2) for t in leaves)
    out = math_sdpa(qh, kh, vh, is_causal=causal, enable_gqa=qh.shape[1] != kh.shape[1]).transpose(1, 2)
    out.backward(dout)
    return [out.detach()] + [t.grad for t in leaves]


def _errors(ours, q, k, v, dout, causal, rows):
    """(error, tolerance) per tensor: fp64 relative 1e-9, fp32 from math's own error."""
    truth = _reference(*(t.double() for t in (q, k, v, dout)), causal)
    math = _reference(q, k, v, dout, causal)
    res = {}
    for name, got, exact, m in zip(("out", "dq", "dk", "dv"), ours, truth, math):
        if got is None:
            continue
        exact, m = exact[:, rows], m[:, rows]
        err = (got.double() - exact).abs().max().item()
        res[name] = (err / exact.abs().max().item(), 1e-9) if got.dtype == torch.float64 else (err, tolerance(m, exact))
    return res


def _run_layer(layer, q, k, v, dout, rows, **kw):
    leaves = [t[:, rows].detach().clone().requires_grad_(True) for t in (q, k, v)]
    out = layer(*leaves, **kw)
    out.backward(dout[:, rows])
    return [out.detach()] + [t.grad for t in leaves]


def _scenarios(rank, world_size):
    import yunchang
    from yunchang.kernels import AttnType
    from yunchang.ring.ring_flash_attn import ring_flash_attn_forward

    from noflash_core.integrations import yunchang as adapter

    results = {}
    rows = slice(rank * TOKENS_PER_RANK, (rank + 1) * TOKENS_PER_RANK)
    adapter.enable()
    try:
        for split, (ud, rd) in SPLITS.items():
            yunchang.set_seq_parallel_pg(ud, rd, rank, world_size)
            layer = yunchang.LongContextAttention(ring_impl_type="basic", attn_type=AttnType.TORCH_MATH)
            for case_name, case in CASES.items():
                for dtype in (torch.float64, torch.float32):
                    q, k, v, dout = _full(case, dtype)
                    ours = _run_layer(layer, q, k, v, dout, rows, causal=case[-1])
                    results[("long_context", split, case_name, str(dtype))] = _errors(ours, q, k, v, dout, case[-1],
                                                                                      rows)
        # UlyssesAttention with AttnType.FA, built after enable(): flash-attn is absent, noflash runs it.
        ulysses = yunchang.UlyssesAttention(None, attn_type=AttnType.FA)
        q, k, v, dout = _full(CASES["causal_gqa"], torch.float64)
        ours = _run_layer(ulysses, q, k, v, dout, rows, causal=True)
        results[("ulysses_fa", "world", "causal_gqa", "torch.float64")] = _errors(ours, q, k, v, dout, True, rows)
        # yunchang's own per-step ring (what xDiT's ring copies): it merges the lse the adapter now returns.
        q, k, v, dout = _full(CASES["plain"], torch.float32)
        with torch.no_grad():
            out, lse = ring_flash_attn_forward(
                None, *(t[:, rows].contiguous() for t in (q, k, v)), 1 / math.sqrt(q.shape[-1]), causal=False,
                attn_type=AttnType.TORCH_MATH,
            )
        results[("yunchang_ring_forward", "world", "plain", "torch.float32")] = _errors(
            [out, None, None, None], q, k, v, dout, False, rows
        )
    finally:
        adapter.disable()
    import yunchang.kernels as kernels

    results["restored"] = kernels.pytorch_attn_forward.__module__.startswith("yunchang") and not adapter.is_enabled()
    return results


def _results():
    return run_ranks_once(_scenarios, WORLD, timeout_s=400)


SCENARIOS = [
    ("long_context", split, case, dtype)
    for split in SPLITS for case in CASES for dtype in ("torch.float64", "torch.float32")
] + [
    ("ulysses_fa", "world", "causal_gqa", "torch.float64"),
    ("yunchang_ring_forward", "world", "plain", "torch.float32"),
]


@pytest.mark.parametrize("scenario", SCENARIOS, ids=["-".join(s) for s in SCENARIOS])
def test_yunchang_layers_match_single_process_attention(scenario):
    for rank, res in enumerate(_results()):
        for name, (err, tol) in res[scenario].items():
            assert err <= tol, f"rank {rank} {name}: error {err:.3e} > {tol:.3e}"


def test_disable_restores_yunchang():
    assert all(res["restored"] for res in _results())


def test_enable_rejects_unknown_types_and_needs_no_process_group():
    from noflash_core.integrations import yunchang as adapter

    with pytest.raises(ValueError, match="unknown yunchang AttnType"):
        adapter.enable(["NOT_A_TYPE"])
    assert not adapter.is_enabled()
    adapter.enable()
    try:
        import yunchang.kernels as kernels

        assert adapter.taken_over(kernels.AttnType.TORCH_FLASH)
        fn = kernels.select_flash_attn_impl(kernels.AttnType.TORCH_FLASH, stage="fwd-only")
        q = torch.randn(1, 6, 2, 8, dtype=torch.float64)
        out, lse = fn(q, q, q, softmax_scale=None, causal=True)
        ref = math_sdpa(*(t.transpose(1, 2) for t in (q, q, q)), is_causal=True).transpose(1, 2)
        assert torch.allclose(out, ref, atol=1e-12) and lse.shape == (1, 2, 6) and lse.dtype == torch.float64
    finally:
        adapter.disable()
    assert not adapter.taken_over(kernels.AttnType.TORCH_FLASH)
