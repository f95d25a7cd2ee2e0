"""Which :mod:`noflash_core.video.families` entry a loaded ComfyUI model is, from its class name and config.

The VRAM Probe node passes ``type(patcher.model).__name__`` (a ``comfy.model_base`` class such as ``WAN21``,
``WAN22``, ``Flux``) and ``patcher.model.model_config.unet_config`` (the dict ComfyUI's model detection built from
the state dict). Nothing here imports ComfyUI.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Mapping, Optional

__all__ = ["family_for_comfy_model"]


def _wan(config: Mapping[str, Any]) -> Optional[str]:
    # Wan 2.2 TI2V 5B is the only Wan with a 48-channel latent; A14B experts share Wan 2.1 14B's shape.
    if config.get("in_dim") == 48 or config.get("dim") == 3072:
        return "wan2.2-5b"
    if config.get("dim") == 1536:
        return "wan2.1-1.3b"
    if config.get("dim") == 5120:
        return "wan2.1-14b"
    return None


def _wan22(config: Mapping[str, Any]) -> Optional[str]:
    return _wan(config) or "wan2.2-5b"


def _ltxv(config: Mapping[str, Any]) -> Optional[str]:
    return "ltxv-13b" if int(config.get("num_layers", 28)) >= 48 else "ltxv-2b"


def _fixed(name: str) -> Callable[[Mapping[str, Any]], Optional[str]]:
    return lambda config: name


_BY_CLASS: Dict[str, Callable[[Mapping[str, Any]], Optional[str]]] = {
    "WAN21": _wan,
    "WAN22": _wan22,
    "Flux": _fixed("flux"),
    "Chroma": _fixed("flux"),
    "SDXL": _fixed("sdxl"),
    "LTXV": _ltxv,
    "HunyuanVideo": _fixed("hunyuanvideo"),
    "QwenImage": _fixed("qwen-image"),
}


def family_for_comfy_model(class_name: str, unet_config: Optional[Mapping[str, Any]] = None) -> Optional[str]:
    """The model-family key for a ComfyUI model, or None when the pack has no shape table for it.

    Args:
        class_name: ``type(model_patcher.model).__name__``; subclasses such as ``WAN21_Vace`` or
            ``HunyuanVideoI2V`` resolve through their prefix.
        unet_config: the detected config (``dim``, ``in_dim``, ``num_layers``, ...).
    """
    config = unet_config or {}
    handler = _BY_CLASS.get(class_name)
    if handler is None:
        for prefix, candidate in _BY_CLASS.items():
            if class_name.startswith(prefix):
                handler = candidate
                break
    return handler(config) if handler is not None else None
