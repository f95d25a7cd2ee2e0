"""Write the example workflows in ``example_workflows/`` and their template thumbnails.

Run from the repository root: ``python docs/make_examples.py`` (needs Pillow for the thumbnails).

ComfyUI's frontend 1.27 lists a custom-node template by its file name (title, and description with ``-``/``_`` read
as spaces) and fetches ``<name>.jpg`` next to it as the card's thumbnail, so the names are written to be read. Every
loader node declares its model files in the frontend's standard ``properties.models`` list (name, url, directory):
the frontend checks them against the model folders and offers the missing-models dialog with download links.

Each thumbnail is the VRAM Probe's picture for that workflow on the gfx1030 (RX 6800, 16 GiB) profile, drawn from
:func:`noflash_core.vram.estimate_run`, the numbers the node shows, with its verdict line. Every template
follows that verdict (``tests/test_templates_follow_probe.py``): the Wan template decodes with VAE Decode (Tiled).
Each template's probe has its family set and nothing connected, so it answers before the models are downloaded; a
note says so. Nodes are placed so that none overlaps another, also once the probe draws its bars (checked in the
browser by ``tests/comfy/test_comfyui_browser_ui.py``).
"""

from __future__ import annotations

import itertools
import json
import os
import sys
import textwrap
from typing import Dict, List, Optional, Sequence, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "example_workflows")

FLUX = "Flux dev 1536x1536 image (NoFlash)"
WAN = "Wan 2.2 5B text to video 1280x704 121 frames (NoFlash)"
QWEN = "Qwen-Image 1328x1328 image (NoFlash)"

_HF = "https://huggingface.co/"
MODELS = {
    "flux1-dev.safetensors": ("diffusion_models", _HF + "Comfy-Org/flux1-dev/resolve/main/flux1-dev.safetensors"),
    "clip_l.safetensors": ("text_encoders", _HF + "comfyanonymous/flux_text_encoders/resolve/main/clip_l.safetensors"),
    "t5xxl_fp16.safetensors": ("text_encoders",
                               _HF + "comfyanonymous/flux_text_encoders/resolve/main/t5xxl_fp16.safetensors"),
    "ae.safetensors": ("vae",
                       _HF + "Comfy-Org/Lumina_Image_2.0_Repackaged/resolve/main/split_files/vae/ae.safetensors"),
    "wan2.2_ti2v_5B_fp16.safetensors": (
        "diffusion_models",
        _HF + "Comfy-Org/Wan_2.2_ComfyUI_Repackaged/resolve/main/split_files/diffusion_models/"
        "wan2.2_ti2v_5B_fp16.safetensors"),
    "umt5_xxl_fp8_e4m3fn_scaled.safetensors": (
        "text_encoders",
        _HF + "Comfy-Org/Wan_2.1_ComfyUI_repackaged/resolve/main/split_files/text_encoders/"
        "umt5_xxl_fp8_e4m3fn_scaled.safetensors"),
    "wan2.2_vae.safetensors": (
        "vae", _HF + "Comfy-Org/Wan_2.2_ComfyUI_Repackaged/resolve/main/split_files/vae/wan2.2_vae.safetensors"),
    "qwen_image_fp8_e4m3fn.safetensors": (
        "diffusion_models",
        _HF + "Comfy-Org/Qwen-Image_ComfyUI/resolve/main/split_files/diffusion_models/"
        "qwen_image_fp8_e4m3fn.safetensors"),
    "qwen_2.5_vl_7b_fp8_scaled.safetensors": (
        "text_encoders",
        _HF + "Comfy-Org/Qwen-Image_ComfyUI/resolve/main/split_files/text_encoders/"
        "qwen_2.5_vl_7b_fp8_scaled.safetensors"),
    "qwen_image_vae.safetensors": (
        "vae", _HF + "Comfy-Org/Qwen-Image_ComfyUI/resolve/main/split_files/vae/qwen_image_vae.safetensors"),
}
"""Model files: folder and download address (the addresses ComfyUI's own templates use)."""


