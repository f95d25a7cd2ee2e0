"""ComfyUI 0.33's attention call forms through noflash's override, inside a real ComfyUI (CPU), on 0.3.64 and 0.33.

1. ComfyUI's own ``attention_basic`` and ``attention_pytorch`` are called with the override installed in
   ``transformer_options`` (so through ComfyUI's real ``wrap_attn``) and without it: same result within a tolerance
   derived from ComfyUI's own error against the same call in float64. Forms: both layouts, every mask rank and
   kind, cross-attention, ``skip_output_reshape``, and on ComfyUI versions whose attention reads them (feature
   detection: ``comfy.ops.repeat_kv_for_gqa``) ``scale=`` and ``enable_gqa=`` with k/v of fewer heads, and q/k/v in
   an ``AttentionTensorContainer``.
2. Models built through 0.33's own detection: Qwen3 0.6B (GQA) through the CLIP Patcher, Krea 2 through the
   Attention Patcher; same output patched and unpatched, calls counted as noflash's, originals untouched.
3. ComfyUI's memory planning: ``memory_required`` of a patched Wan 2.2 5B (detected from a meta state dict) at
   1280x704x121 against noflash's own estimate of that step, and ModelAttentionBackend after the NoFlash node.
"""

from __future__ import annotations

import copy
import logging

import pytest
import tiny_models_033 as tm
import torch

OVERRIDE = "optimized_attention_override"
BUDGET = 4 * 1024  # bytes: far below math SDPA's peak for these calls, so "auto" must run noflash's tiles


def _attention():
    import comfy.ldm.modules.attention as attention

    return attention


def _noflash_override(comfy, records, **config):
    override = comfy.module("noflash_core.comfy.override")
    config.setdefault("min_tokens", 0)
    config.setdefault("budget_bytes", BUDGET)
    return override.make_attention_override(override.OverrideConfig(**config), recorder=records.append)


def _f64(value):
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.double()
    return value


def _tolerance(ours_dtype_ref: torch.Tensor, truth: torch.Tensor) -> float:
    """4x ComfyUI's own max error against float64, plus 4 ulps of the output's scale (tests/support/reference)."""
    err = (ours_dtype_ref.double() - truth).abs().max().item()
    return 4.0 * err + 4.0 * torch.finfo(ours_dtype_ref.dtype).eps * max(truth.abs().max().item(), 1e-3)


def _call(fn, q, k, v, heads, override=None, **kwargs):
    if override is not None:
        kwargs["transformer_options"] = {OVERRIDE: override}
    return fn(q, k, v, heads, **kwargs)


def _compare(fn, q, k, v, heads, override, records, **kwargs):
    """The call patched vs unpatched vs float64; asserts noflash computed it with one of its tiers."""
    before = len(records)
    ours = _call(fn, q, k, v, heads, override, **kwargs)
    theirs = _call(fn, q, k, v, heads, **kwargs)
    truth = _call(fn, *(_f64(t) for t in (q, k, v)), heads, **{n: _f64(a) for n, a in kwargs.items()})
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype, (ours.shape, theirs.shape)
    err = (ours.double() - truth).abs().max().item()
    tol = _tolerance(theirs, truth)
    assert err <= tol, f"noflash error {err:.3e} > tolerance {tol:.3e}"
    (record,) = records[before:]
    assert record.path == "noflash" and record.tier in (1, 2, 3), record
    return record


def _qkv(layout, gqa, n_k, b=2, hq=4, n_q=40, d=16, seed=0):
    hk = 2 if gqa else hq
    g = torch.Generator().manual_seed(seed)
    if layout == "bnd":
        shapes = [(b, n_q, hq * d), (b, n_k, hk * d), (b, n_k, hk * d)]
    else:
        shapes = [(b, hq, n_q, d), (b, hk, n_k, d), (b, hk, n_k, d)]
    return [torch.randn(*s, generator=g) for s in shapes]


