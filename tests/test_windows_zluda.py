"""AMD on Windows, simulated on the Linux CI: ComfyUI-Zluda (ZLUDA) and ROCm's Windows wheels.

What is simulated (everything else is the real code and real torch):

- A ZLUDA device: ``torch.cuda.is_available`` True, ``get_device_name`` "AMD Radeon RX 6800 XT [ZLUDA]",
  ``get_device_properties`` with compute capability 8.8 (what ZLUDA reports) and either no ``gcnArchName`` or
  ComfyUI-Zluda's placeholder "UNKNOWN ARCHITECTURE", ``torch.version.hip`` None and ``torch.version.cuda``
  "11.8", ``is_bf16_supported`` True (torch's answer for 8.8), ``mem_get_info`` fixed numbers, and the allocator
  counters (``reset_peak_memory_stats``, ``max_memory_allocated``, ``memory_allocated``, ``empty_cache``).
- The one step of the SDPA probe that computes on the device (``device._try_backend``): "this backend's kernel
  ran". Which backends are tried is the real code's choice, from the process's real SDP flags.
- ROCm on Windows: ``torch.version.hip`` set, ``gcnArchName`` "gfx1030", ``sys.platform`` "win32".
- The amdgpu sysfs files: a folder of ``mem_info_vram_*`` files under ``tmp_path`` (the glob pattern points there).

torch's SDP flags (``torch.backends.cuda.enable_flash_sdp`` and friends, ``torch.backends.cudnn.enabled``) are
set for real, as ComfyUI-Zluda sets them, and restored after each test.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import noflash_core.device as device_mod
import noflash_core.device_memory as device_memory
from noflash_core import patch
from noflash_core.auto_patch import decide_and_apply
from noflash_core.bench.device import PeakMemory, describe_machine
from noflash_core.budget import FREE_MEMORY_FRACTION, bucket_bytes, default_budget_bytes
from noflash_core.comfy.startup import run_startup
from noflash_core.comfy.telemetry import RunHistory, RunMonitor
from noflash_core.device import PRESETS, amd_arch_from_name, clear_profile_cache, device_profile, sdp_flags
from noflash_core.oom import retry_out_of_memory
from tests.support.video_cli import run_video_cli

GiB = 1024**3
CUDA0 = torch.device("cuda", 0)
ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture
def sdp_state():
    """Save and restore torch's SDP flags and cuDNN switch (tests set them as ComfyUI-Zluda does)."""
    cuda = torch.backends.cuda
    saved = (cuda.flash_sdp_enabled(), cuda.mem_efficient_sdp_enabled(), cuda.cudnn_sdp_enabled(),
             cuda.math_sdp_enabled(), torch.backends.cudnn.enabled)
    yield
    cuda.enable_flash_sdp(saved[0])
    cuda.enable_mem_efficient_sdp(saved[1])
    cuda.enable_cudnn_sdp(saved[2])
    cuda.enable_math_sdp(saved[3])
    torch.backends.cudnn.enabled = saved[4]


def comfyui_zluda_flags() -> None:
    """What ComfyUI-Zluda's default ``comfy/zluda.py`` does at start-up under ZLUDA."""
    torch.backends.cudnn.enabled = False
    torch.backends.cuda.enable_flash_sdp(False)
    torch.backends.cuda.enable_math_sdp(True)
    torch.backends.cuda.enable_mem_efficient_sdp(False)


