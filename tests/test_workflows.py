"""Structure of the example workflows: node types, links, widget counts; and against the live node list of a real
ComfyUI when ``COMFYUI_PATH`` is set (run this file with ComfyUI's Python then)."""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKFLOWS = sorted(glob.glob(os.path.join(ROOT, "example_workflows", "*.json")))
FRONTEND_ONLY = {"MarkdownNote", "Note", "Reroute", "PrimitiveNode"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}

# Widget values each node type stores (ComfyUI 0.3.64 with its pinned frontend; the live test re-derives them).
WIDGETS = {
    "NoFlashAttentionPatcher": 4,  # enabled, min_tokens, budget_mb, tune
    "NoFlashTierSelector": 3,  # tier, block_m, block_n
    "NoFlashFFNChunker": 1,  # num_chunks
    "NoFlashVRAMProbe": 9,  # width, height, frames, batch, family, device, vram_gb, text_encoder, prompt_tokens
    "NoFlashCLIPPatcher": 3,  # enabled, min_tokens, budget_mb
    "NoFlashVAEPatcher": 3,  # enabled, min_tokens, budget_mb
    "ModelSamplingAuraFlow": 1,
    "UNETLoader": 2,
    "CLIPLoader": 3,
    "DualCLIPLoader": 4,
    "VAELoader": 1,
    "CLIPTextEncode": 1,
    "ModelSamplingSD3": 1,
    "Wan22ImageToVideoLatent": 4,
    "KSampler": 7,  # seed, control_after_generate, steps, cfg, sampler, scheduler, denoise
    "VAEDecode": 0,
    "VAEDecodeTiled": 4,  # tile_size, overlap, temporal_size, temporal_overlap
    "CreateVideo": 1,
    "SaveVideo": 3,
    "FluxGuidance": 1,
    "ConditioningZeroOut": 0,
    "EmptySD3LatentImage": 3,
    "SaveImage": 1,
    "MarkdownNote": 1,
}
MODEL_FOLDERS = {"UNETLoader": "diffusion_models", "CLIPLoader": "text_encoders", "DualCLIPLoader": "text_encoders",
                 "VAELoader": "vae"}


