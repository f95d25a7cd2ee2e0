"""Check a sequence-parallel call on every rank with one small collective, before any heavy communication.

Each rank packs what it was given (shapes, dtypes, device types, flags, scale, whether it needs a backward) into a
few int64s; one ``all_gather`` gives every rank every rank's metadata; then every rank runs the same pure check on
the same table and so raises the same exception with the same message. A rank with bad input therefore never leaves
the others waiting in a send or an all-to-all: everyone raises, nobody hangs.

The per-rank checks are the ones of torch's SDPA (``problem.validate_arguments`` and ``problem.build_problem``),
run on meta tensors rebuilt from the table, so their messages match the single-GPU path.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from ..problem import build_problem, validate_arguments

__all__ = ["CallInfo", "GroupInfo", "check_call", "group_info"]

_MAX_DIMS = 8
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu", "meta", "hpu", "npu", "privateuseone")
_NOT_A_TENSOR, _TOO_MANY_DIMS, _OTHER = -1, -2, 99
# One tensor: ndim (or a code above), shape padded with -1, dtype index (or -1), device type index (or 99).
_TENSOR_FIELDS = 1 + _MAX_DIMS + 2
_NAMES = ("query", "key", "value")


@dataclass(frozen=True)
class GroupInfo:
    """The process group of a call: the group, this rank in it, and its size ``P``."""

    group: Optional[dist.ProcessGroup]
    rank: int
    size: int

    def global_rank(self, group_rank: int) -> int:
        """The global rank of ``group_rank`` (what ``P2POp`` takes as the peer)."""
        return group_rank if self.group is None else dist.get_global_rank(self.group, group_rank)


@dataclass(frozen=True)
class CallInfo:
    """What one rank was called with, as every rank sees it after the metadata exchange."""

    shapes: Tuple[Tuple[int, ...], Tuple[int, ...], Tuple[int, ...]]
    dtype: torch.dtype
    device_type: str
    is_causal: bool
    enable_gqa: bool
    scale: Optional[float]
    needs_grad: bool


def group_info(fn: str, group: Optional[dist.ProcessGroup]) -> GroupInfo:
    """Rank and size of ``group`` (default: the world), with errors that say what to do."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            f"{fn}: torch.distributed is not initialized. Call torch.distributed.init_process_group() first "
            "(torchrun sets the environment it reads), then pass each rank's shard."
        )
    rank = dist.get_rank(group)
    if rank < 0:
        raise RuntimeError(f"{fn}: this process is not a member of the given group; call it only on its ranks.")
    return GroupInfo(group, rank, dist.get_world_size(group))


def _encode_tensor(t) -> List[int]:
    if not isinstance(t, torch.Tensor):
        return [_NOT_A_TENSOR] + [-1] * (_MAX_DIMS + 2)
    if t.dim() > _MAX_DIMS:
        return [_TOO_MANY_DIMS] + [-1] * (_MAX_DIMS + 2)
    shape = list(t.shape) + [-1] * (_MAX_DIMS - t.dim())
    dtype = _DTYPES.index(t.dtype) if t.dtype in _DTYPES else _OTHER
    dev = _DEVICE_TYPES.index(t.device.type) if t.device.type in _DEVICE_TYPES else _OTHER
    return [t.dim(), *shape, dtype, dev]


def _encode(tensors: Sequence, is_causal, enable_gqa, scale, needs_grad: bool, local_devices_equal: bool) -> List[int]:
    row: List[int] = []
    for t in tensors:
        row += _encode_tensor(t)
    scale_bits = struct.unpack("<q", struct.pack("<d", float(scale)))[0] if isinstance(scale, (int, float)) else 0
    flags = [
        int(bool(is_causal)), int(bool(enable_gqa)), int(scale is None), int(isinstance(scale, (int, float))),
        scale_bits, int(needs_grad), int(local_devices_equal),
    ]
    return row + flags


def _metadata_device(group: Optional[dist.ProcessGroup], query) -> torch.device:
    backend = str(dist.get_backend(group)).lower()
    if "nccl" in backend and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    if "gloo" in backend or "mpi" in backend or not isinstance(query, torch.Tensor) or query.device.type == "meta":
        return torch.device("cpu")
    return query.device


