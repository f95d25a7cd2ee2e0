"""The global patch and the opt-in auto-patch import."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import noflash_core as nc
from noflash_core import telemetry

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _restore():
    original = F.scaled_dot_product_attention
    yield
    nc.disable()
    F.scaled_dot_product_attention = original


def _tiers(fn):
    seen = []
    unsubscribe = telemetry.subscribe(seen.append)
    try:
        fn()
    finally:
        unsubscribe()
    return [r.tier for r in seen]


def test_enable_disable_restores_exact_original():
    original = F.scaled_dot_product_attention
    assert not nc.is_enabled()
    nc.enable()
    assert nc.is_enabled() and F.scaled_dot_product_attention is not original
    nc.disable()
    assert not nc.is_enabled() and F.scaled_dot_product_attention is original


def test_double_enable_is_noop_and_wrapper_keeps_metadata():
    original = F.scaled_dot_product_attention
    nc.enable()
    wrapper = F.scaled_dot_product_attention
    nc.enable()
    assert F.scaled_dot_product_attention is wrapper
    assert wrapper.__doc__ == original.__doc__ and wrapper.__name__ == original.__name__
    nc.disable()
    nc.disable()
    assert F.scaled_dot_product_attention is original


def test_patched_call_is_tiled_and_exact():
    q, k, v = (torch.randn(1, 4, 1024, 32) for _ in range(3))
    expected = F.scaled_dot_product_attention(q, k, v)
    with nc.patched():
        tiers = _tiers(lambda: F.scaled_dot_product_attention(q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
    assert tiers and tiers[0] in (1, 2, 3)
    assert torch.allclose(out, expected, atol=1e-5, rtol=1e-5)
    assert not nc.is_enabled()


def test_patched_restores_state_after_exception():
    with pytest.raises(RuntimeError):
        with nc.patched():
            F.scaled_dot_product_attention(torch.randn(2, 8, 4), torch.randn(2, 9, 5), torch.randn(2, 9, 4))
    assert not nc.is_enabled()
    nc.enable()
    with pytest.raises(RuntimeError, match="attn_mask"):
        F.scaled_dot_product_attention(
            torch.randn(1, 2, 8, 4), torch.randn(1, 2, 9, 4), torch.randn(1, 2, 9, 4), attn_mask=torch.ones(3, 3)
        )
    assert nc.is_enabled()  # a failing call leaves the patch as it was
    with nc.patched():
        pass
    assert nc.is_enabled()  # patched() inside an enabled patch keeps it enabled


def test_threshold_sends_short_keys_to_original():
    q_short, q_long = torch.randn(1, 2, 64, 16), torch.randn(1, 4, 1024, 16)
    nc.enable(threshold=512)
    tiers = _tiers(lambda: (F.scaled_dot_product_attention(q_short, q_short, q_short),
                            F.scaled_dot_product_attention(q_long, q_long, q_long)))
    assert tiers[0] == 0 and tiers[1] in (1, 2, 3)


def test_disable_leaves_foreign_patch_alone(caplog):
    nc.enable()

    def someone_else(*args, **kwargs):
        return None

    F.scaled_dot_product_attention = someone_else
    nc.disable()
    assert F.scaled_dot_product_attention is someone_else
    assert "someone else" in caplog.text


def _run_python(code: str, **env) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("NOFLASH_")}
    full_env.update(env)
    full_env["PYTHONPATH"] = ROOT + os.pathsep + full_env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env, timeout=120)


_PROBE = (
    "import logging; logging.basicConfig(level=logging.INFO);"
    "import torch.nn.functional as F; import torch;"
    "orig = F.scaled_dot_product_attention;"
    "import noflash_core;"
    "assert F.scaled_dot_product_attention is orig, 'importing noflash_core must change nothing';"
    "import noflash_core.auto as a;"
    "f = F.scaled_dot_product_attention;"
    "print('PATCHED' if getattr(f, '__noflash__', False) else 'ORIGINAL', getattr(f, '__noflash_threshold__', -1),"
    " a.DECISION.reason)"
)


def test_auto_import_on_cpu_keeps_torch_fused_kernel():
    res = _run_python(_PROBE)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("ORIGINAL")
    assert "fused SDPA kernel" in res.stdout
    assert "global SDPA patch not enabled" in res.stderr  # exactly one log line with the decision
    assert res.stderr.count("global SDPA patch") == 1


def test_auto_import_force_patch_and_threshold():
    res = _run_python(_PROBE, NOFLASH_FORCE_PATCH="1", NOFLASH_THRESHOLD="300")
    assert res.returncode == 0, res.stderr
    assert res.stdout.split()[:2] == ["PATCHED", "300"]
    assert "NOFLASH_FORCE_PATCH" in res.stderr and "enabled" in res.stderr


def test_auto_import_disable_wins():
    res = _run_python(_PROBE, NOFLASH_FORCE_PATCH="1", NOFLASH_DISABLE="1")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("ORIGINAL") and "NOFLASH_DISABLE" in res.stdout


def test_device_report_on_cpu():
    report = nc.device_report("cpu")
    for key in ("name", "vendor", "arch", "total_bytes", "free_bytes", "bf16", "sdpa_backends", "efficient_sdpa",
                "patch_would_activate"):
        assert key in report
    assert report["sdpa_backends"]["math"] is True
    assert report["patch_would_activate"] is (not report["efficient_sdpa"])


def test_arch_table_marks_gfx906_and_rdna2():
    from noflash_core.device import ARCHS_WITHOUT_FUSED_ATTENTION

    for arch in ("gfx906:sramecc+:xnack-", "gfx1030", "gfx1010", "gfx900", "gfx908"):
        assert arch.startswith(ARCHS_WITHOUT_FUSED_ATTENTION)
    for arch in ("gfx90a", "gfx942", "gfx1100"):
        assert not arch.startswith(ARCHS_WITHOUT_FUSED_ATTENTION)


def test_budget_env(monkeypatch):
    from noflash_core.budget import CPU_DEFAULT_BUDGET_BYTES, resolve_budget

    assert resolve_budget(torch.device("cpu")) == CPU_DEFAULT_BUDGET_BYTES
    monkeypatch.setenv("NOFLASH_BUDGET_MB", "64")
    assert resolve_budget(torch.device("cpu")) == 64 * 1024 * 1024
    assert resolve_budget(torch.device("cpu"), 1234) == 1234
    with pytest.raises(ValueError, match="budget_bytes"):
        resolve_budget(torch.device("cpu"), 0)


def test_plan_is_deterministic():
    q = torch.randn(1, 8, 2048, 64)
    plans = {nc.plan(q, q, q, budget_bytes=b) for b in (2**22, 2**22, 2**26)}
    assert len(plans) == 2
