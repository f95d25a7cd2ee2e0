"""A dependency-free progress bar on stderr.

On a terminal it redraws one line (``[#####-----] 12/40  0:42  math fwd N=2048``); elsewhere (CI logs,
pipes) it logs one line per step instead, so logs stay readable.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Optional, TextIO

__all__ = ["ProgressBar"]

logger = logging.getLogger(__name__)


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class ProgressBar:
    """Count ``total`` steps.

    Args:
        total: number of steps.
        stream: where to draw (default ``sys.stderr``).
        enabled: False draws nothing (``--no-progress``).
        width: bar width in characters.
    """

    def __init__(self, total: int, stream: Optional[TextIO] = None, enabled: bool = True, width: int = 24) -> None:
        self.total = max(1, total)
        self.done = 0
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.width = width
        self._start = time.monotonic()
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())

    def render(self, label: str = "") -> str:
        """The bar's text for the current state."""
        filled = int(self.width * self.done / self.total)
        bar = "#" * filled + "-" * (self.width - filled)
        return f"[{bar}] {self.done}/{self.total} {_clock(time.monotonic() - self._start)} {label}".rstrip()

    def step(self, label: str = "", advance: int = 1) -> None:
        """Advance by ``advance`` steps and show ``label`` (what runs next, or what just finished)."""
        self.done = min(self.total, self.done + advance)
        self.show(label)

    def show(self, label: str = "") -> None:
        """Redraw with ``label`` without advancing."""
        if not self.enabled:
            return
        text = self.render(label)
        if self._tty:
            self.stream.write("\r\x1b[2K" + text)
            self.stream.flush()
        else:
            logger.info("%s", text)

    def close(self) -> None:
        """End the bar's line."""
        if self.enabled and self._tty:
            self.stream.write("\n")
            self.stream.flush()