def _mask(name, b=2, hq=4, n_q=40, n_k=40):
    g = torch.Generator().manual_seed(9)
    pad = torch.ones(b, 1, n_k, dtype=torch.bool)
    pad[1, 0, n_k - 7:] = False
    keep = torch.rand(b, n_q, n_k, generator=g) > 0.3
    keep[..., 0] = True
    return {
        "none": None,
        "2d_float": torch.randn(n_q, n_k, generator=g),
        "3d_float_(b,Lq,Lk)": torch.randn(b, n_q, n_k, generator=g),
        "3d_bool_pad_(b,1,Lk)": pad,
        "3d_float_pad_(b,1,Lk)": torch.where(pad, 0.0, -torch.finfo(torch.float32).max),
        "4d_float_(b,1,1,Lk)": torch.where(pad, 0.0, float("-inf")).unsqueeze(1),
        "4d_float_(b,h,Lq,Lk)": torch.randn(b, hq, n_q, n_k, generator=g),
        "2d_bool_(Lq,Lk)": keep[0],
        "3d_bool_(b,Lq,Lk)": keep,
    }[name]


_MASKS = ["none", "2d_float", "3d_float_(b,Lq,Lk)", "3d_bool_pad_(b,1,Lk)", "3d_float_pad_(b,1,Lk)",
          "4d_float_(b,1,1,Lk)", "4d_float_(b,h,Lq,Lk)", "2d_bool_(Lq,Lk)", "3d_bool_(b,Lq,Lk)"]
_BASIC_BOOL = ("2d_bool_(Lq,Lk)", "3d_bool_(b,Lq,Lk)")  # attention_basic reads bool masks as key masks only


@pytest.mark.parametrize("function", ["attention_pytorch", "attention_basic"])
@pytest.mark.parametrize("layout", ["bnd", "bhnd"])
@pytest.mark.parametrize("gqa", [False, True])
@pytest.mark.parametrize("n_k", [40, 23])
@pytest.mark.parametrize("extras", ["plain", "scale+skip_output_reshape"])
@pytest.mark.parametrize("mask_name", _MASKS)
def test_comfy_attention_with_override_matches_without(comfy, function, layout, gqa, n_k, extras, mask_name):
    if (gqa or extras != "plain") and not tm.has_comfy_033_attention():
        pytest.skip("this ComfyUI's attention reads neither scale= nor enable_gqa= (before 0.33)")
    if function == "attention_basic" and mask_name in _BASIC_BOOL:
        pytest.skip("attention_basic cannot read a bool (Lq, Lk) mask itself")
    fn = getattr(_attention(), function)
    q, k, v = _qkv(layout, gqa, n_k)
    kwargs = {"mask": _mask(mask_name, n_k=n_k), "skip_reshape": layout == "bhnd"}
    if gqa:
        kwargs["enable_gqa"] = True
    if extras != "plain":
        kwargs.update(scale=0.3, skip_output_reshape=True)
    records = []
    record = _compare(fn, q, k, v, 4, _noflash_override(comfy, records), records, **kwargs)
    assert record.kv_len == n_k and record.heads == 4


def test_gqa_reaches_the_tiles_at_the_kv_head_count(comfy, monkeypatch):
    if not tm.has_comfy_033_attention():
        pytest.skip("enable_gqa= is a ComfyUI 0.33+ keyword")
    override_module = comfy.module("noflash_core.comfy.override")  # the dispatcher as the override bound it
    seen = []
    real = override_module.attention

    def spy(query, key, value, *args, **kwargs):
        seen.append((tuple(key.shape), kwargs.get("enable_gqa")))
        return real(query, key, value, *args, **kwargs)

    monkeypatch.setattr(override_module, "attention", spy)
    records = []
    override = _noflash_override(comfy, records)
    for layout in ("bnd", "bhnd"):
        q, k, v = _qkv(layout, True, 30)
        _compare(_attention().attention_pytorch, q, k, v, 4, override, records, skip_reshape=layout == "bhnd",
                 enable_gqa=True, mask=_mask("3d_bool_pad_(b,1,Lk)", n_k=30))
    assert seen == [((2, 2, 30, 16), True)] * 2  # k at its own 2 heads: ComfyUI's repeat_kv_for_gqa never ran


