"""Device capabilities as data: real profiles are cached, presets simulate GPUs on meta tensors."""

import re
from dataclasses import replace

import pytest
import torch

import noflash_core as nf
from noflash_core.device import PRESETS, amd_arch_from_name, device_profile, get_preset
from tests.support.video_cli import run_video_cli

GiB = 1024**3


def test_real_profile_is_cached_and_describes_this_cpu():
    a, b = device_profile("cpu"), device_profile("cpu")
    assert a is b and a.kind == "cpu" and a.device_class == "cpu" and not a.simulated


@pytest.mark.parametrize("name", ["gfx906", "gfx1030", "gfx1010", "mps", "arc", "cpu"])
def test_presets_exist_and_lack_fused_kernels(name):
    p = get_preset(name)
    assert p.total_bytes and p.total_bytes >= 8 * 1024**3
    assert not p.efficient_sdpa


def test_unknown_preset_names_the_choices():
    with pytest.raises(ValueError, match="gfx906"):
        get_preset("gfx9999")


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_memory_and_arch_agree_with_its_description(name):
    """Two sources written separately must agree: the memory and arch fields, and the product named in the
    description (parsed here; the arch through the marketing-name table that ZLUDA detection uses)."""
    p = PRESETS[name]
    sizes = re.findall(r"(\d+) GiB", p.description)
    assert sizes and int(sizes[-1]) * GiB == p.total_bytes == p.free_bytes
    if p.vendor == "AMD":
        named = amd_arch_from_name(p.description)
        assert named is not None and p.arch.startswith(named.rstrip("x")), (p.description, named, p.arch)


def test_efficient_sdpa_follows_the_backends_and_the_arch():
    """A fused backend that runs makes the profile efficient, except on an arch known to lack fused kernels."""
    nvidia = replace(get_preset("gfx1030"), name="ampere", kind="cuda", arch="sm_86")
    assert not nvidia.efficient_sdpa  # only math runs
    with_flash = replace(nvidia, sdpa_backends=(("flash", True), ("efficient", False), ("cudnn", False),
                                                ("math", True)))
    assert with_flash.efficient_sdpa and with_flash.fused_sdpa_backends() == ("flash",)
    rdna2_with_flash = replace(with_flash, kind="rocm", arch="gfx1030:xnack-")
    assert rdna2_with_flash.arch_lacks_fused_sdpa and not rdna2_with_flash.efficient_sdpa


def test_the_video_cli_lists_every_preset(capsys):
    listing = run_video_cli(["--list"], capsys)
    lines = listing.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("devices (--device"))
    devices = [line.strip() for line in lines[start + 1:start + 2 + len(PRESETS)]]
    for name, preset in PRESETS.items():
        assert f"{name} · {preset.description.replace(' / ', '/')}" in devices, name  # labels close up " / "


def test_simulate_device_plans_meta_tensors_as_the_gpu():
    q = torch.empty(1, 24, 9728, 128, dtype=torch.float16, device="meta")
    cpu_like = nf.plan(q, q, q)
    with nf.simulate_device("gfx1030", total_bytes=16 * 1024**3) as prof:
        assert device_profile(q) is prof or device_profile(q) == prof
        gpu = nf.plan(q, q, q)
        with nf.simulate_device("gfx1010"):
            assert device_profile(q).name == "gfx1010"
            small = nf.plan(q, q, q)
        assert device_profile(q).name == "gfx1030"
    assert device_profile(q).name == "meta"
    assert gpu.budget_bytes == 8 * 1024**3  # half of the simulated card's free memory
    assert small.budget_bytes == 4 * 1024**3
    assert cpu_like.budget_bytes != gpu.budget_bytes
