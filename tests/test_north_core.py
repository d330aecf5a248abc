"""The attachment core, driven through two connectors with the same assertions.

``userspace`` is the real connector on a Unix socket, with the client library
as its north (in this process, on this loop); ``loopback`` (tests/loopback.py)
is an in-process north that calls the core directly.  Both open ``echo``,
register queues, move traffic, get faulted, revoked and released through the
same core, and must leave nothing behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Protocol

import pytest

from tests.loopback import LoopbackConnector, LoopbackNorth
from vbus import protocol
from vbus.client import Bus, Device, connect
from vbus.connectors.userspace import UserspaceConnector
from vbus.core.device import DeviceModel, Session
from vbus.core.members import Peer
from vbus.core.model import Connection, Topology
from vbus.core.registry import Registry
from vbus.core.resources import Ledger
from vbus.devices.echo import Echo
from vbus.errors import Fault, NotFound, NotSupported, VbusError
from vbus.ioq import IoqNorth
from vbus.procfs import ProcTasks

pytestmark = pytest.mark.asyncio


class Buggy(DeviceModel):
    """A deviceclass with a bug in call(): the core must contain it."""

    name = "buggy"
    description = "raises from call(2)"

    def open(self, conn: Connection) -> Session:
        return BuggySession(self, conn)


class BuggySession(Session):
    def call(self, func: int, data: bytes) -> bytes:
        if func == 2:
            raise RuntimeError("deviceclass bug")
        if func == 3:  # the device finds the north at fault outside any poll
            assert self.fault("a bad descriptor found while delivering")
        return data


def corrupt(ring: IoqNorth) -> None:
    """Post one descriptor that points far outside the north's memory."""
    slot = ring.valid & (ring.count - 1)
    ring._dq[slot * 4 + 1] = 1 << 40  # ptr
    ring._dq[slot * 4 + 2] = 64  # len
    ring._publish(1)
    ring.signal.notify(force=True)


class Side(Protocol):
    """One connector under test, seen from its north."""

    ledger: Ledger

    async def open(self, name: str) -> Any: ...
    async def call(self, handle: Any, func: int, data: bytes) -> bytes: ...
    async def queues(self, handle: Any) -> tuple[IoqNorth, IoqNorth]: ...
    async def event(self) -> tuple[str, int, str]: ...
    async def disconnect(self) -> None: ...
    def clients(self) -> int: ...


class UserspaceSide:
    def __init__(self, topology: Topology, path: Path, ledger: Ledger) -> None:
        self.ledger = ledger
        self.connector = UserspaceConnector(
            topology, path, asyncio.get_running_loop(), tasks=ProcTasks(), ledger=ledger
        )
        self.connector.start()
        self.path = path
        self.bus: Bus | None = None
        self.stack = contextlib.AsyncExitStack()

    async def start(self) -> UserspaceSide:
        self.bus = await self.stack.enter_async_context(connect(self.path))
        return self

    async def open(self, name: str) -> Device:
        assert self.bus is not None
        return await self.bus.open(name)

    async def call(self, handle: Device, func: int, data: bytes) -> bytes:
        return await handle.call(func, data)

    async def queues(self, handle: Device) -> tuple[IoqNorth, IoqNorth]:
        tx = await handle.shm(0, "tx", count=64, buf_size=256)
        rx = await handle.shm(1, "rx", count=64, buf_size=256)
        return tx.ring, rx.ring

    async def event(self) -> tuple[str, int, str]:
        assert self.bus is not None
        ev = await self.bus.events.get()
        kind = {
            protocol.EventKind.FAULT: "fault",
            protocol.EventKind.DEVICE_REMOVED: "device_removed",
            protocol.EventKind.BUS_GONE: "bus_gone",
        }[protocol.EventKind(ev.kind)]
        return kind, ev.handle, ev.reason

    async def disconnect(self) -> None:
        await self.stack.aclose()
        for _ in range(200):
            if not self.connector.clients():
                break
            await asyncio.sleep(0.01)

    def clients(self) -> int:
        return self.connector.clients()

    def stop(self) -> None:
        self.connector.stop("test over")


class LoopbackSide:
    def __init__(self, topology: Topology, ledger: Ledger) -> None:
        self.ledger = ledger
        self.connector = LoopbackConnector(topology, asyncio.get_running_loop(), ledger)
        north = self.connector.connect(Peer(os.getpid(), os.getuid(), os.getgid()))
        assert north is not None
        self.north: LoopbackNorth = north
        self.seen = 0

    async def open(self, name: str) -> Any:
        return self.north.north.open(name)

    async def call(self, handle: Any, func: int, data: bytes) -> bytes:
        result: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

        def later(value: bytes | VbusError) -> None:
            if isinstance(value, VbusError):
                result.set_exception(value)
            else:
                result.set_result(value)

        done = handle.call(func, data, later)
        return done if done is not None else await result

    async def queues(self, handle: Any) -> tuple[IoqNorth, IoqNorth]:
        return (
            self.north.shm(handle, 0, writable=False),
            self.north.shm(handle, 1, writable=True),
        )

    async def event(self) -> tuple[str, int, str]:
        for _ in range(500):
            if len(self.north.events) > self.seen:
                self.seen += 1
                return self.north.events[self.seen - 1]
            await asyncio.sleep(0.01)
        raise AssertionError("no event from the core")

    async def disconnect(self) -> None:
        self.north.close()

    def clients(self) -> int:
        return self.connector.clients()

    def stop(self) -> None:
        self.connector.stop("test over")