class Workflow:
    """A LiteGraph workflow (version 0.4) built node by node."""

    def __init__(self) -> None:
        self.nodes: List[dict] = []
        self.links: List[list] = []
        self._link_id = itertools.count(1)

    def node(self, nid: int, type_: str, pos: Tuple[int, int], size: Tuple[int, int], widgets: Optional[list],
             inputs: Sequence[Tuple[str, str]] = (), outputs: Sequence[Tuple[str, str]] = (),
             title: Optional[str] = None, models: Sequence[str] = ()) -> dict:
        n = {"id": nid, "type": type_, "pos": list(pos), "size": list(size), "flags": {}, "order": len(self.nodes),
             "mode": 0, "inputs": [{"name": name, "type": t, "link": None} for name, t in inputs],
             "outputs": [{"name": name, "type": t, "links": []} for name, t in outputs],
             "properties": {"Node name for S&R": type_}}
        if widgets is not None:
            n["widgets_values"] = widgets
        if title:
            n["title"] = title
        if models:
            n["properties"]["models"] = [{"name": m, "url": MODELS[m][1], "directory": MODELS[m][0]} for m in models]
        self.nodes.append(n)
        return n

    def link(self, src: int, slot: int, dst: int, name: str) -> None:
        s = next(n for n in self.nodes if n["id"] == src)
        d = next(n for n in self.nodes if n["id"] == dst)
        dslot = next(i for i, inp in enumerate(d["inputs"]) if inp["name"] == name)
        lid = next(self._link_id)
        s["outputs"][slot]["links"].append(lid)
        d["inputs"][dslot]["link"] = lid
        self.links.append([lid, src, slot, dst, dslot, s["outputs"][slot]["type"]])

    def wire(self, edges: str) -> None:
        """Link from first outputs, in order: ``edges`` is space-separated ``"src>dst.input"``."""
        for edge in edges.split():
            src, target = edge.split(">")
            dst, name = target.split(".")
            self.link(int(src), 0, int(dst), name)

    def to_json(self, offset=(60, 60), scale=0.7) -> dict:
        for n in self.nodes:
            for o in n["outputs"]:
                o["links"] = o["links"] or None
        return {"last_node_id": max(n["id"] for n in self.nodes), "last_link_id": len(self.links),
                "nodes": self.nodes, "links": self.links, "groups": [], "config": {},
                "extra": {"ds": {"scale": scale, "offset": list(offset)}}, "version": 0.4}


M, C, V, L, CO, IM = "MODEL", "CLIP", "VAE", "LATENT", "CONDITIONING", "IMAGE"
PATCHER = [True, 1024, 0]  # enabled, min_tokens, budget_mb (0 = automatic)


PROBE_NOTE = (
    "**Will it fit? Ask before downloading.** The VRAM Probe is not wired to the loaders: it answers from its "
    "*family* setting alone, so it runs even while the loaders still miss their files (Run shows their errors "
    "and the probe's picture). Pick your card in *device*. Once the models are there, connect the probe's *model* "
    "and *clip* inputs to estimate for the files you loaded (their dtype and text encoders).")
"""The note next to each template's probe (issue: planning before downloading)."""

PROBE_SIZE = (480, 440)
"""The probe's size in the file; the frontend sizes it to its widgets (wider with the report, taller with bars)."""


def _probe_and_note(wf: Workflow, nid: int, pos: Tuple[int, int], run: Tuple[int, int, int], family: str,
                    note_box: Tuple[int, int], note: str) -> None:
    """The VRAM Probe (node ``nid``) for a ``(width, height, frames)`` run of ``family``, answering from the family
    alone (nothing connected); the template's Markdown note (``nid + 1``) in the left column at ``note_box = (y,
    height)`` and the probe note (``nid + 2``) under it."""
    wf.node(nid, "NoFlashVRAMProbe", pos, PROBE_SIZE, [*run, 1, family, "this machine", 0, "auto", 256],
            [("model", M), ("clip", C)], [("report", "STRING")])
    wf.node(nid + 1, "MarkdownNote", (0, note_box[0]), (330, note_box[1]), [note])
    wf.node(nid + 2, "MarkdownNote", (0, note_box[0] + note_box[1] + 50), (330, 190), [PROBE_NOTE],
            title="Before downloading")


def _base(unet: str, text_encoders: Sequence[str], clip_type: str, vae: str) -> Workflow:
    """Nodes 1-3: diffusion model, text encoder(s) (two: ``DualCLIPLoader``) and VAE loaders; node 4: the
    Attention Patcher (not yet linked)."""
    wf = Workflow()
    wf.node(1, "UNETLoader", (0, 0), (330, 82), [unet, "default"], outputs=[("MODEL", M)], models=[unet])
    dual = len(text_encoders) == 2
    wf.node(2, "DualCLIPLoader" if dual else "CLIPLoader", (0, 130), (330, 130 if dual else 106),
            [*text_encoders, clip_type, "default"], outputs=[("CLIP", C)], models=list(text_encoders))
    wf.node(3, "VAELoader", (0, 310 if dual else 290), (330, 58), [vae], outputs=[("VAE", V)], models=[vae])
    wf.node(4, "NoFlashAttentionPatcher", (380, 0), (300, 130), PATCHER + ["off"], [("model", M)], [("model", M)])
    return wf


