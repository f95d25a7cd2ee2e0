"""Exact live-bytes accounting for tensor storages, on any device, fake tensors included.

:class:`LiveBytesTracker` is a :class:`~torch.utils._python_dispatch.TorchDispatchMode`. After every aten op
dispatched inside the context it looks at the untyped storages of the op's output tensors. A storage it has
not seen before, and that does not alias one of the op's inputs, is *new*: its ``nbytes()`` are added to
:attr:`LiveBytesTracker.live_bytes` and a weak reference with a callback is attached to the storage object,
which subtracts the bytes again when the storage is freed.

That relies on PyTorch's *PyObject preservation* for storages (torch >= 2.1): the Python ``UntypedStorage``
object of a storage lives exactly as long as the C++ ``StorageImpl``, however many tensors or views share it,
so a weakref callback on it fires when the memory is released, not when some Python wrapper goes away. The
behaviour is checked once, on the first ``__enter__``.

:class:`MemoryBudget` adds a limit: an op whose new storages would push live bytes above ``limit_bytes``
raises :class:`torch.OutOfMemoryError` from inside its dispatch, which makes OOM-retry logic testable on CPU
(real or fake tensors).

What is counted, exactly:

- output storages of every aten op run under the mode (factory functions, ``.to()``/``clone``/arithmetic,
  backward ops), once per storage; views, in-place ops and ``out=`` ops that reuse an existing storage add
  nothing;
- ``torch.tensor(...)`` data (seen through ``aten.lift_fresh``);
- growth of a *tracked* storage by ``resize_`` (or an ``out=`` op that resizes its output) adds the
  difference in ``nbytes``.

Caveats (not counted): storages that existed before the context was entered (also if they grow inside it);
the transient old buffer while ``resize_`` reallocates; kernel-internal scratch memory that never becomes an
op output; tensors created without dispatching an aten op (``torch.from_numpy``, ``torch.frombuffer``);
non-strided layouts (sparse, nested); allocator caching or fragmentation. Ops are only seen on the thread that
entered the mode (and the autograd engine's threads, which inherit it).
"""

from __future__ import annotations

import logging
import operator
import threading
import weakref
from typing import Any, Callable, Iterator, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["LiveBytesTracker", "MemoryBudget"]

logger = logging.getLogger(__name__)

_LIFT_FRESH = frozenset(
    op
    for op in (
        getattr(torch.ops.aten.lift_fresh, "default", None),
        getattr(getattr(torch.ops.aten, "lift", None), "default", None),
    )
    if op is not None
)

_preservation_checked = False


class _StorageRef(weakref.ref):
    """Weak reference to an ``UntypedStorage`` that remembers its key and counted size."""

    __slots__ = ("key", "nbytes")

    key: int
    nbytes: int


def _check_storage_preservation() -> None:
    """Fail loudly if storage PyObjects do not live exactly as long as their C++ storage.

    Raises:
        RuntimeError: on a torch build without storage PyObject preservation, where the finalizers used by
            the tracker would fire too early.
    """
    global _preservation_checked
    if _preservation_checked:
        return
    t = torch.empty(1)
    ref = weakref.ref(t.untyped_storage())
    view = t[:1]
    del t
    alive_with_view = ref() is not None and ref() is view.untyped_storage()
    del view
    if not alive_with_view or ref() is not None:
        raise RuntimeError(
            "noflash_core.memory.tracker needs storage PyObject preservation (torch >= 2.1): "
            f"this torch {torch.__version__} frees storage objects independently of their data"
        )
    _preservation_checked = True


