"""The userspace connector end to end: a real vbusd, real clients, bad input of every kind."""

from __future__ import annotations

import array
import asyncio
import errno
import fcntl
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import Daemon
from vbus import protocol
from vbus.client import connect
from vbus.errors import Denied, Fault, Invalid, NotFound, VbusError
from vbus.ioq import format_ring, pool_layout
from vbus.memory import create_memfd

pytestmark = pytest.mark.integration

TWO_BUSES = """
[devices.echo0]
class = "echo"
[devices.hidden]
class = "echo"
[buses.mine]
members = ["uid:self"]
devices = ["echo0"]
[buses.theirs]
members = ["uid:4242"]
devices = ["hidden"]
"""


def config(tmp_path: Path, text: str) -> str:
    path = tmp_path / "topology.toml"
    path.write_text(textwrap.dedent(text))
    return str(path)


class RawClient:
    """Speaks the wire protocol by hand, to say what the library never would."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock.settimeout(10)
        self.sock.connect(str(path))
        self.seq = 0

    def send_raw(self, frame: bytes, fds: list[int] | tuple[int, ...] = ()) -> None:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        self.sock.sendmsg([frame], anc)

    def request(
        self, msg: protocol.Message, fds: list[int] | tuple[int, ...] = ()
    ) -> protocol.Message:
        self.seq += 1
        self.send_raw(protocol.encode(msg, self.seq), fds)
        while True:
            seq, reply = self.recv()
            if not isinstance(reply, protocol.Event):
                assert seq == self.seq
                return reply

    def recv(self) -> tuple[int, protocol.Message]:
        data = self.sock.recv(protocol.MAX_FRAME)
        assert data, "daemon closed the connection"
        return protocol.decode_reply(data)

    def hello(self) -> protocol.Message:
        return self.request(protocol.Hello(1, 1, "raw"))

    def is_closed_by_peer(self, timeout: float = 10) -> bool:
        self.sock.settimeout(timeout)
        try:
            while True:
                if self.sock.recv(protocol.MAX_FRAME) == b"":
                    return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False

    def close(self) -> None:
        self.sock.close()


def expect_error(reply: protocol.Message, cls: type[VbusError]) -> str:
    assert isinstance(reply, protocol.Error), reply
    exc = reply.exception()
    assert isinstance(exc, cls), (type(exc), exc)
    return exc.message


def eventfd() -> int:
    return os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)


# --- traffic that works ----------------------------------------------------------


async def test_enumerate_open_call_and_stream(vbusd) -> None:
    daemon: Daemon = vbusd()
    async with connect(daemon.socket) as bus:
        assert bus.name == "default"
        devices = await bus.devices()
        assert [(d.name, d.deviceclass) for d in devices] == [("echo0", "echo")]
        dev = await bus.open("echo0")
        assert await dev.call(1, b"hello") == b"hello"
        assert await dev.call(1, b"") == b""
        assert await dev.call(1, b"x" * 60000) == b"x" * 60000
        by_id = await bus.open(devices[0].id)
        assert by_id.info.name == "echo0"
        with pytest.raises(VbusError) as unsupported:
            await dev.call(99, b"")
        assert unsupported.value.errno == errno.EOPNOTSUPP

        tx = await dev.shm(0, "tx", count=64, buf_size=128)
        rx = await dev.shm(1, "rx", count=64, buf_size=128)
        messages = [i.to_bytes(4, "little") * (1 + i % 30) for i in range(5000)]

        async def consume() -> list[bytes]:
            got: list[bytes] = []
            while len(got) < len(messages):
                got.extend(await rx.recv_many(256))
            return got

        consumer = asyncio.ensure_future(consume())
        for start in range(0, len(messages), 100):
            await tx.send_many(messages[start : start + 100])
        got = await asyncio.wait_for(consumer, 30)
        assert got == messages
        # Mitigation: far fewer signals than messages in both directions.
        assert tx.signals_sent + rx.signals_sent < len(messages) / 4


async def test_queue_registration_errors_are_clear(vbusd) -> None:
    daemon: Daemon = vbusd()
    async with connect(daemon.socket) as bus:
        dev = await bus.open("echo0")
        with pytest.raises(Invalid, match="queue 7 does not exist"):
            await dev.shm(7, "tx")
        with pytest.raises(Invalid, match="wrong direction"):
            await dev.shm(0, "rx")
        await dev.shm(0, "tx")
        assert await dev.call(1, b"still fine") == b"still fine"


# --- admittance and namespaces -----------------------------------------------------


async def test_not_a_member_is_denied_on_hello(vbusd, tmp_path: Path) -> None:
    daemon: Daemon = vbusd("--config", config(tmp_path, '[buses.other]\nmembers = ["uid:4242"]\n'))
    with pytest.raises(Denied, match="not a member of any bus"):
        async with connect(daemon.socket):
            pass
    assert _settles(lambda: '"client.denied"' in daemon.log())


async def test_device_on_another_bus_is_indistinguishable_from_none(vbusd, tmp_path) -> None:
    daemon: Daemon = vbusd("--config", config(tmp_path, TWO_BUSES))
    async with connect(daemon.socket) as bus:
        assert [d.name for d in await bus.devices()] == ["echo0"]
        with pytest.raises(NotFound) as hidden:
            await bus.open("hidden")
        with pytest.raises(NotFound) as missing:
            await bus.open("nosuchdevice")
        assert hidden.value.message == missing.value.message
        ids = {d.id for d in await bus.devices()}
        for device_id in range(1, 10):
            if device_id in ids:
                continue
            with pytest.raises(NotFound) as by_id:
                await bus.open(device_id)
            assert by_id.value.message == missing.value.message


# --- bad bytes on the socket -------------------------------------------------------


def test_request_before_hello_is_refused(vbusd) -> None:
    daemon: Daemon = vbusd()
    raw = RawClient(daemon.socket)
    expect_error(raw.request(protocol.Enumerate()), VbusError)
    assert raw.is_closed_by_peer()


def test_no_common_version_gets_an_error_and_an_immediate_hang_up(vbusd) -> None:
    daemon: Daemon = vbusd("--handshake-timeout", "30")
    raw = RawClient(daemon.socket)
    started = time.monotonic()
    reply = raw.request(protocol.Hello(90, 99, "from the future"))
    assert isinstance(reply, protocol.Error) and "wire versions 90..99" in reply.message
    assert raw.is_closed_by_peer()
    assert time.monotonic() - started < 10  # not after the handshake timeout


def test_oversized_message_gets_an_error_and_a_disconnect(vbusd) -> None:
    daemon: Daemon = vbusd()
    raw = RawClient(daemon.socket)
    raw.hello()
    big = protocol.encode(protocol.Call(1, 1, b""), 9)[:16] + b"\0" * 70000
    raw.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    raw.send_raw(big)
    _seq, reply = raw.recv()
    assert "larger than" in expect_error(reply, VbusError)
    assert raw.is_closed_by_peer()
    # The daemon is fine.
    assert isinstance(RawClient(daemon.socket).hello(), protocol.Welcome)


def test_truncated_message_gets_an_error_and_a_disconnect(vbusd) -> None:
    daemon: Daemon = vbusd()
    raw = RawClient(daemon.socket)
    raw.hello()
    frame = protocol.encode(protocol.Open(name="echo0"), 5)
    raw.send_raw(frame[:-2])
    _, reply = raw.recv()
    expect_error(reply, VbusError)
    assert raw.is_closed_by_peer()


def test_garbage_datagrams_never_hurt_the_daemon(vbusd) -> None:
    daemon: Daemon = vbusd()
    rng = __import__("random").Random(7)
    for _ in range(50):
        raw = RawClient(daemon.socket)
        raw.hello()
        raw.send_raw(bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 200))))
        assert raw.is_closed_by_peer()
        raw.close()
    assert isinstance(RawClient(daemon.socket).hello(), protocol.Welcome)


def test_fds_on_a_message_that_takes_none_are_closed(vbusd) -> None:
    daemon: Daemon = vbusd()
    raw = RawClient(daemon.socket)
    raw.hello()
    baseline = daemon.fd_count()
    fds = [eventfd() for _ in range(3)]
    reply = raw.request(protocol.Enumerate(), fds)
    expect_error(reply, VbusError)
    assert raw.is_closed_by_peer()
    assert _settles(lambda: daemon.fd_count() <= baseline - 1)


def _shm_fds(size: int = 4096, *, sealed: bool = True) -> tuple[int, int, int]:
    if sealed:
        memfd, mapping = create_memfd("test", size)
        mapping.close()
    else:
        memfd = os.memfd_create("test", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(memfd, size)
    return memfd, eventfd(), eventfd()


def _open(raw: RawClient) -> int:
    raw.hello()
    opened = raw.request(protocol.Open(name="echo0"))
    assert isinstance(opened, protocol.Opened)
    return opened.handle


@pytest.mark.parametrize(
    "make_fds, message",
    [
        (lambda: _shm_fds(sealed=False), "not sealed"),
        (lambda: (os.pipe()[0], eventfd(), eventfd()), "not a memfd"),
        (lambda: (eventfd(), eventfd(), eventfd()), "not a memfd"),
        (lambda: (_shm_fds()[0], os.pipe()[0], eventfd()), "kick descriptor is not an eventfd"),
        (lambda: (_shm_fds()[0], eventfd(), _shm_fds()[0]), "call descriptor is not an eventfd"),
    ],
)
def test_bad_shm_descriptors_are_invalid(
    vbusd, make_fds: Callable[[], tuple[int, ...]], message: str
) -> None:
    daemon: Daemon = vbusd()
    raw = RawClient(daemon.socket)
    handle = _open(raw)
    fds = make_fds()
    reply = raw.request(protocol.Shm(handle, 0, 0, 4, 0), fds)
    assert message in expect_error(reply, Invalid)
    # The connection stays usable after a refused registration.
    assert isinstance(raw.request(protocol.Call(handle, 1, b"ok")), protocol.Result)


def test_shrinking_is_impossible_after_sealing() -> None:
    memfd, _, _ = _shm_fds()
    with pytest.raises(PermissionError):
        os.ftruncate(memfd, 0)


# --- bad rings: that connection is faulted, others are not --------------------------


def test_ring_with_bad_magic_faults_that_connection_only(vbusd) -> None:
    daemon: Daemon = vbusd()
    good = RawClient(daemon.socket)
    good_handle = _open(good)
    bad = RawClient(daemon.socket)
    handle = _open(bad)
    memfd, kick, call = _shm_fds(8192)  # never formatted: magic is 0
    reply = bad.request(protocol.Shm(handle, 0, 0, 16, 0), (memfd, kick, call))
    assert "bad magic" in expect_error(reply, Fault)
    _seq, event = bad.recv()
    assert isinstance(event, protocol.Event)
    assert event.kind == protocol.EventKind.FAULT and event.handle == handle
    assert "bad magic" in event.reason
    # That handle is gone; the other connection works.
    expect_error(bad.request(protocol.Call(handle, 1, b"x")), NotFound)
    assert good.request(protocol.Call(good_handle, 1, b"x")) == protocol.Result(b"x")
    assert _settles(lambda: '"connection.faulted"' in daemon.log())


async def test_descriptor_outside_memory_faults_with_reason(vbusd) -> None:
    daemon: Daemon = vbusd()
    async with connect(daemon.socket) as bus, connect(daemon.socket) as other_bus:
        dev = await bus.open("echo0")
        other = await other_bus.open("echo0")
        other_tx = await other.shm(0, "tx", count=16, buf_size=64)
        other_rx = await other.shm(1, "rx", count=16, buf_size=64)
        tx = await dev.shm(0, "tx", count=16, buf_size=64)
        await dev.shm(1, "rx", count=16, buf_size=64)
        # Point descriptor 0 far outside the memfd, then publish it.
        ring = tx.ring
        ring._dq[1] = 1 << 40
        ring._dq[2] = 8
        ring._publish(1)
        ring.signal.notify()
        event = await asyncio.wait_for(bus.events.get(), 10)
        assert event.kind == protocol.EventKind.FAULT
        assert "outside the client's memory" in event.reason
        with pytest.raises(Fault, match="outside the client's memory"):
            await tx.send(b"more")
        # Someone else's traffic on the same device carries on.
        await other_tx.send(b"unaffected")
        assert await asyncio.wait_for(other_rx.recv(), 10) == b"unaffected"


def test_corrupt_index_faults_that_connection(vbusd) -> None:
    daemon: Daemon = vbusd()
    raw = RawClient(daemon.socket)
    handle = _open(raw)
    count = 16
    _, total = pool_layout(count, 64)
    memfd, mapping = create_memfd("ring", total)
    format_ring(mapping, 0, count)
    kick, call = eventfd(), eventfd()
    reply = raw.request(protocol.Shm(handle, 0, 0, count, 0), (memfd, kick, call))
    assert reply == protocol.Ok()
    mapping[64:68] = (1000).to_bytes(4, "little")  # valid jumps past the ring size
    os.eventfd_write(kick, 1)
    _, event = raw.recv()
    assert isinstance(event, protocol.Event) and event.kind == protocol.EventKind.FAULT
    assert "ahead" in event.reason


# --- handshakes, caps, crashes ------------------------------------------------------------


def test_silent_connections_are_dropped_after_the_handshake_timeout(vbusd) -> None:
    daemon: Daemon = vbusd("--handshake-timeout", "0.5")
    raw = RawClient(daemon.socket)
    assert raw.is_closed_by_peer(timeout=10)
    assert _settles(lambda: "no HELLO within the handshake timeout" in daemon.log())


def test_idle_abusers_do_not_lock_out_a_good_client(vbusd) -> None:
    daemon: Daemon = vbusd("--max-pending-per-uid", "20")
    idle = [RawClient(daemon.socket) for _ in range(20)]
    # The pending cap is full: the newcomer still gets in, the oldest idle one goes.
    good = RawClient(daemon.socket)
    assert isinstance(good.hello(), protocol.Welcome)
    assert idle[0].is_closed_by_peer()
    assert _settles(lambda: "evicted: too many connections waiting" in daemon.log())
    assert not idle[1].is_closed_by_peer(timeout=0.2)
    for raw in idle:
        raw.close()


def test_connection_cap_per_uid_refuses_with_a_reason(vbusd) -> None:
    daemon: Daemon = vbusd("--max-connections-per-uid", "3")
    members = [RawClient(daemon.socket) for _ in range(3)]
    for raw in members:
        assert isinstance(raw.hello(), protocol.Welcome)
    refused = RawClient(daemon.socket)
    _, reply = refused.recv()
    assert "too many connections for uid" in expect_error(reply, VbusError)
    assert refused.is_closed_by_peer()
    members[0].close()

    def admitted() -> bool:
        raw = RawClient(daemon.socket)
        try:
            raw.send_raw(protocol.encode(protocol.Hello(1, 1, "late"), 1))
            return isinstance(raw.recv()[1], protocol.Welcome)
        except (OSError, AssertionError):  # still refused: reset or closed on us
            return False
        finally:
            raw.close()

    assert _settles(admitted)


def test_default_caps_admit_hundreds_of_connections(vbusd) -> None:
    daemon: Daemon = vbusd()
    idle = [RawClient(daemon.socket) for _ in range(200)]
    good = RawClient(daemon.socket)
    assert isinstance(good.hello(), protocol.Welcome)
    for raw in idle:
        raw.close()


CRASHER = """
import asyncio, sys
from vbus.client import connect

