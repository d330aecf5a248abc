"""The venet deviceclass through the real connector and client library, in this process.

Attributes and their persistence, negotiation, who drives the device, the
switch between venets, drops by cause, backpressure and its bound, GSO
adaptation, faults found while delivering.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import struct
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.netframes import (
    BROADCAST,
    MAC_A,
    MAC_B,
    MAC_C,
    eth,
    frame,
    gso_frame,
    ipv4_tcp,
    partial_pseudo,
    tcp_checksum_ok,
)
from vbus.client import Bus, ClientQueue, Device, connect
from vbus.connectors.userspace import UserspaceConnector
from vbus.core.model import Topology
from vbus.core.registry import Registry
from vbus.core.resources import Ledger
from vbus.devices import venet
from vbus.devices.venet import Venet
from vbus.errors import Busy, Invalid, NotSupported
from vbus.net import vnet
from vbus.net.calls import (
    CALL_CONFIG,
    CALL_FEATURES,
    CALL_LINK_DOWN,
    CALL_LINK_UP,
    CALL_MAC,
    CALL_NEGOTIATE,
    CALL_STATS,
    CONFIG,
    NEGOTIATED,
)
from vbus.net.vnet import F_CSUM, F_GUEST_CSUM, F_HOST_TSO4, F_VERSION_1, header
from vbus.procfs import ProcTasks

PLAIN = F_VERSION_1
ALL = vnet.OFFERED
U64 = struct.Struct("<Q")

pytestmark = pytest.mark.asyncio


def make_topology() -> Topology:
    registry = Registry()
    registry.register(Venet)
    topo = Topology(registry, ProcTasks(), os.getuid())
    topo.create_bus("lab")
    for name in ("v0", "v1", "v2"):
        topo.create_device(name, "venet")
        topo.link("lab", name)
    topo.add_member("lab", f"uid:{os.getuid()}")
    return topo


@pytest.fixture
async def lab(tmp_path: Path) -> AsyncIterator[tuple[Topology, Bus]]:
    topo = make_topology()
    connector = UserspaceConnector(
        topo, tmp_path / "vbus.sock", asyncio.get_running_loop(), tasks=ProcTasks(), ledger=Ledger()
    )
    connector.start()
    try:
        async with connect(tmp_path / "vbus.sock") as bus:
            yield topo, bus
    finally:
        connector.stop("test over")
    assert not venet.SWITCHES._switches, "a switch outlived its ports"


class Port:
    """A north driving one venet: negotiated, both queues, link up."""

    def __init__(self, dev: Device, tx: ClientQueue, rx: ClientQueue, size: int) -> None:
        self.dev, self.tx, self.rx, self.size = dev, tx, rx, size

    @classmethod
    async def open(
        cls,
        bus: Bus,
        name: str,
        features: int = PLAIN,
        *,
        count: int = 64,
        rx_size: int | None = None,
        up: bool = True,
    ) -> Port:
        dev = await bus.open(name)
        accepted, size = NEGOTIATED.unpack(await dev.call(CALL_NEGOTIATE, U64.pack(features)))
        assert accepted == features
        tx = await dev.shm(0, "tx", count=count, buf_size=max(size, vnet.HDR_SIZE + 65550))
        rx = await dev.shm(1, "rx", count=count, buf_size=rx_size or size)
        if up:
            assert await dev.call(CALL_LINK_UP) == b"\x01"
        return cls(dev, tx, rx, size)

    async def recv(self, n: int, timeout: float = 5.0) -> list[bytes]:
        got: list[bytes] = []
        async with asyncio.timeout(timeout):
            while len(got) < n:
                got += await self.rx.recv_many(n - len(got))
        return got

    async def nothing(self, wait: float = 0.1) -> None:
        await asyncio.sleep(wait)
        assert self.rx.ring.completed() == 0


def stats(topo: Topology, name: str) -> dict[str, int]:
    return topo.device(name).model.stats()


async def settle(condition: Any, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.005)


# --- calls -------------------------------------------------------------------------------
async def test_negotiation_and_queries(lab: tuple[Topology, Bus]) -> None:
    topo, bus = lab
    dev = await bus.open("v0")
    assert U64.unpack(await dev.call(CALL_FEATURES))[0] == ALL
    assert await dev.call(CALL_MAC) == topo.device("v0").model.mac  # type: ignore[attr-defined]
    _mac, mtu, link, features = CONFIG.unpack(await dev.call(CALL_CONFIG))
    assert (mtu, link, features) == (1500, 0, 0)
    accepted, size = NEGOTIATED.unpack(await dev.call(CALL_NEGOTIATE, U64.pack(PLAIN | F_CSUM)))
    assert (accepted, size) == (PLAIN | F_CSUM, 12 + 18 + 1500)
    _, size = NEGOTIATED.unpack(await dev.call(CALL_NEGOTIATE, U64.pack(ALL)))
    assert size == 12 + 14 + 65536
    with pytest.raises(Invalid, match="VERSION_1"):
        await dev.call(CALL_NEGOTIATE, U64.pack(F_CSUM))
    with pytest.raises(Invalid, match="u64"):
        await dev.call(CALL_NEGOTIATE, b"\x01")
    with pytest.raises(NotSupported):
        await dev.call(99)
    assert await dev.call(CALL_LINK_UP) == b"\x01"
    assert topo.get_attribute("v0", "link") == "up"
    assert CONFIG.unpack(await dev.call(CALL_CONFIG))[2:] == (1, ALL)
    with pytest.raises(Busy, match="link is down"):
        await dev.call(CALL_NEGOTIATE, U64.pack(PLAIN))
    with pytest.raises(Busy, match="link is down"):
        topo.set_attribute("v0", "backend", "switch:other")
    text = (await dev.call(CALL_STATS)).decode()
    assert "link_up 1\n" in text and "tx_drop_bad_header 0\n" in text
    assert await dev.call(CALL_LINK_DOWN) == b"\x00"
    assert topo.get_attribute("v0", "link") == "down"
    await dev.close()


async def test_one_connection_drives_the_device(lab: tuple[Topology, Bus]) -> None:
    topo, bus = lab
    first = await bus.open("v0")
    second = await bus.open("v0")
    await first.call(CALL_LINK_UP)
    assert CONFIG.unpack(await second.call(CALL_CONFIG))[0] == topo.device("v0").model.mac  # type: ignore[attr-defined]
    assert b"link_up 1" in await second.call(CALL_STATS)
    for func, data in (
        (CALL_NEGOTIATE, U64.pack(PLAIN)),
        (CALL_LINK_UP, b""),
        (CALL_LINK_DOWN, b""),
    ):
        with pytest.raises(Busy, match=r"driven by another connection|only the connection"):
            await second.call(func, data)
    with pytest.raises(Busy):
        await second.shm(0, "tx")
    await first.close()
    await settle(lambda: topo.get_attribute("v0", "link") == "down")
    await second.call(CALL_LINK_UP)  # the device is free again
    assert topo.get_attribute("v0", "link") == "up"
    await second.close()


# --- the switch ----------------------------------------------------------------------------
async def test_frames_cross_the_switch(lab: tuple[Topology, Bus]) -> None:
    topo, bus = lab
    a = await Port.open(bus, "v0")
    b = await Port.open(bus, "v1")
    c = await Port.open(bus, "v2")
    hello = frame(BROADCAST, MAC_A, b"hello" * 20)
    await a.tx.send(hello)
    (got_b,) = await b.recv(1)
    (got_c,) = await c.recv(1)
    # The header comes back with num_buffers = 1; the Ethernet frame byte-exact.
    assert got_b == got_c == hello[:10] + b"\x01\x00" + hello[12:]
    await b.tx.send(frame(MAC_A, MAC_B))  # A is known now: only a gets it
    (got_a,) = await a.recv(1)
    assert got_a[12:18] == MAC_A
    burst = [frame(MAC_B, MAC_A, os.urandom(200)) for _ in range(50)]
    await a.tx.send_many(burst)
    got = await b.recv(50)
    assert [g[12:] for g in got] == [f[12:] for f in burst]
    await c.nothing()
    s = stats(topo, "v0")
    assert s["tx_frames"] == 51 and s["tx_flooded"] == 1 and s["rx_frames"] == 1
    assert s["tx_bytes"] == sum(len(f) - 12 for f in [hello, *burst])
    assert s["switch_ports"] == 3 and s["switch_macs"] == 2
    assert s["rx_signals_sent"] >= 1


async def test_a_port_on_another_switch_name_is_apart(lab: tuple[Topology, Bus]) -> None:
    topo, bus = lab
    topo.set_attribute("v2", "backend", "switch:other")
    a = await Port.open(bus, "v0")
    b = await Port.open(bus, "v1")
    c = await Port.open(bus, "v2")
    await c.tx.send(frame(BROADCAST, MAC_C))
    await a.tx.send(frame(BROADCAST, MAC_A))
    await b.recv(1)
    await a.nothing()
    await c.nothing(0.0)


async def test_bad_frames_are_dropped_by_cause(lab: tuple[Topology, Bus]) -> None:
    topo, bus = lab
    a = await Port.open(bus, "v0", PLAIN | F_CSUM)
    b = await Port.open(bus, "v1")
    body = frame(BROADCAST, MAC_A)[12:]
    garbage = [
        b"",  # runt
        b"\x00" * 20,  # runt
        header() + b"\x00" * 13,  # runt
        frame(BROADCAST, MAC_A, b"x" * 1600),  # oversize without GSO
        header(hdr_len=len(body) + 1) + body,  # hdr_len lies
        header(1, csum_start=len(body), csum_offset=0) + body,  # csum_start lies
        header(1, csum_start=14, csum_offset=len(body)) + body,  # csum_offset lies
        header(2) + body,  # DATA_VALID from the north
        header(1, 1, 54, 1448, 34, 16) + body,  # GSO not negotiated
        header(0, 0x80) + body,  # the ECN bit
        gso_frame(b"y" * 4000, 1448),  # GSO without HOST_TSO4
    ]
    good = frame(BROADCAST, MAC_A, b"fine")
    await a.tx.send_many([*garbage, good])
    (got,) = await b.recv(1)
    assert got[12:] == good[12:]
    await b.nothing()
    s = stats(topo, "v0")
    assert (s["tx_drop_runt"], s["tx_drop_oversize"], s["tx_drop_bad_header"]) == (3, 1, 7)
    assert s["tx_frames"] == 1


async def test_a_stalled_north_drops_its_own_frames(lab: tuple[Topology, Bus]) -> None:
    topo, bus = lab
    sender = await Port.open(bus, "v0")
    stalled = await Port.open(bus, "v1", count=16)
    other = await Port.open(bus, "v2", count=256)
    await stalled.tx.send(frame(BROADCAST, MAC_B))  # the switch learns B
    await sender.recv(1)
    await other.recv(1)
    total = 2000
    for _ in range(total // 100):
        await sender.tx.send_many([frame(MAC_B, MAC_A, os.urandom(100)) for _ in range(100)])
        await other.tx.send(frame(MAC_A, MAC_C))  # the others still talk meanwhile
        assert len(await sender.recv(1)) == 1
    await settle(lambda: stats(topo, "v0")["tx_frames"] == total + 0)
    s = stats(topo, "v1")
    assert s["rx_frames"] == 16  # its ring
    assert s["rx_backlog"] == venet.BACKLOG_FRAMES  # its bounded queue
    assert s["rx_drop_ring_full"] == total - 16 - venet.BACKLOG_FRAMES
    assert s["rx_stops"] == 1 and s["rx_restarts"] == 0
    assert stats(topo, "v2")["rx_drop_ring_full"] == 0
    # It reads again: the backlog drains in order, the source restarts.
    got = await stalled.recv(16 + venet.BACKLOG_FRAMES)
    assert len(got) == 16 + venet.BACKLOG_FRAMES
    await settle(lambda: stats(topo, "v1")["rx_restarts"] == 1)
    assert stats(topo, "v1")["rx_backlog"] == 0
    await sender.tx.send(frame(MAC_B, MAC_A, b"after"))
    (late,) = await stalled.recv(1)
    assert late[12:] == frame(MAC_B, MAC_A, b"after")[12:]


async def test_super_frames_are_cut_for_a_port_without_gso(lab: tuple[Topology, Bus]) -> None:
    topo, bus = lab
    a = await Port.open(bus, "v0", ALL)
    gso = await Port.open(bus, "v1", ALL)
    plain = await Port.open(bus, "v2", PLAIN)
    big = gso_frame(os.urandom(60000), 1448)
    await a.tx.send(big)
    (whole,) = await gso.recv(1)
    assert whole[12:] == big[12:] and whole[1] == vnet.GSO_TCPV4
    cut = await plain.recv(42)
    assert all(len(f) - 12 <= 1514 and f[0] == 0 and tcp_checksum_ok(f[12:]) for f in cut)
    await plain.nothing()
    assert stats(topo, "v0")["tx_gso_frames"] == 1
    assert stats(topo, "v0")["tx_largest"] == len(big) - 12
    assert stats(topo, "v1")["rx_gso_frames"] == 1
    assert stats(topo, "v2")["rx_segmented"] == 1 and stats(topo, "v2")["rx_gso_frames"] == 0
    assert stats(topo, "v2")["rx_largest"] <= 1514


async def test_partial_checksums_are_completed_for_a_port_without_guest_csum(
    lab: tuple[Topology, Bus],
) -> None:
    topo, bus = lab
    a = await Port.open(bus, "v0", PLAIN | F_CSUM | F_HOST_TSO4)
    b = await Port.open(bus, "v1", PLAIN | F_GUEST_CSUM)
    c = await Port.open(bus, "v2", PLAIN)
    # A plain frame with a partial checksum: b takes it as it is, c gets it completed.
    ip = bytearray(ipv4_tcp(b"p" * 700))
    ip[36:38] = struct.pack(">H", partial_pseudo(bytes(ip), False))
    partial = header(1, csum_start=34, csum_offset=16) + eth(MAC_B, MAC_A, 0x0800, bytes(ip))
    await a.tx.send(partial)
    (for_b,) = await b.recv(1)
    (for_c,) = await c.recv(1)
    assert for_b[:10] == partial[:10] and for_b[12:] == partial[12:]
    assert for_c[0] == 0 and tcp_checksum_ok(for_c[12:])
    assert stats(topo, "v2")["rx_csum_completed"] == 1
    # A super-frame of one segment: neither has GUEST_TSO4, both get it cut.
    await a.tx.send(gso_frame(b"k" * 1000, 1448))
    (for_b,) = await b.recv(1)
    (for_c,) = await c.recv(1)
    assert for_b[0] == vnet.HDR_DATA_VALID and for_c[0] == 0
    assert tcp_checksum_ok(for_b[12:]) and tcp_checksum_ok(for_c[12:])


async def test_rx_buffers_too_small_come_back_empty(lab: tuple[Topology, Bus]) -> None:
    topo, bus = lab
    a = await Port.open(bus, "v0")
    b = await Port.open(bus, "v1", rx_size=128)
    await a.tx.send_many([frame(BROADCAST, MAC_A, b"x" * 500), frame(BROADCAST, MAC_A, b"y" * 50)])
    empty, fits = await b.recv(2)
    assert empty == b"" and fits[12:] == frame(BROADCAST, MAC_A, b"y" * 50)[12:]
    assert stats(topo, "v1")["rx_drop_no_buffer"] == 1


async def test_link_down_drops_both_ways(lab: tuple[Topology, Bus]) -> None:
    topo, bus = lab
    a = await Port.open(bus, "v0")
    b = await Port.open(bus, "v1")
    await b.dev.call(CALL_LINK_DOWN)
    await a.tx.send(frame(BROADCAST, MAC_A))
    await b.tx.send(frame(BROADCAST, MAC_B))
    await settle(lambda: stats(topo, "v1")["tx_drop_link_down"] == 1)
    await b.nothing()
    await a.nothing(0.0)
    assert stats(topo, "v0")["tx_frames"] == 1  # it went out, to nobody


async def test_a_broken_rx_ring_faults_its_own_connection_only(lab: tuple[Topology, Bus]) -> None:
    topo, bus = lab
    a = await Port.open(bus, "v0")
    b = await Port.open(bus, "v1")
    c = await Port.open(bus, "v2")
    # b scribbles over its rx ring: descriptors pointing far outside its memory.
    ring = b.rx.ring
    for slot in range(ring.count):
        ring._dq[slot * 4 + 1] = 1 << 40
    await a.tx.send(frame(BROADCAST, MAC_A))
    await c.recv(1)
    await settle(
        lambda: (
            stats(topo, "v1")["switch_ports"] == 0 and topo.get_attribute("v1", "link") == "down"
        )
    )
    await b.tx.send(frame(BROADCAST, MAC_B))  # its next kick: the poll raises the fault
    with contextlib.suppress(Exception):
        async with asyncio.timeout(5):
            while b.dev.error is None:
                await asyncio.sleep(0.01)
    assert b.dev.error is not None and "outside" in str(b.dev.error)
    await a.tx.send(frame(BROADCAST, MAC_A))
    assert len(await c.recv(1)) == 1


# --- the tap backend ------------------------------------------------------------------------
async def test_the_tap_backend_stops_and_resumes_with_the_rx_ring(
    lab: tuple[Topology, Bus],
) -> None:
    import socket
    import subprocess

    from tests.conftest import require
    from vbus.net import tap as taplib

    require(os.geteuid() == 0 and os.path.exists("/dev/net/tun"), "taps need root and /dev/net/tun")
    topo, bus = lab
    ifname = f"vbx{os.getpid() % 100000}"
    ns = f"vbx{os.getpid()}"
    topo.set_attribute("v0", "backend", f"tap:{ifname}")
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        port = await Port.open(bus, "v0", count=8)
        assert stats(topo, "v0")["link_up"] == 1
        # The daemon's tap, moved into the test's namespace; frames put on it
        # there go to the north, frames from the north come out there.
        subprocess.run(["ip", "link", "set", ifname, "netns", ns], check=True)
        subprocess.run(["ip", "-n", ns, "link", "set", ifname, "up"], check=True)

        def packet_socket() -> socket.socket:
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x88B5))
            sock.bind((ifname, 0))
            return sock

        sock = taplib.in_netns(ns, packet_socket)
        try:
            sent = [frame(MAC_A, MAC_B, bytes([i]) * 100)[12:] for i in range(40)]
            for eth_frame in sent:
                sock.send(eth_frame)
            await settle(lambda: stats(topo, "v0")["rx_stops"] >= 1)
            assert stats(topo, "v0")["rx_frames"] == 8  # the ring is full: the reader stopped
            got: list[bytes] = []
            async with asyncio.timeout(10):
                while len(got) < 40:  # each rx post resumes the reader
                    got += [f[12:] for f in await port.recv(1) if f[24:26] == b"\x88\xb5"]
            assert got == sent  # (the stack's own IPv6 frames set aside)
            assert stats(topo, "v0")["rx_restarts"] >= 1
            sock.settimeout(5)
            out = frame(MAC_B, MAC_A, b"north to host")
            await port.tx.send(out)
            assert await asyncio.to_thread(sock.recv, 2048) == out[12:]
            assert stats(topo, "v0")["tx_drop_backend_error"] == 0
        finally:
            sock.close()
        await port.dev.call(CALL_LINK_DOWN)
        assert stats(topo, "v0")["link_up"] == 0
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)
        topo.device("v0").model.destroy()
