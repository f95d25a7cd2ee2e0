"""Attention Patcher and Tier Selector on tiny random Wan and Flux models inside a real ComfyUI (CPU)."""

from __future__ import annotations

import copy

import pytest
import torch
from comfy_runtime import flux_conditioning, wan_conditioning

from noflash_core.memory.tracker import LiveBytesTracker

OVERRIDE = "optimized_attention_override"


def _sample(model, latent, positive, negative, steps=3, cfg=5.0):
    import comfy.sample

    noise = comfy.sample.prepare_noise(latent, 0)
    return comfy.sample.sample(model, noise, steps, cfg, "euler", "simple", positive, negative, latent, seed=0,
                               disable_pbar=True)


def _patch(comfy, model, enabled=True, min_tokens=0, budget_mb=0):
    return comfy.node("NoFlashAttentionPatcher").execute(model, enabled, min_tokens, budget_mb).result[0]


def _pin(comfy, model, tier, block_m=0, block_n=0):
    return comfy.node("NoFlashTierSelector").execute(model, tier, block_m, block_n).result[0]


def _last_run(comfy):
    return comfy.module("noflash_core.comfy.telemetry").default_history().latest()


def _spy_override(seen):
    """A stand-in for another pack's override: records what reaches it, then runs ComfyUI's own attention."""

    def spy(func, *args, **kwargs):
        q, k = args[0], args[1]
        seen.append((tuple(q.shape), tuple(k.shape), kwargs.get("skip_reshape", False)))
        return func(*args, **kwargs)

    return spy


def _with_override(model, override):
    m = model.clone()
    m.model_options.setdefault("transformer_options", {})[OVERRIDE] = override
    return m


def test_wan_patched_sampling_matches_and_original_is_untouched(comfy, tiny_wan):
    options_before = copy.deepcopy(tiny_wan.model_options)
    positive, negative = wan_conditioning()
    latent = torch.zeros(1, 16, 2, 16, 16)  # 2 x 8 x 8 = 128 tokens per attention call
    reference = _sample(tiny_wan, latent, positive, negative)

    patched = _patch(comfy, tiny_wan)
    pinned = _pin(comfy, patched, "2", 32, 32)
    for model, tier in ((patched, None), (pinned, "2")):
        assert model is not tiny_wan and model.model is tiny_wan.model  # a clone sharing the module
        out = _sample(model, latent, positive, negative)
        torch.testing.assert_close(out, reference, atol=1e-4, rtol=1e-4)
        run = _last_run(comfy)
        assert run["state"] == "done" and run["label"] == "WAN21"
        assert run["calls"] == 3 * 2 * 2  # 3 steps (cond+uncond batched) x 2 blocks x (self + cross attention)
        assert "comfy" not in run["tiers"]
        if tier is not None:
            assert run["tiers"] == {tier: 12} and run["active_tier"] == int(tier)
            assert (run["block_m"], run["block_n"]) == (32, 32)
        assert run["peak_bytes"] is None and run["peak_source"] == "not tracked on CPU"

    assert tiny_wan.model_options == options_before
    assert OVERRIDE not in tiny_wan.model_options.get("transformer_options", {})
    torch.testing.assert_close(_sample(tiny_wan, latent, positive, negative), reference, atol=0, rtol=0)


def test_flux_patched_sampling_matches(comfy, tiny_flux):
    positive, negative = flux_conditioning()
    latent = torch.zeros(1, 16, 16, 16)  # 8 x 8 = 64 image tokens + 16 text tokens, skip_reshape layout
    reference = _sample(tiny_flux, latent, positive, negative, steps=2, cfg=1.0)
    options_before = copy.deepcopy(tiny_flux.model_options)

    pinned = _pin(comfy, _patch(comfy, tiny_flux), "2", 16, 16)
    out = _sample(pinned, latent, positive, negative, steps=2, cfg=1.0)
    scale = reference.abs().max()
    torch.testing.assert_close(out / scale, reference / scale, atol=1e-4, rtol=1e-4)
    run = _last_run(comfy)
    assert run["label"] == "Flux"
    assert run["tiers"] == {"2": 2}  # 2 steps x 1 double block, cfg 1 runs no uncond
    assert run["max_q_len"] == 64 + 16
    assert tiny_flux.model_options == options_before


