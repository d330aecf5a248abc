"""The kvm connector: KVM guests reach their bus through guest memory,
ioeventfd doorbells and irqfd interrupts (docs/design.md 4.5).

A VMM process connects to ``<run-dir>/kvm.sock`` (AF_UNIX SOCK_SEQPACKET)
and sends one REGISTER (``vbus.kvmabi``): the guest's memory table as sealed
memfds, the doorbell eventfds it bound with KVM_IOEVENTFD, the interrupt
eventfds it bound with KVM_IRQFD, and the guest-physical address of the
bridge page.  The VMM process is the peer (SO_PEERCRED): the guest is a
``Vm`` identity that resolves exactly as its VMM does, and belongs to that
bus.  The guest lives as long as the VMM keeps the socket open.

From then on nothing goes through the VMM.  Doorbell 0 wakes the bridge:
the call ring is read (at most its 16 slots per wake-up, each slot copied
once and validated), ENUMERATE/OPEN/CALL/SHM/CLOSE are answered in place and
interrupt 0 is raised when the guest asked for it.  A queue is an ioq ring
in guest RAM, addressed by guest-physical address through the guest's
``GuestMemory``; its doorbell wakes the handle's NAPI poller and its
interrupt is the ring's s->n transport.  What happens to handles, queues,
faults and resources is the attachment core's (``vbus.connectors.base``).

Faults (``kvmabi.FaultReason``): garbage in the bridge page or its call
ring, an address outside guest RAM (bridge data or a queue's descriptors)
and a doorbell storm fault the whole guest: the fault register is set,
interrupt 0 raised, FAULTED sent to the VMM and everything vbusd held for
the guest released (the socket stays open until the VMM hangs up).  An ioq
rule broken in one queue, or a device bug, faults that handle only: an
event FAULT is posted with the reason.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import errno
import os
import socket
import struct
import time
from pathlib import Path
from typing import Any

from vbus import kvmabi
from vbus.connectors.base import Attachment, Limits, North, NorthCore
from vbus.core.members import NOT_A_MEMBER, Peer, Vm
from vbus.core.model import RevokeKind, Topology
from vbus.core.resources import Account, Ledger
from vbus.errors import (
    Busy,
    Denied,
    Fault,
    Invalid,
    ProtocolError,
    TooBig,
    TooManyFiles,
    VbusError,
)
from vbus.ioq import IoqSouth
from vbus.kvmabi import CallSlot, Event, EventKind, FaultReason, GuestFault, Op
from vbus.log import get_logger
from vbus.memory import GuestMemory
from vbus.mitigation import EMPTY_WAKEUPS
from vbus.procfs import ProcTasks
from vbus.signal import SharedEventfd

__all__ = ["STORM_MIN_RINGS", "STORM_RATIO", "STORM_WINDOW", "KvmConnector", "reason_of"]

log = get_logger("vbus.kvm")

_MSG_TRUNC = int(socket.MSG_TRUNC)
_MSG_CTRUNC = int(socket.MSG_CTRUNC)
_MSG_DONTWAIT = int(socket.MSG_DONTWAIT)
_FD_ROOM = kvmabi.MAX_FDS + 1  # one more than a frame may carry, so excess is seen
_CMSG_SPACE = socket.CMSG_SPACE(_FD_ROOM * array.array("i").itemsize)
_PEERCRED = struct.Struct("3i")
_M32 = 0xFFFFFFFF
_VALID = 64  # byte offset of an ioq ring's ``valid`` index

# A doorbell storm: over a window of STORM_WINDOW seconds, at least
# STORM_MIN_RINGS rings and more than STORM_RATIO rings per unit of work the
# guest announced through that doorbell (call slots for doorbell 0, ring
# descriptors posted for a queue's).  An honest driver rings at most once
# per batch it posts; an idle guest polling by doorbell at 1 kHz stays below.
STORM_WINDOW = 1.0
STORM_MIN_RINGS = 4096
STORM_RATIO = 16

_EVENT_KINDS = {"device_removed": EventKind.DEVICE_REMOVED, "bus_gone": EventKind.BUS_GONE}


def reason_of(message: str) -> FaultReason:
    """The fault reason of a fault the attachment core reports by its text:
    an address outside guest RAM, a doorbell readable without progress, an
    eventfd the VMM made unusable, a device bug, or else an ioq rule."""
    if "guest memory" in message:
        return FaultReason.ADDRESS
    if "kick descriptor readable" in message:
        return FaultReason.DOORBELL_STORM
    if "eventfd" in message:
        return FaultReason.RESOURCES
    if "the device failed" in message:
        return FaultReason.DEVICE
    return FaultReason.RING


class _Watch:
    """A queue that a doorbell announces: where its ``valid`` index is, and
    its value at the start of the storm window."""

    __slots__ = ("attachment", "gpa", "mark")

    def __init__(self, attachment: Attachment, gpa: int, mark: int) -> None:
        self.attachment = attachment
        self.gpa = gpa
        self.mark = mark


class _Doorbell(SharedEventfd):
    """A doorbell eventfd (KVM_IOEVENTFD): every drain counts the guest's
    rings for the storm check."""

    __slots__ = ("guest", "index", "mark", "rings", "since", "watches")

    def __init__(self, fd: int, role: str = "doorbell") -> None:
        super().__init__(fd, role)
        self.guest: _Guest | None = None
        self.index = 0
        self.rings = 0  # rings counted in this window
        self.since = 0.0  # start of the window
        self.mark = 0  # doorbell 0: call_head at the start of the window
        self.watches: list[_Watch] = []

    def drain(self) -> int:
        n = super().drain()
        if n and self.guest is not None:
            self.rings += n
            self.guest.rang(self)
        return n


class _Guest:
    """One VMM connection and, once registered, its guest.  Also the core's
    ``Hooks``: faults and revocations become events, the fault register and
    interrupt 0."""

    def __init__(
        self, connector: KvmConnector, sock: socket.socket, cred: Peer, account: Account
    ) -> None:
        self.connector = connector
        self.loop = connector.loop
        self.sock = sock
        self.fd = sock.fileno()
        self.cred = cred
        self.account = account  # the socket's descriptor (until the VMM hangs up)
        self.id = connector._next_id()
        self.state = "pending"  # pending -> running -> faulted; closed at hang-up
        self.since = time.time()
        self.name = ""
        self.log = log.bind(guest=self.id, pid=cred.pid, uid=cred.uid)
        self.north: North | None = None
        self.memory: GuestMemory | None = None
        self.bridge: kvmabi.HostBridge | None = None
        self.doorbells: list[_Doorbell] = []
        self.irqs: list[SharedEventfd] = []
        self.owners: dict[int, Attachment] = {}  # doorbell -> the handle whose queues it wakes
        self.deadline: asyncio.TimerHandle | None = None
        self.waiting = False  # an asynchronous CALL holds the call ring
        self.scheduled = False
        self.empty = 0  # doorbell 0 wake-ups in a row with nothing to read
        self.events_dropped = 0
        self.fault_reason = 0

    # --- registration ------------------------------------------------------------------
    def register(self, msg: kvmabi.Register, fds: list[int]) -> kvmabi.Registered:
        """Admit, validate and map; every refusal raises (the caller answers
        ERROR and hangs up).  Descriptors taken are set to -1 in ``fds``."""
        regions, _doorbells, _irqs = kvmabi.split_fds(msg, fds)
        self.name = msg.name
        try:
            identity = Vm(self.cred, msg.name)
        except Invalid as exc:
            raise ProtocolError(exc.message) from None
        north = self.connector.core.north(identity, self, self.log)
        self.north = north
        member = north.join()
        if member is None:  # before anything of its table is looked at
            raise Denied(NOT_A_MEMBER)
        self.log = north.log = self.log.bind(vm=msg.name, bus=member.bus.name)
        kvmabi.check_layout(msg)
        account = north.account
        nregions = len(msg.regions)
        # Each mapping keeps a duplicate of its memfd (mmap.mmap, 3.1); the
        # doorbells and interrupts are kept as they came.
        account.take(fds=nregions + msg.ndoorbells + msg.nirqs, maps=nregions)
        table = [
            (fd, r.gpa, r.size, r.offset, r.readonly)
            for fd, r in zip(regions, msg.regions, strict=True)
        ]
        try:
            self.memory = GuestMemory.from_memfds(
                table,
                max_regions=kvmabi.MAX_REGIONS,
                admit=lambda total: account.take(shm=total),
            )
            start = len(regions)
            now = self.loop.time()
            for i in range(msg.ndoorbells):
                door = _Doorbell.adopt(fds[start + i], f"doorbell {i}", read=True)
                fds[start + i] = -1
                assert isinstance(door, _Doorbell)
                door.guest, door.index, door.since = self, i, now
                self.doorbells.append(door)
            start += msg.ndoorbells
            for i in range(msg.nirqs):
                self.irqs.append(SharedEventfd.adopt(fds[start + i], f"interrupt {i}", read=False))
                fds[start + i] = -1
        except OSError as exc:
            raise Invalid(f"cannot register the guest: {exc.strerror}") from None
        buf, at = self.memory.translate(msg.bridge_gpa, kvmabi.BRIDGE_SIZE, write=True)
        self.bridge = kvmabi.HostBridge(buf, at)
        self.state = "running"
        self.loop.add_reader(self.doorbells[0].fd, self._bridge_rang)
        self.log.info(
            "guest.registered",
            regions=nregions,
            ram=self.memory.mapped,
            doorbells=msg.ndoorbells,
            irqs=msg.nirqs,
            bridge=hex(msg.bridge_gpa),
        )
        return kvmabi.Registered(self.id, member.bus.name)

    # --- the call ring -----------------------------------------------------------------
    def _bridge_rang(self) -> None:
        door = self.doorbells[0]
        try:
            if not door.drain():
                self.empty += 1
                if self.empty >= EMPTY_WAKEUPS:
                    raise GuestFault(
                        FaultReason.DOORBELL_STORM,
                        0,
                        f"doorbell 0 readable {self.empty} times in a row with nothing to read",
                    )
                return
        except GuestFault as exc:
            self.fault(exc.reason, exc.detail, exc.message)
            return
        except Fault as exc:
            self.fault(FaultReason.RESOURCES, 0, exc.message)
            return
        self.empty = 0
        self.service()

    def schedule(self) -> None:
        if not self.scheduled:
            self.scheduled = True
            self.loop.call_soon(self.service)

    def service(self) -> None:
        """Answer the call slots that wait, in order, at most 16 per turn."""
        self.scheduled = False
        if self.state != "running" or self.waiting:
            return
        bridge = self.bridge
        assert bridge is not None
        answered = 0
        try:
            for _ in range(kvmabi.CALL_SLOTS):
                slot = bridge.next()
                if slot is None:
                    break
                done = self._do(slot)
                if self.state != "running":
                    return  # the guest was faulted on the way
                if done is None:  # answered later: the ring waits for it
                    self.waiting = True
                    break
                bridge.answer(done)
                answered += 1
            else:
                self.schedule()  # more may be waiting: next loop iteration
        except GuestFault as exc:
            self.fault(exc.reason, exc.detail, exc.message)
            return
        if answered:
            self.interrupt()

    def _do(self, slot: CallSlot) -> CallSlot | None:
        """One call slot's answer (None: a CALL answered later)."""
        north = self.north
        assert north is not None
        try:
            if slot.op == Op.ENUMERATE:
                return self._enumerate(slot)
            if slot.op == Op.OPEN:
                return self._open(slot)
            if slot.op == Op.CALL:
                return self._call(slot)
            if slot.op == Op.SHM:
                return self._shm(slot)
            north.close(slot.handle, "closed by the guest")
            return slot.answer(0)
        except GuestFault:
            raise
        except VbusError as exc:
            return slot.answer(-exc.errno)

    def _read(self, slot: CallSlot, addr: int, length: int) -> bytes:
        assert self.memory is not None
        try:
            return self.memory.read(addr, length)
        except Fault as exc:
            raise GuestFault(
                FaultReason.ADDRESS, self.bridge.tail if self.bridge else 0, exc.message
            ) from None

    def _reply(self, slot: CallSlot, data: bytes) -> CallSlot:
        """Write ``data`` into the slot's reply buffer, or say how much is needed."""
        if len(data) > slot.reply_cap:
            return slot.answer(-errno.EMSGSIZE, reply_len=len(data))
        if data:
            assert self.memory is not None
            try:
                self.memory.write(slot.reply, data)
            except Fault as exc:
                raise GuestFault(
                    FaultReason.ADDRESS, self.bridge.tail if self.bridge else 0, exc.message
                ) from None
        return slot.answer(0, reply_len=len(data))

    def _enumerate(self, slot: CallSlot) -> CallSlot:
        assert self.north is not None
        bus = self.north.bus
        entries = [
            kvmabi.DeviceEntry(bus.id_of(dev), dev.name, dev.deviceclass or "")
            for dev in self.connector.topology.devices_on(bus)
        ]
        return self._reply(slot, kvmabi.encode_devices(entries))

    def _open(self, slot: CallSlot) -> CallSlot:
        assert self.north is not None
        ref: str | int = slot.arg
        if not slot.arg:
            raw = self._read(slot, slot.addr, slot.len)
            try:
                ref = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise Invalid("the device name is not UTF-8") from None
            if not ref:
                raise Invalid("OPEN needs a device id or a name")
        bus = self.north.bus
        attachment = self.north.open(ref)
        return slot.answer(0, handle=attachment.id, arg=bus.id_of(attachment.conn.device))

    def _call(self, slot: CallSlot) -> CallSlot | None:
        assert self.north is not None
        attachment = self.north.handle(slot.handle)
        data = self._read(slot, slot.addr, slot.len)
        result = attachment.call(slot.arg, data, lambda done: self._answered(slot, done))
        return None if result is None else self._reply(slot, result)

    def _answered(self, slot: CallSlot, result: bytes | VbusError) -> None:
        """An asynchronous CALL is done: answer its slot, go on with the ring."""
        self.waiting = False
        if self.state != "running":
            return
        assert self.bridge is not None
        try:
            if isinstance(result, VbusError):
                done = slot.answer(-result.errno)
            else:
                done = self._reply(slot, result)
            self.bridge.answer(done)
        except GuestFault as exc:
            self.fault(exc.reason, exc.detail, exc.message)
            return
        self.interrupt()
        self.schedule()

    def _shm(self, slot: CallSlot) -> CallSlot:
        north = self.north
        memory = self.memory
        assert north is not None and memory is not None
        attachment = north.handle(slot.handle)
        if not 1 <= slot.doorbell < len(self.doorbells):
            raise Invalid(f"doorbell {slot.doorbell} is not one of 1..{len(self.doorbells) - 1}")
        if not 1 <= slot.irq < len(self.irqs):
            raise Invalid(f"interrupt {slot.irq} is not one of 1..{len(self.irqs) - 1}")
        door = self.doorbells[slot.doorbell]
        owner = self.owners.get(slot.doorbell)
        if owner is not None and owner.closed:
            owner = None
        if owner is not None and owner is not attachment:
            raise Busy(f"doorbell {slot.doorbell} wakes the queues of handle {owner.id}")
        writable = bool(slot.flags & kvmabi.SHM_WRITABLE)
        mitigate = not slot.flags & kvmabi.SHM_NO_MITIGATION
        try:
            queue = IoqSouth(
                memory,
                slot.addr,
                slot.len,
                self.irqs[slot.irq],
                writable=writable,
                mitigate=mitigate,
            )
        except Fault as exc:
            if reason_of(exc.message) == FaultReason.ADDRESS:
                raise GuestFault(FaultReason.ADDRESS, attachment.id, exc.message) from None
            # A ring broken from the start: refused, and the handle faulted.
            attachment.fault(exc.message)
            return slot.answer(-exc.errno)
        mark = int.from_bytes(memory.read(slot.addr + _VALID, 4), "little")
        attachment.add_queue(
            slot.arg,
            queue,
            door if owner is None else None,  # one reader per doorbell
            (),  # the doorbell and interrupt are the guest's, closed with it
            budget=None if mitigate else 1,
        )
        self.owners[slot.doorbell] = attachment
        door.watches = [w for w in door.watches if not w.attachment.closed]
        door.watches.append(_Watch(attachment, slot.addr, mark))
        self.log.info(
            "queue.registered",
            handle=attachment.id,
            index=slot.arg,
            count=slot.len,
            writable=writable,
            doorbell=slot.doorbell,
            irq=slot.irq,
        )
        return slot.answer(0)

    # --- signalling the guest ------------------------------------------------------------
    def interrupt(self, force: bool = False) -> None:
        """Raise interrupt 0 if the guest asked for it (always with ``force``)."""
        if not self.irqs or self.bridge is None:
            return
        if force or self.bridge.irq_enabled:
            try:
                self.irqs[0].kick()
            except Fault as exc:
                if not force:
                    self.fault(FaultReason.RESOURCES, 0, exc.message)

    def event(self, kind: EventKind, handle: int, reason: int = 0) -> None:
        """Post an event (dropped, and counted, while the guest leaves all 32 unread)."""
        bridge = self.bridge
        if self.state != "running" or bridge is None or not bridge.seen:
            return
        try:
            posted = bridge.post_event(Event(kind, handle, reason))
        except GuestFault as exc:
            self.fault(exc.reason, exc.detail, exc.message)
            return
        if not posted:
            self.events_dropped += 1
            self.log.info("guest.event_dropped", kind=kind.name, handle=handle)
        self.interrupt()

    def rang(self, door: _Doorbell) -> None:
        """A doorbell was drained: at the end of each window, compare its rings
        with the work announced through it."""
        now = self.loop.time()
        if now - door.since < STORM_WINDOW or self.state != "running":
            return
        rings, door.rings, door.since = door.rings, 0, now
        announced = self._announced(door)
        if rings >= STORM_MIN_RINGS and rings > STORM_RATIO * (announced + 1):
            message = (
                f"doorbell storm: doorbell {door.index} rang {rings} times in "
                f"{STORM_WINDOW:g} s for {announced} units of work"
            )
            # Not from inside the drain: the poller that drains it is released by the fault.
            self.loop.call_soon(self.fault, FaultReason.DOORBELL_STORM, door.index, message)

    def _announced(self, door: _Doorbell) -> int:
        if door.index == 0:
            assert self.bridge is not None
            head = self.bridge.call_head
            work, door.mark = (head - door.mark) & _M32, head
            return work
        assert self.memory is not None
        work = 0
        door.watches = [w for w in door.watches if not w.attachment.closed]
        for watch in door.watches:
            try:
                valid = int.from_bytes(self.memory.read(watch.gpa + _VALID, 4), "little")
            except Fault:
                continue
            work += (valid - watch.mark) & _M32
            watch.mark = valid
        return work

    # --- the core's hooks ----------------------------------------------------------------
    def faulted(self, handle: int, reason: str) -> None:
        code = reason_of(reason)
        if code in kvmabi.WHOLE_GUEST:
            self.fault(code, handle, reason, counted=True)
        else:
            self.event(EventKind.FAULT, handle, code)

    def revoked(self, handle: int, kind: RevokeKind, reason: str) -> None:
        self.event(_EVENT_KINDS.get(kind, EventKind.DEVICE_REMOVED), handle)

    def expelled(self, reason: str) -> None:
        self.event(EventKind.BUS_GONE, 0)
        self.connector._drop(self, reason, level="info", code=errno.EACCES)

    # --- faults and teardown -----------------------------------------------------------
    def fault(
        self, reason: FaultReason, detail: int, message: str, *, counted: bool = False
    ) -> None:
        """The whole guest broke the ABI: fault register, interrupt 0, FAULTED,
        release everything (the socket stays until the VMM hangs up).
        ``counted``: the core already counted it (a handle's fault that is
        the whole guest's), so one bad act is one fault in ``status``."""
        if self.state != "running":
            return
        self.state = "faulted"
        self.fault_reason = int(reason)
        if not counted:
            self.connector.counters["faults"] += 1
        self.log.warning("guest.faulted", reason=reason.name, detail=detail, message=message)
        if self.bridge is not None:
            self.bridge.set_fault(reason, detail)
        self.interrupt(force=True)
        self.connector._send(self, kvmabi.Faulted(reason, detail & _M32, kvmabi.clip(message)))
        self.release(f"faulted: {message}")

    def release(self, reason: str) -> None:
        """Give back everything held for the guest (not the socket).  Idempotent."""
        if self.doorbells and self.state in ("running", "faulted"):
            with contextlib.suppress(ValueError, OSError):
                self.loop.remove_reader(self.doorbells[0].fd)
        if self.north is not None:
            self.north.release(reason)
        if self.bridge is not None:
            self.bridge.close()
            self.bridge = None
        if self.memory is not None:
            self.memory.close()
            self.memory = None
        for transport in [*self.doorbells, *self.irqs]:
            transport.close()
        self.doorbells.clear()
        self.irqs.clear()
        self.owners.clear()

    def describe(self) -> dict[str, Any]:
        info = {
            "guest": self.id,
            "vm": self.name,
            "pid": self.cred.pid,
            "uid": self.cred.uid,
            "state": self.state,
            "fault": self.fault_reason,
            "events_dropped": self.events_dropped,
            "since": self.since,
        }
        if self.north is not None:
            info.update(self.north.describe())
        return info


