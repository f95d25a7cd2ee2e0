"""``python -m noflash_core.bench``: parsing, skipping, reports and a tiny end-to-end run."""

from __future__ import annotations

import io
import json
import os

import pytest
import torch

from noflash_core.bench import BenchConfig, BenchResult, run_bench
from noflash_core.bench.__main__ import main
from noflash_core.bench.config import parse_sizes
from noflash_core.bench.plots import matplotlib_available
from noflash_core.bench.progress import ProgressBar
from noflash_core.bench.report import format_ms, render_markdown
from noflash_core.units import format_bytes, parse_bytes, parse_dtype

ALL = "math,torch,noflash-t1,noflash-t2,noflash-t3,noflash-auto"


def test_parsers():
    assert parse_bytes("16GiB") == 16 * 1024**3
    assert parse_bytes("512 MB") == 512 * 1000**2
    assert parse_bytes("1024") == 1024
    assert parse_sizes("256, 1k,2048") == [256, 1024, 2048]
    assert parse_dtype("bf16") is torch.bfloat16 and parse_dtype("float32") is torch.float32
    for bad, fn in (("12 parsecs", parse_bytes), ("0", parse_sizes), ("int8", parse_dtype)):
        with pytest.raises(ValueError):
            fn(bad)


def test_formatting():
    assert format_ms(491.2) == "491 ms" and format_ms(2503) == "2.50 s" and format_ms(3.14159) == "3.14 ms"
    assert format_bytes(520 * 2**20) == "520 MiB" and format_bytes(2 * 2**30) == "2.00 GiB"
    assert format_ms(None) == "—" and format_bytes(None) == "n/a"


def test_progress_bar_renders_and_logs():
    stream = io.StringIO()
    bar = ProgressBar(4, stream=stream, width=8)
    bar.step("math fwd N=256")
    assert bar.render("x").startswith("[##------] 1/4")
    bar.close()


def test_cli_end_to_end(tmp_path, capsys):
    out = tmp_path / "out"
    code = main(
        ["--sizes", "64,128", "--impls", ALL, "--repeats", "2", "--threads", "1", "--out", str(out), "--no-progress"]
    )
    assert code == 0
    data = json.loads((out / "results.json").read_text())
    cells = data["cells"]
    assert len(cells) == 2 * 2 * 6
    status = {(c["impl"], c["mode"], c["n"]): c["status"] for c in cells}
    assert status[("noflash-t3", "fwd+bwd", 64)] == "unsupported"
    assert all(s == "ok" for k, s in status.items() if k[0] != "noflash-t3" or k[1] == "fwd")
    fwd = [c for c in cells if c["mode"] == "fwd"]
    assert all(c["max_abs_err"] < 1e-5 for c in fwd)
    assert all(c["peak_bytes"] > 0 and len(c["times_ms"]) == 2 for c in cells if c["status"] == "ok")
    md = (out / "results.md").read_text()
    assert "| 128 |" in md and "noflash auto against math SDPA" in md and "--sizes 64,128" in md
    assert "## Forward + backward" in md
    assert md.strip() in capsys.readouterr().out
    if matplotlib_available():
        for name in ("time.png", "memory.png", "speedup.png"):
            assert (out / name).stat().st_size > 1000
    result = BenchResult.from_dict(data)
    assert result.cell("math", "fwd", 128).status == "ok"


def test_overhead_times_the_decode_fast_path_against_math(capsys):
    assert main(["--overhead", "--repeats", "10", "--device", "cpu", "--dtype", "fp32"]) == 0
    text = capsys.readouterr().out
    assert "q (1, 16, 1, 64), k/v (1, 16, 512, 64) float32 on cpu" in text
    assert "torch math SDPA" in text and "noflash (tier 0)" in text and "median paired difference" in text


def test_memory_cap_skips_quadratic_cells_and_notes_why():
    cfg = BenchConfig(
        sizes=[128, 256], impls=["math", "noflash-t2"], modes=["fwd"], repeats=1, mem_cap_bytes=2**20, threads=1
    )
    result = run_bench(cfg, progress=False)
    math_cell = result.cell("math", "fwd", 128)
    assert math_cell.status == "skipped" and "memory cap" in math_cell.note
    assert result.cell("math", "fwd", 256).status == "skipped"
    assert result.cell("noflash-t2", "fwd", 256).status == "ok"
    assert "math fwd N=128: skipped" in render_markdown(result)


def test_time_cap_skips_cells_predicted_too_slow():
    cfg = BenchConfig(sizes=[128, 4096], impls=["math"], modes=["fwd"], repeats=1, time_cap_s=1e-6, threads=1)
    result = run_bench(cfg, progress=False)
    assert result.cell("math", "fwd", 128).status == "ok"
    big = result.cell("math", "fwd", 4096)
    assert big.status == "skipped" and "time cap" in big.note


def test_missing_comfy_is_reported(tmp_path):
    cfg = BenchConfig(
        sizes=[64], impls=["torch", "comfy-subquad"], modes=["fwd"], repeats=1, comfy_path=str(tmp_path / "none")
    )
    result = run_bench(cfg, progress=False)
    if "comfy-subquad" in result.impls:  # ComfyUI happens to be importable here
        assert result.cell("comfy-subquad", "fwd", 64).status == "ok"
    else:
        assert "comfy-subquad" in result.missing and "not run" in render_markdown(result)


@pytest.mark.skipif(
    not os.path.isdir(os.environ.get("COMFYUI_PATH", "/nonexistent")),
    reason="COMFYUI_PATH is not set to a ComfyUI checkout",
)
def test_comfy_implementations_run():
    cfg = BenchConfig(
        sizes=[128],
        impls=["torch", "comfy-subquad", "comfy-split"],
        modes=["fwd", "fwd+bwd"],
        repeats=1,
        comfy_path=os.environ["COMFYUI_PATH"],
    )
    result = run_bench(cfg, progress=False)
    for impl in ("comfy-subquad", "comfy-split"):
        assert result.cell(impl, "fwd", 128).max_abs_err < 1e-5
        assert result.cell(impl, "fwd+bwd", 128).status == "ok"
