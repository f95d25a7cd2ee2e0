"""Headless Chromium against a real ComfyUI server serving its pinned frontend: after a run, every NoFlash node
carries the badge (active tier, peak memory), the NoFlash bottom-panel tab lists the run, and the VRAM Probe draws
its picture (bars against the card's VRAM, a verdict), keeps it across a page reload and shows the full report on
demand. The example workflows load as templates with thumbnails and offer their models where the frontend lists
missing models (a dialog in frontend 1.27, ComfyUI 0.3.64; the errors panel in 1.49, ComfyUI 0.33).

Needs ``COMFYUI_PATH``, Chromium (``/usr/bin/chromium`` or ``CHROMIUM``) and the frontend package that ComfyUI's
requirements.txt pins: from site-packages, or from ``COMFYUI_FRONTEND_PATH``, a ``pip install --no-deps --target``
folder put first on the server's path (so two ComfyUI versions can be tested from one environment). It skips
otherwise (it fails instead with ``NOFLASH_REQUIRE_BROWSER=1``, as CI sets it). The screenshots
are written to ``docs/badge.png`` and ``docs/probe.png`` when ``NOFLASH_SCREENSHOT`` is ``1`` (or to the test's temp
dir otherwise).
The browser is driven over the DevTools protocol with aiohttp (a ComfyUI dependency), so nothing else is needed.
"""

from __future__ import annotations

import asyncio
import base64
import glob
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request

import pytest
from browser import CHROMIUM
from browser import free_port as _free_port
from browser import get_json as _get_json
from browser import stop as _stop
from browser import wait_http as _wait_http
from comfy_runtime import (
    REPO_ROOT,
    comfyui_path,
    frontend_versions,
    make_custom_nodes_dir,
    save_state_dict,
    server_pythonpath,
    tiny_clip_l_state_dict,
    tiny_sd3_state_dict,
)


