"""Member rules and identities: parsing, resolution of each identity kind
(process, Xen domain, VM through its VMM), ancestry, conflicts, denial, and
what a membership change does to open connections."""

from __future__ import annotations

import errno
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vbus.core.device import DeviceModel, Session
from vbus.core.members import (
    DOMID_FIRST_RESERVED,
    MAX_ANCESTRY,
    NOT_A_MEMBER,
    Domain,
    DomidRule,
    Identity,
    MemberIndex,
    Peer,
    PidRule,
    UidRule,
    Vm,
    identity_fields,
    parse_rule,
    process_of,
    rule_syntax,
)
from vbus.core.model import Connection, Member, Topology
from vbus.core.registry import Registry
from vbus.errors import Busy, Denied, Exists, Invalid, NoSuchTask, NotFound, from_errno

SELF_UID = 1000


class FakeTasks:
    """A process table: pid -> (ppid, starttime, uid).  Counts lookups."""

    def __init__(self) -> None:
        self.procs: dict[int, tuple[int, int, int]] = {1: (0, 1, 0)}
        self.lookups = 0

    def spawn(self, pid: int, ppid: int = 1, starttime: int = 100, uid: int = 2000) -> Peer:
        self.procs[pid] = (ppid, starttime, uid)
        return Peer(pid=pid, uid=uid, gid=uid, starttime=starttime)

    def kill(self, pid: int) -> None:
        del self.procs[pid]

    def starttime(self, pid: int) -> int | None:
        self.lookups += 1
        proc = self.procs.get(pid)
        return None if proc is None else proc[1]

    def parent(self, pid: int) -> int | None:
        self.lookups += 1
        proc = self.procs.get(pid)
        return None if proc is None or proc[0] <= 0 else proc[0]

    def uid(self, pid: int) -> int | None:
        proc = self.procs.get(pid)
        return None if proc is None else proc[2]


class Plain(DeviceModel):
    name = "plain"
    description = "a device with nothing"

    def open(self, conn: Connection) -> Session:
        return Session(self, conn)


@pytest.fixture
def tasks() -> FakeTasks:
    return FakeTasks()


@pytest.fixture
def topo(tasks: FakeTasks) -> Topology:
    registry = Registry()
    registry.register(Plain)
    topology = Topology(registry, tasks, SELF_UID)
    for name in ("a", "b", "c"):
        topology.create_bus(name)
    return topology


# --- syntax and parsing --------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("uid:0", ("uid", 0)),
        ("uid:1000", ("uid", 1000)),
        ("uid:self", ("uid", None)),
        ("pid:42", ("pid", 42)),
        ("42", ("pid", 42)),
        ("42\n", ("pid", 42)),
        ("  uid:7 ", ("uid", 7)),
        ("007", ("pid", 7)),
        ("uid:4294967294", ("uid", 4294967294)),
        ("pid:2147483647", ("pid", 2147483647)),
        ("domid:1", ("domid", 1)),
        ("domid:7", ("domid", 7)),
        (" domid:007\n", ("domid", 7)),
        ("domid:32751", ("domid", 32751)),
    ],
)
def test_rule_syntax_accepts(text: str, parsed: tuple[str, int | None]) -> None:
    assert rule_syntax(text) == parsed


@pytest.mark.parametrize(
    "text",
    [
        "",
        " ",
        "0",
        "pid:0",
        "-1",
        "pid:-1",
        "uid:-1",
        "pid:self",
        "self",
        "uid:",
        "uid:abc",
        "gid:5",
        "pid:1.5",
        "pid: 5",
        "UID:5",
        "uid:4294967295",  # (uid_t)-1
        "pid:2147483648",
        "99999999999",
        "1 2",
        "٣",
        "pid:5\0",
        "domid:0",
        "domid:00",
        "domid:32752",
        "domid:65535",
        "domid:-1",
        "domid:self",
        "domid:",
        "domid:x",
        "domid 7",
        "DOMID:7",
        "dom:7",
        "domid:99999999999",
    ],
)
def test_rule_syntax_rejects(text: str) -> None:
    with pytest.raises(Invalid):
        rule_syntax(text)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("domid:0", "bad member rule 'domid:0': domid 0 is dom0, which is never a member"),
        ("domid:32752", "bad member rule 'domid:32752': domid out of range (1..32751)"),
        ("domid:self", "bad member rule 'domid:self': only uid:self is allowed"),
        ("domid:x", "bad member rule 'domid:x': expected uid:N, uid:self, pid:N, N (a pid)"),
    ],
)
def test_domid_refusals_say_why(text: str, reason: str) -> None:
    with pytest.raises(Invalid) as info:
        rule_syntax(text)
    assert info.value.message.startswith(reason)
    assert info.value.errno == errno.EINVAL