class FakeGPU:
    """One simulated CUDA device: its torch answers and a log of the allocator calls made on it."""

    def __init__(self, name: str, *, hip=None, arch=None, cc=(8, 8), free=15 * GiB, total=16 * GiB,
                 kernels=("flash", "efficient", "cudnn", "math")) -> None:
        self.name, self.hip, self.cc = name, hip, cc
        self.arch = arch
        self.free, self.total = free, total
        self.kernels = set(kernels)  # the SDPA backends whose kernels run when tried
        self.tried: list = []
        self.calls: list = []
        self.peak = 0

    def properties(self, device=None):
        props = SimpleNamespace(name=self.name, major=self.cc[0], minor=self.cc[1], total_memory=self.total)
        if self.arch is not None:
            props.gcnArchName = self.arch
        return props

    def try_backend(self, device, backend) -> bool:
        name = {"FLASH_ATTENTION": "flash", "EFFICIENT_ATTENTION": "efficient", "CUDNN_ATTENTION": "cudnn",
                "MATH": "math"}[backend.name]
        self.tried.append(name)
        return name in self.kernels

    def install(self, monkeypatch) -> None:
        cuda = torch.cuda
        monkeypatch.setattr(cuda, "is_available", lambda: True)
        monkeypatch.setattr(cuda, "current_device", lambda: 0)
        monkeypatch.setattr(cuda, "device_count", lambda: 1)
        monkeypatch.setattr(cuda, "get_device_name", lambda device=None: self.name)
        monkeypatch.setattr(cuda, "get_device_properties", self.properties)
        monkeypatch.setattr(cuda, "is_bf16_supported", lambda *a, **k: True)
        monkeypatch.setattr(cuda, "mem_get_info", lambda device=None: (self.free, self.total))
        monkeypatch.setattr(cuda, "synchronize", lambda device=None: self.calls.append("synchronize"))
        monkeypatch.setattr(cuda, "empty_cache", lambda: self.calls.append("empty_cache"))
        monkeypatch.setattr(cuda, "reset_peak_memory_stats", lambda device=None: self.calls.append("reset_peak"))
        monkeypatch.setattr(cuda, "max_memory_allocated", lambda device=None: self.peak)
        monkeypatch.setattr(cuda, "memory_allocated", lambda device=None: 1000)
        monkeypatch.setattr(torch.version, "hip", self.hip)
        monkeypatch.setattr(torch.version, "cuda", None if self.hip else "11.8")
        monkeypatch.setattr(device_mod, "_try_backend", self.try_backend)
        clear_profile_cache()


@pytest.fixture
def gpu(monkeypatch, sdp_state):
    """Install a FakeGPU (call the returned function with its arguments); profiles are forgotten afterwards."""

    def make(name="AMD Radeon RX 6800 XT [ZLUDA]", platform="win32", **kwargs) -> FakeGPU:
        fake = FakeGPU(name, **kwargs)
        fake.install(monkeypatch)
        monkeypatch.setattr(sys, "platform", platform)
        return fake

    yield make
    clear_profile_cache()
    patch.disable()


# ---------------------------------------------------------------------------------------------- detection


@pytest.mark.parametrize("gcn", [None, "UNKNOWN ARCHITECTURE"])
@pytest.mark.parametrize("name, arch, gib", [
    ("AMD Radeon RX 6800 XT [ZLUDA]", "gfx1030", 16),
    ("AMD Radeon RX 6700 XT [ZLUDA]", "gfx1031", 12),
    ("AMD Radeon RX 6600 [ZLUDA]", "gfx1032", 8),
    ("AMD Radeon RX 5700 XT [ZLUDA]", "gfx1010", 8),
])
def test_a_zluda_device_gets_the_amd_cards_profile(gpu, gcn, name, arch, gib):
    gpu(name, arch=gcn, total=gib * GiB, free=gib * GiB - GiB)
    p = device_profile("cuda:0")
    assert (p.kind, p.vendor, p.arch, p.platform) == ("zluda", "AMD", arch, "win32")
    assert p.description == name and p.total_bytes == gib * GiB
    assert p.free_memory() == gib * GiB - GiB  # mem_get_info: no sysfs on Windows
    assert p.bf16 is False  # torch says yes for compute capability 8.8; RDNA1/2 have no bf16 matrix hardware
    assert p.arch_lacks_fused_sdpa and not p.efficient_sdpa


def test_the_same_name_without_zluda_is_an_nvidia_gpu(gpu):
    gpu("NVIDIA GeForce RTX 3090", platform="linux", cc=(8, 6))
    p = device_profile("cuda:0")
    assert (p.kind, p.vendor, p.arch) == ("cuda", "NVIDIA", "sm_86")
    assert p.bf16 and p.efficient_sdpa


@pytest.mark.parametrize("name, arch", [
    ("AMD Radeon RX 5500 XT", "gfx1012"), ("AMD Radeon RX 5600 XT", "gfx1010"), ("AMD Radeon RX 6400", "gfx1034"),
    ("AMD Radeon RX 6950 XT", "gfx1030"), ("AMD Radeon RX 6750 XT", "gfx1031"), ("AMD Radeon RX 6650 XT", "gfx1032"),
    ("AMD Radeon RX 6800M", "gfx1031"), ("AMD Radeon RX 6700S", "gfx1032"), ("AMD Radeon RX 7900 XTX", "gfx1100"),
    ("AMD Radeon RX 7800 XT", "gfx1101"), ("AMD Radeon RX 7600", "gfx1102"), ("AMD Radeon VII", "gfx906"),
    ("AMD Radeon RX Vega 64", "gfx900"), ("AMD Radeon RX 6990 [ZLUDA]", "gfx103x"),
    ("AMD Radeon RX 7999 [ZLUDA]", "gfx110x"), ("NVIDIA GeForce RTX 4090", None),
])
def test_marketing_names_map_to_their_gfx_target(name, arch):
    assert amd_arch_from_name(name) == arch


