"""Hugging Face transformers end to end through noflash's SDPA.

A tiny random-weight Llama-style causal LM (2 layers, hidden 64, 4 query heads over 2 key/value heads, so GQA) is
built from a config with ``attn_implementation="sdpa"``; nothing is downloaded. transformers looks
``torch.nn.functional.scaled_dot_product_attention`` up at call time, so the global patch reaches it.

Two ways in:

* ``"auto"``: the real global patch, ``noflash_core.patched(threshold=0)``, with ``NOFLASH_BUDGET_MB`` set small
  enough that the 40-token prefill is not a "trivially small problem" for the planner. The prefill then runs tiled;
  the decode steps (query length 1, or 2 with left padding, where transformers packs the GQA group into the query
  rows) stay on torch's own SDPA (tier 0, "decode-sized query"). Under grad the planner never takes the fast path,
  so the training step is tiled whatever the budget.
* a pinned tier (1, 2, 3) with 16x16 blocks: the public ``noflash_core.scaled_dot_product_attention(tier=...)``
  installed in place of torch's SDPA, so that every call, decode included, runs that tier with several blocks.

What transformers sends (transformers 5.x): no mask and ``is_causal=True`` plus ``enable_gqa=True`` for an unpadded
prefill; a bool mask ``(B, 1, L, S)`` with fully masked rows for left padding; a float mask with ``-inf`` when the
caller passes a 4-D float mask.
"""

from __future__ import annotations

from typing import Dict, Iterator, Optional

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tests.support.sdpa_route import MODES, RouteThrough, assert_close_to_float64, isolate_hub  # noqa: E402

VOCAB = 128
LAYERS = 2
PROMPT = 40
NEW_TOKENS = 20
PAD_LEFT = 7
BLOCK = 16


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No downloads, default noflash settings, and torch's own SDPA for the references."""
    yield from isolate_hub(monkeypatch)


