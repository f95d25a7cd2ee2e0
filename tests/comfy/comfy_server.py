"""A real ComfyUI server for the tests: started from ``COMFYUI_PATH`` on CPU with the pack (and any test packs) as
custom nodes, driven through its HTTP API (``/object_info``, ``/prompt``, ``/history``), stopped at the end.

``ComfyServer(base, extra_packs={...}).start()`` runs ``main.py --cpu`` in a subprocess with ``base`` as its base
directory (the pack is linked into ``base/custom_nodes``), waits until the pack's nodes are registered;
:meth:`ComfyServer.queue` / :meth:`ComfyServer.wait` queue an API-format prompt and wait for its status, and
:meth:`ComfyServer.run` does both and returns the history entry of a prompt that succeeded.
:func:`tiny_sd3_base` makes a base directory holding the tiny SD3 and CLIP-L checkpoints. Nothing here drives a
browser. (Not named ``server.py``: on the tests' path that can shadow ComfyUI's own ``server`` module, which core
nodes import.)
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Any, Dict, Optional

import pytest
from comfy_runtime import (
    IMPORT_STUBS,
    comfyui_path,
    make_custom_nodes_dir,
    save_state_dict,
    tiny_clip_l_state_dict,
    tiny_sd3_state_dict,
)

__all__ = ["ComfyServer", "free_port", "tiny_sd3_base"]


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """A ComfyUI server process on ``127.0.0.1`` (use as a context manager, or :meth:`start` / :meth:`stop`).

    Args:
        base: ComfyUI's ``--base-directory`` (models, user, output, custom_nodes); created if missing.
        extra_packs: more custom node packs to link in, ``{folder name: path}`` (test packs).
        start_timeout: seconds to wait for the pack's nodes to answer on ``/object_info``.
    """

    def __init__(self, base: str, extra_packs: Optional[Dict[str, str]] = None, start_timeout: float = 240.0) -> None:
        self.base = base
        self.extra_packs = dict(extra_packs or {})
        self.start_timeout = start_timeout
        self.port = 0
        self.proc: Optional[subprocess.Popen] = None
        self.log_path = os.path.join(base, "server.log")
        self._log = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def start(self) -> ComfyServer:
        path = comfyui_path()
        if path is None:
            raise RuntimeError("COMFYUI_PATH does not name a ComfyUI checkout")
        custom = os.path.dirname(make_custom_nodes_dir(self.base))
        for name, target in self.extra_packs.items():
            link = os.path.join(custom, name)
            if not os.path.islink(link):
                os.symlink(target, link)
        self.port = free_port()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (IMPORT_STUBS, env.get("PYTHONPATH")) if p)
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
             "--base-directory", self.base, "--database-url", "sqlite:///:memory:"],
            cwd=path, env=env, stdout=self._log, stderr=subprocess.STDOUT,
        )
        try:
            self._wait_for_pack()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_for_pack(self) -> None:
        deadline = time.time() + self.start_timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode}; log:\n{self.log()[-3000:]}")
            try:
                self.get("object_info/NoFlashVRAMProbe", timeout=2)
                return
            except OSError:  # not listening yet
                time.sleep(0.5)
        raise TimeoutError(f"ComfyUI did not register the pack within {self.start_timeout:.0f} s; log:\n"
                           f"{self.log()[-3000:]}")

    def stop(self, timeout: float = 20.0) -> None:
        """Terminate the server (kill it if it has not exited after ``timeout`` seconds)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=timeout)
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> ComfyServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def log(self) -> str:
        """The server's output so far."""
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def log_tail(self, chars: int = 4000) -> str:
        """The last ``chars`` characters of the server's output."""
        return self.log()[-chars:]

    def get(self, route: str, timeout: float = 30.0) -> Any:
        with urllib.request.urlopen(self.url + route, timeout=timeout) as r:
            return json.loads(r.read().decode())

    def post(self, route: str, body: Any, timeout: float = 30.0) -> Any:
        """POST ``body`` as JSON; the JSON answer, or the raw text where the route answers with none."""
        req = urllib.request.Request(self.url + route, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw = r.read().decode()
        return json.loads(raw) if raw.strip().startswith(("{", "[")) else raw

    def queue(self, prompt: Dict[str, Any]) -> str:
        """Queue an API-format prompt; returns its prompt id.

        Raises:
            RuntimeError: the prompt was rejected (failed validation); the server's message included.
        """
        try:
            queued = self.post("prompt", {"prompt": prompt, "client_id": "noflash-tests"})
        except urllib.error.HTTPError as exc:  # 400: the prompt failed validation; the body says why
            raise RuntimeError(f"prompt rejected: {exc.read().decode(errors='replace')[:3000]}") from None
        if queued.get("node_errors"):
            raise RuntimeError(f"prompt rejected: {queued['node_errors']}")
        return queued["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 600.0) -> Dict[str, Any]:
        """The prompt's history ``status`` (``status_str``, ``messages``) once it has finished, with success or not.

        Raises:
            RuntimeError: the server exited meanwhile.
            TimeoutError: it did not finish within ``timeout`` seconds.
        """
        deadline = time.time() + timeout
        while time.time() < deadline:
            entry = self.get(f"history/{prompt_id}").get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None and (
                    entry["status"].get("status_str") in ("success", "error")):
                return entry["status"]
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited:\n{self.log_tail()}")
            time.sleep(0.3)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout:.0f} s:\n{self.log_tail()}")

    def run(self, prompt: Dict[str, Any], timeout: float = 300.0) -> Dict[str, Any]:
        """Queue an API-format ``prompt`` and return its ``/history`` entry once it has finished.

        Raises:
            RuntimeError: the prompt was rejected or ended with an error (the server's message included).
            TimeoutError: it did not finish within ``timeout`` seconds.
        """
        prompt_id = self.queue(prompt)
        status = self.wait(prompt_id, timeout)
        if status.get("status_str") != "success":
            raise RuntimeError(f"prompt failed: {json.dumps(status.get('messages'))[:3000]}")
        return self.get(f"history/{prompt_id}")[prompt_id]


def tiny_sd3_base(tmp_path_factory, name: str) -> str:
    """A fresh base directory (``tmp_path_factory.mktemp(name)``) with ``models/diffusion_models/tiny_sd3.safetensors``
    and ``models/text_encoders/tiny_clip_l.safetensors``; skips the test where ``COMFYUI_PATH`` is not set."""
    if comfyui_path() is None:
        pytest.skip("COMFYUI_PATH is not set to a ComfyUI checkout")
    base = str(tmp_path_factory.mktemp(name))
    from comfy_runtime import setup_comfyui

    setup_comfyui()  # building the tiny models needs ComfyUI importable
    models = os.path.join(base, "models")
    save_state_dict(tiny_sd3_state_dict(), os.path.join(models, "diffusion_models", "tiny_sd3.safetensors"))
    save_state_dict(tiny_clip_l_state_dict(), os.path.join(models, "text_encoders", "tiny_clip_l.safetensors"))
    return base