def test_domid_range_is_xens() -> None:
    assert DOMID_FIRST_RESERVED == 0x7FF0  # DOMID_SELF, DOMID_IO... name no domain
    assert rule_syntax(f"domid:{DOMID_FIRST_RESERVED - 1}") == ("domid", 0x7FEF)
    with pytest.raises(Invalid):
        rule_syntax(f"domid:{DOMID_FIRST_RESERVED}")


def test_rule_syntax_rejects_non_text() -> None:
    with pytest.raises(Invalid):
        rule_syntax(42)  # type: ignore[arg-type]


def test_parse_rule(tasks: FakeTasks) -> None:
    tasks.spawn(42, starttime=777)
    assert parse_rule("uid:5", tasks, SELF_UID) == UidRule(5)
    assert parse_rule("uid:self", tasks, SELF_UID) == UidRule(SELF_UID)
    assert parse_rule("uid:self", tasks, 0) == UidRule(0)
    assert parse_rule("pid:42", tasks, SELF_UID) == PidRule(42, 777)
    assert parse_rule("42\n", tasks, SELF_UID) == PidRule(42, 777)
    tasks.lookups = 0
    assert parse_rule("domid:7", tasks, SELF_UID) == DomidRule(7)
    assert tasks.lookups == 0  # a domid is no process: nothing is looked up


def test_parse_rule_missing_task_is_no_such_task(tasks: FakeTasks) -> None:
    with pytest.raises(NoSuchTask) as info:
        parse_rule("pid:4242", tasks, SELF_UID)
    assert isinstance(info.value, NotFound)
    assert info.value.errno == errno.ESRCH
    assert type(from_errno(errno.ESRCH)) is NoSuchTask
    with pytest.raises(NoSuchTask):
        parse_rule("4242", tasks, SELF_UID)


def test_rule_text_forms() -> None:
    assert str(UidRule(3)) == "uid:3" == UidRule(3).text
    assert str(PidRule(9, 123)) == "pid:9" == PidRule(9, 123).text
    assert PidRule(9, 1) != PidRule(9, 2)
    assert hash(UidRule(3)) == hash(UidRule(3))
    assert str(DomidRule(7)) == "domid:7" == DomidRule(7).text
    assert DomidRule(7) == DomidRule(7)
    assert len({DomidRule(7), UidRule(7), PidRule(7, 1)}) == 3


@pytest.mark.parametrize("domid", [0, -1, DOMID_FIRST_RESERVED, True, "7", 7.0])
def test_domid_rule_objects_are_checked_too(domid: Any) -> None:
    # Rules built directly (snapshot, callers) get the same refusals as the text.
    with pytest.raises(Invalid):
        DomidRule(domid)


# --- identities -----------------------------------------------------------------------


def test_domain_identity() -> None:
    assert Domain(7) == Domain(7) and hash(Domain(7)) == hash(Domain(7))
    assert Domain(0).domid == 0  # dom0 is an identity; no rule can admit it
    assert Domain(DOMID_FIRST_RESERVED - 1).domid == 0x7FEF
    for bad in (-1, DOMID_FIRST_RESERVED, 0xFFFF, True, "7", None):
        with pytest.raises(Invalid):
            Domain(bad)  # type: ignore[arg-type]


def test_vm_identity() -> None:
    vmm = Peer(10, 2000, 2000, 5)
    assert Vm(vmm, "guest0").vmm is vmm
    assert Vm(vmm, "guest0") == Vm(vmm, "guest0") != Vm(vmm, "guest1")
    for bad in ("", "two words", "tab\there", "nl\n", "x" * 256, 7):
        with pytest.raises(Invalid):
            Vm(vmm, bad)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        Vm(Domain(3), "guest0")  # type: ignore[arg-type]


