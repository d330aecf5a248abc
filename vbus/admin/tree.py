"""What the admin tree holds: its paths, node kinds and modes, file contents and writes.

Pure Python over a ``Topology``: no FUSE and no IO, so every rule of the tree
is a plain unit test.  ``vbus.admin.fs.AdminTree`` adapts it to pyfuse3.  A
path is a tuple of names from the tree's root::

    deviceclasses/<class>/{description,attributes}     read-only
    devices/<name>/{type,id,stats,<attribute>...}      mkdir/rmdir; echo to type and attributes
    buses/<bus>/{members,connections,force}            mkdir/rmdir; echo to members and force
                                                       (members: PID, pid:N, uid:N, uid:self,
                                                       domid:N; -RULE removes)
    buses/<bus>/<device> -> ../../devices/<device>     ln -s links, rm unlinks
    status                                             read-only, when the daemon gives one

Everything is computed from the topology when asked, so a change made inside
the daemon (a fault removing a device, a client connecting) shows at once.
The view keeps no state of its own except each bus's ``force`` flag, which
lives only as long as that bus object.
"""

from __future__ import annotations

import enum
import posixpath
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

from vbus.core.device import Attribute
from vbus.core.members import identity_fields, rule_syntax
from vbus.core.model import Bus, Connection, Device, Topology
from vbus.errors import Denied, Exists, Invalid, NotFound, NotPermitted

__all__ = [
    "BUS_FILES",
    "DEVICE_FILES",
    "Kind",
    "Node",
    "TreePath",
    "TreeView",
    "format_attribute",
    "format_connection",
    "link_target_device",
    "parse_member_lines",
    "split_path",
]

TreePath = tuple[str, ...]


class Kind(enum.Enum):
    DIR = "dir"
    FILE = "file"
    LINK = "link"


@dataclass(frozen=True, slots=True)
class Node:
    """One entry of the tree: its kind, permission bits, and a symlink's target."""

    kind: Kind
    mode: int
    target: str = ""

    @property
    def writable(self) -> bool:
        return self.kind is Kind.FILE and bool(self.mode & 0o200)


DIR: Final = Node(Kind.DIR, 0o755)
WRITABLE: Final = Node(Kind.FILE, 0o644)
READONLY: Final = Node(Kind.FILE, 0o444)

CLASS_FILES: Final = ("description", "attributes")
DEVICE_FILES: Final = ("type", "id", "stats")  # then the class's attributes
BUS_FILES: Final = ("members", "connections", "force")  # then the linked devices


def split_path(text: str) -> TreePath:
    """``"devices/eth0/mode"`` -> ``("devices", "eth0", "mode")``."""
    return tuple(part for part in text.split("/") if part)


def link_target_device(target: str, bus: str, mountpoints: Iterable[str] = ()) -> str:
    """The device a symlink created in ``buses/<bus>/`` points at, or ``Invalid``.

    The target must resolve to ``devices/<name>`` inside this tree: relative to
    the bus directory (``../../devices/eth0``), or absolute below one of
    ``mountpoints`` (``/run/vbus/admin/devices/eth0``).  Relative targets may not
    climb out of the tree on the way.
    """
    where: list[str]
    if target.startswith("/"):
        parts = split_path(posixpath.normpath(target))
        for mountpoint in mountpoints:
            prefix = split_path(posixpath.normpath(mountpoint))
            if parts[: len(prefix)] == prefix:
                where, rest = [], parts[len(prefix) :]
                break
        else:
            raise Invalid(f"link target {target!r} is not inside the admin tree")
    else:
        where, rest = ["buses", bus], split_path(target)
    for part in rest:
        if part == ".":
            continue
        if part == "..":
            if not where:
                raise Invalid(f"link target {target!r} leaves the admin tree")
            where.pop()
        else:
            where.append(part)
    if len(where) != 2 or where[0] != "devices":
        raise Invalid(f"link target {target!r} is not a device (expected ../../devices/NAME)")
    return where[1]


def parse_member_lines(text: str) -> list[tuple[bool, str]]:
    """``members`` writes: one rule per line, ``-RULE`` removes.  Returns
    ``[(add, rule_text)]``; the syntax of every line is checked before anything
    is applied, so a typo never half-applies a write."""
    changes: list[tuple[bool, str]] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            continue
        add = not line.startswith("-")
        rule = line if add else line[1:].strip()
        rule_syntax(rule)  # Invalid, naming the line
        changes.append((add, rule))
    if not changes:
        raise Invalid("no member rule given (PID, pid:N, uid:N, uid:self, domid:N; -RULE removes)")
    return changes