@pytest.mark.parametrize("gqa", [False, True])
def test_attention_tensor_containers_are_unwrapped_by_wrap_attn(comfy, gqa):
    attention = _attention()
    if not hasattr(attention, "AttentionTensorContainer"):
        pytest.skip("AttentionTensorContainer is ComfyUI 0.33+")
    records = []
    override = _noflash_override(comfy, records)
    assert not hasattr(override, "container_function")  # wrap_attn takes the tensors out for us
    q, k, v = _qkv("bhnd", gqa, 40)
    extra = {"enable_gqa": True} if gqa else {}

    def wrapped():
        return [attention.AttentionTensorContainer(t.clone()) for t in (q, k, v)]

    containers = wrapped()
    ours = attention.attention_pytorch(*containers, 4, skip_reshape=True, transformer_options={OVERRIDE: override},
                                       **extra)
    assert all(c.tensor is None for c in containers)  # consumed (single owner), as ComfyUI's backends do
    theirs = attention.attention_pytorch(*wrapped(), 4, skip_reshape=True, **extra)
    truth = attention.attention_pytorch(*(t.double() for t in (q, k, v)), 4, skip_reshape=True, **extra)
    assert (ours.double() - truth).abs().max().item() <= _tolerance(theirs, truth)
    assert [(r.path, r.tier in (1, 2, 3)) for r in records] == [("noflash", True)]


def test_forms_the_override_does_not_understand_run_comfys_own_code(comfy):
    if not tm.has_comfy_033_attention():
        pytest.skip("enable_gqa= is a ComfyUI 0.33+ keyword")
    records = []
    override = _noflash_override(comfy, records)
    q, k, v = _qkv("bhnd", True, 40)
    k3 = torch.cat([k, k[:, :1]], dim=1)  # 3 key heads, 2 value heads: not a GQA form ComfyUI computes
    errors = []
    for options in ({}, {"transformer_options": {OVERRIDE: override}}):
        with pytest.raises((ValueError, RuntimeError)) as info:
            _attention().attention_pytorch(q, k3, v, 4, skip_reshape=True, enable_gqa=True, **options)
        errors.append((info.type, str(info.value)))
    assert errors[0] == errors[1]  # the patched call raised ComfyUI's (torch's) own error, not one of ours
    assert [r.path for r in records] == []  # the override sent it on before recording (ComfyUI raised)


# ---- models built through ComfyUI 0.33's own detection --------------------------------------------------------


def _node(comfy, name, *args):
    return comfy.node(name).execute(*args).result[0]


def _sample(model, latent, positive, negative, steps=2, cfg=3.0):
    import comfy.sample

    noise = comfy.sample.prepare_noise(latent, 0)
    return comfy.sample.sample(model, noise, steps, cfg, "euler", "simple", positive, negative, latent, seed=0,
                               disable_pbar=True)


def _float64_sampler_override(func, *args, **kwargs):
    """The exact-attention reference: ComfyUI's own function on float64 copies, cast back to q's dtype."""
    out = func(*(_f64(a) for a in args), **{n: _f64(a) for n, a in kwargs.items()})
    return out.to(args[0].dtype)


@pytest.fixture(scope="module")
def qwen3(comfy):
    if not tm.has_comfy_033_attention():
        pytest.skip("the Qwen3 0.6B encoder and its enable_gqa calls are ComfyUI 0.33+")
    return tm.qwen3_06b_clip()


