"""The VRAM probe's family detection from models that ComfyUI itself detected and built (0.3.64 and 0.33).

Each model is a state dict with the checkpoint's key names and tensor shapes (the figures ComfyUI's detection reads:
hidden sizes, head counts, block counts), on the ``meta`` device so a 32B model costs nothing. ComfyUI's own
``model_detection.model_config_from_unet`` picks the supported-models class and builds its ``unet_config``; its
``get_model`` builds the ``model_base`` object (on ``meta``), exactly what a loaded MODEL carries into the probe
node: ``type(model).__name__`` and ``model.model_config.unet_config``. The 2026 families run where the ComfyUI has
their class (0.33); the older ones on both versions.

The checkpoint shapes below (e.g. Flux 2 dev's hidden 6144 with 8 double and 48 single blocks) are the published
checkpoints' and the same assumptions the family table states; what the test adds is ComfyUI's derivation from them
(heads = hidden // 128, Krea 2's kv heads from ``wk``, Kandinsky 5's heads from ``axes_dims``, ...), compared with
the table's stage, and the detection of each class and config as the right family.
"""

from __future__ import annotations

import json
from typing import Callable, Dict, Optional, Tuple

import pytest
import torch

from noflash_core.comfy.families import family_for_comfy_model
from noflash_core.video.families import get_family

_META = torch.device("meta")

StateDict = Dict[str, torch.Tensor]


def _t(*shape: int) -> torch.Tensor:
    return torch.empty(*shape, device=_META)


def _blocks(sd: StateDict, prefix: str, count: int) -> None:
    for i in range(count):
        sd.setdefault(f"{prefix}{i}.norm.weight", _t(1))


# ---- 2026 checkpoints (ComfyUI 0.33 detection keys) ---------------------------------------------------------------


def _ltx2(v23: bool = False) -> Tuple[StateDict, Optional[dict]]:
    sd = {"adaln_single.emb.timestep_embedder.linear_1.bias": _t(4096), "audio_adaln_single.linear.weight": _t(1)}
    for i in range(48):
        sd[f"transformer_blocks.{i}.attn2.to_k.weight"] = _t(4096, 4096)  # 32 heads x 128, context 4096
    meta = {"config": json.dumps({"transformer": {"cross_attention_adaln": True,
                                                  "caption_proj_before_connector": True}})} if v23 else None
    return sd, meta


def _hunyuan15() -> Tuple[StateDict, None]:
    sd = {
        "txt_in.individual_token_refiner.blocks.0.norm1.weight": _t(2048),
        "img_in.proj.weight": _t(2048, 65, 1, 1, 1),
        "final_layer.linear.weight": _t(32, 2048),
        "txt_in.input_embedder.weight": _t(2048, 3584),
        "cond_type_embedding.weight": _t(3, 2048),
        "vision_in.proj.0.weight": _t(1152),
        "byt5_in.fc1.weight": _t(2048, 1472),
    }
    _blocks(sd, "double_blocks.", 54)
    return sd, None


def _flux2() -> Tuple[StateDict, None]:
    sd = {"double_blocks.0.img_attn.norm.key_norm.scale": _t(128), "img_in.weight": _t(6144, 128),
          "double_stream_modulation_img.lin.weight": _t(6 * 6144, 6144), "txt_in.weight": _t(6144, 15360)}
    _blocks(sd, "double_blocks.", 8)
    _blocks(sd, "single_blocks.", 48)
    return sd, None


def _z_image() -> Tuple[StateDict, None]:
    sd = {"cap_embedder.1.weight": _t(3840, 2560), "noise_refiner.0.attention.k_norm.weight": _t(128),
          "cap_pad_token": _t(1, 3840), "x_embedder.weight": _t(3840, 64)}
    _blocks(sd, "layers.", 30)
    return sd, None


def _qwen_image(edit_2511: bool) -> Tuple[StateDict, None]:
    sd = {"txt_norm.weight": _t(3584), "img_in.weight": _t(3072, 64), "proj_out.weight": _t(64, 3072)}
    _blocks(sd, "transformer_blocks.", 60)
    if edit_2511:
        sd["__index_timestep_zero__"] = _t(0)
    return sd, None


def _kandinsky5(model_dim: int, ff_dim: int, blocks: int, visual_embed_dim: int = 132) -> Tuple[StateDict, None]:
    sd = {
        "visual_transformer_blocks.0.cross_attention.key_norm.weight": _t(model_dim),
        "visual_embeddings.in_layer.bias": _t(model_dim),
        "visual_embeddings.in_layer.weight": _t(model_dim, visual_embed_dim),
        "time_embeddings.in_layer.bias": _t(512),
        "visual_transformer_blocks.0.feed_forward.in_layer.weight": _t(ff_dim, model_dim),
    }
    _blocks(sd, "text_transformer_blocks.", 2)
    _blocks(sd, "visual_transformer_blocks.", blocks)
    return sd, None


