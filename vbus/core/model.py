"""The topology: devices, buses, member rules and connections, in plain Python.

Every administrative change and every connection goes through ``Topology``'s
methods, which check everything and raise the matching ``vbus.errors`` class;
the config loader, the persisted state, the connectors and the FUSE admin tree
are thin adapters over them.  No IO happens here: process facts come from an
injected ``TaskInfo``, and deviceclasses from a ``Registry``.

Theory of operation for connections: a connector ``join``s its peer (an
identity: a process, a Xen domain, or a VM through its VMM process), which
resolves it to a bus and returns a ``Member`` (the peer is then a user of that
bus, device open or not), then ``open``s devices on that bus and gets
``Connection``s carrying the device model's ``Session``.  When the
administrator unlinks the device, removes the bus, or changes member rules so
that the peer no longer belongs to the bus, the topology calls the
connection's ``revoke`` callback (supplied by the connector) once and then
closes the connection itself; a member that lost its bus is also told through
its own ``revoke`` callback, and the connector disconnects it.

What a north sees of the topology reveals nothing of other buses: device ids
are the bus's own (``Bus.ids``, assigned at link time, persisted), and a
member's ``client_id`` counts the clients of its bus only.
"""

from __future__ import annotations

import itertools
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Literal

import structlog

from vbus.core.device import Attribute, DeviceModel, Session
from vbus.core.members import (
    DOMID_FIRST_RESERVED,
    NOT_A_MEMBER,
    DomidRule,
    Identity,
    MemberIndex,
    PidRule,
    Rule,
    TaskInfo,
    UidRule,
    identity_fields,
    parse_rule,
    rule_syntax,
)
from vbus.errors import Busy, Denied, Exists, Invalid, NoSuchTask, NotFound, VbusError

if TYPE_CHECKING:
    from vbus.core.registry import Registry

__all__ = [
    "BUS_GONE",
    "DEVICE_REMOVED",
    "SNAPSHOT_VERSION",
    "Bus",
    "Connection",
    "Device",
    "Member",
    "MemberRevoke",
    "RevokeCallback",
    "RevokeKind",
    "Topology",
    "validate_name",
]

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")

RevokeKind = Literal["device_removed", "bus_gone"]
DEVICE_REMOVED: Final = "device_removed"  # the device was unlinked from the bus
BUS_GONE: Final = "bus_gone"  # the bus was removed, or the peer is no longer its member

SNAPSHOT_VERSION = 1


def validate_name(name: str, what: str = "name") -> str:
    """Return ``name`` if it is a valid device or bus name, else raise ``Invalid``."""
    if not isinstance(name, str) or _NAME.fullmatch(name) is None:
        raise Invalid(f"bad {what} {name!r}: 1-64 of A-Z a-z 0-9 _ . : - (not first)")
    return name


class Device:
    """An instance of a deviceclass (or a typeless placeholder until ``set_type``)."""

    def __init__(self, id: int, name: str) -> None:
        self.id = id
        self.name = validate_name(name, "device name")
        self.deviceclass: str | None = None
        self._model: DeviceModel | None = None
        self.attrs: dict[str, Any] = {}
        self.buses: set[str] = set()

    def __repr__(self) -> str:
        return f"<Device {self.id} {self.name!r} class={self.deviceclass!r}>"

    @property
    def typed(self) -> bool:
        return self._model is not None

    @property
    def model(self) -> DeviceModel:
        """The device model; ``Invalid`` for a device that has no type yet."""
        if self._model is None:
            raise Invalid(f"device {self.name!r} has no type")
        return self._model

    @property
    def attributes(self) -> tuple[Attribute, ...]:
        """The attributes of the device's class (none while typeless)."""
        return self._model.attributes if self._model is not None else ()

    def attribute(self, name: str) -> Attribute:
        for attr in self.attributes:
            if attr.name == name:
                return attr
        raise NotFound(f"device {self.name!r} has no attribute {name!r}")

    def get_attribute(self, name: str) -> str:
        attr = self.attribute(name)
        return attr.format(self.attrs[name])

    def set_attribute(self, name: str, text: str | int | bool) -> None:
        """Validate, store, then tell the model; if the model refuses (raises),
        the old value is put back and the error propagates."""
        attr = self.attribute(name)
        if attr.readonly:
            raise Denied(f"attribute {name!r} of device {self.name!r} is read-only")
        value = attr.parse(text)
        self._store(name, value)

    def _store(self, name: str, value: Any) -> None:
        old = self.attrs[name]
        self.attrs[name] = value
        try:
            self.model.attribute_changed(name, value)
        except BaseException:
            self.attrs[name] = old
            raise

    def _instantiate(self, cls: type[DeviceModel]) -> None:
        self.attrs = {attr.name: attr.default for attr in cls.attributes}
        self.deviceclass = cls.name
        try:
            self._model = cls(self)
        except BaseException:
            self.attrs = {}
            self.deviceclass = None
            raise

    def _untype(self) -> DeviceModel | None:
        model, self._model = self._model, None
        self.deviceclass = None
        self.attrs = {}
        return model

    def non_default_attrs(self) -> dict[str, str]:
        """Writable attributes whose value differs from the default, formatted."""
        out: dict[str, str] = {}
        for attr in self.attributes:
            text = attr.format(self.attrs[attr.name])
            if not attr.readonly and text != attr.format(attr.default):
                out[attr.name] = text
        return out


