"""The topology: registry, devices, buses, links, connections, snapshots."""

from __future__ import annotations

import importlib.metadata
import json
import re
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vbus.core.device import Attribute, DeviceModel, Session
from vbus.core.members import NOT_A_MEMBER, Domain, DomidRule, Peer, PidRule, UidRule, Vm
from vbus.core.model import (
    BUS_GONE,
    DEVICE_REMOVED,
    Connection,
    Device,
    Topology,
    validate_name,
)
from vbus.core.registry import Registry
from vbus.errors import Busy, Denied, Exists, Invalid, NoSuchTask, NotFound, VbusError
from vbus.queue import Queue
from vbus.testing import DeviceHarness

SELF_UID = 1000


class FakeTasks:
    """A process table: pid -> (ppid, starttime, uid)."""

    def __init__(self) -> None:
        self.procs: dict[int, tuple[int, int, int]] = {1: (0, 1, 0)}

    def spawn(self, pid: int, ppid: int = 1, starttime: int = 100, uid: int = 2000) -> Peer:
        self.procs[pid] = (ppid, starttime, uid)
        return Peer(pid=pid, uid=uid, gid=uid, starttime=starttime)

    def kill(self, pid: int) -> None:
        del self.procs[pid]

    def starttime(self, pid: int) -> int | None:
        proc = self.procs.get(pid)
        return None if proc is None else proc[1]

    def parent(self, pid: int) -> int | None:
        proc = self.procs.get(pid)
        return None if proc is None or proc[0] <= 0 else proc[0]

    def uid(self, pid: int) -> int | None:
        proc = self.procs.get(pid)
        return None if proc is None else proc[2]


class ProbeSession(Session):
    closes = 0

    def close(self) -> None:
        self.closes += 1
        super().close()


class Probe(DeviceModel):
    """Records what the core does to it; ``refuse`` is a value it rejects."""

    name = "probe"
    description = "test device"
    attributes = (
        Attribute("mode", "choice", "a", choices=("a", "b", "refuse")),
        Attribute("size", "int", 4, minimum=1, maximum=64),
        Attribute("flag", "bool", False),
        Attribute("label", "str", ""),
        Attribute("serial", "str", "s-1", readonly=True),
    )
    fail_open: VbusError | None = None

    def __init__(self, device: Device) -> None:
        super().__init__(device)
        self.changes: list[tuple[str, Any]] = []
        self.sessions: list[ProbeSession] = []
        self.destroyed = 0
        self.attrs_at_init = dict(device.attrs)

    def open(self, conn: Connection) -> Session:
        if self.fail_open is not None:
            raise self.fail_open
        session = ProbeSession(self, conn)
        self.sessions.append(session)
        return session

    def attribute_changed(self, name: str, value: Any) -> None:
        if value == "refuse":
            raise Busy("probe refuses")
        self.changes.append((name, value))

    def destroy(self) -> None:
        self.destroyed += 1


class Plain(DeviceModel):
    name = "plain"
    description = "nothing at all"

    def open(self, conn: Connection) -> Session:
        return Session(self, conn)


class Exploding(DeviceModel):
    name = "exploding"
    description = "fails to instantiate"

    def __init__(self, device: Device) -> None:
        raise Invalid("exploding: cannot be created")

    def open(self, conn: Connection) -> Session:
        raise AssertionError("unreachable")


class BadDestroy(Plain):
    name = "baddestroy"

    def destroy(self) -> None:
        raise RuntimeError("boom")


class Revocations:
    def __init__(self, topo: Topology | None = None) -> None:
        self.seen: list[tuple[Connection, str, str]] = []
        self.topo = topo  # if set, closes from inside the callback like a connector may

    def __call__(self, conn: Connection, kind: Any, reason: str) -> None:
        assert not conn.closed  # called before the core closes it
        self.seen.append((conn, kind, reason))
        if self.topo is not None:
            self.topo.close(conn, "closed by connector")


def make_registry() -> Registry:
    registry = Registry()
    for cls in (Probe, Plain, Exploding, BadDestroy):
        registry.register(cls)
    return registry


@pytest.fixture
def tasks() -> FakeTasks:
    return FakeTasks()


@pytest.fixture
def topo(tasks: FakeTasks) -> Topology:
    return Topology(make_registry(), tasks, SELF_UID, boot_id="boot-1")


def peer(pid: int = 10, uid: int = 2000) -> Peer:
    return Peer(pid=pid, uid=uid, gid=uid, starttime=100)


def model_of(device: Device) -> Probe:
    model = device.model
    assert isinstance(model, Probe)
    return model


# --- registry -------------------------------------------------------------------------


def test_registry_basics() -> None:
    registry = make_registry()
    assert registry.names() == ["baddestroy", "exploding", "plain", "probe"]
    assert "probe" in registry
    assert "nope" not in registry
    assert registry.get("probe") is Probe
    assert list(registry) == [BadDestroy, Exploding, Plain, Probe]
    assert len(registry) == 4
    assert registry.register(Probe) is Probe  # same class again: no-op
    assert len(registry) == 4


def test_registry_unknown_class_is_invalid() -> None:
    with pytest.raises(Invalid, match=re.escape("unknown deviceclass 'nope'")):
        Registry().get("nope")


def test_registry_name_taken_by_another_class_is_exists() -> None:
    registry = make_registry()

    class Impostor(Plain):
        name = "probe"

    with pytest.raises(Exists):
        registry.register(Impostor)
    assert registry.get("probe") is Probe


def _model(name: Any, attributes: Any = ()) -> type[DeviceModel]:
    return type("Made", (Plain,), {"name": name, "attributes": attributes})