def _iter_tensors(obj: Any) -> Iterator[torch.Tensor]:
    """Yield every tensor in ``obj`` (a tensor, or nested tuples/lists/dicts of them)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            yield from _iter_tensors(item)
    elif obj is not None and not isinstance(obj, (int, float, bool, str, torch.dtype, torch.device)):
        for leaf in tree_flatten(obj)[0]:
            if isinstance(leaf, torch.Tensor):
                yield leaf


def _storage_of(t: torch.Tensor) -> Optional[torch.UntypedStorage]:
    """Return the untyped storage of a strided tensor, or None when it has none we can account for."""
    if t.layout is not torch.strided:
        return None
    try:
        return t.untyped_storage()
    except (RuntimeError, NotImplementedError):
        return None


def _nbytes(storage: torch.UntypedStorage) -> int:
    """Size of ``storage`` in bytes as a Python int (0 if it is symbolic and has no hint)."""
    n = storage.nbytes()
    try:
        return int(n)
    except (TypeError, RuntimeError):
        logger.debug("storage with symbolic nbytes %r counted as 0", n)
        return 0


def _input_storage_ids(args: tuple, kwargs: dict) -> set[int]:
    """Identities of the storages referenced by an op's arguments (tensors and storages alike)."""
    ids: set[int] = set()
    stack: list[Any] = [args, kwargs]
    while stack:
        obj = stack.pop()
        if isinstance(obj, torch.Tensor):
            st = _storage_of(obj)
            if st is not None:
                ids.add(id(st))
        elif isinstance(obj, (tuple, list)):
            stack.extend(obj)
        elif isinstance(obj, dict):
            stack.extend(obj.values())
        elif isinstance(obj, torch.UntypedStorage):
            ids.add(id(obj))
        elif isinstance(obj, torch.TypedStorage):
            ids.add(id(obj.untyped()))
    return ids


def _python_kernel(func: Any) -> Optional[Callable[..., Any]]:
    """The Python implementation of an op defined with ``torch.library.custom_op``, or None for other ops."""
    name = getattr(getattr(func, "_schema", None), "name", None)
    if not name or name.startswith("aten::"):
        return None
    from torch._library.custom_ops import OPDEFS

    opdef = OPDEFS.get(name)
    return getattr(opdef, "_init_fn", None) if opdef is not None else None


def _counter(attr: str, doc: str) -> property:
    """A read-only int property that returns ``self.<attr>``."""
    return property(operator.attrgetter(attr), doc=doc)


class LiveBytesTracker(TorchDispatchMode):
    """Count the bytes of tensor storages allocated inside the context that are still alive.

    Example::

        with LiveBytesTracker() as tr:
            x = torch.empty(1024)          # +4096
            y = x[10:].view(-1)            # view: +0
            del x, y                       # storage freed: -4096
        tr.peak_bytes  # 4096

    Works for real tensors on any device and under
    :class:`torch._subclasses.fake_tensor.FakeTensorMode` (entered outside or inside the tracker), where the
    fake storages report the bytes they would occupy. Frees are still observed after the context exits, so
    :attr:`live_bytes` stays exact for storages created inside it. Entering again resets :attr:`peak_bytes`
    to the current :attr:`live_bytes`; counts of still-alive storages carry over.
    """

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.RLock()
        self._entries: dict[int, _StorageRef] = {}
        self._live = 0
        self._peak = 0
        self._allocations = 0
        self._frees = 0
        self._on_free_cb = self._on_free

    # ------------------------------------------------------------------ public state (read-only counters)
    live_bytes = _counter("_live", "Bytes of counted storages that are still alive.")
    peak_bytes = _counter("_peak", "Maximum of :attr:`live_bytes` since the last ``__enter__`` or :meth:`reset_peak`.")
    allocations = _counter(
        "_allocations", "Number of storages counted so far (growth of a counted storage is not a new allocation)."
    )
    frees = _counter("_frees", "Number of counted storages that have been freed.")

    @property
    def live_storages(self) -> int:
        """Number of counted storages still alive."""
        return len(self._entries)

    def reset_peak(self) -> None:
        """Set :attr:`peak_bytes` to the current :attr:`live_bytes`."""
        with self._lock:
            self._peak = self._live

    def __enter__(self) -> LiveBytesTracker:
        _check_storage_preservation()
        self.reset_peak()
        super().__enter__()
        return self

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(live_bytes={self._live}, peak_bytes={self._peak}, "
            f"allocations={self._allocations}, frees={self._frees})"
        )

    # ------------------------------------------------------------------ dispatch
    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple = (), kwargs: Optional[dict] = None
    ) -> Any:
        if kwargs is None:
            kwargs = {}
        kernel = _python_kernel(func)
        if kernel is not None:
            # A custom op's kernel is Python code made of aten ops, and a dispatch mode is popped while it runs the
            # op it intercepted. Run the kernel itself with the mode active, so its scratch memory is counted too.
            with self:
                out = kernel(*args, **kwargs)
        else:
            out = func(*args, **kwargs)
        new, grown = self._collect(func, out, args, kwargs)
        if new or grown:
            requested = sum(nb for _, nb in new) + sum(nb - ref.nbytes for ref, nb in grown)
            with self._lock:
                try:
                    self._admit(func, requested)
                except BaseException:
                    # Drop every reference this frame holds so the rejected outputs are freed now,
                    # not when the exception's traceback dies.
                    del out, new, grown
                    raise
                self._commit(new, grown, requested)
        return out

    def _admit(self, func: Any, requested: int) -> None:
        """Hook called (under the lock) before ``requested`` new bytes are counted; may raise to reject."""

    def _collect(
        self, func: Any, out: Any, args: tuple, kwargs: dict
    ) -> tuple[list[tuple[torch.UntypedStorage, int]], list[tuple[_StorageRef, int]]]:
        """Find the new storages among ``out``'s tensors, and counted storages that grew.

        Returns:
            ``(new, grown)``: ``new`` lists ``(storage, nbytes)`` of storages seen for the first time that do
            not alias an input; ``grown`` lists ``(ref, new_nbytes)`` of counted storages now larger.
        """
        new: list[tuple[torch.UntypedStorage, int]] = []
        grown: list[tuple[_StorageRef, int]] = []
        new_ids: set[int] = set()
        input_ids: Optional[set[int]] = None
        entries = self._entries
        for t in _iter_tensors(out):
            st = _storage_of(t)
            if st is None:
                continue
            key = id(st)
            ref = entries.get(key)
            if ref is not None:
                nb = _nbytes(st)
                if nb > ref.nbytes:
                    grown.append((ref, nb))
                continue
            if key in new_ids:
                continue
            if input_ids is None:
                input_ids = set() if func in _LIFT_FRESH else _input_storage_ids(args, kwargs)
            if key in input_ids:
                continue
            new_ids.add(key)
            new.append((st, _nbytes(st)))
        return new, grown

    def _commit(
        self,
        new: list[tuple[torch.UntypedStorage, int]],
        grown: list[tuple[_StorageRef, int]],
        requested: int,
    ) -> None:
        """Count admitted storages and attach free callbacks (caller holds the lock)."""
        entries = self._entries
        for st, nb in new:
            ref = _StorageRef(st, self._on_free_cb)
            ref.key = id(st)
            ref.nbytes = nb
            entries[ref.key] = ref
        for ref, nb in grown:
            ref.nbytes = nb
        self._allocations += len(new)
        self._live += requested
        if self._live > self._peak:
            self._peak = self._live

    def _on_free(self, ref: _StorageRef) -> None:
        """Weakref callback: a counted storage was freed."""
        with self._lock:
            if self._entries.get(ref.key) is ref:
                del self._entries[ref.key]
                self._live -= ref.nbytes
                self._frees += 1