class Bus:
    """A container of linked devices, admitting the north contexts its rules match."""

    def __init__(self, name: str) -> None:
        self.name = validate_name(name, "bus name")
        self.devices: dict[str, Device] = {}
        self.ids: dict[str, int] = {}  # device name -> the id this bus's clients see
        self.by_id: dict[int, Device] = {}
        self.next_id = 1  # never reused while the bus exists: an old id cannot alias
        self.rules: set[Rule] = set()
        self.connections: dict[int, Connection] = {}
        self.members: dict[int, Member] = {}  # connected north contexts
        self.clients_seen = 0

    def __repr__(self) -> str:
        return f"<Bus {self.name!r} devices={sorted(self.devices)}>"

    def id_of(self, device: Device) -> int:
        """The id ``device`` has on this bus."""
        return self.ids[device.name]


MemberRevoke = Callable[["Member", str], None]


@dataclass(eq=False)
class Member:
    """A north context admitted to a bus (connected), with a device open or not.

    ``client_id`` is what the north is told: it counts this bus's clients only.
    ``peer`` is its identity (a ``Peer`` process, a ``Domain``, a ``Vm``).
    ``revoke`` is the connector's callback, called at most once when the
    member loses its bus (rule removed, bus removed); the connector tells the
    north and disconnects it.
    """

    id: int
    client_id: int
    bus: Bus
    peer: Identity
    connector: str
    revoke: MemberRevoke
    since: float = field(default_factory=time.time)
    gone: bool = False


RevokeCallback = Callable[["Connection", RevokeKind, str], None]


@dataclass(eq=False)
class Connection:
    """One north context's open handle on one device (identity-hashed).

    ``calls`` and ``faults`` are counted by the connector.  ``revoke`` is the
    connector's callback: the topology calls it at most once, with the kind
    and a human-readable reason, just before it closes the connection itself.
    """

    id: int
    bus: Bus
    device: Device
    peer: Identity
    connector: str
    revoke: RevokeCallback
    since: float = field(default_factory=time.time)
    session: Session | None = None
    member: Member | None = None
    calls: int = 0
    faults: int = 0
    closed: bool = False
    close_reason: str | None = None

    def __repr__(self) -> str:
        who = " ".join(f"{key}={value}" for key, value in identity_fields(self.peer).items())
        return (
            f"<Connection {self.id} {self.connector} {who} "
            f"{self.bus.name}/{self.device.name}{' closed' if self.closed else ''}>"
        )

    def describe(self) -> dict[str, Any]:
        """A JSON-serialisable line for listings (admin ``connections`` file).
        The peer shows as ``identity_fields``: ``pid``/``uid``/``gid`` for a
        process, ``vm`` and its VMM's for a VM, ``domid`` for a domain."""
        return {
            "id": self.id,
            "bus": self.bus.name,
            "device": self.device.name,
            "device_id": self.bus.ids.get(self.device.name, 0),
            "connector": self.connector,
            **identity_fields(self.peer),
            "since": self.since,
            "calls": self.calls,
            "faults": self.faults,
        }


