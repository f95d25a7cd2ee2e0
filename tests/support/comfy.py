"""ComfyUI for the test files outside ``tests/comfy`` (which is not on their import path): load
``tests/comfy/comfy_runtime.py`` under a name of the caller's and set ComfyUI up, or skip without ``COMFYUI_PATH``."""

from __future__ import annotations

import importlib.util
import os
import types

import pytest

__all__ = ["comfy_runtime_or_skip"]

_RUNTIME = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "comfy", "comfy_runtime.py")


def comfy_runtime_or_skip(module_name: str) -> types.ModuleType:
    """``tests/comfy/comfy_runtime.py`` loaded as ``module_name``, after its ``setup_comfyui()`` (ComfyUI importable,
    on CPU); skips the calling test where ``COMFYUI_PATH`` does not name a ComfyUI checkout."""
    spec = importlib.util.spec_from_file_location(module_name, _RUNTIME)
    rt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rt)
    if rt.comfyui_path() is None:
        pytest.skip("COMFYUI_PATH is not set to a ComfyUI checkout")
    rt.setup_comfyui()
    return rt