def _workflow(unet: str, clip: str) -> dict:
    """Tiny SD3-style model → Attention Patcher → Tier Selector (T2) → KSampler → SaveLatent, plus a VRAM Probe."""
    nodes = []
    links = []
    link_id = itertools.count(1)

    def node(nid, type_, pos, size, widgets, inputs=(), outputs=(), title=None):
        n = {"id": nid, "type": type_, "pos": list(pos), "size": list(size), "flags": {}, "order": nid, "mode": 0,
             "inputs": [{"name": name, "type": t, "link": None} for name, t in inputs],
             "outputs": [{"name": name, "type": t, "links": []} for name, t in outputs],
             "properties": {"Node name for S&R": type_}, "widgets_values": widgets}
        if title:
            n["title"] = title
        nodes.append(n)

    def link(src, slot, dst, name):
        s = next(n for n in nodes if n["id"] == src)
        d = next(n for n in nodes if n["id"] == dst)
        dslot = next(i for i, inp in enumerate(d["inputs"]) if inp["name"] == name)
        lid = next(link_id)
        s["outputs"][slot]["links"].append(lid)
        d["inputs"][dslot]["link"] = lid
        links.append([lid, src, slot, dst, dslot, s["outputs"][slot]["type"]])

    node(1, "UNETLoader", (20, 60), (300, 82), [unet, "default"], outputs=[("MODEL", "MODEL")])
    node(2, "NoFlashAttentionPatcher", (360, 60), (300, 130), [True, 0, 0], [("model", "MODEL")],
         [("model", "MODEL")])
    node(3, "NoFlashTierSelector", (700, 60), (300, 130), ["2", 0, 0], [("model", "MODEL")], [("model", "MODEL")])
    node(4, "CLIPLoader", (20, 240), (300, 106), [clip, "stable_diffusion", "default"], outputs=[("CLIP", "CLIP")])
    node(5, "CLIPTextEncode", (360, 260), (300, 100), ["a red fox in snow"], [("clip", "CLIP")],
         [("CONDITIONING", "CONDITIONING")], title="Positive")
    node(6, "CLIPTextEncode", (700, 260), (300, 100), ["blurry"], [("clip", "CLIP")],
         [("CONDITIONING", "CONDITIONING")], title="Negative")
    node(7, "EmptySD3LatentImage", (20, 400), (300, 106), [64, 64, 1], outputs=[("LATENT", "LATENT")])
    node(8, "KSampler", (1040, 60), (280, 262), [0, "fixed", 2, 3.0, "euler", "simple", 1.0],
         [("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
          ("latent_image", "LATENT")], [("LATENT", "LATENT")])
    node(9, "SaveLatent", (1040, 360), (280, 58), ["latents/noflash_badge"], [("samples", "LATENT")])
    node(10, "NoFlashVRAMProbe", (1360, 60), (480, 560), [1536, 1536, 1, 1, "flux", "gfx1030", 0, "auto", 256],
         [("model", "MODEL"), ("clip", "CLIP")], [("report", "STRING")])
    link(1, 0, 2, "model")
    link(2, 0, 3, "model")
    link(3, 0, 8, "model")
    link(2, 0, 10, "model")
    link(4, 0, 10, "clip")
    link(4, 0, 5, "clip")
    link(4, 0, 6, "clip")
    link(5, 0, 8, "positive")
    link(6, 0, 8, "negative")
    link(7, 0, 8, "latent_image")
    link(8, 0, 9, "samples")
    for n in nodes:
        for o in n["outputs"]:
            o["links"] = o["links"] or None
    return {"last_node_id": 10, "last_link_id": len(links), "nodes": nodes, "links": links, "groups": [],
            "config": {}, "extra": {"ds": {"scale": 0.85, "offset": [0, 50]}}, "version": 0.4}


class _DevTools:
    """Minimal Chrome DevTools protocol client (one page) on aiohttp's websocket client."""

    def __init__(self, ws):
        self.ws = ws
        self.ids = itertools.count(1)

    async def send(self, method: str, **params):
        msg_id = next(self.ids)
        await self.ws.send_json({"id": msg_id, "method": method, "params": params})
        while True:
            msg = await self.ws.receive_json(timeout=120)
            if msg.get("id") == msg_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    async def js(self, expression: str):
        result = await self.send("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"JS error: {json.dumps(result['exceptionDetails'])[:2000]}")
        return result.get("result", {}).get("value")

    async def wait_js(self, expression: str, timeout: float, what: str):
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                value = await self.js(expression)
            except RuntimeError as exc:  # the page is navigating (a reload): ask again
                if "navigated" not in str(exc) and "context" not in str(exc):
                    raise
                value = None
            if value:
                return value
            await asyncio.sleep(0.5)
        raise TimeoutError(f"timed out waiting for {what}")


_BADGES_JS = """
(() => {
  const app = window.comfyAPI.app.app;
  return app.graph._nodes
    .filter((n) => String(n.comfyClass ?? n.type).startsWith("NoFlash"))
    .map((n) => ({type: n.comfyClass ?? n.type,
                  badges: (n.badges ?? []).map((b) => (typeof b === "function" ? b() : b)?.text ?? "")}));
})()
"""


_EXAMPLES = sorted(glob.glob(os.path.join(REPO_ROOT, "example_workflows", "*.json")))

# Each example workflow as the frontend sees it: node types and widget values after a load and re-serialize, and
# the widget values of a fresh node of the same type (the defaults the frontend gives widgets a workflow predates).
_CHECK_LOADED_JS = """
(() => {
  const app = window.comfyAPI.app.app;
  const fresh = (type) => {
    const n = window.LiteGraph.createNode(type);
    return n ? (n.serialize().widgets_values ?? []) : null;
  };
  return app.graph._nodes.map((n) => ({id: n.id, type: n.type, widgets: n.serialize().widgets_values ?? [],
                                       fresh: fresh(n.type)}));
})()
"""

# loadGraphData's last argument: frontend 1.27 reads show*Dialog, 1.49 reads silentAssetErrors (missing models go
# to a store and an errors panel there); each ignores the other's keys.
_QUIET = "{showMissingNodesDialog: false, showMissingModelsDialog: false, silentAssetErrors: true}"


async def _check_examples(dt) -> dict:
    seen = {}
    for path in _EXAMPLES:
        with open(path, encoding="utf-8") as f:
            wf = json.load(f)
        await dt.js(f"window.comfyAPI.app.app.loadGraphData({json.dumps(wf)}, true, true, null, {_QUIET})"
                    ".then(() => true)")
        seen[os.path.basename(path)] = (wf, await dt.js(_CHECK_LOADED_JS))
    return seen


_READY_JS = ("!!(window.comfyAPI && window.comfyAPI.app && window.comfyAPI.app.app && "
             "window.comfyAPI.app.app.vueAppReady && window.comfyAPI.app.app.graph && "
             "window.comfyAPI.app.app.extensions.some((e) => e.name === 'noflash.status'))")

# The probe node's estimate (kept in its properties), its chart widget, and its size.
_PROBE_JS = """
(() => {
  const graph = window.comfyAPI?.app?.app?.graph;
  const n = graph && graph._nodes.find((x) => x.comfyClass === 'NoFlashVRAMProbe');
  const e = n && n.properties && n.properties.noflash_estimate;
  if (!e || !e.components || !e.components.length) return null;
  return {verdict: e.verdict, verdict_text: e.verdict_text, vram: e.vram_bytes, device: e.device.key,
          components: e.components.map((c) => [c.name, c.bytes]), text: e.text,
          widgets: n.widgets.map((w) => w.name), size: [...n.size],
          saved: n.serialize().properties.noflash_estimate ? true : false,
          widgets_values: n.serialize().widgets_values};
})()
"""


async def _probe_screenshot(dt, path: str) -> None:
    """Close the bottom panel, bring the probe node to the top left at zoom 1 and capture just it."""
    await dt.js("window.comfyAPI.app.app.extensionManager.command.execute("
                "'Workspace.ToggleBottomPanelTab.noflash-runs').then(() => true)")
    rect = await dt.js("""
(() => {
  const app = window.comfyAPI.app.app;
  const n = app.graph._nodes.find((x) => x.comfyClass === 'NoFlashVRAMProbe');
  app.canvas.ds.scale = 1;
  app.canvas.ds.offset = [-n.pos[0] + 30, -n.pos[1] + 50];
  app.graph.setDirtyCanvas(true, true);
  const r = app.canvas.canvas.getBoundingClientRect();
  return {x: r.left + 10, y: r.top + 10, width: n.size[0] + 40, height: n.size[1] + 60};
})()""")
    await dt.js("new Promise((r) => setTimeout(() => r(true), 800))")
    shot = await dt.send("Page.captureScreenshot", format="png", clip={**rect, "scale": 1})
    with open(path, "wb") as f:
        f.write(base64.b64decode(shot["data"]))


async def _toggle_report(dt) -> dict:
    """Press the probe's "show full report" button twice: the node grows to show the text, then shrinks back."""
    press = """
(() => {
  const n = window.comfyAPI.app.app.graph._nodes.find((x) => x.comfyClass === 'NoFlashVRAMProbe');
  const b = n.widgets.find((w) => w.type === 'button');
  const before = n.size[1];
  b.callback(b, window.comfyAPI.app.app.canvas, n);
  return {label: b.name, show: !!n.properties.noflash_show_report, before, after: n.size[1]};
})()"""
    opened = await dt.js(press)
    await dt.js("new Promise((r) => setTimeout(() => r(true), 300))")
    closed = await dt.js(press)
    return {"opened": opened, "closed": closed}


# Where the frontend lists a workflow's missing models, whichever way it has: frontend 1.27 opens a dialog; 1.49
# keeps them in its "missingModel" store and lists them in the errors tab of the right-side panel, which the
# overlay's "View details" opens (pressed here as a user would).
_MISSING_MODELS_JS = """
(() => {
  const file = 'qwen_image_fp8_e4m3fn.safetensors';
  const dialog = [...document.querySelectorAll('[role=dialog], .p-dialog')].map((x) => x.innerText).join('\\n');
  if (dialog.includes(file)) return {ui: 'dialog', text: dialog};
  const pinia = document.querySelector('#vue-app')?.__vue_app__?.config.globalProperties.$pinia;
  const store = pinia?._s.get('missingModel');
  if (!store?.missingModelCandidates?.length) return null;
  const panel = [...document.querySelectorAll('div')].filter((x) => x.innerText.includes('Missing Models') &&
      x.innerText.includes(file)).sort((a, b) => a.innerText.length - b.innerText.length)[0];
  if (!panel) {
    [...document.querySelectorAll('button')].find((b) => b.innerText.trim() === 'View details')?.click();
    return null;
  }
  return {ui: 'panel', text: panel.innerText,
          store: store.missingModelCandidates.map((c) => ({name: c.name, url: c.url, directory: c.directory}))};
})()
"""


async def _missing_models_dialog(dt) -> dict:
    """Load the Qwen-Image example with ComfyUI's missing-models warning on: the dialog (or panel) lists its
    files."""
    path = next(p for p in _EXAMPLES if os.path.basename(p).startswith("Qwen"))
    with open(path, encoding="utf-8") as f:
        wf = json.load(f)
    await dt.js("window.comfyAPI.app.app.extensionManager.setting.set("
                "'Comfy.Workflow.ShowMissingModelsWarning', true).then(() => true)")
    await dt.js(f"window.comfyAPI.app.app.loadGraphData({json.dumps(wf)}, true, true, null, "
                "{showMissingNodesDialog: false, showMissingModelsDialog: true}).then(() => true)")
    shown = await dt.wait_js(_MISSING_MODELS_JS, 30, "the missing-models dialog or panel")
    await dt.send("Input.dispatchKeyEvent", type="keyDown", key="Escape", code="Escape", windowsVirtualKeyCode=27)
    return shown


async def _load_when_ready(dt, load: str, deadline: float):
    """Run ``load``; frontend 1.49 may report ready before its canvas store has the canvas ("getCanvas: canvas is
    null" from loadGraphData): ask again until ``deadline``."""
    while True:
        try:
            return await dt.js(load)
        except RuntimeError as exc:
            if "canvas is null" not in str(exc) or time.time() > deadline:
                raise
            await asyncio.sleep(0.5)


async def _drive_browser(devtools_port: int, url: str, workflow: dict, screenshot: str, probe_shot: str) -> dict:
    import aiohttp

    targets = _get_json(f"http://127.0.0.1:{devtools_port}/json/list")
    page = next(t for t in targets if t.get("type") == "page")
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0) as ws:
            dt = _DevTools(ws)
            await dt.send("Page.enable")
            await dt.send("Emulation.setDeviceMetricsOverride", width=1760, height=1000, deviceScaleFactor=1,
                          mobile=False)
            await dt.send("Page.navigate", url=url)
            # vueAppReady is set once setup() finished: node definitions registered, extensions' setup() ran.
            await dt.wait_js(_READY_JS, 90, "the ComfyUI frontend with the noflash extension")
            # Node definitions may still be registering: load until every node knows its class.
            load = (f"window.comfyAPI.app.app.loadGraphData({json.dumps(workflow)}, true, true, null, {_QUIET})"
                    ".then(() => "
                    "window.comfyAPI.app.app.graph._nodes.filter((n) => !n.comfyClass).map((n) => n.type))")
            deadline = time.time() + 60
            while (missing := await _load_when_ready(dt, load, deadline)) and time.time() < deadline:
                await asyncio.sleep(1)
            assert not missing, f"the frontend does not know these node types: {missing}"
            examples = await _check_examples(dt)
            await dt.js(load)
            before = await dt.js(_BADGES_JS)
            await dt.js("window.comfyAPI.app.app.queuePrompt(0, 1).then(() => true)")
            await dt.wait_js("fetch('/noflash/runs').then((r) => r.json()).then((d) => d.runs.length > 0)", 180,
                             "a finished noflash run on the server")
            badges = await dt.wait_js(
                f"(() => {{ const b = {_BADGES_JS}; return b.filter((n) => n.badges.some((t) => t.startsWith("
                "'noflash T'))).length >= 2 ? b : null; })()", 30, "the badges to show the run")
            await dt.js("window.comfyAPI.app.app.extensionManager.command.execute("
                        "'Workspace.ToggleBottomPanelTab.noflash-runs').then(() => true)")
            panel = await dt.wait_js("(() => { const t = [...document.querySelectorAll('table')].find((x) => "
                                     "x.textContent.includes('Longest seq')); return t ? t.innerText : null; })()",
                                     20, "the NoFlash bottom-panel table")
            probe = await dt.wait_js(_PROBE_JS, 30, "the VRAM Probe's estimate on its node")
            await dt.js("new Promise((r) => { window.comfyAPI.app.app.graph.setDirtyCanvas(true, true); "
                        "setTimeout(() => r(true), 800); })")
            shot = await dt.send("Page.captureScreenshot", format="png")
            with open(screenshot, "wb") as f:
                f.write(base64.b64decode(shot["data"]))
            await _probe_screenshot(dt, probe_shot)
            report = await _toggle_report(dt)
            # A page reload restores the workflow from the browser's storage: the picture comes back with it.
            await dt.js("window.__noflashBeforeReload = true")
            await dt.send("Page.reload")
            await dt.wait_js(f"!window.__noflashBeforeReload && {_READY_JS}", 90, "the frontend after a reload")
            reloaded = await dt.wait_js(_PROBE_JS, 30, "the VRAM Probe's estimate after a reload")
            missing = await _missing_models_dialog(dt)
            return {"before": before, "badges": badges, "panel": panel, "probe": probe, "examples": examples,
                    "report": report, "reloaded": reloaded, "missing": missing}


def _skip(reason: str) -> None:
    """Skip, or fail where CI asks for the browser test (``NOFLASH_REQUIRE_BROWSER=1``)."""
    if os.environ.get("NOFLASH_REQUIRE_BROWSER") == "1":
        pytest.fail(f"the browser test cannot run: {reason}")
    pytest.skip(reason)


def _assert_missing_models(shown: dict) -> None:
    """The Qwen-Image example's three files are listed where the frontend shows missing models, with the download
    URLs the workflow declares (``properties.models``) where the frontend keeps them in a store."""
    path = next(p for p in _EXAMPLES if os.path.basename(p).startswith("Qwen"))
    with open(path, encoding="utf-8") as f:
        declared = {m["name"]: m for n in json.load(f)["nodes"] for m in n.get("properties", {}).get("models", [])}
    assert sorted(declared) == ["qwen_2.5_vl_7b_fp8_scaled.safetensors", "qwen_image_fp8_e4m3fn.safetensors",
                                "qwen_image_vae.safetensors"]
    for file in declared:
        assert file in shown["text"], (shown["ui"], shown["text"][:2000])  # the frontend offers the download
    if shown["ui"] == "panel":
        assert "Download" in shown["text"], shown["text"][:2000]
        stored = {c["name"]: c for c in shown["store"]}
        assert sorted(stored) == sorted(declared)
        for name, m in declared.items():
            assert (stored[name]["url"], stored[name]["directory"]) == (m["url"], m["directory"]), name


def _assert_examples_load(examples: dict, server_nodes: dict) -> None:
    """The example workflows load in the real frontend: every node type is one the server has (MarkdownNote is the
    frontend's own), and the widget values survive a load and re-serialize unchanged. A newer ComfyUI may add
    widgets after the saved ones (``CreateVideo``'s ``bit_depth``, ``SaveVideo``'s nested ``codec`` in 0.33): those
    take a fresh node's values, the defaults."""
    assert len(examples) == 3
    for name, (wf, loaded) in examples.items():
        by_id = {str(n["id"]): n for n in loaded}  # frontend 1.49 gives string ids
        for node in wf["nodes"]:
            got = by_id[str(node["id"])]
            assert got["type"] == node["type"], name
            assert node["type"] in server_nodes or node["type"] == "MarkdownNote", (name, node["type"])
            saved = node.get("widgets_values", [])
            expected = saved + (got["fresh"] or [])[len(saved):]
            if node["type"].startswith("NoFlash"):
                expected = saved  # the pack's own nodes: the same widgets everywhere
            assert got["widgets"] == expected, (name, node["type"], got["widgets"], got["fresh"])


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = comfyui_path()
    if path is None:
        pytest.skip("COMFYUI_PATH is not set to a ComfyUI checkout")
    if CHROMIUM is None:
        _skip("Chromium is not installed")
    required, installed = frontend_versions(path)  # COMFYUI_FRONTEND_PATH first, then site-packages
    if installed is None:
        _skip("comfyui-frontend-package is not installed")
    if required is not None and installed != required:
        _skip(f"this ComfyUI pins comfyui-frontend-package=={required}, {installed} is installed: install it with "
              f"`pip install --no-deps --target DIR comfyui-frontend-package=={required}` and set "
              "COMFYUI_FRONTEND_PATH=DIR")
    base = str(tmp_path_factory.mktemp("server_base"))
    make_custom_nodes_dir(base)
    models = os.path.join(base, "models")
    # The comfy fixture isn't needed here, but building the models needs ComfyUI importable.
    from comfy_runtime import setup_comfyui

    setup_comfyui()
    save_state_dict(tiny_sd3_state_dict(), os.path.join(models, "diffusion_models", "tiny_sd3.safetensors"))
    save_state_dict(tiny_clip_l_state_dict(), os.path.join(models, "text_encoders", "tiny_clip_l.safetensors"))
    settings = os.path.join(base, "user", "default", "comfy.settings.json")
    os.makedirs(os.path.dirname(settings), exist_ok=True)
    with open(settings, "w") as f:
        json.dump({"Comfy.TutorialCompleted": True, "Comfy.Workflow.ShowMissingModelsWarning": False,
                   "Comfy.Minimap.Visible": False}, f)
    port = _free_port()
    env = dict(os.environ)
    env["PYTHONPATH"] = server_pythonpath()  # COMFYUI_FRONTEND_PATH's frontend first, the import stand-ins
    log = open(os.path.join(base, "server.log"), "w")
    proc = subprocess.Popen(
        [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--base-directory", base,
         "--database-url", "sqlite:///:memory:"],
        cwd=path, env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        _wait_http(f"http://127.0.0.1:{port}/object_info/NoFlashAttentionPatcher", time.time() + 180, proc,
                   "ComfyUI")
        yield {"url": f"http://127.0.0.1:{port}/", "base": base, "log": log.name}
    finally:
        _stop(proc, timeout=20)
        log.close()


def test_badge_and_panel_after_a_run(server, tmp_path):
    with open(server["log"]) as f:
        log = f.read()
    assert "global SDPA patch" in log  # the start-up line
    extensions = _get_json(server["url"] + "extensions")
    assert "/extensions/noflash/noflash.js" in extensions

    devtools_port = _free_port()
    profile = tempfile.mkdtemp(prefix="noflash-chromium-")
    browser = subprocess.Popen(
        [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         f"--remote-debugging-port={devtools_port}", f"--user-data-dir={profile}", "--window-size=1760,1000",
         "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    docs = os.environ.get("NOFLASH_SCREENSHOT") == "1"
    screenshot = os.path.join(REPO_ROOT, "docs", "badge.png") if docs else str(tmp_path / "badge.png")
    probe_shot = os.path.join(REPO_ROOT, "docs", "probe.png") if docs else str(tmp_path / "probe.png")
    os.makedirs(os.path.dirname(screenshot), exist_ok=True)
    try:
        _wait_http(f"http://127.0.0.1:{devtools_port}/json/version", time.time() + 30, browser, "Chromium")
        workflow = _workflow("tiny_sd3.safetensors", "tiny_clip_l.safetensors")
        seen = asyncio.run(_drive_browser(devtools_port, server["url"], workflow, screenshot, probe_shot))
    finally:
        _stop(browser, timeout=10)
        shutil.rmtree(profile, ignore_errors=True)

    types = sorted(n["type"] for n in seen["badges"])
    assert types == ["NoFlashAttentionPatcher", "NoFlashTierSelector", "NoFlashVRAMProbe"]

    # The frontend's own node-source badge reads just "noflash"; ours is the one with the run state. Only the nodes
    # that produced the run carry it, and only after it: the probe runs no model.
    def ours(n):
        return [t for t in n["badges"] if t.startswith(("noflash ", "noflash:"))]

    assert all(ours(n) == [] for n in seen["before"]), seen["before"]
    after = {n["type"]: ours(n) for n in seen["badges"]}
    assert after == {"NoFlashAttentionPatcher": ["noflash T2 | peak n/a (CPU)"],  # pinned tier 2; CPU: no peak
                     "NoFlashTierSelector": ["noflash T2 | peak n/a (CPU)"], "NoFlashVRAMProbe": []}, after
    assert "SD3" in seen["panel"] and "T2\u00d7" in seen["panel"]
    assert os.path.getsize(screenshot) > 10_000
    # The VRAM Probe's picture: the estimate arrived as data, is drawn by the chart widget and saved with the node.
    probe = seen["probe"]
    assert probe["device"] == "gfx1030" and probe["vram"] == 16 * 2**30 and probe["verdict"] in ("fits", "noflash")
    names = [name for name, _ in probe["components"]]
    assert names[:5] == ["weights", "activations", "attention_comfy", "attention_noflash", "ffn"]
    assert {"text_comfy", "text_noflash", "vae_comfy", "vae_noflash"} <= set(names)
    assert "noflash_chart" in probe["widgets"] and probe["saved"]
    assert probe["widgets_values"] == [1536, 1536, 1, 1, "flux", "gfx1030", 0, "auto", 256]  # ours don't serialize
    # The connected CLIP holds CLIP-L only (Flux's own pair would add T5-XXL); 256 tokens are four 77-token chunks.
    assert "CLIP-L: 4 x 77 tokens" in probe["text"] and "T5-XXL" not in probe["text"] and "Last run" in probe["text"]
    assert os.path.getsize(probe_shot) > 5_000
    # The full report only on demand; the picture survives a page reload.
    opened, closed = seen["report"]["opened"], seen["report"]["closed"]
    assert opened["show"] and opened["label"] == "hide full report" and opened["after"] > opened["before"] + 200
    assert not closed["show"] and closed["label"] == "show full report" and closed["after"] < opened["after"]
    assert seen["reloaded"]["components"] == probe["components"]
    _assert_missing_models(seen["missing"])
    _assert_examples_load(seen["examples"], _get_json(server["url"] + "object_info", timeout=30))
    # Templates: readable names and a thumbnail each, served where the frontend looks for them.
    templates = _get_json(server["url"] + "workflow_templates")["noflash"]
    assert sorted(templates) == sorted(os.path.splitext(os.path.basename(p))[0] for p in _EXAMPLES)
    for name in templates:
        with urllib.request.urlopen(server["url"] + "api/workflow_templates/noflash/" +
                                    urllib.parse.quote(name) + ".jpg", timeout=10) as r:
            assert r.status == 200 and r.headers["Content-Type"] == "image/jpeg" and len(r.read()) > 10_000
    runs = _get_json(server["url"] + "noflash/runs")["runs"]
    assert runs[-1]["state"] == "done" and runs[-1]["tiers"] == {"2": runs[-1]["calls"]}
    assert runs[-1]["node_id"] == "2"  # the Attention Patcher's node id, from ComfyUI's hidden unique_id
