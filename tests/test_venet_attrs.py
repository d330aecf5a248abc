"""venet attributes: validation, the random MAC and what is persisted."""

from __future__ import annotations

import os

import pytest

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