def test_sd3_joint_attention_is_patched(comfy, tiny_sd3):
    # SD3's joint blocks pass v as (b, n, h, d) next to (b, n, h*d) q and k.
    g = torch.Generator().manual_seed(3)

    def cond():
        return [[torch.randn(1, 77, 768, generator=g), {"pooled_output": torch.randn(1, 768, generator=g)}]]

    positive, negative = cond(), cond()
    latent = torch.zeros(1, 16, 16, 16)
    reference = _sample(tiny_sd3, latent, positive, negative, steps=2, cfg=3.0)
    out = _sample(_pin(comfy, _patch(comfy, tiny_sd3), "2", 16, 16), latent, positive, negative, steps=2, cfg=3.0)
    torch.testing.assert_close(out, reference, atol=1e-4, rtol=1e-4)
    run = _last_run(comfy)
    assert run["label"] == "SD3" and run["tiers"] == {"2": 4}  # 2 steps x 2 joint blocks (cond+uncond batched)
    assert run["max_q_len"] == 77 + 64


def test_a_clone_of_a_patched_model_shares_the_override_and_its_run_history(comfy, tiny_wan):
    # Other nodes clone the patched model; ModelPatcher.clone() deep-copies model_options. The override must stay
    # the same object, and the clone's calls must reach the run history the Attention Patcher reports.
    patched = _patch(comfy, tiny_wan)
    clone = patched.clone()
    assert clone.model_options is not patched.model_options
    override = patched.model_options["transformer_options"][OVERRIDE]
    assert clone.model_options["transformer_options"][OVERRIDE] is override
    positive, negative = wan_conditioning()
    _sample(clone, torch.zeros(1, 16, 2, 16, 16), positive, negative, steps=1, cfg=1.0)
    run = _last_run(comfy)
    assert run["state"] == "done" and run["calls"] == 4 and "comfy" not in run["tiers"], run


def test_tier_selector_patches_a_model_that_has_no_patch(comfy, tiny_wan):
    override_mod = comfy.module("noflash_core.comfy.override")
    pinned = _pin(comfy, tiny_wan, "1")
    fn = pinned.model_options["transformer_options"][OVERRIDE]
    assert override_mod.is_noflash_override(fn)
    assert override_mod.override_config(fn).tier == 1
    assert override_mod.override_config(fn).min_tokens == override_mod.OverrideConfig().min_tokens
    assert OVERRIDE not in tiny_wan.model_options.get("transformer_options", {})


def test_disabled_and_short_calls_go_to_comfyui_through_a_chained_override(comfy, tiny_wan):
    positive, negative = wan_conditioning()
    latent = torch.zeros(1, 16, 2, 16, 16)
    seen = []
    foreign = _with_override(tiny_wan, _spy_override(seen))

    _sample(_patch(comfy, foreign, min_tokens=200), latent, positive, negative, steps=1, cfg=1.0)
    assert len(seen) == 4  # every call is below 200 tokens: all reach the other pack's override
    assert _last_run(comfy)["tiers"] == {"comfy": 4}

    seen.clear()
    _sample(_patch(comfy, foreign, enabled=False), latent, positive, negative, steps=1, cfg=1.0)
    assert len(seen) == 4

    seen.clear()
    _sample(_patch(comfy, foreign, min_tokens=0), latent, positive, negative, steps=1, cfg=1.0)
    assert seen == []  # all computed by noflash
    assert foreign.model_options["transformer_options"][OVERRIDE].__name__ == "spy"


def _zero_attention(func, *args, **kwargs):
    """An override that computes no attention (zeros of the output's shape): the model's memory without it."""
    q, v = args[0], args[2]
    return torch.zeros(*q.shape[:-1], v.shape[-1], dtype=q.dtype)


