"""Share what was measured: this device's tuned entries as a small JSON (``--export``, ``--gpu-check``).

Export format (``docs/tuning.md``)::

    {"format": "noflash-tune-export", "version": 1, "identity": {<device identity>},
     "entries": {"<signature key>": <entry>, ...}}

It holds the device identity (product name, arch, memory, runtime, torch version) and the entries only: no paths,
user or host names.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional

from .signature import device_identity, device_key
from .store import VERSION, cache_path, read_document

__all__ = ["EXPORT_FORMAT", "device_entries", "export_entries"]

EXPORT_FORMAT = "noflash-tune-export"


def device_entries(device: Optional[object] = None, path: Optional[str] = None) -> Dict[str, Any]:
    """The export document of ``device``'s entries in the cache at ``path`` (default: the cache in use)."""
    identity = device_identity(device)
    doc = read_document(path or cache_path())
    entries: Dict[str, Any] = {}
    if identity is not None:
        entries = dict(doc["devices"].get(device_key(identity), {}).get("entries", {}))
    return {"format": EXPORT_FORMAT, "version": VERSION, "identity": identity, "entries": entries}


def export_entries(out_path: str, device: Optional[object] = None, path: Optional[str] = None) -> int:
    """Write :func:`device_entries` to ``out_path``; returns how many entries were written."""
    data = device_entries(device, path)
    folder = os.path.dirname(out_path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    with open(out_path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.write("\n")
    return len(data["entries"])
