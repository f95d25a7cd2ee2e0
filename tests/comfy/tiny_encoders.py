"""Tiny random-weight text encoders and VAEs built with ComfyUI's own classes, for the CLIP and VAE Patcher tests.

- CLIP-L: the real SD1 CLIP-L state dict shape (``comfy_runtime.tiny_clip_l_state_dict``), loaded by
  ``comfy.sd.load_text_encoder_state_dicts`` like ``CLIPLoader`` does.
- T5 and the Llama family: ``comfy.sd1_clip.SDClipModel`` around ``comfy.text_encoders.t5.T5`` /
  ``comfy.text_encoders.llama.Llama2`` with a narrow config, inside a ``comfy.sd.CLIP`` whose ``ModelPatcher`` is
  ComfyUI's. Tokens are given as ids (no tokenizer files are needed).
- VAEs: an SD-style ``AutoencoderKL`` (narrow or full size) and the Wan 2.1 VAE, both through ``comfy.sd.VAE``.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import torch

__all__ = [
    "float64_attention",
    "float64_route",
    "make_clip",
    "randomize_",
    "sd_vae",
    "tiny_llama_clip",
    "tiny_qwen_vision",
    "tiny_t5_clip",
    "wan_vae",
]

_NORM_SUFFIXES = ("norm.weight", "norm1.weight", "norm2.weight", "layer_norm.weight", "norm_out.weight",
                  "final_layer_norm.weight", "gamma", "ln_q.weight")


def randomize_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Fill every parameter: norm scales 1, biases small, the rest ``randn / sqrt(fan_in)`` (deterministic)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() == 0:
                continue
            if name.endswith(_NORM_SUFFIXES) or (p.dim() == 1 and "norm" in name):
                p.fill_(1.0)
            elif p.dim() == 1:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
            else:
                fan_in = max(1, p[0].numel())
                p.copy_(torch.randn(p.shape, generator=g) / fan_in**0.5)
    return module


def random_state_dict(module: torch.nn.Module, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A state dict with ``module``'s keys and shapes and :func:`randomize_`'s values (module may be on meta)."""
    sd = {k: torch.empty(t.shape, dtype=dtype) for k, t in module.state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, t in sd.items():
            if t.dim() == 0:
                t.fill_(1.0)
            elif key.endswith(_NORM_SUFFIXES) or (t.dim() == 1 and "norm" in key):
                t.fill_(1.0)
            elif t.dim() <= 1:
                t.copy_(torch.randn(t.shape, generator=g) * 0.02)
            else:
                t.copy_(torch.randn(t.shape, generator=g) / max(1, t[0].numel()) ** 0.5)
    return sd


def make_clip(cond_stage_model: torch.nn.Module):
    """A ``comfy.sd.CLIP`` around ``cond_stage_model`` with ComfyUI's own ``ModelPatcher`` (no tokenizer)."""
    import comfy.hooks
    import comfy.model_management
    import comfy.model_patcher
    import comfy.sd

    clip = comfy.sd.CLIP(no_init=True)
    clip.cond_stage_model = cond_stage_model
    device = comfy.model_management.text_encoder_device()
    clip.patcher = comfy.model_patcher.ModelPatcher(cond_stage_model, load_device=device,
                                                    offload_device=comfy.model_management.text_encoder_offload_device())
    clip.patcher.hook_mode = comfy.hooks.EnumHookMode.MinVram
    clip.patcher.is_clip = True
    clip.tokenizer = None
    clip.layer_idx = None
    clip.tokenizer_options = {}
    clip.use_clip_schedule = False
    clip.apply_hooks_to_conds = None
    return clip


def tiny_t5_clip(seed: int = 0, layers: int = 2, attention_mask: bool = True):
    """T5 (ComfyUI's ``T5`` class, relative position bias) with d_model 64, 4 heads of 16, gated-GELU FFN 128."""
    import comfy.sd1_clip
    import comfy.text_encoders.t5

    config = {"d_ff": 128, "d_kv": 16, "d_model": 64, "num_heads": 4, "num_layers": layers, "vocab_size": 512,
              "dense_act_fn": "gelu_pytorch_tanh", "is_gated_act": True, "layer_norm_epsilon": 1e-6,
              "relative_attention_num_buckets": 32, "model_type": "t5"}
    model = comfy.sd1_clip.SDClipModel(
        device="cpu", textmodel_json_config=config, dtype=torch.float32, special_tokens={"end": 1, "pad": 0},
        model_class=comfy.text_encoders.t5.T5, enable_attention_masks=attention_mask,
        return_attention_masks=attention_mask, model_options={"model_name": "tiny_t5"})
    randomize_(model, seed)
    return make_clip(model)


def tiny_llama_clip(seed: int = 0, layers: int = 2, heads: int = 4, kv_heads: int = 2, head_dim: int = 16,
                    attention_mask: bool = True):
    """A Llama-family encoder (ComfyUI's ``Llama2`` class: RoPE, GQA, causal mask, padding mask) of width
    ``heads * head_dim``."""
    import comfy.sd1_clip
    import comfy.text_encoders.llama

    hidden = heads * head_dim

    llama = comfy.text_encoders.llama

    class _Llama(llama.BaseLlama, torch.nn.Module):
        def __init__(self, config_dict, dtype, device, operations):
            super().__init__()
            config = llama.Llama2Config(**config_dict)
            config.head_dim = head_dim  # a class attribute in ComfyUI's config: set on this instance only
            self.num_layers = config.num_hidden_layers
            self.model = llama.Llama2_(config, device=device, dtype=dtype, ops=operations)
            self.dtype = dtype

    config = {"vocab_size": 512, "hidden_size": hidden, "intermediate_size": 2 * hidden, "num_hidden_layers": layers,
              "num_attention_heads": heads, "num_key_value_heads": kv_heads, "max_position_embeddings": 8192,
              "rms_norm_eps": 1e-5, "rope_theta": 10000.0}
    model = comfy.sd1_clip.SDClipModel(
        device="cpu", textmodel_json_config=config, dtype=torch.float32, special_tokens={"pad": 0},
        layer_norm_hidden_state=False, model_class=_Llama, enable_attention_masks=attention_mask,
        return_attention_masks=attention_mask, model_options={"model_name": "tiny_llama"})
    randomize_(model, seed)
    return make_clip(model)


def tiny_qwen_vision(seed: int = 0):
    """ComfyUI's Qwen2.5-VL vision tower (windowed and full attention blocks) at width 64, 4 heads, 8 blocks."""
    import comfy.ops
    from comfy.text_encoders.qwen_vl import Qwen2VLVisionTransformer

    model = Qwen2VLVisionTransformer(hidden_size=64, output_hidden_size=64, intermediate_size=128, num_heads=4,
                                     num_layers=8, device="cpu", dtype=torch.float32,
                                     ops=comfy.ops.manual_cast)
    return randomize_(model, seed).eval()


def sd_vae(ch: int = 128, seed: int = 0):
    """An SD-style ``AutoencoderKL`` VAE through ``comfy.sd.VAE``: ``ch=128`` is the real SD/SDXL VAE (ComfyUI's
    own detection); a narrower ``ch`` also has one ResNet block per level, for speed on CPU."""
    import comfy.sd
    from comfy.ldm.models.autoencoder import AutoencoderKL

    ddconfig = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": ch,
                "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2 if ch == 128 else 1, "attn_resolutions": [],
                "dropout": 0.0}
    with torch.device("meta"):
        shape_model = AutoencoderKL(ddconfig=ddconfig, embed_dim=4)
    sd = random_state_dict(shape_model, seed)
    if ch == 128:
        return comfy.sd.VAE(sd=sd)  # ComfyUI's own detection (the SD VAE config)
    return comfy.sd.VAE(sd=sd, config={"params": {"ddconfig": ddconfig, "embed_dim": 4}})