class KvmConnector:
    """Serves ``kvm.sock``.  ``start()`` binds and listens, ``stop()`` tells
    every guest (event SHUTDOWN) and releases everything."""

    name = "kvm"

    def __init__(
        self,
        topology: Topology,
        socket_path: Path,
        loop: asyncio.AbstractEventLoop,
        limits: Limits | None = None,
        tasks: ProcTasks | None = None,
        ledger: Ledger | None = None,
    ) -> None:
        self.topology = topology
        self.path = socket_path
        self.loop = loop
        self.limits = limits or Limits()
        self.tasks = tasks or ProcTasks()
        self.core = NorthCore(self.name, topology, loop, ledger, self.limits)
        self.counters = self.core.counters
        self.guests: dict[int, _Guest] = {}  # by socket fd
        self._listener: socket.socket | None = None
        self._per_uid: dict[int, int] = {}
        self._ids = 0
        self._accept_paused = False

    def _next_id(self) -> int:
        self._ids += 1
        return self._ids

    # --- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            sock.bind(str(self.path))
            os.chmod(self.path, 0o666)  # admittance is decided by member rules, not modes
            sock.listen(64)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self._listener = sock
        self.loop.add_reader(sock.fileno(), self._accept)
        log.info("kvm.listening", socket=str(self.path))

    def stop(self, reason: str = "daemon stopping") -> None:
        if self._listener is not None:
            if not self._accept_paused:
                self.loop.remove_reader(self._listener.fileno())
            self._listener.close()
            self._listener = None
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        for guest in list(self.guests.values()):
            guest.event(EventKind.SHUTDOWN, 0)
            self._drop(guest, reason, level="info", code=errno.ESHUTDOWN)

    def clients(self) -> int:
        """Guests registered and running."""
        return sum(1 for guest in self.guests.values() if guest.state == "running")

    def describe(self) -> list[dict[str, Any]]:
        return [guest.describe() for guest in self.guests.values()]

    def queue_totals(self) -> dict[str, int]:
        return self.core.queue_totals()

    # --- accepting -------------------------------------------------------------------------
    def _accept(self) -> None:
        listener = self._listener
        assert listener is not None
        for _ in range(64):
            try:
                sock, _addr = listener.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.warning("kvm.accept_paused", reason=exc.strerror)
                    self.loop.remove_reader(listener.fileno())
                    self._accept_paused = True
                    self.loop.call_later(0.1, self._resume_accept)
                    return
                log.warning("kvm.accept_failed", reason=exc.strerror)
                return
            self._admit(sock)

    def _resume_accept(self) -> None:
        if self._listener is not None and self._accept_paused:
            self._accept_paused = False
            self.loop.add_reader(self._listener.fileno(), self._accept)

    def _admit(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        pid, uid, gid = _PEERCRED.unpack(
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
        )
        cred = Peer(pid=pid, uid=uid, gid=gid, starttime=self.tasks.starttime(pid))
        if self._per_uid.get(uid, 0) >= self.limits.max_connections_per_uid:
            self._refuse(sock, cred, errno.EAGAIN, f"too many VMM connections for uid {uid}")
            return
        account = self.core.ledger.account(uid)
        try:
            account.take(fds=1)  # its socket
        except VbusError as exc:
            self._refuse(sock, cred, exc.errno, exc.message)
            return
        guest = _Guest(self, sock, cred, account)
        self.guests[guest.fd] = guest
        self._per_uid[uid] = self._per_uid.get(uid, 0) + 1
        guest.deadline = self.loop.call_later(self.limits.handshake_timeout, self._deadline, guest)
        self.counters["accepted"] += 1
        self.loop.add_reader(guest.fd, self._readable, guest)
        guest.log.debug("vmm.accepted")

    def _refuse(self, sock: socket.socket, cred: Peer, code: int, reason: str) -> None:
        self.counters["refused"] += 1
        log.warning("vmm.refused", pid=cred.pid, uid=cred.uid, reason=reason)
        with contextlib.suppress(OSError):
            sock.send(kvmabi.encode(kvmabi.Error(code, kvmabi.clip(reason))), _MSG_DONTWAIT)
        sock.close()

    def _deadline(self, guest: _Guest) -> None:
        guest.deadline = None
        if guest.state == "pending":
            self._drop(guest, "no REGISTER within the handshake timeout", code=errno.ETIMEDOUT)

    # --- receiving -----------------------------------------------------------------------
    def _readable(self, guest: _Guest) -> None:
        if guest.state == "closed":
            return
        try:
            data, ancdata, flags, _ = guest.sock.recvmsg(kvmabi.MAX_FRAME, _CMSG_SPACE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._drop(guest, f"receive failed: {exc.strerror}", level="info")
            return
        fds = _take_fds(ancdata) if ancdata else []
        try:
            if not data and not fds:
                self._drop(guest, "the VMM hung up", level="info")
                return
            if guest.state != "pending":
                raise ProtocolError("nothing may follow REGISTER on a VMM connection")
            if flags & _MSG_TRUNC:
                raise TooBig(f"message larger than {kvmabi.MAX_FRAME} bytes")
            if flags & _MSG_CTRUNC and len(fds) < _FD_ROOM:
                raise TooManyFiles("the daemon is short of file descriptors; try again later")
            if flags & _MSG_CTRUNC or len(fds) > kvmabi.MAX_FDS:
                raise ProtocolError(f"more than {kvmabi.MAX_FDS} descriptors in one message")
            seq, msg = kvmabi.decode_request(data, len(fds))
            self._register(guest, seq, msg, fds)
        except VbusError as exc:
            # Every refusal of a REGISTER, and anything after it, is the last word.
            self._send(guest, kvmabi.Error(exc.errno, kvmabi.clip(exc.message)), seq=_seq(data))
            denied = isinstance(exc, Denied)  # counted by North.join
            if guest.state == "pending" and not denied:
                self.counters["refused"] += 1
            self._drop(guest, exc.message, level="info" if denied else "warning")
        finally:
            for fd in fds:
                if fd >= 0:
                    os.close(fd)

    def _register(self, guest: _Guest, seq: int, msg: kvmabi.Register, fds: list[int]) -> None:
        if guest.deadline is not None:
            guest.deadline.cancel()
            guest.deadline = None
        reply = guest.register(msg, fds)
        self._send(guest, reply, seq=seq)

    def _send(self, guest: _Guest, msg: kvmabi.Message, seq: int = 0) -> None:
        """One frame to the VMM, never waiting: a VMM that does not read its
        socket misses it (every frame here is a last word or an answer)."""
        if guest.state == "closed":
            return
        try:
            guest.sock.send(kvmabi.encode(msg, seq), _MSG_DONTWAIT)
        except OSError as exc:
            guest.log.info("vmm.send_failed", reason=exc.strerror)

    # --- teardown ---------------------------------------------------------------------------
    def _drop(
        self, guest: _Guest, reason: str, level: str = "warning", code: int | None = None
    ) -> None:
        """Hang up on the VMM and release everything held for its guest."""
        if guest.state == "closed":
            return
        if code is not None and guest.state == "running":
            self._send(guest, kvmabi.Error(code, kvmabi.clip(reason)))
        if guest.deadline is not None:
            guest.deadline.cancel()
            guest.deadline = None
        guest.release(reason)
        guest.state = "closed"
        uid = guest.cred.uid
        self._per_uid[uid] -= 1
        if not self._per_uid[uid]:
            del self._per_uid[uid]
        self.loop.remove_reader(guest.fd)
        self.guests.pop(guest.fd, None)
        guest.account.close()
        if level == "warning":
            self.counters["dropped"] += 1
        getattr(guest.log, level)("guest.closed", reason=reason)
        guest.sock.close()


def _seq(frame: bytes) -> int:
    return kvmabi.peek_seq(frame)


def _take_fds(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(payload) - len(payload) % 4
            fds.extend(array.array("i", payload[:usable]))
    return fds