def _minimax_h3() -> Tuple[StateDict, None]:
    sd = {
        "video_patch_proj.weight": _t(5376, 96), "audio_patch_proj.weight": _t(5376, 32),
        "final_layer.video_out.weight": _t(96, 5376), "final_layer.audio_out.weight": _t(32, 5376),
        "blocks.0.attn.q_norm.weight": _t(128), "blocks.0.attn.qkv_proj.weight": _t(3 * 56 * 128, 5376),
        "blocks.0.mlp.fc1.weight": _t(2 * 14336, 5376), "condition_proj.weight": _t(5376, 5120),
        "time_embedder.proj_in.weight": _t(5376, 256), "time_embedder.proj_out.weight": _t(2688, 5376),
        "rope.inv_freq": _t(48),
    }
    _blocks(sd, "blocks.", 50)
    _blocks(sd, "token_refiner.blocks.", 2)
    return sd, None


def _krea2() -> Tuple[StateDict, None]:
    sd = {"txtfusion.projector.weight": _t(1, 12), "first.weight": _t(6144, 64),
          "blocks.0.attn.wq.weight": _t(6144, 6144), "blocks.0.attn.wk.weight": _t(1536, 6144),
          "txtfusion.layerwise_blocks.0.prenorm.scale": _t(2560)}
    _blocks(sd, "blocks.", 28)
    return sd, None


# ---- families both versions know ------------------------------------------------------------------------------------


def _wan22_5b() -> Tuple[StateDict, None]:
    sd = {"head.modulation": _t(1, 2, 3072), "head.head.weight": _t(48 * 4, 3072),
          "blocks.0.ffn.0.weight": _t(14336, 3072), "patch_embedding.weight": _t(3072, 48, 1, 2, 2)}
    _blocks(sd, "blocks.", 30)
    return sd, None


def _double_single_stream(sd: StateDict, double: int, single: int) -> Tuple[StateDict, None]:
    """What Flux and HunyuanVideo share: the vector and guidance embedders, ``double`` double-stream blocks and
    ``single`` single-stream blocks (width 3072)."""
    sd.update({"vector_in.in_layer.weight": _t(3072, 768), "guidance_in.in_layer.weight": _t(3072, 256)})
    _blocks(sd, "double_blocks.", double)
    _blocks(sd, "single_blocks.", single)
    return sd, None


def _flux1() -> Tuple[StateDict, None]:
    sd = {"double_blocks.0.img_attn.norm.key_norm.scale": _t(128), "img_in.weight": _t(3072, 64),
          "txt_in.weight": _t(3072, 4096)}
    return _double_single_stream(sd, 19, 38)


def _hunyuan1() -> Tuple[StateDict, None]:
    sd = {"txt_in.individual_token_refiner.blocks.0.norm1.weight": _t(3072),
          "img_in.proj.weight": _t(3072, 16, 1, 2, 2), "final_layer.linear.weight": _t(64, 3072),
          "txt_in.input_embedder.weight": _t(3072, 4096)}
    return _double_single_stream(sd, 20, 40)


def _ltxv_2b() -> Tuple[StateDict, None]:
    sd = {"adaln_single.emb.timestep_embedder.linear_1.bias": _t(2048)}
    for i in range(28):
        sd[f"transformer_blocks.{i}.attn2.to_k.weight"] = _t(2048, 4096)
    return sd, None