@pytest.mark.parametrize(
    "candidate",
    [
        object,
        42,
        Attribute,
        _model(""),
        _model("Probe"),
        _model("1probe"),
        _model("a" * 33),
        _model("a b"),
        _model("a.b"),
        _model(None),
        _model("ok", [Attribute("x", "str", "")]),  # not a tuple
        _model("ok", ("notanattribute",)),
        _model("ok", (Attribute("Bad", "str", ""),)),
        _model("ok", (Attribute("type", "str", ""),)),
        _model("ok", (Attribute("stats", "int", 0),)),
        _model("ok", (Attribute("x", "float", 0.0),)),
        _model("ok", (Attribute("x", "choice", "c", choices=("a", "b")),)),
        _model("ok", (Attribute("x", "int", 0, minimum=1),)),
        _model("ok", (Attribute("x", "str", ""), Attribute("x", "int", 0))),
    ],
)
def test_registry_rejects_invalid_classes(candidate: Any) -> None:
    registry = Registry()
    with pytest.raises(Invalid):
        registry.register(candidate)
    assert registry.names() == []


def test_registry_rejects_abstract_class() -> None:
    class Abstract(DeviceModel):
        name = "abstract"
        description = "no open()"

    with pytest.raises(Invalid):
        Registry().register(Abstract)  # type: ignore[type-abstract]


def test_registry_accepts_valid_names_and_unset_defaults() -> None:
    registry = Registry()
    registry.register(_model("a"))
    registry.register(_model("a-b_c9" + "x" * 26))
    registry.register(_model("m", (Attribute("mac", "mac", None), Attribute("m2", "mac", ""))))
    assert registry.names() == ["a", "a-b_c9" + "x" * 26, "m"]


class _FakeEntryPoint:
    def __init__(self, name: str, value: str, load: Any) -> None:
        self.name = name
        self.value = value
        self._load = load

    def load(self) -> Any:
        return self._load()


class _Log:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def warning(self, event: str, **fields: Any) -> None:
        self.events.append((event, fields))


def _raise(exc: BaseException) -> Any:
    raise exc


def test_from_entry_points_skips_broken_plugins(monkeypatch: pytest.MonkeyPatch) -> None:
    entries = [
        importlib.metadata.EntryPoint("probe", f"{__name__}:Probe", "vbus.deviceclasses"),
        importlib.metadata.EntryPoint("plain", f"{__name__}:Plain", "vbus.deviceclasses"),
        importlib.metadata.EntryPoint("gone", "vbus_no_such_module_xyz:Gone", "g"),
        importlib.metadata.EntryPoint("wrongname", f"{__name__}:Plain", "vbus.deviceclasses"),
        importlib.metadata.EntryPoint("notamodel", "os:path", "vbus.deviceclasses"),
        _FakeEntryPoint("exits", "x:y", lambda: _raise(SystemExit(3))),
        _FakeEntryPoint("crashes", "x:z", lambda: _raise(ZeroDivisionError())),
    ]
    seen_groups: list[str] = []

    def fake_entry_points(*, group: str) -> list[Any]:
        seen_groups.append(group)
        return entries

    monkeypatch.setattr(importlib.metadata, "entry_points", fake_entry_points)
    log = _Log()
    registry = Registry.from_entry_points(log=log)
    assert seen_groups == ["vbus.deviceclasses"]
    assert registry.names() == ["plain", "probe"]
    failed = sorted(fields["entry_point"] for event, fields in log.events)
    assert {event for event, _ in log.events} == {"deviceclass.load_failed"}
    assert failed == ["crashes", "exits", "gone", "notamodel", "wrongname"]


def test_from_entry_points_of_an_empty_group() -> None:
    registry = Registry.from_entry_points(group="vbus.tests.no-such-group", log=_Log())
    assert registry.names() == []


# --- names ------------------------------------------------------------------------------

_NAME_CHARS = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.:-")


def _valid_name(text: str) -> bool:
    return 1 <= len(text) <= 64 and all(c in _NAME_CHARS for c in text) and text[0] not in "_.:-"


@given(st.text(max_size=80) | st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,70}", fullmatch=True))
def test_validate_name_matches_the_rule(text: str) -> None:
    if _valid_name(text):
        assert validate_name(text) == text
    else:
        with pytest.raises(Invalid):
            validate_name(text)


@pytest.mark.parametrize("name", ["", "-a", ".a", "a/b", "a b", "a\n", "x" * 65, "é", "..", "a\0"])
def test_bad_names_are_invalid_for_devices_and_buses(topo: Topology, name: str) -> None:
    with pytest.raises(Invalid):
        topo.create_device(name)
    with pytest.raises(Invalid):
        topo.create_bus(name)
    assert topo.devices() == [] and topo.buses() == []


@pytest.mark.parametrize("name", ["a", "A9", "eth0.100", "x:y", "a-b_c", "9", "x" * 64])
def test_good_names(topo: Topology, name: str) -> None:
    assert topo.create_device(name).name == name
    assert topo.create_bus(name).name == name


# --- devices ------------------------------------------------------------------------------


def test_typeless_device_then_set_type(topo: Topology) -> None:
    device = topo.create_device("x")
    assert not device.typed and device.deviceclass is None
    assert device.attrs == {} and device.attributes == ()
    with pytest.raises(Invalid):
        _ = device.model
    with pytest.raises(NotFound):
        topo.get_attribute("x", "mode")
    topo.set_type("x", "probe")
    assert device.typed and device.deviceclass == "probe"
    assert device.attrs == {"mode": "a", "size": 4, "flag": False, "label": "", "serial": "s-1"}
    assert model_of(device).attrs_at_init == device.attrs  # defaults before __init__


def test_create_device_with_class_and_attrs(topo: Topology) -> None:
    device = topo.create_device("x", "probe", {"size": "16", "flag": True, "mode": "b"})
    assert device.attrs["size"] == 16 and device.attrs["flag"] is True
    assert topo.get_attribute("x", "flag") == "1"
    assert topo.get_attribute("x", "size") == "16"
    assert model_of(device).changes == [("size", 16), ("flag", True), ("mode", "b")]


def test_device_ids_are_unique_and_never_reused(topo: Topology) -> None:
    a = topo.create_device("a")
    b = topo.create_device("b")
    topo.remove_device("a")
    c = topo.create_device("a")
    assert (a.id, b.id) == (1, 2)
    assert c.id not in (a.id, b.id)


