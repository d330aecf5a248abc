"""The persisted admin state: every acknowledged change survives a crash.

One JSON file holds ``Topology.snapshot()``.  A save writes a temporary file
in the same directory, fsyncs it, renames it over the old one and fsyncs the
directory, so at any instant the file on disk is either the previous state or
the new one, whole.  Saves are serialised and run in a worker thread so an
fsync never stalls the event loop; the admin tree awaits the save before the
syscall that caused it returns.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

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

    def save_sync(self, snapshot: dict[str, Any]) -> None:
        """Write atomically and durably: temp file, fsync, rename, fsync the directory."""
        data = json.dumps(
            {"version": FORMAT_VERSION, "topology": snapshot}, indent=1, sort_keys=True
        ).encode()
        _write_durably(self.path, data)
        self.saves += 1

    @property
    def previous_path(self) -> Path:
        """Where ``keep_previous`` puts the file a reset replaces."""
        return self.path.with_name(f"{self.path.name}.old")

    def keep_previous(self) -> Path | None:
        """Before the state is reset: copy the file, whatever it holds (it may
        not even parse), to ``previous_path``.  Returns that path, or None when
        there is no file."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return None
        _write_durably(self.previous_path, data)
        return self.previous_path

    async def commit(self) -> None:
        """Persist the current state; returns once it is durable.

        Saves never overlap, and each one snapshots under the lock, so the last
        save to finish holds every change acknowledged before it."""
        async with self._lock:
            await asyncio.to_thread(self.save_sync, self.snapshot())


def _write_durably(path: Path, data: bytes) -> None:
    """Temp file in the same directory, fsync, rename over ``path``, fsync the
    directory: on disk there is always the old file or the new one, whole."""
    directory = path.parent
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".{path.name}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dirfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dirfd)
    finally:
        os.close(dirfd)