# (checkpoint, expected ComfyUI class, family, check of the table against ComfyUI's unet_config)
_Check = Callable[[dict], Tuple[int, int, int]]  # unet_config -> (heads, head_dim, blocks) as ComfyUI derives them
_NEW = [
    ("ltx-2", lambda: _ltx2(), "LTXAV", "ltx-2", lambda c: (32, c["attention_head_dim"], c["num_layers"])),
    ("ltx-2.3", lambda: _ltx2(True), "LTXAV", "ltx-2.3", lambda c: (32, c["attention_head_dim"], c["num_layers"])),
    ("hunyuanvideo-1.5", _hunyuan15, "HunyuanVideo15", "hunyuanvideo-1.5",
     lambda c: (c["num_heads"], c["hidden_size"] // c["num_heads"], c["depth"] + c["depth_single_blocks"])),
    ("flux2-dev", _flux2, "Flux2", "flux2-dev",
     lambda c: (c["num_heads"], sum(c["axes_dim"]), c["depth"] + c["depth_single_blocks"])),
    ("z-image", _z_image, "Lumina2", "z-image", lambda c: (c["n_heads"], c["dim"] // c["n_heads"], c["n_layers"])),
    ("qwen-image-edit-2511", lambda: _qwen_image(True), "QwenImage", "qwen-image-edit",
     lambda c: (24, 128, c["num_layers"])),
    ("kandinsky5-lite", lambda: _kandinsky5(1792, 7168, 32), "Kandinsky5", "kandinsky5-lite",
     lambda c: (c["model_dim"] // sum(c["axes_dims"]), sum(c["axes_dims"]), c["num_visual_blocks"])),
    ("kandinsky5-pro", lambda: _kandinsky5(4096, 16384, 60), "Kandinsky5", "kandinsky5-pro",
     lambda c: (c["model_dim"] // sum(c["axes_dims"]), sum(c["axes_dims"]), c["num_visual_blocks"])),
    ("minimax-h3", _minimax_h3, "MiniMaxH3", "minimax-h3",
     lambda c: (c["num_attention_heads"], c["attention_head_dim"], c["num_layers"])),
    ("krea2", _krea2, "Krea2", "krea2", lambda c: (c["heads"], c["features"] // c["heads"], c["layers"])),
]
_OLD = [
    ("wan2.2-5b", _wan22_5b, "WAN22", "wan2.2-5b", lambda c: (c["num_heads"], c["dim"] // c["num_heads"],
                                                               c["num_layers"])),
    ("flux", _flux1, "Flux", "flux", lambda c: (c["num_heads"], sum(c["axes_dim"]),
                                                c["depth"] + c["depth_single_blocks"])),
    ("hunyuanvideo", _hunyuan1, "HunyuanVideo", "hunyuanvideo",
     lambda c: (c["num_heads"], c["hidden_size"] // c["num_heads"], c["depth"] + c["depth_single_blocks"])),
    ("qwen-image", lambda: _qwen_image(False), "QwenImage", "qwen-image", lambda c: (24, 128, c["num_layers"])),
    ("ltxv-2b", _ltxv_2b, "LTXV", "ltxv-2b", lambda c: (32, c["attention_head_dim"], c["num_layers"])),
]


def _detect(checkpoint) -> torch.nn.Module:
    """ComfyUI's detection and model construction for a state dict, the way ``load_diffusion_model`` does it."""
    import comfy.model_detection

    sd, metadata = checkpoint()
    config = comfy.model_detection.model_config_from_unet(sd, "", metadata=metadata)
    assert config is not None, "ComfyUI's model detection did not recognize the checkpoint"
    return config.get_model(sd, "", device=_META)


def _run(checkpoint, class_name, family, derived):
    model = _detect(checkpoint)
    unet_config = model.model_config.unet_config
    assert type(model).__name__ == class_name
    assert family_for_comfy_model(type(model).__name__, unet_config) == family
    stage = get_family(family).stages[0]
    assert derived(unet_config) == (stage.heads, stage.head_dim, get_family(family).layers)


# What a ComfyUI must have to know a 2026 checkpoint (feature detection, no version strings): the supported-models
# class, or for the Qwen-Image-Edit 2511 marker, the key its detection reads.
_FEATURE = {"ltx-2": "LTXAV", "ltx-2.3": "LTXAV", "hunyuanvideo-1.5": "HunyuanVideo15", "flux2-dev": "Flux2",
            "z-image": "ZImage", "kandinsky5-lite": "Kandinsky5", "kandinsky5-pro": "Kandinsky5",
            "minimax-h3": "MiniMaxH3", "krea2": "Krea2", "qwen-image-edit-2511": "__index_timestep_zero__"}


def _supports(name: str) -> bool:
    import inspect

    import comfy.model_detection
    import comfy.supported_models

    feature = _FEATURE[name]
    if feature.startswith("__"):
        return feature in inspect.getsource(comfy.model_detection)
    return hasattr(comfy.supported_models, feature)


@pytest.mark.usefixtures("comfy")
@pytest.mark.parametrize("name, checkpoint, class_name, family, derived", _NEW, ids=[c[0] for c in _NEW])
def test_2026_family_detected_from_comfy_model(name, checkpoint, class_name, family, derived):
    if not _supports(name):
        pytest.skip(f"this ComfyUI does not know {name} ({_FEATURE[name]}, added after 0.3.64)")
    _run(checkpoint, class_name, family, derived)


@pytest.mark.usefixtures("comfy")
@pytest.mark.parametrize("name, checkpoint, class_name, family, derived", _OLD, ids=[c[0] for c in _OLD])
def test_older_family_still_detected(name, checkpoint, class_name, family, derived):
    _run(checkpoint, class_name, family, derived)


@pytest.mark.usefixtures("comfy")
def test_krea2_gqa_heads_from_comfy():
    if not _supports("krea2"):
        pytest.skip("this ComfyUI has no Krea2")
    config = _detect(_krea2).model_config.unet_config
    assert (config["heads"], config["kvheads"]) == (get_family("krea2").stages[0].heads,
                                                   get_family("krea2").stages[0].kv_heads)
