"""Shared part of the import-only stand-ins in this folder (``torchvision``, ``torchaudio``).

ComfyUI imports these packages at module import time (0.3.64: ``torchvision``, ``torchvision.transforms``; 0.33
adds ``torchaudio``, ``torchvision.ops`` and a few submodules), but the code paths the noflash tests run never use
them. Every attribute of a stand-in module is a placeholder that raises ``ImportError`` when it is called or
instantiated, so a test that does reach one fails loudly instead of computing something wrong. Put this folder on
``sys.path`` (``tests/comfy/comfy_runtime.py`` does) only when the real package is not installed.
"""

from __future__ import annotations


def missing(module: str, name: str):
    """A placeholder for ``module.name`` that raises when used."""

    def _raise(*_args, **_kwargs):
        raise ImportError(f"{module}.{name} is a test stand-in (tests/support/import_stubs); install the real "
                          f"{module.split('.')[0]} to use it")

    return type(name, (), {"__init__": _raise, "__call__": _raise, "__module__": module,
                           "__init_subclass__": classmethod(lambda cls, **kw: None)})


def stub_attribute(module: str, name: str):
    """Module ``__getattr__`` of a stand-in: a stand-in submodule where this folder has one, else a placeholder."""
    import importlib
    import importlib.util

    if name.startswith("__"):
        raise AttributeError(name)
    if importlib.util.find_spec(f"{module}.{name}") is not None:
        return importlib.import_module(f"{module}.{name}")
    return missing(module, name)
