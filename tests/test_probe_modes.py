"""The VRAM estimate does not depend on the caller's grad mode.

ComfyUI runs every node under ``torch.inference_mode()``; the CLI runs in a plain process. Under inference mode
the dispatcher skips the autograd keys, so a ``CompositeImplicitAutograd`` op (torch's SDPA, ``linear``) reached
the live-bytes tracker whole and the fake mode decomposed it out of sight: the math backend's score tensors were
lost (Wan 2.2 5B at 1280x704x121: "math SDPA 160 MiB" on the node, 66.7 GiB on the CLI). Here the whole
``to_dict()`` under ``inference_mode()`` and under ``no_grad()`` must equal the plain-mode one, for every model
family on every device profile, and the cases the issue reported must equal the CLI's JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from noflash_core.device import PRESETS
from noflash_core.memory.fake_peak import AttentionShape, predict_math_peak, predict_plan_peak
from noflash_core.units import format_bytes
from noflash_core.video.families import MODEL_FAMILIES
from noflash_core.vram import THIS_MACHINE, estimate_run

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MODES = {
    "inference_mode": torch.inference_mode,
    "no_grad": torch.no_grad,
    "inference_mode+enable_grad": lambda: _stacked(torch.inference_mode(), torch.enable_grad()),
}


class _stacked:
    """Enter several context managers in order (a ``lambda`` cannot hold a ``with``)."""

    def __init__(self, *ctx) -> None:
        self.ctx = ctx

    def __enter__(self) -> None:
        for c in self.ctx:
            c.__enter__()

    def __exit__(self, *exc) -> None:
        for c in reversed(self.ctx):
            c.__exit__(*exc)


def _small_size(family: str):
    """A small run of ``family``: a few latent frames for video models, 512² for image models."""
    return (320, 192, 9) if MODEL_FAMILIES[family].is_video else (512, 512, 1)


# The cases issue 17 reported (node vs CLI), at their real sizes.
REPORTED = [
    ("wan2.2-5b", 1280, 704, 121, "arc"),
    ("wan2.1-14b", 1280, 720, 81, "gfx906"),
    ("flux", 1536, 1536, 1, "mps"),
]

CASES = [(family, *_small_size(family), device) for family in MODEL_FAMILIES for device in [*PRESETS, THIS_MACHINE]]


@pytest.mark.parametrize("family,width,height,frames,device", CASES + REPORTED)
def test_estimate_is_the_same_in_every_grad_mode(family, width, height, frames, device):
    plain = estimate_run(family, width, height, frames=frames, device=device).to_dict()
    for name, mode in MODES.items():
        with mode():
            got = estimate_run(family, width, height, frames=frames, device=device).to_dict()
        assert got == plain, (name, [k for k in plain if got[k] != plain[k]])
    assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()  # the caller's mode is restored


def _cli_json(family, width, height, frames, device) -> dict:
    """``python -m noflash_core.video --json`` in a plain process, as a user runs it."""
    env = dict(os.environ, PYTHONPATH=REPO_ROOT)
    proc = subprocess.run(
        [sys.executable, "-m", "noflash_core.video", "--model", family, "--width", str(width), "--height",
         str(height), "--frames", str(frames), "--device", device, "--json"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


@pytest.mark.parametrize("family,width,height,frames,device", REPORTED)
def test_inference_mode_estimate_equals_the_cli(family, width, height, frames, device):
    with torch.inference_mode():
        est = estimate_run(family, width, height, frames=frames, device=device)
    assert json.loads(json.dumps(est.to_dict())) == _cli_json(family, width, height, frames, device)
    if device == "arc":
        # What the issue saw on the node: "math SDPA 160 MiB" and "Fits ... with ComfyUI's own attention".
        assert format_bytes(est.denoise.attention[0].math_bytes) == "66.7 GiB"
        assert est.verdict == "noflash" and "only with noflash" in est.verdict_text


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_math_peak_counts_the_scores_under_inference_mode(dtype):
    # Math SDPA keeps at least the (B, H, L, S) scores and their softmax alive at once.
    shape = AttentionShape(1, 8, 1024, 1024, 64)
    scores = shape.batch * shape.heads * shape.q_len * shape.kv_len * dtype.itemsize
    plain = predict_math_peak(shape, dtype=dtype, device="meta").peak_bytes
    with torch.inference_mode():
        inside = predict_math_peak(shape, dtype=dtype, device="meta").peak_bytes
        plan_inside = predict_plan_peak(shape, dtype=dtype, device="meta", tier=2, block_m=128, block_n=128)
    assert inside == plain >= 2 * scores
    plan, peak = predict_plan_peak(shape, dtype=dtype, device="meta", tier=2, block_m=128, block_n=128)
    assert plan_inside[0] == plan and plan_inside[1] == peak
