"""FFN Chunker (exact, per clone, reversible) and VRAM Probe (returns its ui) inside a real ComfyUI."""

from __future__ import annotations

import torch
from comfy_runtime import wan_conditioning


def _sample(model, latent, positive, negative, steps=2, cfg=5.0):
    import comfy.sample

    noise = comfy.sample.prepare_noise(latent, 0)
    return comfy.sample.sample(model, noise, steps, cfg, "euler", "simple", positive, negative, latent, seed=0,
                               disable_pbar=True)


def _instance_forward(module):
    return module.__dict__.get("forward")


def _is_original_forward(module) -> bool:
    """``forward`` is the class's own: unset, or the bound method ComfyUI's object-patch backup puts back."""
    fwd = _instance_forward(module)
    return fwd is None or getattr(fwd, "__func__", None) is type(module).forward


def test_ffn_chunker_is_exact_per_clone_and_reversible(comfy, tiny_wan):
    positive, negative = wan_conditioning()
    latent = torch.zeros(1, 16, 2, 16, 16)  # 128 tokens, chunked 4 ways
    ffns = [tiny_wan.model.diffusion_model.blocks[i].ffn for i in range(2)]
    assert all(_instance_forward(f) is None for f in ffns)
    reference = _sample(tiny_wan, latent, positive, negative)

    chunked = comfy.node("NoFlashFFNChunker").execute(tiny_wan, 4).result[0]
    keys = sorted(chunked.object_patches)
    assert keys == ["diffusion_model.blocks.0.ffn.forward", "diffusion_model.blocks.1.ffn.forward"]
    assert tiny_wan.object_patches == {}  # the input model is not patched
    assert all(_instance_forward(f) is None for f in ffns)  # nothing applied before the clone loads

    out = _sample(chunked, latent, positive, negative)
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)
    wrappers = [chunked.object_patches[k] for k in keys]
    assert all(w.chunked_calls > 0 and not w.passthrough for w in wrappers), [(w, w.failure) for w in wrappers]
    assert all(isinstance(_instance_forward(f), type(wrappers[0])) for f in ffns)  # applied while the clone runs

    # Running the original again unloads the clone's object patches: the shared modules are restored.
    again = _sample(tiny_wan, latent, positive, negative)
    torch.testing.assert_close(again, reference, atol=0, rtol=0)
    assert all(_is_original_forward(f) for f in ffns)
    calls_after = [w.chunked_calls for w in wrappers]
    _sample(tiny_wan, latent, positive, negative, steps=1)
    assert [w.chunked_calls for w in wrappers] == calls_after  # the original never goes through the chunker


def test_ffn_chunker_then_attention_patcher_compose(comfy, tiny_wan):
    positive, negative = wan_conditioning()
    latent = torch.zeros(1, 16, 2, 16, 16)
    reference = _sample(tiny_wan, latent, positive, negative)
    chunked = comfy.node("NoFlashFFNChunker").execute(tiny_wan, 0).result[0]
    both = comfy.node("NoFlashAttentionPatcher").execute(chunked, True, 0, 0).result[0]
    assert sorted(both.object_patches) == sorted(chunked.object_patches)
    torch.testing.assert_close(_sample(both, latent, positive, negative), reference, atol=1e-4, rtol=1e-4)


def test_vram_probe_returns_ui_text(comfy, tiny_wan):
    probe = comfy.node("NoFlashVRAMProbe")
    # A patched run first, so the probe has a last run to report.
    positive, negative = wan_conditioning()
    patched = comfy.node("NoFlashAttentionPatcher").execute(tiny_wan, True, 0, 0).result[0]
    _sample(patched, torch.zeros(1, 16, 2, 16, 16), positive, negative, steps=1)

    out = probe.execute(1280, 704, 121, 1, "wan2.2-5b", device="gfx1030", model=tiny_wan)
    assert out.ui is not None and isinstance(out.ui["text"], list) and len(out.ui["text"]) == 1
    text = out.ui["text"][0]
    assert out.result[0] == text
    for needle in ("Device: ", "Memory: system RAM", "Efficient SDPA kernel: ", "Last run #", "attention calls",
                   "not tracked", "VERDICT: ", "planned for the gfx1030 profile"):
        assert needle in text, (needle, text)
    assert "Wan" in text or "wan" in text

    assert out.ui["noflash_estimate"][0]["verdict"] in ("fits", "noflash", "no")

    no_model = probe.execute(1024, 1024, 1, 1, "from model").ui
    assert "connect a MODEL or pick a family" in no_model["text"][0]
    assert no_model["noflash_estimate"][0]["components"] == []  # the browser shows "queue to get an estimate"

    unknown = probe.execute(512, 512, 1, 1, "from model", model=tiny_wan).ui["text"][0]
    assert "no shape table for WAN21" in unknown  # the tiny test Wan (dim 256) matches no real Wan

    fingerprint = probe.fingerprint_inputs()
    _sample(patched, torch.zeros(1, 16, 2, 16, 16), positive, negative, steps=1)
    assert probe.fingerprint_inputs() != fingerprint  # a new run makes ComfyUI re-run the probe
