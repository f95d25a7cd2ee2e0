"""Faults in a real run, against a real ComfyUI server (issue 17 point 7).

- Cancelling a prompt in the middle of sampling, or in the middle of a patched text encode, leaves nothing patched
  that should not be: the CLIP Patcher's per-module ``forward``s are gone, torch's SDPA is what it was, and the
  next prompt with the plain model runs ComfyUI's own attention (no noflash override reaches its calls).
- An out-of-memory inside a patched run retries smaller plans and finishes with the same result; when no plan
  fits, the prompt fails with noflash's message (what to change), and the next prompt runs normally.
- Queued prompts with different patch settings do not leak settings into each other.

The server loads the NoFlash pack and a test-only pack (``tests/comfy/fault_pack``) whose nodes hold a run until
``POST /interrupt`` arrives (so the cancel lands mid-sampling or mid-encode, deterministically), cap tensor sizes
inside the attention override (an allocator at its limit), and record what the model carries. Needs
``COMFYUI_PATH``.
"""

from __future__ import annotations

import os
import time

import pytest
import torch
from comfy_runtime import REPO_ROOT
from comfy_server import ComfyServer, tiny_sd3_base

FAULT_PACK = os.path.join(REPO_ROOT, "tests", "comfy", "fault_pack")
LATENT = 512  # EmptySD3LatentImage 512x512 -> 64x64 latent -> 1024 tokens per attention call (2 heads of 64)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tiny_sd3_base(tmp_path_factory, "faults_base")
    with ComfyServer(base, extra_packs={"noflash_faults": FAULT_PACK}) as s:
        yield s


def _prompt(*, patch=None, tier=None, hold=None, cap_kib=None, inspect=None, clip_patch=False, hold_encode=False,
            prefix="faults"):
    """An API-format prompt: tiny SD3 (→ NoFlash nodes → test nodes) → KSampler → SaveLatent."""
    p = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": "tiny_sd3.safetensors", "weight_dtype": "default"}},
        "4": {"class_type": "CLIPLoader",
              "inputs": {"clip_name": "tiny_clip_l.safetensors", "type": "stable_diffusion", "device": "default"}},
        "7": {"class_type": "EmptySD3LatentImage", "inputs": {"width": LATENT, "height": LATENT, "batch_size": 1}},
    }
    model = ["1", 0]
    if patch is not None:
        p["2"] = {"class_type": "NoFlashAttentionPatcher",
                  "inputs": {"model": model, "enabled": True, "min_tokens": 0, "budget_mb": patch, "tune": "off"}}
        model = ["2", 0]
    if tier is not None:
        p["3"] = {"class_type": "NoFlashTierSelector", "inputs": {"model": model, "tier": str(tier), "block_m": 0,
                                                                  "block_n": 0}}
        model = ["3", 0]
    if cap_kib is not None:
        p["20"] = {"class_type": "NoFlashTestMemoryCap", "inputs": {"model": model, "cap_kib": cap_kib}}
        model = ["20", 0]
    if inspect is not None:
        p["21"] = {"class_type": "NoFlashTestInspect", "inputs": {"model": model, "label": inspect}}
        model = ["21", 0]
    if hold is not None:
        p["22"] = {"class_type": "NoFlashTestHoldSampling", "inputs": {"model": model, "hold_step": hold}}
        model = ["22", 0]
    clip = ["4", 0]
    if clip_patch:
        p["10"] = {"class_type": "NoFlashCLIPPatcher",
                   "inputs": {"clip": clip, "enabled": True, "min_tokens": 0, "budget_mb": 0}}
        clip = ["10", 0]
    if hold_encode:
        p["23"] = {"class_type": "NoFlashTestHoldEncode", "inputs": {"clip": clip}}
        clip = ["23", 0]
    p["5"] = {"class_type": "CLIPTextEncode", "inputs": {"clip": clip, "text": "a red fox in snow"}}
    p["8"] = {"class_type": "KSampler", "inputs": {
        "model": model, "positive": ["5", 0], "negative": ["5", 0], "latent_image": ["7", 0], "seed": 3,
        "control_after_generate": "fixed", "steps": 3, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple",
        "denoise": 1.0}}
    p["9"] = {"class_type": "SaveLatent", "inputs": {"samples": ["8", 0], "filename_prefix": f"latents/{prefix}"}}
    return p


def _events(server, kind):
    return [e for e in server.get("noflash_test/state")["events"] if e["kind"] == kind]