def test_process_of_and_fields() -> None:
    vmm = Peer(10, 2000, 3000, 5)
    assert process_of(vmm) is vmm
    assert process_of(Vm(vmm, "g")) is vmm
    assert process_of(Domain(3)) is None
    assert identity_fields(vmm) == {"pid": 10, "uid": 2000, "gid": 3000}
    assert identity_fields(Vm(vmm, "g")) == {"vm": "g", "pid": 10, "uid": 2000, "gid": 3000}
    assert identity_fields(Domain(3)) == {"domid": 3}


@given(st.text())
def test_parse_rule_raises_only_invalid_or_no_such_task(text: str) -> None:
    tasks = FakeTasks()
    tasks.spawn(5)
    try:
        rule = parse_rule(text, tasks, SELF_UID)
    except (Invalid, NoSuchTask):
        return
    assert isinstance(rule, UidRule | PidRule | DomidRule)


@given(st.integers(min_value=1, max_value=DOMID_FIRST_RESERVED - 1))
def test_domid_rule_round_trips_text(domid: int) -> None:
    rule = parse_rule(f"domid:{domid}", FakeTasks(), SELF_UID)
    assert rule == DomidRule(domid)
    assert parse_rule(str(rule), FakeTasks(), SELF_UID) == rule


@given(st.integers(min_value=1, max_value=2**31 - 1))
def test_parse_rule_round_trips_text(pid: int) -> None:
    tasks = FakeTasks()
    tasks.spawn(pid, starttime=3)
    rule = parse_rule(str(pid), tasks, SELF_UID)
    assert parse_rule(str(rule), tasks, SELF_UID) == rule


# --- resolution -------------------------------------------------------------------


def test_uid_rule_admits_every_process_of_that_uid(topo: Topology, tasks: FakeTasks) -> None:
    topo.add_member("a", "uid:2000")
    assert topo.resolve(tasks.spawn(10, uid=2000)) is topo.bus("a")
    assert topo.resolve(tasks.spawn(11, uid=2001)) is None


def test_uid_self(topo: Topology, tasks: FakeTasks) -> None:
    topo.add_member("a", "uid:self")
    assert topo.members("a") == [f"uid:{SELF_UID}"]
    assert topo.resolve(tasks.spawn(10, uid=SELF_UID)) is topo.bus("a")


def test_pid_rule_admits_task_and_descendants(topo: Topology, tasks: FakeTasks) -> None:
    tasks.spawn(10, starttime=50)
    child = tasks.spawn(11, ppid=10, starttime=60)
    grandchild = tasks.spawn(12, ppid=11, starttime=70)
    sibling = tasks.spawn(13, ppid=1, starttime=80)
    topo.add_member("a", "10")
    assert topo.resolve(Peer(10, 2000, 2000)) is topo.bus("a")
    assert topo.resolve(child) is topo.bus("a")
    assert topo.resolve(grandchild) is topo.bus("a")
    assert topo.resolve(sibling) is None


def test_nearest_ancestor_wins(topo: Topology, tasks: FakeTasks) -> None:
    tasks.spawn(10, starttime=50)
    tasks.spawn(11, ppid=10, starttime=60)
    leaf = tasks.spawn(12, ppid=11, starttime=70)
    other = tasks.spawn(13, ppid=10, starttime=75)
    topo.add_member("b", "11")  # the nested rule first: 11 does not resolve anywhere yet
    topo.add_member("a", "10")
    assert topo.resolve(leaf) is topo.bus("b")
    assert topo.resolve(other) is topo.bus("a")


def test_pid_rule_beats_uid_rule(topo: Topology, tasks: FakeTasks) -> None:
    peer = tasks.spawn(10, uid=2000)
    topo.add_member("a", "uid:2000")
    topo.add_member("b", "pid:10")
    assert topo.resolve(peer) is topo.bus("b")
    assert topo.resolve(tasks.spawn(20, uid=2000)) is topo.bus("a")


def test_recycled_pid_is_not_admitted(topo: Topology, tasks: FakeTasks) -> None:
    tasks.spawn(10, starttime=50)
    topo.add_member("a", "pid:10")
    tasks.kill(10)
    newcomer = tasks.spawn(10, starttime=999)
    assert topo.resolve(newcomer) is None
    assert topo.resolve(Peer(10, 2000, 2000)) is None  # starttime read from tasks
    assert topo.resolve(tasks.spawn(11, ppid=10, starttime=1000)) is None


