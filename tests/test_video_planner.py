"""The VRAM estimate (:mod:`noflash_core.vram`): model geometry, fake-tensor memory estimates, verdicts, and the
``python -m noflash_core.video`` CLI."""

from __future__ import annotations

import json
import runpy
import sys

import pytest

from noflash_core.device import get_preset
from noflash_core.units import format_bytes
from noflash_core.video.families import MODEL_FAMILIES, get_family
from noflash_core.vram import estimate_run
from noflash_core.vram.geometry import latent_and_grid, stage_tokens

GiB = 1024**3


@pytest.mark.parametrize(
    "model,size,frames,tokens",
    [
        ("wan2.2-5b", (1280, 704), 121, 27_280),  # VAE 4x16x16, patch 2x2: 31 x 22 x 40 latent tokens
        ("wan2.1-14b", (1280, 720), 81, 75_600),  # VAE 4x8x8, patch 2x2: 21 x 45 x 80 latent tokens
        ("wan2.2-14b", (1280, 720), 81, 75_600),
        ("wan2.1-1.3b", (832, 480), 81, 21 * 30 * 52),
        ("ltxv-2b", (768, 512), 97, 13 * 16 * 24),
        ("hunyuanvideo", (1280, 720), 129, 33 * 45 * 80),
        ("flux", (1024, 1024), 1, 4096),
        ("qwen-image", (1328, 1328), 1, 83 * 83),
    ],
)
def test_token_counts(model, size, frames, tokens):
    fam = get_family(model)
    _, grid = latent_and_grid(fam, size[0], size[1], frames)
    assert grid[0] * grid[1] * grid[2] == tokens


def test_family_table_is_consistent():
    for fam in MODEL_FAMILIES.values():
        assert fam.stages and all(s.heads > 0 and s.head_dim in (64, 128) for s in fam.stages)
        assert fam.vae_spatial in (8, 16, 32) and fam.latent_channels in (4, 16, 24, 32, 48, 128)
    assert get_family("wan2.1-1.3b").dim == 1536
    assert get_family("wan2.2-5b").dim == 3072 and get_family("wan2.2-5b").latent_channels == 48
    assert get_family("wan2.1-14b").dim == 5120 and get_family("wan2.1-14b").layers == 40
    assert get_family("flux").layers == 19 + 38 and get_family("hunyuanvideo").layers == 20 + 40
    sdxl = get_family("sdxl")
    assert [s.heads * s.head_dim for s in sdxl.stages] == [640, 1280]
    assert stage_tokens((1, 128, 128), sdxl.stages[0]) == 4096
    assert get_family("Wan2.2-TI2V-5B").name == "wan2.2-5b"


def test_bad_inputs_raise_value_error():
    with pytest.raises(ValueError, match="unknown model"):
        estimate_run("nope", 512, 512)
    with pytest.raises(ValueError, match="image model"):
        estimate_run("flux", 512, 512, frames=5)
    with pytest.raises(ValueError, match="dtype"):
        estimate_run("flux", 512, 512, dtype="int8")


def test_wan22_5b_720p_121_frames_on_gfx1030():
    est = estimate_run("wan2.2-5b", 1280, 704, frames=121, batch=2, dtype="fp16", device="gfx1030")
    assert est.vram_bytes == 16 * GiB and est.device.simulated and est.device.paths.diffusion == "sub_quad"
    assert est.denoise.video_tokens == est.denoise.tokens_per_call == 27_280
    assert est.denoise.latent_shape == (48, 31, 44, 80)
    self_attn = est.denoise.attention[0]
    assert (self_attn.batch, self_attn.heads, self_attn.q_len, self_attn.kv_len) == (2, 24, 27_280, 27_280)
    # Math SDPA with ComfyUI's fp16 reductions: fp16 scores and probabilities, 35.7 GB each per batch item.
    assert self_attn.math_bytes >= 2 * 2 * 24 * 27_280**2 * 2
    assert self_attn.planner_bytes <= self_attn.budget_bytes
    assert self_attn.peak_bytes < self_attn.math_bytes / 50
    # ComfyUI's sub-quadratic attention sizes its query chunks from free memory: far below math, above noflash.
    assert self_attn.peak_bytes < self_attn.comfy_bytes < self_attn.math_bytes / 10
    ffn = est.denoise.ffn[0]
    assert ffn.chunks >= 2 and ffn.chunked_bytes < ffn.whole_bytes
    assert ffn.whole_bytes >= 2 * 27_280 * 14336 * 2  # at least one (B, N, ffn_dim) fp16 intermediate
    denoise = est.phases[0]
    assert denoise.name == "denoise" and denoise.comfy_bytes >= est.denoise.weights_bytes  # totals include the weights
    assert [p.name for p in est.phases] == ["denoise", "text encoder", "VAE decode"]
    text = est.to_text()
    assert "tokens per attention call: 27,280" in text and "VERDICT: " in text
    assert "planned for the gfx1030 profile" in text
    json.dumps(est.to_dict())
    json.dumps(est.to_chart())


