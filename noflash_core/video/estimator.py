"""Moved to :mod:`noflash_core.vram` (the estimator covers image models too); this module re-exports its public names
so that ``from noflash_core.video.estimator import estimate_run`` keeps working."""

from .. import vram
from ..vram import *  # noqa: F403 (a re-export shim: the names are vram.__all__, listed there once)

__all__ = list(vram.__all__)