def test_create_device_errors_leave_nothing(topo: Topology) -> None:
    topo.create_device("x")
    with pytest.raises(Exists):
        topo.create_device("x", "probe")
    with pytest.raises(Invalid, match="unknown deviceclass"):
        topo.create_device("y", "nope")
    with pytest.raises(Invalid):
        topo.create_device("y", attrs={"size": 3})  # attributes need a class
    with pytest.raises(Invalid):
        topo.create_device("y", "exploding")
    assert [d.name for d in topo.devices()] == ["x"]


@pytest.mark.parametrize(
    ("attrs", "error"),
    [
        ({"size": "1000"}, Invalid),
        ({"mode": "c"}, Invalid),
        ({"bogus": "1"}, NotFound),
        ({"serial": "s-2"}, Denied),
        ({"mode": "refuse"}, Busy),
        ({"size": "8", "flag": "perhaps"}, Invalid),
    ],
)
def test_create_device_bad_attrs_is_all_or_nothing(
    topo: Topology, attrs: dict[str, Any], error: type[VbusError]
) -> None:
    created: list[Probe] = []
    original_init = Probe.__init__

    def spying_init(self: Probe, device: Device) -> None:
        original_init(self, device)
        created.append(self)

    Probe.__init__ = spying_init  # type: ignore[method-assign]
    try:
        with pytest.raises(error):
            topo.create_device("x", "probe", attrs)
    finally:
        Probe.__init__ = original_init  # type: ignore[method-assign]
    assert topo.devices() == []
    assert [model.destroyed for model in created] == [1]
    topo.create_device("x", "probe")  # the name is free again


def test_set_type_errors(topo: Topology) -> None:
    topo.create_device("x", "probe")
    topo.create_device("y")
    with pytest.raises(Busy):
        topo.set_type("x", "plain")
    with pytest.raises(Invalid):
        topo.set_type("y", "nope")
    with pytest.raises(NotFound):
        topo.set_type("z", "probe")
    with pytest.raises(Invalid):
        topo.set_type("y", "exploding")
    assert not topo.device("y").typed and topo.device("y").attrs == {}
    topo.set_type("y", "plain")


def test_set_attribute(topo: Topology) -> None:
    device = topo.create_device("x", "probe")
    topo.set_attribute("x", "label", "  hello \n")
    assert topo.get_attribute("x", "label") == "hello"
    topo.set_attribute("x", "size", "0x20")
    assert device.attrs["size"] == 32
    assert model_of(device).changes == [("label", "hello"), ("size", 32)]


def test_set_attribute_errors(topo: Topology) -> None:
    device = topo.create_device("x", "probe")
    topo.create_device("t")
    before = dict(device.attrs)
    with pytest.raises(Invalid):
        topo.set_attribute("x", "size", "65")
    with pytest.raises(Invalid):
        topo.set_attribute("x", "mode", "zzz")
    with pytest.raises(NotFound):
        topo.set_attribute("x", "nope", "1")
    with pytest.raises(Denied):
        topo.set_attribute("x", "serial", "s-2")
    with pytest.raises(Busy):
        topo.set_attribute("x", "mode", "refuse")  # the model refuses: value rolled back
    with pytest.raises(NotFound):
        topo.set_attribute("t", "mode", "a")  # typeless: no attributes
    with pytest.raises(NotFound):
        topo.set_attribute("missing", "mode", "a")
    with pytest.raises(NotFound):
        topo.get_attribute("missing", "mode")
    with pytest.raises(NotFound):
        topo.get_attribute("x", "nope")
    assert device.attrs == before
    assert model_of(device).changes == []
    assert topo.get_attribute("x", "serial") == "s-1"  # readable though read-only


def test_remove_device(topo: Topology) -> None:
    device = topo.create_device("x", "probe")
    model = model_of(device)
    topo.create_bus("b")
    topo.link("b", "x")
    with pytest.raises(Busy):
        topo.remove_device("x")
    topo.unlink("b", "x")
    topo.remove_device("x")
    assert model.destroyed == 1
    assert topo.devices() == []
    with pytest.raises(NotFound):
        topo.remove_device("x")
    with pytest.raises(NotFound):
        topo.device("x")
    topo.create_device("t")
    topo.remove_device("t")  # typeless: nothing to destroy


def test_remove_device_survives_a_failing_destroy(topo: Topology) -> None:
    topo.create_device("x", "baddestroy")
    topo.remove_device("x")
    assert topo.devices() == []


def test_devices_listing_is_sorted_by_name(topo: Topology) -> None:
    for name in ("m", "a", "z"):
        topo.create_device(name)
    assert [d.name for d in topo.devices()] == ["a", "m", "z"]


# --- buses and links --------------------------------------------------------------------


def test_buses(topo: Topology) -> None:
    topo.create_bus("b")
    topo.create_bus("a")
    assert [b.name for b in topo.buses()] == ["a", "b"]
    with pytest.raises(Exists):
        topo.create_bus("a")
    topo.remove_bus("a")
    with pytest.raises(NotFound):
        topo.remove_bus("a")
    with pytest.raises(NotFound):
        topo.bus("a")
    assert [b.name for b in topo.buses()] == ["b"]


def test_link_and_unlink(topo: Topology) -> None:
    topo.create_bus("a")
    topo.create_bus("b")
    device = topo.create_device("x", "plain")
    topo.link("a", "x")
    topo.link("b", "x")  # a device may be on several buses
    assert device.buses == {"a", "b"}
    assert topo.bus("a").devices == {"x": device}
    topo.unlink("a", "x")
    assert device.buses == {"b"}
    assert topo.bus("a").devices == {}