def test_estimate_does_not_depend_on_the_global_math_flag():
    import torch

    before = torch.backends.cuda.fp16_bf16_reduction_math_sdp_allowed()
    results = []
    for flag in (False, True):
        torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp(flag)  # ComfyUI turns it on when it is imported
        try:
            results.append(estimate_run("wan2.2-5b", 1280, 704, frames=121, device="gfx1030").to_dict())
            assert torch.backends.cuda.fp16_bf16_reduction_math_sdp_allowed() == flag  # restored
        finally:
            torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp(before)
    assert results[0] == results[1]
    assert results[0]["precision"] == "torch math SDPA with fp16/bf16 reductions on (ComfyUI's setting)"
    assert format_bytes(results[0]["denoise"]["attention"][0]["math_bytes"]) == "66.7 GiB"


@pytest.mark.parametrize("preset,paths", [
    ("gfx906", ("sub_quad", "basic", "split")),
    ("gfx1030", ("sub_quad", "basic", "split")),
    ("gfx1010", ("sub_quad", "basic", "split")),
    ("mps", ("sub_quad", "basic", "split")),
    ("arc", ("sdpa_math", "sdpa_math", "sdpa_math")),
    ("cpu", ("sub_quad", "basic", "split")),
])
def test_comfyui_attention_per_preset(preset, paths):
    from noflash_core.device import PRESETS

    est = estimate_run("flux", 512, 512, device=preset, text_encoders="clip-l")
    p = est.device.paths
    assert (p.diffusion, p.text, p.vae) == paths
    assert est.vram_bytes == PRESETS[preset].total_bytes and est.device.simulated
    assert p.upcast == (preset == "mps")
    assert estimate_run("flux", 512, 512, device=preset, vram_bytes=12 * GiB, vae="none",
                        text_encoders="none").vram_bytes == 12 * GiB


def _no_memory(preset):
    from dataclasses import replace

    return replace(get_preset(preset), total_bytes=None, free_bytes=None)


def test_verdicts():
    only_noflash = estimate_run("wan2.2-5b", 1280, 704, frames=121, device="arc", vae="none")
    assert only_noflash.verdict == "noflash" and "NoFlash Attention Patcher" in only_noflash.verdict_text
    assert only_noflash.phases[0].fits_comfy is False and only_noflash.phases[0].fits_noflash is True
    fits = estimate_run("flux", 512, 512, device="gfx1030", vram_bytes=48 * GiB)
    assert fits.verdict == "fits" and fits.advice == ""
    no = estimate_run("wan2.2-5b", 1280, 704, frames=121, device="gfx1030", text_encoders="none")
    assert no.verdict == "no" and "VAE Decode (Tiled)" in no.advice  # 121 frames decoded in one go
    unknown = estimate_run("sdxl", 1024, 1024, device=_no_memory("gfx1030"))
    assert unknown.verdict is None and unknown.denoise.fits_comfy is None and "?" in unknown.to_text()


def test_without_vram_there_is_no_verdict():
    est = estimate_run("sdxl", 1024, 1024, batch=1, device=_no_memory("gfx1030"))
    assert est.denoise.fits_comfy is None and est.denoise.fits_noflash is None
    assert [a.q_len for a in est.denoise.attention] == [4096, 4096, 1024, 1024]
    assert [a.kv_len for a in est.denoise.attention] == [4096, 77, 1024, 77]


def test_weights_that_do_not_fit_are_streamed():
    est = estimate_run("flux", 1024, 1024, dtype="bf16", vram_bytes=8 * GiB, device="gfx1010")
    assert est.denoise.weights_bytes > 8 * GiB and not est.denoise.weights_resident
    assert any("streamed" in n for n in est.notes)


def test_text_encoder_rows():
    est = estimate_run("flux", 1024, 1024, device="gfx1030", prompt_tokens=150)
    clip_l, t5 = est.text_encoders
    assert (clip_l.name, clip_l.batch, clip_l.tokens) == ("clip-l", 2, 77)  # 150 tokens: two 77-token chunks
    assert (t5.name, t5.batch, t5.tokens) == ("t5-xxl", 1, 256)  # ComfyUI pads Flux's T5 to 256
    assert t5.comfy_path == "basic" and t5.noflash_attention_bytes < t5.comfy_attention_bytes
    qwen = estimate_run("qwen-image", 1328, 1328, device="gfx1030", prompt_tokens=2000).text_encoders[0]
    assert qwen.tokens == 2034 and qwen.heads == 28
    # attention_basic on 2,034 fp32 tokens: scores and their scaled copy, 28 heads: 0.86 GiB; noflash a fraction.
    assert qwen.comfy_attention_bytes >= 2 * 28 * 2034**2 * 4
    assert qwen.noflash_attention_bytes < qwen.comfy_attention_bytes / 4
    assert estimate_run("flux", 512, 512, device="gfx1030", text_encoders="none").text_encoders == ()
    with pytest.raises(ValueError, match="unknown text encoder"):
        estimate_run("flux", 512, 512, device="gfx1030", text_encoders="clip-x")


