"""Member rules: which bus a north context belongs to.

A north context is an identity, one of three kinds:

- a process (``Peer``: pid, uid, gid, start time), as a socket's
  SO_PEERCRED shows it;
- a Xen domain (``Domain``: its domid);
- a VM (``Vm``: a KVM guest or a vhost-user frontend), which is admitted
  through the process of its VMM and resolves exactly as that process does.

A rule admits every process of one uid (``uid:N``), one task and all of its
descendants (``pid:N``), or one Xen domain (``domid:N``).  A pid rule stores
the task's start time (field 22 of /proc/PID/stat) with the pid, so that a
recycled pid is never admitted by a rule written for the task that used to
have it.  Domid 0 is dom0, the host itself: it is never a member.

Resolution, for a process (or a VM's VMM): walk from the process up its
ancestors; at each step the pair (pid, starttime) is looked up in a dict, and
the nearest ancestor with a pid rule wins.  Only when no pid rule matches does
the process's uid count.  A domain is matched by its domid rule only, and a
process never by a domid rule: the number spaces do not mix.  An identity
therefore resolves to at most one bus: each (pid, starttime), each uid and
each domid maps to exactly one bus in the index.

Nothing here touches the OS: process facts come from an injected ``TaskInfo``
(``vbus.procfs.ProcTasks`` in the daemon, a dict in tests).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final, Literal, Protocol

from vbus.errors import Invalid, NoSuchTask

__all__ = [
    "DOMID_FIRST_RESERVED",
    "MAX_ANCESTRY",
    "NOT_A_MEMBER",
    "Domain",
    "DomidRule",
    "Identity",
    "MemberIndex",
    "Peer",
    "PidRule",
    "Rule",
    "RuleKind",
    "TaskInfo",
    "UidRule",
    "Vm",
    "identity_fields",
    "parse_rule",
    "process_of",
    "rule_syntax",
]

MAX_ANCESTRY = 4096  # steps of an ancestry walk; deeper trees do not exist on Linux
_MAX_PID = 2**31 - 1
_MAX_UID = 2**32 - 2  # (uid_t)-1 means "no uid"
# Xen's public xen.h: domids from 0x7FF0 on (DOMID_SELF, DOMID_IO, ...) name no domain.
DOMID_FIRST_RESERVED: Final = 0x7FF0
_MAX_DOMID = DOMID_FIRST_RESERVED - 1

# What every connector tells an identity that no rule admits: the same words
# whatever exists elsewhere, so a denial reveals nothing of other buses.
NOT_A_MEMBER: Final = "not a member of any bus"

_RULE = re.compile(r"(?:(uid|pid|domid):)?([0-9]{1,10}|self)")
_SYNTAX = "expected uid:N, uid:self, pid:N, N (a pid) or domid:N"

RuleKind = Literal["uid", "pid", "domid"]
_KINDS: Final[dict[str | None, RuleKind]] = {
    None: "pid",  # a bare number is a pid: `echo $$ > members`
    "pid": "pid",
    "uid": "uid",
    "domid": "domid",
}


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
class Domain:
    """A Xen domain, as its connector identified it.

    Any real domid (0 to DOMID_FIRST_RESERVED - 1) is an identity; dom0 (0)
    is one that no rule can admit.  Reserved and out-of-range domids are
    ``Invalid`` here, so a connector that parses a domid from the outside
    gets a clean refusal.
    """

    domid: int

    def __post_init__(self) -> None:
        if not _is_int(self.domid) or not 0 <= self.domid <= _MAX_DOMID:
            raise Invalid(f"bad domid {self.domid!r}: expected 0..{_MAX_DOMID}")


@dataclass(frozen=True, slots=True)
class Vm:
    """A VM (KVM guest, vhost-user frontend) reached through its VMM process.

    ``vmm`` alone decides membership: a VM resolves exactly as that process
    does.  ``name`` is the guest's name or id as its connector knows it, for
    listings and logs; one word of printable text, so that a listing line
    stays ``key=value`` pairs.
    """

    vmm: Peer
    name: str

    def __post_init__(self) -> None:
        if not isinstance(self.vmm, Peer):
            raise TypeError(f"a VM's vmm is a Peer, not {type(self.vmm).__name__}")
        name = self.name
        if (
            not isinstance(name, str)
            or not 0 < len(name) <= 255
            or not name.isprintable()
            or any(ch.isspace() for ch in name)
        ):
            raise Invalid(f"bad VM name {name!r}: 1-255 printable characters, no spaces")


Identity = Peer | Domain | Vm


def process_of(identity: Identity) -> Peer | None:
    """The process whose uid/pid rules decide ``identity``: itself, a VM's
    VMM, or None for a Xen domain."""
    if isinstance(identity, Vm):
        return identity.vmm
    if isinstance(identity, Peer):
        return identity
    return None


def identity_fields(identity: Identity) -> dict[str, int | str]:
    """The identity as listing/log fields: ``pid``, ``uid``, ``gid`` for a
    process; ``vm`` then its VMM's for a VM; ``domid`` for a domain."""
    if isinstance(identity, Domain):
        return {"domid": identity.domid}
    fields: dict[str, int | str] = {}
    if isinstance(identity, Vm):
        fields["vm"] = identity.name
        identity = identity.vmm
    fields.update(pid=identity.pid, uid=identity.uid, gid=identity.gid)
    return fields


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


