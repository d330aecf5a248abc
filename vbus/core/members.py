"""Member rules: which bus a north context belongs to.

A rule admits either every process of one uid (``uid:N``) or one task and all
of its descendants (``pid:N``).  A pid rule stores the task's start time
(field 22 of /proc/PID/stat) with the pid, so that a recycled pid is never
admitted by a rule written for the task that used to have it.

Resolution, for a peer: walk from the peer up its ancestors; at each step the
pair (pid, starttime) is looked up in a dict, and the nearest ancestor with a
pid rule wins.  Only when no pid rule matches does the peer's uid count.  A
task therefore resolves to at most one bus: each (pid, starttime) and each
uid maps to exactly one bus in the index.

Nothing here touches the OS: process facts come from an injected ``TaskInfo``
(``vbus.procfs.ProcTasks`` in the daemon, a dict in tests).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, Protocol

from vbus.errors import Invalid, NoSuchTask

__all__ = [
    "MAX_ANCESTRY",
    "MemberIndex",
    "Peer",
    "PidRule",
    "Rule",
    "TaskInfo",
    "UidRule",
    "parse_rule",
    "rule_syntax",
]

MAX_ANCESTRY = 4096  # steps of an ancestry walk; deeper trees do not exist on Linux
_MAX_PID = 2**31 - 1
_MAX_UID = 2**32 - 2  # (uid_t)-1 means "no uid"

_RULE = re.compile(r"(?:(uid|pid):)?([0-9]{1,10}|self)")


class TaskInfo(Protocol):
    """What the core needs to know about processes (injected)."""

    def starttime(self, pid: int) -> int | None:
        """Start time of ``pid`` in clock ticks since boot; None if it does not exist."""
        ...

    def parent(self, pid: int) -> int | None:
        """Parent pid; None for pid 1 / kernel roots or when ``pid`` is gone."""
        ...

    def uid(self, pid: int) -> int | None:
        """Real uid; None when ``pid`` is gone."""
        ...


@dataclass(frozen=True, slots=True)
class Peer:
    """A north process as the connector saw it (SO_PEERCRED + its start time)."""

    pid: int
    uid: int
    gid: int
    starttime: int | None = None


@dataclass(frozen=True, slots=True)
class UidRule:
    """Admits every process whose uid is ``uid``."""

    uid: int

    @property
    def text(self) -> str:
        return f"uid:{self.uid}"

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True, slots=True)
class PidRule:
    """Admits the task ``pid`` started at ``starttime``, and its descendants."""

    pid: int
    starttime: int

    @property
    def text(self) -> str:
        return f"pid:{self.pid}"

    def __str__(self) -> str:
        return self.text


Rule = UidRule | PidRule


def rule_syntax(text: str) -> tuple[Literal["uid", "pid"], int | None]:
    """Check the syntax of a rule text: ``("uid", N)``, ``("uid", None)`` for
    ``uid:self``, or ``("pid", N)``.  Needs no process information."""
    if not isinstance(text, str):
        raise Invalid(f"member rule must be text, not {type(text).__name__}")
    match = _RULE.fullmatch(text.strip())
    if match is None:
        raise Invalid(f"bad member rule {text!r}: expected uid:N, uid:self, pid:N or N")
    kind: Literal["uid", "pid"] = "uid" if match.group(1) == "uid" else "pid"
    number = match.group(2)
    if number == "self":
        if kind != "uid":
            raise Invalid(f"bad member rule {text!r}: only uid:self is allowed")
        return kind, None
    value = int(number)
    if kind == "pid" and not 0 < value <= _MAX_PID:
        raise Invalid(f"bad member rule {text!r}: pid out of range")
    if kind == "uid" and value > _MAX_UID:
        raise Invalid(f"bad member rule {text!r}: uid out of range")
    return kind, value


def parse_rule(text: str, tasks: TaskInfo, self_uid: int) -> Rule:
    """Turn ``uid:N``, ``uid:self``, ``pid:N`` or a bare ``N`` (= ``pid:N``) into a
    rule.  A pid rule captures the task's current start time; a pid that does
    not exist raises ``NoSuchTask``."""
    kind, value = rule_syntax(text)
    if kind == "uid":
        return UidRule(self_uid if value is None else value)
    assert value is not None
    starttime = tasks.starttime(value)
    if starttime is None:
        raise NoSuchTask(f"no such task {value}")
    return PidRule(value, starttime)


class MemberIndex:
    """Every rule of every bus, indexed for resolution: a dict lookup per ancestor.

    The index enforces "one task, one bus" for exact keys (a uid or a
    (pid, starttime) pair is on at most one bus); the Topology adds the
    ancestry check on top.
    """

    def __init__(self) -> None:
        self._by_uid: dict[int, str] = {}
        # pid -> {starttime -> bus}: several start times only while stale rules
        # (for tasks that died and whose pid was reused) are still around.
        self._by_pid: dict[int, dict[int, str]] = {}

    def __len__(self) -> int:
        return len(self._by_uid) + sum(len(times) for times in self._by_pid.values())

    def bus_of(self, rule: Rule) -> str | None:
        """The bus that holds exactly ``rule``, if any."""
        if isinstance(rule, UidRule):
            return self._by_uid.get(rule.uid)
        return self._by_pid.get(rule.pid, {}).get(rule.starttime)

    def pid_rules(self, pid: int) -> dict[int, str]:
        """``{starttime: bus}`` of every pid rule for ``pid`` (a copy)."""
        return dict(self._by_pid.get(pid, {}))

    def add(self, rule: Rule, bus: str) -> None:
        holder = self.bus_of(rule)
        if holder is not None and holder != bus:
            raise AssertionError(f"{rule} already indexed for bus {holder!r}")
        if isinstance(rule, UidRule):
            self._by_uid[rule.uid] = bus
        else:
            self._by_pid.setdefault(rule.pid, {})[rule.starttime] = bus

    def discard(self, rule: Rule) -> None:
        if isinstance(rule, UidRule):
            self._by_uid.pop(rule.uid, None)
            return
        times = self._by_pid.get(rule.pid)
        if times is not None:
            times.pop(rule.starttime, None)
            if not times:
                del self._by_pid[rule.pid]

    def resolve_task(
        self, pid: int, starttime: int | None, tasks: TaskInfo, *, walk: bool = True
    ) -> str | None:
        """The bus a task reaches through pid rules only (itself, then the nearest
        ancestor), or None.  ``walk=False`` checks the task itself only."""
        if not self._by_pid or starttime is None:
            return None
        seen: set[int] = set()
        for _ in range(MAX_ANCESTRY):
            bus = self._by_pid.get(pid, {}).get(starttime)
            if bus is not None:
                return bus
            if not walk:
                return None
            seen.add(pid)
            parent = tasks.parent(pid)
            if parent is None or parent <= 0 or parent in seen:
                return None
            parent_start = tasks.starttime(parent)
            if parent_start is None:
                return None
            pid, starttime = parent, parent_start
        return None

    def resolve(self, peer: Peer, tasks: TaskInfo) -> str | None:
        """The name of the bus ``peer`` belongs to, or None."""
        if self._by_pid:
            current = tasks.starttime(peer.pid)
            starttime = current if peer.starttime is None else peer.starttime
            # If the peer's pid now names another task (the peer died and the pid
            # was reused), its ancestry is somebody else's: check the peer only.
            bus = self.resolve_task(peer.pid, starttime, tasks, walk=current == starttime)
            if bus is not None:
                return bus
        return self._by_uid.get(peer.uid)