# ---------------------------------------------------------------------------------------------- auto-patch


def test_auto_patch_turns_on_under_comfyui_zludas_flags_and_the_log_says_zluda(gpu, caplog):
    fake = gpu("AMD Radeon RX 6800 XT [ZLUDA]")
    comfyui_zluda_flags()
    with caplog.at_level(logging.INFO, logger="noflash_core"):
        decision = run_startup(device=CUDA0)
    assert decision.enabled and patch.is_enabled()
    assert "ZLUDA" in decision.reason and "gfx1030" in decision.reason
    lines = [r.getMessage() for r in caplog.records if "global SDPA patch" in r.getMessage()]
    assert len(lines) == 1 and "enabled" in lines[0] and "ZLUDA" in lines[0], lines
    assert fake.tried == ["math"]  # the fused kernels the process turned off were never run


def test_auto_patch_stays_off_where_a_fused_kernel_is_allowed_and_probed(gpu):
    """A card whose arch has fused kernels (RDNA3), with flash allowed and running: no patch. The same card once
    the process turns the fused kernels off (as ComfyUI-Zluda does after the profile was made): patch, because
    the flags are read when deciding."""
    gpu("AMD Radeon RX 7900 XTX [ZLUDA]", total=24 * GiB, kernels=("flash", "math"))
    first = decide_and_apply("cuda:0")
    assert not first.enabled and not patch.is_enabled()
    assert "fused SDPA kernel (flash)" in first.reason and "ZLUDA, gfx1100" in first.reason
    comfyui_zluda_flags()
    second = decide_and_apply("cuda:0")
    assert second.enabled and patch.is_enabled()
    assert "turned off torch's flash, efficient and cudnn SDPA" in second.reason and "ZLUDA" in second.reason


def test_the_probe_never_runs_a_backend_the_process_turned_off(gpu):
    fake = gpu("AMD Radeon RX 7900 XTX [ZLUDA]")
    torch.backends.cuda.enable_mem_efficient_sdp(False)
    p = device_profile("cuda:0")
    assert "efficient" not in fake.tried and {"flash", "math"} <= set(fake.tried)
    assert dict(p.sdpa_backends)["efficient"] is False
    assert sdp_flags()["efficient"] is False and p.fused_sdpa_backends() == ("flash", "cudnn")


# ---------------------------------------------------------------------------------------------- Windows paths


def _sysfs(tmp_path: Path, monkeypatch, total: int, used: int) -> None:
    card = tmp_path / "card0" / "device"
    card.mkdir(parents=True)
    (card / "mem_info_vram_total").write_text(f"{total}\n")
    (card / "mem_info_vram_used").write_text(f"{used}\n")
    monkeypatch.setattr(device_memory, "_SYSFS_GLOB", str(tmp_path / "card*" / "device" / "mem_info_vram_total"))


@pytest.mark.parametrize("platform, free", [("linux", 13 * GiB), ("win32", 15 * GiB)])
def test_rocm_free_memory_reads_sysfs_on_linux_and_mem_get_info_on_windows(gpu, tmp_path, monkeypatch, platform,
                                                                          free):
    """The same ROCm card: Linux reads the amdgpu sysfs files (16 GiB, 3 used), Windows has none and asks
    ``mem_get_info`` (15 GiB free)."""
    _sysfs(tmp_path, monkeypatch, 16 * GiB, 3 * GiB)
    gpu("AMD Radeon RX 6800 XT", platform=platform, hip="6.4", arch="gfx1030")
    p = device_profile("cuda:0")
    assert (p.kind, p.arch, p.platform) == ("rocm", "gfx1030", platform)
    assert p.free_memory() == free
    assert not p.efficient_sdpa  # the Windows wheels have no AOTriton: math only, and gfx103x has no fused kernel


def test_host_memory_without_proc_meminfo_comes_from_psutil(monkeypatch):
    psutil = pytest.importorskip("psutil")

    def no_proc(path, *args, **kwargs):
        raise FileNotFoundError(path)

    monkeypatch.setattr(device_memory, "open", no_proc, raising=False)
    total, available = device_memory.memory_info(torch.device("cpu"))
    assert total == psutil.virtual_memory().total and 0 < available <= total


