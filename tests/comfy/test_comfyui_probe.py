"""VRAM Probe inside a real ComfyUI: its numbers equal the CLI's, its model of ComfyUI's attention is ComfyUI's.

- The byte counts of ``noflash_core.vram.comfy_attention`` (sub-quadratic, ``attention_basic``, VAE split
  attention) are checked against ComfyUI's own functions under the live-bytes tracker, exactly.
- The VAE decoders' working memory in ``noflash_core.video.encoders`` is re-measured on ComfyUI's decoders.
- The node's estimate for Wan 2.2 5B at 1280x704x121 and Flux at 1536x1536 is the CLI's, printed by a plain
  process without ComfyUI (so without ComfyUI's fp16-reduction flag).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys

import pytest
import tiny_encoders as te
import torch
from comfy_runtime import REPO_ROOT, tiny_clip_l_state_dict

from noflash_core.memory.tracker import LiveBytesTracker

GiB = 1 << 30


@pytest.fixture
def free_memory(monkeypatch):
    """Set what ComfyUI's attention functions see as free memory (they size their chunks and slices from it)."""
    import comfy.model_management as mm

    value = {"bytes": GiB}

    def get_free_memory(dev=None, torch_free_too=False):
        return (value["bytes"], value["bytes"]) if torch_free_too else value["bytes"]

    monkeypatch.setattr(mm, "get_free_memory", get_free_memory)
    return value


def _peak(fn, shapes, dtype, fake=True, **kwargs) -> int:
    from torch._subclasses.fake_tensor import FakeTensorMode

    with (FakeTensorMode() if fake else contextlib.nullcontext()), torch.no_grad():
        tensors = [torch.zeros(s, dtype=dtype) for s in shapes]
        with LiveBytesTracker() as tracker:
            out = fn(*tensors, **kwargs)
            del out
    return tracker.peak_bytes


# (batch, heads, L, S, head dim, skip_reshape, free bytes): one query chunk, several, with copies (b > 1), and
# ComfyUI's key-chunked fallback (real tensors: its chunk loop reads tensor values).
SUB_QUAD = [
    (1, 24, 4096, 4096, 128, True, GiB, True),
    (1, 24, 9216, 9216, 128, True, 16 * GiB, True),
    (2, 12, 3000, 3000, 64, False, 4 * GiB, True),
    (2, 8, 700, 77, 64, False, 64 << 20, True),
    (1, 8, 600, 600, 64, False, 1 << 20, False),
    (2, 4, 300, 1000, 32, True, 1 << 20, False),
]


@pytest.mark.parametrize("b,h,L,S,d,skip,free,fake", SUB_QUAD)
def test_sub_quad_bytes_are_comfyuis(comfy, free_memory, b, h, L, S, d, skip, free, fake):
    import comfy.ldm.modules.attention as attention

    ca = comfy.module("noflash_core.vram.comfy_attention")
    free_memory["bytes"] = free
    dtype = torch.float16 if fake else torch.float32
    shapes = [(b, h, n, d) for n in (L, S, S)] if skip else [(b, n, h * d) for n in (L, S, S)]
    measured = _peak(attention.attention_sub_quad, shapes, dtype, fake, heads=h, skip_reshape=skip)
    assert ca.sub_quad_bytes(b, h, L, S, d, d, dtype.itemsize, free, skip_reshape=skip) == measured


# (batch, heads, L, S, head dim, skip_reshape, mask shape, dtype): CLIP's causal (L, L), T5's position bias
# (1, h, L, L) and padding (b, h, L, L), Llama's (b, 1, L, L).
BASIC = [
    (1, 12, 77, 77, 64, False, "LL", torch.float32),
    (2, 64, 512, 512, 64, False, "1hLL", torch.float16),
    (2, 28, 600, 600, 128, True, "b1LL", torch.float16),
    (1, 4, 4096, 4096, 16, True, "LL", torch.float32),
    (2, 64, 256, 256, 64, False, "bhLL", torch.float16),
]


