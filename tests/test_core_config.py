"""The TOML topology file: schema checks with clear messages, applying, the default."""

from __future__ import annotations

import re
import tomllib
from typing import Any

import pytest

from vbus.core.config import apply_config, check_config, default_config_text, load_config_text
from vbus.core.device import Attribute, DeviceModel, Session
from vbus.core.members import Domain, Peer
from vbus.core.model import Connection, Topology
from vbus.core.registry import Registry
from vbus.errors import Busy, Denied, Exists, Invalid, NoSuchTask, NotFound, VbusError

SELF_UID = 1000
SOURCE = "/etc/vbus/topology.toml"


class FakeTasks:
    def __init__(self) -> None:
        self.procs: dict[int, tuple[int, int, int]] = {1: (0, 1, 0), 10: (1, 50, 2000)}

    def starttime(self, pid: int) -> int | None:
        proc = self.procs.get(pid)
        return None if proc is None else proc[1]

    def parent(self, pid: int) -> int | None:
        proc = self.procs.get(pid)
        return None if proc is None or proc[0] <= 0 else proc[0]

    def uid(self, pid: int) -> int | None:
        proc = self.procs.get(pid)
        return None if proc is None else proc[2]


class StandInEcho(DeviceModel):
    """Stands in for vbus.devices.echo.Echo: same name and attribute."""

    name = "echo"
    description = "test stand-in"
    attributes = (Attribute("mode", "choice", "echo", choices=("echo", "sink")),)

    def open(self, conn: Connection) -> Session:
        return Session(self, conn)


class Knobs(DeviceModel):
    name = "knobs"
    description = "attributes of every kind"
    attributes = (
        Attribute("size", "int", 4, minimum=1, maximum=64),
        Attribute("flag", "bool", False),
        Attribute("label", "str", ""),
        Attribute("serial", "str", "s", readonly=True),
    )

    def open(self, conn: Connection) -> Session:
        return Session(self, conn)


@pytest.fixture
def topo() -> Topology:
    registry = Registry()
    registry.register(StandInEcho)
    registry.register(Knobs)
    return Topology(registry, FakeTasks(), SELF_UID)


GOOD = """
[devices.echo0]
class = "echo"
mode = "sink"

[devices.k]
class = "knobs"
size = 16
flag = true
label = "hello"

[buses.default]
members = ["uid:self", "pid:10"]
devices = ["echo0", "k"]

[buses.spare]
"""


def test_load_good_config() -> None:
    cfg = load_config_text(GOOD, SOURCE)
    lines = cfg.pop("lines")
    assert lines[("devices", "k", "label")] == 10
    assert lines[("buses", "default")] == 12
    assert lines[("buses", "spare")] == 16
    assert cfg == {
        "source": SOURCE,
        "devices": {
            "echo0": {"class": "echo", "attrs": {"mode": "sink"}},
            "k": {"class": "knobs", "attrs": {"size": 16, "flag": True, "label": "hello"}},
        },
        "buses": {
            "default": {"members": ["uid:self", "pid:10"], "devices": ["echo0", "k"]},
            "spare": {"members": [], "devices": []},
        },
    }


def test_load_empty_config() -> None:
    assert load_config_text("", "empty") == {
        "source": "empty",
        "devices": {},
        "buses": {},
        "lines": {},
    }


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("[devices.x\nclass=1", ""),
        ("bus = 1", "bus"),
        ("[device.x]\nclass = 'echo'", "device"),
        ("devices = 5", "devices"),
        ("devices = [1]", "devices"),
        ("[devices.'-bad']\nclass = 'echo'", "devices.-bad"),
        ("[devices.'a b']\nclass = 'echo'", "devices.a b"),
        ("[devices]\nx = 'echo'", "devices.x"),
        ("[devices.x]\nmode = 'echo'", "devices.x"),
        ("[devices.x]\nclass = 5", "devices.x.class"),
        ("[devices.x]\nclass = 'echo'\nratio = 1.5", "devices.x.ratio"),
        ("[devices.x]\nclass = 'echo'\nmode = ['echo']", "devices.x.mode"),
        ("[devices.x]\nclass = 'echo'\n[devices.x.sub]\na = 1", "devices.x.sub"),
        ("buses = 'default'", "buses"),
        ("[buses.'']", "buses."),
        ("[buses]\ndefault = 1", "buses.default"),
        ("[buses.default]\nmember = ['uid:self']", "buses.default.member"),
        ("[buses.default]\nmembers = 'uid:self'", "buses.default.members"),
        ("[buses.default]\nmembers = [1000]", "buses.default.members"),
        ("[buses.default]\nmembers = ['uid:1', 'uid:1']", "buses.default.members"),
        ("[buses.default]\nmembers = ['gid:1']", "buses.default.members"),
        ("[buses.default]\nmembers = ['pid:0']", "buses.default.members"),
        ("[buses.default]\nmembers = ['domid:0']", "buses.default.members"),
        ("[buses.default]\nmembers = ['domid:32752']", "buses.default.members"),
        ("[buses.default]\nmembers = ['domid:self']", "buses.default.members"),
        ("[buses.default]\nmembers = ['domid:7', 'domid:7']", "buses.default.members"),
        ("[buses.default]\ndevices = 'echo0'", "buses.default.devices"),
        ("[buses.default]\ndevices = ['echo0']", "buses.default.devices"),
        (
            "[devices.e]\nclass = 'echo'\n[buses.default]\ndevices = ['e', 'e']",
            "buses.default.devices",
        ),
    ],
)
def test_load_errors_name_source_and_key(text: str, where: str) -> None:
    with pytest.raises(Invalid) as info:
        load_config_text(text, SOURCE)
    message = info.value.message
    assert re.match(rf"{re.escape(SOURCE)}(:\d+)?: ", message), message
    if where:
        assert re.match(rf"{re.escape(SOURCE)}(:\d+)?: {re.escape(where)}: ", message), message