def test_qwen3_gqa_text_encoder_through_the_clip_patcher(comfy, qwen3, monkeypatch):
    calls = []
    attention = _attention()
    for name in ("attention_basic", "attention_pytorch"):
        real = getattr(attention, name)

        def counted(*args, _real=real, **kwargs):
            calls.append(kwargs.get("enable_gqa", False))
            return _real(*args, **kwargs)

        counted.__name__ = real.__name__
        monkeypatch.setattr(attention, name, counted)
    # About 300 tokens: with a 1 MiB budget the planner must tile (math SDPA would take several MiB per call).
    tokens = qwen3.tokenize(", ".join(["a lighthouse on a cliff at dusk", "oil painting", "dramatic clouds"] * 20))
    original = qwen3.encode_from_tokens(tokens, return_pooled=False)
    assert len(calls) == 28 and all(calls)  # 28 layers, each an enable_gqa=True call (16 q heads, 8 kv heads)

    patched = _node(comfy, "NoFlashCLIPPatcher", qwen3, True, 0, 1)
    assert qwen3.patcher.object_patches.keys() <= {"manual_cast_dtype"}  # the input CLIP gained no patch
    out = patched.encode_from_tokens(tokens, return_pooled=False)
    assert len(calls) == 28  # ComfyUI's attention did not run for the patched encode
    stats = patched.patcher.object_patches["encode_token_weights"].stats
    assert stats.calls == {"noflash": 28} and 0 not in stats.tiers and stats.max_q_len > 200, stats

    clip_mod, override = comfy.module("noflash_core.comfy.clip"), comfy.module("noflash_core.comfy.override")
    exact = qwen3.clone()
    exact.patcher.add_object_patch("encode_token_weights", clip_mod.EncodeRouter(
        exact.patcher.get_model_object("encode_token_weights"), exact.cond_stage_model,
        override.OverrideConfig(min_tokens=0), route=lambda func: lambda *a, **kw: _float64_sampler_override(
            func, *a, **kw)))
    truth = exact.encode_from_tokens(tokens, return_pooled=False)
    assert out.shape == original.shape and out.dtype == original.dtype
    err = (out.double() - truth.double()).abs().max().item()
    tol = _tolerance(original, truth.double())
    assert err <= tol, f"noflash error {err:.3e} > tolerance {tol:.3e}"
    before = len(calls)  # the float64 reference ran ComfyUI's own function too
    again = qwen3.encode_from_tokens(tokens, return_pooled=False)
    assert torch.equal(again, original) and len(calls) == before + 28  # the original is untouched


def _patched_run_is_exact(comfy, model, inputs, reference, truth):
    """Sample ``model`` through the Attention Patcher (min_tokens 0), assert the result is within the derived
    tolerance of the float64 ``truth`` (ComfyUI's own ``reference`` sets it); returns the run's telemetry."""
    patched = _node(comfy, "NoFlashAttentionPatcher", model, True, 0, 0)
    out = _sample(patched, *inputs)
    err = (out.double() - truth.double()).abs().max().item()
    tol = _tolerance(reference, truth.double())
    assert err <= tol, f"noflash error {err:.3e} > tolerance {tol:.3e}"
    return comfy.module("noflash_core.comfy.telemetry").default_history().latest()


@pytest.fixture(scope="module")
def krea2(comfy):
    if not tm.has_comfy_033_attention():
        pytest.skip("Krea 2 is a ComfyUI 0.33+ model")
    from comfy import sd

    return sd.load_diffusion_model_state_dict(tm.tiny_krea2_state_dict())


def test_krea2_through_the_attention_patcher(comfy, krea2):
    options_before = copy.deepcopy(krea2.model_options)
    positive, negative = tm.krea2_conditioning()
    latent = torch.zeros(1, 16, 16, 16)  # 8 x 8 = 64 image tokens + 12 text tokens per single-stream call
    reference = _sample(krea2, latent, positive, negative)
    exact = krea2.clone()
    exact.model_options.setdefault("transformer_options", {})[OVERRIDE] = _float64_sampler_override
    truth = _sample(exact, latent, positive, negative)

    run = _patched_run_is_exact(comfy, krea2, (latent, positive, negative), reference, truth)
    # 2 steps x (cond+uncond batched) x (4 text-fusion blocks + 1 single-stream block); text fusion runs per layer.
    assert run["label"] == "Krea2" and run["calls"] == 2 * 5 and "comfy" not in run["tiers"]
    assert run["replaced_by"] is None and run["max_q_len"] == 64 + 12
    assert krea2.model_options == options_before
    torch.testing.assert_close(_sample(krea2, latent, positive, negative), reference, atol=0, rtol=0)