def _load(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _by_id(wf):
    return {n["id"]: n for n in wf["nodes"]}


def _by_type(wf, type_):
    return [n for n in wf["nodes"] if n["type"] == type_]


def _named(prefix):
    return next(p for p in WORKFLOWS if os.path.basename(p).startswith(prefix))


def test_there_are_three_example_workflows_with_readable_names_and_thumbnails():
    names = sorted(os.path.splitext(os.path.basename(p))[0] for p in WORKFLOWS)
    assert names == ["Flux dev 1536x1536 image (NoFlash)", "Qwen-Image 1328x1328 image (NoFlash)",
                     "Wan 2.2 5B text to video 1280x704 121 frames (NoFlash)"]
    for name in names:
        # The frontend 1.27 shows the file name as the card's title and fetches <name>.jpg as its thumbnail.
        thumb = os.path.join(ROOT, "example_workflows", name + ".jpg")
        with open(thumb, "rb") as f:
            head = f.read(3)
        assert head == b"\xff\xd8\xff", f"{thumb} is not a JPEG"
        assert 10_000 < os.path.getsize(thumb) < 200_000
        assert all(c.isalnum() or c in " .()-x" for c in name), name


def test_example_files_are_what_the_generator_writes():
    spec = importlib.util.spec_from_file_location("noflash_make_examples", os.path.join(ROOT, "docs",
                                                                                       "make_examples.py"))
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    for name, (build, _, _) in gen.WORKFLOWS.items():
        assert _load(os.path.join(ROOT, "example_workflows", name + ".json")) == json.loads(json.dumps(build()))


@pytest.mark.parametrize("path", WORKFLOWS, ids=os.path.basename)
def test_structure(path):
    wf = _load(path)
    nodes = _by_id(wf)
    assert len(nodes) == len(wf["nodes"]), "duplicate node ids"
    assert wf["last_node_id"] == max(nodes) and wf["last_link_id"] == max(link[0] for link in wf["links"])
    link_ids = [link[0] for link in wf["links"]]
    assert len(set(link_ids)) == len(link_ids), "duplicate link ids"
    for lid, src, src_slot, dst, dst_slot, type_ in wf["links"]:
        out = nodes[src]["outputs"][src_slot]
        inp = nodes[dst]["inputs"][dst_slot]
        assert lid in (out["links"] or []), (lid, nodes[src]["type"])
        assert inp["link"] == lid, (lid, nodes[dst]["type"])
        assert out["type"] == inp["type"] == type_, (lid, out["type"], inp["type"], type_)
    for node in wf["nodes"]:
        assert node["type"] in WIDGETS, f"unexpected node type {node['type']}: only core nodes and ours"
        assert len(node.get("widgets_values", [])) == WIDGETS[node["type"]], node["type"]
        for inp in node.get("inputs", []):
            assert inp["link"] is None or inp["link"] in link_ids
        for out in node.get("outputs", []):
            assert all(lid in link_ids for lid in out["links"] or [])


@pytest.mark.parametrize("path", WORKFLOWS, ids=os.path.basename)
def test_noflash_nodes_are_wired_into_the_model_path(path):
    wf = _load(path)
    nodes = _by_id(wf)
    patcher = _by_type(wf, "NoFlashAttentionPatcher")
    assert len(patcher) == 1
    assert patcher[0]["widgets_values"][0] is True
    # The sampler's model comes through the patcher.
    sampler = _by_type(wf, "KSampler")[0]
    link_of = {link[0]: link for link in wf["links"]}
    node = sampler
    chain = []
    while True:
        model_in = next((i for i in node["inputs"] if i["type"] == "MODEL" and i["link"] is not None), None)
        if model_in is None:
            break
        node = nodes[link_of[model_in["link"]][1]]
        chain.append(node["type"])
    assert "NoFlashAttentionPatcher" in chain and chain[-1] in ("UNETLoader",), chain


def _source(wf, node, input_type):
    """The node feeding ``node``'s input of ``input_type``."""
    link_of = {link[0]: link for link in wf["links"]}
    inp = next(i for i in node["inputs"] if i["type"] == input_type and i["link"] is not None)
    return _by_id(wf)[link_of[inp["link"]][1]]


@pytest.mark.parametrize("path", WORKFLOWS, ids=os.path.basename)
def test_model_files_are_declared_for_the_missing_models_dialog(path):
    # The frontend reads node.properties.models ({name, url, directory}) for models selected in a widget.
    wf = _load(path)
    for type_, folder in MODEL_FOLDERS.items():
        for node in _by_type(wf, type_):
            files = [v for v in node["widgets_values"] if isinstance(v, str) and v.endswith(".safetensors")]
            declared = node["properties"]["models"]
            assert files and sorted(m["name"] for m in declared) == sorted(files), node["type"]
            for m in declared:
                assert m["directory"] == folder
                assert m["url"].startswith("https://huggingface.co/") and m["url"].endswith("/" + m["name"])


def test_wan_workflow_is_5b_t2v_1280x704_121_frames_with_our_three_nodes():
    wf = _load(_named("Wan"))
    types = {n["type"] for n in wf["nodes"]}
    assert {"NoFlashAttentionPatcher", "NoFlashFFNChunker", "NoFlashVRAMProbe"} <= types
    latent = _by_type(wf, "Wan22ImageToVideoLatent")[0]
    assert latent["widgets_values"] == [1280, 704, 121, 1]
    assert latent["inputs"][1]["name"] == "start_image" and latent["inputs"][1]["link"] is None  # text-to-video
    assert _by_type(wf, "UNETLoader")[0]["widgets_values"][0] == "wan2.2_ti2v_5B_fp16.safetensors"
    assert _by_type(wf, "NoFlashVRAMProbe")[0]["widgets_values"] == [1280, 704, 121, 1, "wan2.2-5b",
                                                                     "this machine", 0, "auto", 256]


def test_flux_workflow_is_1536_squared_with_the_vae_patcher():
    wf = _load(_named("Flux"))
    assert _by_type(wf, "EmptySD3LatentImage")[0]["widgets_values"] == [1536, 1536, 1]
    assert _by_type(wf, "UNETLoader")[0]["widgets_values"][0] == "flux1-dev.safetensors"
    decode = _by_type(wf, "VAEDecode")[0]
    assert _source(wf, decode, "VAE")["type"] == "NoFlashVAEPatcher"


def test_qwen_image_workflow_patches_its_llm_text_encoder_and_vae():
    wf = _load(_named("Qwen"))
    assert _by_type(wf, "EmptySD3LatentImage")[0]["widgets_values"] == [1328, 1328, 1]
    assert _by_type(wf, "CLIPLoader")[0]["widgets_values"][1] == "qwen_image"
    for encode in _by_type(wf, "CLIPTextEncode"):
        assert _source(wf, encode, "CLIP")["type"] == "NoFlashCLIPPatcher"
    assert _source(wf, _by_type(wf, "VAEDecode")[0], "VAE")["type"] == "NoFlashVAEPatcher"
    probe = _by_type(wf, "NoFlashVRAMProbe")[0]  # answers from its family before the models are downloaded
    assert probe["widgets_values"][4] == "qwen-image" and all(i["link"] is None for i in probe["inputs"])


# ---- against a real ComfyUI ------------------------------------------------------------------------------------


def _runtime():
    spec = importlib.util.spec_from_file_location("noflash_comfy_runtime",
                                                  os.path.join(ROOT, "tests", "comfy", "comfy_runtime.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # registered before it runs, as an import would (its dataclasses need it)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def live_nodes(tmp_path_factory):
    rt = _runtime()
    if rt.comfyui_path() is None:
        pytest.skip("COMFYUI_PATH is not set to a ComfyUI checkout")
    rt.setup_comfyui()
    rt.load_core_nodes()
    rt.load_pack(str(tmp_path_factory.mktemp("wf_base")))
    import nodes

    return nodes.NODE_CLASS_MAPPINGS


DYNAMIC_COMBO = "COMFY_DYNAMICCOMBO_V3"  # a combo whose chosen option brings its own inputs (newer V3 nodes)


def _is_widget(type_) -> bool:
    return isinstance(type_, list) or type_ in WIDGET_TYPES or type_ == DYNAMIC_COMBO


def _live_inputs(cls):
    """``[(name, type, options, is_widget, required)]`` from a node class's INPUT_TYPES (V1 and V3 nodes both have
    it), top level only."""
    spec = cls.INPUT_TYPES()
    out = []
    for section in ("required", "optional"):
        for name, value in (spec.get(section) or {}).items():
            type_ = value[0]
            options = value[1] if len(value) > 1 and isinstance(value[1], dict) else {}
            out.append((name, "COMBO" if isinstance(type_, list) else type_, options, _is_widget(type_),
                        section == "required"))
    return out


def _widget_default(type_, options):
    """The value the frontend gives a widget a saved workflow has no value for; ``_NO_DEFAULT`` if none."""
    if "default" in options:
        return options["default"]
    if type_ == DYNAMIC_COMBO and options.get("options"):
        return options["options"][0]["key"]
    if isinstance(type_, list) and type_:
        return type_[0]
    return _NO_DEFAULT


_NO_DEFAULT = object()


def _live_widgets(spec, values):
    """The widgets in the order the frontend serializes their values: ``[(name, default, required)]``, with a
    dynamic combo's nested widgets (those of the option ``values`` chooses, else its default) after it."""
    widgets = []
    for section in ("required", "optional"):
        for name, value in (spec.get(section) or {}).items():
            type_ = value[0]
            options = value[1] if len(value) > 1 and isinstance(value[1], dict) else {}
            if not _is_widget(type_):
                continue
            default = _widget_default(type_, options)
            widgets.append((name, default, section == "required"))
            if options.get("control_after_generate"):
                widgets.append((name + ".control_after_generate", "fixed", section == "required"))
            if type_ == DYNAMIC_COMBO:
                chosen = values[len(widgets) - 1] if len(widgets) <= len(values) else default
                option = next((o for o in options["options"] if o["key"] == chosen), None)
                assert option is not None, (name, chosen)
                widgets += _live_widgets(option["inputs"], values[len(widgets):])
    return widgets


def _check_widgets(node, cls):
    """The saved widget values fill the live widgets in order; widgets the workflow predates (a newer ComfyUI
    adds them at the end: ``CreateVideo``'s ``bit_depth`` in 0.33) must have a default the frontend fills in."""
    values = node.get("widgets_values", [])
    live = _live_widgets(cls.INPUT_TYPES(), values)
    if node["type"].startswith("NoFlash"):  # the pack's own nodes: the same widgets on every version
        assert len(values) == len(live), (node["type"], values, [w[0] for w in live])
    assert len(values) <= len(live), (node["type"], values, [w[0] for w in live])
    for name, default, _ in live[len(values):]:
        assert default is not _NO_DEFAULT, (node["type"], f"{name} is new and has no default")


@pytest.mark.parametrize("path", WORKFLOWS, ids=os.path.basename)
def test_against_live_node_list(path, live_nodes):
    wf = _load(path)
    nodes = _by_id(wf)
    for node in wf["nodes"]:
        if node["type"] in FRONTEND_ONLY:
            continue
        assert node["type"] in live_nodes, f"{node['type']} is not a node of this ComfyUI"
        cls = live_nodes[node["type"]]
        _check_widgets(node, cls)
        connections = {name: type_ for name, type_, _, widget, _ in _live_inputs(cls) if not widget}
        for inp in node["inputs"]:
            assert inp["name"] in connections, (node["type"], inp["name"])
            assert inp["type"] == connections[inp["name"]], (node["type"], inp["name"])
        # Saved outputs come first in the same order; a newer ComfyUI may add outputs after them (``SaveImage``
        # returns its IMAGE in 0.33); the static WIDGETS table and test_structure pin the saved ones.
        returns = list(cls.RETURN_TYPES)
        saved = [o["type"] for o in node["outputs"]]
        assert saved == (returns if node["type"].startswith("NoFlash") else returns[:len(saved)]), node["type"]
        required = {name for name, _, _, widget, req in _live_inputs(cls) if not widget and req}
        linked = {i["name"] for i in node["inputs"] if i["link"] is not None}
        assert required <= linked, (node["type"], required - linked)
    for _, src, src_slot, _dst, _, type_ in wf["links"]:
        assert list(live_nodes[nodes[src]["type"]].RETURN_TYPES)[src_slot] == type_