def test_load_error_for_bad_toml_says_so() -> None:
    with pytest.raises(Invalid, match="not valid TOML"):
        load_config_text("[[[", "x.toml")


def test_apply_config(topo: Topology) -> None:
    apply_config(topo, load_config_text(GOOD, SOURCE))
    assert [d.name for d in topo.devices_on("default")] == ["echo0", "k"]
    assert topo.get_attribute("echo0", "mode") == "sink"
    assert topo.get_attribute("k", "flag") == "1"
    assert topo.get_attribute("k", "size") == "16"
    assert topo.members("default") == ["pid:10", f"uid:{SELF_UID}"]
    assert topo.members("spare") == []
    assert topo.resolve(Peer(99, SELF_UID, SELF_UID)) is topo.bus("default")


@pytest.mark.parametrize(
    ("text", "error", "where"),
    [
        ("[devices.x]\nclass = 'nope'", Invalid, "devices.x.class"),
        ("[devices.x]\nclass = 'echo'\nmode = 'loud'", Invalid, "devices.x.mode"),
        ("[devices.x]\nclass = 'echo'\ncolour = 'red'", NotFound, "devices.x.colour"),
        ("[devices.x]\nclass = 'knobs'\nsize = 0", Invalid, "devices.x.size"),
        ("[devices.x]\nclass = 'knobs'\nflag = 2", Invalid, "devices.x.flag"),
        ("[devices.x]\nclass = 'knobs'\nserial = 'z'", VbusError, "devices.x.serial"),
        ("[buses.a]\nmembers = ['pid:4242']", NoSuchTask, "buses.a.members"),
        ("[buses.a]\nmembers = ['uid:5']\n[buses.b]\nmembers = ['uid:5']", Busy, "buses.b.members"),
        ("[buses.a]\nmembers = ['uid:7', 'uid:007']", Exists, "buses.a.members"),
        (
            "[buses.a]\nmembers = ['domid:5']\n[buses.b]\nmembers = ['domid:5']",
            Busy,
            "buses.b.members",
        ),
        ("[buses.a]\nmembers = ['domid:7', 'domid:007']", Exists, "buses.a.members"),
    ],
)
def test_apply_errors_are_all_or_nothing(
    topo: Topology, text: str, error: type[VbusError], where: str
) -> None:
    cfg = load_config_text(GOOD + text, SOURCE)
    with pytest.raises(error) as info:
        apply_config(topo, cfg)
    assert re.match(rf"{re.escape(SOURCE)}:\d+: {re.escape(where)}: ", info.value.message), (
        info.value.message
    )
    assert topo.snapshot()["devices"] == {}
    assert topo.snapshot()["buses"] == {}


def test_domid_members(topo: Topology) -> None:
    text = "[buses.xen]\nmembers = ['domid:7', 'domid:32751', 'uid:7']\n"
    cfg = load_config_text(text, SOURCE)
    assert cfg["buses"]["xen"]["members"] == ["domid:7", "domid:32751", "uid:7"]
    apply_config(topo, cfg)
    assert topo.members("xen") == ["domid:32751", "domid:7", "uid:7"]
    assert topo.resolve(Domain(7)) is topo.bus("xen")
    assert topo.resolve(Domain(8)) is None
    assert topo.snapshot()["buses"]["xen"]["domids"] == [7, 32751]


def test_dom0_refusal_says_why() -> None:
    with pytest.raises(Invalid) as info:
        load_config_text("[buses.x]\nmembers = ['domid:0']\n", SOURCE)
    assert info.value.message == (
        f"{SOURCE}:2: buses.x.members: bad member rule 'domid:0': "
        "domid 0 is dom0, which is never a member"
    )


LAB = """\
[devices.echo0]
class = "echo"
mode = "sink"

[buses.lab]
members = ["uid:1000", "pid:4242", "domid:7"]
devices = ["echo0"]
"""