@pytest.fixture
def topology() -> Topology:
    registry = Registry()
    registry.register(Echo)
    registry.register(Buggy)
    topo = Topology(registry, ProcTasks(), os.getuid())
    topo.create_device("echo0", "echo")
    topo.create_device("bug0", "buggy")
    topo.create_bus("lab")
    topo.link("lab", "echo0")
    topo.link("lab", "bug0")
    topo.add_member("lab", f"uid:{os.getuid()}")
    return topo


@pytest.fixture(params=["userspace", "loopback"])
async def side(
    request: pytest.FixtureRequest, topology: Topology, tmp_path: Path
) -> AsyncIterator[Any]:
    ledger = Ledger()
    made: UserspaceSide | LoopbackSide
    if request.param == "userspace":
        made = await UserspaceSide(topology, tmp_path / "vbus.sock", ledger).start()
    else:
        made = LoopbackSide(topology, ledger)
    yield made
    made.stop()


async def echo_through(tx: IoqNorth, rx: IoqNorth, payloads: list[bytes]) -> list[bytes]:
    """Send and receive at once (the rings are smaller than the batch)."""
    got: list[bytes] = []
    sent = 0
    for _ in range(5000):
        if sent < len(payloads):
            n = tx.send_many(payloads[sent : sent + 32])
            if n:
                sent += n
                tx.signal.notify()
        got += rx.recv_many(64)
        rx.signal.notify()
        if len(got) == len(payloads):
            return got
        await asyncio.sleep(0.001)
    raise AssertionError(f"only {len(got)} of {len(payloads)} came back")


async def test_open_call_traffic_release(side: Any, topology: Topology) -> None:
    handle = await side.open("echo0")
    assert await side.call(handle, 1, b"ping") == b"ping"
    with pytest.raises(NotSupported):
        await side.call(handle, 99, b"")
    tx, rx = await side.queues(handle)
    assert side.ledger.shm > 0
    payloads = [i.to_bytes(4, "little") * 8 for i in range(1000)]
    assert await echo_through(tx, rx, payloads) == payloads
    assert len(topology.connections()) == 1
    await side.disconnect()
    assert topology.connections() == [] and topology.clients() == []
    assert (side.ledger.shm, side.ledger.fds, side.ledger.maps) == (0, 0, 0)
    assert side.clients() == 0


async def test_a_broken_ring_faults_that_connection_only(side: Any, topology: Topology) -> None:
    bad = await side.open("echo0")
    good = await side.open("echo0")
    tx, _rx = await side.queues(bad)
    held = side.ledger.shm
    corrupt(tx)
    kind, _handle, reason = await side.event()
    assert kind == "fault" and "outside" in reason
    assert len(topology.connections()) == 1  # the other connection lives on
    assert side.ledger.shm < held
    assert await side.call(good, 1, b"still") == b"still"
    await side.disconnect()
    assert (side.ledger.shm, side.ledger.fds) == (0, 0)


async def test_unlinking_revokes_and_releases(side: Any, topology: Topology) -> None:
    handle = await side.open("echo0")
    await side.queues(handle)
    topology.unlink("lab", "echo0")
    kind, _handle, reason = await side.event()
    assert (kind, reason) == ("device_removed", "device 'echo0' was unlinked")
    assert topology.connections() == []
    assert side.ledger.maps == 0 and side.ledger.shm == 0
    with pytest.raises(NotFound):
        await side.open("echo0")
    topology.link("lab", "echo0")
    handle = await side.open("echo0")
    assert await side.call(handle, 1, b"back") == b"back"
    await side.disconnect()


async def test_a_device_bug_faults_the_connection_and_is_logged_once(
    side: Any, topology: Topology, capsys: pytest.CaptureFixture[str]
) -> None:
    handle = await side.open("bug0")
    assert await side.call(handle, 1, b"fine") == b"fine"
    with pytest.raises(Fault, match="failed"):
        await side.call(handle, 2, b"boom")
    kind, _handle, reason = await side.event()
    assert kind == "fault" and "device failed" in reason
    assert topology.connections() == []
    assert capsys.readouterr().out.count("deviceclass bug") >= 1  # the traceback, logged
    await side.disconnect()


async def test_a_device_faults_its_connection_at_once(side: Any, topology: Topology) -> None:
    handle = await side.open("bug0")
    other = await side.open("echo0")
    assert await side.call(handle, 3, b"x") == b"x"  # the call itself is answered
    kind, _handle, reason = await side.event()  # no poll, no kick: the fault comes anyway
    assert (kind, reason) == ("fault", "a bad descriptor found while delivering")
    assert [c.device.name for c in topology.connections()] == ["echo0"]  # bug0's is closed
    assert await side.call(other, 1, b"still") == b"still"
    await side.disconnect()