def test_budget_under_zluda_is_half_the_free_memory_mem_get_info_reports(gpu, monkeypatch):
    gpu(free=10 * GiB)
    monkeypatch.delenv("NOFLASH_BUDGET_MB", raising=False)
    half = int(10 * GiB * FREE_MEMORY_FRACTION)  # rounded down to its eighth-octave bucket (budget.bucket_bytes)
    assert default_budget_bytes(CUDA0) == bucket_bytes(half) and 0.917 * half <= bucket_bytes(half) <= half
    monkeypatch.setenv("NOFLASH_BUDGET_MB", "512")
    assert default_budget_bytes(CUDA0) == 512 * 1024 * 1024


def test_oom_retry_under_zluda_frees_the_cuda_cache_before_each_retry(gpu):
    fake = gpu()
    tried = []

    def run(block):
        tried.append(block)
        if block > 64:
            raise torch.OutOfMemoryError("HIP out of memory (simulated)")
        return block * 2

    result, setting = retry_out_of_memory(run, 256, lambda: [128, 64, 32], CUDA0, what="test")
    assert (result, setting, tried) == (128, 64, [256, 128, 64])
    assert fake.calls.count("empty_cache") == 2


def test_telemetry_and_bench_peaks_use_the_cuda_counters_under_zluda(gpu):
    fake = gpu()
    monitor = RunMonitor(history=RunHistory())
    monitor.start(CUDA0)
    assert fake.calls == ["reset_peak"]
    fake.peak = 3 * GiB
    status = monitor.finish()
    assert status["peak_bytes"] == 3 * GiB and status["peak_source"] == "torch.cuda.max_memory_allocated"
    fake.calls.clear()
    with PeakMemory(CUDA0) as mem:
        fake.peak = 5000
    assert mem.method == "allocator" and mem.peak_bytes == 4000  # above the 1000 bytes allocated on entry
    assert fake.calls == ["synchronize", "reset_peak", "synchronize"]
    machine = describe_machine(CUDA0)
    assert (machine["gpu_kind"], machine["gpu_arch"], machine["hip"], machine["cuda"]) == ("zluda", "gfx1030", None,
                                                                                           "11.8")
    assert machine["fused_sdpa"] is False


def test_no_linux_only_call_in_the_library_or_the_nodes():
    """Nothing Windows lacks: no fork, POSIX signals, /tmp, fcntl, resource, os.uname; /proc and /sys only in the
    two modules that fall back when they are missing."""
    banned = re.compile(r"\bos\.fork\b|[\"']fork[\"']|\bimport signal\b|\bsignal\.SIG|[\"']/tmp\b|\bfcntl\b|"
                        r"\bimport resource\b|\bos\.uname\b|\bos\.getuid\b")
    proc_sys = re.compile(r"[\"']/(proc|sys)/")
    allowed_proc_sys = {"noflash_core/device_memory.py", "noflash_core/bench/device.py"}
    files = [*ROOT.joinpath("noflash_core").rglob("*.py"), *ROOT.joinpath("nodes").rglob("*.py"),
             ROOT / "__init__.py"]
    assert len(files) > 20
    found = []
    for path in files:
        rel = path.relative_to(ROOT).as_posix()
        text = path.read_text(encoding="utf-8")
        found += [f"{rel}: {m.group(0)}" for m in banned.finditer(text)]
        if rel not in allowed_proc_sys:
            found += [f"{rel}: {m.group(0)}" for m in proc_sys.finditer(text)]
    assert not found


# ---------------------------------------------------------------------------------------------- tuning cache


def test_tuning_cache_lives_in_the_windows_user_cache_folder():
    store = pytest.importorskip("noflash_core.tune.store")
    env = {"LOCALAPPDATA": r"C:\Users\ana\AppData\Local"}
    assert store.cache_path(env, "win32", r"C:\Users\ana") == r"C:\Users\ana\AppData\Local\noflash\Cache\tune.json"
    assert store.cache_path({}, "win32", r"C:\Users\ana") == r"C:\Users\ana\AppData\Local\noflash\Cache\tune.json"
    assert store.cache_path({"NOFLASH_TUNE_CACHE": r"D:\cache"}, "win32") == r"D:\cache\tune.json"


def test_tuning_cache_update_survives_windows_replace_refusals(tmp_path, monkeypatch):
    """On Windows ``os.replace`` fails with PermissionError while a reader holds the target open; the update
    retries and the file ends whole."""
    store = pytest.importorskip("noflash_core.tune.store")
    path = str(tmp_path / "noflash" / "tune.json")
    real_replace = store.os.replace
    refusals = []

    def replace(src, dst):
        if dst == path and len(refusals) < 3:
            refusals.append(dst)
            raise PermissionError(13, "The process cannot access the file because it is being used", dst)
        return real_replace(src, dst)

    monkeypatch.setattr(store.os, "replace", replace)
    store.update_document(path, lambda doc: doc["devices"].setdefault("zluda|x", {"entries": {"k": {"v": 1}}}))
    store.update_document(path, lambda doc: doc["devices"].setdefault("gfx1030|y", {"entries": {}}))
    assert len(refusals) == 3
    doc = json.loads(Path(path).read_text(encoding="utf-8"))
    assert set(doc["devices"]) == {"zluda|x", "gfx1030|y"} and doc["devices"]["zluda|x"]["entries"] == {"k": {"v": 1}}
    assert not list(Path(path).parent.glob("*.lock")) and not list(Path(path).parent.glob(".tune-*"))


