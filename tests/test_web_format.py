"""The web extension's pure formatting module, tested with Node's built-in runner (skipped without node)."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

WEB = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "web")


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_node_test_web_format():
    proc = subprocess.run(["node", "--test", os.path.join(WEB, "tests") + os.sep], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "# fail 0" in proc.stdout


def test_every_served_script_is_an_es_module_without_node_imports():
    # ComfyUI serves and loads every .js file under web/ (recursively) as a frontend extension.
    for root, _, files in os.walk(WEB):
        for name in files:
            if name.endswith(".js"):
                with open(os.path.join(root, name), encoding="utf-8") as f:
                    text = f.read()
                assert "node:" not in text and "require(" not in text, name
    tests_dir = os.path.join(WEB, "tests")
    served_tests = [n for n in os.listdir(tests_dir) if n.endswith(".js")]
    assert not served_tests, "tests must be .mjs so ComfyUI never serves them"