def format_attribute(attr: Attribute) -> str:
    """One line of a deviceclass's ``attributes`` file; ``doc=`` comes last."""
    default = "" if attr.default is None else attr.format(attr.default)
    words = [attr.name, f"kind={attr.kind}", f"default={default}"]
    if attr.choices:
        words.append(f"choices={','.join(attr.choices)}")
    if attr.minimum is not None:
        words.append(f"min={attr.minimum}")
    if attr.maximum is not None:
        words.append(f"max={attr.maximum}")
    if attr.kind == "str":
        words.append(f"max_length={attr.max_length}")
    if attr.readonly:
        words.append("readonly")
    words.append(f"doc={_one_line(attr.doc)}")
    return " ".join(words)


def format_connection(conn: Connection) -> str:
    """One line of a bus's ``connections`` file.  Who holds the device shows
    as its identity's fields: ``pid= uid= gid=`` for a process, ``vm=`` then
    its VMM's for a VM, ``domid=`` for a Xen domain."""
    info = conn.describe()
    since = datetime.fromtimestamp(info["since"], UTC).isoformat(timespec="milliseconds")
    who = " ".join(f"{key}={value}" for key, value in identity_fields(conn.peer).items())
    return (
        f"id={info['id']} {who} "
        f"device={info['device']} connector={info['connector']} since={since} "
        f"calls={info['calls']} faults={info['faults']}"
    )


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _lines(lines: Iterable[str]) -> str:
    return "".join(f"{line}\n" for line in lines)


def _strip_newline(text: str) -> str:
    return text[:-1] if text.endswith("\n") else text


