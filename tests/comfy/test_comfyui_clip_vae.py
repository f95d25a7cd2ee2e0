"""NoFlash CLIP Patcher and VAE Patcher inside a real ComfyUI (CPU): exact, per clone, restored, and O(N) memory.

Every comparison has a reference with exact attention: the same model with each attention call computed by math
SDPA in float64 (through the same routing). The tolerance is a multiple of ComfyUI's own error against that
reference plus a few ulps, as in ``tests/support/reference.py``. On CPU ComfyUI's text encoders run
``attention_basic`` and its VAEs ``normal_attention`` (split): those are the originals here.
"""

from __future__ import annotations

import pytest
import tiny_encoders as te
import torch
from comfy_runtime import tiny_clip_l_state_dict
from encoder_checks import CountComfyAttention, assert_exact, exact_clip

from noflash_core.memory.tracker import LiveBytesTracker


def _node(comfy, name, *args):
    return comfy.node(name).execute(*args).result[0]


def _router(clip):
    return clip.patcher.object_patches["encode_token_weights"]


def _no_routed_forward(model) -> bool:
    return all("forward" not in m.__dict__ for m in model.modules())


@pytest.fixture(scope="module")
def clip_l(comfy):
    import comfy.sd

    return comfy.sd.load_text_encoder_state_dicts([tiny_clip_l_state_dict()],
                                                  clip_type=comfy.sd.CLIPType.STABLE_DIFFUSION)


def test_clip_l_patched_equals_original_and_never_calls_comfy_attention(comfy, clip_l, monkeypatch):
    tokens = clip_l.tokenize("a red fox in deep snow, watercolor, highly detailed")
    counter = CountComfyAttention(monkeypatch)
    original = clip_l.encode_from_tokens(tokens, return_pooled=True)
    comfy_calls = counter.calls
    assert comfy_calls == 12  # CLIP-L: one attention_basic call per layer

    before = dict(clip_l.patcher.object_patches)  # ComfyUI 0.33 gives every CLIP a manual_cast_dtype patch
    assert "encode_token_weights" not in before
    patched_clip = _node(comfy, "NoFlashCLIPPatcher", clip_l, True, 0, 0)
    assert clip_l.patcher.object_patches == before  # the input CLIP is not patched
    patched = patched_clip.encode_from_tokens(tokens, return_pooled=True)
    assert counter.calls == comfy_calls  # ComfyUI's own attention was not called by the patched encoder
    stats = _router(patched_clip).stats
    assert stats.calls == {"noflash": 12} and stats.encodes == 1 and stats.max_q_len == 77
    assert _no_routed_forward(clip_l.cond_stage_model)  # nothing stays patched after the encode

    # The original again: ComfyUI's attention, bit-identical to before; other clones are plain.
    again = clip_l.encode_from_tokens(tokens, return_pooled=True)
    assert counter.calls == 2 * comfy_calls
    assert all(torch.equal(a, o) for a, o in zip(again, original))
    plain = clip_l.clone().encode_from_tokens(tokens, return_pooled=True)
    assert counter.calls == 3 * comfy_calls and torch.equal(plain[0], original[0])
    # A downstream clone (CLIP Set Last Layer clones) keeps the patch.
    last_layer = comfy.node("CLIPSetLastLayer")().set_last_layer(patched_clip, -2)[0]
    last_layer.encode_from_tokens(tokens)
    assert counter.calls == 3 * comfy_calls and _router(last_layer).stats.encodes == 2

    truth = exact_clip(comfy, clip_l).encode_from_tokens(tokens, return_pooled=True)  # ComfyUI's attention in f64
    for p, o, t in zip(patched, original, truth):
        assert_exact(p, o, t)


