"""What a tuning result is filed under: the device's identity and the call's bucketed signature.

A measured winner depends on the device (its name, arch, memory, runtime, torch version; on CPU the thread count)
and on the call: dtype, batch·heads, query heads per key/value head (GQA), query length L, key length S, head sizes
E and Ev, the mask kind, causal and grad. L and S are bucketed to 1/8-octaves (:func:`bucket_length`): the
relative speed of two plans changes slowly with length (every tier's cost is a sum over blocks, each block costing
the same), so lengths within about ±4.5% of each other share one entry, e.g. 4032 and 4096 tokens (two latent
sizes of one model family), while 2048 and 4096 never do. Everything else is kept exact: head counts and sizes
change the GEMM shapes and the number of pairs per step, which is what the winner is made of.

Nothing here reads a tensor's values; the signature comes from shapes, dtypes and flags alone.
"""

from __future__ import annotations

import functools
import math
import platform
from dataclasses import asdict, dataclass
from typing import Dict, Optional

import torch

from ..device import DeviceProfile, device_profile
from ..problem import AttentionProblem

__all__ = [
    "BUCKETS_PER_OCTAVE",
    "Signature",
    "bucket_length",
    "device_identity",
    "device_key",
    "mask_kind",
    "profile_key",
    "signature_of",
]

BUCKETS_PER_OCTAVE = 8
"""L and S are rounded to ``2 ** (round(8 * log2(n)) / 8)``: buckets about 9% wide."""

_IDENTITY_FIELDS = ("kind", "name", "arch", "total_bytes", "runtime", "torch")


def bucket_length(n: int) -> int:
    """The representative length of ``n``'s 1/8-octave bucket (lengths up to 16 are their own bucket)."""
    n = int(n)
    if n <= 16:
        return max(n, 0)
    return int(round(2.0 ** (round(BUCKETS_PER_OCTAVE * math.log2(n)) / BUCKETS_PER_OCTAVE)))


def mask_kind(mask: Optional[torch.Tensor]) -> str:
    """``"none"``, ``"bool"``/``"float"`` (a mask per query row) or ``"bool-keys"``/``"float-keys"`` (one row of
    keys broadcast over the queries: key padding). Reads the mask's shape and dtype only."""
    if mask is None:
        return "none"
    kind = "bool" if mask.dtype == torch.bool else "float"
    return f"{kind}-keys" if mask.shape[-2] == 1 else kind


@dataclass(frozen=True)
class Signature:
    """One call signature: the canonical sizes of ``problem.py`` (``pairs = B * H``), dtype and flags.

    Attributes:
        dtype: the query dtype's torch name, e.g. ``"float16"``.
        pairs: batch × key/value heads.
        g: query heads per key/value head (1 without GQA).
        l, s: query and key lengths (bucketed ones in a cache key, see :meth:`bucketed`).
        e, ev: head sizes of query/key and of value.
        mask: :func:`mask_kind`.
        causal: top-left causal masking.
        grad: forward and backward (else forward only).
    """

    dtype: str
    pairs: int
    g: int
    l: int  # noqa: E741 - the paper's name for the query length
    s: int
    e: int
    ev: int
    mask: str = "none"
    causal: bool = False
    grad: bool = False

    def bucketed(self) -> Signature:
        """The same signature with L and S replaced by their buckets' lengths."""
        return Signature(self.dtype, self.pairs, self.g, bucket_length(self.l), bucket_length(self.s), self.e,
                         self.ev, self.mask, self.causal, self.grad)

    def key(self) -> str:
        """The cache key: the bucketed signature as one readable string."""
        b = self.bucketed()
        return (f"{b.dtype} bh={b.pairs} g={b.g} L~{b.l} S~{b.s} E={b.e} Ev={b.ev} mask={b.mask} "
                f"causal={int(b.causal)} grad={int(b.grad)}")

    def to_dict(self) -> Dict[str, object]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Dict[str, object]) -> Signature:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__})  # type: ignore[arg-type]


def signature_of(problem: AttentionProblem, requires_grad: bool) -> Signature:
    """The signature of a canonical problem (shapes, dtype and flags only)."""
    b, h, g, length, s, e, ev = problem.dims
    dtype = str(problem.query.dtype).replace("torch.", "")
    return Signature(dtype, b * h, g, length, s, e, ev, mask_kind(problem.mask), bool(problem.is_causal),
                     bool(requires_grad))


def _runtime(profile: DeviceProfile) -> str:
    if profile.kind == "rocm":
        return f"hip {torch.version.hip}"
    if profile.kind == "cuda":
        return f"cuda {torch.version.cuda}"
    if profile.kind == "xpu":
        return f"xpu {getattr(torch.version, 'xpu', None)}"
    if profile.kind == "mps":
        return f"macos {platform.mac_ver()[0]}"
    return f"cpu threads={torch.get_num_threads()}"


def device_identity(device: Optional[object] = None) -> Optional[Dict[str, object]]:
    """What a tuning result on ``device`` holds for: kind, product name, arch, total memory, runtime (CUDA/HIP
    version, macOS, or the CPU thread count) and torch version. None for meta and simulated devices (nothing is
    measured there)."""
    profile = device if isinstance(device, DeviceProfile) else device_profile(device)
    if profile.simulated or profile.kind == "meta":
        return None
    return {
        "kind": profile.kind,
        "name": profile.description,
        "arch": profile.arch,
        "total_bytes": profile.total_bytes,
        "runtime": _runtime(profile),
        "torch": torch.__version__,
    }


def device_key(identity: Dict[str, object]) -> str:
    """The identity as one string (the cache's device key): its fields joined by ``|``."""
    return "|".join(str(identity.get(k)) for k in _IDENTITY_FIELDS)


@functools.lru_cache(maxsize=64)
def _cached_key(profile: DeviceProfile, threads: int, torch_version: str) -> Optional[str]:
    identity = device_identity(profile)
    return None if identity is None else device_key(identity)


def profile_key(profile: DeviceProfile) -> Optional[str]:
    """:func:`device_key` of a profile, cached (by the profile, the CPU thread count and the torch version)."""
    return _cached_key(profile, torch.get_num_threads() if profile.kind == "cpu" else 0, torch.__version__)