def wan_vae(seed: int = 0):
    """The Wan 2.1 / Qwen-Image VAE (dim 96, its per-frame mid-block ``AttentionBlock``) through ``comfy.sd.VAE``."""
    import comfy.sd
    from comfy.ldm.wan.vae import WanVAE

    with torch.device("meta"):
        shape_model = WanVAE(dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                             temperal_downsample=[False, True, True], dropout=0.0)
    return comfy.sd.VAE(sd=random_state_dict(shape_model, seed))


def float64_route(func):
    """``route(func)`` for an exact-attention reference: ComfyUI's own attention function ``func`` run on float64
    copies of the operands (and a float mask), the output cast back to the query's dtype."""

    def exact(*args, **kwargs):
        def f64(t):
            return t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t

        out = func(*[f64(a) for a in args], **{k: f64(v) for k, v in kwargs.items()})
        return out.to(args[0].dtype)

    return exact


def float64_attention(q, k, v, attn_mask=None, **_ignored):
    """Math SDPA in float64, cast back: the exact-attention reference for whole-model tolerances."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    mask = attn_mask if attn_mask is None or attn_mask.dtype == torch.bool else attn_mask.double()
    with sdpa_kernel(SDPBackend.MATH):
        out = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask)
    return out.to(q.dtype)


def token_batch(lengths: List[int], total: int, seed: int = 0, pad: int = 0, vocab: int = 512,
                first: Optional[int] = None) -> List[List[Dict]]:
    """Token-weight pairs ``[[(id, 1.0), ...], ...]``: random ids then ``pad`` up to ``total`` per row."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for n in lengths:
        ids = torch.randint(2, vocab, (n,), generator=g).tolist()
        if first is not None:
            ids[0] = first
        rows.append([(int(i), 1.0) for i in ids] + [(pad, 1.0)] * (total - n))
    return rows
