"""ComfyUI-side helpers that need no ComfyUI: run telemetry, probe text, family lookup, start-up, pack import."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from noflash_core.comfy.families import family_for_comfy_model
from noflash_core.comfy.probe import format_last_run, probe_text
from noflash_core.comfy.startup import pack_version, run_startup
from noflash_core.comfy.telemetry import RunHistory, RunMonitor, read_peak_memory
from noflash_core.telemetry import CallRecord
from noflash_core.units import dtype_name, format_bytes
from noflash_core.video.families import family_names

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _call(path="noflash", tier=2, q_len=4096, kv_len=4096):
    return CallRecord(path=path, tier=tier, block_m=128, block_n=256, batch=1, heads=2, q_len=q_len,
                      kv_len=kv_len, head_dim=64, dtype="float16", device="cpu", reason="test")


class _Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


# ---- telemetry -------------------------------------------------------------------------------------------------


def test_monitor_aggregates_a_run_and_publishes_throttled():
    published = []
    clock = _Clock()
    history = RunHistory()
    mon = RunMonitor(label="WAN21", publish=published.append, history=history, min_interval_s=1.0, clock=clock,
                     node_id=7)
    mon.start(torch.device("cpu"))
    assert published[-1]["state"] == "running" and published[-1]["calls"] == 0
    for _ in range(5):
        mon.record(_call())
    mon.record(_call(path="comfy", tier=0, q_len=77, kv_len=77))
    assert len(published) == 1  # throttled: no time has passed
    clock.t += 1.5
    mon.record(_call(tier=1, q_len=8192))
    assert len(published) == 2 and published[-1]["calls"] == 7
    clock.t += 0.25
    final = mon.finish()
    assert published[-1] is final and final["state"] == "done"
    assert final["tiers"] == {"2": 5, "comfy": 1, "1": 1}
    assert final["active_tier"] == 1 and (final["block_m"], final["block_n"]) == (128, 256)
    assert final["max_q_len"] == 8192 and final["elapsed_s"] == pytest.approx(1.75)
    assert final["peak_bytes"] is None and final["peak_source"] == "not tracked on CPU"
    assert final["node_id"] == "7" and final["label"] == "WAN21"
    assert history.latest() == final and history.finished == 1
    assert mon.finish() is None  # finishing twice does nothing


def test_monitor_starts_a_run_on_first_call_and_history_is_shared():
    history = RunHistory(maxlen=2)
    a, b = RunMonitor("A", history=history), RunMonitor("B", history=history)
    a.record(_call())
    a.finish()
    b.record(_call(tier=3))
    b.finish()
    a.start()
    a.finish()
    runs = history.runs()
    assert [r["label"] for r in runs] == ["B", "A"] and [r["run_id"] for r in runs] == [2, 3]
    assert history.finished == 3


def test_status_is_json_ready():
    import json

    mon = RunMonitor("x", history=RunHistory())
    mon.record(_call())
    json.dumps(mon.status())
    json.dumps(mon.finish())


def test_peak_memory_on_cpu_says_so():
    assert read_peak_memory(torch.device("cpu")) == (None, "not tracked on CPU")


def test_format_bytes():
    assert format_bytes(None) == "n/a"
    assert format_bytes(512) == "512 B"
    assert format_bytes(1536 * 2**20) == "1.50 GiB"
    assert format_bytes(3 * 2**20) == "3.00 MiB"


# ---- probe text and families -------------------------------------------------------------------------------------


REPORT = {"name": "AMD Radeon RX 6800", "vendor": "AMD", "arch": "gfx1030", "total_bytes": 16 * 2**30,
          "free_bytes": 15 * 2**30, "sdpa_backends": {"math": True, "flash": False, "efficient": False},
          "efficient_sdpa": False, "patch_would_activate": True}


def test_probe_text_has_device_estimate_and_last_run():
    last = {"run_id": 4, "label": "WAN22", "calls": 240, "tiers": {"2": 200, "comfy": 40}, "max_q_len": 27280,
            "peak_bytes": 9 * 2**30, "peak_source": "torch.cuda.max_memory_allocated"}
    text = probe_text(REPORT, "ESTIMATE BLOCK", last)
    assert "AMD Radeon RX 6800 (AMD, arch gfx1030)" in text
    assert "VRAM: 15.0 GiB free of 16.0 GiB" in text
    assert "Efficient SDPA kernel: no" in text and "backends that run: math" in text
    assert "Global SDPA patch would activate: yes" in text
    assert "ESTIMATE BLOCK" in text
    assert "Last run #4 (WAN22): 240 attention calls [T2: 200, comfy: 40], longest sequence 27280 tokens" in text
    assert "Last run peak memory: 9.00 GiB" in text


def test_probe_text_without_estimate_or_run():
    text = probe_text(REPORT, None, None, note="Estimate: connect a MODEL")
    assert "Estimate: connect a MODEL" in text and "Last run: no run of this workflow yet" in text
    assert format_last_run({"run_id": 1, "tiers": {}, "peak_bytes": None, "peak_source": "not tracked on CPU"})[1] \
        == "Last run peak memory: not tracked on CPU"


def test_dtype_name():
    assert dtype_name(torch.bfloat16) == "bf16" and dtype_name(torch.float32) == "fp32"
    assert dtype_name(torch.float16) == "fp16" and dtype_name(torch.float64) == "fp64"


@pytest.mark.parametrize(
    "cls, config, expected",
    [
        ("WAN21", {"dim": 1536}, "wan2.1-1.3b"),
        ("WAN21", {"dim": 5120}, "wan2.1-14b"),
        ("WAN22", {"dim": 3072, "in_dim": 48}, "wan2.2-5b"),
        ("WAN21_Vace", {"dim": 5120}, "wan2.1-14b"),
        ("WAN22_S2V", {"dim": 5120}, "wan2.1-14b"),
        ("WAN21", {"dim": 256}, None),
        ("Flux", {}, "flux"),
        ("Chroma", {}, "flux"),
        ("SDXL", {}, "sdxl"),
        ("LTXV", {"num_layers": 28}, "ltxv-2b"),
        ("LTXV", {"num_layers": 48}, "ltxv-13b"),
        ("HunyuanVideoI2V", {}, "hunyuanvideo"),
        ("QwenImage", {}, "qwen-image"),
        ("SD3", {}, None),
    ],
)
def test_family_for_comfy_model(cls, config, expected):
    result = family_for_comfy_model(cls, config)
    assert result == expected
    assert result is None or result in family_names()


# ---- start-up and the pack's root module ------------------------------------------------------------------------


def test_run_startup_passes_device_and_version_prefix():
    seen = {}

    def decide(device=None, log_prefix=""):
        seen.update(device=device, prefix=log_prefix)
        return "decision"

    assert run_startup(device="cuda:1", decide=decide) == "decision"
    assert seen == {"device": "cuda:1", "prefix": f"noflash {pack_version()}"}
    assert pack_version() not in ("", "unknown")


def test_run_startup_never_raises(caplog):
    def broken(device=None, log_prefix=""):
        raise RuntimeError("no driver")

    with caplog.at_level(logging.WARNING):
        assert run_startup(decide=broken) is None
    assert "start-up detection failed" in caplog.text and "no driver" in caplog.text


def test_pack_root_imports_quietly_outside_comfyui():
    # pytest (and anyone) may import the repository root as a package: it must not need ComfyUI or patch torch.
    script = textwrap.dedent(
        f"""
        import importlib.util, sys, torch
        original = torch.nn.functional.scaled_dot_product_attention
        spec = importlib.util.spec_from_file_location("noflash_pack", {os.path.join(ROOT, "__init__.py")!r},
                                                      submodule_search_locations=[{ROOT!r}])
        pack = importlib.util.module_from_spec(spec)
        sys.modules["noflash_pack"] = pack
        spec.loader.exec_module(pack)
        assert pack.WEB_DIRECTORY == "./web"
        assert not hasattr(pack, "comfy_entrypoint")
        assert torch.nn.functional.scaled_dot_product_attention is original
        assert not any(m == "comfy" or m.startswith("comfy.") for m in sys.modules)
        print("OK")
        """
    )
    env = dict(os.environ, NOFLASH_FORCE_PATCH="1")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "OK", proc.stderr
    assert proc.stderr == ""