@pytest.mark.parametrize("b,h,L,S,d,skip,mask,dtype", BASIC)
def test_attention_basic_bytes_are_comfyuis(comfy, b, h, L, S, d, skip, mask, dtype):
    import comfy.ldm.modules.attention as attention

    ca = comfy.module("noflash_core.vram.comfy_attention")
    shapes = [(b, h, n, d) for n in (L, S, S)] if skip else [(b, n, h * d) for n in (L, S, S)]
    mask_shape = {"LL": (L, S), "1hLL": (1, h, L, S), "b1LL": (b, 1, L, S), "bhLL": (b, h, L, S)}[mask]

    def call(q, k, v, m):
        return attention.attention_basic(q, k, v, h, mask=m, skip_reshape=skip)

    measured = _peak(call, shapes + [mask_shape], dtype)
    copies_mask = b > 1 and mask in ("1hLL", "b1LL")
    assert ca.basic_bytes(b, h, L, S, d, d, dtype.itemsize, skip_reshape=skip, mask_copy=copies_mask) == measured


@pytest.mark.parametrize("c,n,free,dtype", [
    (512, 4096, GiB, torch.float32),
    (512, 36864, 16 * GiB, torch.float32),  # 1536x1536: one slice, 5 GiB scores twice
    (512, 36864, 4 * GiB, torch.float16),  # two slices
    (384, 14400, 2 * GiB, torch.bfloat16),  # Wan VAE 720p frame
])
def test_vae_split_bytes_are_comfyuis(comfy, free_memory, c, n, free, dtype):
    from comfy.ldm.modules.diffusionmodules.model import normal_attention

    ca = comfy.module("noflash_core.vram.comfy_attention")
    free_memory["bytes"] = free
    side = int(n**0.5)
    measured = _peak(normal_attention, [(1, c, side, side)] * 3, dtype)
    assert ca.vae_split_bytes(1, c, n, dtype.itemsize, free) == measured


