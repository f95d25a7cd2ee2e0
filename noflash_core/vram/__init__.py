"""Will a diffusion run fit on a given card? The VRAM estimate of video and image models, in parts.

- :mod:`.estimate`: :func:`estimate_run`, the entry (the CLI ``python -m noflash_core.video`` and the ComfyUI VRAM
  Probe call it);
- :mod:`.target`: the device planned for (this machine or a preset) and its label;
- :mod:`.denoise`, :mod:`.text_encoder`, :mod:`.vae`: one estimator per phase, on :mod:`.calls` (one attention call
  through noflash and through ComfyUI, :mod:`.comfy_attention`), :mod:`.ffn` and :mod:`.geometry`;
- :mod:`.verdict`: fits / only with noflash / does not fit, and what to change;
- :mod:`.results`: the result types; :mod:`.report`: the text report and the chart data; :mod:`.cli`: the CLI.

The model tables stay in :mod:`noflash_core.video.families` and :mod:`noflash_core.video.encoders` for now.
"""

from . import results
from .estimate import estimate_run, parse_dtype_name
from .results import *  # noqa: F403 (the result types: results.__all__)
from .target import LABEL_SEPARATOR, THIS_MACHINE, device_choices, device_key, device_label, resolve_target

# The result types are listed once, in results.__all__.
__all__ = results.__all__ + [
    "LABEL_SEPARATOR",
    "THIS_MACHINE",
    "device_choices",
    "device_key",
    "device_label",
    "estimate_run",
    "parse_dtype_name",
    "resolve_target",
]