def test_ernie_image_module_level_attention_through_the_attention_patcher(comfy):
    """ERNIE-Image calls the module-level ``optimized_attention`` without ``transformer_options``: the override
    never sees it, so the patcher's APPLY_MODEL wrapper swaps the module's name for the clone's call only."""
    if not tm.has_comfy_033_attention():
        pytest.skip("ERNIE-Image is a ComfyUI 0.33+ model")
    import comfy.ldm.ernie.model as ernie_module

    ernie = tm.tiny_ernie_image()
    positive, negative = tm.ernie_conditioning()
    latent = torch.zeros(1, 128, 12, 12)  # 144 image tokens (+ 10 text tokens) per call
    function = ernie_module.optimized_attention
    reference = _sample(ernie, latent, positive, negative)
    module_swap = comfy.module("noflash_core.comfy.module_swap")
    exact = module_swap.ModuleAttentionRouter.route(_float64_sampler_override)
    with module_swap.swapped_globals([ernie_module], "optimized_attention", exact):
        truth = _sample(ernie, latent, positive, negative)

    run = _patched_run_is_exact(comfy, ernie, (latent, positive, negative), reference, truth)
    # 2 steps x (cond and uncond batched) x 2 layers, every one through noflash's tiles
    assert run["label"] == "ErnieImage" and run["calls"] == 2 * 2 and "comfy" not in run["tiers"], run
    assert ernie_module.optimized_attention is function  # the module's name is back after the clone's calls
    torch.testing.assert_close(_sample(ernie, latent, positive, negative), reference, atol=0, rtol=0)

# ---- ComfyUI's memory planning -------------------------------------------------------------------------------


def _estimate_memory_through_wrappers(model, noise_shape):
    """``sampler_helpers.estimate_memory`` run inside the clone's real OUTER_SAMPLE wrappers (as in sampling)."""
    import comfy.model_patcher
    import comfy.patcher_extension as ext
    import comfy.sampler_helpers
    import comfy.samplers

    guider = comfy.samplers.CFGGuider(model)
    # As CFGGuider.sample does: a copy of the options with the patcher's wrappers merged in.
    guider.model_options = comfy.model_patcher.create_model_options_clone(guider.model_options)
    comfy.sampler_helpers.prepare_model_patcher(model, {}, guider.model_options)
    wrappers = ext.get_all_wrappers(ext.WrappersMP.OUTER_SAMPLE, guider.model_options, is_model_options=True)
    assert wrappers, "the NoFlash node added no OUTER_SAMPLE wrapper"
    executor = ext.WrapperExecutor.new_class_executor(
        lambda: comfy.sampler_helpers.estimate_memory(model, noise_shape, {}), guider, wrappers)
    return executor.execute()


def test_wan22_5b_memory_required_follows_noflash(comfy):
    """Real: ComfyUI's detection (WAN22, memory_usage_factor = dim / 2222), its ``estimate_memory``, the node, its
    OUTER_SAMPLE wrapper, the latent from ComfyUI's own ``Wan22ImageToVideoLatent`` node. Meta weights only."""
    from comfy import sampler_helpers

    latent = comfy.node("Wan22ImageToVideoLatent").execute(None, 1280, 704, 121, 1).result[0]["samples"]
    assert tuple(latent.shape) == (1, 48, 31, 44, 80)  # 16x spatial, 4x temporal compression
    wan = tm.wan22_5b_meta()
    assert type(wan.model).__name__ == "WAN22"
    before = sampler_helpers.estimate_memory(wan, latent.shape, {})
    patched = _node(comfy, "NoFlashAttentionPatcher", wan, True, 1024, 0)
    cfg_pair, single = _estimate_memory_through_wrappers(patched, latent.shape)

    estimator = comfy.module("noflash_core.vram")
    for batch, planned in ((2, cfg_pair), (1, single)):
        est = estimator.estimate_run("wan2.2-5b", 1280, 704, 121, batch=batch, dtype="bf16", device="gfx1030",
                                     text_encoders="none", vae="none")
        ratio = planned / est.denoise.working_noflash_bytes
        assert 0.5 <= ratio <= 2.0, (batch, planned / 2**30, est.denoise.working_noflash_bytes / 2**30)
    # The unpatched model (and the patched clone outside its run) keep ComfyUI's figure: quadratic attention.
    assert sampler_helpers.estimate_memory(wan, latent.shape, {}) == before
    assert "memory_required" not in vars(wan.model)
    assert before[0] / cfg_pair == pytest.approx(0.15 / (2 * 0.01))  # 7.5x, bf16


