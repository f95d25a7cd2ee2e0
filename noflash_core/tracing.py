"""Whether torch.compile is tracing the current call: the one check the dispatcher, the telemetry and the FFN
chunker use to leave out what must not run under tracing (caches, out-of-memory retries, Python callbacks)."""

from __future__ import annotations

import torch

__all__ = ["is_compiling"]


def is_compiling() -> bool:
    """True while dynamo (``torch.compile``, ``torch.export``) traces the caller."""
    return torch.compiler.is_compiling()
