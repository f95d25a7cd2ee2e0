"""Every example workflow follows its own VRAM Probe on the gfx1030 profile (RX 6800/6900 XT, 16 GiB).

The probe's settings in each template (size, frames, batch, family, text encoder, prompt length) go through
``estimate_run`` on gfx1030 twice: as the node runs them with nothing connected (how the template ships: the probe
answers before the models are downloaded) and with the weight formats of the files the template loads (the numbers
of its thumbnail). The template must hold every node the verdict line names, where it acts: the Attention Patcher and
FFN Chunker in the sampler's model path, the CLIP Patcher in the encoders' CLIP path, the VAE Patcher and VAE Decode
(Tiled) on the decode of the sampler's latent.
"""

from __future__ import annotations

import copy
import glob
import importlib.util
import json
import os
import re
from typing import Dict, List

import pytest

from noflash_core.vram import estimate_run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKFLOWS = sorted(glob.glob(os.path.join(ROOT, "example_workflows", "*.json")))

NODE_OF_NAME = {
    "NoFlash Attention Patcher": "NoFlashAttentionPatcher",
    "NoFlash FFN Chunker": "NoFlashFFNChunker",
    "NoFlash CLIP Patcher": "NoFlashCLIPPatcher",
    "NoFlash VAE Patcher": "NoFlashVAEPatcher",
    "VAE Decode (Tiled)": "VAEDecodeTiled",
}
"""The node names a verdict line can name, and their node types."""

_DECODES = ("VAEDecode", "VAEDecodeTiled")


