"""Run the documented command ``python -m noflash_core.video`` and return what it printed: in this process
(:func:`run_video_cli`) or in a plain one of its own (:func:`video_cli_subprocess`)."""

from __future__ import annotations

import os
import runpy
import subprocess
import sys
from typing import List

import pytest

__all__ = ["run_video_cli", "video_cli_subprocess"]

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_video_cli(argv: List[str], capsys: pytest.CaptureFixture) -> str:
    """stdout of ``python -m noflash_core.video *argv``; fails the test when it exits with an error."""
    saved = sys.argv
    sys.argv = ["python -m noflash_core.video", *argv]
    try:
        with pytest.raises(SystemExit) as exit_info:
            runpy.run_module("noflash_core.video", run_name="__main__", alter_sys=False)
    finally:
        sys.argv = saved
    out, err = capsys.readouterr()
    assert exit_info.value.code in (0, None), err
    return out


def video_cli_subprocess(*args: str) -> str:
    """stdout of ``python -m noflash_core.video *args`` in a plain process (no ComfyUI imported, torch's default
    math-SDPA flags), without its last newline; fails the test when it exits with an error."""
    env = dict(os.environ, PYTHONPATH=_REPO_ROOT)
    proc = subprocess.run([sys.executable, "-m", "noflash_core.video", *args], cwd=_REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.rstrip("\n")