def test_long_sequence_is_computed_by_noflash_far_below_n_squared(comfy, tiny_wan):
    positive, negative = wan_conditioning()
    latent = torch.zeros(1, 16, 1, 128, 128)  # 64 x 64 = 4096 tokens
    n, heads = 64 * 64, 2
    scores_bytes = heads * n * n * 4  # one fp32 score matrix over all heads: 128 MiB

    seen = []
    unpatched = _with_override(tiny_wan, _spy_override(seen))  # ComfyUI's own attention (sub-quadratic on CPU)
    patched = _patch(comfy, unpatched, min_tokens=1024, budget_mb=32)
    no_attention = _with_override(tiny_wan, _zero_attention)

    def peak(model):
        with LiveBytesTracker() as tracker:
            out = _sample(model, latent, positive, negative, steps=1, cfg=1.0)
            return out, tracker.peak_bytes

    _, base_peak = peak(no_attention)  # also loads the model once
    reference, comfy_peak = peak(unpatched)
    seen.clear()
    out, noflash_peak = peak(patched)

    assert seen == []  # ComfyUI's func never ran: noflash computed every call itself
    run = _last_run(comfy)
    assert run["max_q_len"] == n and "comfy" not in run["tiers"]
    # Self-attention (4096 x 4096) is tiled; cross-attention (4096 x 24 text tokens) fits the budget whole and may
    # take noflash's fast path (tier 0: torch's own SDPA, chosen by noflash's planner, not ComfyUI's func).
    assert sum(count for tier, count in run["tiers"].items() if tier in ("1", "2", "3")) >= 2
    torch.testing.assert_close(out, reference, atol=1e-4, rtol=1e-4)
    comfy_extra, noflash_extra = comfy_peak - base_peak, noflash_peak - base_peak
    print(f"\nWan, 4096 tokens, 1 step, attention's share of the peak: ComfyUI sub-quad {comfy_extra / 2**20:.1f} MiB, "
          f"noflash {noflash_extra / 2**20:.1f} MiB (one N^2 score matrix: {scores_bytes / 2**20:.0f} MiB; model "
          f"without attention {base_peak / 2**20:.1f} MiB); tiers {run['tiers']}")
    assert comfy_extra >= scores_bytes  # the peer really holds N^2 scores here
    assert noflash_extra < scores_bytes / 8


def test_attention_wrapper_direct_call_at_8192_tokens(comfy):
    """ComfyUI's own wrap_attn entry point with our override in transformer_options, at a sequence where one
    score matrix is 512 MiB."""
    import comfy.ldm.modules.attention as attention

    override_mod = comfy.module("noflash_core.comfy.override")
    records = []
    override = override_mod.make_attention_override(
        override_mod.OverrideConfig(min_tokens=1024, budget_bytes=16 << 20), recorder=records.append)
    b, heads, n, d = 1, 2, 8192, 64
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, n, heads * d, generator=g) for _ in range(3))
    with LiveBytesTracker() as tracker:
        out = attention.optimized_attention(q, k, v, heads, transformer_options={OVERRIDE: override})
        peak = tracker.peak_bytes
    assert out.shape == (b, n, heads * d)
    assert len(records) == 1 and records[0].path == "noflash" and records[0].tier >= 1
    scores_bytes = b * heads * n * n * 4
    print(f"\n8192 tokens via wrap_attn: peak {peak / 2**20:.1f} MiB (output {out.numel() * 4 / 2**20:.0f} MiB) vs "
          f"{scores_bytes / 2**20:.0f} MiB for one score matrix; tier {records[0].tier}")
    assert peak < scores_bytes / 16
    rows = torch.arange(0, n, 509)
    qh, kh, vh = (t.view(b, n, heads, d).transpose(1, 2) for t in (q, k, v))
    ref = torch.nn.functional.scaled_dot_product_attention(qh[:, :, rows], kh, vh)
    ref = ref.transpose(1, 2).reshape(b, -1, heads * d)
    torch.testing.assert_close(out[:, rows], ref, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("mask_form", ["flux_(b,L,L)", "lumina_(b,1,L)_bool"])
def test_masks_through_comfyui_wrapper_match_attention_pytorch(comfy, mask_form):
    import comfy.ldm.modules.attention as attention

    override_mod = comfy.module("noflash_core.comfy.override")
    override = override_mod.make_attention_override(override_mod.OverrideConfig(min_tokens=0, tier=2, block_m=16,
                                                                                 block_n=16))
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 3, 50, 32, generator=g) for _ in range(3))
    if mask_form == "flux_(b,L,L)":
        mask = torch.randn(2, 50, 50, generator=g)
    else:
        mask = torch.ones(2, 1, 50, dtype=torch.bool)
        mask[1, :, 40:] = False
    out = attention.optimized_attention(q, k, v, 3, mask=mask, skip_reshape=True,
                                        transformer_options={OVERRIDE: override})
    ref = attention.attention_pytorch(q, k, v, 3, mask=mask, skip_reshape=True)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
