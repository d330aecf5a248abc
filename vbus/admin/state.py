"""The persisted admin state: every acknowledged change survives a crash.

One JSON file holds ``Topology.snapshot()``.  A save writes a temporary file
in the same directory, fsyncs it, renames it over the old one and fsyncs the
directory, so at any instant the file on disk is either the previous state or
the new one, whole.  Saves are serialised; each of their file operations is
awaited through aiofiles (on the loop's worker threads), so an fsync on a slow
disk never stalls the event loop.  The admin tree awaits the save before the
syscall that caused it returns.  ``save_sync`` is the same sequence for the
moment before the loop serves anybody (the first save at start).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiofiles
import aiofiles.os

from vbus.errors import Invalid

__all__ = ["FORMAT_VERSION", "StateStore", "default_state_path"]

FORMAT_VERSION = 1


def default_state_path() -> Path:
    """``/var/lib/vbus/state.json`` as root, else under ``$XDG_STATE_HOME`` (``~/.local/state``)."""
    if os.geteuid() == 0:
        return Path("/var/lib/vbus/state.json")
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "vbus" / "state.json"


class StateStore:
    """``snapshot`` returns what to persist (``Topology.snapshot``)."""

    def __init__(self, path: Path, snapshot: Callable[[], dict[str, Any]]) -> None:
        self.path = path
        self.snapshot = snapshot
        self.saves = 0
        self._lock = asyncio.Lock()

    def clear_leftovers(self) -> int:
        """Remove temporary files of saves that a crash interrupted."""
        removed = 0
        for leftover in self.path.parent.glob(f".{self.path.name}.*.tmp"):
            leftover.unlink(missing_ok=True)
            removed += 1
        return removed

    def load(self) -> dict[str, Any] | None:
        """The saved topology snapshot, or None on a first start.

        A file that does not parse is refused with ``Invalid`` (it is never
        silently replaced: that would lose the configuration)."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            document = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise Invalid(f"state file {self.path} is not valid JSON: {exc}") from None
        if not isinstance(document, dict) or document.get("version") != FORMAT_VERSION:
            raise Invalid(f"state file {self.path} has an unknown format")
        topology = document.get("topology")
        if not isinstance(topology, dict):
            raise Invalid(f"state file {self.path} holds no topology")
        return topology

    def _encode(self, snapshot: dict[str, Any]) -> bytes:
        document = {"version": FORMAT_VERSION, "topology": snapshot}
        return json.dumps(document, indent=1, sort_keys=True).encode()

    def _tmp(self) -> Path:
        return _tmp_of(self.path)

    def save_sync(self, snapshot: dict[str, Any]) -> None:
        """Write atomically and durably: temp file, fsync, rename, fsync the
        directory.  Blocks: only for before the loop serves anybody."""
        _write_durably(self.path, self._encode(snapshot))
        self.saves += 1

    @property
    def previous_path(self) -> Path:
        """Where ``keep_previous`` puts the file a reset replaces."""
        return self.path.with_name(f"{self.path.name}.old")

    def keep_previous(self) -> Path | None:
        """Before the state is reset (at start, before serving): copy the file,
        whatever it holds (it may not even parse), to ``previous_path``.
        Returns that path, or None when there is no file."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return None
        _write_durably(self.previous_path, data)
        return self.previous_path

    async def save(self, snapshot: dict[str, Any]) -> None:
        """``save_sync``'s steps, each awaited off the loop."""
        data, tmp = self._encode(snapshot), self._tmp()
        await aiofiles.os.makedirs(self.path.parent, exist_ok=True)
        try:
            async with aiofiles.open(tmp, "wb", opener=_private) as f:
                await f.write(data)
                await f.flush()
                await _fsync(f.fileno())
            await aiofiles.os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                await asyncio.shield(aiofiles.os.remove(tmp))
            raise
        await _fsync_directory_async(self.path.parent)
        self.saves += 1

    async def commit(self) -> None:
        """Persist the current state; returns once it is durable.

        Saves never overlap, and each one snapshots under the lock, so the last
        save to finish holds every change acknowledged before it."""
        async with self._lock:
            await self.save(self.snapshot())


def _tmp_of(path: Path) -> Path:
    return path.parent / f".{path.name}.{os.getpid()}.tmp"


def _write_durably(path: Path, data: bytes) -> None:
    """Temp file in the same directory, fsync, rename over ``path``, fsync the
    directory: on disk there is always the old file or the new one, whole."""
    tmp = _tmp_of(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(tmp, "wb", opener=_private) as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def _private(path: str, flags: int) -> int:
    """``open``'s opener: the state file is the administrator's alone."""
    return os.open(path, flags | os.O_CLOEXEC, 0o600)


def _fsync_file(fd: int) -> None:
    os.fsync(fd)  # looked up at each call, so a test can slow the disk down


def _fsync_directory(directory: Path) -> None:
    """The rename is durable once the directory's entry is."""
    dirfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dirfd)
    finally:
        os.close(dirfd)


_fsync = aiofiles.os.wrap(_fsync_file)
_fsync_directory_async = aiofiles.os.wrap(_fsync_directory)
