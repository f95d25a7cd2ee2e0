"""diffusers end to end through noflash's SDPA: tiny random-weight blocks and models, no download.

Three attention call sites of diffusers 0.4x; each looks ``torch.nn.functional.scaled_dot_product_attention`` up
at call time, so the global patch reaches it:

* ``BasicTransformerBlock`` (``AttnProcessor2_0``): self-attention without a mask and cross-attention with a bool
  encoder mask ``(B, H, 1, S)``; forward and a backward pass.
* a tiny ``UNet2DConditionModel``: ``encoder_attention_mask`` becomes an additive float mask ``(B, H, 1, S)``
  (``-10000`` on padding) for the cross-attention; self- and cross-attention at 16x16 and 8x8 latents.
* a tiny ``FluxTransformer2DModel`` (one double-stream and one single-stream block): the ``dispatch_attention_fn``
  "native" backend, which passes ``query=``, ``key=``, ``value=`` as keywords on permuted (non-contiguous) tensors.

Each runs through the real global patch (``"auto"``, with a small ``NOFLASH_BUDGET_MB`` so that these small problems
take the tiled path) and through each pinned tier with 16x16 blocks; see ``tests/support/sdpa_route.py``. Results
are compared with torch's SDPA against a float64 reference.
"""

from __future__ import annotations

from typing import Dict, Iterator

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from tests.support.sdpa_route import MODES, RouteThrough, assert_close_to_float64, isolate_hub  # noqa: E402

BLOCK = 16


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No downloads, default noflash settings, and torch's own SDPA for the references."""
    yield from isolate_hub(monkeypatch)


def _seeded(factory, dtype: torch.dtype) -> torch.nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)
        module = factory()
    return module.to(dtype).eval()


def _randn(*shape: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def _cast(inputs: Dict[str, torch.Tensor], dtype: torch.dtype) -> Dict[str, torch.Tensor]:
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}


def _sample_three_ways(factory, inputs: Dict[str, torch.Tensor], mode):
    """``.sample`` of a seeded model in float64 and float32 with torch's SDPA, then float32 routed through
    noflash. Returns ``(got, ref32, ref64, routed_records, model32)``."""
    model32 = _seeded(factory, torch.float32)
    model64 = _seeded(factory, torch.float64)
    with torch.no_grad():
        ref64 = model64(**_cast(inputs, torch.float64)).sample
        ref32 = model32(**inputs).sample
        with RouteThrough(mode, block=BLOCK) as through:
            got = model32(**inputs).sample
    return got, ref32, ref64, through, model32


# --- BasicTransformerBlock -----------------------------------------------------------------------------------------


def _basic_block() -> torch.nn.Module:
    from diffusers.models.attention import BasicTransformerBlock

    return BasicTransformerBlock(dim=64, num_attention_heads=4, attention_head_dim=16, cross_attention_dim=32)


def _basic_block_inputs() -> Dict[str, torch.Tensor]:
    """hidden (2, 256, 64), context (2, 12, 32), bool encoder mask (2, 12): row 1 keeps 8 tokens."""
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, 8:] = False
    return {
        "hidden_states": _randn(2, 256, 64, seed=1),
        "encoder_hidden_states": _randn(2, 12, 32, seed=2),
        "encoder_attention_mask": mask,
    }