def test_clip_defaults_leave_77_tokens_to_comfy(comfy, clip_l, monkeypatch):
    tokens = clip_l.tokenize("a lighthouse")
    counter = CountComfyAttention(monkeypatch)
    patched = _node(comfy, "NoFlashCLIPPatcher", clip_l, True, 1024, 0)
    patched.encode_from_tokens(tokens)
    assert counter.calls == 12 and _router(patched).stats.calls == {"comfy": 12}
    off = _node(comfy, "NoFlashCLIPPatcher", clip_l, False, 0, 0)
    off.encode_from_tokens(tokens)
    assert counter.calls == 24 and _router(off).stats.encodes == 0


def _long_tokens(lengths, total, pad, end=None):
    tokens = te.token_batch(lengths, total, pad=pad)
    if end is not None:  # an end token right after the prompt, as the T5 tokenizer writes it
        for row, n in zip(tokens, lengths):
            if n < total:
                row[n] = (end, 1.0)
    return tokens


@pytest.mark.parametrize("kind", ["t5", "llama-padded", "llama-causal"])
def test_t5_and_llama_encoders_every_mask_form(comfy, kind, monkeypatch):
    # 4 heads x 800^2 fp32 scores are 10 MiB: past noflash's fast path, so the tiles run.
    if kind == "t5":
        clip = te.tiny_t5_clip()  # mask: relative bias + padding, (b, h, L, L)
        tokens = _long_tokens([800, 610], 800, pad=0, end=1)
    elif kind == "llama-padded":
        clip = te.tiny_llama_clip()  # mask: padding (b, 1, L, L) + causal (L, L); GQA, skip_reshape
        tokens = _long_tokens([800, 533], 800, pad=0)
    else:
        clip = te.tiny_llama_clip(attention_mask=False)  # mask: causal (L, L) only
        tokens = _long_tokens([800], 800, pad=0)
    counter = CountComfyAttention(monkeypatch)
    original = clip.encode_from_tokens(tokens)
    assert counter.calls == 2
    patched_clip = _node(comfy, "NoFlashCLIPPatcher", clip, True, 0, 0)
    patched = patched_clip.encode_from_tokens(tokens)
    assert counter.calls == 2  # the patched encoder never called ComfyUI's attention
    stats = _router(patched_clip).stats
    assert stats.calls == {"noflash": 2} and set(stats.tiers) <= {1, 2, 3} and stats.tiers, stats
    truth = exact_clip(comfy, clip).encode_from_tokens(tokens)
    assert_exact(patched, original, truth)
    assert _no_routed_forward(clip.cond_stage_model)


def test_qwen_vl_vision_tower_windows(comfy, monkeypatch):
    clip_mod = comfy.module("noflash_core.comfy.clip")
    override = comfy.module("noflash_core.comfy.override")
    from comfy.text_encoders.qwen_vl import process_qwen2vl_images

    tower = te.tiny_qwen_vision()
    image = torch.rand(1, 224, 224, 3, generator=torch.Generator().manual_seed(0))
    pixels, grid = process_qwen2vl_images(image)
    counter = CountComfyAttention(monkeypatch)
    with torch.no_grad():
        original = tower(pixels, grid)
        calls = counter.calls
        assert calls > 8  # windowed blocks call attention once per window
        router = clip_mod.EncodeRouter(tower.forward, tower, override.OverrideConfig(min_tokens=0))
        patched = router(pixels, grid)
        assert counter.calls == calls and router.stats.calls == {"noflash": calls}
        exact = clip_mod.EncodeRouter(tower.forward, tower, override.OverrideConfig(min_tokens=0),
                                      route=te.float64_route)(pixels, grid)
    assert_exact(patched, original, exact)
    assert _no_routed_forward(tower)


