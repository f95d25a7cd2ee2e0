"""The Attention Patcher's ``tune`` option inside a real ComfyUI (CPU; skipped without ``COMFYUI_PATH``): the input
is in the schema, a first run with ``tune = "first run"`` tunes the new signature once (status "tuning", then
"tuned"), stays exact, writes the cache, and a later run starts tuned."""

from __future__ import annotations

import json

import pytest
import torch

from tests.support.comfy import comfy_runtime_or_skip


@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    rt = comfy_runtime_or_skip("noflash_comfy_runtime_tune")
    rt.load_core_nodes()
    pack = rt.load_pack(str(tmp_path_factory.mktemp("tune_base")))
    import comfy.sd

    import nodes

    path = rt.save_state_dict(rt.tiny_wan_state_dict(), str(tmp_path_factory.mktemp("models") / "wan.safetensors"))
    return nodes.NODE_CLASS_MAPPINGS, rt, pack, comfy.sd.load_diffusion_model(path)


def _sample(model, latent, positive, negative):
    import comfy.sample

    noise = comfy.sample.prepare_noise(latent, 0)
    return comfy.sample.sample(model, noise, 2, 5.0, "euler", "simple", positive, negative, latent, seed=0,
                               disable_pbar=True)


def test_tune_input_is_in_the_schema(comfy):
    mapping = comfy[0]
    spec = mapping["NoFlashAttentionPatcher"].INPUT_TYPES()
    assert "tune" not in (spec.get("required") or {})  # optional: API prompts saved before it existed still run
    options, extra = spec["optional"]["tune"]
    if options == "COMBO":  # a V3 combo: its options are in the dict
        options = extra["options"]
    assert list(options) == ["off", "first run"] and extra.get("default") == "off"
    assert "at most" in extra.get("tooltip", "")


def test_first_run_tunes_once_stays_exact_and_later_runs_start_tuned(comfy, tmp_path, monkeypatch):
    mapping, rt, pack, wan = comfy
    cache = tmp_path / "tune.json"
    monkeypatch.setenv("NOFLASH_TUNE_CACHE", str(cache))
    node_module = rt.pack_module(pack, "nodes.attention_nodes")
    statuses = []
    monkeypatch.setattr(node_module, "publish_status", statuses.append)
    rt.pack_module(pack, "noflash_core.tune.lookup").clear_memory_cache()
    positive, negative = rt.wan_conditioning()
    latent = torch.zeros(1, 16, 1, 48, 64)  # 24 x 32 = 768 tokens: tiled (2 x 2 x 768^2 fp32 scores > 8 MiB)
    reference = _sample(wan, latent, positive, negative)

    patcher = mapping["NoFlashAttentionPatcher"]
    tuned_model = patcher.execute(wan, True, 0, 0, "first run").result[0]
    out = _sample(tuned_model, latent, positive, negative)
    torch.testing.assert_close(out, reference, atol=1e-4, rtol=1e-4)  # every candidate is exact
    tuning = [s for s in statuses if s.get("plan_source") in ("tuning", "tuned")]
    assert tuning and [s["plan_source"] for s in tuning] == ["tuning", "tuned"] * (len(tuning) // 2)
    keys = [s["tuning_signature"] for s in tuning[::2]]
    assert keys == [s["tuning_signature"] for s in tuning[1::2]] and len(set(keys)) == len(keys)  # once each
    assert any("L~790 S~790" in k for k in keys)  # self-attention: 768 tokens, in the bucket of 790
    with open(cache) as f:
        [dev] = json.load(f)["devices"].values()
    assert set(dev["entries"]) == set(keys)
    assert all(e["mode"] == "first-run" and e["plans"] and e["model"]["median_ms"] > 0
               for e in dev["entries"].values())

    statuses.clear()  # a later run (a new patcher, same cache): nothing left to tune
    again = patcher.execute(wan, True, 0, 0, "first run").result[0]
    torch.testing.assert_close(_sample(again, latent, positive, negative), reference, atol=1e-4, rtol=1e-4)
    assert not [s for s in statuses if s.get("plan_source") == "tuning"]
    off = patcher.execute(tuned_model, True, 0, 0, "off").result[0]
    assert not off.get_wrappers("apply_model", "noflash_tune")
    assert tuned_model.get_wrappers("apply_model", "noflash_tune")