def test_link_errors(topo: Topology) -> None:
    topo.create_bus("a")
    topo.create_device("x", "plain")
    topo.create_device("t")
    with pytest.raises(NotFound):
        topo.link("nope", "x")
    with pytest.raises(NotFound):
        topo.link("a", "nope")
    with pytest.raises(Invalid):
        topo.link("a", "t")  # typeless
    topo.link("a", "x")
    with pytest.raises(Exists):
        topo.link("a", "x")
    with pytest.raises(NotFound):
        topo.unlink("a", "t")
    with pytest.raises(NotFound):
        topo.unlink("a", "nope")
    with pytest.raises(NotFound):
        topo.unlink("nope", "x")


def test_remove_bus_unlinks_devices(topo: Topology) -> None:
    topo.create_bus("a")
    device = topo.create_device("x", "plain")
    topo.link("a", "x")
    topo.remove_bus("a")
    assert device.buses == set()
    topo.remove_device("x")


def test_devices_on_is_sorted_by_id(topo: Topology) -> None:
    topo.create_bus("a")
    for name in ("z", "m", "a"):
        topo.create_device(name, "plain")
    for name in ("a", "z", "m"):
        topo.link("a", name)
    # Ids are the bus's own, in link order, whatever the devices' global ids.
    assert [d.name for d in topo.devices_on("a")] == ["a", "z", "m"]
    assert [topo.bus("a").id_of(d) for d in topo.devices_on("a")] == [1, 2, 3]
    assert topo.devices_on(topo.bus("a")) == topo.devices_on("a")
    with pytest.raises(NotFound):
        topo.devices_on("nope")


def test_find_device_by_name_or_id(topo: Topology) -> None:
    topo.create_bus("a")
    device = topo.create_device("x", "plain")
    topo.link("a", "x")
    assert topo.find_device("a", "x") is device
    assert topo.find_device("a", device.id) is device
    assert topo.find_device(topo.bus("a"), "x") is device


def test_find_device_does_not_tell_what_exists_elsewhere(topo: Topology) -> None:
    topo.create_bus("mine")
    topo.create_bus("theirs")
    elsewhere = topo.create_device("secret", "plain")
    topo.link("theirs", "secret")
    topo.create_device("unlinked", "plain")
    errors = []
    for ref in ("secret", elsewhere.id, "unlinked", "does-not-exist", 999, True, 1.5):
        with pytest.raises(NotFound) as info:
            topo.find_device("mine", ref)  # type: ignore[arg-type]
        errors.append((type(info.value), info.value.message, info.value.errno))
    assert len(set(errors)) == 1
    assert errors[0][1] == "no such device"


# --- connections -------------------------------------------------------------------------


@pytest.fixture
def wired(topo: Topology) -> Topology:
    """Buses a and b; probe devices x (on a and b) and y (on a)."""
    topo.create_bus("a")
    topo.create_bus("b")
    topo.create_device("x", "probe")
    topo.create_device("y", "probe")
    topo.link("a", "x")
    topo.link("b", "x")
    topo.link("a", "y")
    return topo


def test_open_and_close(wired: Topology) -> None:
    revoke = Revocations()
    conn = wired.open("a", "x", peer(), "userspace", revoke, since=123.0)
    assert conn.bus is wired.bus("a") and conn.device is wired.device("x")
    assert conn.connector == "userspace" and conn.since == 123.0
    assert (conn.calls, conn.faults, conn.closed, conn.close_reason) == (0, 0, False, None)
    session = conn.session
    assert isinstance(session, ProbeSession) and session.conn is conn
    assert model_of(wired.device("x")).sessions == [session]
    assert wired.connections() == [conn]
    assert wired.connections("a") == [conn]
    assert wired.connections("b") == []
    assert wired.bus("a").connections == {conn.id: conn}
    assert wired.connection(conn.id) is conn
    wired.close(conn, "client closed")
    wired.close(conn, "again")  # idempotent
    assert conn.closed and conn.close_reason == "client closed"
    assert session.closes == 1
    assert wired.connections() == []
    assert revoke.seen == []
    with pytest.raises(NotFound):
        wired.connection(conn.id)


def test_open_by_id_and_with_a_bus_object(wired: Topology) -> None:
    device = wired.device("y")
    conn = wired.open(wired.bus("a"), device.id, peer(), "kvm", Revocations())
    assert conn.device is device
    assert conn.since > 0


def test_connection_ids_are_unique(wired: Topology) -> None:
    conns = [wired.open("a", "x", peer(), "userspace", Revocations()) for _ in range(3)]
    assert len({c.id for c in conns}) == 3
    assert wired.connections() == sorted(conns, key=lambda c: c.id)


def test_describe(wired: Topology) -> None:
    conn = wired.open("a", "x", Peer(10, 2000, 3000, 5), "userspace", Revocations(), since=9.5)
    conn.calls = 3
    conn.faults = 1
    described = conn.describe()
    assert described == {
        "id": conn.id,
        "bus": "a",
        "device": "x",
        "device_id": wired.device("x").id,
        "connector": "userspace",
        "pid": 10,
        "uid": 2000,
        "gid": 3000,
        "since": 9.5,
        "calls": 3,
        "faults": 1,
    }
    json.dumps(described)


def test_describe_a_domain_and_a_vm(wired: Topology) -> None:
    domain = wired.open("a", "x", Domain(7), "xen", Revocations(), since=1.0)
    described = domain.describe()
    assert described["domid"] == 7
    assert not {"pid", "uid", "gid", "vm"} & set(described)
    assert "domid=7" in repr(domain)
    vm = wired.open("a", "x", Vm(Peer(10, 2000, 3000, 5), "guest0"), "kvm", Revocations())
    described = vm.describe()
    assert (described["vm"], described["pid"], described["uid"], described["gid"]) == (
        "guest0",
        10,
        2000,
        3000,
    )
    assert "domid" not in described
    json.dumps(described)


