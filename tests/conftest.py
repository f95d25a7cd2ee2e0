"""Session-wide test settings: the test device (``NOFLASH_TEST_DEVICE``), whether a real ComfyUI is given
(``COMFYUI_PATH``), and the tiers the "auto" columns ran."""

from __future__ import annotations

import pytest


def pytest_configure(config) -> None:
    import os
    import tempfile

    # Plans must not depend on the tuning cache of whoever runs the tests: a fresh, empty one for the session.
    os.environ["NOFLASH_TUNE_CACHE"] = tempfile.mkdtemp(prefix="noflash-tune-tests-")
    try:
        from tests.support.device import DEVICE  # noqa: F401  (validates NOFLASH_TEST_DEVICE once, up front)
    except ValueError as exc:
        raise pytest.UsageError(str(exc)) from None


def pytest_report_header(config) -> list:
    import os

    from tests.support.device import DEVICE

    comfy = os.environ.get("COMFYUI_PATH")
    return [
        f"noflash test device: {DEVICE} (NOFLASH_TEST_DEVICE)",
        f"ComfyUI: {comfy} (COMFYUI_PATH)" if comfy else "ComfyUI: COMFYUI_PATH not set, the ComfyUI tests skip",
    ]


def pytest_terminal_summary(terminalreporter) -> None:
    from tests.support.tiers import AUTO_TIERS

    if AUTO_TIERS:
        counts = ", ".join(f"tier {t}: {n}" for t, n in sorted(AUTO_TIERS.items()))
        terminalreporter.write_line(f"noflash: calls in the tier='auto' columns ran {counts}")
