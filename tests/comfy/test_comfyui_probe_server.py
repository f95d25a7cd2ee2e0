"""The VRAM Probe in a real ComfyUI server, queued through the HTTP API as the frontend queues it, says what the CLI
says: the node's estimate block is ``python -m noflash_core.video``'s report, character for character.

ComfyUI's executor runs the node under ``torch.inference_mode()`` and with its fp16-reduction flag for math SDPA on;
the CLI runs in a plain process. Two family/profile pairs from issue 17, where the node had lost math SDPA's scores:
Wan 2.2 5B at 1280x704x121 on ``arc`` (ComfyUI runs torch's math SDPA there) and Flux at 1536² on ``mps``. The probe
has nothing connected: the family alone decides (planning before the models are downloaded).

Needs ``COMFYUI_PATH``.
"""

from __future__ import annotations

import difflib

import pytest
from comfy_runtime import comfyui_path
from comfy_server import ComfyServer

from tests.support.video_cli import video_cli_subprocess

PAIRS = [
    ("wan2.2-5b", 1280, 704, 121, "arc"),
    ("flux", 1536, 1536, 1, "mps"),
]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if comfyui_path() is None:
        pytest.skip("COMFYUI_PATH is not set to a ComfyUI checkout")
    with ComfyServer(str(tmp_path_factory.mktemp("probe_server"))) as srv:
        yield srv


def _combo_options(spec) -> list:
    """A combo input's options from ``/object_info`` (``[options, {...}]`` or ``["COMBO", {"options": ...}]``)."""
    if isinstance(spec[0], list):
        return spec[0]
    return spec[1]["options"]


def _device_option(server: ComfyServer, key: str) -> str:
    """The probe's ``device`` choice for preset ``key`` (the bare name or a label that starts with it)."""
    info = server.get("object_info/NoFlashVRAMProbe")["NoFlashVRAMProbe"]["input"]
    options = _combo_options(info["required"]["device"])
    found = [o for o in options if o == key or o.startswith(key + " ")]
    assert len(found) == 1, (key, options)
    return found[0]


@pytest.mark.parametrize("family,width,height,frames,device", PAIRS)
def test_probe_text_in_the_server_equals_the_cli(server, family, width, height, frames, device):
    prompt = {"1": {"class_type": "NoFlashVRAMProbe", "inputs": {
        "width": width, "height": height, "frames": frames, "batch": 1, "family": family,
        "device": _device_option(server, device), "vram_gb": 0, "text_encoder": "auto", "prompt_tokens": 256,
    }}}
    entry = server.run(prompt)
    text = entry["outputs"]["1"]["text"][0]
    chart = entry["outputs"]["1"]["noflash_estimate"][0]
    cli = video_cli_subprocess("--model", family, "--width", str(width), "--height", str(height),
                               "--frames", str(frames), "--device", device)
    assert cli in text, "\n".join(difflib.unified_diff(cli.splitlines(), text.splitlines(), "cli", "node", lineterm=""))
    assert chart["device"]["key"] == device and chart["text"] == text
    if device == "arc":
        # Issue 17: the node said "math SDPA 160 MiB" and "Fits in 16.0 GiB with ComfyUI's own attention".
        assert "66.7 GiB" in text and chart["verdict"] == "noflash"
        assert "Fits in 16.0 GiB (arc) only with noflash: NoFlash Attention Patcher" in text


def test_probe_with_nothing_connected_and_no_family_says_what_to_do(server):
    prompt = {"1": {"class_type": "NoFlashVRAMProbe", "inputs": {
        "width": 1024, "height": 1024, "frames": 1, "batch": 1, "family": "from model",
        "device": _device_option(server, "gfx1030"), "vram_gb": 0, "text_encoder": "auto", "prompt_tokens": 256,
    }}}
    out = server.run(prompt)["outputs"]["1"]
    text = out["text"][0]
    assert "Nothing to estimate yet: connect a MODEL or pick a family. The family alone is enough" in text
    assert "VERDICT" not in text
    chart = out["noflash_estimate"][0]
    assert chart["components"] == [] and chart["verdict"] is None and "Nothing to estimate" in chart["verdict_text"]


def test_device_choices_name_the_cards_and_old_names_still_run(server):
    options = _combo_options(server.get("object_info/NoFlashVRAMProbe")["NoFlashVRAMProbe"]["input"]["required"]
                             ["device"])
    assert options[0] == "this machine"
    assert "gfx1030 · AMD Radeon RX 6800/6800 XT/6900 XT (RDNA2, 16 GiB)" in options
    assert all(" · " in o and "GiB" in o for o in options[1:]), options
    # A workflow saved with the bare preset name (before the labels) still validates and plans for that card.
    prompt = {"1": {"class_type": "NoFlashVRAMProbe", "inputs": {
        "width": 512, "height": 512, "frames": 1, "batch": 1, "family": "flux", "device": "gfx1010", "vram_gb": 0,
        "text_encoder": "auto", "prompt_tokens": 77}}}
    assert "planned for the gfx1010 profile" in server.run(prompt)["outputs"]["1"]["text"][0]
    prompt["1"]["inputs"]["device"] = "rtx9090"
    with pytest.raises(RuntimeError, match="unknown device profile 'rtx9090'"):
        server.run(prompt)


def test_every_noflash_output_has_a_tooltip_and_zero_means_leave_it(server):
    info = server.get("object_info")
    ours = {name: node for name, node in info.items() if name.startswith("NoFlash")}
    assert len(ours) == 6, sorted(ours)
    for name, node in ours.items():
        assert node["output_tooltips"] and all(node["output_tooltips"]), name
        for group in ("required", "optional"):
            for key, spec in node["input"].get(group, {}).items():
                extra = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
                assert extra.get("tooltip"), (name, key)
                if extra.get("default") == 0:  # 0 is automatic: the tooltip says so and says to leave it
                    assert "0 = " in extra["tooltip"] and "leave it" in extra["tooltip"], (name, key)


def test_start_up_line_says_nothing_about_threshold_0(server):
    lines = [line for line in server.log().splitlines() if "global SDPA patch" in line]
    # ComfyUI 0.33 prefixes its log lines with the level ("[INFO] noflash 0.1.0: ...").
    assert len(lines) == 1 and "noflash 0." in lines[0] and "threshold" not in lines[0], lines