class MemoryBudget(LiveBytesTracker):
    """A :class:`LiveBytesTracker` that raises ``torch.OutOfMemoryError`` past a byte limit.

    When an op's new output storages (plus growth of counted storages) would make :attr:`live_bytes` exceed
    :attr:`limit_bytes`, the op raises :class:`torch.OutOfMemoryError` from inside its dispatch; the rejected
    outputs are not counted and are dropped as the exception propagates. Only bytes allocated inside the
    context count against the limit. ``limit_bytes`` may be changed at any time; ``None`` disarms the budget
    (it then behaves like a plain tracker).

    Args:
        limit_bytes: the most live bytes allowed, or None for no limit.
    """

    def __init__(self, limit_bytes: Optional[int]) -> None:
        super().__init__()
        if limit_bytes is not None and limit_bytes < 0:
            raise ValueError(f"limit_bytes must be >= 0 or None, got {limit_bytes}")
        self.limit_bytes: Optional[int] = limit_bytes
        self._ooms = 0

    @property
    def ooms_raised(self) -> int:
        """How many ops this budget has rejected with ``torch.OutOfMemoryError``."""
        return self._ooms

    def _admit(self, func: Any, requested: int) -> None:
        limit = self.limit_bytes
        if limit is None or self._live + requested <= limit:
            return
        self._ooms += 1
        msg = (
            f"MemoryBudget: {func} requested {requested} bytes with {self._live} bytes live; "
            f"live + requested = {self._live + requested} > limit {limit} bytes"
        )
        logger.debug(msg)
        raise torch.OutOfMemoryError(msg)

    def __repr__(self) -> str:
        return f"{super().__repr__()[:-1]}, limit_bytes={self.limit_bytes}, ooms_raised={self._ooms})"