def test_sampling_loads_with_the_planned_memory_and_restores(comfy, tiny_wan, monkeypatch):
    from comfy import model_management
    from comfy_runtime import wan_conditioning

    seen = []
    real = model_management.load_models_gpu

    def spy(models, memory_required=0, *args, **kwargs):
        seen.append(memory_required)
        return real(models, memory_required, *args, **kwargs)

    monkeypatch.setattr(model_management, "load_models_gpu", spy)
    positive, negative = wan_conditioning()
    latent = torch.zeros(1, 16, 2, 16, 16)
    _sample(tiny_wan, latent, positive, negative, steps=1)
    _sample(_node(comfy, "NoFlashAttentionPatcher", tiny_wan, True, 0, 0), latent, positive, negative, steps=1)
    _sample(tiny_wan, latent, positive, negative, steps=1)
    original, patched, original_again = seen
    assert original == original_again and patched < original
    assert "memory_required" not in vars(tiny_wan.model)


def test_a_backend_node_after_noflash_is_reported(comfy, tiny_wan, caplog):
    from comfy_runtime import wan_conditioning

    patched = _node(comfy, "NoFlashAttentionPatcher", tiny_wan, True, 0, 0)
    import nodes

    if "ModelAttentionBackend" in nodes.NODE_CLASS_MAPPINGS:  # ComfyUI 0.33+: the core node
        replaced = nodes.NODE_CLASS_MAPPINGS["ModelAttentionBackend"]().patch(patched, "pytorch attention")[0]
        expected = "attention_pytorch"
    else:  # before 0.33: another pack's override installed after ours does the same

        def other_pack_override(func, *args, **kwargs):
            return func(*args, **kwargs)

        replaced = patched.clone()
        replaced.model_options["transformer_options"][OVERRIDE] = other_pack_override
        expected = other_pack_override.__qualname__
    positive, negative = wan_conditioning()
    with caplog.at_level(logging.WARNING):
        _sample(replaced, torch.zeros(1, 16, 2, 16, 16), positive, negative, steps=1)
    run = comfy.module("noflash_core.comfy.telemetry").default_history().latest()
    assert run["replaced_by"] == expected and run["calls"] == 0
    assert sum("override was replaced" in r.getMessage() for r in caplog.records) == 1
    _sample(patched, torch.zeros(1, 16, 2, 16, 16), positive, negative, steps=1)
    assert comfy.module("noflash_core.comfy.telemetry").default_history().latest()["replaced_by"] is None


def test_free_memory_is_read_through_the_patcher_under_dynamic_vram(comfy, tiny_wan, monkeypatch):
    patched = _node(comfy, "NoFlashAttentionPatcher", tiny_wan, True, 0, 0)
    reader = patched.model_options["transformer_options"][OVERRIDE].noflash_free_memory
    if not hasattr(patched, "get_free_memory"):  # before 0.33: no such method, the planner reads free memory
        assert reader is None
        return
    from comfy import memory_management

    cpu = torch.device("cpu")
    monkeypatch.setattr(memory_management, "aimdo_enabled", False)
    assert reader(cpu) is None  # no dynamic VRAM: noflash's own reading (ROCm sysfs) stays in charge
    seen = []
    monkeypatch.setattr(type(patched), "get_free_memory", lambda self, device: seen.append(device) or 3 << 30)
    monkeypatch.setattr(memory_management, "aimdo_enabled", True)
    assert reader(cpu) == 3 << 30 and seen == [cpu]
    budget = comfy.module("noflash_core.comfy.memory").comfy_budget_bytes(torch.device("cuda", 0), reader)
    assert budget == (3 << 30) // 2  # FREE_MEMORY_FRACTION of ComfyUI's figure
