"""The routing inputs (``enabled``, ``min_tokens``, ``budget_mb``) are the same on every attention patcher, as the
frontend sees them (``/object_info``), and make the config the override runs with.

Needs a real ComfyUI (``COMFYUI_PATH``, for ``comfy_api``); skips without it.
"""

from __future__ import annotations

import types

import pytest

from tests.support.comfy import comfy_runtime_or_skip

PATCHERS = {"NoFlashAttentionPatcher": "model", "NoFlashCLIPPatcher": "clip", "NoFlashVAEPatcher": "vae"}
ROUTING = ("enabled", "min_tokens", "budget_mb")
MIB = 1 << 20


@pytest.fixture(scope="module")
def pack(tmp_path_factory):
    rt = comfy_runtime_or_skip("noflash_comfy_runtime_inputs")
    loaded = rt.load_pack(str(tmp_path_factory.mktemp("inputs_base")))
    import nodes

    return types.SimpleNamespace(classes=nodes.NODE_CLASS_MAPPINGS, module=lambda d: rt.pack_module(loaded, d))


def _info(pack, name):
    """What ``GET /object_info`` sends for the node."""
    return pack.classes[name].GET_NODE_INFO_V1()


def test_every_patcher_has_the_routing_inputs_right_after_what_it_patches(pack):
    for name, first in PATCHERS.items():
        order = _info(pack, name)["input_order"]["required"]
        assert order[:4] == [first, *ROUTING], (name, order)


def test_the_routing_inputs_are_the_same_on_every_patcher(pack):
    specs = {name: {k: _info(pack, name)["input"]["required"][k] for k in ROUTING} for name in PATCHERS}
    reference = specs["NoFlashAttentionPatcher"]
    assert reference["enabled"][0] == "BOOLEAN" and reference["enabled"][1]["default"] is True
    assert reference["min_tokens"][0] == "INT" and reference["min_tokens"][1]["default"] == 1024
    assert reference["budget_mb"][0] == "INT" and reference["budget_mb"][1]["default"] == 0
    assert "MiB" in reference["budget_mb"][1]["tooltip"]
    for name, spec in specs.items():
        # budget_mb is identical, tooltip included; enabled and min_tokens differ only in the tooltip (what is patched)
        assert spec["budget_mb"] == reference["budget_mb"], name
        for key in ("enabled", "min_tokens"):
            assert spec[key][0] == reference[key][0], (name, key)
            ours = {k: v for k, v in spec[key][1].items() if k != "tooltip"}
            theirs = {k: v for k, v in reference[key][1].items() if k != "tooltip"}
            assert ours == theirs, (name, key, ours, theirs)
            assert spec[key][1]["tooltip"], (name, key)


def test_schema_defaults_are_the_override_defaults(pack):
    """A Tier Selector on an unpatched model installs ``OverrideConfig()``: the same as a patcher left at defaults."""
    module = pack.module("nodes._schema")
    override = pack.module("noflash_core.comfy.override")
    required = _info(pack, "NoFlashAttentionPatcher")["input"]["required"]
    defaults = [required[k][1]["default"] for k in ROUTING]
    assert module.routing_config(*defaults) == override.OverrideConfig()


def test_budget_mb_becomes_bytes_and_zero_means_automatic(pack):
    module = pack.module("nodes._schema")
    assert module.routing_config(True, 0, 0).budget_bytes is None
    assert module.routing_config(True, 0, 64).budget_bytes == 64 * MIB
    config = module.routing_config(False, 4096, 1 << 20, tier=2)
    assert (config.enabled, config.min_tokens, config.budget_bytes, config.tier) == (False, 4096, 1 << 40, 2)