def test_open_errors_leave_nothing_registered(wired: Topology) -> None:
    with pytest.raises(NotFound, match="no such device"):
        wired.open("b", "y", peer(), "userspace", Revocations())  # y is not on b
    with pytest.raises(NotFound):
        wired.open("nope", "x", peer(), "userspace", Revocations())
    model = model_of(wired.device("x"))
    model.fail_open = Busy("device busy")
    with pytest.raises(Busy):
        wired.open("a", "x", peer(), "userspace", Revocations())
    assert wired.connections() == []
    assert wired.bus("a").connections == {}


def test_open_on_a_removed_bus_object_is_not_found(wired: Topology) -> None:
    stale = wired.bus("b")
    wired.remove_bus("b")
    wired.create_bus("b")
    wired.link("b", "x")
    with pytest.raises(NotFound):
        wired.open(stale, "x", peer(), "userspace", Revocations())


def test_unlink_revokes_that_devices_connections_on_that_bus(wired: Topology) -> None:
    revoke = Revocations()
    x_on_a = wired.open("a", "x", peer(), "userspace", revoke)
    y_on_a = wired.open("a", "y", peer(), "userspace", revoke)
    x_on_b = wired.open("b", "x", peer(), "userspace", revoke)
    session = x_on_a.session
    assert isinstance(session, ProbeSession)
    wired.unlink("a", "x")
    assert [(c, kind) for c, kind, _ in revoke.seen] == [(x_on_a, DEVICE_REMOVED)]
    assert "x" in revoke.seen[0][2]
    assert x_on_a.closed and x_on_a.close_reason == "device_removed"
    assert session.closes == 1
    assert not y_on_a.closed and not x_on_b.closed
    assert wired.connections() == [y_on_a, x_on_b]


def test_remove_bus_with_connections(wired: Topology) -> None:
    revoke = Revocations()
    first = wired.open("a", "x", peer(), "userspace", revoke)
    second = wired.open("a", "y", peer(11), "userspace", revoke)
    other = wired.open("b", "x", peer(), "userspace", revoke)
    with pytest.raises(Busy):
        wired.remove_bus("a")
    assert wired.bus("a").devices.keys() == {"x", "y"}
    assert revoke.seen == []
    wired.remove_bus("a", force=True)
    assert [(c, kind) for c, kind, _ in revoke.seen] == [(first, BUS_GONE), (second, BUS_GONE)]
    assert first.closed and second.closed and not other.closed
    assert wired.device("y").buses == set()
    assert wired.device("x").buses == {"b"}
    assert wired.connections() == [other]


def test_revoke_callback_may_close_the_connection_itself(wired: Topology) -> None:
    revoke = Revocations(wired)
    conn = wired.open("a", "x", peer(), "userspace", revoke)
    wired.unlink("a", "x")
    assert conn.closed and conn.close_reason == "closed by connector"
    assert len(revoke.seen) == 1


def test_a_failing_revoke_callback_does_not_stop_the_change(wired: Topology) -> None:
    def broken(conn: Connection, kind: Any, reason: str) -> None:
        raise RuntimeError("connector bug")

    conn = wired.open("a", "x", peer(), "userspace", broken)
    wired.remove_bus("a", force=True)
    assert conn.closed
    with pytest.raises(NotFound):
        wired.bus("a")


def test_a_failing_session_close_still_closes(wired: Topology) -> None:
    conn = wired.open("a", "x", peer(), "userspace", Revocations())
    assert conn.session is not None

    def broken() -> None:
        raise RuntimeError("boom")

    conn.session.close = broken  # type: ignore[method-assign]
    wired.close(conn)
    assert conn.closed and wired.connections() == []


# --- transactions, snapshot and apply -----------------------------------------------------


def test_transaction_undoes_creations(topo: Topology, tasks: FakeTasks) -> None:
    tasks.spawn(10)
    topo.create_bus("keep")
    topo.create_device("old", "probe")
    with pytest.raises(Invalid), topo.transaction():
        topo.create_bus("a")
        topo.create_device("x", "probe", {"size": 8})
        topo.create_device("t")
        topo.set_type("t", "plain")
        topo.set_attribute("old", "size", 9)
        topo.link("a", "x")
        topo.add_member("a", "uid:5")
        topo.add_member("a", "10")
        with topo.transaction():  # nested: joins the outer one
            topo.create_bus("inner")
        raise Invalid("changed my mind")
    assert [b.name for b in topo.buses()] == ["keep"]
    assert [d.name for d in topo.devices()] == ["old"]
    assert topo.device("old").attrs["size"] == 4
    topo.add_member("keep", "uid:5")  # the rules were released
    topo.add_member("keep", "10")


def _populated(topo: Topology, tasks: FakeTasks) -> None:
    tasks.spawn(10, starttime=50)
    tasks.spawn(11, ppid=10, starttime=60)
    topo.create_device("typeless")
    topo.create_device("x", "probe", {"size": 8, "flag": "yes", "mode": "a"})
    topo.create_device("y", "plain")
    topo.create_bus("a")
    topo.create_bus("b")
    topo.create_bus("empty")
    topo.link("a", "x")
    topo.link("a", "y")
    topo.link("b", "x")
    topo.add_member("a", "uid:self")
    topo.add_member("a", "uid:7")
    topo.add_member("b", "11")  # nested under a's rule for its parent
    topo.add_member("a", "10")
    topo.add_member("b", "domid:32751")
    topo.add_member("b", "domid:7")  # the same number as a's uid 7: another space


EXPECTED_SNAPSHOT = {
    "version": 1,
    "boot_id": "boot-1",
    "devices": {
        "typeless": {"id": 1, "class": None, "attrs": {}},
        "x": {"id": 2, "class": "probe", "attrs": {"flag": "1", "size": "8"}},
        "y": {"id": 3, "class": "plain", "attrs": {}},
    },
    "buses": {
        "a": {
            "devices": ["x", "y"],
            "ids": {"x": 1, "y": 2},
            "next_id": 3,
            "uids": [7, SELF_UID],
            "pids": [{"pid": 10, "starttime": 50}],
            "domids": [],
        },
        "b": {
            "devices": ["x"],
            "ids": {"x": 1},
            "next_id": 2,
            "uids": [],
            "pids": [{"pid": 11, "starttime": 60}],
            "domids": [7, 32751],
        },
        "empty": {"devices": [], "ids": {}, "next_id": 1, "uids": [], "pids": [], "domids": []},
    },
}


