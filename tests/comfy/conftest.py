"""Fixtures for the tests that run inside a real ComfyUI (``COMFYUI_PATH`` set); everything skips without it."""

from __future__ import annotations

import os
import types

import pytest
from comfy_runtime import (
    comfyui_path,
    detect_features,
    load_core_nodes,
    load_pack,
    pack_module,
    save_state_dict,
    setup_comfyui,
    tiny_flux_state_dict,
    tiny_sd3_state_dict,
    tiny_wan_state_dict,
)


@pytest.fixture(scope="session")
def comfy(tmp_path_factory):
    """ComfyUI on CPU with its core nodes and the pack loaded the way ComfyUI loads custom nodes."""
    if comfyui_path() is None:
        pytest.skip("COMFYUI_PATH is not set to a ComfyUI checkout")
    setup_comfyui()
    load_core_nodes()
    base = str(tmp_path_factory.mktemp("comfy_base"))
    pack = load_pack(base)
    import nodes

    return types.SimpleNamespace(
        base=base,
        pack=pack,
        node=nodes.NODE_CLASS_MAPPINGS.__getitem__,
        module=lambda dotted: pack_module(pack, dotted),
    )


@pytest.fixture(scope="session")
def comfy_features(comfy):
    """:class:`comfy_runtime.ComfyFeatures` of the ComfyUI under test: what it has, found in its code (tests
    branch on these, never on version strings)."""
    return detect_features()


@pytest.fixture(scope="session")
def models_dir(comfy, tmp_path_factory):
    return str(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def tiny_wan(comfy, models_dir):
    """A tiny random Wan 2.1 T2V model, saved as safetensors and loaded through ComfyUI's model detection."""
    import comfy.sd

    path = save_state_dict(tiny_wan_state_dict(), os.path.join(models_dir, "tiny_wan.safetensors"))
    return comfy.sd.load_diffusion_model(path)


@pytest.fixture(scope="session")
def tiny_flux(comfy, models_dir):
    """A (narrow-as-detection-allows) random Flux.1-dev model: one double block, fp16 on disk."""
    import comfy.sd

    path = save_state_dict(tiny_flux_state_dict(), os.path.join(models_dir, "tiny_flux.safetensors"))
    return comfy.sd.load_diffusion_model(path)


@pytest.fixture(scope="session")
def tiny_sd3(comfy, models_dir):
    """A tiny random SD3-style MMDiT (depth 2, CLIP-L-wide text context and pooled vector)."""
    import comfy.sd

    path = save_state_dict(tiny_sd3_state_dict(), os.path.join(models_dir, "tiny_sd3.safetensors"))
    return comfy.sd.load_diffusion_model(path)
