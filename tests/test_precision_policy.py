"""Precision policy and pass-through cases: bf16 without bf16 hardware, nested tensors."""

from __future__ import annotations

from dataclasses import replace

import torch

import noflash_core as nc
from noflash_core import tiles
from noflash_core.device import get_preset
from noflash_core.tiles import TileMath


def test_cpu_keeps_fp32_operands_for_half_inputs():
    for dtype in (torch.float16, torch.bfloat16):
        x = torch.randn(2, 8, dtype=dtype)
        assert TileMath.for_inputs(x, x, x) == TileMath(torch.float32, torch.float32)
    x = torch.randn(2, 8, dtype=torch.float64)
    assert TileMath.for_inputs(x, x, x) == TileMath(torch.float64, torch.float64)


def test_bf16_without_hardware_uses_fp16_only_where_values_fit(monkeypatch):
    # Real CPU tensors read as a GPU with fp32-output half matmuls but no bf16 units (gfx906's profile).
    gfx906 = get_preset("gfx906")
    assert not gfx906.bf16 and gfx906.half_out_fp32
    monkeypatch.setattr(tiles, "device_profile", lambda device: gfx906)
    small = torch.randn(4, 8).bfloat16()
    assert TileMath.for_inputs(small, small, small).operand_dtype == torch.float16
    big = (torch.randn(4, 8) * 1e5).bfloat16()  # beyond fp16's 65504: fp16 would make inf
    assert TileMath.for_inputs(small, big, small).operand_dtype == torch.float32
    fp16 = torch.randn(4, 8).half()
    assert TileMath.for_inputs(fp16, fp16, fp16).operand_dtype == torch.float16
    monkeypatch.setattr(tiles, "device_profile", lambda device: replace(gfx906, bf16=True))
    assert TileMath.for_inputs(small, small, small).operand_dtype == torch.bfloat16


def test_nested_tensors_go_to_torch():
    q = torch.nested.nested_tensor([torch.randn(2, 5, 8), torch.randn(2, 7, 8)], layout=torch.jagged).transpose(1, 2)
    out = nc.scaled_dot_product_attention(q, q, q)
    expected = torch.nn.functional.scaled_dot_product_attention(q, q, q)
    assert out.is_nested
    for a, b in zip(out.unbind(), expected.unbind()):
        assert torch.allclose(a, b)


def test_fp32_note_logged_once_off_cpu(caplog, monkeypatch):
    # The meta device stands in for a GPU: the tiled path runs there without allocating.
    from noflash_core import dispatch as sdpa_module

    monkeypatch.setattr(sdpa_module, "_fp32_note_logged", False)
    q = torch.empty(1, 2, 1024, 16, device="meta")
    with caplog.at_level("INFO", logger="noflash_core.dispatch"):
        for _ in range(3):
            assert nc.scaled_dot_product_attention(q, q, q, tier=2).shape == q.shape
        nc.scaled_dot_product_attention(q.half(), q.half(), q.half(), tier=2)
    notes = [r for r in caplog.records if "fp16 inputs are about 2x faster" in r.getMessage()]
    assert len(notes) == 1


def test_no_fp32_note_on_cpu(caplog, monkeypatch):
    from noflash_core import dispatch as sdpa_module

    monkeypatch.setattr(sdpa_module, "_fp32_note_logged", False)
    q = torch.randn(1, 2, 1024, 16)
    with caplog.at_level("INFO", logger="noflash_core.dispatch"):
        nc.scaled_dot_product_attention(q, q, q, tier=2)
    assert "2x faster" not in caplog.text
