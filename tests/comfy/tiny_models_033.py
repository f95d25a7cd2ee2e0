"""Models for the ComfyUI 0.33 call-form tests, each built through ComfyUI's own model detection.

- :func:`qwen3_06b_clip`: the Qwen3 0.6B text encoder (16 query heads, 8 key/value heads: ComfyUI 0.33's Llama
  attention passes ``enable_gqa=True``), full size with random weights, loaded by
  ``comfy.sd.load_text_encoder_state_dicts`` like ``CLIPLoader`` (detection: ``TEModel.QWEN3_06B``; 0.6 B
  parameters in bf16, about 1.2 GB). Its config is fixed by detection, so it cannot be made narrower.
- :func:`tiny_krea2_state_dict`: a Krea 2 (``SingleStreamDiT``) state dict whose shapes ComfyUI's detection reads
  as 2 query heads and 1 key/value head of 128 (``kvheads`` from ``wk``), one block, a 2-layer text fusion of width
  80. Loaded with ``comfy.sd.load_diffusion_model_state_dict``.
- :func:`wan22_5b_meta`: Wan 2.2 TI2V 5B (dim 3072, 30 layers, 48-channel latent) detected from a state dict on
  the meta device, as a ``ModelPatcher`` around ComfyUI's ``WAN22`` model with bf16 inference: everything that
  ``memory_required`` reads is real, no weight is allocated.
"""

from __future__ import annotations

from typing import Dict

import torch

__all__ = [
    "has_comfy_033_attention",
    "krea2_conditioning",
    "qwen3_06b_clip",
    "ernie_conditioning",
    "tiny_ernie_image",
    "tiny_krea2_state_dict",
    "wan22_5b_meta",
]


def has_comfy_033_attention() -> bool:
    """Whether this ComfyUI's attention functions read ``scale=``/``enable_gqa=`` (0.33+): feature, not version."""
    import comfy.ops

    return hasattr(comfy.ops, "repeat_kv_for_gqa")


def _random(shapes: Dict[str, torch.Size], seed: int, dtype: torch.dtype) -> Dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in shapes.items():
        if key.endswith(("norm.weight", "norm.scale", ".scale", "_norm.weight")):
            out[key] = torch.ones(shape, dtype=dtype)
        elif len(shape) >= 2:
            out[key] = (torch.randn(shape, generator=g) / shape[-1] ** 0.5).to(dtype)
        else:
            out[key] = (torch.randn(shape, generator=g) * 0.02).to(dtype)
    return out


def qwen3_06b_clip(seed: int = 0):
    """Qwen3 0.6B through ``load_text_encoder_state_dicts`` (ComfyUI 0.33's detection picks the Anima encoder)."""
    import comfy.ops
    import comfy.sd
    import comfy.text_encoders.llama as llama

    with torch.device("meta"):
        shape_model = llama.Qwen3_06B({}, dtype=torch.bfloat16, device="meta",
                                      operations=comfy.ops.disable_weight_init)
    shapes = {k: t.shape for k, t in shape_model.state_dict().items()}
    del shape_model
    return comfy.sd.load_text_encoder_state_dicts([_random(shapes, seed, torch.bfloat16)])


def tiny_krea2_state_dict(seed: int = 0, dtype: torch.dtype = torch.float32) -> Dict[str, torch.Tensor]:
    """Krea 2: features 256 (2 heads of 128), 1 key/value head, 1 block; text fusion 2 layers x width 80."""
    import comfy.ops
    from comfy.ldm.krea2.model import SingleStreamDiT

    with torch.device("meta"):
        model = SingleStreamDiT(features=256, txtdim=80, heads=2, kvheads=1, layers=1, txtlayers=2, channels=16,
                                device="meta", operations=comfy.ops.disable_weight_init)
    return _random({k: t.shape for k, t in model.state_dict().items()}, seed, dtype)


def krea2_conditioning(tokens: int = 12, seed: int = 3):
    """(positive, negative) for :func:`tiny_krea2_state_dict`: ``(1, tokens, txtlayers · txtdim)``."""
    g = torch.Generator().manual_seed(seed)

    def one():
        return [[torch.randn(1, tokens, 2 * 80, generator=g), {}]]

    return one(), one()


def wan22_5b_meta():
    """Wan 2.2 TI2V 5B detected by ``comfy.model_detection`` from a meta state dict: a ``ModelPatcher`` (CPU)."""
    import comfy.model_detection
    import comfy.model_patcher
    import comfy.ops
    from comfy.ldm.wan.model import WanModel

    with torch.device("meta"):
        shape_model = WanModel(model_type="t2v", patch_size=(1, 2, 2), text_len=512, in_dim=48, dim=3072,
                               ffn_dim=14336, freq_dim=256, text_dim=4096, out_dim=48, num_heads=24, num_layers=30,
                               operations=comfy.ops.disable_weight_init)
        sd = shape_model.state_dict()
    config = comfy.model_detection.model_config_from_unet(sd, "")
    if config is None:
        raise RuntimeError("ComfyUI's detection did not recognise the Wan 2.2 5B state dict")
    config.set_inference_dtype(torch.bfloat16, None)
    model = config.get_model(sd, "", device=torch.device("meta"))
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


def tiny_ernie_image(seed: int = 0):
    """An ERNIE-Image (``ErnieImageModel``) ModelPatcher through 0.33's own ``supported_models.ErnieImage`` config
    and ``model_base``: detection fixes the width at 4096 (36 layers), so the tiny sizes are passed as the config
    (hidden 128 = 2 heads of 64, 2 layers, 128 latent channels as Flux 2's, text width 64) and random weights are
    loaded. Its attention calls the module-level ``optimized_attention`` without ``transformer_options``."""
    import comfy.model_patcher
    import comfy.supported_models
    from comfy_runtime import _random_state_dict

    config = comfy.supported_models.ErnieImage({
        "image_model": "ernie", "hidden_size": 128, "num_attention_heads": 2, "num_layers": 2, "ffn_hidden_size": 256,
        "in_channels": 128, "out_channels": 128, "text_in_dim": 64, "rope_axes_dim": (16, 24, 24)})
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({})
    model.diffusion_model.load_state_dict(_random_state_dict(model.diffusion_model, seed, torch.float32))
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


def ernie_conditioning(tokens: int = 10, seed: int = 4):
    """(positive, negative) for :func:`tiny_ernie_image`: ``(1, tokens, 64)``."""
    g = torch.Generator().manual_seed(seed)
    return ([[torch.randn(1, tokens, 64, generator=g) * 0.5, {}]],
            [[torch.randn(1, tokens, 64, generator=g) * 0.5, {}]])
