"""The persistent tuning cache: one JSON file, where it lives, and safe concurrent updates.

Location: ``NOFLASH_TUNE_CACHE`` when set (a path ending in ``.json`` is the file itself, anything else a folder
that holds ``tune.json``), else the user cache folder: ``$XDG_CACHE_HOME/noflash`` or ``~/.cache/noflash`` on
Linux and other POSIX systems, ``~/Library/Caches/noflash`` on macOS, ``%LOCALAPPDATA%\\noflash\\Cache`` on
Windows. Never a shared temporary folder.

Format (``docs/tuning.md`` describes it in full)::

    {"format": "noflash-tune", "version": 1,
     "devices": {"<device key>": {"identity": {...}, "entries": {"<signature key>": <entry>, ...}}}}

Several processes may tune at once (two ComfyUI instances, a CLI run beside ComfyUI): every update takes a lock
file next to the cache (created with ``O_CREAT | O_EXCL``, which works the same on Windows and POSIX; a lock older
than :data:`STALE_LOCK_S` is taken to be left by a dead process and removed), re-reads the file, merges its own
entries in (other entries and other devices are kept) and replaces the file atomically (a temporary file in the
same folder, then ``os.replace``). Readers never lock: they see the old file or the new one, never half of one.

A file that cannot be read (bad JSON, another format, a newer version) is ignored with one warning per process
and path, never an exception; an update moves a corrupt file aside to ``tune.json.corrupt`` and starts afresh,
but leaves a newer version's file alone.
"""

from __future__ import annotations

import contextlib
import json
import logging
import ntpath
import os
import posixpath
import sys
import tempfile
import time
from typing import Any, Callable, Dict, Iterator, Mapping, Optional

__all__ = [
    "ENV_VAR",
    "FILE_NAME",
    "FORMAT",
    "STALE_LOCK_S",
    "VERSION",
    "cache_path",
    "empty_document",
    "file_lock",
    "read_document",
    "update_document",
]

_log = logging.getLogger(__name__)

ENV_VAR = "NOFLASH_TUNE_CACHE"
FILE_NAME = "tune.json"
FORMAT = "noflash-tune"
VERSION = 1
STALE_LOCK_S = 60.0
"""A lock file older than this is left by a process that died while holding it; it is removed."""
_LOCK_TIMEOUT_S = 120.0
_warned: set = set()


def cache_path(environ: Optional[Mapping[str, str]] = None, platform: Optional[str] = None,
               home: Optional[str] = None) -> str:
    """The cache file's path.

    Args:
        environ: the environment (default ``os.environ``).
        platform: a ``sys.platform`` value (default this one's): ``"win32"``, ``"darwin"``, ``"linux"``, ...
        home: the user's home folder (default ``~`` expanded).
    """
    env = os.environ if environ is None else environ
    plat = sys.platform if platform is None else platform
    windows = plat.startswith("win")
    path_mod = ntpath if windows else posixpath
    override = env.get(ENV_VAR, "").strip()
    if override:
        return override if override.lower().endswith(".json") else path_mod.join(override, FILE_NAME)
    home = home if home is not None else os.path.expanduser("~")
    if windows:
        base = env.get("LOCALAPPDATA") or ntpath.join(home, "AppData", "Local")
        return ntpath.join(base, "noflash", "Cache", FILE_NAME)
    if plat == "darwin":
        return posixpath.join(home, "Library", "Caches", "noflash", FILE_NAME)
    base = env.get("XDG_CACHE_HOME") or posixpath.join(home, ".cache")
    return posixpath.join(base, "noflash", FILE_NAME)


def empty_document() -> Dict[str, Any]:
    return {"format": FORMAT, "version": VERSION, "devices": {}}


def _warn_once(path: str, message: str, *args: object) -> None:
    if path not in _warned:
        _warned.add(path)
        _log.warning(message, *args)


