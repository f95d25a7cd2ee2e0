"""The CLIP and VAE Patchers reach ComfyUI 0.33's new text encoders and VAEs (tiny random models, real classes).

- Text encoders: ComfyUI 0.33's ``Llama2_`` decoder under the configs of the 2026 encoders (Qwen3 4B of Z-Image and
  Flux 2 Klein, Gemma 3 12B of LTX-2, Mistral Small 3 24B of Flux 2 dev, Qwen2.5-VL 7B of Qwen-Image / HunyuanVideo
  1.5 / Kandinsky 5, Qwen3-VL 32B of MiniMax H3), narrowed to 4 query heads, 2 key/value heads of 16 and 2 layers;
  every other config field (q/k norms, RoPE form, sliding windows, activations) is ComfyUI's. These call attention
  with ``enable_gqa=True`` (k/v with fewer heads) and Gemma 3 with ``scale=``: they pass once the override handles
  both keywords (issue 16, point 1).
- VAEs: the HunyuanVideo 1.5 VAE (``vae_refiner``, conv3d ``AttnBlock``) through ``comfy.sd.VAE``'s own detection,
  and SeedVR2's VAE attention block, which keeps its function as ``optimized_vae_attention``.

Every comparison: the patched output against float64 exact attention, within 4x ComfyUI's own error against it plus
4 ulps (``tests/comfy/encoder_checks.py``); the patched calls counted as noflash's; the original model untouched.
Runs only on a ComfyUI that has these classes (0.33 and later).
"""

from __future__ import annotations

import dataclasses

import pytest
import tiny_encoders as te
import torch
from encoder_checks import CountComfyAttention, assert_exact, exact_clip

_TOKENS = 800  # 4 heads x 800^2 fp32 scores are 10 MiB: past noflash's fast path, so the tiles run

# (ComfyUI 0.33 config class in comfy.text_encoders.llama, what the config is)
_ENCODERS = [
    ("Qwen3_4BConfig", "Qwen3 4B (Z-Image, Flux 2 Klein): q/k RMS norms"),
    ("Gemma3_12B_Config", "Gemma 3 12B (LTX-2): sliding windows, scale= from query_pre_attn_scalar"),
    ("Mistral3Small24BConfig", "Mistral Small 3 24B (Flux 2 dev)"),
    ("Qwen25_7BVLI_Config", "Qwen2.5-VL 7B (Qwen-Image, HunyuanVideo 1.5, Kandinsky 5): qkv bias"),
    ("Qwen3VL_32BConfig", "Qwen3-VL 32B (MiniMax H3): interleaved M-RoPE"),
]


def _require(module: str, name: str = ""):
    """``module.name`` (or the module itself), skipping where this ComfyUI does not have it (feature detection)."""
    import importlib
    import importlib.util

    try:
        spec = importlib.util.find_spec(module)
    except ModuleNotFoundError:  # a parent package is missing
        spec = None
    if spec is None:
        pytest.skip(f"this ComfyUI has no {module} (added after 0.3.64)")
    found = importlib.import_module(module)
    if name:
        found = getattr(found, name, None)
        if found is None:
            pytest.skip(f"this ComfyUI has no {module}.{name} (added after 0.3.64)")
    return found


@pytest.fixture
def rt(comfy):
    """The ComfyUI runtime fixture under a name that ``import comfy.x`` inside a test does not shadow."""
    return comfy


def _node(rt, name, *args):
    return rt.node(name).execute(*args).result[0]


def _tiny_encoder_clip(config_cls, seed: int = 0):
    """A ``comfy.sd.CLIP`` around ComfyUI's ``Llama2_`` built from ``config_cls`` narrowed to 2 layers of 4 query
    and 2 key/value heads of 16 channels (vocab 512); everything else is the config's own."""
    import comfy.sd1_clip
    import comfy.text_encoders.llama as llama

    narrow = {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2}
    fields = {f.name for f in dataclasses.fields(config_cls)}
    kept = {k: v for k, v in narrow.items() if k in fields}

    class _Tiny(llama.BaseLlama, torch.nn.Module):
        def __init__(self, config_dict, dtype, device, operations):
            super().__init__()
            config = config_cls(**config_dict)
            config.head_dim = 16  # a class attribute in ComfyUI's configs: set on this instance only
            if getattr(config, "rope_dims", None):  # M-RoPE sections sum to head_dim / 2
                config.rope_dims = [4, 2, 2]
            self.num_layers = config.num_hidden_layers
            self.model = llama.Llama2_(config, device=device, dtype=dtype, ops=operations)
            self.dtype = dtype

    model = comfy.sd1_clip.SDClipModel(
        device="cpu", textmodel_json_config=kept, dtype=torch.float32, special_tokens={"pad": 0},
        layer_norm_hidden_state=False, model_class=_Tiny, enable_attention_masks=True, return_attention_masks=True,
        model_options={"model_name": "tiny_" + config_cls.__name__})
    te.randomize_(model, seed)
    return te.make_clip(model)