def test_recycled_ancestor_is_not_admitted(topo: Topology, tasks: FakeTasks) -> None:
    tasks.spawn(10, starttime=50)
    topo.add_member("a", "pid:10")
    tasks.kill(10)
    tasks.spawn(10, starttime=51)
    orphan_looking = tasks.spawn(11, ppid=10, starttime=60)
    assert topo.resolve(orphan_looking) is None


def test_peer_starttime_is_what_counts(topo: Topology, tasks: FakeTasks) -> None:
    tasks.spawn(10, starttime=50)
    tasks.spawn(11, ppid=10, starttime=60)
    topo.add_member("a", "pid:10")
    # The connector saw pid 11 start at 60; now pid 11 is somebody else, a
    # child of 10 too: the stale identity must not borrow the new one's ancestry.
    tasks.kill(11)
    tasks.spawn(11, ppid=10, starttime=61)
    assert topo.resolve(Peer(11, 2000, 2000, starttime=60)) is None
    assert topo.resolve(Peer(11, 2000, 2000, starttime=61)) is topo.bus("a")
    # A peer that names a rule's task exactly still matches, even once gone.
    assert topo.resolve(Peer(10, 2000, 2000, starttime=50)) is topo.bus("a")
    tasks.kill(10)
    assert topo.resolve(Peer(10, 2000, 2000, starttime=50)) is topo.bus("a")


def test_gone_peer_falls_back_to_uid(topo: Topology, tasks: FakeTasks) -> None:
    tasks.spawn(10, starttime=50)
    topo.add_member("a", "pid:10")
    topo.add_member("b", "uid:2000")
    assert topo.resolve(Peer(77, 2000, 2000)) is topo.bus("b")


def test_walk_survives_a_cycle(topo: Topology, tasks: FakeTasks) -> None:
    tasks.spawn(10, starttime=5)
    topo.add_member("a", "pid:10")
    tasks.spawn(20, ppid=21, starttime=6)
    tasks.spawn(21, ppid=20, starttime=7)
    topo.add_member("b", "uid:2000")
    assert topo.resolve(Peer(20, 2000, 2000)) is topo.bus("b")


def test_walk_is_bounded(topo: Topology, tasks: FakeTasks) -> None:
    top = 100
    tasks.spawn(top, starttime=1)
    topo.add_member("a", f"pid:{top}")
    depth = MAX_ANCESTRY + 10
    for pid in range(top + 1, top + 1 + depth):
        tasks.spawn(pid, ppid=pid - 1, starttime=pid)
    deepest = top + depth
    tasks.lookups = 0
    assert topo.resolve(Peer(deepest, 2000, 2000)) is None
    assert tasks.lookups <= 2 * MAX_ANCESTRY + 2
    near = top + MAX_ANCESTRY - 1
    assert topo.resolve(Peer(near, 2000, 2000)) is topo.bus("a")


def test_without_pid_rules_no_process_lookups(topo: Topology, tasks: FakeTasks) -> None:
    topo.add_member("a", "uid:2000")
    peer = tasks.spawn(10)
    tasks.lookups = 0
    assert topo.resolve(peer) is topo.bus("a")
    assert tasks.lookups == 0


def test_lookups_per_ancestor_not_per_rule(topo: Topology, tasks: FakeTasks) -> None:
    # Many rules on many buses: resolving a leaf three levels deep costs the
    # same handful of lookups.
    for i in range(300):
        tasks.spawn(1000 + i, starttime=i + 1)
    for i in range(300):
        bus = f"bus{i}"
        topo.create_bus(bus)
        topo.add_member(bus, str(1000 + i))
    tasks.spawn(10, starttime=5)
    tasks.spawn(11, ppid=10, starttime=6)
    leaf = tasks.spawn(12, ppid=11, starttime=7)
    topo.add_member("a", "10")
    tasks.lookups = 0
    assert topo.resolve(leaf) is topo.bus("a")
    assert tasks.lookups <= 6