def test_vae_rows_at_1536():
    est = estimate_run("flux", 1536, 1536, device="gfx1030", text_encoders="none")
    vae = est.vae
    assert (vae.name, vae.tokens, vae.channels, vae.calls, vae.dtype) == ("sd", 36_864, 512, 1, "float32")
    # Split attention with 16 GiB free runs one slice: fp32 scores twice, 5.06 GiB each.
    assert vae.comfy_path == "split" and vae.comfy_attention_bytes >= 2 * 36_864**2 * 4
    assert vae.noflash_attention_bytes < vae.comfy_attention_bytes / 10
    assert vae.conv_bytes == 1536 * 1536 * 640 * 4  # measured on ComfyUI's decoder (tests/comfy)
    assert est.phases[-1].comfy_bytes == vae.weights_bytes + vae.comfy_attention_bytes
    wan = estimate_run("wan2.2-5b", 1280, 704, frames=121, device="gfx1030", text_encoders="none").vae
    assert (wan.name, wan.tokens, wan.channels, wan.calls) == ("wan2.2", 44 * 80, 1024, 31)


def test_this_machine_on_a_cpu_box(monkeypatch):
    from noflash_core.vram import resolve_target

    target, profile = resolve_target("this machine")
    if target.kind == "cpu":
        assert "this machine has no GPU: planned for its CPU" in target.note and "Pick a GPU profile" in target.note
    assert not target.simulated and profile.simulated  # planned on meta tensors as this machine
    with pytest.raises(ValueError, match="unknown device"):
        resolve_target("rtx9090")


def test_chart_data_matches_the_web_fixtures():
    # web/tests/fixtures hold real chart() output for the JavaScript tests; their shape must be chart()'s.
    import os

    fixture = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "web", "tests", "fixtures",
                           "flux_1536_gfx1010.json")
    with open(fixture, encoding="utf-8") as f:
        saved = json.load(f)
    now = estimate_run("flux", 1536, 1536, device="gfx1010", text_encoders="clip-l+t5-xxl").to_chart()
    assert set(saved) == set(now)
    assert [(c["name"], c["kind"], c["label"]) for c in saved["components"]] == [
        (c["name"], c["kind"], c["label"]) for c in now["components"]]


def test_dtype_names():
    from noflash_core.vram import parse_dtype_name

    assert parse_dtype_name("bfloat16")[0] == parse_dtype_name("BF16")[0] == "bf16"
    assert parse_dtype_name("torch.float16")[0] == "fp16" and parse_dtype_name("float32")[0] == "fp32"


def test_format_bytes():
    assert format_bytes(512 * 1024**2) == "512 MiB"
    assert format_bytes(71.44e9) == "66.5 GiB"


def _run_cli(monkeypatch, capsys, *args: str) -> str:
    monkeypatch.setattr(sys, "argv", ["noflash_core.video", *args])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module("noflash_core.video", run_name="__main__")
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def test_plan_cli(monkeypatch, capsys):
    out = _run_cli(monkeypatch, capsys, "--model", "flux", "--width", "512", "--height", "512", "--vram", "24GiB",
                   "--device", "gfx1030")
    assert "tokens per attention call: 1,280" in out and "fits" in out and "with 24.0 GiB" in out
    out = _run_cli(monkeypatch, capsys, "-m", "qwen-image", "-W", "1024", "-H", "1024", "--device", "rdna1",
                   "--text-encoders", "qwen2.5-vl-7b", "--prompt-tokens", "1000", "--vae", "none")
    assert "Qwen2.5-VL 7B: 1 x 1,034 tokens" in out and "gfx1010 profile" in out and "VAE decode" not in out
    out = _run_cli(monkeypatch, capsys, "--list")
    assert "wan2.2-5b" in out and "qwen-image" in out
    assert "  gfx1030 · AMD Radeon RX 6800/6800 XT/6900 XT (RDNA2, 16 GiB)\n" in out  # the card behind each name
    out = _run_cli(monkeypatch, capsys, "-m", "flux", "-W", "512", "-H", "512", "--device",
                   "arc · Intel Arc A770 (16 GiB)")  # a label from --list works as well as the bare name
    assert "planned for the arc profile" in out
    out = _run_cli(monkeypatch, capsys, "-m", "ltxv-2b", "-W", "512", "-H", "320", "-f", "25", "--json",
                   "--device", "gfx906")
    assert json.loads(out)["denoise"]["video_tokens"] == 4 * 10 * 16


def test_plan_cli_errors(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["noflash_core.video", "--model", "flux"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module("noflash_core.video", run_name="__main__")
    assert exit_info.value.code == 2
    assert "--width" in capsys.readouterr().err
