"""The pack's start-up inside ComfyUI: one log line, NOFLASH_FORCE_PATCH and NOFLASH_DISABLE.

Each case runs in a fresh interpreter (the global patch is process state): ComfyUI on CPU, the pack loaded the way
ComfyUI loads custom nodes, then one direct SDPA call through ``comfy.ops.scaled_dot_product_attention``, the path
ComfyUI's VAE and a few models use, which only the global patch reaches.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from comfy_runtime import REPO_ROOT, comfyui_path

_SCRIPT = textwrap.dedent(
    r"""
    import json, logging, os, sys
    sys.path.insert(0, {tests_comfy!r})
    import comfy_runtime as rt

    lines = []

    class Keep(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    logging.basicConfig(level=logging.INFO)
    logging.getLogger().addHandler(Keep())
    rt.setup_comfyui()
    import torch
    import torch.nn.functional as F

    original = F.scaled_dot_product_attention
    pack = rt.load_pack({base!r})
    patch = rt.pack_module(pack, "noflash_core.patch")
    telemetry = rt.pack_module(pack, "noflash_core.telemetry")
    records = []
    telemetry.subscribe(records.append)

    import comfy.ops

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 2048, 64, generator=g) for _ in range(3))
    out = comfy.ops.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False)
    ref = original(q, k, v)
    print("RESULT " + json.dumps({{
        "noflash_lines": [line for line in lines if "noflash" in line.lower() and "global SDPA patch" in line],
        "enabled": patch.is_enabled(),
        "sdpa_replaced": F.scaled_dot_product_attention is not original,
        "tiers": [r.tier for r in records],
        "max_err": float((out - ref).abs().max()),
        "entrypoint": hasattr(pack, "comfy_entrypoint"),
    }}))
    """
)


def _run(tmp_path, **env_vars):
    if comfyui_path() is None:
        pytest.skip("COMFYUI_PATH is not set to a ComfyUI checkout")
    script = _SCRIPT.format(tests_comfy=os.path.dirname(os.path.abspath(__file__)), base=str(tmp_path))
    env = {k: v for k, v in os.environ.items() if not k.startswith("NOFLASH_")}
    env.update(env_vars)
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def test_forced_patch_logs_one_line_and_tiles_direct_sdpa_calls(tmp_path):
    result = _run(tmp_path, NOFLASH_FORCE_PATCH="1", NOFLASH_BUDGET_MB="8")
    assert result["entrypoint"]
    assert len(result["noflash_lines"]) == 1, result
    line = result["noflash_lines"][0]
    assert line.startswith("noflash 0.") and "enabled" in line and "NOFLASH_FORCE_PATCH" in line
    assert result["enabled"] and result["sdpa_replaced"]
    assert result["tiers"] and all(t >= 1 for t in result["tiers"]), result  # tiled, not torch's own kernel
    assert result["max_err"] < 1e-5


def test_disabled_patches_nothing(tmp_path):
    result = _run(tmp_path, NOFLASH_DISABLE="1", NOFLASH_FORCE_PATCH="1")
    assert len(result["noflash_lines"]) == 1, result
    line = result["noflash_lines"][0]
    assert "not enabled" in line and "NOFLASH_DISABLE" in line
    assert not result["enabled"] and not result["sdpa_replaced"]
    assert result["tiers"] == []
    assert result["max_err"] == 0.0


def test_default_on_cpu_leaves_torch_alone(tmp_path):
    result = _run(tmp_path)
    assert len(result["noflash_lines"]) == 1 and "not enabled" in result["noflash_lines"][0]
    assert not result["enabled"] and result["tiers"] == []
