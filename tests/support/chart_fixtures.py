"""The VRAM Probe's chart fixtures of the web tests (``web/tests/fixtures/*.json``), made from the estimator.

Each fixture is exactly what the node sends to the browser for one run (``estimate_run(...).to_chart()``, the
data ``web/noflash_chart.js`` draws). Regenerate them all, from the repository root, with::

    python -m tests.support.chart_fixtures

(``--out DIR`` writes elsewhere; ``--check`` only compares and exits 1 when one is stale).
``tests/test_chart_fixtures.py`` recomputes each one and compares the JSON exactly, so a fixture left stale by an
estimator change fails there. The estimate does not read the environment (the budget comes from
the profile's memory), so the fixtures are the same on every machine.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Dict, List, Optional

__all__ = ["FIXTURES", "FIXTURE_DIR", "chart_data", "fixture_text", "main"]

FIXTURE_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                           "web", "tests", "fixtures")

FIXTURES: Dict[str, Dict[str, Any]] = {
    # A video model on a 16 GiB card that fits only with noflash (ComfyUI's math SDPA needs 76.9 GiB).
    "wan22_5b_arc.json": {"family": "wan2.2-5b", "width": 1280, "height": 704, "frames": 121, "device": "arc"},
    # An image model on an 8 GiB RDNA1 card (sub-quadratic attention in ComfyUI).
    "flux_1536_gfx1010.json": {"family": "flux", "width": 1536, "height": 1536, "frames": 1, "device": "gfx1010"},
}
"""File name -> the estimate's arguments (``estimate_run`` defaults otherwise: batch 1, fp16, 256 prompt tokens)."""

def chart_data(name: str) -> Dict[str, Any]:
    """The chart data of fixture ``name`` as the estimator computes it now."""
    from noflash_core.vram import estimate_run

    args = dict(FIXTURES[name])
    return estimate_run(args.pop("family"), args.pop("width"), args.pop("height"), **args).to_chart()


def fixture_text(data: Dict[str, Any]) -> str:
    """The file's text: one-space indented JSON, ASCII, a final newline."""
    return json.dumps(data, indent=1) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    """Write (or with ``--check`` compare) every fixture; returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m tests.support.chart_fixtures", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=FIXTURE_DIR, help="folder to write to (default: web/tests/fixtures)")
    parser.add_argument("--check", action="store_true", help="compare with the files there, write nothing")
    args = parser.parse_args(argv)
    stale = []
    for name in FIXTURES:
        path = os.path.join(args.out, name)
        text = fixture_text(chart_data(name))
        if args.check:
            with open(path, encoding="utf-8") as f:
                if f.read() != text:
                    stale.append(name)
            continue
        os.makedirs(args.out, exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        sys.stdout.write(f"wrote {path}\n")
    for name in stale:
        sys.stdout.write(f"stale: {os.path.join(args.out, name)} (regenerate: {parser.prog})\n")
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