def _parse(text: str) -> Dict[str, Any]:
    """The document in ``text``; raises ValueError (with the reason) for anything not a version-1 cache."""
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON ({exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        fmt = doc.get("format") if isinstance(doc, dict) else None
        raise ValueError(f"not a noflash tuning cache (format {fmt!r})")
    if doc.get("version") != VERSION:
        raise ValueError(f"version {doc.get('version')!r}; this noflash reads version {VERSION}")
    devices = doc.get("devices")
    if not isinstance(devices, dict) or not all(
        isinstance(d, dict) and isinstance(d.get("entries"), dict) for d in devices.values()
    ):
        raise ValueError("its 'devices' table is malformed")
    return doc


def read_document(path: str) -> Dict[str, Any]:
    """The cache at ``path``; an empty document when it is missing, and (with one warning) when it is corrupt or
    foreign. Never raises for the file's contents."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        return empty_document()
    except (OSError, UnicodeDecodeError) as exc:
        _warn_once(path, "noflash: cannot read the tuning cache %s (%s); tuned plans are not used.", path, exc)
        return empty_document()
    try:
        return _parse(text)
    except ValueError as exc:
        _warn_once(path, "noflash: ignoring the tuning cache %s: %s. Tune again to replace it, or delete it.",
                   path, exc)
        return empty_document()


def _lock_age(lock: str) -> Optional[float]:
    try:
        return time.time() - os.path.getmtime(lock)
    except OSError:
        return None


@contextlib.contextmanager
def file_lock(path: str, timeout_s: float = _LOCK_TIMEOUT_S, stale_s: float = STALE_LOCK_S) -> Iterator[str]:
    """Hold ``path + ".lock"`` (created with ``O_EXCL``) for a read-modify-write of ``path``.

    Raises:
        TimeoutError: another process held the lock for ``timeout_s`` and it is not stale.
    """
    lock = path + ".lock"
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            age = _lock_age(lock)
            if age is not None and age > stale_s:
                _log.warning("noflash: removing the stale tuning-cache lock %s (%.0f s old)", lock, age)
                with contextlib.suppress(OSError):
                    os.remove(lock)
                continue
            if time.monotonic() > deadline:
                raise TimeoutError(f"the tuning cache lock {lock} was held for {timeout_s:.0f} s") from None
            time.sleep(0.02)
    try:
        os.write(fd, f"{os.getpid()}\n".encode())
        os.close(fd)
        yield lock
    finally:
        with contextlib.suppress(OSError):
            os.remove(lock)


def _replace(tmp: str, path: str) -> None:
    """``os.replace``, retried briefly: on Windows a reader holding the target open makes it fail for a moment."""
    for attempt in range(50):
        try:
            os.replace(tmp, path)
            return
        except PermissionError:
            if attempt == 49:
                raise
            time.sleep(0.02)


def _write_atomic(path: str, doc: Dict[str, Any]) -> None:
    folder = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix=".tune-", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=1, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        _replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def _current(path: str) -> Optional[Dict[str, Any]]:
    """The document to merge into; a corrupt file is moved aside (None: a newer version's file, left alone)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        return empty_document()
    try:
        return _parse(text)
    except ValueError as exc:
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            data = None
        if isinstance(data, dict) and data.get("format") == FORMAT and data.get("version") != VERSION:
            _log.warning("noflash: the tuning cache %s was written by another noflash version (%s); not changing it. "
                         "Point NOFLASH_TUNE_CACHE elsewhere to keep both.", path, exc)
            return None
        _log.warning("noflash: the tuning cache %s is unreadable (%s); moving it to %s.corrupt and starting afresh.",
                     path, exc, path)
        os.replace(path, path + ".corrupt")
        return empty_document()


def update_document(path: str, mutate: Callable[[Dict[str, Any]], None]) -> Optional[Dict[str, Any]]:
    """Lock, re-read, ``mutate(document)`` in place, write atomically; returns the written document (None when the
    file belongs to another version and was left alone)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with file_lock(path):
        doc = _current(path)
        if doc is None:
            return None
        mutate(doc)
        _write_atomic(path, doc)
    _warned.discard(path)
    return doc