TILED_DECODE = [512, 64, 64, 8]  # tile_size, overlap, temporal_size, temporal_overlap (ComfyUI's defaults)


def _sample_decode(wf: Workflow, nid: int, x: int, sampler: list, tiled: bool = False) -> None:
    """``KSampler`` (node ``nid``) at column ``x`` and the ``VAEDecode`` (``nid + 1``; ``VAEDecodeTiled`` when
    ``tiled``) right of it."""
    wf.node(nid, "KSampler", (x, 0), (300, 262), sampler,
            [("model", M), ("positive", CO), ("negative", CO), ("latent_image", L)], [("LATENT", L)])
    if tiled:
        wf.node(nid + 1, "VAEDecodeTiled", (x + 350, 0), (300, 150), TILED_DECODE, [("samples", L), ("vae", V)],
                [("IMAGE", IM)])
    else:
        wf.node(nid + 1, "VAEDecode", (x + 350, 0), (210, 46), None, [("samples", L), ("vae", V)], [("IMAGE", IM)])


def flux() -> dict:
    wf = _base("flux1-dev.safetensors", ("clip_l.safetensors", "t5xxl_fp16.safetensors"), "flux", "ae.safetensors")
    wf.node(5, "NoFlashVAEPatcher", (380, 180), (300, 130), PATCHER, [("vae", V)], [("vae", V)])
    wf.node(6, "CLIPTextEncode", (730, 0), (400, 160), [
        "A detailed botanical illustration of a fern unrolling, ink and watercolor on cream paper, ultra sharp."],
        [("clip", C)], [("CONDITIONING", CO)])
    wf.node(7, "FluxGuidance", (730, 210), (260, 58), [3.5], [("conditioning", CO)], [("CONDITIONING", CO)])
    wf.node(8, "ConditioningZeroOut", (730, 310), (260, 26), None, [("conditioning", CO)], [("CONDITIONING", CO)])
    wf.node(9, "EmptySD3LatentImage", (730, 390), (260, 106), [1536, 1536, 1], outputs=[("LATENT", L)])
    _sample_decode(wf, 10, 1180, [42, "fixed", 20, 1, "euler", "simple", 1])
    wf.node(12, "SaveImage", (1530, 100), (400, 420), ["noflash_flux_1536"], [("images", IM)])
    _probe_and_note(wf, 13, (380, 580), (1536, 1536, 1), "flux", (420, 300), (
        "**Flux.1 dev at 1536x1536 with NoFlash**\n\n"
        "- **Attention Patcher**: 9,216 image + 256 text tokens per attention call run in exact tiles.\n"
        "- **VAE Patcher**: the VAE's mid-block attention has 36,864 tokens at this size; ComfyUI's split "
        "attention holds 5 GiB fp32 score slices twice, noflash's tiles a few MiB.\n"
        "- **VRAM Probe**: pick your card in *device* and queue; the bars show each part against its VRAM.\n\n"
        "Missing models? The loaders list their download links (ComfyUI offers them when the workflow opens)."))
    wf.wire("1>4.model 3>5.vae 2>6.clip 6>7.conditioning 6>8.conditioning 4>10.model 7>10.positive "
            "8>10.negative 9>10.latent_image 10>11.samples 5>11.vae 11>12.images")
    return wf.to_json()