def test_a_zluda_cards_tuning_results_are_filed_apart_from_nvidia_and_linux_rocm(gpu):
    signature = pytest.importorskip("noflash_core.tune.signature")
    gpu("AMD Radeon RX 6800 XT [ZLUDA]")
    identity = signature.device_identity("cuda:0")
    assert identity["kind"] == "zluda" and identity["arch"] == "gfx1030"
    assert "[ZLUDA]" in identity["name"]


# ---------------------------------------------------------------------------------------------- video CLI

_WAN = ["--model", "wan2.2-5b", "--width", "1280", "--height", "704", "--frames", "121", "--batch", "2", "--json"]


def _paths(value, prefix=""):
    """Every leaf of a JSON value as ``{path: value}``."""
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in _paths(item, f"{prefix}.{key}").items()}
    if isinstance(value, list):
        return {k: v for i, item in enumerate(value) for k, v in _paths(item, f"{prefix}[{i}]").items()}
    return {prefix: value}


def test_wan22_5b_on_the_zluda_rx6800_plans_as_on_gfx1030_except_what_really_differs(capsys):
    """Same card, same tiers and tiles, same verdicts. What differs: the device's name, kind and the notes that
    quote them, and the attention working memory, because ComfyUI-Zluda's torch (2.7, CUDA 11.8) has no
    ``bmm(out_dtype=float32)`` (``half_out_fp32`` False), so half operands are copied to fp32 once."""
    linux = _paths(json.loads(run_video_cli([*_WAN, "--device", "gfx1030"], capsys)))
    zluda = _paths(json.loads(run_video_cli([*_WAN, "--device", "zluda-rx6800"], capsys)))
    assert set(linux) == set(zluda)
    differ = {k for k in linux if linux[k] != zluda[k]}
    assert differ == {
        ".device.key", ".device.description", ".device.kind", ".device.note", ".notes[0]", ".verdict_text",
        ".denoise.attention[0].peak_bytes", ".denoise.attention[0].planner_bytes", ".denoise.attention[1].peak_bytes",
        ".denoise.attention[1].planner_bytes", ".denoise.working_noflash_chunked_bytes",
    }
    assert zluda[".device.kind"] == "zluda" and "ZLUDA" in zluda[".device.description"]
    assert zluda[".verdict_text"] == linux[".verdict_text"].replace("gfx1030", "zluda-rx6800")
    for k in (".denoise.attention[0].tier", ".denoise.attention[0].block_m", ".denoise.attention[0].block_n",
              ".device.paths.diffusion", ".denoise.fits_noflash", ".denoise.fits_comfy", ".vae.comfy_path"):
        assert zluda[k] == linux[k], k


def test_wan22_5b_on_windows_rocm_plans_exactly_as_on_linux_rocm(capsys):
    linux = _paths(json.loads(run_video_cli([*_WAN, "--device", "gfx1030"], capsys)))
    windows = _paths(json.loads(run_video_cli([*_WAN, "--device", "winrocm-rx6800"], capsys)))
    differ = {k for k in linux if linux[k] != windows[k]}
    assert differ == {".device.key", ".device.description", ".device.note", ".notes[0]", ".verdict_text"}


@pytest.mark.parametrize("preset", sorted(p for p in PRESETS if p.startswith(("zluda-", "winrocm-"))))
def test_the_video_cli_plans_for_every_windows_preset(capsys, preset):
    est = json.loads(run_video_cli(["--model", "sdxl", "--width", "1024", "--height", "1024", "--json",
                                    "--device", preset], capsys))
    assert est["device"]["key"] == preset and est["device"]["simulated"]
    assert est["vram_bytes"] == PRESETS[preset].total_bytes
    assert est["device"]["paths"]["diffusion"] == "sub_quad"  # ComfyUI-Zluda launches with --use-quad-cross-attention
    attention = est["denoise"]["attention"]
    assert attention and all(a["tier"] in (0, 1, 2, 3) and a["verified"] for a in attention)