def test_snapshot(topo: Topology, tasks: FakeTasks) -> None:
    _populated(topo, tasks)
    topo.open("a", "x", peer(), "userspace", Revocations())  # connections are not persisted
    snap = topo.snapshot()
    assert snap == EXPECTED_SNAPSHOT
    assert json.loads(json.dumps(snap)) == snap
    assert list(snap["devices"]) == sorted(snap["devices"])


def test_snapshot_apply_round_trip(topo: Topology, tasks: FakeTasks) -> None:
    _populated(topo, tasks)
    snap = json.loads(json.dumps(topo.snapshot()))
    fresh = Topology(make_registry(), tasks, SELF_UID, boot_id="boot-1")
    fresh.apply(snap)
    assert fresh.snapshot() == snap
    assert fresh.resolve(Peer(11, 2000, 2000)) is fresh.bus("b")
    assert fresh.resolve(tasks.spawn(12, ppid=10, starttime=70)) is fresh.bus("a")
    assert fresh.device("x").attrs["flag"] is True
    assert fresh.resolve(Domain(7)) is fresh.bus("b")
    assert fresh.resolve(Domain(32751)) is fresh.bus("b")
    assert fresh.bus("b").rules >= {DomidRule(7), DomidRule(32751)}


def test_an_older_snapshot_without_domids_loads(topo: Topology, tasks: FakeTasks) -> None:
    _populated(topo, tasks)
    snap = json.loads(json.dumps(topo.snapshot()))
    for spec in snap["buses"].values():
        del spec["domids"]
    assert snap["version"] == 1
    fresh = Topology(make_registry(), tasks, SELF_UID, boot_id="boot-1")
    fresh.apply(snap)
    assert fresh.members("b") == ["pid:11"]
    assert fresh.resolve(Domain(7)) is None
    assert all(spec["domids"] == [] for spec in fresh.snapshot()["buses"].values())


def test_domid_rules_survive_another_boot(topo: Topology, tasks: FakeTasks) -> None:
    # Unlike a pid rule, a domid rule names no task of this boot.
    topo.create_bus("a")
    topo.add_member("a", "domid:7")
    fresh = Topology(make_registry(), tasks, SELF_UID, boot_id="boot-2")
    fresh.apply(topo.snapshot())
    assert fresh.members("a") == ["domid:7"]


def test_apply_drops_pid_rules_of_other_tasks(topo: Topology, tasks: FakeTasks) -> None:
    _populated(topo, tasks)
    snap = topo.snapshot()
    tasks.kill(10)
    tasks.kill(11)
    tasks.spawn(11, starttime=61)  # pid reused
    fresh = Topology(make_registry(), tasks, SELF_UID, boot_id="boot-1")
    fresh.apply(snap)
    assert fresh.members("a") == ["uid:1000", "uid:7"]
    assert fresh.members("b") == ["domid:32751", "domid:7"]


def test_apply_drops_pid_rules_from_another_boot(topo: Topology, tasks: FakeTasks) -> None:
    _populated(topo, tasks)
    snap = topo.snapshot()
    fresh = Topology(make_registry(), tasks, SELF_UID, boot_id="boot-2")
    fresh.apply(snap)
    assert fresh.members("b") == ["domid:32751", "domid:7"]
    assert fresh.members("a") == ["uid:1000", "uid:7"]
    unknown_boot = Topology(make_registry(), tasks, SELF_UID)
    unknown_boot.apply(snap)
    assert unknown_boot.members("b") == ["domid:32751", "domid:7", "pid:11"]


def test_apply_is_all_or_nothing(topo: Topology, tasks: FakeTasks) -> None:
    snap: dict[str, Any] = json.loads(json.dumps(EXPECTED_SNAPSHOT))
    tasks.spawn(10, starttime=50)
    tasks.spawn(11, ppid=10, starttime=60)
    snap["buses"]["b"]["devices"] = ["x", "nope"]
    with pytest.raises(NotFound):
        topo.apply(snap)
    assert topo.snapshot()["devices"] == {} and topo.snapshot()["buses"] == {}
    topo.apply(EXPECTED_SNAPSHOT)


def test_apply_over_existing_config_conflicts(topo: Topology, tasks: FakeTasks) -> None:
    _populated(topo, tasks)
    before = topo.snapshot()
    with pytest.raises(Exists):
        topo.apply({"version": 1, "devices": {"new": {"class": "plain"}, "x": {}}})
    assert topo.snapshot() == before
    other_uid = {"version": 1, "buses": {"c": {"uids": [7]}}}
    with pytest.raises(Busy):
        topo.apply(other_uid)
    assert topo.snapshot() == before
    other_domid = {"version": 1, "buses": {"c": {"domids": [3]}, "d": {"domids": [7]}}}
    with pytest.raises(Busy):
        topo.apply(other_domid)
    assert topo.snapshot() == before
    with pytest.raises(Busy):  # the same domid twice inside one snapshot
        topo.apply({"version": 1, "buses": {"c": {"domids": [3]}, "d": {"domids": [3]}}})
    assert topo.snapshot() == before


