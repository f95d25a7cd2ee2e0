"""A real ComfyUI server in a subprocess for the tests: the NoFlash pack (and any test packs) in its custom nodes,
prompts queued and awaited over its HTTP API.

``ComfyServer(base, extra_packs={...})`` is a context manager; ``base`` becomes ComfyUI's ``--base-directory``.
Needs ``COMFYUI_PATH`` (see ``comfy_runtime.comfyui_path``).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from typing import Any, Dict, Optional

from comfy_runtime import IMPORT_STUBS, comfyui_path, make_custom_nodes_dir

__all__ = ["ComfyServer", "free_port"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """ComfyUI's ``main.py --cpu`` on a free loopback port, with the pack linked into ``base/custom_nodes``."""

    def __init__(self, base: str, extra_packs: Optional[Dict[str, str]] = None, start_timeout: float = 240.0):
        self.base = base
        self.extra_packs = dict(extra_packs or {})
        self.start_timeout = start_timeout
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.proc: Optional[subprocess.Popen] = None
        self.log_path = os.path.join(base, "server.log")

    def __enter__(self) -> ComfyServer:
        path = comfyui_path()
        if path is None:
            raise RuntimeError("COMFYUI_PATH does not name a ComfyUI checkout")
        custom = os.path.dirname(make_custom_nodes_dir(self.base))
        for name, target in self.extra_packs.items():
            link = os.path.join(custom, name)
            if not os.path.islink(link):
                os.symlink(target, link)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (IMPORT_STUBS, env.get("PYTHONPATH")) if p)
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
             "--base-directory", self.base, "--database-url", "sqlite:///:memory:"],
            cwd=path, env=env, stdout=self._log, stderr=subprocess.STDOUT,
        )
        deadline = time.time() + self.start_timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                self.get("object_info/NoFlashAttentionPatcher", timeout=2)
                return self
            except OSError:
                if time.time() > deadline:
                    self.__exit__(None, None, None)
                    raise TimeoutError(f"ComfyUI did not start:\n{self.log_tail()}") from None
                time.sleep(0.5)

    def __exit__(self, *exc) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=20)
            self.proc = None
        self._log.close()

    def log_tail(self, chars: int = 4000) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()[-chars:]

    def get(self, path: str, timeout: float = 10.0) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            return json.loads(r.read().decode())

    def post(self, path: str, body: Any, timeout: float = 10.0) -> Any:
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw = r.read().decode()
        return json.loads(raw) if raw.strip().startswith(("{", "[")) else raw

    def queue(self, prompt: Dict[str, Any]) -> str:
        """Queue an API-format prompt; returns its prompt id."""
        return self.post("prompt", {"prompt": prompt, "client_id": "noflash-tests"})["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 600.0) -> Dict[str, Any]:
        """The prompt's history ``status`` (``status_str``, ``messages``) once it has finished."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            entry = self.get(f"history/{prompt_id}").get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None and (
                    entry["status"].get("status_str") in ("success", "error")):
                return entry["status"]
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited:\n{self.log_tail()}")
            time.sleep(0.3)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout} s:\n{self.log_tail()}")