@dataclass(frozen=True, slots=True)
class DomidRule:
    """Admits the Xen domain ``domid`` (1..DOMID_FIRST_RESERVED - 1; never dom0)."""

    domid: int

    def __post_init__(self) -> None:
        _check_domid(self.domid, f"domid:{self.domid}")

    @property
    def text(self) -> str:
        return f"domid:{self.domid}"

    def __str__(self) -> str:
        return self.text


Rule = UidRule | PidRule | DomidRule


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_domid(domid: object, text: str) -> None:
    if not isinstance(domid, int) or isinstance(domid, bool):
        raise Invalid(f"bad member rule {text!r}: domid must be an integer")
    if domid == 0:
        raise Invalid(f"bad member rule {text!r}: domid 0 is dom0, which is never a member")
    if not 0 < domid <= _MAX_DOMID:
        raise Invalid(f"bad member rule {text!r}: domid out of range (1..{_MAX_DOMID})")


def rule_syntax(text: str) -> tuple[RuleKind, int | None]:
    """Check the syntax of a rule text: ``("uid", N)``, ``("uid", None)`` for
    ``uid:self``, ``("pid", N)`` or ``("domid", N)``.  Needs no process
    information."""
    if not isinstance(text, str):
        raise Invalid(f"member rule must be text, not {type(text).__name__}")
    match = _RULE.fullmatch(text.strip())
    if match is None:
        raise Invalid(f"bad member rule {text!r}: {_SYNTAX}")
    kind = _KINDS[match.group(1)]
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
    if kind == "domid":
        _check_domid(value, text)
    return kind, value


def parse_rule(text: str, tasks: TaskInfo, self_uid: int) -> Rule:
    """Turn ``uid:N``, ``uid:self``, ``pid:N``, a bare ``N`` (= ``pid:N``) or
    ``domid:N`` into a rule.  A pid rule captures the task's current start
    time; a pid that does not exist raises ``NoSuchTask``."""
    kind, value = rule_syntax(text)
    if kind == "uid":
        return UidRule(self_uid if value is None else value)
    if kind == "domid":
        assert value is not None
        return DomidRule(value)
    assert value is not None
    starttime = tasks.starttime(value)
    if starttime is None:
        raise NoSuchTask(f"no such task {value}")
    return PidRule(value, starttime)


class MemberIndex:
    """Every rule of every bus, indexed for resolution: a dict lookup per ancestor.

    The index enforces "one identity, one bus" for exact keys (a uid, a
    (pid, starttime) pair or a domid is on at most one bus); the Topology adds
    the ancestry check on top.
    """

    def __init__(self) -> None:
        self._by_uid: dict[int, str] = {}
        # pid -> {starttime -> bus}: several start times only while stale rules
        # (for tasks that died and whose pid was reused) are still around.
        self._by_pid: dict[int, dict[int, str]] = {}
        self._by_domid: dict[int, str] = {}

    def __len__(self) -> int:
        pids = sum(len(times) for times in self._by_pid.values())
        return len(self._by_uid) + pids + len(self._by_domid)

    def bus_of(self, rule: Rule) -> str | None:
        """The bus that holds exactly ``rule``, if any."""
        if isinstance(rule, UidRule):
            return self._by_uid.get(rule.uid)
        if isinstance(rule, DomidRule):
            return self._by_domid.get(rule.domid)
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
        elif isinstance(rule, DomidRule):
            self._by_domid[rule.domid] = bus
        else:
            self._by_pid.setdefault(rule.pid, {})[rule.starttime] = bus

    def discard(self, rule: Rule) -> None:
        if isinstance(rule, UidRule):
            self._by_uid.pop(rule.uid, None)
            return
        if isinstance(rule, DomidRule):
            self._by_domid.pop(rule.domid, None)
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

    def resolve(self, identity: Identity, tasks: TaskInfo) -> str | None:
        """The name of the bus ``identity`` belongs to, or None.

        A domain: its domid rule (dom0 has none).  A process, or a VM through
        its VMM: the nearest pid rule, then the uid.
        """
        if isinstance(identity, Domain):
            return self._by_domid.get(identity.domid)
        peer = identity.vmm if isinstance(identity, Vm) else identity
        if self._by_pid:
            current = tasks.starttime(peer.pid)
            starttime = current if peer.starttime is None else peer.starttime
            # If the peer's pid now names another task (the peer died and the pid
            # was reused), its ancestry is somebody else's: check the peer only.
            bus = self.resolve_task(peer.pid, starttime, tasks, walk=current == starttime)
            if bus is not None:
                return bus
        return self._by_uid.get(peer.uid)