async def main():
    async with connect(sys.argv[1]) as bus:
        dev = await bus.open("echo0")
        tx = await dev.shm(0, "tx", count=256, buf_size=128)
        rx = await dev.shm(1, "rx", count=256, buf_size=128)
        print("streaming", flush=True)
        batch = [b"m" * 64] * 128
        while True:
            await tx.send_many(batch)
            await rx.recv_many(256)

asyncio.run(main())
"""


def test_client_killed_mid_stream_releases_everything(vbusd, tmp_path: Path) -> None:
    daemon: Daemon = vbusd()
    # Warm up once so lazily created daemon state is not counted as a leak.
    _run_crasher(daemon, tmp_path)
    assert _settles(lambda: daemon.memfd_mappings() == 0)  # its close has been handled
    baseline_fds, baseline_maps = daemon.fd_count(), daemon.memfd_mappings()
    for _ in range(3):
        _run_crasher(daemon, tmp_path)
    assert _settles(lambda: daemon.fd_count() == baseline_fds), (daemon.fd_count(), baseline_fds)
    assert _settles(lambda: daemon.memfd_mappings() == baseline_maps), (
        daemon.memfd_mappings(),
        baseline_maps,
    )
    assert daemon.log().count('"client.closed"') >= 4


def _run_crasher(daemon: Daemon, tmp_path: Path) -> None:
    script = tmp_path / "crasher.py"
    script.write_text(CRASHER)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(daemon.socket)],
        stdout=subprocess.PIPE,
        env=dict(os.environ, PYTHONPATH=str(Path(__file__).parent.parent)),
    )
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"streaming\n"
    time.sleep(0.3)  # let it stream
    assert daemon.memfd_mappings() == 2  # its two rings are mapped in the daemon
    closed = daemon.log().count('"client.closed"')
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    proc.stdout.close()
    assert _settles(lambda: daemon.log().count('"client.closed"') > closed)


def _settles(check: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return check()


def test_eventfd_given_to_the_daemon_is_made_nonblocking(vbusd) -> None:
    daemon: Daemon = vbusd()
    raw = RawClient(daemon.socket)
    handle = _open(raw)
    count = 4
    _, total = pool_layout(count, 64)
    memfd, mapping = create_memfd("ring", total)
    format_ring(mapping, 0, count)
    call = os.eventfd(0, os.EFD_CLOEXEC)  # blocking on purpose
    kick = eventfd()
    assert (
        raw.request(protocol.Shm(handle, 1, 0, count, protocol.SHM_WRITABLE), (memfd, kick, call))
        == protocol.Ok()
    )
    assert fcntl.fcntl(call, fcntl.F_GETFL) & os.O_NONBLOCK


async def test_status_reports_the_daemons_health(vbusd) -> None:
    daemon: Daemon = vbusd()
    async with connect(daemon.socket) as bus:
        dev = await bus.open("echo0")
        tx = await dev.shm(0, "tx", count=64, buf_size=64)
        rx = await dev.shm(1, "rx", count=64, buf_size=64)

        async def consume() -> int:
            got = 0
            while got < 500:
                got += len(await rx.recv_many(500))
            return got

        consumer = asyncio.ensure_future(consume())
        await tx.send_many([b"s" * 32] * 500)
        assert await asyncio.wait_for(consumer, 10) == 500
        status = await bus.status()
    assert int(status["pid"]) == daemon.pid
    assert int(status["clients"]) == 1
    assert int(status["connections"]) == 1
    assert int(status["errors_logged"]) == 0
    assert float(status["loop_lag_p99_ms"]) >= 0.0
    assert int(status["rss_kib"]) > 1000
    assert int(status["fds"]) > 5
    # Each message crosses two rings: 500 out of tx, 500 into rx.
    assert int(status["queue_messages"]) == 1000
    assert int(status["queue_bytes"]) == 2 * 500 * 32
    sent, suppressed = int(status["queue_signals_sent"]), int(status["queue_signals_suppressed"])
    assert sent + suppressed > 0
    assert sent < 100  # mitigated: far fewer south->north signals than messages


async def test_without_mitigation_every_message_is_signalled(vbusd) -> None:
    daemon: Daemon = vbusd()
    async with connect(daemon.socket) as bus:
        dev = await bus.open("echo0")
        tx = await dev.shm(0, "tx", count=64, buf_size=64, mitigation=False)
        rx = await dev.shm(1, "rx", count=64, buf_size=64, mitigation=False)
        messages = [i.to_bytes(2, "little") for i in range(300)]

        async def consume() -> list[bytes]:
            got: list[bytes] = []
            while len(got) < len(messages):
                got.extend(await rx.recv_many(64))
            return got

        consumer = asyncio.ensure_future(consume())
        await tx.send_many(messages)
        assert await asyncio.wait_for(consumer, 30) == messages
        assert tx.signals_sent == len(messages)  # one kick per message sent
        assert rx.signals_sent >= len(messages)  # one per buffer handed back
        status = await bus.status()
        # The south kicks once per message on each ring, too.
        assert int(status["queue_signals_sent"]) >= 2 * len(messages)
