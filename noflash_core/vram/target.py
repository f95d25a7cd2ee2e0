"""The device an estimate is for: ``"this machine"`` or a preset of :data:`noflash_core.device.PRESETS` (planned
with :func:`noflash_core.simulate_device` on meta tensors: nothing runs on this machine), and the words for it (the
labels the CLI lists and the VRAM Probe offers)."""

from __future__ import annotations

import re
from dataclasses import replace
from typing import List, Optional, Tuple, Union

import torch

from ..device import PRESETS, DeviceProfile, device_profile, get_preset
from ..units import format_bytes
from .comfy_attention import comfy_paths
from .results import TargetDevice

__all__ = ["LABEL_SEPARATOR", "THIS_MACHINE", "device_choices", "device_key", "device_label", "resolve_target"]

THIS_MACHINE = "this machine"
LABEL_SEPARATOR = " · "
_THIS_MACHINE_NAMES = (THIS_MACHINE, "auto")


def device_label(profile: DeviceProfile) -> str:
    """A preset's name and the card it stands for, e.g. ``"gfx1030 · AMD Radeon RX 6800/6800 XT/6900 XT (RDNA2,
    16 GiB)"``: the profile's own description, with its memory appended where the description does not give it."""
    text = " ".join(profile.description.replace(" / ", "/").split())
    if profile.total_bytes and not re.search(r"\d\s*(GiB|GB)\b", text):
        text = f"{text}, {format_bytes(profile.total_bytes)}"
    return f"{profile.name}{LABEL_SEPARATOR}{text}"


def device_choices() -> List[str]:
    """The target devices the CLI lists and the node offers: ``"this machine"``, then every preset's label."""
    return [THIS_MACHINE, *(device_label(p) for p in PRESETS.values())]


def device_key(choice: str) -> str:
    """The preset name or ``"this machine"`` in a device choice: a label of :func:`device_choices`, or the bare
    name (``"gfx1030"``) or alias as the CLI takes it."""
    return str(choice).split(LABEL_SEPARATOR.strip(), 1)[0].strip()


def _is_this_machine(device: object) -> bool:
    return device is None or device_key(device).lower().replace("-", " ").replace("_", " ") in _THIS_MACHINE_NAMES


def _note(key: str, base: DeviceProfile, vram: Optional[int], real: bool) -> str:
    """One sentence on what is planned for."""
    size = "unknown memory" if vram is None else format_bytes(vram)
    if real and base.kind == "cpu":
        return (f"this machine has no GPU: planned for its CPU with {size} of system RAM. Pick a GPU profile "
                f"(device: {', '.join(p for p in PRESETS if p != 'cpu')}) to plan for a card")
    if real:
        return f"planned for this machine's {base.description} with {size}"
    return (f"planned for the {key} profile ({base.description}) with {size}, simulated on meta tensors: "
            "nothing runs on this machine")


def _base_profile(device: Union[None, str, torch.device, DeviceProfile]) -> Tuple[DeviceProfile, str, bool]:
    """``(profile, key, real)``: the device's profile, its key and whether it is this machine's."""
    if isinstance(device, DeviceProfile):
        return device, device.name, not device.simulated
    if isinstance(device, torch.device):
        return device_profile(device), THIS_MACHINE, True
    if _is_this_machine(device):
        return device_profile(None), THIS_MACHINE, True
    try:
        base = get_preset(device_key(device))
    except ValueError:
        raise ValueError(f"unknown device {device!r}; use 'this machine' or a preset: {', '.join(PRESETS)}") from None
    return base, base.name, False


def resolve_target(device: Union[None, str, torch.device, DeviceProfile] = THIS_MACHINE,
                   vram_bytes: Optional[int] = None) -> Tuple[TargetDevice, DeviceProfile]:
    """The target device and the profile to plan with (memory set to the VRAM planned for, marked simulated).

    Args:
        device: a preset name or alias (``"gfx1030"``, ``"rdna2"``, ``"mps"``, ...) or its label
            (:func:`device_label`), ``"this machine"`` (also None, ``"this-machine"``, ``"auto"``), a
            ``torch.device`` of this machine, or a ``DeviceProfile``.
        vram_bytes: overrides the device's memory.

    Raises:
        ValueError: an unknown name or a non-positive ``vram_bytes``.
    """
    if vram_bytes is not None and vram_bytes <= 0:
        raise ValueError(f"vram_bytes must be positive, got {vram_bytes}")
    base, key, real = _base_profile(device)
    vram = vram_bytes if vram_bytes is not None else base.total_bytes
    profile = base.with_memory(vram, vram) if vram is not None else base
    target = TargetDevice(key=key, description=base.description, kind=base.kind, vram_bytes=vram,
                          simulated=not real, paths=comfy_paths(base), note=_note(key, base, vram, real))
    return target, replace(profile, simulated=True)
