"""The kvm connector against a real vbusd, its north a simulated guest
(``vbus.kvmsim``: the same memfd memory, doorbell and interrupt eventfds a
VMM and its guest would use; docs/design.md 4.5).

A guest exchanges echo traffic and uses ENUMERATE, OPEN, CALL and CLOSE;
each hostile act faults that guest with its documented reason (the fault
register, interrupt 0, FAULTED to the VMM, everything held released) while
a well-behaved guest on the same device keeps exchanging traffic; a stalled
receiver is backpressure only; bad registrations are refused with a reason;
a SIGKILLed VMM process, a VMM no member rule admits, and a device unlinked
under a guest are each handled as the design says.
"""

from __future__ import annotations

import asyncio
import errno
import os
import signal
import struct
import subprocess
import sys
import textwrap
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from tests.conftest import Daemon, require
from vbus import kvmabi
from vbus.client import connect
from vbus.errors import NotFound
from vbus.ioq import IoqNorth
from vbus.kvmabi import CallSlot, EventKind, FaultReason, Op
from vbus.kvmsim import BAD_TABLES, BRIDGE_GPA, HOLE, RAM_SIZE, MiB, SimGuest

pytestmark = pytest.mark.integration

TOPOLOGY = """
[devices.echo0]
class = "echo"
[devices.echo1]
class = "echo"
[devices.secret0]
class = "echo"
[buses.default]
members = ["uid:self"]
devices = ["echo0", "echo1"]
[buses.hidden]
members = ["uid:4242"]
devices = ["secret0"]
"""
NOBODY = 65534


def _config(tmp_path: Path, text: str = TOPOLOGY) -> str:
    path = tmp_path / "kvm-topology.toml"
    path.write_text(textwrap.dedent(text))
    return str(path)


def _kvm(daemon: Daemon) -> Path:
    return daemon.run_dir / "kvm.sock"


def _maps_of(daemon: Daemon, name: str) -> int:
    """The daemon's mappings of one simulated guest's RAM (its memfd's name)."""
    with open(f"/proc/{daemon.pid}/maps") as f:
        return sum(1 for line in f if f"/memfd:{name}-ram " in line)


async def _status(daemon: Daemon) -> dict[str, str]:
    async with connect(daemon.socket) as bus:
        return await bus.status()


async def _until(
    check: Callable[[], bool], timeout: float = 20.0, what: str | Callable[[], str] = ""
) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(
                f"not within {timeout} s: {what if isinstance(what, str) else what()}"
            )
        await asyncio.sleep(0.02)


async def _logged(daemon: Daemon, text: str) -> None:
    """Wait for ``text`` in the daemon's log (its lines reach the file on their own time)."""
    await _until(lambda: text in daemon.log(), what=f"{text!r} in the daemon's log")