class Topology:
    """The whole model.  Not thread-safe: the daemon calls it from its loop only."""

    def __init__(
        self,
        registry: Registry,
        tasks: TaskInfo,
        self_uid: int,
        *,
        boot_id: str | None = None,
        log: Any = None,
    ) -> None:
        self.registry = registry
        self.tasks = tasks
        self.self_uid = self_uid
        # Start times count from boot: a snapshot's pid rules only mean
        # something on the boot that wrote them.
        self.boot_id = boot_id
        self._log = log if log is not None else structlog.get_logger("vbus.core")
        self._devices: dict[str, Device] = {}
        self._devices_by_id: dict[int, Device] = {}
        self._buses: dict[str, Bus] = {}
        self._members = MemberIndex()
        self._connections: dict[int, Connection] = {}
        self._members_joined: dict[int, Member] = {}
        self._next_device_id = 1
        self._connection_ids = itertools.count(1)
        self._member_ids = itertools.count(1)
        self._undo: list[Callable[[], None]] | None = None
        # Called after a link, an unlink or a bus removal: connectors that
        # serve devices by their links (vhost-user) follow the topology.
        self.link_watchers: list[Callable[[], None]] = []

    # --- transactions -------------------------------------------------------
    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Undo every creation step made inside the block if it raises.

        Used by ``apply`` and the config loader so that a bad file leaves the
        topology as it was.  Undone: create_device, set_type, set_attribute,
        create_bus, link, add_member.  Removals inside a transaction are not
        undone.  Nested transactions join the outermost one.
        """
        if self._undo is not None:
            yield
            return
        self._undo = []
        try:
            yield
        except BaseException:
            undo, self._undo = self._undo, None
            for step in reversed(undo):
                try:
                    step()
                except Exception as exc:
                    self._log.error("topology.undo_failed", error=repr(exc))
            raise
        self._undo = None

    def _on_undo(self, step: Callable[[], None]) -> None:
        if self._undo is not None:
            self._undo.append(step)

    # --- devices --------------------------------------------------------------
    def device(self, name: str) -> Device:
        device = self._devices.get(name) if isinstance(name, str) else None
        if device is None:
            raise NotFound(f"no device {name!r}")
        return device

    def devices(self) -> list[Device]:
        """Every device, sorted by name."""
        return [self._devices[name] for name in sorted(self._devices)]

    def create_device(
        self,
        name: str,
        deviceclass: str | None = None,
        attrs: dict[str, str | int | bool] | None = None,
        *,
        id: int | None = None,
    ) -> Device:
        """Create a device, typeless or (with ``deviceclass``) instantiated and
        configured with ``attrs``; all or nothing.  ``id`` (restoring a
        snapshot) keeps the device's recorded id; new ids are never reused."""
        validate_name(name, "device name")
        if name in self._devices:
            raise Exists(f"device {name!r} exists")
        if id is not None and (id < 1 or id in self._devices_by_id):
            raise Invalid(f"device {name!r}: id {id} is taken or out of range")
        if attrs and deviceclass is None:
            raise Invalid(f"device {name!r}: attributes need a deviceclass")
        if deviceclass is not None:
            self.registry.get(deviceclass)  # unknown class: Invalid before anything exists
        with self.transaction():
            if id is None:
                id = self._next_device_id
            self._next_device_id = max(self._next_device_id, id + 1)
            device = Device(id, name)
            self._devices[name] = device
            self._devices_by_id[device.id] = device
            self._on_undo(lambda: self.remove_device(name))
            if deviceclass is not None:
                self.set_type(name, deviceclass)
                for attr_name, text in (attrs or {}).items():
                    self.set_attribute(name, attr_name, text)
        self._log.info("device.created", device=name, id=device.id, deviceclass=deviceclass)
        return device

    def set_type(self, name: str, deviceclass: str) -> None:
        """Instantiate a typeless device as ``deviceclass``."""
        device = self.device(name)
        if device.typed:
            raise Busy(f"device {name!r} already has type {device.deviceclass!r}")
        device._instantiate(self.registry.get(deviceclass))
        self._on_undo(lambda: self._destroy_model(device))
        self._log.info("device.typed", device=name, deviceclass=deviceclass)

    def remove_device(self, name: str) -> None:
        device = self.device(name)
        if device.buses:
            raise Busy(f"device {name!r} is linked to {', '.join(sorted(device.buses))}")
        del self._devices[name]
        del self._devices_by_id[device.id]
        self._destroy_model(device)
        self._log.info("device.removed", device=name, id=device.id)

    def _destroy_model(self, device: Device) -> None:
        model = device._untype()
        if model is None:
            return
        try:
            model.destroy()
        except Exception as exc:  # the device is gone either way
            self._log.error("device.destroy_failed", device=device.name, error=repr(exc))

    def set_attribute(self, device: str, name: str, text: str | int | bool) -> None:
        dev = self.device(device)
        old = dev.attrs.get(name)
        dev.set_attribute(name, text)
        self._on_undo(lambda: dev._store(name, old))
        self._log.info("device.attribute_set", device=device, attribute=name)

    def get_attribute(self, device: str, name: str) -> str:
        return self.device(device).get_attribute(name)

    # --- buses ------------------------------------------------------------------
    def bus(self, name: str) -> Bus:
        bus = self._buses.get(name) if isinstance(name, str) else None
        if bus is None:
            raise NotFound(f"no bus {name!r}")
        return bus

    def buses(self) -> list[Bus]:
        """Every bus, sorted by name."""
        return [self._buses[name] for name in sorted(self._buses)]

    def _bus(self, bus: Bus | str) -> Bus:
        """A live bus by name or object (a removed Bus object is NotFound)."""
        name = bus.name if isinstance(bus, Bus) else bus
        found = self.bus(name)
        if isinstance(bus, Bus) and found is not bus:
            raise NotFound(f"no bus {name!r}")
        return found

    def create_bus(self, name: str) -> Bus:
        validate_name(name, "bus name")
        if name in self._buses:
            raise Exists(f"bus {name!r} exists")
        bus = Bus(name)
        self._buses[name] = bus
        self._on_undo(lambda: self.remove_bus(name, force=True))
        self._log.info("bus.created", bus=name)
        return bus

    def remove_bus(self, name: str, force: bool = False) -> None:
        """Remove a bus: its devices are unlinked and its rules dropped.  Live
        connections make it ``Busy`` unless ``force``, which revokes them."""
        bus = self.bus(name)
        if (bus.connections or bus.members) and not force:
            raise Busy(
                f"bus {name!r} has {len(bus.members) or len(bus.connections)} client(s) connected"
            )
        for conn in sorted(bus.connections.values(), key=lambda c: c.id):
            self._revoke(conn, BUS_GONE, f"bus {name!r} was removed")
        for member in sorted(bus.members.values(), key=lambda m: m.id):
            self._expel(member, f"bus {name!r} was removed")
        for device in bus.devices.values():
            device.buses.discard(name)
        for rule in bus.rules:
            self._members.discard(rule)
        del self._buses[name]
        self._log.info("bus.removed", bus=name, forced=force)
        self._links_changed()

    def link(self, bus: str, device: str, *, id: int | None = None) -> int:
        """Link ``device`` to ``bus``; returns the id it has there (``id`` when
        restoring a snapshot, else the bus's next one)."""
        b = self.bus(bus)
        dev = self.device(device)
        if not dev.typed:
            raise Invalid(f"device {device!r} has no type and cannot be linked")
        if dev.name in b.devices:
            raise Exists(f"device {device!r} is already linked to bus {bus!r}")
        if id is None:
            id = b.next_id
        elif id < 1 or id in b.by_id:
            raise Invalid(f"bus {bus!r}: device id {id} is taken or out of range")
        b.next_id = max(b.next_id, id + 1)
        b.devices[dev.name] = dev
        b.ids[dev.name] = id
        b.by_id[id] = dev
        dev.buses.add(b.name)
        self._on_undo(lambda: self.unlink(bus, device))
        self._log.info("bus.linked", bus=bus, device=device, id=id)
        self._links_changed()
        return id

    def unlink(self, bus: str, device: str) -> None:
        """Unlink a device; its connections on this bus are revoked."""
        b = self.bus(bus)
        dev = b.devices.get(device) if isinstance(device, str) else None
        if dev is None:
            raise NotFound(f"device {device!r} is not linked to bus {bus!r}")
        for conn in sorted(b.connections.values(), key=lambda c: c.id):
            if conn.device is dev:
                self._revoke(conn, DEVICE_REMOVED, f"device {device!r} was unlinked")
        del b.devices[device]
        del b.by_id[b.ids.pop(device)]
        dev.buses.discard(b.name)
        self._log.info("bus.unlinked", bus=bus, device=device)
        self._links_changed()

    def _links_changed(self) -> None:
        for watcher in list(self.link_watchers):
            watcher()

    def devices_on(self, bus: Bus | str) -> list[Device]:
        """The devices linked to ``bus``, sorted by their id on it."""
        b = self._bus(bus)
        return [b.by_id[key] for key in sorted(b.by_id)]

    def find_device(self, bus: Bus | str, ref: str | int) -> Device:
        """A device on ``bus`` by name (str) or by its id on that bus (int).  A
        device that does not exist and one that exists only elsewhere raise
        the same NotFound."""
        b = self._bus(bus)
        device: Device | None = None
        if isinstance(ref, str):
            device = b.devices.get(ref)
        elif isinstance(ref, int) and not isinstance(ref, bool):
            device = b.by_id.get(ref)
        if device is None:
            raise NotFound("no such device")
        return device

    # --- members -----------------------------------------------------------------
    def _rule(self, rule: Rule | str) -> Rule:
        if isinstance(rule, UidRule | PidRule | DomidRule):
            return rule
        return parse_rule(rule, self.tasks, self.self_uid)

    def add_member(self, bus: str, rule: Rule | str) -> Rule:
        """Admit a uid, a task (and its descendants) or a Xen domain to ``bus``;
        returns the rule.

        Busy when the uid or the domid is on another bus, or when the task
        already reaches another bus through a pid rule (its own or an
        ancestor's).  Adding a
        rule can move connected peers: those no longer resolving to their bus
        are revoked with ``bus_gone``.
        """
        return self._add_member(bus, rule, check_ancestors=True)

    def _add_member(self, bus: str, rule: Rule | str, *, check_ancestors: bool) -> Rule:
        b = self.bus(bus)
        parsed = self._rule(rule)
        if parsed in b.rules:
            raise Exists(f"{parsed} is already a member of bus {bus!r}")
        if isinstance(parsed, UidRule | DomidRule):
            holder = self._members.bus_of(parsed)
            if holder is not None:
                raise Busy(f"{parsed} is already a member of bus {holder!r}")
        else:
            if self.tasks.starttime(parsed.pid) != parsed.starttime:
                raise NoSuchTask(f"no such task {parsed.pid}")
            holder = self._members.resolve_task(
                parsed.pid, parsed.starttime, self.tasks, walk=check_ancestors
            )
            if holder is not None and holder != bus:
                raise Busy(f"task {parsed.pid} already belongs to bus {holder!r}")
            self._drop_stale_pid_rules(parsed.pid, keep=parsed.starttime)
        b.rules.add(parsed)
        self._members.add(parsed, bus)
        self._on_undo(lambda: self.remove_member(bus, parsed))
        self._log.info("member.added", bus=bus, rule=str(parsed))
        self._recheck_connections()
        return parsed

    def _drop_stale_pid_rules(self, pid: int, keep: int) -> None:
        """Rules for an earlier task with this pid can never match again."""
        for starttime, holder in self._members.pid_rules(pid).items():
            if starttime != keep:
                stale = PidRule(pid, starttime)
                self._buses[holder].rules.discard(stale)
                self._members.discard(stale)
                self._log.info("member.stale_dropped", bus=holder, rule=str(stale))

    def remove_member(self, bus: str, rule: Rule | str) -> None:
        """Remove a rule.  A text ``pid:N`` (or ``N``) removes the bus's rule for
        pid N whether or not that task still exists."""
        b = self.bus(bus)
        if isinstance(rule, str):
            kind, value = rule_syntax(rule)
            if kind == "uid":
                matches: list[Rule] = [UidRule(self.self_uid if value is None else value)]
            elif kind == "domid":
                assert value is not None
                matches = [DomidRule(value)]
            else:
                matches = [r for r in b.rules if isinstance(r, PidRule) and r.pid == value]
        else:
            matches = [rule]
        found = [r for r in matches if r in b.rules]
        if not found:
            raise NotFound(f"{rule} is not a member of bus {bus!r}")
        for r in found:
            b.rules.discard(r)
            self._members.discard(r)
            self._log.info("member.removed", bus=bus, rule=str(r))
        self._recheck_connections()

    def members(self, bus: str) -> list[str]:
        """The text forms of the bus's rules, sorted."""
        return sorted(str(rule) for rule in self.bus(bus).rules)

    def prune_members(self) -> int:
        """Drop pid rules whose task is gone (or whose pid was reused); returns how many."""
        dropped = 0
        for bus in self._buses.values():
            for rule in sorted(
                (r for r in bus.rules if isinstance(r, PidRule)), key=lambda r: r.pid
            ):
                if self.tasks.starttime(rule.pid) != rule.starttime:
                    bus.rules.discard(rule)
                    self._members.discard(rule)
                    dropped += 1
                    self._log.info("member.stale_dropped", bus=bus.name, rule=str(rule))
        return dropped

    def resolve(self, identity: Identity) -> Bus | None:
        """The bus ``identity`` belongs to, else None: a domain by its domid
        rule; a process, or a VM through its VMM, by the nearest pid rule,
        then the uid."""
        name = self._members.resolve(identity, self.tasks)
        return None if name is None else self._buses[name]

    def _recheck_connections(self) -> None:
        """After a rule change: every connected peer is resolved again, and
        one that no longer belongs to its bus loses it (told, then let go)."""
        for member in sorted(self._members_joined.values(), key=lambda m: m.id):
            if self._members.resolve(member.peer, self.tasks) != member.bus.name:
                self._expel(member, f"no longer a member of bus {member.bus.name!r}")
        for conn in sorted(self._connections.values(), key=lambda c: c.id):
            if self._members.resolve(conn.peer, self.tasks) != conn.bus.name:
                reason = f"no longer a member of bus {conn.bus.name!r}"
                self._revoke(conn, BUS_GONE, reason)

    # --- members: connected north contexts -----------------------------------
    def join(self, peer: Identity, connector: str, revoke: MemberRevoke) -> Member | None:
        """Admit a connected ``peer`` (any identity) to the bus its rules
        resolve to; None if no rule admits it.  It stays a user of that bus
        until ``leave``."""
        bus = self.resolve(peer)
        if bus is None:
            return None
        bus.clients_seen += 1
        member = Member(
            id=next(self._member_ids),
            client_id=bus.clients_seen,
            bus=bus,
            peer=peer,
            connector=connector,
            revoke=revoke,
        )
        bus.members[member.id] = member
        self._members_joined[member.id] = member
        return member

    def admit(self, peer: Identity, connector: str, revoke: MemberRevoke) -> Member:
        """``join``, or ``Denied`` with the one text every connector gives
        (``NOT_A_MEMBER``): nothing in it depends on what exists elsewhere."""
        member = self.join(peer, connector, revoke)
        if member is None:
            raise Denied(NOT_A_MEMBER)
        return member

    def leave(self, member: Member) -> None:
        """The peer disconnected (its connections are closed by the connector)."""
        member.gone = True
        self._members_joined.pop(member.id, None)
        member.bus.members.pop(member.id, None)

    def _expel(self, member: Member, reason: str) -> None:
        if member.gone:
            return
        for conn in sorted(member.bus.connections.values(), key=lambda c: c.id):
            if conn.member is member:
                self._revoke(conn, BUS_GONE, reason)
        self.leave(member)
        self._log.info("member.expelled", member=member.id, bus=member.bus.name, reason=reason)
        try:
            member.revoke(member, reason)
        except Exception as exc:  # a connector bug must not half-apply an admin change
            self._log.error("member.revoke_failed", member=member.id, error=repr(exc))

    def clients(self, bus: Bus | str | None = None) -> list[Member]:
        """Connected members (of one bus, or all), sorted by id."""
        pool = self._members_joined if bus is None else self._bus(bus).members
        return [pool[key] for key in sorted(pool)]

    # --- connections -----------------------------------------------------------
    def open(
        self,
        bus: Bus | str,
        device: str | int,
        peer: Identity,
        connector: str,
        revoke: RevokeCallback,
        *,
        since: float | None = None,
        member: Member | None = None,
    ) -> Connection:
        """Open ``device`` (name or id) on ``bus`` for ``peer``.

        The caller has already resolved ``peer`` to ``bus``.  The device
        model's ``open`` supplies the session; if it raises, the error
        propagates and nothing stays registered.
        """
        b = self._bus(bus)
        dev = self.find_device(b, device)
        conn = Connection(
            id=next(self._connection_ids),
            bus=b,
            device=dev,
            peer=peer,
            connector=connector,
            revoke=revoke,
            since=time.time() if since is None else since,
            member=member,
        )
        conn.session = dev.model.open(conn)
        b.connections[conn.id] = conn
        self._connections[conn.id] = conn
        self._log.info(
            "connection.opened",
            conn=conn.id,
            bus=b.name,
            device=dev.name,
            connector=connector,
            **identity_fields(peer),
        )
        return conn

    def close(self, conn: Connection, reason: str | None = None) -> None:
        """Close a connection: unregister it, then close its session.  Idempotent."""
        if conn.closed:
            return
        conn.closed = True
        conn.close_reason = reason
        self._connections.pop(conn.id, None)
        conn.bus.connections.pop(conn.id, None)
        if conn.session is not None:
            try:
                conn.session.close()
            except Exception as exc:
                self._log.error("connection.session_close_failed", conn=conn.id, error=repr(exc))
        self._log.info("connection.closed", conn=conn.id, reason=reason)

    def _revoke(self, conn: Connection, kind: RevokeKind, reason: str) -> None:
        if conn.closed:
            return
        self._log.info("connection.revoked", conn=conn.id, kind=kind, reason=reason)
        try:
            conn.revoke(conn, kind, reason)
        except Exception as exc:  # a connector bug must not half-apply an admin change
            self._log.error("connection.revoke_failed", conn=conn.id, error=repr(exc))
        self.close(conn, kind)

    def connection(self, id: int) -> Connection:
        conn = self._connections.get(id)
        if conn is None:
            raise NotFound(f"no connection {id}")
        return conn

    def connections(self, bus: Bus | str | None = None) -> list[Connection]:
        """Open connections (of one bus, or all), sorted by id."""
        pool = self._connections if bus is None else self._bus(bus).connections
        return [pool[key] for key in sorted(pool)]

    # --- persistence --------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        """The persisted configuration as JSON-serialisable data (no connections)."""
        devices: dict[str, Any] = {}
        for device in self.devices():
            devices[device.name] = {
                "id": device.id,
                "class": device.deviceclass,
                "attrs": dict(sorted(device.non_default_attrs().items())),
            }
        buses: dict[str, Any] = {}
        for bus in self.buses():
            pid_rules = sorted(
                (r for r in bus.rules if isinstance(r, PidRule)),
                key=lambda r: (r.pid, r.starttime),
            )
            buses[bus.name] = {
                "devices": sorted(bus.devices),
                "ids": dict(sorted(bus.ids.items())),
                "next_id": bus.next_id,
                "uids": sorted(r.uid for r in bus.rules if isinstance(r, UidRule)),
                "pids": [{"pid": r.pid, "starttime": r.starttime} for r in pid_rules],
                "domids": sorted(r.domid for r in bus.rules if isinstance(r, DomidRule)),
            }
        return {
            "version": SNAPSHOT_VERSION,
            "boot_id": self.boot_id,
            "devices": devices,
            "buses": buses,
        }

    def apply(self, snapshot: dict[str, Any]) -> None:
        """Rebuild what ``snapshot`` describes, all or nothing.

        Pid rules come back only for tasks that still run with the recorded
        start time, on the same boot; the others are dropped with a log event.
        """
        plan = _check_snapshot(snapshot)
        recorded = snapshot.get("boot_id")
        same_boot = recorded is None or self.boot_id is None or recorded == self.boot_id
        with self.transaction():
            for name, spec in plan["devices"].items():
                self.create_device(name, spec["class"], spec["attrs"], id=spec["id"])
            for name, spec in plan["buses"].items():
                bus = self.create_bus(name)
                ids = spec["ids"]
                # Recorded ids first, so that a device without one cannot take them.
                for device in sorted(spec["devices"], key=lambda d: (d not in ids, ids.get(d, 0))):
                    self.link(name, device, id=ids.get(device))
                bus.next_id = max(bus.next_id, spec["next_id"])
                for uid in spec["uids"]:
                    self._add_member(name, UidRule(uid), check_ancestors=True)
                for domid in spec["domids"]:
                    self._add_member(name, DomidRule(domid), check_ancestors=True)
            # Pid rules after every bus exists, without the ancestor check: a
            # consistent snapshot may nest a task's rule under an ancestor's.
            for name, spec in plan["buses"].items():
                for pid, starttime in spec["pids"]:
                    if not same_boot or self.tasks.starttime(pid) != starttime:
                        self._log.info("member.not_restored", bus=name, rule=f"pid:{pid}")
                        continue
                    self._add_member(name, PidRule(pid, starttime), check_ancestors=False)


