"""The virtio form of a deviceclass: which classes have one, what venet offers and serves."""

from __future__ import annotations

import struct

import pytest

from vbus.devices.echo import Echo
from vbus.devices.venet import Venet
from vbus.errors import Busy, Invalid
from vbus.net.calls import CALL_CONFIG, CONFIG, QUEUE_RX, QUEUE_TX
from vbus.net.vnet import F_CSUM, F_GUEST_CSUM, F_GUEST_TSO4, F_VERSION_1, OFFERED
from vbus.testing import DeviceHarness


def test_echo_has_no_virtio_form() -> None:
    with DeviceHarness(Echo) as h:
        assert h.model.virtio() is None


def test_venet_is_virtio_net_with_its_mac_and_mtu() -> None:
    with DeviceHarness(Venet, {"mac": "02:00:00:00:00:07", "mtu": 9000}) as h:
        mapping = h.model.virtio()
        assert mapping is not None
        assert mapping.device_id == 1
        assert mapping.features == OFFERED
        assert mapping.features & F_VERSION_1
        mac, status, pairs, mtu = struct.unpack("<6sHHH", mapping.config)
        assert (mac, status, pairs, mtu) == (bytes.fromhex("020000000007"), 1, 1, 9000)
        # receiveq1 then transmitq1, each with the direction the device expects
        assert [(q.index, q.writable) for q in mapping.queues] == [
            (QUEUE_RX, True),
            (QUEUE_TX, False),
        ]
        assert mapping.merge == (1 << 15, 10)


def test_venet_virtio_hooks_drive_the_session() -> None:
    with DeviceHarness(Venet) as h:
        mapping = h.model.virtio()
        assert mapping is not None
        plain = mapping.negotiate(h.session, F_VERSION_1)
        assert plain == 12 + 1500 + 18
        gso = mapping.negotiate(h.session, F_VERSION_1 | F_CSUM | F_GUEST_CSUM | F_GUEST_TSO4)
        assert gso == 12 + 65550
        with pytest.raises(Invalid):
            mapping.negotiate(h.session, F_GUEST_TSO4 | F_VERSION_1)  # TSO without its checksum
        mapping.activate(h.session)
        assert CONFIG.unpack(h.call(CALL_CONFIG, b""))[2] == 1
        with pytest.raises(Busy):
            mapping.negotiate(h.session, F_VERSION_1)  # not while the link is up
        mapping.deactivate(h.session)
        assert CONFIG.unpack(h.call(CALL_CONFIG, b""))[2] == 0
