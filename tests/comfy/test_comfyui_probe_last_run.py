"""The VRAM Probe's "Last run" inside a real ComfyUI (issue 17.2): the run of the probe's own prompt or workflow, not
the newest run of any. Nodes run in ComfyUI's executing-node context (``CurrentNodeContext``, what the executor sets
around each node) and under ``torch.inference_mode()``, as ComfyUI runs them. Needs ``COMFYUI_PATH``."""

from __future__ import annotations

import torch
from comfy_runtime import wan_conditioning


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