def test_encode_that_raises_restores_everything(comfy, clip_l):
    clip_mod = comfy.module("noflash_core.comfy.clip")
    override = comfy.module("noflash_core.comfy.override")
    tokens = clip_l.tokenize("boom")

    def broken(*args, **kwargs):
        raise RuntimeError("attention failed")

    c = clip_l.clone()
    c.patcher.add_object_patch("encode_token_weights", clip_mod.EncodeRouter(
        c.patcher.get_model_object("encode_token_weights"), c.cond_stage_model,
        override.OverrideConfig(min_tokens=0), route=lambda func: broken))
    with pytest.raises(RuntimeError, match="attention failed"):
        c.encode_from_tokens(tokens)
    assert _no_routed_forward(clip_l.cond_stage_model)
    assert clip_mod._LOCK.acquire(blocking=False)  # the lock was released
    clip_mod._LOCK.release()
    clip_l.encode_from_tokens(tokens)  # the original still works


def test_4096_token_text_encoder_peak_against_attention_basic(comfy):
    """Measured (live-bytes tracker, real CPU tensors): a 4096-token Llama-family encoder, 4 heads."""
    clip = te.tiny_llama_clip(layers=1, heads=4, kv_heads=2, head_dim=16, attention_mask=False)
    tokens = te.token_batch([4096], 4096)
    patched_clip = _node(comfy, "NoFlashCLIPPatcher", clip, True, 0, 0)
    peaks = {}
    for name, c in (("comfy", clip), ("noflash", patched_clip)):
        c.load_model()
        with torch.no_grad(), LiveBytesTracker() as tracker:
            c.encode_from_tokens(tokens)
        peaks[name] = tracker.peak_bytes
    scores = 4 * 4096 * 4096 * 4  # one layer's fp32 scores, all heads
    # attention_basic: the einsum's scores and their scaled copy, then scores and softmax: two score-sized tensors.
    assert peaks["comfy"] >= 2 * scores
    assert peaks["noflash"] <= scores // 2, peaks
    print(f"\n4096-token encoder peak: attention_basic {peaks['comfy'] / 2**20:.0f} MiB, "
          f"noflash {peaks['noflash'] / 2**20:.0f} MiB")


# ---------------------------------------------------------------------------------------------- VAEs


class _WatchSquareScores(LiveBytesTracker):
    """Live-bytes tracker that also records every op output of shape ``(..., n, n)``."""

    def __init__(self, n: int):
        super().__init__()
        self.n = n
        self.square = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = super().__torch_dispatch__(func, types, args, kwargs)
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor) and t.dim() >= 2 and tuple(t.shape[-2:]) == (self.n, self.n):
                self.square.append((str(func), tuple(t.shape)))
        return out


def _exact_vae(comfy, vae):
    vae_mod = comfy.module("noflash_core.comfy.vae")
    override = comfy.module("noflash_core.comfy.override")
    glue = comfy.module("nodes.encoder_nodes")
    ref = glue.clone_vae(vae)
    for name in vae_mod.vae_attention_names(ref.first_stage_model):
        key = f"{name}.optimized_attention"
        ref.patcher.add_object_patch(key, vae_mod.VAEAttention(
            ref.patcher.get_model_object(key), override.OverrideConfig(min_tokens=0),
            attention=te.float64_attention))
    return ref


def _attention_fns(vae):
    return [m.optimized_attention for m in vae.first_stage_model.modules() if "optimized_attention" in m.__dict__]


@pytest.fixture(scope="module")
def narrow_sd_vae(comfy):
    return te.sd_vae(ch=32)


def test_sd_vae_defaults_exact_and_no_4096_square_scores(comfy, narrow_sd_vae):
    vae = narrow_sd_vae
    latent = torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(3))
    before = _attention_fns(vae)
    assert [f.__name__ for f in before] == ["normal_attention", "normal_attention"]  # split attention on CPU

    with torch.no_grad(), _WatchSquareScores(4096) as watch:
        original = vae.decode(latent)
    assert watch.square, "ComfyUI's split attention should hold the 4096 x 4096 scores"

    patched_vae = _node(comfy, "NoFlashVAEPatcher", vae, True, 1024, 0)  # the node's defaults
    assert vae.patcher.object_patches == {} and len(patched_vae.patcher.object_patches) == 2
    with torch.no_grad(), _WatchSquareScores(4096) as watch:
        patched = patched_vae.decode(latent)
    assert watch.square == [], watch.square[:3]
    stats = patched_vae.noflash_stats
    # The decoder's mid-block attention ran on the tiles (tier shown), and never as one block of all 4096 rows.
    assert stats.calls == {"noflash": 1} and set(stats.tiers) <= {1, 2, 3} and stats.tiers, stats

    truth = _exact_vae(comfy, vae).decode(latent)
    assert_exact(patched, original, truth)
    # The original is untouched: its blocks keep ComfyUI's function and decode as before.
    again = vae.decode(latent)
    assert _attention_fns(vae) == before and torch.equal(again, original)


