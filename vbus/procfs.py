"""Process facts from /proc: the real ``TaskInfo`` for the core's member rules.

Every lookup answers None for a task that does not exist (or vanished while
being read, or cannot be read); none raises.  /proc/PID/stat is parsed from
the last ')' because the command name in field 2 may itself contain spaces
and parentheses.
"""

from __future__ import annotations

import os

__all__ = ["ProcTasks", "boot_id", "task_starttime"]

# Fields of /proc/PID/stat counted from 1 (proc(5)); after the last ')' the
# text starts at field 3 (state).
_FIELD_PPID = 4
_FIELD_STARTTIME = 22
_FIRST_FIELD_AFTER_COMM = 3


class ProcTasks:
    """``TaskInfo`` over a procfs mount (``root`` is for tests)."""

    def __init__(self, root: str = "/proc") -> None:
        self.root = root

    def _read(self, pid: int, name: str) -> bytes | None:
        if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
            return None
        try:
            with open(os.path.join(self.root, str(pid), name), "rb") as f:
                return f.read()
        except (OSError, ValueError):
            return None

    def _stat_fields(self, pid: int) -> list[bytes] | None:
        data = self._read(pid, "stat")
        if data is None:
            return None
        close = data.rfind(b")")
        if close < 0:
            return None
        return data[close + 1 :].split()

    def _stat_field(self, pid: int, number: int) -> int | None:
        fields = self._stat_fields(pid)
        index = number - _FIRST_FIELD_AFTER_COMM
        if fields is None or len(fields) <= index:
            return None
        try:
            return int(fields[index])
        except ValueError:
            return None

    def starttime(self, pid: int) -> int | None:
        """Start time in clock ticks after boot (stat field 22)."""
        return self._stat_field(pid, _FIELD_STARTTIME)

    def parent(self, pid: int) -> int | None:
        """Parent pid; None when there is none (pid 1, kernel threads' roots) or gone."""
        ppid = self._stat_field(pid, _FIELD_PPID)
        return ppid if ppid is not None and ppid > 0 else None

    def uid(self, pid: int) -> int | None:
        """Real uid, from the ``Uid:`` line of /proc/PID/status."""
        data = self._read(pid, "status")
        if data is None:
            return None
        for line in data.splitlines():
            if line.startswith(b"Uid:"):
                parts = line.split()
                try:
                    return int(parts[1])
                except (IndexError, ValueError):
                    return None
        return None

    def boot_id(self) -> str | None:
        """This boot's id: start times only compare within one boot."""
        try:
            with open(os.path.join(self.root, "sys/kernel/random/boot_id"), encoding="ascii") as f:
                return f.read().strip() or None
        except (OSError, ValueError):
            return None


def task_starttime(pid: int) -> int | None:
    """Start time of ``pid`` from the real /proc (None if it does not exist)."""
    return ProcTasks().starttime(pid)


def boot_id() -> str | None:
    """The running kernel's boot id (/proc/sys/kernel/random/boot_id)."""
    return ProcTasks().boot_id()