def _decode_peak(model, latent_shape, patch_attention: bool) -> int:
    """Peak of ComfyUI's decoder on fake tensors; attention through noflash so that convolutions dominate."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from noflash_core.comfy.override import OverrideConfig
    from noflash_core.comfy.vae import VAEAttention

    saved = {}
    for m in model.modules():
        if patch_attention and "optimized_attention" in m.__dict__:
            saved[m] = m.optimized_attention
            m.optimized_attention = VAEAttention(m.optimized_attention, OverrideConfig(min_tokens=0))
    try:
        with torch.no_grad(), FakeTensorMode(allow_non_fake_inputs=True):
            z = torch.empty(latent_shape)
            with LiveBytesTracker() as tracker:
                out = model.decode(z)
                del out
    finally:
        for m, fn in saved.items():
            m.optimized_attention = fn
    return tracker.peak_bytes


def test_vae_decoder_working_memory_is_measured(comfy, free_memory):
    from comfy.ldm.models.autoencoder import AutoencoderKL
    from comfy.ldm.wan import vae as wan_vae
    from comfy.ldm.wan.vae import WanVAE

    encoders = comfy.module("noflash_core.video.encoders")
    free_memory["bytes"] = 64 * GiB
    dd = {"double_z": True, "z_channels": 16, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
          "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
    sd = AutoencoderKL(ddconfig=dd, embed_dim=16).eval()
    measured = _decode_peak(sd, (1, 16, 64, 64), True)
    # The decoder with carried convolutions (``Decoder.carried``, ComfyUI 0.33) keeps the mid-block output alive
    # through the upsampling loop: measured 679,739,392 B there against 671,350,784 B on 0.3.64, exactly one
    # (1, 512, 64, 64) fp32 tensor more (the same one tensor at 32x32 and 128x128 latents).
    held = 512 * 64 * 64 * 4 if hasattr(sd.decoder, "carried") else 0
    expected = encoders.get_vae("sd").conv_bytes(512, 512, 1, 4) + held
    assert abs(measured - expected) <= 0.01 * measured, (measured, expected)
    wan = WanVAE(dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                 temperal_downsample=[False, True, True], dropout=0.0).eval()
    # The Wan figures were measured on ComfyUI 0.3.64's decoder (one latent frame per step). The decoder that steps
    # two latent frames at a time with a layer cache (``wan.vae.count_cache_layers``, ComfyUI 0.33) needs less:
    # measured there 155,850,240 B for the image (0.239x the figure) and 1,360,120,320 B for 9 frames (0.789x;
    # 0.785x to 0.790x for 5 to 33 frames). There the figures are an upper bound, within the factor measured.
    chunked = hasattr(wan_vae, "count_cache_layers")
    for latent_frames, frames, low in ((1, 1, 0.23), (3, 9, 0.77)):  # an image (Qwen-Image), a video
        measured = _decode_peak(wan, (1, 16, latent_frames, 30, 52), True)
        expected = encoders.get_vae("wan2.1").conv_bytes(240, 416, frames, 4)
        if chunked:
            assert low * expected <= measured <= expected, (frames, measured, expected)
        else:
            assert abs(measured - expected) <= 0.02 * measured, (frames, measured, expected)


def _cli(*args: str) -> str:
    """``python -m noflash_core.video`` in a plain process: no ComfyUI, torch's default math-SDPA flags."""
    env = dict(os.environ, PYTHONPATH=REPO_ROOT)
    proc = subprocess.run([sys.executable, "-m", "noflash_core.video", *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.rstrip("\n")


@pytest.mark.parametrize("family,width,height,frames", [
    ("wan2.2-5b", 1280, 704, 121),
    ("flux", 1536, 1536, 1),
])
def test_node_figures_equal_the_cli(comfy, family, width, height, frames):
    import comfy.model_management as mm  # noqa: F401  - ComfyUI has turned on fp16 reductions in math SDPA

    assert torch.backends.cuda.fp16_bf16_reduction_math_sdp_allowed()
    out = comfy.node("NoFlashVRAMProbe").execute(width, height, frames, 1, family, "gfx1030", 0, "auto", 256)
    text = out.ui["text"][0]
    chart = out.ui["noflash_estimate"][0]
    cli = _cli("--model", family, "--width", str(width), "--height", str(height), "--frames", str(frames),
               "--device", "gfx1030")
    assert cli in text  # the node's estimate block is the CLI's report, character for character
    assert torch.backends.cuda.fp16_bf16_reduction_math_sdp_allowed()  # and the estimate left the flag alone

    # What the browser gets: bars with bytes, the card's VRAM, the verdict; totals include the weights.
    assert chart["vram_bytes"] == 16 * GiB and chart["device"]["key"] == "gfx1030" and chart["device"]["simulated"]
    comps = {c["name"]: c for c in chart["components"]}
    assert {"weights", "activations", "attention_comfy", "attention_noflash", "ffn", "denoise_comfy",
            "denoise_noflash", "text_comfy", "text_noflash", "vae_comfy", "vae_noflash"} == set(comps)
    assert comps["denoise_comfy"]["bytes"] >= comps["weights"]["bytes"] + comps["attention_comfy"]["bytes"]
    assert comps["attention_comfy"]["label"] == "attention · ComfyUI sub-quadratic"  # ComfyUI's path on RDNA2
    assert chart["verdict"] in ("fits", "noflash", "no") and chart["verdict_text"]
    assert "planned for the gfx1030 profile" in text
    assert "math SDPA figures: torch math SDPA with fp16/bf16 reductions on (ComfyUI's setting)" in text
    if family == "wan2.2-5b":
        # The Wan template's "~71 GB for the scores alone": math SDPA (fp16 scores and probabilities) is 66.7 GiB.
        assert "66.7 GiB" in text
        assert chart["title"].startswith("Wan 2.2 TI2V 5B · 1280×704 · 121 frames")


def test_probe_on_a_cpu_box_says_what_it_plans_for(comfy):
    probe = comfy.node("NoFlashVRAMProbe")
    text = probe.execute(512, 512, 1, 1, "flux", "this machine", 0, "auto", 77).ui["text"][0]
    assert "Memory: system RAM" in text and "VRAM:" not in text
    assert "this machine has no GPU: planned for its CPU" in text and "Pick a GPU profile" in text
    text = probe.execute(512, 512, 1, 1, "flux", "gfx1010", 12, "auto", 77).ui["text"][0]
    assert "planned for the gfx1010 profile" in text and "with 12.0 GiB" in text


def test_connected_clip_gives_the_text_encoder_rows(comfy):
    import comfy.sd as sd

    clip = sd.load_text_encoder_state_dicts([tiny_clip_l_state_dict()], clip_type=sd.CLIPType.STABLE_DIFFUSION)
    estimate = comfy.module("noflash_core.comfy.estimate")
    assert estimate.encoders_from_clip(clip.cond_stage_model) == ("clip-l",)
    chart = comfy.node("NoFlashVRAMProbe").execute(1024, 1024, 1, 1, "flux", "gfx1030", 0, "auto", 150,
                                                   None, clip).ui["noflash_estimate"][0]
    assert "CLIP-L: 2 x 77 tokens" in chart["text"] and "T5-XXL" not in chart["text"]
    t5 = te.tiny_t5_clip()
    assert estimate.encoders_from_clip(t5.cond_stage_model) == ()  # a tiny test encoder matches no table entry
