"""Adapters that make other projects' attention layers run on noflash.

Each adapter lives in its own module, imports its project only when enabled, and can be switched off again:

* :mod:`noflash_core.integrations.yunchang`: yunchang's sequence-parallel layers (used by xDiT and Raylight).
"""

__all__: list = []
