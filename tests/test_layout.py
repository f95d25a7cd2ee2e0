"""The package layout: every submodule imports, and none shadows a public function of ``noflash_core``."""

import importlib
import pkgutil
import subprocess
import sys

import noflash_core


def _submodules():
    for info in pkgutil.walk_packages(noflash_core.__path__, "noflash_core."):
        if info.name.endswith("__main__") or info.name == "noflash_core.auto":
            continue  # entry points run on import; noflash_core.auto is the documented opt-in side effect
        yield info.name


def test_every_submodule_leaves_public_functions_callable():
    for name in _submodules():
        importlib.import_module(name)
    for public in noflash_core.__all__:
        obj = getattr(noflash_core, public)
        assert not isinstance(obj, type(noflash_core)), f"noflash_core.{public} is shadowed by a module"
    assert callable(noflash_core.plan)


def test_plan_survives_importing_every_submodule_in_a_fresh_process():
    code = (
        "import importlib, pkgutil, noflash_core as nf\n"
        "for i in pkgutil.walk_packages(nf.__path__, 'noflash_core.'):\n"
        "    if not i.name.endswith('__main__') and i.name != 'noflash_core.auto':\n"
        "        importlib.import_module(i.name)\n"
        "assert callable(nf.plan), type(nf.plan)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_no_comfy_modules_flat_in_the_engine():
    flat = [i.name for i in pkgutil.iter_modules(noflash_core.__path__) if i.name.startswith("comfy_")]
    assert flat == []