def test_errors_point_at_the_line(topo: Topology) -> None:
    with pytest.raises(NoSuchTask) as info:
        apply_config(topo, load_config_text(LAB, SOURCE))
    assert info.value.message == (
        f"{SOURCE}:6: buses.lab.members: 'pid:4242': no such task 4242 "
        "(a pid rule must name a running process)"
    )
    with pytest.raises(Invalid) as bad_value:
        apply_config(topo, load_config_text(LAB.replace('"sink"', '"loud"'), SOURCE))
    assert bad_value.value.message.startswith(f"{SOURCE}:3: devices.echo0.mode: ")
    with pytest.raises(Invalid) as bad_toml:
        load_config_text(LAB.replace("[buses.lab]", "[buses.lab"), SOURCE)
    assert bad_toml.value.message.startswith(f"{SOURCE}:5: not valid TOML ("), bad_toml.value
    assert "(at line" not in bad_toml.value.message


@pytest.mark.parametrize(
    ("text", "where", "line"),
    [
        # The nearest enclosing key or table that is written in the file.
        ("[buses]\nlab = { members = ['gid:1'] }\n", "buses.lab.members", 2),
        ("[devices.'a.b']\n\nclass = 5\n", "devices.a.b.class", 3),
        ('\n[ devices . "x" ]   # a comment\nclass = "echo"\nratio = 1.5\n', "devices.x.ratio", 4),
        ("\n\n[devices.x]\n", "devices.x", 3),
        ("[buses.default]\nmembers = [\n  'uid:1',\n  'gid:2',\n]\n", "buses.default.members", 2),
    ],
)
def test_line_of_keys_written_in_any_toml_style(text: str, where: str, line: int) -> None:
    with pytest.raises(Invalid) as info:
        load_config_text(text, SOURCE)
    assert info.value.message.startswith(f"{SOURCE}:{line}: {where}: "), info.value.message


@pytest.mark.parametrize(
    ("text", "error", "where"),
    [
        ("[devices.x]\nclass = 'nope'", Invalid, "devices.x.class"),
        ("[devices.x]\nclass = 'echo'\nmode = 'loud'", Invalid, "devices.x.mode"),
        ("[devices.x]\nclass = 'echo'\ncolour = 'red'", Invalid, "devices.x.colour"),
        ("[devices.x]\nclass = 'knobs'\nsize = 0", Invalid, "devices.x.size"),
        ("[devices.x]\nclass = 'knobs'\nserial = 'z'", Denied, "devices.x.serial"),
    ],
)
def test_check_config_finds_device_errors_without_creating_anything(
    topo: Topology, text: str, error: type[VbusError], where: str
) -> None:
    with pytest.raises(error) as info:
        check_config(load_config_text(text, SOURCE), topo.registry)
    assert re.match(rf"{re.escape(SOURCE)}:\d+: {re.escape(where)}: ", info.value.message)
    assert topo.snapshot()["devices"] == {}


def test_check_config_passes_what_applies(topo: Topology) -> None:
    cfg = load_config_text(GOOD, SOURCE)
    check_config(cfg, topo.registry)
    assert topo.snapshot()["devices"] == {}  # checking created nothing
    apply_config(topo, cfg)


def test_apply_twice_conflicts_and_keeps_the_first(topo: Topology) -> None:
    cfg = load_config_text(GOOD, SOURCE)
    apply_config(topo, cfg)
    before = topo.snapshot()
    with pytest.raises(Exists, match=r"devices\.echo0\.class"):
        apply_config(topo, cfg)
    assert topo.snapshot() == before


def test_apply_without_source_uses_a_placeholder(topo: Topology) -> None:
    cfg: dict[str, Any] = {"devices": {"x": {"class": "nope", "attrs": {}}}, "buses": {}}
    with pytest.raises(Invalid, match=r"^config: devices\.x\.class: "):
        apply_config(topo, cfg)


def test_default_config_text() -> None:
    text = default_config_text()
    assert text.lstrip().startswith("#")
    assert sum(line.startswith("#") for line in text.splitlines()) >= 3
    assert tomllib.loads(text) == {
        "devices": {"echo0": {"class": "echo", "mode": "echo"}},
        "buses": {"default": {"members": ["uid:self"], "devices": ["echo0"]}},
    }


@pytest.mark.parametrize("self_uid", [0, SELF_UID])
def test_default_config_applies_cleanly(self_uid: int) -> None:
    registry = Registry()
    registry.register(StandInEcho)
    topo = Topology(registry, FakeTasks(), self_uid)
    apply_config(topo, load_config_text(default_config_text(), "<default>"))
    assert [d.name for d in topo.devices_on("default")] == ["echo0"]
    assert topo.device("echo0").deviceclass == "echo"
    assert topo.get_attribute("echo0", "mode") == "echo"
    assert topo.members("default") == [f"uid:{self_uid}"]
    bus = topo.resolve(Peer(4321, self_uid, self_uid))
    assert bus is topo.bus("default")
    assert topo.find_device(bus, "echo0") is topo.device("echo0")
    # ... and what it builds survives a snapshot round trip.
    again = Topology(registry, FakeTasks(), self_uid)
    again.apply(topo.snapshot())
    assert again.snapshot() == topo.snapshot()