def test_member_index_directly(tasks: FakeTasks) -> None:
    index = MemberIndex()
    assert len(index) == 0
    index.add(UidRule(5), "x")
    index.add(PidRule(7, 1), "y")
    assert len(index) == 2
    assert index.bus_of(UidRule(5)) == "x"
    assert index.bus_of(PidRule(7, 1)) == "y"
    assert index.bus_of(PidRule(7, 2)) is None
    assert index.pid_rules(7) == {1: "y"}
    with pytest.raises(AssertionError):
        index.add(UidRule(5), "y")
    index.discard(PidRule(7, 1))
    index.discard(PidRule(7, 1))
    index.discard(UidRule(6))
    assert index.pid_rules(7) == {}
    assert index.resolve(Peer(1, 5, 5), tasks) == "x"
    index.add(DomidRule(5), "z")
    assert len(index) == 2
    assert index.bus_of(DomidRule(5)) == "z"
    assert index.resolve(Domain(5), tasks) == "z"
    assert index.resolve(Peer(1, 5, 5), tasks) == "x"  # uid 5 and domid 5 do not mix
    with pytest.raises(AssertionError):
        index.add(DomidRule(5), "x")
    index.discard(DomidRule(5))
    index.discard(DomidRule(5))
    assert index.resolve(Domain(5), tasks) is None
    assert len(index) == 1


# --- adding and removing rules -----------------------------------------------------


def test_add_member_returns_rule_and_lists_sorted(topo: Topology, tasks: FakeTasks) -> None:
    tasks.spawn(42, starttime=9)
    assert topo.add_member("a", "uid:7") == UidRule(7)
    assert topo.add_member("a", "42") == PidRule(42, 9)
    assert topo.add_member("a", UidRule(3)) == UidRule(3)
    assert topo.members("a") == ["pid:42", "uid:3", "uid:7"]
    assert topo.bus("a").rules == {UidRule(7), UidRule(3), PidRule(42, 9)}


def test_same_rule_twice_is_exists(topo: Topology, tasks: FakeTasks) -> None:
    tasks.spawn(42)
    topo.add_member("a", "uid:7")
    topo.add_member("a", "pid:42")
    with pytest.raises(Exists):
        topo.add_member("a", "uid:7")
    with pytest.raises(Exists):
        topo.add_member("a", "42")


def test_uid_on_another_bus_is_busy(topo: Topology) -> None:
    topo.add_member("a", "uid:7")
    with pytest.raises(Busy):
        topo.add_member("b", "uid:7")
    with pytest.raises(Busy):
        topo.add_member("b", UidRule(7))
    assert topo.members("b") == []


def test_task_on_another_bus_is_busy(topo: Topology, tasks: FakeTasks) -> None:
    tasks.spawn(10, starttime=1)
    tasks.spawn(11, ppid=10, starttime=2)
    topo.add_member("a", "10")
    with pytest.raises(Busy):
        topo.add_member("b", "10")  # the task itself
    with pytest.raises(Busy):
        topo.add_member("b", "11")  # through its parent's rule
    topo.add_member("a", "11")  # same bus: no conflict
    assert topo.members("a") == ["pid:10", "pid:11"]


def test_uid_rule_does_not_block_pid_rule(topo: Topology, tasks: FakeTasks) -> None:
    tasks.spawn(10, uid=2000)
    topo.add_member("a", "uid:2000")
    topo.add_member("b", "10")


def test_add_member_errors(topo: Topology, tasks: FakeTasks) -> None:
    tasks.spawn(10, starttime=5)
    with pytest.raises(NotFound):
        topo.add_member("nope", "uid:1")
    with pytest.raises(Invalid):
        topo.add_member("a", "pid:0")
    with pytest.raises(Invalid):
        topo.add_member("a", "garbage")
    with pytest.raises(NoSuchTask):
        topo.add_member("a", "pid:99")
    with pytest.raises(NoSuchTask):
        topo.add_member("a", PidRule(10, 6))  # wrong start time: not that task
    assert topo.members("a") == []


def test_rule_for_reused_pid_replaces_stale_one(topo: Topology, tasks: FakeTasks) -> None:
    tasks.spawn(10, starttime=5)
    topo.add_member("a", "10")
    tasks.kill(10)
    tasks.spawn(10, starttime=6)
    topo.add_member("b", "10")  # the stale rule on a does not block
    assert topo.members("a") == []
    assert topo.members("b") == ["pid:10"]
    assert topo.bus("b").rules == {PidRule(10, 6)}