@pytest.mark.parametrize(
    "snap",
    [
        [],
        {},
        {"version": 2},
        {"version": 1, "boot_id": 5},
        {"version": 1, "devices": []},
        {"version": 1, "buses": []},
        {"version": 1, "devices": {"x": "probe"}},
        {"version": 1, "devices": {"x": {"class": 5}}},
        {"version": 1, "devices": {"x": {"class": "probe", "attrs": []}}},
        {"version": 1, "devices": {"x": {"class": "probe", "attrs": {"size": [1]}}}},
        {"version": 1, "buses": {"a": []}},
        {"version": 1, "buses": {"a": {"devices": "x"}}},
        {"version": 1, "buses": {"a": {"uids": ["7"]}}},
        {"version": 1, "buses": {"a": {"uids": [-1]}}},
        {"version": 1, "buses": {"a": {"uids": [True]}}},
        {"version": 1, "buses": {"a": {"pids": [10]}}},
        {"version": 1, "buses": {"a": {"pids": [{"pid": 10}]}}},
        {"version": 1, "buses": {"a": {"pids": [{"pid": "10", "starttime": 1}]}}},
        {"version": 1, "buses": {"a": {"domids": 7}}},
        {"version": 1, "buses": {"a": {"domids": ["7"]}}},
        {"version": 1, "buses": {"a": {"domids": [0]}}},
        {"version": 1, "buses": {"a": {"domids": [-1]}}},
        {"version": 1, "buses": {"a": {"domids": [32752]}}},
        {"version": 1, "buses": {"a": {"domids": [True]}}},
        {"version": 1, "buses": {"a": {"domids": [7.0]}}},
    ],
)
def test_apply_rejects_malformed_snapshots(topo: Topology, snap: Any) -> None:
    where = "snapshot: buses.a.domids: " if "domids" in str(snap) else "snapshot: "
    with pytest.raises(Invalid, match=rf"^{re.escape(where)}"):
        topo.apply(snap)
    assert topo.devices() == [] and topo.buses() == []


def test_apply_restores_the_members_that_are_valid(topo: Topology, tasks: FakeTasks) -> None:
    tasks.spawn(10, starttime=50)
    topo.apply({"version": 1, "buses": {"a": {"pids": [{"pid": 10, "starttime": 50}]}}})
    assert topo.bus("a").rules == {PidRule(10, 50)}
    with pytest.raises(NoSuchTask):
        topo.add_member("a", PidRule(10, 49))
    assert topo.bus("a").rules == {PidRule(10, 50)}
    assert UidRule(SELF_UID) not in topo.bus("a").rules


# --- what a north sees: per-bus ids, members --------------------------------------


def test_ids_are_per_bus_and_reveal_nothing_of_other_buses(topo: Topology) -> None:
    topo.create_bus("a")
    topo.create_bus("b")
    for name in ("a1", "a2", "a3", "shared", "b1"):
        topo.create_device(name, "plain")
    for name in ("a1", "a2", "a3", "shared"):
        topo.link("a", name)
    topo.link("b", "b1")
    topo.link("b", "shared")
    b = topo.bus("b")
    assert [b.id_of(d) for d in topo.devices_on("b")] == [1, 2]
    assert topo.find_device("b", 1).name == "b1"
    assert topo.find_device("b", 2).name == "shared"
    for ref in (3, 4, "a1"):  # exists on a only: the same answer as nothing at all
        with pytest.raises(NotFound, match=r"^no such device$"):
            topo.find_device("b", ref)
    # Ids are never reused on a bus: an old id cannot alias a new device.
    topo.unlink("b", "b1")
    topo.link("b", "b1")
    assert b.id_of(topo.device("b1")) == 3
    with pytest.raises(NotFound):
        topo.find_device("b", 1)


def test_ids_survive_a_snapshot_round_trip(topo: Topology, tasks: FakeTasks) -> None:
    topo.create_bus("a")
    for name in ("z", "y", "x"):
        topo.create_device(name, "plain")
        topo.link("a", name)
    topo.unlink("a", "z")  # a gap, and a next id past it
    snap = json.loads(json.dumps(topo.snapshot()))
    fresh = Topology(make_registry(), tasks, SELF_UID, boot_id="boot-1")
    fresh.apply(snap)
    a = fresh.bus("a")
    assert {d.name: a.id_of(d) for d in fresh.devices_on("a")} == {"y": 2, "x": 3}
    assert [fresh.device(n).id for n in ("x", "y", "z")] == [3, 2, 1]
    fresh.create_device("w", "plain")
    assert fresh.device("w").id == 4  # device ids are not reused either
    assert fresh.link("a", "w") == 4
    # A snapshot of an older daemon (no ids): devices get ids in list order.
    for spec in snap["buses"].values():
        del spec["ids"], spec["next_id"]
    for spec in snap["devices"].values():
        del spec["id"]
    old = Topology(make_registry(), tasks, SELF_UID, boot_id="boot-1")
    old.apply(snap)
    assert [old.bus("a").id_of(d) for d in old.devices_on("a")] == [1, 2]


def test_a_snapshot_with_clashing_ids_is_refused(topo: Topology) -> None:
    snap = {
        "version": 1,
        "devices": {"x": {"class": "plain"}, "y": {"class": "plain"}},
        "buses": {"a": {"devices": ["x", "y"], "ids": {"x": 1, "y": 1}}},
    }
    with pytest.raises(Invalid, match="twice"):
        topo.apply(snap)
    assert topo.buses() == [] and topo.devices() == []


class Expulsions:
    def __init__(self) -> None:
        self.seen: list[tuple[int, str]] = []

    def __call__(self, member: Any, reason: str) -> None:
        self.seen.append((member.id, reason))


def test_members_lose_their_bus_when_their_rule_goes(topo: Topology, tasks: FakeTasks) -> None:
    topo.create_bus("a")
    topo.create_bus("b")
    topo.create_device("x", "plain")
    topo.link("a", "x")
    topo.add_member("a", "uid:2000")
    assert topo.join(tasks.spawn(77, uid=3000), "userspace", Expulsions()) is None
    expelled = Expulsions()
    idle = topo.join(tasks.spawn(10), "userspace", expelled)
    busy = topo.join(tasks.spawn(11), "userspace", expelled)
    assert idle is not None and busy is not None
    assert (idle.bus.name, idle.client_id, busy.client_id) == ("a", 1, 2)
    revoked = Revocations()
    conn = topo.open("a", "x", busy.peer, "userspace", revoked, member=busy)
    # The first client of another bus is its client 1: nothing of bus a shows.
    topo.add_member("b", "uid:4000")
    other = topo.join(tasks.spawn(12, uid=4000), "userspace", Expulsions())
    assert other is not None and other.client_id == 1
    assert topo.clients("a") == [idle, busy]

    topo.remove_member("a", "uid:2000")
    assert sorted(expelled.seen) == [
        (idle.id, "no longer a member of bus 'a'"),
        (busy.id, "no longer a member of bus 'a'"),
    ]
    assert [(c, kind) for c, kind, _ in revoked.seen] == [(conn, BUS_GONE)]
    assert conn.closed and topo.clients("a") == [] and idle.gone
    topo.leave(idle)  # the connector's own leave afterwards is harmless