def _generator():
    spec = importlib.util.spec_from_file_location("noflash_make_examples", os.path.join(ROOT, "docs",
                                                                                       "make_examples.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _load(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _sources(wf: dict, node: dict, input_type: str) -> List[dict]:
    """The chain of nodes feeding ``node`` through inputs of ``input_type``, nearest first."""
    by_id = {n["id"]: n for n in wf["nodes"]}
    link_of = {link[0]: link for link in wf["links"]}
    chain = []
    while True:
        inp = next((i for i in node["inputs"] if i["type"] == input_type and i["link"] is not None), None)
        if inp is None:
            return chain
        node = by_id[link_of[inp["link"]][1]]
        chain.append(node)


def _of_type(wf: dict, *types: str) -> List[dict]:
    return [n for n in wf["nodes"] if n["type"] in types]


def _sampler_decodes(wf: dict) -> List[dict]:
    """The decode nodes that read a sampler's latent."""
    samplers = {n["id"] for n in _of_type(wf, "KSampler", "KSamplerAdvanced", "SamplerCustom")}
    return [d for d in _of_type(wf, *_DECODES) if any(s["id"] in samplers for s in _sources(wf, d, "LATENT")[:1])]


def named_nodes(verdict_text: str) -> List[str]:
    """The node names in a verdict line, in order; an unknown ``NoFlash ...`` name is an error."""
    for name in re.findall(r"NoFlash [A-Z][A-Za-z]* [A-Z][A-Za-z]*", verdict_text):
        assert name in NODE_OF_NAME, f"the verdict names {name!r}, which this test does not know"
    found = [(verdict_text.find(name), name) for name in NODE_OF_NAME if name in verdict_text]
    return [name for _, name in sorted(found)]


def missing_nodes(wf: dict, verdict_text: str) -> List[str]:
    """The nodes the verdict names that ``wf`` lacks where they act."""
    missing = []
    samplers = _of_type(wf, "KSampler", "KSamplerAdvanced", "SamplerCustom")
    decodes = _sampler_decodes(wf)
    encodes = _of_type(wf, "CLIPTextEncode")
    for name in named_nodes(verdict_text):
        node_type = NODE_OF_NAME[name]
        if node_type in ("NoFlashAttentionPatcher", "NoFlashFFNChunker"):
            ok = samplers and all(node_type in [n["type"] for n in _sources(wf, s, "MODEL")] for s in samplers)
        elif node_type == "NoFlashCLIPPatcher":
            ok = encodes and all(node_type in [n["type"] for n in _sources(wf, e, "CLIP")] for e in encodes)
        elif node_type == "NoFlashVAEPatcher":
            ok = decodes and all(node_type in [n["type"] for n in _sources(wf, d, "VAE")] for d in decodes)
        else:  # VAE Decode (Tiled): every decode of the sampler's latent is tiled
            ok = decodes and all(d["type"] == "VAEDecodeTiled" for d in decodes)
        if not ok:
            missing.append(name)
    return missing


def _probe(wf: dict) -> dict:
    probes = _of_type(wf, "NoFlashVRAMProbe")
    assert len(probes) == 1
    return probes[0]


def _estimates(path: str) -> Dict[str, object]:
    """The probe's estimate on gfx1030: as the node runs it with nothing connected, and for the template's files."""
    wf = _load(path)
    width, height, frames, batch, family, _device, vram_gb, text_encoder, tokens = _probe(wf)["widgets_values"]
    assert vram_gb == 0
    formats = _generator().WORKFLOWS[os.path.splitext(os.path.basename(path))[0]][2]
    common = dict(frames=frames, batch=batch, device="gfx1030", text_encoders=text_encoder, prompt_tokens=tokens)
    return {
        "nothing connected": estimate_run(family, width, height, **common),
        "the template's files": estimate_run(family, width, height, **common, **formats),
    }


@pytest.mark.parametrize("path", WORKFLOWS, ids=os.path.basename)
def test_template_holds_the_nodes_its_probe_names(path):
    wf = _load(path)
    for how, est in _estimates(path).items():
        assert est.device.key == "gfx1030" and est.vram_bytes == 16 * 2**30
        missing = missing_nodes(wf, est.verdict_text)
        assert not missing, f"{os.path.basename(path)} ({how}): the probe says {est.verdict_text!r}; add {missing}"


@pytest.mark.parametrize("path", WORKFLOWS, ids=os.path.basename)
def test_probe_answers_from_family_alone_and_a_note_says_so(path):
    wf = _load(path)
    probe = _probe(wf)
    assert probe["widgets_values"][4] != "from model", "the probe needs a family to answer with nothing connected"
    assert all(i["link"] is None for i in probe["inputs"]), "wired to a loader, the probe fails until downloaded"
    notes = " ".join(n["widgets_values"][0] for n in _of_type(wf, "MarkdownNote", "Note"))
    assert "family" in notes and "download" in notes


def test_the_wan_template_decodes_tiled_as_its_probe_says():
    # The case: the probe says the decode needs 17.2 GiB of 16 and names VAE Decode (Tiled).
    path = next(p for p in WORKFLOWS if os.path.basename(p).startswith("Wan"))
    est = _estimates(path)["the template's files"]
    assert est.verdict == "no" and "VAE Decode (Tiled)" in named_nodes(est.verdict_text), est.verdict_text
    assert [d["type"] for d in _sampler_decodes(_load(path))] == ["VAEDecodeTiled"]


def test_the_check_fails_a_template_that_ignores_its_probe():
    wan = _load(next(p for p in WORKFLOWS if os.path.basename(p).startswith("Wan")))
    plain = copy.deepcopy(wan)
    for node in plain["nodes"]:
        if node["type"] == "VAEDecodeTiled":
            node["type"], node["widgets_values"] = "VAEDecode", []
    no = "Does not fit in 16.0 GiB (gfx1030), even with noflash (VAE decode): use VAE Decode (Tiled)"
    assert missing_nodes(plain, no) == ["VAE Decode (Tiled)"]
    assert missing_nodes(wan, no) == []
    only = "Fits in 16.0 GiB (gfx1030) only with noflash: NoFlash Attention Patcher, NoFlash VAE Patcher"
    assert named_nodes(only) == ["NoFlash Attention Patcher", "NoFlash VAE Patcher"]
    assert missing_nodes(wan, only) == ["NoFlash VAE Patcher"]  # Wan's decode reads the VAE loader directly
    assert missing_nodes(wan, "Fits in 16.0 GiB (gfx1030) with ComfyUI's own attention") == []
    with pytest.raises(AssertionError, match="does not know"):
        named_nodes("only with noflash: NoFlash Magic Patcher")