def test_remove_member(topo: Topology, tasks: FakeTasks) -> None:
    peer = tasks.spawn(10, uid=2000)
    topo.add_member("a", "uid:2000")
    topo.add_member("a", "uid:self")
    topo.add_member("b", "10")
    topo.remove_member("a", "uid:2000")
    topo.remove_member("a", "uid:self")
    assert topo.members("a") == []
    assert topo.resolve(peer) is topo.bus("b")
    topo.remove_member("b", PidRule(10, 100))
    assert topo.resolve(peer) is None
    topo.add_member("c", "uid:2000")  # free again
    assert topo.resolve(peer) is topo.bus("c")


def test_remove_member_of_dead_task_by_text(topo: Topology, tasks: FakeTasks) -> None:
    tasks.spawn(10)
    topo.add_member("a", "10")
    tasks.kill(10)
    topo.remove_member("a", "pid:10")
    assert topo.members("a") == []


def test_remove_member_errors(topo: Topology, tasks: FakeTasks) -> None:
    tasks.spawn(10)
    topo.add_member("a", "10")
    with pytest.raises(NotFound):
        topo.remove_member("b", "10")
    with pytest.raises(NotFound):
        topo.remove_member("a", "uid:1")
    with pytest.raises(NotFound):
        topo.remove_member("a", PidRule(10, 1))
    with pytest.raises(NotFound):
        topo.remove_member("zzz", "10")
    with pytest.raises(Invalid):
        topo.remove_member("a", "pid:zero")
    assert topo.members("a") == ["pid:10"]


def test_prune_members(topo: Topology, tasks: FakeTasks) -> None:
    for pid in (10, 11, 12):
        tasks.spawn(pid, starttime=pid)
    topo.add_member("a", "10")
    topo.add_member("a", "11")
    topo.add_member("b", "12")
    topo.add_member("b", "uid:5")
    tasks.kill(10)
    tasks.kill(12)
    tasks.spawn(12, starttime=99)
    assert topo.prune_members() == 2
    assert topo.members("a") == ["pid:11"]
    assert topo.members("b") == ["uid:5"]
    assert topo.prune_members() == 0


def test_removing_a_bus_frees_its_rules(topo: Topology, tasks: FakeTasks) -> None:
    tasks.spawn(10)
    topo.add_member("a", "uid:7")
    topo.add_member("a", "10")
    topo.remove_bus("a")
    topo.add_member("b", "uid:7")
    topo.add_member("b", "10")


# --- membership changes and open connections ------------------------------------------


class Revocations:
    def __init__(self) -> None:
        self.seen: list[tuple[int, str, str]] = []

    def __call__(self, conn: Connection, kind: Any, reason: str) -> None:
        self.seen.append((conn.id, kind, reason))


def _open(topo: Topology, peer: Identity, revoke: Revocations) -> Connection:
    bus = topo.resolve(peer)
    assert bus is not None
    return topo.open(bus, "dev", peer, "userspace", revoke)


@pytest.fixture
def linked(topo: Topology) -> Topology:
    topo.create_device("dev", "plain")
    for bus in ("a", "b"):
        topo.link(bus, "dev")
    return topo


def test_removing_a_peers_rule_revokes_its_connections(linked: Topology, tasks: FakeTasks) -> None:
    topo = linked
    peer = tasks.spawn(10, uid=2000)
    bystander = tasks.spawn(20, uid=3000)
    topo.add_member("a", "uid:2000")
    topo.add_member("a", "uid:3000")
    revoke = Revocations()
    conn = _open(topo, peer, revoke)
    other = _open(topo, bystander, revoke)
    topo.remove_member("a", "uid:2000")
    assert revoke.seen == [(conn.id, "bus_gone", "no longer a member of bus 'a'")]
    assert conn.closed and conn.close_reason == "bus_gone"
    assert not other.closed
    assert topo.connections() == [other]


def test_moving_a_peer_to_another_bus_revokes_its_connections(
    linked: Topology, tasks: FakeTasks
) -> None:
    topo = linked
    peer = tasks.spawn(10, uid=2000)
    topo.add_member("a", "uid:2000")
    revoke = Revocations()
    conn = _open(topo, peer, revoke)
    topo.add_member("b", "10")  # pid beats uid: the peer now belongs to b
    assert [kind for _, kind, _ in revoke.seen] == ["bus_gone"]
    assert conn.closed
    again = _open(topo, peer, revoke)
    assert again.bus is topo.bus("b")