def test_sd_vae_tiled_decode_still_works(comfy, narrow_sd_vae):
    vae = narrow_sd_vae
    latent = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(4))
    tiles = {"tile_x": 8, "tile_y": 8, "overlap": 2}
    original = vae.decode_tiled(latent, **tiles)
    patched_vae = _node(comfy, "NoFlashVAEPatcher", vae, True, 0, 0)
    patched = patched_vae.decode_tiled(latent, **tiles)
    truth = _exact_vae(comfy, vae).decode_tiled(latent, **tiles)
    assert_exact(patched, original, truth)
    assert patched_vae.noflash_stats.calls.get("noflash", 0) > 3  # one per tile


def test_wan_vae_per_frame_attention(comfy):
    vae = te.wan_vae()
    latent = torch.randn(1, 16, 2, 4, 4, generator=torch.Generator().manual_seed(5))
    original = vae.decode(latent)
    patched_vae = _node(comfy, "NoFlashVAEPatcher", vae, True, 0, 0)
    patched = patched_vae.decode(latent)
    stats = patched_vae.noflash_stats
    assert stats.calls == {"noflash": 2} and stats.max_q_len == 16  # one call per latent frame, 4 x 4 tokens
    truth = _exact_vae(comfy, vae).decode(latent)
    assert_exact(patched, original, truth)
    assert torch.equal(vae.decode(latent), original)


def test_vae_mid_block_attention_peak_at_36864_tokens(comfy, monkeypatch):
    """Measured on fake tensors (nothing allocated): the SD/Flux VAE mid-block at 1536x1536, 512 channels."""
    import comfy.model_management as mm
    from comfy.ldm.modules.diffusionmodules.model import AttnBlock
    from torch._subclasses.fake_tensor import FakeTensorMode

    vae_mod = comfy.module("noflash_core.comfy.vae")
    override = comfy.module("noflash_core.comfy.override")
    # ComfyUI sizes split attention's slices from free memory: give it a 16 GiB card.
    monkeypatch.setattr(mm, "get_free_memory", lambda *a, **k: 16 << 30)
    block = te.randomize_(AttnBlock(512)).eval()
    peaks = {}
    n = 192 * 192
    with torch.no_grad(), FakeTensorMode(allow_non_fake_inputs=True):
        x = torch.empty(1, 512, 192, 192)
        for name in ("comfy", "noflash"):
            if name == "noflash":
                block.optimized_attention = vae_mod.VAEAttention(block.optimized_attention,
                                                                 override.OverrideConfig())
            with _WatchSquareScores(n) as watch:
                block(x)
            peaks[name] = (watch.peak_bytes, len(watch.square))
    scores = n * n * 4
    activation = n * 512 * 4  # one (1, 512, 192, 192) fp32 tensor: the block's norm, q, k, v, output
    assert peaks["comfy"][0] >= 2 * scores and peaks["comfy"][1] > 0  # scores and softmax, 5 GiB each
    # noflash: the block's own activations plus small tiles, never an N x N tensor.
    assert peaks["noflash"][1] == 0 and peaks["noflash"][0] <= 6 * activation, peaks
    print(f"\nVAE mid-block at 36,864 tokens: split {peaks['comfy'][0] / 2**30:.2f} GiB, "
          f"noflash {peaks['noflash'][0] / 2**20:.0f} MiB")