def test_a_bus_with_connected_clients_is_busy(topo: Topology, tasks: FakeTasks) -> None:
    topo.create_bus("a")
    topo.add_member("a", "uid:2000")
    expelled = Expulsions()
    member = topo.join(tasks.spawn(10), "userspace", expelled)
    assert member is not None
    with pytest.raises(Busy, match="1 client"):
        topo.remove_bus("a")  # no device open, still a user of the bus
    topo.remove_bus("a", force=True)
    assert expelled.seen == [(member.id, "bus 'a' was removed")]
    topo.create_bus("b")
    topo.add_member("b", "uid:2000")
    member = topo.join(tasks.spawn(11), "userspace", expelled)
    assert member is not None
    topo.leave(member)
    topo.remove_bus("b")


def test_a_domain_joins_and_is_expelled_when_its_rule_goes(
    topo: Topology, tasks: FakeTasks
) -> None:
    topo.create_bus("a")
    topo.create_bus("b")
    topo.create_device("x", "plain")
    topo.link("a", "x")
    topo.add_member("a", "domid:7")
    topo.add_member("a", "uid:2000")
    topo.add_member("b", "domid:8")
    assert topo.join(Domain(9), "xen", Expulsions()) is None
    assert topo.join(Domain(0), "xen", Expulsions()) is None
    expelled = Expulsions()
    domain = topo.join(Domain(7), "xen", expelled)
    process = topo.join(tasks.spawn(10), "userspace", expelled)
    neighbour = topo.join(Domain(8), "xen", expelled)
    assert domain is not None and process is not None and neighbour is not None
    assert (domain.bus.name, domain.client_id, process.client_id) == ("a", 1, 2)
    assert (neighbour.bus.name, neighbour.client_id) == ("b", 1)
    revoked = Revocations()
    conn = topo.open("a", "x", domain.peer, "xen", revoked, member=domain)

    topo.remove_member("a", "domid:7")
    assert expelled.seen == [(domain.id, "no longer a member of bus 'a'")]
    assert [(c, kind) for c, kind, _ in revoked.seen] == [(conn, BUS_GONE)]
    assert conn.closed and domain.gone
    assert topo.clients() == [process, neighbour]
    # Adding it back admits a new join; the expelled member stays gone.
    topo.add_member("a", "domid:7")
    again = topo.join(Domain(7), "xen", expelled)
    assert again is not None and again.client_id == 3 and domain.gone


def test_a_domid_moved_to_another_bus_expels_the_member(topo: Topology) -> None:
    topo.create_bus("a")
    topo.create_bus("b")
    topo.add_member("a", "domid:7")
    expelled = Expulsions()
    member = topo.admit(Domain(7), "xen", expelled)
    with pytest.raises(Busy):
        topo.add_member("b", "domid:7")
    assert expelled.seen == [] and not member.gone
    topo.remove_member("a", "domid:7")
    topo.add_member("b", "domid:7")
    assert member.gone and topo.resolve(Domain(7)) is topo.bus("b")


def test_a_vm_is_expelled_when_its_vmms_rule_goes(topo: Topology, tasks: FakeTasks) -> None:
    topo.create_bus("a")
    vmm = tasks.spawn(10, uid=2000)
    topo.add_member("a", "pid:10")
    expelled = Expulsions()
    vm = topo.join(Vm(vmm, "guest0"), "kvm", expelled)
    assert vm is not None and vm.bus.name == "a"
    topo.add_member("a", "domid:10")  # not the VM's kind of rule: nothing moves
    assert not vm.gone
    topo.remove_member("a", "pid:10")
    assert expelled.seen == [(vm.id, "no longer a member of bus 'a'")] and vm.gone


def test_admit_denies_without_a_hint(topo: Topology, tasks: FakeTasks) -> None:
    topo.create_bus("secret")
    topo.add_member("secret", "domid:8")
    for identity in (Domain(7), Domain(0), tasks.spawn(10), Vm(tasks.spawn(11), "g")):
        with pytest.raises(Denied) as info:
            topo.admit(identity, "test", Expulsions())
        assert info.value.message == NOT_A_MEMBER
        assert "secret" not in info.value.message
    assert topo.clients() == []


# --- Session defaults -------------------------------------------------------------------


class Keeper(DeviceModel):
    """Keeps every queue it is given and leaves polling and rearm to the defaults."""

    name = "keeper"
    description = "test device"

    def open(self, conn: Connection) -> Session:
        return KeeperSession(self, conn)


class KeeperSession(Session):
    def shm(self, index: int, queue: Queue) -> None:
        self.queues[index] = queue


def test_default_rearm_counts_only_north_to_south_work() -> None:
    with DeviceHarness(Keeper) as dev:
        tx = dev.queue(0, writable=False)
        rx = dev.queue(1, writable=True)
        rx.post_many([64] * 4)  # the north keeps receive buffers posted: room, not work
        dev.session.quiesce()
        assert dev.session.rearm() is False
        assert tx.notify_enabled and rx.notify_enabled  # both re-enabled all the same
        assert dev.poll() == 0  # asleep after one poll, not re-polled at every iteration
        assert dev.polls == 1
        tx.post(b"work")
        dev.session.quiesce()
        assert dev.session.rearm() is True
        assert tx.notify_enabled and rx.notify_enabled