@pytest.mark.parametrize("config_name, what", _ENCODERS, ids=[e[0] for e in _ENCODERS])
def test_2026_text_encoder_through_clip_patcher(rt, config_name, what, monkeypatch):
    config_cls = _require("comfy.text_encoders.llama", config_name)
    clip = _tiny_encoder_clip(config_cls)
    tokens = te.token_batch([_TOKENS, 531], _TOKENS, pad=0)  # padding mask on the second row, causal on both
    counter = CountComfyAttention(monkeypatch)
    original = clip.encode_from_tokens(tokens)
    comfy_calls = counter.calls
    assert comfy_calls == 2  # one per layer, through ComfyUI's optimized_attention_for_device

    patched_clip = _node(rt, "NoFlashCLIPPatcher", clip, True, 0, 0)
    patched = patched_clip.encode_from_tokens(tokens)
    assert counter.calls == comfy_calls  # the patched encode never called ComfyUI's attention
    stats = patched_clip.patcher.object_patches["encode_token_weights"].stats
    assert stats.calls == {"noflash": 2} and stats.tiers and set(stats.tiers) <= {1, 2, 3}, stats
    truth = exact_clip(rt, clip).encode_from_tokens(tokens)
    assert_exact(patched, original, truth)
    # The original CLIP is untouched: no routed forward left behind, and it encodes as before.
    assert all("forward" not in m.__dict__ for m in clip.cond_stage_model.modules())
    assert torch.equal(clip.encode_from_tokens(tokens), original)


def _tiny_gemma4_clip(gemma4, seed: int = 0):
    """ComfyUI 0.33's ``Gemma4Transformer`` (the Gemma 4 text model; its attention calls
    ``optimized_attention_for_device(...)(...)`` inline) at width 64: 2 layers of 4 query and 2 key/value heads of
    16, one sliding-window layer (window 256) and one global layer, no shared-KV layers."""
    import comfy.sd1_clip
    import comfy.text_encoders.llama as llama

    class _Tiny(llama.BaseLlama, torch.nn.Module):
        def __init__(self, config_dict, dtype, device, operations):
            super().__init__()
            config = gemma4.Gemma4Config(**config_dict)
            config.head_dim = config.global_head_dim = 16  # class attributes: set on this instance only
            config.sliding_attention = [256, False]
            self.num_layers = config.num_hidden_layers
            self.model = gemma4.Gemma4Transformer(config, device=device, dtype=dtype, ops=operations)
            self.dtype = dtype

    config = {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_size_per_layer_input": 0,
              "num_kv_shared_layers": 0}
    model = comfy.sd1_clip.SDClipModel(
        device="cpu", textmodel_json_config=config, dtype=torch.float32, special_tokens={"pad": 0},
        layer_norm_hidden_state=False, model_class=_Tiny, enable_attention_masks=True, return_attention_masks=True,
        model_options={"model_name": "tiny_gemma4"})
    te.randomize_(model, seed)
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("layer_scalar"):  # a buffer ComfyUI leaves to the checkpoint
                buf.fill_(1.0)
    return te.make_clip(model)