def _payloads(tag: int, n: int, size: int = 64) -> list[bytes]:
    """``n`` distinct messages: the tag and sequence number, repeated to ``size``."""
    return [struct.pack("<IQI", tag, i, ~i & 0xFFFFFFFF) * (size // 16) for i in range(n)]


class Witness:
    """A well-behaved guest on echo0 that keeps exchanging traffic, every
    echo verified; ``moved`` counts the messages that came back intact."""

    def __init__(self, path: Path, name: str = "witness") -> None:
        self.guest = SimGuest(path, name)
        self.moved = 0
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> Witness:
        await self.guest.register()
        self.guest.boot()
        _handle, self.tx, self.rx = await self.guest.echo_pair()
        self.task = asyncio.ensure_future(self._run())
        await self.progress()
        return self

    async def _run(self) -> None:
        tag = 0
        while True:
            sent = _payloads(tag, 256)
            got = await self.guest.exchange(self.tx, self.rx, sent, timeout=30)
            assert got == sent, f"round {tag}: corrupted or reordered echoes"
            self.moved += len(got)
            tag += 1
            # A timer, not a bare yield: the test's own timers must get their
            # turn even while echoes keep coming (a busy task starves them).
            await asyncio.sleep(0.001)

    async def progress(self, messages: int = 2048, timeout: float = 30.0) -> None:
        """Wait until ``messages`` more came back (the witness did not stop)."""
        target = self.moved + messages
        task = self.task
        assert task is not None

        def moved() -> bool:
            if task.done():
                task.result()  # its assertion or error, if any
                raise AssertionError("the witness stopped")
            return self.moved >= target

        await _until(
            moved, timeout, lambda: f"the witness kept exchanging echo traffic ({self.state()})"
        )

    def state(self) -> str:
        """The witness's rings as it sees them (for a failure message)."""
        parts = []
        for name, ring in (("tx", self.tx), ("rx", self.rx)):
            idx = [*ring._idx[4:12], ring._idx[16], ring._idx[32]]
            parts.append(f"{name} valid={ring.valid} reaped={ring.reaped} header={idx}")
        return "; ".join(parts)

    async def stop(self) -> None:
        task = self.task
        if task is not None:
            task.cancel()
            await asyncio.wait([task], timeout=10)
            assert task.done(), "the witness did not stop"
            if not task.cancelled():
                task.result()  # what broke it, if anything
        self.guest.close()


async def _booted(path: Path, name: str) -> SimGuest:
    guest = SimGuest(path, name)
    await guest.register()
    guest.boot()
    return guest


async def _events(guest: SimGuest) -> list[kvmabi.Event]:
    """The events the host posts next (waits for at least one)."""
    bridge = guest.bridge
    assert bridge is not None
    events: list[kvmabi.Event] = []

    def posted() -> bool:
        events.extend(bridge.events())
        return bool(events)

    await _until(posted, what="an event")
    return events


# --- a guest's traffic and calls ------------------------------------------------------------


async def test_echo_enumerate_call_and_close(vbusd: Callable[..., Daemon], tmp_path: Path) -> None:
    daemon = vbusd("--no-admin", "--config", _config(tmp_path))
    guest = await _booted(_kvm(daemon), "g0")
    try:
        assert guest.registered is not None and guest.registered.bus == "default"
        devices = await guest.enumerate()
        assert sorted((d.name, d.deviceclass) for d in devices) == [
            ("echo0", "echo"),
            ("echo1", "echo"),
        ]
        assert sorted(d.id for d in devices) == [1, 2]  # ids on this bus only
        # A reply buffer too small: EMSGSIZE, with the size needed.
        small = await guest.request(CallSlot(Op.ENUMERATE, reply=0x4000, reply_cap=8))
        assert small.status == -errno.EMSGSIZE
        assert small.reply_len == len(kvmabi.encode_devices(list(devices)))
        # What is on another bus does not exist for this guest, by name or by id.
        for ref in ("secret0", "nope"):
            with pytest.raises(NotFound):
                await guest.open(ref)
        by_id = await guest.request(CallSlot(Op.OPEN, arg=3))
        assert by_id.status == -errno.ENOENT

        handle, tx, rx = await guest.echo_pair("echo0")
        assert await guest.call(handle, 1, b"hello, kvm") == b"hello, kvm"
        # 100000 messages through echo0 and back, every one compared.
        sent = _payloads(7, 100_000)
        got = await guest.exchange(tx, rx, sent, timeout=120)
        assert len(got) == len(sent) and got == sent

        other = await guest.open("echo1")
        assert other != handle
        assert int((await _status(daemon))["connections"]) == 2
        await guest.close_handle(other)
        with pytest.raises(NotFound):
            await guest.call(other, 1, b"gone")
        closed_twice = await guest.request(CallSlot(Op.CLOSE, handle=other))
        assert closed_twice.status == -errno.ENOENT
        assert int((await _status(daemon))["connections"]) == 1
        # The handle that is left still works, and so do its queues.
        assert await guest.call(handle, 1, b"still") == b"still"
        again = _payloads(8, 1000)
        assert await guest.exchange(tx, rx, again) == again
        await guest.close_handle(handle)
        await _until(lambda: _maps_of(daemon, "g0") == 2, what="RAM stays mapped")
        status = await _status(daemon)
        assert int(status["connections"]) == 0
    finally:
        guest.close()
    await _until(lambda: _maps_of(daemon, "g0") == 0, what="RAM unmapped at hang-up")


# --- hostile guests ----------------------------------------------------------------------------


Act = Callable[[SimGuest, IoqNorth | None], Awaitable[None]]


def _poke(guest: SimGuest, gpa: int, value: int) -> None:
    guest.ram[gpa : gpa + 4] = value.to_bytes(4, "little")


async def _bad_op(guest: SimGuest, ring: IoqNorth | None) -> None:
    """A call slot with an op that does not exist."""
    assert guest.bridge is not None
    index = guest.bridge.post(CallSlot(Op.ENUMERATE, reply=0x4000, reply_cap=4096))
    _poke(guest, BRIDGE_GPA + kvmabi.call_slot_offset(index), 99)
    guest.ring(0)


async def _call_in_hole(guest: SimGuest, ring: IoqNorth | None) -> None:
    """CALL data in the hole between the two regions of guest RAM."""
    handle = await guest.open("echo0")
    assert guest.bridge is not None
    guest.bridge.post(CallSlot(Op.CALL, handle=handle, arg=1, addr=HOLE[0], len=64))
    guest.ring(0)


async def _reply_past_end(guest: SimGuest, ring: IoqNorth | None) -> None:
    """An ENUMERATE reply buffer that runs past the end of guest RAM."""
    assert guest.bridge is not None
    guest.bridge.post(CallSlot(Op.ENUMERATE, reply=RAM_SIZE - 16, reply_cap=4096))
    guest.ring(0)


def _outside(addr: int) -> Act:
    async def act(guest: SimGuest, ring: IoqNorth | None) -> None:
        assert ring is not None
        guest.post_outside(ring, addr)

    return act


def _storm(doorbell: int) -> Act:
    async def act(guest: SimGuest, ring: IoqNorth | None) -> None:
        await guest.storm(doorbell, seconds=20)

    return act


def _scribble(at: int) -> Act:
    async def act(guest: SimGuest, ring: IoqNorth | None) -> None:
        guest.scribble_bridge(at=at)

    return act


async def _garbage_call_ring(guest: SimGuest, ring: IoqNorth | None) -> None:
    guest.garbage_call_ring()


async def _event_tail(guest: SimGuest, ring: IoqNorth | None) -> None:
    """``event_tail`` far from anything the host posted."""
    _poke(guest, BRIDGE_GPA + 0x1C, 12345)
    guest.ring(0)


# name -> (the act, whether it needs a registered echo pair (and which ring), reason)
HOSTILE: dict[str, tuple[Act, str, FaultReason]] = {
    "bridge_magic": (_scribble(0x0), "", FaultReason.BRIDGE),
    "bridge_version": (_scribble(0x4), "", FaultReason.BRIDGE),
    "bridge_reserved": (_scribble(0x24), "", FaultReason.BRIDGE),
    "bridge_event_tail": (_event_tail, "", FaultReason.BRIDGE),
    "call_ring_head": (_garbage_call_ring, "", FaultReason.CALL_RING),
    "call_ring_op": (_bad_op, "", FaultReason.CALL_RING),
    "call_data_in_hole": (_call_in_hole, "", FaultReason.ADDRESS),
    "reply_past_end": (_reply_past_end, "", FaultReason.ADDRESS),
    "tx_desc_in_hole": (_outside(HOLE[0] + 0x1000), "tx", FaultReason.ADDRESS),
    "tx_desc_across_regions": (_outside(MiB - 32), "tx", FaultReason.ADDRESS),
    "tx_desc_past_end": (_outside(RAM_SIZE + 0x1000), "tx", FaultReason.ADDRESS),
    "rx_desc_in_hole": (_outside(HOLE[0]), "rx", FaultReason.ADDRESS),
    "storm_bridge_doorbell": (_storm(0), "", FaultReason.DOORBELL_STORM),
    "storm_queue_doorbell": (_storm(1), "tx", FaultReason.DOORBELL_STORM),
}


@pytest.mark.parametrize("name", list(HOSTILE))
async def test_hostile_guest_is_faulted_and_the_witness_goes_on(
    vbusd: Callable[..., Daemon], tmp_path: Path, name: str
) -> None:
    act, needs, reason = HOSTILE[name]
    daemon = vbusd("--no-admin", "--config", _config(tmp_path))
    witness = await Witness(_kvm(daemon)).start()
    bad = SimGuest(_kvm(daemon), "bad")
    try:
        fds, status = daemon.fd_count(), await _status(daemon)
        await bad.register()
        bad.boot()
        ring: IoqNorth | None = None
        if needs:
            # rx: one buffer short, the slot left for the bad one.
            _handle, tx, rx = await bad.echo_pair("echo0", count=16, post=15)
            ring = tx if needs == "tx" else rx
        assert _maps_of(daemon, "bad") == 2
        bad.interrupts(0)  # forget the interrupts of the replies so far
        acting = asyncio.ensure_future(act(bad, ring))
        if needs == "rx":
            # The device reaches the bad buffer after the 15 good ones.
            assert bad.rings[0].send_many(_payloads(2, 16)) == 16
            bad.rings[0].signal.notify(force=True)
        frame = await bad.faulted(timeout=30)
        await acting
        assert frame.reason == reason, frame
        assert frame.message
        assert bad.fault[0] == reason, bad.fault
        assert bad.interrupts(0) >= 1, "interrupt 0 was not raised"
        # Everything held for the guest is released; its VMM's socket stays.
        await _until(lambda: _maps_of(daemon, "bad") == 0, what="the guest's RAM unmapped")
        await _until(lambda: daemon.fd_count() == fds + 1, what="only the VMM socket left")
        after = await _status(daemon)
        figures = ("connections", "clients", "clients_faults")
        seen = {key: (status[key], after[key]) for key in figures}
        assert after["connections"] == status["connections"], seen
        assert after["clients"] == status["clients"], seen  # a faulted guest is no client
        assert int(after["clients_faults"]) == int(status["clients_faults"]) + 1, seen
        await _logged(daemon, f'"reason": "{reason.name}"')
        # Nothing more is served: the call ring is dead.
        bad.bridge.post(CallSlot(Op.ENUMERATE, reply=0x4000, reply_cap=4096))  # type: ignore[union-attr]
        bad.ring(0)
        await witness.progress()
        assert bad.bridge is not None and not bad.bridge.answered()
        bad.close()
        await _until(lambda: daemon.fd_count() == fds, what="the VMM socket closed")
        await witness.progress()
    finally:
        bad.close()
        await witness.stop()
    assert '"level": "error"' not in daemon.log()


async def test_a_broken_ring_faults_that_handle_only(
    vbusd: Callable[..., Daemon], tmp_path: Path
) -> None:
    """An ioq rule broken in one queue: an event FAULT (reason RING) for that
    handle, released; the guest and its other handle go on."""
    daemon = vbusd("--no-admin", "--config", _config(tmp_path))
    witness = await Witness(_kvm(daemon)).start()
    guest = await _booted(_kvm(daemon), "g1")
    try:
        broken, tx, _rx = await guest.echo_pair("echo0")
        handle = await guest.open("echo1")
        tx2 = await guest.shm(handle, 0, writable=False, doorbell=2, irq=1)
        rx2 = await guest.shm(handle, 1, writable=True, doorbell=2, irq=1)
        assert int((await _status(daemon))["connections"]) == 3
        guest.interrupts(0)
        # A descriptor longer than any may be (its buffer inside guest RAM), published.
        slot = tx.valid & (tx.count - 1)
        tx._dq[slot * 4 + 2] = 1 << 30
        tx._publish(1)
        tx.signal.notify(force=True)
        assert guest.bridge is not None
        events = await _events(guest)
        assert events[0] == kvmabi.Event(EventKind.FAULT, broken, FaultReason.RING)
        assert guest.interrupts(0) >= 1
        assert guest.fault == (0, 0)
        with pytest.raises(NotFound):
            await guest.call(broken, 1, b"x")
        assert int((await _status(daemon))["connections"]) == 2
        sent = _payloads(3, 5000)
        assert await guest.exchange(tx2, rx2, sent) == sent
        await witness.progress()
    finally:
        guest.close()
        await witness.stop()


async def test_a_stalled_receiver_is_backpressure_not_a_fault(
    vbusd: Callable[..., Daemon], tmp_path: Path
) -> None:
    """docs/design.md 6: a north that stops servicing its rings stalls itself
    only: echo leaves its tx messages in the ring, nothing is dropped, nobody
    else waits, and its next rx buffers resume it."""
    daemon = vbusd("--no-admin", "--config", _config(tmp_path))
    witness = await Witness(_kvm(daemon)).start()
    guest = await _booted(_kvm(daemon), "stalled")
    try:
        handle, tx, rx = await guest.echo_pair("echo0", count=64)
        sent = _payloads(4, 128)  # the rx ring's worth, and as much again
        assert tx.send_many(sent[:64]) == 64
        tx.signal.notify()
        await _until(lambda: rx.completed() == 64, what="rx filled")
        await _until(lambda: tx.completed() == 64, what="tx taken")
        assert tx.send_many(sent[64:]) == 64
        tx.signal.notify()
        # The device has nowhere to put these: it leaves them in tx, and the
        # witness, on the same device, does not notice.
        await witness.progress()
        await witness.progress()
        assert tx.completed() == 0 and rx.completed() == 64
        assert guest.fault == (0, 0)
        assert not guest.bridge.events()  # type: ignore[union-attr]
        assert await guest.call(handle, 1, b"alive") == b"alive"
        # Service the ring at last: everything comes back, in order.
        got: list[bytes] = []
        deadline = time.monotonic() + 30
        while len(got) < len(sent) and time.monotonic() < deadline:
            got += rx.recv_many(256)
            rx.signal.notify()
            await asyncio.sleep(0.002)
        assert got == sent
        assert int((await _status(daemon))["connections"]) == 2
        assert '"guest.faulted"' not in daemon.log()
    finally:
        guest.close()
        await witness.stop()


# --- registrations --------------------------------------------------------------------------


def _too_many_fds(guest: SimGuest) -> tuple[bytes, list[int]]:
    """A REGISTER that carries more descriptors than a frame may."""
    frame = kvmabi.encode(guest.message(), 1)
    return frame, [guest.doorbells[0]] * (kvmabi.MAX_FDS + 1)


@pytest.mark.parametrize("kind", [*BAD_TABLES, "too_many_fds", "oversized", "after_register"])
async def test_a_bad_registration_is_refused_with_a_reason(
    vbusd: Callable[..., Daemon], tmp_path: Path, kind: str
) -> None:
    daemon = vbusd("--no-admin", "--config", _config(tmp_path))
    witness = await Witness(_kvm(daemon)).start()
    fds = daemon.fd_count()
    bad = SimGuest(_kvm(daemon), f"bad-{kind}")
    try:
        if kind == "too_many_fds":
            reply = await bad.send_register(*_too_many_fds(bad))
            needle = "descriptors"
        elif kind == "oversized":
            reply = await bad.send_register(b"\1\0\0\0" + bytes(kvmabi.MAX_FRAME), [])
            needle = "larger"
        elif kind == "after_register":
            await bad.register()
            reply = await bad.send_register(kvmabi.encode(bad.message(), 2), [])
            needle = "nothing may follow"
        else:
            reply = await bad.register_bad(kind)
            needle = BAD_TABLES[kind]
        assert isinstance(reply, kvmabi.Error), reply
        assert reply.errno > 0 and reply.message
        assert needle.lower() in reply.message.lower(), reply
        await asyncio.wait_for(bad.hung_up.wait(), 10)
        assert _maps_of(daemon, f"bad-{kind}") == 0
    finally:
        bad.close()
    await _until(lambda: daemon.fd_count() == fds, what="descriptors back to the baseline")
    await witness.progress()
    # The daemon still registers a good guest.
    late = await _booted(_kvm(daemon), "late")
    try:
        assert [d.name for d in await late.enumerate()] == ["echo0", "echo1"]
    finally:
        late.close()
        await witness.stop()


# --- a VMM process ------------------------------------------------------------------------------


def _vmm(daemon: Daemon, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "vbus.kvmsim", str(_kvm(daemon)), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


async def test_sigkill_of_a_vmm_releases_everything(
    vbusd: Callable[..., Daemon], tmp_path: Path
) -> None:
    daemon = vbusd("--config", _config(tmp_path))
    # The bus's connections file in the admin tree, where it is mounted (read
    # once before the baseline: the tree's first use may open descriptors).
    table = daemon.admin / "buses" / "default" / "connections"
    admin = daemon.admin_mounted
    if admin:
        assert await asyncio.to_thread(table.read_text) == ""
    await asyncio.sleep(0.2)
    fds, maps = daemon.fd_count(), daemon.memfd_mappings()
    before = await _status(daemon)
    vmm = _vmm(daemon, "--name", "victim")
    try:
        assert vmm.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(vmm.stdout.readline), 30)
        assert line.strip() == "ready", line + vmm.stderr.read()  # type: ignore[union-attr]
        # Streaming: its RAM is mapped, its descriptors are held, its handle counts.
        during = await _status(daemon)
        assert _maps_of(daemon, "victim") == 2
        assert daemon.fd_count() > fds
        assert int(during["connections"]) == int(before["connections"]) + 1
        assert int(during["clients"]) == int(before["clients"]) + 1
        assert int(during["shm_bytes"]) > int(before["shm_bytes"])
        if admin:
            held = await asyncio.to_thread(table.read_text)
            assert "vm=victim" in held and "device=echo0" in held, held
        await asyncio.sleep(0.2)
        vmm.send_signal(signal.SIGKILL)
        await asyncio.to_thread(vmm.wait, 10)
    finally:
        if vmm.poll() is None:
            vmm.kill()
            vmm.wait()
    await _until(lambda: daemon.fd_count() == fds, what="descriptors back to the baseline")
    await _until(lambda: daemon.memfd_mappings() == maps, what="memfd mappings back")
    after = await _status(daemon)
    for key in ("connections", "clients", "shm_bytes", "client_fds", "client_mappings"):
        assert after[key] == before[key], key
    await _logged(daemon, f'"pid": {vmm.pid}, "uid": {os.getuid()}, "vm": "victim"')
    await _logged(daemon, '"guest.closed"')
    if admin:
        assert await asyncio.to_thread(table.read_text) == ""


async def test_a_vmm_no_rule_admits_is_refused_and_sees_nothing(
    vbusd: Callable[..., Daemon], tmp_path: Path
) -> None:
    # Its uid is on no bus at all (the daemon's own is not admitted here).
    daemon = vbusd(
        "--no-admin",
        "--config",
        _config(tmp_path, TOPOLOGY.replace('"uid:self"', '"uid:4343"')),
    )
    guest = SimGuest(_kvm(daemon), "outsider")
    try:
        reply = await guest.send_register(
            kvmabi.encode(guest.message(), 1),
            [guest.ram_fd] * 2 + guest.doorbells + guest.irqs,
        )
        assert isinstance(reply, kvmabi.Error) and reply.errno == errno.EACCES, reply
        assert "not a member" in reply.message
        await asyncio.wait_for(guest.hung_up.wait(), 10)
        # Refused before its memory table is looked at: nothing was mapped.
        assert _maps_of(daemon, "outsider") == 0
    finally:
        guest.close()
    await _logged(daemon, '"reason": "not a member of any bus"')


async def test_a_vmm_of_a_stranger_uid_is_refused(
    vbusd: Callable[..., Daemon], tmp_path: Path
) -> None:
    require(os.geteuid() == 0, "becoming another uid needs root")
    daemon = vbusd("--no-admin", "--config", _config(tmp_path), reachable=True)
    vmm = _vmm(daemon, "--name", "stranger", "--as-uid", str(NOBODY))
    out, err = await asyncio.to_thread(vmm.communicate, timeout=30)
    assert vmm.returncode == 1, out + err
    assert out.startswith(f"refused {errno.EACCES} ") and "not a member" in out, out + err
    assert _maps_of(daemon, "stranger") == 0
    await _logged(daemon, f'"uid": {NOBODY}')
    status = await _status(daemon)
    assert status["connections"] == "0"


# --- the topology changes under a guest --------------------------------------------------------


async def test_a_device_unlinked_under_a_guest_is_revoked(
    vbusd: Callable[..., Daemon], tmp_path: Path
) -> None:
    daemon = vbusd("--config", _config(tmp_path))
    require(daemon.admin_mounted, "the admin tree (FUSE) is not mounted")
    guest = await _booted(_kvm(daemon), "g2")
    try:
        keep, tx, rx = await guest.echo_pair("echo0")
        doomed = await guest.open("echo1")
        tx1 = await guest.shm(doomed, 0, writable=False, doorbell=2, irq=1)
        rx1 = await guest.shm(doomed, 1, writable=True, doorbell=2, irq=1)
        sent = _payloads(5, 1000)
        assert await guest.exchange(tx1, rx1, sent) == sent
        guest.interrupts(0)
        await asyncio.to_thread(os.unlink, daemon.admin / "buses" / "default" / "echo1")
        assert guest.bridge is not None
        events = await _events(guest)
        assert events == [kvmabi.Event(EventKind.DEVICE_REMOVED, doomed, 0)]
        assert guest.interrupts(0) >= 1
        assert guest.fault == (0, 0)
        with pytest.raises(NotFound):
            await guest.call(doomed, 1, b"x")
        assert [d.name for d in await guest.enumerate()] == ["echo0"]
        assert int((await _status(daemon))["connections"]) == 1
        # The device can go now: nothing holds it.
        await asyncio.to_thread(os.rmdir, daemon.admin / "devices" / "echo1")
        more = _payloads(6, 5000)
        assert await guest.exchange(tx, rx, more) == more
        assert await guest.call(keep, 1, b"on") == b"on"
    finally:
        guest.close()


async def test_a_guest_whose_member_rule_goes_is_told_and_released(
    vbusd: Callable[..., Daemon], tmp_path: Path
) -> None:
    daemon = vbusd("--config", _config(tmp_path))
    require(daemon.admin_mounted, "the admin tree (FUSE) is not mounted")
    guest = await _booted(_kvm(daemon), "g3")
    try:
        _handle, tx, rx = await guest.echo_pair("echo0")
        sent = _payloads(9, 1000)
        assert await guest.exchange(tx, rx, sent) == sent
        members = daemon.admin / "buses" / "default" / "members"
        rule = (await asyncio.to_thread(members.read_text)).strip()
        await asyncio.to_thread(members.write_text, f"-{rule}\n")
        events = await _events(guest)
        assert kvmabi.Event(EventKind.BUS_GONE, 0, 0) in events, events
        assert await asyncio.wait_for(guest.hung_up.wait(), 10)
        frames = [guest.frames.get_nowait() for _ in range(guest.frames.qsize())]
        assert any(isinstance(f, kvmabi.Error) and f.errno == errno.EACCES for f in frames), frames
        await _until(lambda: _maps_of(daemon, "g3") == 0, what="the guest's RAM unmapped")
    finally:
        guest.close()


async def test_a_stopping_daemon_tells_its_guests(
    vbusd: Callable[..., Daemon], tmp_path: Path
) -> None:
    daemon = vbusd("--no-admin", "--config", _config(tmp_path))
    guest = await _booted(_kvm(daemon), "g4")
    try:
        await guest.echo_pair("echo0")
        assert await asyncio.to_thread(daemon.stop) == 0
        assert guest.bridge is not None
        assert kvmabi.Event(EventKind.SHUTDOWN, 0, 0) in guest.bridge.events()
        assert await asyncio.wait_for(guest.hung_up.wait(), 10)
        frames = [guest.frames.get_nowait() for _ in range(guest.frames.qsize())]
        assert any(isinstance(f, kvmabi.Error) and f.errno == errno.ESHUTDOWN for f in frames)
    finally:
        guest.close()