# --- domains and VMs ---------------------------------------------------------------------


def test_domid_rule_admits_that_domain_only(topo: Topology) -> None:
    topo.add_member("a", "domid:7")
    assert topo.resolve(Domain(7)) is topo.bus("a")
    assert topo.resolve(Domain(8)) is None
    assert topo.resolve(Domain(0)) is None


def test_domids_and_process_numbers_do_not_mix(topo: Topology, tasks: FakeTasks) -> None:
    proc = tasks.spawn(7, uid=7)
    topo.add_member("a", "domid:7")
    topo.add_member("b", "uid:8")
    topo.add_member("c", "pid:7")
    assert topo.resolve(proc) is topo.bus("c")  # the pid rule, never the domid one
    assert topo.resolve(tasks.spawn(20, uid=7)) is None  # uid 7 is not domid 7
    assert topo.resolve(Domain(8)) is None  # domid 8 is not uid 8
    assert topo.resolve(Domain(7)) is topo.bus("a")
    tasks.lookups = 0
    topo.resolve(Domain(7))
    assert tasks.lookups == 0  # a domain has no process to look up


def test_dom0_is_never_a_member(topo: Topology, tasks: FakeTasks) -> None:
    with pytest.raises(Invalid, match="dom0"):
        topo.add_member("a", "domid:0")
    with pytest.raises(Invalid, match="dom0"):
        topo.add_member("a", DomidRule(0))
    topo.add_member("a", "uid:0")
    tasks.spawn(1, ppid=0, starttime=1, uid=0)
    topo.add_member("b", "pid:1")
    assert topo.resolve(Domain(0)) is None
    assert topo.members("a") == ["uid:0"]


def test_vm_resolves_exactly_as_its_vmm(topo: Topology, tasks: FakeTasks) -> None:
    tasks.spawn(10, starttime=50, uid=2000)
    vmm = tasks.spawn(11, ppid=10, starttime=60, uid=2000)
    other_vmm = tasks.spawn(12, starttime=70, uid=2000)
    guest, other = Vm(vmm, "guest0"), Vm(other_vmm, "guest1")
    assert topo.resolve(guest) is None
    topo.add_member("a", "uid:2000")
    assert topo.resolve(guest) is topo.bus("a") is topo.resolve(other)
    topo.add_member("b", "pid:10")  # the VMM's parent: nearest pid rule beats the uid
    assert topo.resolve(guest) is topo.bus("b") is topo.resolve(vmm)
    assert topo.resolve(other) is topo.bus("a")
    topo.add_member("c", "domid:11")  # a VM is never matched by a domid rule
    topo.remove_member("a", "uid:2000")
    assert topo.resolve(other) is None


def test_vm_of_a_recycled_vmm_pid_is_not_admitted(topo: Topology, tasks: FakeTasks) -> None:
    vmm = tasks.spawn(10, starttime=50)
    topo.add_member("a", "pid:10")
    assert topo.resolve(Vm(vmm, "g")) is topo.bus("a")
    tasks.kill(10)
    newcomer = tasks.spawn(10, starttime=51)
    assert topo.resolve(Vm(newcomer, "g")) is None
    assert topo.resolve(Vm(Peer(10, 2000, 2000), "g")) is None


def test_same_domid_on_two_buses_is_busy(topo: Topology) -> None:
    assert topo.add_member("a", "domid:7") == DomidRule(7)
    with pytest.raises(Busy) as info:
        topo.add_member("b", "domid:7")
    assert info.value.errno == errno.EBUSY
    with pytest.raises(Busy):
        topo.add_member("b", DomidRule(7))
    with pytest.raises(Exists):
        topo.add_member("a", "domid:007")
    topo.add_member("b", "domid:8")
    topo.add_member("b", "uid:7")  # another number space: no conflict
    assert topo.members("a") == ["domid:7"]
    assert topo.members("b") == ["domid:8", "uid:7"]


