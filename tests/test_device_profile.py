"""Device capabilities as data: real profiles are cached, presets simulate GPUs on meta tensors."""

import pytest
import torch

import noflash_core as nf
from noflash_core.device import PRESETS, device_profile, get_preset


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
    assert set(PRESETS) >= {"gfx906", "gfx1030", "gfx1010", "mps", "arc", "cpu"}
