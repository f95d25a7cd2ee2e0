"""Run the documented command ``python -m noflash_core.video`` in this process and return what it printed."""

from __future__ import annotations

import runpy
import sys
from typing import List

import pytest

__all__ = ["run_video_cli"]


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
