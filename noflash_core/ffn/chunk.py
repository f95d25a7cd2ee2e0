"""Run a feed-forward module over the token dimension in chunks, after checking that this is exact.

A token-local module ``f`` satisfies ``f(x)[..., i, :] == f(x[..., i, :])`` for every token ``i``, so running
it on slices of the tokens and writing the slices into one output gives the unchunked result while only one
slice's hidden activation (``tokens/chunks x H``) is alive at a time.

Structure (:mod:`noflash_core.ffn.detect`) does not prove token-locality, so :class:`ChunkedForward` checks it
on the first real call of each input signature (shape without the token dim, dtype, device,
``requires_grad``): it runs the module on the first ``VERIFY_TOKENS`` tokens of the real input once whole and
once split into three uneven chunks (16, a multiple of 16, the rest) and compares. A module that fails, raises
or changes shape runs unchunked from then on (logged once), so a wrapped module never returns a chunked
result that differs from its own unchunked result by more than rounding.

Tolerance. Both runs do the same arithmetic per token; they differ only where a kernel picks another
accumulation order or blocking for another row count. Per output element::

    |chunked - unchunked| <= 2 u |ref| + (2 r u + 4 u_acc sqrt(K)) rms(ref)

- ``u`` is the eps of the storage dtype (bf16 2^-7, fp16 2^-10, fp32 2^-23, or TF32/bf16 when the float32
  matmul precision is lowered). Every layer output is rounded to it: the final rounding flips an element by at
  most one ulp in each run (``2 u |ref|``); a flip in an intermediate is carried by the next linear layer to
  output changes of the same relative size in the RMS sense, so each of the ``r`` roundings on the path
  (``FFNInfo.roundings``: 3 for Linear-act-Linear, 5 for three-projection SwiGLU) adds ``2 u rms``. This
  term also covers split-K partial sums combined in the storage dtype.
- ``u_acc sqrt(K)``: two summation orders of a length-``K`` dot product in the accumulator precision
  (fp32 for fp32/bf16/fp16 GEMMs, fp64 for fp64) differ by about ``u_acc sqrt(K)`` relative to the result in
  the probabilistic rounding-error model (Higham & Mary, SIAM J. Sci. Comput. 2019); ``K = D + H`` sums
  both matmuls, and 4 is a safety factor for the maximum over many elements.

For a Wan FFN (D 1536, H 8960) that is about ``0.016 |ref| + 0.047 rms`` in bf16 and ``5e-5 rms`` in
fp32, while token mixing (a cumsum, a mean or attention over tokens, evaluated on a 16-token first chunk)
changes the result by O(rms). A flat ``1e-3`` would fail every bf16 module and pass small mixing in fp32.
"""

from __future__ import annotations

import logging
import math
import os
import types
from typing import Any, Callable, List, Optional, Tuple

import torch
from torch import nn

from ..tracing import is_compiling
from .detect import FFNInfo, estimate_ffn_info

__all__ = ["ChunkedForward", "chunked_forward", "resolve_num_chunks", "ENV_CHUNKS", "VERIFY_TOKENS"]

logger = logging.getLogger(__name__)

ENV_CHUNKS = "NOFLASH_FFN_CHUNKS"
"""Environment variable with the default chunk count (0 or unset: adaptive)."""

VERIFY_TOKENS = 256
"""Tokens of the real input used to verify token-locality (three chunks: 16, a multiple of 16, the rest)."""

_BUDGET_FRACTION = 0.5  # of the working-memory budget given to one chunk's FFN intermediates


def resolve_num_chunks(num_chunks: int = 0) -> int:
    """Validate ``num_chunks``; ``0`` means the ``NOFLASH_FFN_CHUNKS`` default (itself 0 = adaptive).

    Raises:
        ValueError: for a negative or non-integer count, or a malformed environment variable.
    """
    if isinstance(num_chunks, bool) or not isinstance(num_chunks, int) or num_chunks < 0:
        raise ValueError(f"num_chunks must be an int >= 0 (0 = adaptive), got {num_chunks!r}")
    if num_chunks:
        return num_chunks
    raw = os.environ.get(ENV_CHUNKS, "").strip()
    if not raw:
        return 0
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        raise ValueError(f"{ENV_CHUNKS}={raw!r}: use 0 (adaptive) or a positive chunk count such as 8")
    return value