def test_gemma4_inline_attention_through_clip_patcher(rt, monkeypatch):
    """Gemma 4 picks its attention function inline (``optimized_attention_for_device(...)(q, k, v, ...)``): the
    CLIP Patcher's router swaps that module-level name during the clone's encode only."""
    gemma4 = _require("comfy.text_encoders.gemma4")
    clip = _tiny_gemma4_clip(gemma4)
    tokens = te.token_batch([_TOKENS, 531], _TOKENS, pad=0)
    counter = CountComfyAttention(monkeypatch)
    original = clip.encode_from_tokens(tokens)
    comfy_calls = counter.calls
    assert comfy_calls >= 2 and original.abs().max() > 1e-2

    patched_clip = _node(rt, "NoFlashCLIPPatcher", clip, True, 0, 0)
    picker = gemma4.optimized_attention_for_device
    patched = patched_clip.encode_from_tokens(tokens)
    assert counter.calls == comfy_calls  # no call went to ComfyUI's attention
    stats = patched_clip.patcher.object_patches["encode_token_weights"].stats
    assert stats.calls == {"noflash": comfy_calls} and stats.tiers, stats
    truth = exact_clip(rt, clip).encode_from_tokens(tokens)
    assert_exact(patched, original, truth)
    assert gemma4.optimized_attention_for_device is picker  # the module's global is ComfyUI's again
    assert torch.equal(clip.encode_from_tokens(tokens), original)


def test_gpt_oss_attention_module_is_found_for_the_swap(rt):
    """GPT-OSS picks its function inside a module-level helper (``_attention_with_sinks``): the swap finds its
    module from an attention block of the encoder. (Its encode runs the same swap as Gemma 4's above.)"""
    gpt_oss = _require("comfy.text_encoders.gpt_oss")
    import comfy.ops

    swap = rt.module("noflash_core.comfy.module_swap")
    with torch.device("meta"):
        block = gpt_oss.GptOssAttention(gpt_oss.GptOss20BConfig(), 0, ops=comfy.ops.disable_weight_init)
    assert swap.global_users(block, "optimized_attention_for_device") == [gpt_oss]
    assert swap.global_users(block, "optimized_attention") == []


# ---- VAEs --------------------------------------------------------------------------------------------------------


def _exact_vae(rt, vae):
    vae_mod = rt.module("noflash_core.comfy.vae")
    override = rt.module("noflash_core.comfy.override")
    ref = rt.module("nodes.encoder_nodes").clone_vae(vae)
    for key in vae_mod.vae_attention_keys(ref.first_stage_model):
        ref.patcher.add_object_patch(key, vae_mod.VAEAttention(
            ref.patcher.get_model_object(key), override.OverrideConfig(min_tokens=0),
            attention=te.float64_attention))
    return ref