def _wait_event(server, kind, timeout=300.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = _events(server, kind)
        if found:
            return found[-1]
        time.sleep(0.2)
    raise TimeoutError(f"no {kind!r} event from the fault pack; server log:\n{server.log_tail()}")


def _latent(server, prefix):
    import safetensors.torch

    folder = os.path.join(server.base, "output", "latents")
    files = sorted(f for f in os.listdir(folder) if f.startswith(prefix))
    assert files, os.listdir(folder)
    return safetensors.torch.load_file(os.path.join(folder, files[-1]))["latent_tensor"]


def _noflash_runs(server):
    return server.get("noflash/runs")["runs"]


def test_cancel_mid_sampling_leaves_nothing_patched(server):
    server.post("noflash_test/reset", {})
    sdpa_before = server.get("noflash_test/state")["sdpa_patched_now"]
    prompt_id = server.queue(_prompt(patch=0, hold=1, prefix="cancel_sampling"))
    held = _wait_event(server, "sampling")
    assert held["override"] == "noflash_attention_override"  # the cancel lands while noflash is patched in
    server.post("interrupt", {})
    status = server.wait(prompt_id)
    assert status["status_str"] == "error" and any(m[0] == "execution_interrupted" for m in status["messages"])
    state = server.get("noflash_test/state")
    assert state["sdpa_patched_now"] == sdpa_before
    # The next prompt, with the same loader but no NoFlash node, runs ComfyUI's own attention.
    done = server.wait(server.queue(_prompt(inspect="plain after cancel", prefix="after_cancel")))
    assert done["status_str"] == "success", done
    plain = [e for e in _events(server, "inspect") if e["label"] == "plain after cancel"]
    assert plain and plain[-1]["override"] == "" and plain[-1]["sdpa_patched"] == sdpa_before


def test_cancel_mid_encode_restores_the_text_encoder(server):
    server.post("noflash_test/reset", {})
    prompt_id = server.queue(_prompt(clip_patch=True, hold_encode=True, prefix="cancel_encode"))
    held = _wait_event(server, "encode")
    assert held["routed"] == held["modules"] > 0  # inside the patched encode every attention module is routed
    server.post("interrupt", {})
    status = server.wait(prompt_id)
    assert status["status_str"] == "error"
    state = server.get("noflash_test/state")
    assert state["clip_routed_now"] and all(n == 0 for n in state["clip_routed_now"]), state
    # A plain encode and sampling afterwards run normally.
    done = server.wait(server.queue(_prompt(prefix="after_encode_cancel")))
    assert done["status_str"] == "success", done


def test_out_of_memory_retries_smaller_and_finishes(server):
    server.post("noflash_test/reset", {})
    ref = server.wait(server.queue(_prompt(patch=0, tier=1, prefix="oom_ref")))
    assert ref["status_str"] == "success", ref
    # Tier 1's first plan takes whole key rows for all query rows of both heads (1024x1024 fp32 per head = 4 MiB);
    # under a 2 MiB cap every such tile fails like an allocator at its limit, and the retry must go smaller.
    capped = server.wait(server.queue(_prompt(patch=0, tier=1, cap_kib=2048, prefix="oom_capped")))
    assert capped["status_str"] == "success", capped
    assert server.get("noflash_test/state")["ooms"] > 0  # the cap did bite, and the run recovered
    a, b = _latent(server, "oom_ref"), _latent(server, "oom_capped")
    tol = 64 * torch.finfo(torch.float32).eps * max(1.0, a.abs().max().item())
    assert (a - b).abs().max().item() <= tol


def test_out_of_memory_with_no_plan_that_fits_fails_clearly_then_recovers(server):
    server.post("noflash_test/reset", {})
    failed = server.wait(server.queue(_prompt(patch=0, cap_kib=1, prefix="oom_fail")))
    assert failed["status_str"] == "error"
    error = next(m[1] for m in failed["messages"] if m[0] == "execution_error")
    text = error["exception_message"]
    assert "noflash attention ran out of memory" in text and "budget" in text, text
    done = server.wait(server.queue(_prompt(patch=0, prefix="after_oom")))
    assert done["status_str"] == "success", done


def test_queued_prompts_keep_their_own_settings(server):
    server.post("noflash_test/reset", {})
    before = len(_noflash_runs(server))
    ids = [server.queue(_prompt(patch=0, tier=1, inspect="tier1", prefix="q1")),
           server.queue(_prompt(patch=0, tier=3, inspect="tier3", prefix="q3")),
           server.queue(_prompt(inspect="plain", prefix="qplain"))]
    for prompt_id in ids:
        assert server.wait(prompt_id)["status_str"] == "success"
    runs = _noflash_runs(server)[before:]
    assert [sorted(r["tiers"]) for r in runs] == [["1"], ["3"]], runs  # the plain prompt made no noflash run
    seen = {e["label"]: e for e in _events(server, "inspect")}
    assert seen["tier1"]["override"] == seen["tier3"]["override"] == "noflash_attention_override"
    assert seen["plain"]["override"] == ""

