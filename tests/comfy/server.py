"""A real ComfyUI server for the tests: started from ``COMFYUI_PATH`` on CPU with the pack as a custom node, driven
through its HTTP API (``/object_info``, ``/prompt``, ``/history``), stopped at the end.

``ComfyServer(base).start()`` runs ``main.py --cpu`` in a subprocess with ``base`` as its base directory (the pack is
linked into ``base/custom_nodes``), waits until the pack's nodes are registered, and :meth:`ComfyServer.run` queues
an API-format prompt and waits for its history entry. Nothing here drives a browser.
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

from comfy_runtime import IMPORT_STUBS, comfyui_path, make_custom_nodes_dir

__all__ = ["ComfyServer", "free_port"]


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """A ComfyUI server process on ``127.0.0.1`` (use as a context manager, or :meth:`start` / :meth:`stop`).

    Args:
        base: ComfyUI's ``--base-directory`` (models, user, output, custom_nodes); created if missing.
        start_timeout: seconds to wait for the pack's nodes to answer on ``/object_info``.
    """

    def __init__(self, base: str, start_timeout: float = 240.0) -> None:
        self.base = base
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
        make_custom_nodes_dir(self.base)
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

    def get(self, route: str, timeout: float = 30.0) -> Any:
        with urllib.request.urlopen(self.url + route, timeout=timeout) as r:
            return json.loads(r.read().decode())

    def post(self, route: str, body: Dict[str, Any], timeout: float = 30.0) -> Any:
        req = urllib.request.Request(self.url + route, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read().decode())

    def run(self, prompt: Dict[str, Any], timeout: float = 300.0) -> Dict[str, Any]:
        """Queue an API-format ``prompt`` and return its ``/history`` entry once it has finished.

        Raises:
            RuntimeError: the prompt was rejected or ended with an error (the server's message included).
            TimeoutError: it did not finish within ``timeout`` seconds.
        """
        try:
            queued = self.post("prompt", {"prompt": prompt, "client_id": "noflash-tests"})
        except urllib.error.HTTPError as exc:  # 400: the prompt failed validation; the body says why
            raise RuntimeError(f"prompt rejected: {exc.read().decode(errors='replace')[:3000]}") from None
        if queued.get("node_errors"):
            raise RuntimeError(f"prompt rejected: {queued['node_errors']}")
        prompt_id = queued["prompt_id"]
        deadline = time.time() + timeout
        while time.time() < deadline:
            entry = self.get(f"history/{prompt_id}").get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None:
                status = entry["status"]
                if status.get("status_str") != "success":
                    raise RuntimeError(f"prompt failed: {json.dumps(status.get('messages'))[:3000]}")
                return entry
            time.sleep(0.5)
        raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout:.0f} s")
