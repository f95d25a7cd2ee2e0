"""Helpers for the browser tests: a real ComfyUI server on a free port, headless Chromium, and a minimal DevTools
protocol client (aiohttp's websocket client, a ComfyUI dependency), written against the frontend's public objects
that frontends 1.27 and 1.49 both have (``window.comfyAPI.app.app``, ``app.graph``, ``app.loadGraphData``,
``app.queuePrompt``); differences are feature-detected in the JavaScript snippets (``GRAPH_NODES_JS``).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from typing import Iterator, Optional

from comfy_runtime import frontend_path

__all__ = [
    "APP_JS",
    "CHROMIUM",
    "DevTools",
    "GRAPH_NODES_JS",
    "chromium",
    "comfyui_server",
    "free_port",
    "get_json",
    "load_graph_js",
    "open_page",
    "ready_js",
    "stop",
    "wait_http",
]

CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")

APP_JS = "window.comfyAPI.app.app"
GRAPH_NODES_JS = f"(({APP_JS}.graph._nodes ?? {APP_JS}.graph.nodes) || [])"
"""The nodes of the graph shown (``_nodes`` in LiteGraph 1.27; ``nodes`` where it was renamed)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str, timeout: float = 5.0):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read().decode())


def wait_http(url: str, deadline: float, proc: subprocess.Popen, what: str):
    """GET ``url`` as JSON until it answers; fails when ``proc`` exits or at ``deadline``."""
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            return get_json(url, timeout=2)
        except Exception:  # noqa: BLE001 - not up yet
            time.sleep(0.5)
    raise TimeoutError(f"{what} did not answer {url}")


def stop(proc: subprocess.Popen, timeout: float) -> None:
    """Terminate ``proc``; kill it if it has not exited after ``timeout`` seconds."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()


def ready_js(extension: str = "noflash.status") -> str:
    """True once the frontend finished its setup (``vueAppReady``) and loaded ``extension``."""
    return (f"!!(window.comfyAPI && window.comfyAPI.app && {APP_JS} && {APP_JS}.vueAppReady && {APP_JS}.graph && "
            f"{APP_JS}.extensions.some((e) => e.name === {json.dumps(extension)}))")


def load_graph_js(workflow: dict) -> str:
    """Load ``workflow`` as the graph shown, without the missing-nodes/models dialogs; resolves to true."""
    return (f"{APP_JS}.loadGraphData({json.dumps(workflow)}, true, true, null, "
            "{showMissingNodesDialog: false, showMissingModelsDialog: false}).then(() => true)")


@contextlib.contextmanager
def comfyui_server(path: str, base: str, env_path: str, settings: Optional[dict] = None) -> Iterator[dict]:
    """ComfyUI from ``path`` on CPU with ``base`` as its base directory (custom nodes, models, user settings);
    ``env_path`` is prepended to ``PYTHONPATH``. Yields ``{"url", "base", "log"}``."""
    user = os.path.join(base, "user", "default", "comfy.settings.json")
    os.makedirs(os.path.dirname(user), exist_ok=True)
    with open(user, "w") as f:
        json.dump({"Comfy.TutorialCompleted": True, "Comfy.Workflow.ShowMissingModelsWarning": False,
                   "Comfy.Minimap.Visible": False, **(settings or {})}, f)
    port = free_port()
    env = dict(os.environ)
    # COMFYUI_FRONTEND_PATH (a pip --target folder with this ComfyUI's pinned frontend) first, as CI sets it for 0.33.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (frontend_path(), env_path, env.get("PYTHONPATH")) if p)
    log_path = os.path.join(base, "server.log")
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--base-directory",
             base, "--database-url", "sqlite:///:memory:"],
            cwd=path, env=env, stdout=log, stderr=subprocess.STDOUT,
        )
        try:
            wait_http(f"http://127.0.0.1:{port}/object_info/NoFlashAttentionPatcher", time.time() + 240, proc,
                      "ComfyUI")
            yield {"url": f"http://127.0.0.1:{port}/", "base": base, "log": log_path}
        finally:
            stop(proc, timeout=20)


@contextlib.contextmanager
def chromium(width: int = 1760, height: int = 1000) -> Iterator[int]:
    """Headless Chromium with remote debugging; yields the DevTools port."""
    if CHROMIUM is None:
        raise RuntimeError("Chromium is not installed")
    port = free_port()
    profile = tempfile.mkdtemp(prefix="noflash-chromium-")
    proc = subprocess.Popen(
        [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         f"--remote-debugging-port={port}", f"--user-data-dir={profile}", f"--window-size={width},{height}",
         "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/json/version", time.time() + 30, proc, "Chromium")
        yield port
    finally:
        stop(proc, timeout=10)
        shutil.rmtree(profile, ignore_errors=True)


class DevTools:
    """Minimal Chrome DevTools protocol client (one page) on aiohttp's websocket client."""

    def __init__(self, ws):
        self.ws = ws
        self.ids = itertools.count(1)

    async def send(self, method: str, **params):
        msg_id = next(self.ids)
        await self.ws.send_json({"id": msg_id, "method": method, "params": params})
        while True:
            msg = await self.ws.receive_json(timeout=180)
            if msg.get("id") == msg_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    async def js(self, expression: str):
        """Evaluate ``expression`` in the page (promises awaited); returns its JSON value."""
        result = await self.send("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True,
                                 userGesture=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"JS error: {json.dumps(result['exceptionDetails'])[:2000]}")
        return result.get("result", {}).get("value")

    async def wait_js(self, expression: str, timeout: float, what: str):
        """Evaluate ``expression`` until it is truthy; returns that value."""
        deadline = time.time() + timeout
        value = None
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
        raise TimeoutError(f"timed out waiting for {what} (last value {value!r})")

    async def sleep(self, ms: int) -> None:
        """Let the page run (animation frames, redraws) for ``ms`` milliseconds."""
        await self.js(f"new Promise((r) => setTimeout(() => r(true), {int(ms)}))")


@contextlib.asynccontextmanager
async def open_page(devtools_port: int, url: str, width: int = 1760, height: int = 1000):
    """The first page of the browser, navigated to ``url`` and ready (the noflash extension loaded)."""
    import aiohttp

    targets = get_json(f"http://127.0.0.1:{devtools_port}/json/list")
    page = next(t for t in targets if t.get("type") == "page")
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0) as ws:
            dt = DevTools(ws)
            await dt.send("Page.enable")
            await dt.send("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1,
                          mobile=False)
            await dt.send("Page.navigate", url=url)
            await dt.wait_js(ready_js(), 120, "the ComfyUI frontend with the noflash extension")
            yield dt