def wan() -> dict:
    wf = _base("wan2.2_ti2v_5B_fp16.safetensors", ("umt5_xxl_fp8_e4m3fn_scaled.safetensors",), "wan",
             "wan2.2_vae.safetensors")
    wf.node(5, "NoFlashFFNChunker", (380, 180), (300, 60), [0], [("model", M)], [("model", M)])
    wf.node(6, "ModelSamplingSD3", (380, 290), (300, 58), [8], [("model", M)], [("MODEL", M)])
    wf.node(7, "CLIPTextEncode", (730, 0), (420, 160), [
        "A red fox trots through fresh snow in a birch forest at sunrise, soft golden light, slow tracking shot."],
        [("clip", C)], [("CONDITIONING", CO)])
    wf.node(8, "CLIPTextEncode", (730, 210), (420, 160),
            ["blurry, low quality, static, watermark, text, distorted"], [("clip", C)], [("CONDITIONING", CO)])
    wf.node(9, "Wan22ImageToVideoLatent", (1200, 330), (300, 150), [1280, 704, 121, 1],
            [("vae", V), ("start_image", IM)], [("LATENT", L)])
    _sample_decode(wf, 10, 1200, [42, "fixed", 20, 5, "uni_pc", "simple", 1], tiled=True)
    wf.node(12, "CreateVideo", (1550, 230), (270, 78), [24], [("images", IM), ("audio", "AUDIO")], [("VIDEO", "VIDEO")])
    wf.node(13, "SaveVideo", (1550, 370), (320, 300), ["video/noflash_wan22_5b", "auto", "auto"], [("video", "VIDEO")])
    _probe_and_note(wf, 14, (380, 440), (1280, 704, 121), "wan2.2-5b", (400, 300), (
        "**Wan 2.2 TI2V 5B, 1280x704, 121 frames, with NoFlash**\n\n"
        "27,280 tokens per attention call. ComfyUI's sub-quadratic attention sizes its chunks to free memory; torch's "
        "math SDPA (where ComfyUI uses PyTorch attention without a fused kernel) would need 66.7 GiB for one call. "
        "**Attention Patcher** runs the calls in exact tiles, **FFN Chunker** splits the 14,336-wide feed-forward.\n\n"
        "The **VRAM Probe** shows denoise, text encoder and VAE decode against your card. Decoding 121 frames at "
        "once takes 17.2 GiB on a 16 GiB card, with or without the VAE Patcher (the probe shows both), so this "
        "workflow decodes with **VAE Decode (Tiled)**, as the probe's verdict says."))
    wf.wire("1>4.model 4>5.model 5>6.model 2>7.clip 2>8.clip 3>9.vae 6>10.model "
            "7>10.positive 8>10.negative 9>10.latent_image 10>11.samples 3>11.vae 11>12.images 12>13.video")
    return wf.to_json()


def qwen() -> dict:
    wf = _base("qwen_image_fp8_e4m3fn.safetensors", ("qwen_2.5_vl_7b_fp8_scaled.safetensors",), "qwen_image",
             "qwen_image_vae.safetensors")
    wf.node(5, "ModelSamplingAuraFlow", (380, 180), (300, 58), [3.1], [("model", M)], [("MODEL", M)])
    wf.node(6, "NoFlashCLIPPatcher", (380, 290), (300, 130), PATCHER, [("clip", C)], [("clip", C)])
    wf.node(7, "NoFlashVAEPatcher", (380, 470), (300, 130), PATCHER, [("vae", V)], [("vae", V)])
    wf.node(8, "CLIPTextEncode", (730, 0), (420, 180), [
        "A cozy bookshop at dusk, warm window light spilling onto a rainy cobblestone street, a hand-painted sign "
        "above the door reads \"NoFlash Books\", a ginger cat asleep on a stack of atlases, cinematic, detailed."],
        [("clip", C)], [("CONDITIONING", CO)])
    wf.node(9, "CLIPTextEncode", (730, 230), (420, 120), [""], [("clip", C)], [("CONDITIONING", CO)])
    wf.node(10, "EmptySD3LatentImage", (730, 400), (300, 106), [1328, 1328, 1], outputs=[("LATENT", L)])
    _sample_decode(wf, 11, 1200, [42, "fixed", 20, 2.5, "euler", "simple", 1])
    wf.node(13, "SaveImage", (1550, 100), (400, 420), ["noflash_qwen_image"], [("images", IM)])
    _probe_and_note(wf, 14, (730, 580), (1328, 1328, 1), "qwen-image", (400, 320), (
        "**Qwen-Image at 1328x1328 with NoFlash**\n\n"
        "- **CLIP Patcher**: the Qwen2.5-VL 7B text encoder runs ComfyUI's attention_basic on GPUs without PyTorch "
        "attention (RDNA1/2, gfx906, MPS): full fp32 scores for all 28 heads per layer. Long prompts (min_tokens "
        "1024 and up) go through noflash's tiles instead; set min_tokens 0 to route every call.\n"
        "- **VAE Patcher**: 27,556 tokens at the VAE's mid-block; split attention holds 5.7 GiB of scores.\n"
        "- **Attention Patcher**: 6,889 image + prompt tokens per call.\n\n"
        "The **VRAM Probe**: pick your card in *device* and queue."))
    wf.wire("1>4.model 4>5.model 2>6.clip 3>7.vae 6>8.clip 6>9.clip 5>11.model "
            "8>11.positive 9>11.negative 10>11.latent_image 11>12.samples 7>12.vae 12>13.images")
    return wf.to_json()