def chunked_forward(module: nn.Module, num_chunks: int = 0, *, name: Optional[str] = None) -> ChunkedForward:
    """A replacement ``forward`` for ``module`` that runs it in token chunks once verified exact.

    The callable takes the same arguments as ``module.forward``. Only a call with one tensor argument of
    shape ``(..., N, C)`` is chunked, along ``N`` (dim -2; dim 0 of a 2-D ``(N, C)`` input); anything else
    goes to the original forward unchanged. Install it either as ``module.forward = fn`` or, on a ComfyUI
    ModelPatcher clone, with ``add_object_patch(path + ".forward", fn)``.

    Each chunk goes through the class's ``forward`` bound to ``module`` (captured now), never through
    ``module.forward``: installed as that attribute, the callable would otherwise call itself. An instance
    ``forward`` present now (say another clone's object patch that ComfyUI has not unpatched yet) is not
    chained.

    Args:
        module: the feed-forward module (see :func:`~noflash_core.ffn.detect.find_ffn_modules`).
        num_chunks: chunks per call; 0 = ``NOFLASH_FFN_CHUNKS`` or, when unset, adaptive: chunks sized so one
            chunk's intermediates take at most half of ``noflash_core.budget.resolve_budget(device)``.
        name: the module's path, for log messages.

    Returns:
        A :class:`ChunkedForward` (callable).
    """
    return ChunkedForward(module, num_chunks, name=name)


