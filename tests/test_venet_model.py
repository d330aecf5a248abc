"""venet without a connector: attributes, the random MAC and what is persisted, filling rx buffers."""

from __future__ import annotations

import os

import pytest

from tests.netframes import BROADCAST, MAC_A, frame
from tests.test_venet_device import make_topology
from vbus.core.model import Topology
from vbus.errors import Denied, Invalid
from vbus.procfs import ProcTasks


def test_mac_is_random_local_unicast_and_persisted() -> None:
    topo = make_topology()
    macs = [topo.get_attribute(name, "mac") for name in ("v0", "v1", "v2")]
    assert len(set(macs)) == 3
    for mac in macs:
        first = int(mac[:2], 16)
        assert first & 2 and not first & 1  # locally administered, unicast
    snapshot = topo.snapshot()
    assert snapshot["devices"]["v0"]["attrs"]["mac"] == macs[0]
    assert "link" not in snapshot["devices"]["v0"]["attrs"]  # read-only: not persisted
    again = Topology(topo.registry, ProcTasks(), os.getuid())
    again.apply(snapshot)
    assert [again.get_attribute(name, "mac") for name in ("v0", "v1", "v2")] == macs


def test_attributes_are_validated() -> None:
    topo = make_topology()
    for bad in ("switch:", "tap:", "tap:has/slash", "tap:" + "x" * 16, "bridge:x", "switch:-x"):
        with pytest.raises(Invalid):
            topo.set_attribute("v0", "backend", bad)
    assert topo.get_attribute("v0", "backend") == "switch:default"
    topo.set_attribute("v0", "backend", "switch:sw1")
    topo.set_attribute("v0", "backend", "tap:vbt0")
    for bad_mtu in ("67", "65536"):
        with pytest.raises(Invalid):
            topo.set_attribute("v0", "mtu", bad_mtu)
    with pytest.raises(Invalid):
        topo.set_attribute("v0", "mac", "03:00:00:00:00:01")  # multicast
    with pytest.raises(Denied):
        topo.set_attribute("v0", "link", "up")
    topo.set_attribute("v0", "mac", "02:aa:bb:cc:dd:ee")
    assert topo.device("v0").model.mac == bytes.fromhex("02aabbccddee")  # type: ignore[attr-defined]


def test_a_frame_spreads_over_the_writable_segments_of_a_chain() -> None:
    from vbus.devices.venet import _room, _write_frame
    from vbus.memory import BufferMemory
    from vbus.queue import Buffer

    memory = BufferMemory(bytearray(256))
    # A chain as virtio may post it: a readable piece first, then room in two pieces.
    chain = Buffer(0, 0, ((0, 16, False), (32, 20, True), (100, 60, True)))
    assert _room(chain) == 80
    data = frame(BROADCAST, MAC_A, b"z" * 50)  # 12 + 14 + 50 = 76 bytes
    _write_frame(memory, chain, data)
    written = bytes(memory.buf[32:52]) + bytes(memory.buf[100:156])
    assert written == data[:10] + b"\x01\x00" + data[12:]
    assert bytes(memory.buf[:16]) == bytes(16)  # the readable segment is left alone
    assert _room(Buffer(1, 0, ((0, 64, False),))) == 0


def test_tap_offloads_follow_the_negotiated_features() -> None:
    from vbus.net import tap as taplib
    from vbus.net.vnet import (
        F_CSUM,
        F_GUEST_CSUM,
        F_GUEST_TSO4,
        F_GUEST_TSO6,
        F_HOST_TSO4,
        F_HOST_TSO6,
    )

    guest = F_GUEST_CSUM | F_GUEST_TSO4 | F_GUEST_TSO6
    host = F_CSUM | F_HOST_TSO4
    everything = taplib.TUN_F_CSUM | taplib.TUN_F_TSO4 | taplib.TUN_F_TSO6
    # The daemon's tap: what it reads goes to the north (GUEST_* counts).
    assert taplib.offload_flags(guest, reader="device") == everything
    assert taplib.offload_flags(host, reader="device") == 0
    assert taplib.offload_flags(F_GUEST_CSUM, reader="device") == taplib.TUN_F_CSUM
    # vbus tap: what it reads goes to the device (CSUM and HOST_* count).
    assert taplib.offload_flags(host, reader="driver") == taplib.TUN_F_CSUM | taplib.TUN_F_TSO4
    assert taplib.offload_flags(guest, reader="driver") == 0
    assert taplib.offload_flags(F_HOST_TSO6, reader="driver") == 0  # no TSO without CSUM


def test_interface_names() -> None:
    from vbus.net.tap import valid_ifname

    assert valid_ifname("vt0") and valid_ifname("a" * 15) and valid_ifname("tap%d")
    for bad in ("", ".", "..", "a" * 16, "a/b", "a:b", "a b", "a\tb"):
        assert not valid_ifname(bad), bad