WORKFLOWS = {
    FLUX: (flux, ("flux", 1536, 1536, 1), {}),
    WAN: (wan, ("wan2.2-5b", 1280, 704, 121), {"text_encoder_weights": "fp8"}),
    QWEN: (qwen, ("qwen-image", 1328, 1328, 1), {"weights": "fp8", "text_encoder_weights": "fp8"}),
}
"""Workflow builder, the estimate's size, and the weight formats of the files the workflow loads."""


# ---------------------------------------------------------------------------------------------- thumbnails


def _font(size: int, bold: bool = False):
    from PIL import ImageFont

    name = "DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf"
    for folder in ("/usr/share/fonts/truetype/dejavu", "/usr/share/fonts/dejavu", "/Library/Fonts"):
        path = os.path.join(folder, name)
        if os.path.exists(path):
            return ImageFont.truetype(path, size)
    return ImageFont.load_default()


def thumbnail(title: str, chart: Dict, path: str, size: Tuple[int, int] = (480, 360)) -> None:
    """The probe's bars for ``chart`` (``RunEstimate.to_chart()``) as a JPEG card."""
    from PIL import Image, ImageDraw

    w, h = size
    img = Image.new("RGB", size, "#1e1f22")
    d = ImageDraw.Draw(img)
    d.text((16, 12), title.replace(" (NoFlash)", ""), fill="#f0f0f0", font=_font(17, True))
    d.text((16, 38), f"NoFlash VRAM Probe · {chart['device']['key']} · 16 GiB", fill="#9aa0a6", font=_font(12))
    colors = {"comfy": "#d9822b", "noflash": "#2f80ed", None: "#7d8590"}
    rows = [c for c in chart["components"] if c["kind"] == "total"]
    vram = chart["vram_bytes"]
    scale = max(vram * 1.12, min(max(c["bytes"] for c in rows) * 1.05, vram * 1.6))
    x0, x1, y = 170, w - 70, 70
    vx = x0 + int(vram / scale * (x1 - x0))
    label_font, value_font = _font(12), _font(11)
    for c in rows:
        label = f"{c['phase']} · {'ComfyUI' if c['path'] == 'comfy' else 'noflash'}"
        d.text((16, y + 2), label, fill="#dddddd", font=label_font)
        frac = min(1.0, c["bytes"] / scale)
        end = x0 + max(2, int(frac * (x1 - x0)))
        d.rectangle([x0, y + 2, end, y + 18], fill=colors[c["path"]])
        value = ("» " if c["bytes"] > scale else "") + f"{c['bytes'] / 2**30:.1f} GiB"
        vx0 = end + 5
        if vx0 - 3 <= vx <= vx0 + d.textlength(value, font=value_font) + 3:
            vx0 = vx + 5  # past the VRAM line, never across it
        d.text((vx0, y + 3), value, fill="#e5484d" if c["bytes"] > vram else "#dddddd", font=value_font)
        y += 40 if c["path"] == "noflash" else 24
    for yy in range(64, y - 10, 8):
        d.line([vx, yy, vx, yy + 4], fill="#e5e5e5", width=1)
    d.text((vx - 30, y - 8), "VRAM 16 GiB", fill="#e5e5e5", font=value_font)
    verdict_colors = {"fits": "#3fb950", "noflash": "#f0b429", "no": "#ff6b6b"}
    lines = textwrap.wrap(chart.get("verdict_text") or "", 62)[:2]
    for i, line in enumerate(lines):  # the verdict, which names the fix
        d.text((16, y + 14 + 16 * i), line, fill=verdict_colors.get(chart.get("verdict"), "#dddddd"),
               font=_font(12, True))
    d.rectangle([16, h - 28, 26, h - 18], fill=colors["comfy"])
    d.text((32, h - 30), "ComfyUI's attention", fill="#9aa0a6", font=value_font)
    d.rectangle([170, h - 28, 180, h - 18], fill=colors["noflash"])
    d.text((186, h - 30), "noflash", fill="#9aa0a6", font=value_font)
    img.save(path, "JPEG", quality=88)


def main() -> int:
    sys.path.insert(0, ROOT)
    from noflash_core.vram import estimate_run

    os.makedirs(OUT, exist_ok=True)
    for name, (build, (family, width, height, frames), formats) in WORKFLOWS.items():
        with open(os.path.join(OUT, name + ".json"), "w", encoding="utf-8") as f:
            json.dump(build(), f, indent=1, ensure_ascii=False)
            f.write("\n")
        chart = estimate_run(family, width, height, frames=frames, device="gfx1030", **formats).to_chart()
        thumbnail(name, chart, os.path.join(OUT, name + ".jpg"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