class ChunkedForward:
    """Callable chunked forward of one module, with per-signature verification and permanent fallback.

    Args:
        module, num_chunks, name: as for :func:`chunked_forward`.
        original: the forward to run per chunk; default: the class's ``forward`` bound to ``module``.
            :func:`~noflash_core.ffn.patch.patch_ffn` passes an instance ``forward`` it finds, to chain it.

    Attributes:
        module: the wrapped module.
        original: the forward each chunk goes through.
        num_chunks: the resolved chunk count (0 = adaptive).
        name: the path used in log messages.
        info: the FFN shape used for sizing chunks and the tolerance.
        passthrough: set once verification failed; every later call runs unchunked.
        chunked_calls: calls that ran in chunks (for tests and diagnostics).
        last_split: ``(tokens, tokens per chunk)`` of the last chunked call (the FFN Chunker's badge reads it).
    """

    def __init__(
        self,
        module: nn.Module,
        num_chunks: int = 0,
        *,
        name: Optional[str] = None,
        original: Optional[Callable[..., Any]] = None,
    ) -> None:
        self.module = module
        self.original: Callable[..., Any] = original if original is not None else _class_forward(module)
        self.num_chunks = resolve_num_chunks(num_chunks)
        self.name = name if name is not None else type(module).__name__
        self.info: FFNInfo = estimate_ffn_info(module)
        self.passthrough = False
        self.failure: Optional[str] = None
        self.chunked_calls = 0
        self.last_split: Optional[Tuple[int, int]] = None
        self._verified: set = set()
        self._stochastic = [m for m in module.modules() if isinstance(m, (nn.modules.dropout._DropoutNd, nn.RReLU))]

    def __repr__(self) -> str:
        mode = "passthrough" if self.passthrough else f"num_chunks={self.num_chunks or 'adaptive'}"
        return f"ChunkedForward({self.name}, {mode})"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.passthrough or kwargs or len(args) != 1 or not isinstance(args[0], torch.Tensor):
            return self.original(*args, **kwargs)
        x = args[0]
        if x.dim() < 2 or is_compiling() or self._is_stochastic():
            return self.original(x)
        dim = x.dim() - 2
        n_tokens = x.shape[dim]
        chunk = self._chunk_tokens(x, n_tokens)
        if chunk >= n_tokens:
            return self.original(x)
        if not _is_fake(x):  # fake/meta values say nothing about locality; they only size memory
            signature = (tuple(x.shape[:dim]) + tuple(x.shape[dim + 1 :]), x.dtype, x.device, x.requires_grad)
            if signature not in self._verified:
                status, detail = self._verify(x, dim)
                if status == "inconclusive":
                    return self.original(x)
                if status == "fail":
                    self._give_up(detail)
                    return self.original(x)
                self._verified.add(signature)
        return self._run(x, dim, chunk)

    # -- pieces ------------------------------------------------------------------------------------------

    def _is_stochastic(self) -> bool:
        """Active dropout draws different masks per chunk: such calls run unchunked (training only)."""
        return any(m.training and getattr(m, "p", 1.0) != 0 for m in self._stochastic)

    def _chunk_tokens(self, x: torch.Tensor, n_tokens: int) -> int:
        """Tokens per chunk for ``x``: from ``num_chunks``, or adaptive from the memory budget."""
        if self.num_chunks:
            num = self.num_chunks
        else:
            rows_per_token = x.numel() // max(1, n_tokens * x.shape[-1])
            per_token = max(1, rows_per_token * self.info.width_per_token * x.element_size())
            fits = int(_budget_bytes(x.device) * _BUDGET_FRACTION) // per_token
            num = math.ceil(n_tokens / max(1, fits))
        return math.ceil(n_tokens / max(1, num))  # balanced chunks

    def _run(self, x: torch.Tensor, dim: int, chunk: int) -> torch.Tensor:
        """Chunked evaluation: preallocated output without autograd, concatenation with it.

        Shapes: ``x`` (..., N, C) -> (..., N, C'); chunks (..., chunk, C) go through ``original``.
        """
        n_tokens = x.shape[dim]
        self.chunked_calls += 1
        self.last_split = (n_tokens, chunk)
        needs_graph = torch.is_grad_enabled() and (
            x.requires_grad or any(p.requires_grad for p in self.module.parameters())
        )
        starts = range(0, n_tokens, chunk)
        if needs_graph:  # autograd keeps every chunk's saved tensors anyway; cat gives exact gradients
            pieces = [self.original(x.narrow(dim, s, min(chunk, n_tokens - s)).contiguous()) for s in starts]
            return torch.cat(pieces, dim)
        out: Optional[torch.Tensor] = None
        for start in starts:
            length = min(chunk, n_tokens - start)
            piece = self.original(x.narrow(dim, start, length).contiguous())
            if not _same_layout(piece, x, dim, length):
                self._give_up(f"a chunk returned {_describe(piece)} for input {tuple(x.shape)}")
                del piece, out
                return self.original(x)
            if out is None:
                shape = list(piece.shape)
                shape[dim] = n_tokens
                out = piece.new_empty(shape)
            out.narrow(dim, start, length).copy_(piece)
            del piece  # free this chunk's output before the next chunk runs
        assert out is not None
        return out

    def _verify(self, x: torch.Tensor, dim: int) -> Tuple[str, str]:
        """Chunked vs unchunked on the first tokens of ``x``: ("ok"|"fail"|"inconclusive", detail)."""
        length = min(x.shape[dim], VERIFY_TOKENS)
        head = x.narrow(dim, 0, length).detach().contiguous()
        sizes = _verification_splits(length)
        try:
            with torch.no_grad():
                ref = self.original(head)
                pieces = [self.original(p.contiguous()) for p in head.split(sizes, dim)]
                if not isinstance(ref, torch.Tensor) or not all(isinstance(p, torch.Tensor) for p in pieces):
                    return "fail", "it does not return a tensor"
                if not all(_same_layout(p, x, dim, n) for p, n in zip(pieces, sizes)):
                    return "fail", f"its output does not keep the token dim (got {_describe(pieces[0])})"
                got = torch.cat(pieces, dim)
                del pieces
                return _compare(got, ref, self.info, length)
        except torch.OutOfMemoryError:
            raise  # not evidence against chunking; the unchunked call would need more memory still
        except Exception as exc:  # noqa: BLE001 - any other failure of the chunked path means: do not chunk
            return "fail", f"chunked verification raised {type(exc).__name__}: {exc}"

    def _give_up(self, detail: str) -> None:
        self.passthrough = True
        self.failure = detail
        logger.warning("noflash FFN: not chunking %s from now on: %s", self.name, detail)


