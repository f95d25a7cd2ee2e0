"""A dispatch mode that counts what the engine asks of a device: launched ops, host syncs and GEMM shapes.

It also sees inside noflash's registered ops (``torch.library.custom_op`` kernels are Python made of aten ops; a
dispatch mode is popped while it handles an op, so the kernel is run again with the mode pushed).

On CPU tensors it emulates a GPU's fp32-output half matmul (``bmm(..., out_dtype=torch.float32)``, which CPU
builds lack), so tests can run a GPU device profile's code path on real values.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["OpCounter"]

_SYNC_OPS = frozenset({"_local_scalar_dense", "is_nonzero", "item"})
# Ops that launch no kernel: views, metadata, allocation without initialisation.
_NO_LAUNCH = frozenset({"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "detach", "alias",
                        "lift_fresh", "lift_fresh_copy", "_to_copy_meta"})
_GEMMS = frozenset({"bmm", "mm", "matmul", "addmm", "baddbmm"})
_HALF_OUT = (torch.ops.aten.bmm.dtype, torch.ops.aten.bmm.dtype_out)


def _python_kernel(func: Any) -> Optional[Callable[..., Any]]:
    name = getattr(getattr(func, "_schema", None), "name", "")
    if not name.startswith("noflash::"):
        return None
    from torch._library.custom_ops import OPDEFS

    opdef = OPDEFS.get(name)
    return getattr(opdef, "_init_fn", None) if opdef is not None else None


class OpCounter(TorchDispatchMode):
    """Counts dispatched aten ops inside the context.

    Attributes:
        syncs: host reads of device values (``_local_scalar_dense``: ``.item()``, ``bool()``, ``float()``, ...).
        launches: ops that launch device work (not views, metadata or uninitialised allocations).
        gemms: ``(op, batch, rows, inner, cols)`` of every matmul.
        by_op: launches per op name.
    """

    def __init__(self) -> None:
        super().__init__()
        self.syncs = 0
        self.launches = 0
        self.gemms: List[Tuple[str, int, int, int, int]] = []
        self.by_op: Dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        kernel = _python_kernel(func)
        if kernel is not None:
            with self:
                return kernel(*args, **kwargs)
        name = func.overloadpacket.__name__
        if name in _SYNC_OPS:
            self.syncs += 1
        elif not func.is_view and name not in _NO_LAUNCH:
            self.launches += 1
            self.by_op[name] = self.by_op.get(name, 0) + 1
        if name in _GEMMS:
            a, b = args[0], args[1]
            batch = a.shape[0] if a.dim() == 3 else 1
            self.gemms.append((name, batch, a.shape[-2], a.shape[-1], b.shape[-1]))
        if func in _HALF_OUT and args[0].device.type == "cpu":
            result = torch.bmm(args[0].float(), args[1].float())
            out = kwargs.get("out")
            return out.copy_(result) if out is not None else result
        return func(*args, **kwargs)

    @property
    def min_gemm_rows(self) -> int:
        """The fewest rows of any score-sized GEMM seen (0 when there were none)."""
        return min((g[2] for g in self.gemms), default=0)
