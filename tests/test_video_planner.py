"""Video planner: model geometry, fake-tensor memory estimates, verdicts, and the ``noflash_core.video`` CLI."""

from __future__ import annotations

import json
import runpy
import sys

import pytest

from noflash_core.video.estimator import _latent_and_grid, _stage_tokens, estimate_run, format_bytes
from noflash_core.video.families import MODEL_FAMILIES, get_family

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
    _, grid = _latent_and_grid(fam, size[0], size[1], frames)
    assert grid[0] * grid[1] * grid[2] == tokens


def test_family_table_is_consistent():
    for fam in MODEL_FAMILIES.values():
        assert fam.stages and all(s.heads > 0 and s.head_dim in (64, 128) for s in fam.stages)
        assert fam.vae_spatial in (8, 16, 32) and fam.latent_channels in (4, 16, 48, 128)
    assert get_family("wan2.1-1.3b").dim == 1536
    assert get_family("wan2.2-5b").dim == 3072 and get_family("wan2.2-5b").latent_channels == 48
    assert get_family("wan2.1-14b").dim == 5120 and get_family("wan2.1-14b").layers == 40
    assert get_family("flux").layers == 19 + 38 and get_family("hunyuanvideo").layers == 20 + 40
    sdxl = get_family("sdxl")
    assert [s.heads * s.head_dim for s in sdxl.stages] == [640, 1280]
    assert _stage_tokens((1, 128, 128), sdxl.stages[0]) == 4096
    assert get_family("Wan2.2-TI2V-5B").name == "wan2.2-5b"


def test_bad_inputs_raise_value_error():
    with pytest.raises(ValueError, match="unknown model"):
        estimate_run("nope", 512, 512)
    with pytest.raises(ValueError, match="image model"):
        estimate_run("flux", 512, 512, frames=5)
    with pytest.raises(ValueError, match="dtype"):
        estimate_run("flux", 512, 512, dtype="int8")


def test_wan22_5b_720p_121_frames_in_16gib():
    est = estimate_run("wan2.2-5b", 1280, 704, frames=121, batch=2, dtype="fp16", vram_bytes=16 * GiB)
    assert est.video_tokens == est.tokens_per_call == 27_280
    assert est.latent_shape == (48, 31, 44, 80)
    self_attn = est.attention[0]
    assert (self_attn.batch, self_attn.heads, self_attn.q_len, self_attn.kv_len) == (2, 24, 27_280, 27_280)
    # Math SDPA's fp32 scores alone are 24 heads x 27,280^2 x 4 bytes = 71.44 GB per batch item.
    assert self_attn.math_bytes >= 2 * 71.4e9
    assert self_attn.peak_bytes <= self_attn.budget_bytes
    assert self_attn.peak_bytes < self_attn.math_bytes / 100
    ffn = est.ffn[0]
    assert ffn.chunks >= 2 and ffn.chunked_bytes < ffn.whole_bytes
    assert ffn.whole_bytes >= 2 * 27_280 * 14336 * 2  # at least one (B, N, ffn_dim) fp16 intermediate
    assert est.fits_math is False and est.fits_noflash_chunked is True
    text = est.to_text()
    assert "tokens per attention call: 27,280" in text and "does NOT fit" in text
    json.dumps(est.to_dict())


def test_without_vram_there_is_no_verdict():
    est = estimate_run("sdxl", 1024, 1024, batch=1)
    assert est.fits_math is None and est.fits_noflash is None
    assert [a.q_len for a in est.attention] == [4096, 4096, 1024, 1024]
    assert [a.kv_len for a in est.attention] == [4096, 77, 1024, 77]
    assert "?" in est.to_text()


def test_weights_that_do_not_fit_are_streamed():
    est = estimate_run("flux", 1024, 1024, dtype="bf16", vram_bytes=8 * GiB)
    assert est.weights_bytes > 8 * GiB and not est.weights_resident
    assert any("streamed" in n for n in est.notes)


def test_dtype_names():
    from noflash_core.video.estimator import _parse_dtype

    assert _parse_dtype("bfloat16")[0] == _parse_dtype("BF16")[0] == "bf16"
    assert _parse_dtype("torch.float16")[0] == "fp16" and _parse_dtype("float32")[0] == "fp32"


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
    out = _run_cli(monkeypatch, capsys, "--model", "flux", "--width", "512", "--height", "512", "--vram", "24GiB")
    assert "tokens per attention call: 1,280" in out and "fits" in out
    out = _run_cli(monkeypatch, capsys, "--list")
    assert "wan2.2-5b" in out and "qwen-image" in out
    out = _run_cli(monkeypatch, capsys, "-m", "ltxv-2b", "-W", "512", "-H", "320", "-f", "25", "--json")
    assert json.loads(out)["video_tokens"] == 4 * 10 * 16


def test_plan_cli_errors(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["noflash_core.video", "--model", "flux"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module("noflash_core.video", run_name="__main__")
    assert exit_info.value.code == 2
    assert "--width" in capsys.readouterr().err
