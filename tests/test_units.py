"""Units users read and type: one byte formatter (the browser badge's rules), one dtype parser that rejects."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
import torch

from noflash_core.units import dtype_name, format_bytes, parse_bytes, parse_dtype

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLES = [0, 1, 512, 1023, 1024, 1536, 1152, 10 * 1024 - 1, 12.25 * 2**20, 99.995 * 2**20, 300 * 2**20,
           1023.6 * 2**20, 1.5 * 2**30, 2 * 2**30, 15 * 2**30, 71.44e9, 2048 * 2**40, -3 * 2**20, None, float("nan"),
           float("inf")]


def test_format_bytes_rules():
    assert [format_bytes(n) for n in (512, 1536, 12.25 * 2**20, 300 * 2**20, 1.5 * 2**30)] == [
        "512 B", "1.50 KiB", "12.3 MiB", "300 MiB", "1.50 GiB"]
    assert format_bytes(None) == format_bytes(float("nan")) == "n/a"


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_format_bytes_matches_the_browser_formatter():
    script = (
        "import { formatBytes } from './web/noflash_format.js';\n"
        f"const xs = {json.dumps([('nan' if n != n else 'inf' if n == float('inf') else n) for n in SAMPLES])};\n"
        "const v = (x) => x === 'nan' ? NaN : x === 'inf' ? Infinity : x;\n"
        "console.log(JSON.stringify(xs.map((x) => formatBytes(v(x)))));\n"
    )
    proc = subprocess.run(["node", "--input-type=module", "-e", script], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == [format_bytes(n) for n in SAMPLES]


def test_parse_bytes():
    assert parse_bytes("16GiB") == 16 * 2**30 and parse_bytes("512 MB") == 512 * 10**6 and parse_bytes("1024") == 1024
    with pytest.raises(ValueError, match="byte size"):
        parse_bytes("12 parsecs")


def test_parse_dtype_accepts_known_names_and_rejects_the_rest():
    assert parse_dtype("bf16") is parse_dtype("torch.bfloat16") is parse_dtype(torch.bfloat16) is torch.bfloat16
    assert parse_dtype("FP64") is torch.float64 and parse_dtype("half") is torch.float16
    for bad in ("int8", "fp8", "float8_e4m3fn", torch.int32):
        with pytest.raises(ValueError, match="dtype"):
            parse_dtype(bad)
    with pytest.raises(ValueError, match="fp16, bf16, fp32"):
        parse_dtype("fp64", allowed=(torch.float16, torch.bfloat16, torch.float32))


def test_dtype_name_keeps_unknown_names_for_the_parser_to_reject():
    assert [dtype_name(d) for d in (torch.float16, torch.bfloat16, torch.float32, torch.float64)] == [
        "fp16", "bf16", "fp32", "fp64"]
    assert dtype_name(torch.float8_e4m3fn) == "float8_e4m3fn"
    with pytest.raises(ValueError):
        parse_dtype(dtype_name(torch.float8_e4m3fn))
