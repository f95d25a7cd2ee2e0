"""The package layout: every submodule imports, and none shadows a public function of ``noflash_core``."""

import importlib
import pkgutil
import subprocess
import sys
from pathlib import Path

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


def test_a_second_copy_of_the_package_registers_its_own_ops(tmp_path):
    # Inside ComfyUI the pack's copy (<pack>.noflash_core) and a plain `import noflash_core` can share a process.
    # Both under one op name made the later copy's registration replace the first one's, and a crash followed once
    # it was garbage-collected. Each copy now has its own op namespace; both still compute.
    repo = Path(noflash_core.__file__).parents[1]
    (tmp_path / "somepack").symlink_to(repo)
    code = (
        "import gc, sys, torch\n"
        f"sys.path[:0] = [{str(repo)!r}, {str(tmp_path)!r}]\n"
        "import noflash_core as a\n"
        "import somepack.noflash_core as b\n"
        "assert a.attention_op.OP_NAMESPACE == 'noflash', a.attention_op.OP_NAMESPACE\n"
        "assert b.attention_op.OP_NAMESPACE == 'noflash_somepack', b.attention_op.OP_NAMESPACE\n"
        "q = torch.randn(1, 2, 64, 16, dtype=torch.float64, requires_grad=True)\n"
        "for m in (b, a):\n"
        "    m.scaled_dot_product_attention(q, q, q, tier=2, block_m=16, block_n=16).sum().backward()\n"
        "del b; [sys.modules.pop(n) for n in list(sys.modules) if n.startswith('somepack')]; gc.collect()\n"
        "a.scaled_dot_product_attention(q, q, q, tier=2, block_m=16, block_n=16).sum().backward()\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(tmp_path))