# -- helpers -----------------------------------------------------------------------------------------------


def _compare(got: torch.Tensor, ref: torch.Tensor, info: FFNInfo, tokens: int) -> Tuple[str, str]:
    if got.shape != ref.shape or got.dtype != ref.dtype:
        return "fail", f"chunked output {_describe(got)} differs in shape/dtype from {_describe(ref)}"
    if not ref.is_floating_point():
        same = bool(torch.equal(got, ref))
        return ("ok", "") if same else ("fail", "chunked integer output differs")
    if not bool(torch.isfinite(ref).all()):
        return "inconclusive", "non-finite reference"
    if not bool(torch.isfinite(got).all()):
        return "fail", "chunked output has non-finite values where the unchunked one has none"
    wide = torch.promote_types(ref.dtype, torch.float32)
    ref_w, got_w = ref.to(wide), got.to(wide)
    tol = _tolerance(ref_w, ref.dtype, ref.device.type, info)
    excess = ((got_w - ref_w).abs() / tol).max().item() if ref.numel() else 0.0
    if excess <= 1.0:
        return "ok", ""
    diff = (got_w - ref_w).abs().max().item()
    return (
        "fail",
        f"chunked and unchunked results differ by up to {diff:.3g} ({excess:.3g}x the rounding tolerance) "
        f"on {tokens} tokens split {_verification_splits(tokens)}: the module mixes tokens",
    )


def _tolerance(ref: torch.Tensor, dtype: torch.dtype, device_type: str, info: FFNInfo) -> torch.Tensor:
    """Per-element bound on |chunked - unchunked| for a token-local module (see the module docstring)."""
    u = _storage_eps(dtype, device_type)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    u_acc = torch.finfo(acc).eps
    rms = ref.pow(2).mean().sqrt().item()
    spread = (2 * info.roundings * u + 4 * u_acc * math.sqrt(info.reduction_length)) * rms
    floor = torch.finfo(dtype).tiny
    return ref.abs() * (2 * u) + (spread + floor)


def _storage_eps(dtype: torch.dtype, device_type: str) -> float:
    """Eps of the precision results are rounded to; float32 matmuls may round inputs to TF32 or bf16."""
    eps = torch.finfo(dtype).eps
    if dtype != torch.float32:
        return eps
    precision = torch.get_float32_matmul_precision()
    if precision == "medium":
        return max(eps, 2.0**-7)
    tf32 = device_type == "cuda" and bool(getattr(torch.backends.cuda.matmul, "allow_tf32", False))
    if precision == "high" or tf32:
        return max(eps, 2.0**-10)
    return eps


def _verification_splits(length: int) -> List[int]:
    """Three uneven chunk sizes (16, a multiple of 16, rest) so the check crosses two chunk boundaries."""
    if length >= 48:
        second = 16 * ((length - 16) // 32)
        return [16, second, length - 16 - second]
    third = max(1, length // 3)
    return [s for s in (third, third, length - 2 * third) if s > 0]


def _same_layout(piece: Any, x: torch.Tensor, dim: int, length: int) -> bool:
    return isinstance(piece, torch.Tensor) and piece.dim() == x.dim() and piece.shape[dim] == length


def _describe(t: Any) -> str:
    if isinstance(t, torch.Tensor):
        return f"tensor{tuple(t.shape)} {t.dtype}"
    return type(t).__name__


def _class_forward(module: nn.Module) -> Callable[..., Any]:
    """``type(module).forward`` bound to ``module`` (a bound method, so ``copy.deepcopy`` rebinds it)."""
    return types.MethodType(type(module).forward, module)


def _budget_bytes(device: torch.device) -> int:
    from ..budget import resolve_budget  # lazy: keeps this module importable on its own

    return int(resolve_budget(device))


def _is_fake(x: torch.Tensor) -> bool:
    if x.device.type == "meta":
        return True
    try:
        from torch._subclasses.fake_tensor import is_fake
    except ImportError:  # pragma: no cover - old torch
        return False
    return bool(is_fake(x))