def _block_forward_backward(block: torch.nn.Module, inputs: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Output and the gradients of a fixed random projection of it w.r.t. every parameter and the hidden states."""
    block.zero_grad(set_to_none=True)
    inputs = dict(inputs)
    hidden = inputs["hidden_states"].clone().requires_grad_(True)
    inputs["hidden_states"] = hidden
    out = block(**inputs)
    (out * _randn(*out.shape, seed=3, dtype=out.dtype)).sum().backward()
    result = {name: p.grad.detach().clone() for name, p in block.named_parameters() if p.grad is not None}
    result["<output>"] = out.detach()
    result["<grad hidden_states>"] = hidden.grad.detach()
    return result


@pytest.mark.parametrize("mode", MODES, ids=lambda m: f"tier_{m}")
def test_basic_transformer_block(mode) -> None:
    inputs = _basic_block_inputs()
    block32 = _seeded(_basic_block, torch.float32)
    block64 = _seeded(_basic_block, torch.float64)
    if mode == 3:  # tier 3 is inference-only: forward only
        with torch.no_grad():
            ref64 = {"<output>": block64(**_cast(inputs, torch.float64))}
            ref32 = {"<output>": block32(**inputs)}
            with RouteThrough(mode, block=BLOCK) as through:
                got = {"<output>": block32(**inputs)}
    else:
        ref64 = _block_forward_backward(block64, _cast(inputs, torch.float64))
        ref32 = _block_forward_backward(block32, inputs)
        with RouteThrough(mode, block=BLOCK) as through:
            got = _block_forward_backward(block32, inputs)
        assert any("attn2.to_k" in name for name in got)

    # One self-attention (S=256, no mask) and one cross-attention (S=12, bool mask) call, both tiled.
    assert [r.shape[-2] for r in through.records] == [256, 256], through.records
    assert not any(r.tier == 0 for r in through.records), through.by_tier()
    assert got.keys() == ref32.keys() == ref64.keys()
    for name in ref64:
        assert_close_to_float64(name, got[name], ref32[name], ref64[name])


# --- UNet2DConditionModel ------------------------------------------------------------------------------------------


def _tiny_unet() -> torch.nn.Module:
    return diffusers.UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
    )


@pytest.mark.parametrize("mode", MODES, ids=lambda m: f"tier_{m}")
def test_unet_with_encoder_mask(mode) -> None:
    mask = torch.ones(2, 12)
    mask[1, 9:] = 0
    inputs = {
        "sample": _randn(2, 4, 16, 16, seed=4),
        "timestep": torch.tensor([10, 500]),
        "encoder_hidden_states": _randn(2, 12, 32, seed=5),
        "encoder_attention_mask": mask,
    }
    got, ref32, ref64, through, unet32 = _sample_three_ways(_tiny_unet, inputs, mode)

    # Transformer blocks at 16x16 (256 tokens: down and up path) and 8x8 (64 tokens: mid block), each with self- and
    # cross-attention: one call per Attention module, every one tiled.
    assert len(through.records) == len(_attention_modules(unet32)) == 8
    assert {r.shape[-2] for r in through.records} == {256, 64}
    assert not any(r.tier == 0 for r in through.records), through.by_tier()
    assert_close_to_float64("unet sample", got, ref32, ref64)


def _attention_modules(model: torch.nn.Module) -> list:
    from diffusers.models.attention_processor import Attention

    return [m for m in model.modules() if isinstance(m, Attention)]


# --- FluxTransformer2DModel ----------------------------------------------------------------------------------------


def _tiny_flux() -> torch.nn.Module:
    return diffusers.FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=(4, 6, 6),
    )


def _flux_inputs(side: int = 16, text: int = 8) -> Dict[str, torch.Tensor]:
    img_ids = torch.zeros(side * side, 3)
    img_ids[:, 1] = torch.arange(side).repeat_interleave(side)
    img_ids[:, 2] = torch.arange(side).repeat(side)
    return {
        "hidden_states": _randn(1, side * side, 16, seed=6),
        "encoder_hidden_states": _randn(1, text, 32, seed=7),
        "pooled_projections": _randn(1, 32, seed=8),
        "timestep": torch.tensor([0.5]),
        "img_ids": img_ids,
        "txt_ids": torch.zeros(text, 3),
    }


@pytest.mark.parametrize("mode", MODES, ids=lambda m: f"tier_{m}")
def test_flux_transformer(mode) -> None:
    inputs = _flux_inputs()
    got, ref32, ref64, through, _ = _sample_three_ways(_tiny_flux, inputs, mode)

    # Joint attention over 8 text + 256 image tokens, once per block.
    assert [r.shape[-2] for r in through.records] == [264, 264]
    assert not any(r.tier == 0 for r in through.records), through.by_tier()
    assert_close_to_float64("flux sample", got, ref32, ref64)