def _describe_rank(row: Sequence[int]) -> Tuple[Optional[str], Optional[CallInfo], type]:
    """Decode one rank's row: (error message or None, the call, the exception type for the error)."""
    shapes, dtypes, devices = [], [], []
    for i, name in enumerate(_NAMES):
        f = row[i * _TENSOR_FIELDS: (i + 1) * _TENSOR_FIELDS]
        if f[0] == _NOT_A_TENSOR:
            return f"{name} must be a Tensor.", None, TypeError
        if f[0] == _TOO_MANY_DIMS:
            return f"{name} has more than {_MAX_DIMS} dims; flatten the batch dims.", None, RuntimeError
        shapes.append(tuple(f[1: 1 + f[0]]))
        dtypes.append(f[1 + _MAX_DIMS])
        devices.append(f[2 + _MAX_DIMS])
    flags = row[3 * _TENSOR_FIELDS:]
    is_causal, enable_gqa, scale_none, scale_num, scale_bits, needs_grad, same_device = flags
    if _OTHER in dtypes or len(set(dtypes)) != 1:
        names = ", ".join(f"{n}.dtype={_DTYPES[d] if d != _OTHER else 'unsupported'}" for n, d in zip(_NAMES, dtypes))
        return (
            f"query, key and value must have one floating dtype (float16, bfloat16, float32 or float64), got {names}.",
            None, RuntimeError,
        )
    if not same_device or len(set(devices)) != 1:
        return "query, key and value must be on one device. Move them with .to(device).", None, RuntimeError
    if not scale_none and not scale_num:
        return "scale must be a float or None.", None, TypeError
    scale = None if scale_none else struct.unpack("<d", struct.pack("<q", scale_bits))[0]
    device_type = _DEVICE_TYPES[devices[0]] if devices[0] != _OTHER else "other"
    info = CallInfo(tuple(shapes), _DTYPES[dtypes[0]], device_type, bool(is_causal), bool(enable_gqa), scale,
                    bool(needs_grad))
    meta = [torch.empty(s, dtype=info.dtype, device="meta") for s in shapes]
    try:
        validate_arguments(*meta, None, info.is_causal, info.enable_gqa)
        build_problem(*meta, None, info.is_causal, info.scale, info.enable_gqa)
    except (RuntimeError, TypeError) as exc:
        msg = str(exc).replace("scaled_dot_product_attention: ", "")
        return msg, None, type(exc)
    return None, info, RuntimeError


def _cross_rank_error(infos: Sequence[CallInfo]) -> Optional[str]:
    first = infos[0]
    for r, info in enumerate(infos[1:], start=1):
        for i, name in enumerate(_NAMES):
            if info.shapes[i] != first.shapes[i]:
                return (
                    f"{name} shapes differ across ranks: rank 0 has {first.shapes[i]}, rank {r} has "
                    f"{info.shapes[i]}. Every rank must pass an equal-sized shard (tokens [r*N/P, (r+1)*N/P) on "
                    "dim -2); pad the sequence to a multiple of the group size."
                )
        for field in ("dtype", "device_type", "is_causal", "enable_gqa", "scale", "needs_grad"):
            a, b = getattr(first, field), getattr(info, field)
            if a != b:
                hint = (
                    " Every rank must run the backward (inputs that require grad on all ranks or on none)."
                    if field == "needs_grad" else " Pass the same value on every rank."
                )
                return f"{field} differs across ranks: rank 0 has {a}, rank {r} has {b}.{hint}"
    return None


def check_call(
    fn: str,
    gi: GroupInfo,
    query,
    key,
    value,
    is_causal,
    enable_gqa,
    scale,
    extra_check=None,
) -> CallInfo:
    """Exchange the call's metadata with one ``all_gather`` and raise the same error on every rank if it is bad.

    Args:
        fn: the public function's name, for messages.
        gi: the group.
        query, key, value: this rank's arguments (anything: non-tensors are reported, not crashed on).
        extra_check: ``f(info, P) -> Optional[str]``, the caller's own rule on the common call (e.g. head counts
            that divide by P).

    Returns:
        The common :class:`CallInfo`.

    Raises:
        RuntimeError (TypeError for non-tensor arguments) on every rank, naming the rank and the fix.
    """
    tensors = (query, key, value)
    devs = {t.device for t in tensors if isinstance(t, torch.Tensor)}
    needs_grad = torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)
    row = _encode(tensors, is_causal, enable_gqa, scale, needs_grad, len(devs) <= 1)
    device = _metadata_device(gi.group, query)
    local = torch.tensor(row, dtype=torch.int64, device=device)
    gathered = [torch.empty_like(local) for _ in range(gi.size)]
    dist.all_gather(gathered, local, group=gi.group)
    table = torch.stack(gathered).cpu().tolist()  # one device-to-host copy for the whole table
    infos: List[CallInfo] = []
    for r, rank_row in enumerate(table):
        msg, info, exc_type = _describe_rank(rank_row)
        if msg is not None:
            raise exc_type(f"{fn}: invalid input on rank {r}: {msg}")
        infos.append(info)
    msg = _cross_rank_error(infos)
    if msg is None and extra_check is not None:
        msg = extra_check(infos[0], gi.size)
    if msg is not None:
        raise RuntimeError(f"{fn}: {msg}")
    return infos[0]