def _check_snapshot(snapshot: Any) -> dict[str, Any]:
    """Validate a snapshot's shape; returns it normalised (``Invalid`` names the key)."""

    def fail(where: str, why: str) -> VbusError:
        return Invalid(f"snapshot: {where}: {why}")

    if not isinstance(snapshot, dict):
        raise fail("top level", "not an object")
    if snapshot.get("version") != SNAPSHOT_VERSION:
        raise fail("version", f"unsupported {snapshot.get('version')!r}")
    if snapshot.get("boot_id") is not None and not isinstance(snapshot["boot_id"], str):
        raise fail("boot_id", "not a string")
    devices_in = snapshot.get("devices", {})
    buses_in = snapshot.get("buses", {})
    if not isinstance(devices_in, dict):
        raise fail("devices", "not an object")
    if not isinstance(buses_in, dict):
        raise fail("buses", "not an object")
    devices: dict[str, Any] = {}
    for name, spec in devices_in.items():
        where = f"devices.{name}"
        if not isinstance(spec, dict):
            raise fail(where, "not an object")
        cls = spec.get("class")
        attrs = spec.get("attrs", {})
        if cls is not None and not isinstance(cls, str):
            raise fail(f"{where}.class", "not a string")
        device_id = spec.get("id")
        if device_id is not None and not (_is_count(device_id) and device_id >= 1):
            raise fail(f"{where}.id", "not a positive integer")
        if not isinstance(attrs, dict) or not all(
            isinstance(k, str) and isinstance(v, str | int | bool) for k, v in attrs.items()
        ):
            raise fail(f"{where}.attrs", "not an object of text values")
        devices[name] = {"class": cls, "attrs": attrs, "id": device_id}
    buses: dict[str, Any] = {}
    for name, spec in buses_in.items():
        where = f"buses.{name}"
        if not isinstance(spec, dict):
            raise fail(where, "not an object")
        linked = spec.get("devices", [])
        uids = spec.get("uids", [])
        pids = spec.get("pids", [])
        domids = spec.get("domids", [])  # absent from snapshots older than domain members
        ids = spec.get("ids", {})
        next_id = spec.get("next_id", 1)
        if not isinstance(ids, dict) or not all(
            isinstance(k, str) and _is_count(v) and v >= 1 for k, v in ids.items()
        ):
            raise fail(f"{where}.ids", "not an object of positive device ids")
        if len(set(ids.values())) != len(ids):
            raise fail(f"{where}.ids", "an id is given twice")
        if not _is_count(next_id):
            raise fail(f"{where}.next_id", "not a count")
        if not isinstance(linked, list) or not all(isinstance(d, str) for d in linked):
            raise fail(f"{where}.devices", "not a list of names")
        if not isinstance(uids, list) or not all(_is_count(u) for u in uids):
            raise fail(f"{where}.uids", "not a list of uids")
        if not isinstance(pids, list) or not all(
            isinstance(p, dict) and _is_count(p.get("pid")) and _is_count(p.get("starttime"))
            for p in pids
        ):
            raise fail(f"{where}.pids", "not a list of {pid, starttime}")
        if not isinstance(domids, list) or not all(
            _is_count(d) and 0 < d < DOMID_FIRST_RESERVED for d in domids
        ):
            raise fail(f"{where}.domids", f"not a list of domids (1..{DOMID_FIRST_RESERVED - 1})")
        buses[name] = {
            "devices": linked,
            "ids": {k: v for k, v in ids.items() if k in linked},
            "next_id": next_id,
            "uids": uids,
            "pids": [(p["pid"], p["starttime"]) for p in pids],
            "domids": domids,
        }
    return {"devices": devices, "buses": buses}


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