class TreeView:
    """The tree over ``topology``.  Methods raise ``vbus.errors`` classes.

    ``generation`` counts the topology changes made through the view; the
    FUSE adapter persists the state when it moved (also after a write that
    failed half-way, e.g. a members write whose removals were applied).
    """

    def __init__(
        self,
        topology: Topology,
        *,
        status: Callable[[], dict[str, Any]] | None = None,
        mountpoints: Iterable[str] = (),
    ) -> None:
        self.topology = topology
        self.status = status
        self.mountpoints: tuple[str, ...] = tuple(mountpoints)
        self.generation = 0
        self._force: weakref.WeakKeyDictionary[Bus, bool] = weakref.WeakKeyDictionary()

    # --- shape ------------------------------------------------------------------
    def node(self, path: TreePath) -> Node:
        """The node at ``path``; ``NotFound`` if there is none."""
        depth = len(path)
        if depth == 0:
            return DIR
        top = path[0]
        if depth == 1:
            if top in ("deviceclasses", "devices", "buses"):
                return DIR
            if top == "status" and self.status is not None:
                return READONLY
        elif top == "deviceclasses":
            if path[1] in self.topology.registry:
                if depth == 2:
                    return DIR
                if depth == 3 and path[2] in CLASS_FILES:
                    return READONLY
        elif top == "devices":
            device = self._device(path[1])
            if device is not None:
                if depth == 2:
                    return DIR
                if depth == 3:
                    return self._device_file(device, path[2])
        elif top == "buses":
            bus = self._bus(path[1])
            if bus is not None:
                if depth == 2:
                    return DIR
                if depth == 3:
                    return self._bus_entry(bus, path[2])
        raise NotFound(f"no {'/'.join(path)}")

    def _device_file(self, device: Device, name: str) -> Node:
        if name == "type":
            return WRITABLE
        if name in ("id", "stats"):
            return READONLY
        for attr in device.attributes:
            if attr.name == name:
                return READONLY if attr.readonly else WRITABLE
        raise NotFound(f"device {device.name!r} has no file {name!r}")

    def _bus_entry(self, bus: Bus, name: str) -> Node:
        if name in ("members", "force"):
            return WRITABLE
        if name == "connections":
            return READONLY
        if name in bus.devices:
            return Node(Kind.LINK, 0o777, f"../../devices/{name}")
        raise NotFound(f"bus {bus.name!r} has no entry {name!r}")

    def children(self, path: TreePath) -> list[str]:
        """The names in directory ``path``, in listing order."""
        node = self.node(path)
        if node.kind is not Kind.DIR:
            raise Invalid(f"{'/'.join(path)} is not a directory")
        depth = len(path)
        if depth == 0:
            names = ["deviceclasses", "devices", "buses"]
            return [*names, "status"] if self.status is not None else names
        top = path[0]
        if depth == 1:
            if top == "deviceclasses":
                return self.topology.registry.names()
            if top == "devices":
                return [device.name for device in self.topology.devices()]
            return [bus.name for bus in self.topology.buses()]
        if top == "deviceclasses":
            return list(CLASS_FILES)
        if top == "devices":
            device = self.topology.device(path[1])
            return [*DEVICE_FILES, *(attr.name for attr in device.attributes)]
        bus = self.topology.bus(path[1])
        return [*BUS_FILES, *(name for name in sorted(bus.devices) if name not in BUS_FILES)]

    def subdirectories(self, path: TreePath) -> int:
        """How many directories ``path`` holds (for st_nlink)."""
        if len(path) == 0:
            return 3
        if len(path) == 1:
            return len(self.children(path))
        return 0

    # --- contents -----------------------------------------------------------------
    def read(self, path: TreePath) -> str:
        """The text of file ``path``: empty, or lines that each end with a newline."""
        node = self.node(path)
        if node.kind is not Kind.FILE:
            raise Invalid(f"{'/'.join(path)} is not a file")
        if path == ("status",):
            assert self.status is not None
            return _lines(f"{key} {_one_line(str(value))}" for key, value in self.status().items())
        top, name, leaf = path
        if top == "deviceclasses":
            cls = self.topology.registry.get(name)
            if leaf == "description":
                return _lines([_one_line(cls.description)])
            return _lines(format_attribute(attr) for attr in cls.attributes)
        if top == "devices":
            device = self.topology.device(name)
            if leaf == "type":
                return _lines([device.deviceclass or ""])
            if leaf == "id":
                return _lines([str(device.id)])
            if leaf == "stats":
                return self._stats(device)
            return _lines([self.topology.get_attribute(name, leaf)])
        bus = self.topology.bus(name)
        if leaf == "members":
            return _lines(self.topology.members(name))
        if leaf == "force":
            return _lines(["1" if self._force.get(bus, False) else "0"])
        return _lines(format_connection(conn) for conn in self.topology.connections(bus))

    def _stats(self, device: Device) -> str:
        counters = dict(device.model.stats()) if device.typed else {}
        counters.pop("connections", None)
        connections = sum(1 for conn in self.topology.connections() if conn.device is device)
        lines = [f"{key} {value}" for key, value in counters.items()]
        return _lines([*lines, f"connections {connections}"])

    def write(self, path: TreePath, text: str) -> None:
        """Apply what an administrator wrote to file ``path`` (the whole text)."""
        node = self.node(path)
        if not node.writable:
            raise Denied(f"{'/'.join(path)} is read-only")
        top, name, leaf = path
        value = _strip_newline(text)
        if top == "devices":
            if leaf == "type":
                self.topology.set_type(name, value.strip())
            else:
                self.topology.set_attribute(name, leaf, value)
            self.generation += 1
            return
        bus = self.topology.bus(name)
        if leaf == "force":
            flag = value.strip()
            if flag not in ("0", "1"):
                raise Invalid(f"force: {flag!r} is not 0 or 1")
            self._force[bus] = flag == "1"
            return
        self._write_members(name, value)

    def _write_members(self, bus: str, text: str) -> None:
        changes = parse_member_lines(text)
        with self.topology.transaction():  # adds are undone if a later line fails
            for add, rule in changes:
                if add:
                    self.topology.add_member(bus, rule)
                else:
                    self.topology.remove_member(bus, rule)
                self.generation += 1

    # --- directories and links ------------------------------------------------------
    def mkdir(self, path: TreePath) -> None:
        if len(path) == 2 and path[0] == "devices":
            self.topology.create_device(path[1])
        elif len(path) == 2 and path[0] == "buses":
            self.topology.create_bus(path[1])
        else:
            raise NotPermitted(f"cannot create a directory at {'/'.join(path)}")
        self.generation += 1

    def rmdir(self, path: TreePath) -> None:
        node = self.node(path)  # NotFound first
        if node.kind is Kind.DIR and len(path) == 2 and path[0] == "devices":
            self.topology.remove_device(path[1])
        elif node.kind is Kind.DIR and len(path) == 2 and path[0] == "buses":
            bus = self.topology.bus(path[1])
            self.topology.remove_bus(bus.name, force=self._force.get(bus, False))
        else:
            raise NotPermitted(f"cannot remove {'/'.join(path)}")
        self.generation += 1

    def symlink(self, path: TreePath, target: str) -> None:
        if len(path) == 3 and path[0] == "devices" and path[1] == path[2]:
            # `ln -s ../../devices/x buses/b/x` run twice: ln follows the existing
            # link into devices/x and asks for devices/x/x.  Say what happened.
            raise Exists(f"{path[1]} is already linked there (ln followed the existing link)")
        if len(path) != 3 or path[0] != "buses":
            raise NotPermitted(f"cannot create a link at {'/'.join(path)} (only in buses/BUS/)")
        _, bus, name = path
        self.topology.bus(bus)
        if name in BUS_FILES:
            raise Exists(f"buses/{bus}/{name} exists")
        device = link_target_device(target, bus, self.mountpoints)
        if device != name:
            raise Invalid(f"link name {name!r} must equal the device name {device!r}")
        self.topology.link(bus, device)
        self.generation += 1

    def unlink(self, path: TreePath) -> None:
        node = self.node(path)  # NotFound first
        if node.kind is not Kind.LINK:
            raise NotPermitted(f"cannot remove {'/'.join(path)}")
        self.topology.unlink(path[1], path[2])
        self.generation += 1

    # --- helpers ----------------------------------------------------------------------
    def _device(self, name: str) -> Device | None:
        try:
            return self.topology.device(name)
        except NotFound:
            return None

    def _bus(self, name: str) -> Bus | None:
        try:
            return self.topology.bus(name)
        except NotFound:
            return None