def _make_model(dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A random-weight Llama-style causal LM, identical for every call (fixed seed)."""
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        attention_dropout=0.0,
        initializer_range=0.2,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        attn_implementation="sdpa",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)
        model = transformers.LlamaForCausalLM(config)
    assert model.config._attn_implementation == "sdpa"
    return model.to(dtype)


def _prompt(padded: bool) -> Dict[str, torch.Tensor]:
    """``input_ids`` (2, PROMPT) and ``attention_mask`` (2, PROMPT); row 1 left-padded by PAD_LEFT when padded."""
    gen = torch.Generator().manual_seed(99)
    ids = torch.randint(3, VOCAB, (2, PROMPT), generator=gen)
    mask = torch.ones(2, PROMPT, dtype=torch.long)
    if padded:
        ids[1, :PAD_LEFT] = 0
        mask[1, :PAD_LEFT] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _float_mask4d() -> torch.Tensor:
    """The causal + left-padding mask of ``_prompt(True)`` as an additive float mask (2, 1, L, L) with -inf."""
    keep = torch.ones(PROMPT, PROMPT, dtype=torch.bool).tril()[None, None].repeat(2, 1, 1, 1)
    keep = keep & _prompt(True)["attention_mask"].bool()[:, None, None, :]
    return torch.zeros(2, 1, PROMPT, PROMPT).masked_fill(~keep, float("-inf"))


def _generate(model: torch.nn.Module, inputs: Dict[str, torch.Tensor]):
    return model.generate(
        **inputs,
        max_new_tokens=NEW_TOKENS,
        min_new_tokens=NEW_TOKENS,
        do_sample=False,
        pad_token_id=0,
        output_logits=True,
        return_dict_in_generate=True,
    )


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left_padded"])
@pytest.mark.parametrize("mode", MODES, ids=lambda m: f"tier_{m}")
def test_generate_identical_tokens(mode, padded: bool) -> None:
    model = _make_model().eval()
    inputs = _prompt(padded)
    ref = _generate(model, inputs)
    with RouteThrough(mode, block=BLOCK) as through:
        out = _generate(model, inputs)

    # The greedy choice is never a near-tie, so equal tokens are a real check and not luck either way.
    top2 = torch.stack([step.topk(2).values for step in ref.logits])
    assert (top2[..., 0] - top2[..., 1]).min().item() > 1e-3
    assert torch.equal(out.sequences, ref.sequences)
    score_diff = max((a - b).abs().max().item() for a, b in zip(out.logits, ref.logits))
    assert score_diff < 1e-4, score_diff

    # One forward for the prefill, then NEW_TOKENS - 1 decode steps; one SDPA call per layer each.
    assert len(through.records) == LAYERS * NEW_TOKENS, through.by_tier()
    prefill = [r for r in through.records if r.shape[-2] == PROMPT]
    assert len(prefill) == LAYERS
    assert all(r.tier != 0 for r in prefill), prefill
    if mode == "auto":
        # Decode queries are 1 row (2 rows with padding: transformers packs the GQA group into L): fast path.
        decode = [r for r in through.records if r.shape[-2] != PROMPT]
        assert all(r.tier == 0 and "decode" in r.reason for r in decode), decode
        assert len(through.tiled()) == LAYERS
    else:
        assert through.by_tier() == {mode: LAYERS * NEW_TOKENS}
        assert all(r.block_m <= BLOCK for r in prefill)


@pytest.mark.parametrize("mode", MODES, ids=lambda m: f"tier_{m}")
def test_float_and_bool_padding_masks_forward(mode) -> None:
    """The same left-padded batch as a bool mask (built by transformers) and as a 4-D float mask with -inf."""
    model = _make_model().eval()
    model64 = _make_model(torch.float64).eval()
    inputs = _prompt(True)
    ids = inputs["input_ids"]
    with torch.no_grad():
        ref64 = model64(**inputs).logits
        ref64_float = model64(input_ids=ids, attention_mask=_float_mask4d().double()).logits
        ref = model(**inputs).logits
        ref_float = model(input_ids=ids, attention_mask=_float_mask4d()).logits
        with RouteThrough(mode, block=BLOCK) as through:
            got = model(**inputs).logits
            got_float = model(input_ids=ids, attention_mask=_float_mask4d()).logits

    assert len(through.tiled()) == 2 * LAYERS, through.by_tier()
    assert torch.isfinite(got).all() and torch.isfinite(got_float).all()
    assert_close_to_float64("bool-mask logits", got, ref, ref64)
    assert_close_to_float64("float-mask logits", got_float, ref_float, ref64_float)
    # Both masks mean the same thing on the real (non-pad) positions.
    torch.testing.assert_close(got_float[:, PAD_LEFT:], got[:, PAD_LEFT:], rtol=0, atol=1e-5)


def _train_step_grads(
    model: torch.nn.Module, inputs: Dict[str, torch.Tensor], attention_mask: Optional[torch.Tensor]
) -> Dict[str, torch.Tensor]:
    """Loss and gradients of one next-token training step (pad positions are ignored by the loss)."""
    model.train()
    model.zero_grad(set_to_none=True)
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    out = model(input_ids=inputs["input_ids"], attention_mask=attention_mask, labels=labels)
    out.loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    grads["<loss>"] = out.loss.detach().reshape(1)
    return grads


@pytest.mark.parametrize("mask_kind", ["none", "bool", "float"])
@pytest.mark.parametrize("mode", ["auto", 1, 2], ids=lambda m: f"tier_{m}")
def test_training_step_gradients_match(mode, mask_kind: str) -> None:
    """Gradients through the tiled backward vs torch's SDPA, both measured against a float64 reference.

    Tolerance: see :func:`assert_close_to_float64`; in float64 the two must agree to ~1e-12.
    """
    inputs = _prompt(mask_kind != "none")
    mask = {"none": None, "bool": inputs["attention_mask"], "float": _float_mask4d()}[mask_kind]
    model32 = _make_model(torch.float32)
    model64 = _make_model(torch.float64)
    mask64 = mask.double() if mask is not None and mask.is_floating_point() else mask

    ref64 = _train_step_grads(model64, inputs, mask64)
    ref32 = _train_step_grads(model32, inputs, mask)
    with RouteThrough(mode, block=BLOCK) as through:
        got32 = _train_step_grads(model32, inputs, mask)
        got64 = _train_step_grads(model64, inputs, mask64)

    # Forward and backward both through the tiled path: one record per layer per forward.
    assert len(through.records) == 2 * LAYERS
    assert all(r.tier in (1, 2) for r in through.records), through.by_tier()
    if mode != "auto":
        assert through.by_tier() == {mode: 2 * LAYERS}

    assert ref64.keys() == got32.keys() == got64.keys()
    assert any("self_attn.q_proj" in n for n in got32)
    for name, g64 in ref64.items():
        assert_close_to_float64(name, got32[name], ref32[name], g64)
        assert (got64[name] - g64).abs().max().item() <= 1e-12 + 1e-10 * g64.abs().max().item(), name