def test_hunyuanvideo15_vae_through_vae_patcher(rt):
    _require("comfy.latent_formats", "HunyuanVideo15")  # the 1.5 VAE is detected where ComfyUI knows HunyuanVideo 1.5
    refiner = _require("comfy.ldm.hunyuan_video.vae_refiner")
    import comfy.sd
    from comfy.ldm.models.autoencoder import AutoencodingEngine

    # comfy/sd.py's HunyuanVideo 1.5 VAE config (block_out_channels to 1024, /16, /4, 32 latent channels).
    ddconfig = {"block_out_channels": [128, 256, 512, 1024, 1024], "in_channels": 3, "out_channels": 3,
                "num_res_blocks": 2, "ffactor_spatial": 16, "ffactor_temporal": 4, "downsample_match_channel": True,
                "upsample_match_channel": True, "z_channels": 32}
    with torch.device("meta"):
        shape_model = AutoencodingEngine(
            regularizer_config={"target": "comfy.ldm.models.autoencoder.EmptyRegularizer"},
            encoder_config={"target": refiner.__name__ + ".Encoder", "params": ddconfig},
            decoder_config={"target": refiner.__name__ + ".Decoder", "params": ddconfig})
    vae = comfy.sd.VAE(sd=te.random_state_dict(shape_model, seed=7))  # ComfyUI's own detection
    assert vae.latent_channels == 32
    latent = torch.randn(1, 32, 2, 3, 3, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        original = vae.decode(latent)
        patched_vae = _node(rt, "NoFlashVAEPatcher", vae, True, 0, 0)
        patched = patched_vae.decode(latent)
        truth = _exact_vae(rt, vae).decode(latent)
    stats = patched_vae.noflash_stats
    # The mid-block attends over every latent frame at once: 2 x 3 x 3 = 18 tokens (1024 channels, one head).
    assert stats.calls.get("noflash", 0) >= 1 and stats.max_q_len == 18, stats
    assert "comfy" not in stats.calls
    assert_exact(patched, original, truth)
    assert vae.patcher.object_patches == {}


def _run_patched(patcher, patches, call):
    """``call()`` under ``torch.no_grad`` with the object ``patches`` (``{key: value}``) on a clone of ``patcher``, as
    ComfyUI applies them; the clone is unpatched afterwards, also when ``call`` raises."""
    clone = patcher.clone()
    for key, fn in patches.items():
        clone.add_object_patch(key, fn)
    clone.patch_model()
    try:
        with torch.no_grad():
            return call()
    finally:
        clone.unpatch_model()


def test_seedvr2_vae_attention_block_reached_by_its_attribute(rt):
    seedvr_vae = _require("comfy.ldm.seedvr.vae")
    import comfy.model_patcher

    vae_mod = rt.module("noflash_core.comfy.vae")
    override = rt.module("noflash_core.comfy.override")

    class _Holder(torch.nn.Module):  # the mid-block's attention as SeedVR2's decoder builds it (single head)
        def __init__(self):
            super().__init__()
            self.attn = seedvr_vae.Attention(64, heads=1, dim_head=64, norm_num_groups=8, residual_connection=True)

    holder = te.randomize_(_Holder(), seed=9).eval()
    keys = vae_mod.vae_attention_keys(holder)
    assert keys == ["attn.optimized_vae_attention"]
    x = torch.randn(1, 64, 24, 24, generator=torch.Generator().manual_seed(10))  # 576 tokens
    patcher = comfy.model_patcher.ModelPatcher(holder, torch.device("cpu"), torch.device("cpu"))

    def run(patches):
        return _run_patched(patcher, patches, lambda: holder.attn(x))

    original = run({})
    noflash = vae_mod.VAEAttention(holder.attn.optimized_vae_attention, override.OverrideConfig(min_tokens=0))
    patched = run({keys[0]: noflash})
    truth = run({keys[0]: vae_mod.VAEAttention(holder.attn.optimized_vae_attention, override.OverrideConfig(
        min_tokens=0), attention=te.float64_attention)})
    assert noflash.stats.calls == {"noflash": 1} and noflash.stats.max_q_len == 576
    assert_exact(patched, original, truth)
    assert "optimized_vae_attention" in holder.attn.__dict__ and not isinstance(
        holder.attn.optimized_vae_attention, vae_mod.VAEAttention)  # restored after the clone unpatched


def test_minimax_h3_vae_module_level_attention_reached_through_decode(rt):
    """The MiniMax H3 VAE's transformer blocks call the module-level ``optimized_attention`` (no
    ``transformer_options``): the VAE Patcher's object patch on ``decode`` swaps that global for the call only."""
    minimax_vae = _require("comfy.ldm.minimax.vae")
    import comfy.model_patcher

    vae_mod = rt.module("noflash_core.comfy.vae")
    swap = rt.module("noflash_core.comfy.module_swap")
    override = rt.module("noflash_core.comfy.override")

    class _Holder(torch.nn.Module):  # a VAE model whose decode runs one of MiniMax H3's attention blocks
        def __init__(self):
            super().__init__()
            self.attn = minimax_vae.Attention(heads=2, dim_head=32)

        def decode(self, x):
            return self.attn(x)

    holder = te.randomize_(_Holder(), seed=11).eval()
    assert swap.global_users(holder, "optimized_attention") == [minimax_vae]
    comfy_function = minimax_vae.optimized_attention
    x = torch.randn(1, 900, 64, generator=torch.Generator().manual_seed(12))  # 2 heads x 900^2 scores
    patcher = comfy.model_patcher.ModelPatcher(holder, torch.device("cpu"), torch.device("cpu"))

    def run(router=None):
        return _run_patched(patcher, {} if router is None else {"decode": router}, lambda: holder.decode(x))

    original = run()
    noflash = vae_mod.VAEGlobalRouter(holder.decode, holder, override.OverrideConfig(min_tokens=0))
    patched = run(noflash)
    truth = run(vae_mod.VAEGlobalRouter(holder.decode, holder, override.OverrideConfig(min_tokens=0),
                                        route=te.float64_route))
    assert noflash.stats.calls == {"noflash": 1} and noflash.stats.max_q_len == 900, noflash.stats
    assert_exact(patched, original, truth)
    assert minimax_vae.optimized_attention is comfy_function  # the module's global is ComfyUI's again
    assert "decode" not in holder.__dict__ or not isinstance(holder.__dict__["decode"], vae_mod.VAEGlobalRouter)
