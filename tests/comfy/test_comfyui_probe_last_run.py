"""The VRAM Probe's "Last run" inside a real ComfyUI (issue 17.2): the run of the probe's own prompt or workflow, not
the newest run of any.

In-process, the nodes run in ComfyUI's executing-node context (``CurrentNodeContext``, what the executor sets around
each node) and under ``torch.inference_mode()``; in a real server, prompts are queued over HTTP with the workflow the
frontend sends (``extra_data.extra_pnginfo.workflow``), and ComfyUI's output cache must not hand one workflow's probe
text to another. Needs ``COMFYUI_PATH``.
"""

from __future__ import annotations

import uuid

import pytest
import torch
from comfy_runtime import wan_conditioning
from comfy_server import ComfyServer, tiny_sd3_base


def _sample(model, steps=1):
    import comfy.sample

    positive, negative = wan_conditioning()
    latent = torch.zeros(1, 16, 2, 16, 16)
    noise = comfy.sample.prepare_noise(latent, 0)
    return comfy.sample.sample(model, noise, steps, 5.0, "euler", "simple", positive, negative, latent, seed=0,
                               disable_pbar=True)


def _probe_text(comfy, prompt_id):
    from comfy_execution.utils import CurrentNodeContext

    with torch.inference_mode(), CurrentNodeContext(prompt_id, "9"):
        out = comfy.node("NoFlashVRAMProbe").execute(1280, 704, 121, 1, "wan2.2-5b", device="gfx1030")
    return out.ui["text"][0]


def test_the_probe_shows_the_run_of_its_own_prompt_only(comfy, tiny_wan):
    from comfy_execution.utils import CurrentNodeContext

    no_run = comfy.module("noflash_core.comfy.probe").NO_RUN
    history = comfy.module("noflash_core.comfy.telemetry").default_history()
    with torch.inference_mode(), CurrentNodeContext("prompt-a", "3"):
        patched = comfy.node("NoFlashAttentionPatcher").execute(tiny_wan, True, 0, 0).result[0]
        _sample(patched)
    ours = history.latest()
    assert ours["prompt_id"] == "prompt-a" and ours["calls"] > 0

    same = _probe_text(comfy, "prompt-a")
    assert f"Last run #{ours['run_id']} (WAN21): {ours['calls']} attention calls" in same and no_run not in same

    other = _probe_text(comfy, "prompt-b")  # a prompt (of a workflow) that ran nothing patched
    assert no_run in other and "Last run #" not in other
    assert history.latest()["run_id"] == ours["run_id"]  # the newest run exists; it is just not this workflow's


# ---- in a real server ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tiny_sd3_base(tmp_path_factory, "last_run_base")
    with ComfyServer(base) as s:
        yield s


def _sampling_prompt():
    """Tiny SD3 -> NoFlash Attention Patcher -> KSampler -> SaveLatent (1024 tokens per attention call)."""
    return {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": "tiny_sd3.safetensors", "weight_dtype": "default"}},
        "2": {"class_type": "NoFlashAttentionPatcher",
              "inputs": {"model": ["1", 0], "enabled": True, "min_tokens": 0, "budget_mb": 0, "tune": "off"}},
        "4": {"class_type": "CLIPLoader",
              "inputs": {"clip_name": "tiny_clip_l.safetensors", "type": "stable_diffusion", "device": "default"}},
        "5": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["4", 0], "text": "a red fox in snow"}},
        "7": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 512, "height": 512, "batch_size": 1}},
        "8": {"class_type": "KSampler", "inputs": {
            "model": ["2", 0], "positive": ["5", 0], "negative": ["5", 0], "latent_image": ["7", 0], "seed": 3,
            "steps": 1, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}},
        "9": {"class_type": "SaveLatent", "inputs": {"samples": ["8", 0], "filename_prefix": "latents/last_run"}},
    }


def _probe_prompt():
    """The probe alone, planning from the family (nothing connected), as a template's "will it fit?" prompt."""
    return {"20": {"class_type": "NoFlashVRAMProbe", "inputs": {
        "width": 512, "height": 512, "frames": 1, "batch": 1, "family": "flux", "device": "gfx1030", "vram_gb": 0,
        "text_encoder": "auto", "prompt_tokens": 77}}}


def _queue(server, prompt, workflow_id):
    """Queue ``prompt`` as the frontend does from the workflow ``workflow_id``; wait; returns the prompt id."""
    body = {"prompt": prompt, "client_id": "noflash-tests",
            "extra_data": {"extra_pnginfo": {"workflow": {"id": workflow_id, "nodes": [], "links": []}}}}
    prompt_id = server.post("prompt", body)["prompt_id"]
    status = server.wait(prompt_id)
    assert status["status_str"] == "success", (status, server.log_tail())
    return prompt_id


def _served_probe_text(server, workflow_id):
    prompt_id = _queue(server, _probe_prompt(), workflow_id)
    return server.get(f"history/{prompt_id}")[prompt_id]["outputs"]["20"]["text"][0]


def test_the_probe_in_a_server_shows_its_own_workflows_run(server):
    wan, flux = str(uuid.uuid4()), str(uuid.uuid4())
    no_run = "Last run: no run of this workflow yet"
    assert no_run in _served_probe_text(server, wan)  # nothing ran anywhere yet

    sampled = _queue(server, _sampling_prompt(), wan)
    runs = [r for r in server.get("noflash/runs")["runs"] if r.get("kind") == "attention"]
    ours = runs[-1]
    assert (ours["prompt_id"], ours["workflow_id"]) == (sampled, wan) and ours["calls"] > 0

    same = _served_probe_text(server, wan)
    assert f"Last run #{ours['run_id']} (SD3): {ours['calls']} attention calls" in same and no_run not in same
    other = _served_probe_text(server, flux)  # same probe inputs, another workflow: not the cached text of the first
    assert no_run in other and "Last run #" not in other
    assert f"Last run #{ours['run_id']}" in _served_probe_text(server, wan)  # and back