def test_remove_domid_member(topo: Topology) -> None:
    topo.add_member("a", "domid:7")
    with pytest.raises(NotFound):
        topo.remove_member("b", "domid:7")
    with pytest.raises(NotFound):
        topo.remove_member("a", "domid:8")
    with pytest.raises(NotFound):
        topo.remove_member("a", "uid:7")
    with pytest.raises(Invalid):
        topo.remove_member("a", "domid:0")
    topo.remove_member("a", "domid:7")
    assert topo.resolve(Domain(7)) is None
    topo.add_member("b", "domid:7")  # free again
    assert topo.resolve(Domain(7)) is topo.bus("b")
    topo.remove_member("b", DomidRule(7))
    topo.add_member("c", "domid:7")
    topo.remove_bus("c")  # a removed bus frees its domids too
    topo.add_member("a", "domid:7")


def test_prune_leaves_domid_rules(topo: Topology) -> None:
    topo.add_member("a", "domid:7")
    assert topo.prune_members() == 0
    assert topo.members("a") == ["domid:7"]


def _denial(topo: Topology, identity: Identity) -> tuple[type, int, str]:
    with pytest.raises(Denied) as info:
        topo.admit(identity, "test", lambda _member, _reason: None)
    assert topo.join(identity, "test", lambda _member, _reason: None) is None
    return type(info.value), info.value.errno, info.value.message


def test_denial_is_the_same_whatever_exists_elsewhere(tasks: FakeTasks) -> None:
    proc = tasks.spawn(10, starttime=50, uid=2000)
    strangers: list[Identity] = [proc, Vm(proc, "guest0"), Domain(7), Domain(0)]
    empty = Topology(Registry(), tasks, SELF_UID)
    busy = Topology(Registry(), tasks, SELF_UID)
    for name in ("a", "secret"):
        busy.create_bus(name)
    # Rules near each stranger: the same numbers in the other spaces, a parent
    # of nobody, neighbouring domids.
    tasks.spawn(30, starttime=3, uid=10)
    for rule in ("uid:10", "uid:50", "domid:10", "domid:2000", "domid:6", "domid:8"):
        busy.add_member("secret", rule)
    busy.add_member("a", "pid:30")
    expected = (Denied, errno.EACCES, NOT_A_MEMBER)
    for identity in strangers:
        assert _denial(empty, identity) == expected, identity
        assert _denial(busy, identity) == expected, identity
    assert NOT_A_MEMBER == "not a member of any bus"


def test_admit_returns_the_member(topo: Topology, tasks: FakeTasks) -> None:
    topo.add_member("a", "domid:7")
    member = topo.admit(Domain(7), "xen", lambda _member, _reason: None)
    assert isinstance(member, Member)
    assert member.bus is topo.bus("a") and member.peer == Domain(7)
    assert topo.clients("a") == [member]


# --- domains, VMs and open connections -------------------------------------------------------


def test_removing_a_domid_rule_revokes_that_domains_connections(linked: Topology) -> None:
    topo = linked
    topo.add_member("a", "domid:7")
    topo.add_member("a", "domid:8")
    topo.add_member("a", "uid:7")
    revoke = Revocations()
    conn = _open(topo, Domain(7), revoke)
    other = _open(topo, Domain(8), revoke)
    proc = _open(topo, Peer(7, 7, 7), revoke)
    assert (conn.bus.name, other.bus.name, proc.bus.name) == ("a", "a", "a")
    topo.remove_member("a", "domid:7")
    assert revoke.seen == [(conn.id, "bus_gone", "no longer a member of bus 'a'")]
    assert conn.closed and not other.closed and not proc.closed
    topo.remove_member("a", "uid:7")
    assert proc.closed and not other.closed


def test_moving_a_vmm_moves_its_vm(linked: Topology, tasks: FakeTasks) -> None:
    topo = linked
    vmm = tasks.spawn(10, uid=2000)
    topo.add_member("a", "uid:2000")
    revoke = Revocations()
    conn = _open(topo, Vm(vmm, "guest0"), revoke)
    topo.add_member("b", "pid:10")  # the VMM's pid rule beats its uid: the VM moves too
    assert [kind for _, kind, _ in revoke.seen] == ["bus_gone"]
    assert conn.closed
    again = _open(topo, Vm(vmm, "guest0"), revoke)
    assert again.bus is topo.bus("b")
