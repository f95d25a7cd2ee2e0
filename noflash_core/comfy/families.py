"""Which :mod:`noflash_core.video.families` entry a loaded ComfyUI model is, from its class name and config.

The VRAM Probe node passes ``type(patcher.model).__name__`` (a ``comfy.model_base`` class such as ``WAN21``,
``WAN22``, ``Flux``) and ``patcher.model.model_config.unet_config`` (the dict ComfyUI's model detection built from
the state dict). Nothing here imports ComfyUI.

Class names and config keys are ComfyUI's: 0.3.64 and 0.33 share the older ones; 0.33 adds (``comfy/model_base.py``,
``comfy/model_detection.py``) ``LTXAV`` (LTX-2, LTX-2.3), ``HunyuanVideo15``, ``Flux2``, ``Lumina2`` with
``dim=3840`` (Z-Image), ``QwenImage`` with a ``default_ref_method`` (the 2511 / Layered edit checkpoints),
``Kandinsky5`` (``model_dim`` 1792 lite, 4096 pro), ``MiniMaxH3`` and ``Krea2``. A subclass resolves through the
longest class-name prefix in the table (``HunyuanVideo15_SR_Distilled`` is HunyuanVideo 1.5, ``HunyuanVideoI2V``
HunyuanVideo).
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


def _hunyuan(config: Mapping[str, Any]) -> Optional[str]:
    # HunyuanVideo 1.5 checkpoints carry a SigLIP projection (vision_in_dim 1152) and cond_type_embedding; a 0.33
    # that names them HunyuanVideo15 is caught by the class name first.
    if config.get("vision_in_dim") or config.get("use_cond_type_embedding"):
        return "hunyuanvideo-1.5"
    return "hunyuanvideo"


def _ltxav(config: Mapping[str, Any]) -> Optional[str]:
    # LTX-2.3 differs from LTX-2 by its metadata config (the checkpoint's "config" -> "transformer" entries that
    # model_detection merges in); the token shapes are the same, so a wrong pick changes only the weight size.
    keys = ("cross_attention_adaln", "caption_proj_before_connector", "apply_gated_attention")
    return "ltx-2.3" if any(config.get(k) for k in keys) else "ltx-2"


def _flux2(config: Mapping[str, Any]) -> Optional[str]:
    # Flux 2 dev has hidden 6144; the Klein checkpoints (3072 / 4096) are not in the table.
    return "flux2-dev" if config.get("hidden_size", 6144) == 6144 else None


def _lumina2(config: Mapping[str, Any]) -> Optional[str]:
    return "z-image" if config.get("dim") == 3840 else None  # 2304 is Lumina 2 itself (not in the table)


def _qwen_image(config: Mapping[str, Any]) -> Optional[str]:
    # Only the edit checkpoints that ComfyUI marks (2511, Layered) set a default_ref_method; Qwen-Image-Edit 2509
    # looks like Qwen-Image from its weights: pick "qwen-image-edit" by hand there.
    return "qwen-image-edit" if config.get("default_ref_method") else "qwen-image"


def _kandinsky5(config: Mapping[str, Any]) -> Optional[str]:
    return {1792: "kandinsky5-lite", 4096: "kandinsky5-pro"}.get(config.get("model_dim", 1792))


_BY_CLASS: Dict[str, Callable[[Mapping[str, Any]], Optional[str]]] = {
    "WAN21": _wan,
    "WAN22": _wan22,
    "Flux": _fixed("flux"),
    "Flux2": _flux2,
    "Chroma": _fixed("flux"),
    "SDXL": _fixed("sdxl"),
    "LTXV": _ltxv,
    "LTXAV": _ltxav,
    "HunyuanVideo": _hunyuan,
    "HunyuanVideo15": _fixed("hunyuanvideo-1.5"),
    "QwenImage": _qwen_image,
    "Lumina2": _lumina2,
    "Kandinsky5": _kandinsky5,
    "Kandinsky5Image": lambda config: None,
    "MiniMaxH3": _fixed("minimax-h3"),
    "Krea2": _fixed("krea2"),
}


def family_for_comfy_model(class_name: str, unet_config: Optional[Mapping[str, Any]] = None) -> Optional[str]:
    """The model-family key for a ComfyUI model, or None when the pack has no shape table for it.

    Args:
        class_name: ``type(model_patcher.model).__name__``; subclasses such as ``WAN21_Vace`` or
            ``HunyuanVideoI2V`` resolve through their prefix.
        unet_config: the detected config (``dim``, ``in_dim``, ``num_layers``, ...).
    """
    config = unet_config or {}
    prefixes = [p for p in _BY_CLASS if class_name.startswith(p)]
    if not prefixes:
        return None
    return _BY_CLASS[max(prefixes, key=len)](config)
