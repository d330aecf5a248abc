"""The userspace connector: processes reach their bus over a Unix socket.

``<run-dir>/vbus.sock`` is an AF_UNIX SOCK_SEQPACKET socket.  A peer is
identified by SO_PEERCRED and admitted only if a member rule of some bus
matches it; it then speaks the wire protocol of ``vbus.protocol``.  Shared
memory arrives as sealed memfds with SCM_RIGHTS, signals as eventfds.

Everything a peer sends is untrusted and bounded: one frame per datagram of at
most ``MAX_FRAME`` bytes, at most ``MAX_FDS`` descriptors (the rest are closed),
a bounded number of frames handled per loop callback, a bounded outbound queue
(a peer that does not read its replies is disconnected), a handshake deadline,
and caps on connections per uid.  A peer that breaks the socket protocol is
disconnected; one that breaks a ring faults that device connection only.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import errno
import inspect
import os
import socket
import struct
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vbus import protocol
from vbus.core.members import Peer
from vbus.core.model import Bus, Connection, Member, Topology
from vbus.core.resources import Account, Ledger
from vbus.errors import (
    Busy,
    Denied,
    Fault,
    Invalid,
    NotFound,
    ProtocolError,
    TooBig,
    TooManyFiles,
    VbusError,
)
from vbus.ioq import IoqSouth
from vbus.log import get_logger
from vbus.memory import MemfdRegion
from vbus.mitigation import NapiPoller, PollGroup
from vbus.procfs import ProcTasks
from vbus.signal import SharedEventfd

__all__ = ["Limits", "UserspaceConnector"]

log = get_logger("vbus.userspace")

_MSG_TRUNC = int(socket.MSG_TRUNC)  # plain ints: IntFlag arithmetic is slow
_MSG_CTRUNC = int(socket.MSG_CTRUNC)
MAX_FDS = 8  # ancillary space: more than any message takes, so excess is detected
_CMSG_SPACE = socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)
_PEERCRED = struct.Struct("3i")
_EVENT_KINDS = {
    "device_removed": protocol.EventKind.DEVICE_REMOVED,
    "bus_gone": protocol.EventKind.BUS_GONE,
    "fault": protocol.EventKind.FAULT,
}


@dataclass(slots=True)
class Limits:
    """Bounds on what one peer may hold or do.  Defaults are generous."""

    handshake_timeout: float = 5.0
    max_connections_per_uid: int = 1024
    # Connections per uid that have not said HELLO yet.  Past this the oldest
    # is evicted, not the newcomer: idle sockets cannot lock a prompt client out.
    max_pending_per_uid: int = 256
    max_handles: int = 256  # open devices per peer
    max_queues: int = 64  # registered queues per peer
    frames_per_wakeup: int = 1  # per loop iteration: peers take turns frame by frame
    max_outbound: int = 512  # queued frames before a non-reading peer is dropped
    # ... and queued bytes: 512 frames of up to 64 KiB would let one peer pin 32 MiB.
    max_outbound_bytes: int = 1 << 20
    max_inflight_calls: int = 64  # asynchronous call()s in progress per peer
    max_region: int = 1 << 30  # bytes per registered memfd


_QUEUE_FDS = 2  # a queue keeps its kick and call eventfds (the memfd is closed once mapped)


class _Handle:
    """One open device of a peer: the core Connection plus what its queues hold."""

    __slots__ = ("account", "conn", "id", "poller", "queues", "resources", "shm")

    def __init__(self, handle_id: int, conn: Connection, account: Account) -> None:
        self.id = handle_id
        self.conn = conn
        self.account = account
        self.poller: NapiPoller | None = None
        self.queues: dict[int, IoqSouth] = {}
        self.resources: list[Any] = []  # regions and transports to close
        self.shm = 0  # bytes of the regions behind its queues

    def release(self, totals: dict[str, int]) -> None:
        """Close everything, give its resources back to the peer's account, and
        add its counters to ``totals`` (the connector's)."""
        self.account.give(shm=self.shm, fds=_QUEUE_FDS * len(self.queues), maps=len(self.queues))
        self.shm = 0
        if self.poller is not None:
            totals["wakeups"] += self.poller.stats.wakeups
            totals["polls"] += self.poller.stats.polls
            self.poller.close()
            self.poller = None
        for queue in self.queues.values():
            _add_queue_stats(totals, queue)
            queue.close()
        self.queues.clear()
        for resource in self.resources:
            resource.close()
        self.resources.clear()


class _Peer:
    """One connected process: its socket, its bus, its open handles."""

    def __init__(
        self, connector: UserspaceConnector, sock: socket.socket, cred: Peer, account: Account
    ) -> None:
        self.connector = connector
        self.sock = sock
        self.fd = sock.fileno()
        self.cred = cred
        self.account = account
        self.id = connector._next_peer_id()
        self.session = protocol.ServerSession()
        self.bus: Bus | None = None
        self.member: Member | None = None
        self.handles: dict[int, _Handle] = {}
        self.queue_count = 0
        self.outbound: deque[bytes] = deque()
        self.outbound_bytes = 0
        self.writing = False
        self.closed = False
        self.inflight_calls = 0
        self.pending = True  # accepted, no HELLO yet
        self.since = time.time()
        self.log = log.bind(peer=self.id, pid=cred.pid, uid=cred.uid)
        self._handle_ids = 0
        self.deadline: asyncio.TimerHandle | None = None

    # --- outbound ------------------------------------------------------------
    def send(self, frame: bytes) -> None:
        if self.closed:
            return
        if not self.outbound:
            try:
                self.sock.send(frame)
                return
            except BlockingIOError:
                pass
            except OSError as exc:
                self.connector._drop(self, f"send failed: {exc.strerror}")
                return
        limits = self.connector.limits
        if (
            len(self.outbound) >= limits.max_outbound
            or self.outbound_bytes + len(frame) > limits.max_outbound_bytes
        ):
            self.connector._drop(self, "peer does not read its replies (outbound queue full)")
            return
        self.outbound.append(frame)
        self.outbound_bytes += len(frame)
        if not self.writing:
            self.writing = True
            self.connector.loop.add_writer(self.fd, self._flush)

    def _flush(self) -> None:
        while self.outbound:
            try:
                self.sock.send(self.outbound[0])
            except BlockingIOError:
                return
            except OSError as exc:
                self.connector._drop(self, f"send failed: {exc.strerror}")
                return
            self.outbound_bytes -= len(self.outbound.popleft())
        self.writing = False
        self.connector.loop.remove_writer(self.fd)

    def reply(self, seq: int, msg: protocol.Message) -> None:
        self.send(protocol.encode(msg, seq))

    def error(self, seq: int, exc: VbusError) -> None:
        self.send(protocol.encode(protocol.error_reply(exc), seq))

    def event(self, kind: protocol.EventKind, handle: int, reason: str) -> None:
        self.send(protocol.encode(protocol.Event(kind, handle, protocol.clip(reason)), 0))

    def new_handle_id(self) -> int:
        self._handle_ids += 1
        return self._handle_ids


class UserspaceConnector:
    """Serves the Unix socket.  ``start()`` binds and listens, ``stop()`` tells
    every peer and releases everything."""

    name = "userspace"

    def __init__(
        self,
        topology: Topology,
        socket_path: Path,
        loop: asyncio.AbstractEventLoop,
        limits: Limits | None = None,
        tasks: ProcTasks | None = None,
        status: Callable[[], dict[str, Any]] | None = None,
        ledger: Ledger | None = None,
    ) -> None:
        self.topology = topology
        self.ledger = ledger or Ledger()
        self.status = status or (lambda: {})
        self.path = socket_path
        self.loop = loop
        self.limits = limits or Limits()
        self.tasks = tasks or ProcTasks()
        self.peers: dict[int, _Peer] = {}
        self.counters = {"accepted": 0, "refused": 0, "denied": 0, "faults": 0, "dropped": 0}
        self._listener: socket.socket | None = None
        self._per_uid: dict[int, int] = {}
        self._pending_per_uid: dict[int, dict[int, _Peer]] = {}  # uid -> oldest first
        self._peer_ids = 0
        self._accept_paused = False
        self._retired = dict.fromkeys(_QUEUE_TOTALS, 0)  # counters of closed queues

    def _next_peer_id(self) -> int:
        self._peer_ids += 1
        return self._peer_ids

    # --- lifecycle ------------------------------------------------------------
    def start(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            sock.bind(str(self.path))
            os.chmod(self.path, 0o666)  # admittance is decided by member rules, not modes
            sock.listen(512)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self._listener = sock
        self.loop.add_reader(sock.fileno(), self._accept)
        log.info("userspace.listening", socket=str(self.path))

    def stop(self, reason: str = "daemon stopping") -> None:
        if self._listener is not None:
            if not self._accept_paused:
                self.loop.remove_reader(self._listener.fileno())
            self._listener.close()
            self._listener = None
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        for peer in list(self.peers.values()):
            peer.event(protocol.EventKind.SHUTDOWN, 0, reason)
            self._drop(peer, reason, level="info")

    # --- accepting -------------------------------------------------------------
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
                    # Out of descriptors: stop accepting for a moment instead of spinning.
                    log.warning("userspace.accept_paused", reason=exc.strerror)
                    self.loop.remove_reader(listener.fileno())
                    self._accept_paused = True
                    self.loop.call_later(0.1, self._resume_accept)
                    return
                log.warning("userspace.accept_failed", reason=exc.strerror)
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
        limits = self.limits
        pending = self._pending_per_uid.get(uid, {})
        if len(pending) >= limits.max_pending_per_uid:
            oldest = next(iter(pending.values()))
            self._drop(oldest, "evicted: too many connections waiting for their handshake")
        account = self.ledger.account(uid)
        refusal: VbusError | None = None
        if self._per_uid.get(uid, 0) >= limits.max_connections_per_uid:
            refusal = VbusError(f"too many connections for uid {uid}")
            refusal.errno = errno.EAGAIN
        else:
            try:
                account.take(fds=1)
            except VbusError as exc:
                refusal = exc
        if refusal is not None:
            self.counters["refused"] += 1
            log.warning("client.refused", pid=pid, uid=uid, reason=refusal.message)
            with contextlib.suppress(OSError):
                sock.send(
                    protocol.encode(protocol.Error(refusal.errno, refusal.message), 0),
                    socket.MSG_DONTWAIT,
                )
            sock.close()
            return
        cred = Peer(pid=pid, uid=uid, gid=gid, starttime=self.tasks.starttime(pid))
        peer = _Peer(self, sock, cred, account)
        self.peers[peer.fd] = peer
        self._per_uid[uid] = self._per_uid.get(uid, 0) + 1
        self._pending_per_uid.setdefault(uid, {})[peer.id] = peer
        peer.deadline = self.loop.call_later(
            limits.handshake_timeout, self._handshake_expired, peer
        )
        self.counters["accepted"] += 1
        self.loop.add_reader(peer.fd, self._readable, peer)
        peer.log.debug("client.accepted")

    def _handshake_expired(self, peer: _Peer) -> None:
        peer.deadline = None
        if not peer.closed and peer.pending:
            self._drop(peer, "no HELLO within the handshake timeout")

    def _handshake_done(self, peer: _Peer) -> None:
        if peer.deadline is not None:
            peer.deadline.cancel()
            peer.deadline = None
        if peer.pending:
            peer.pending = False
            uid = peer.cred.uid
            pending = self._pending_per_uid[uid]
            del pending[peer.id]
            if not pending:
                del self._pending_per_uid[uid]

    # --- receiving ------------------------------------------------------------
    def _readable(self, peer: _Peer) -> None:
        for _ in range(self.limits.frames_per_wakeup):
            if peer.closed:
                return
            try:
                data, ancdata, flags, _ = peer.sock.recvmsg(protocol.MAX_FRAME, _CMSG_SPACE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._drop(peer, f"receive failed: {exc.strerror}", level="info")
                return
            fds = _take_fds(ancdata) if ancdata else []
            if not data and not fds:
                self._drop(peer, "peer closed the connection", level="info")
                return
            try:
                if flags & _MSG_TRUNC:
                    raise _OversizedFrame(f"message larger than {protocol.MAX_FRAME} bytes")
                if flags & _MSG_CTRUNC and len(fds) < MAX_FDS:
                    # The kernel could not install the descriptors (we are at
                    # RLIMIT_NOFILE): our shortage, not the peer's fault.
                    raise TooManyFiles("the daemon is short of file descriptors; try again later")
                if flags & _MSG_CTRUNC or len(fds) > 3:
                    raise ProtocolError("too many file descriptors in one message")
                call = protocol.split_call(data, len(fds)) if peer.bus is not None else None
                if call is not None:
                    self._on_call(peer, *call)  # the hot path: no message objects
                else:
                    self._dispatch(peer, data, fds)
            except VbusError as exc:
                if isinstance(exc, ProtocolError | _OversizedFrame):
                    # The byte stream itself is wrong: say why, then hang up.
                    peer.error(protocol.peek_seq(data), exc)
                    self._drop(peer, f"protocol violation: {exc.message}")
                    return
                peer.error(protocol.peek_seq(data), exc)
            finally:
                for fd in fds:
                    if fd >= 0:
                        os.close(fd)

    def _dispatch(self, peer: _Peer, data: bytes, fds: list[int]) -> None:
        seq, msg = peer.session.receive(data, len(fds))
        if isinstance(msg, protocol.Call):
            self._on_call(peer, seq, msg.handle, msg.func, msg.data)
        elif isinstance(msg, protocol.Hello):
            self._on_hello(peer, seq, msg)
        elif isinstance(msg, protocol.Enumerate):
            bus = self._bus_of(peer)
            devices = tuple(
                protocol.DeviceInfo(bus.id_of(dev), dev.name, dev.deviceclass or "")
                for dev in self.topology.devices_on(bus.name)
            )
            peer.reply(seq, protocol.Devices(devices))
        elif isinstance(msg, protocol.Open):
            self._on_open(peer, seq, msg)
        elif isinstance(msg, protocol.Shm):
            self._on_shm(peer, seq, msg, fds)
        elif isinstance(msg, protocol.Status):
            self._on_status(peer, seq)
        elif isinstance(msg, protocol.Close):
            handle = self._handle_of(peer, msg.handle)
            self._close_handle(peer, handle, "closed by the client")
            peer.reply(seq, protocol.Ok())
        else:  # pragma: no cover - ServerSession only yields request types
            raise ProtocolError(f"unexpected message {type(msg).__name__}")

    def _bus_of(self, peer: _Peer) -> Bus:
        if peer.bus is None:
            raise NotFound("the bus of this connection is gone")
        return self.topology.bus(peer.bus.name)

    def _handle_of(self, peer: _Peer, handle_id: int) -> _Handle:
        handle = peer.handles.get(handle_id)
        if handle is None:
            raise NotFound(f"no open device with handle {handle_id}")
        return handle

    def _on_hello(self, peer: _Peer, seq: int, msg: protocol.Hello) -> None:
        self._handshake_done(peer)
        member = self.topology.join(
            peer.cred, self.name, lambda _member, reason: self._expelled(peer, reason)
        )
        if member is None:
            self.counters["denied"] += 1
            peer.log.warning("client.denied", reason="not a member of any bus")
            peer.error(seq, Denied("not a member of any bus"))
            self._drop(peer, "not a member of any bus", level="debug")
            return
        peer.member = member
        peer.bus = bus = member.bus
        peer.log = peer.log.bind(bus=bus.name)
        peer.reply(seq, protocol.Welcome(protocol.WIRE_VERSION, member.client_id, bus.name))
        peer.log.info("client.ready", client=msg.name)

    def _expelled(self, peer: _Peer, reason: str) -> None:
        """Its member rule went (or its bus): tell it, then let it go."""
        peer.member = None
        peer.bus = None
        peer.event(protocol.EventKind.BUS_GONE, 0, reason)
        self._drop(peer, reason, level="info")

    def _on_status(self, peer: _Peer, seq: int) -> None:
        """The daemon's own health, for its administrator only (it counts everyone)."""
        self._bus_of(peer)
        if peer.cred.uid not in (0, os.getuid()):
            raise Denied("daemon status is for the host administrator")
        lines = "".join(f"{key} {value}\n" for key, value in self.status().items())
        peer.reply(seq, protocol.Result(lines.encode()))

    def _on_open(self, peer: _Peer, seq: int, msg: protocol.Open) -> None:
        bus = self._bus_of(peer)
        if len(peer.handles) >= self.limits.max_handles:
            raise Busy(f"at most {self.limits.max_handles} open devices per connection")
        handle_id = peer.new_handle_id()
        ref: str | int = msg.device_id if msg.device_id else msg.name

        def revoke(conn: Connection, kind: str, reason: str) -> None:
            self._revoked(peer, handle_id, kind, reason)

        conn = self.topology.open(bus.name, ref, peer.cred, self.name, revoke, member=peer.member)
        peer.handles[handle_id] = _Handle(handle_id, conn, peer.account)
        device = conn.device
        peer.reply(
            seq,
            protocol.Opened(handle_id, bus.id_of(device), device.name, device.deviceclass or ""),
        )
        peer.log.info("device.opened", handle=handle_id, device=device.name)

    def _on_call(self, peer: _Peer, seq: int, handle_id: int, func: int, data: bytes) -> None:
        handle = peer.handles.get(handle_id) or self._handle_of(peer, handle_id)
        conn = handle.conn
        session = conn.session
        assert session is not None
        conn.calls += 1
        try:
            result = session.call(func, data)
        except VbusError:
            raise
        except Exception as exc:
            self._device_bug(peer, handle, exc)
            raise Fault("the device failed this call") from None
        if type(result) is bytes:
            peer.send(protocol.result_frame(seq, result))
        elif isinstance(result, bytes | bytearray):
            peer.send(protocol.result_frame(seq, bytes(result)))
        elif inspect.isawaitable(result):
            if peer.inflight_calls >= self.limits.max_inflight_calls:
                raise Busy("too many calls in progress")
            peer.inflight_calls += 1
            self.loop.create_task(self._finish_call(peer, handle, seq, result))
        else:
            self._device_bug(peer, handle, TypeError(f"call() returned {type(result).__name__}"))
            raise Fault("the device failed this call")

    async def _finish_call(
        self, peer: _Peer, handle: _Handle, seq: int, pending: Awaitable[bytes]
    ) -> None:
        try:
            data = await pending
            peer.reply(seq, protocol.Result(bytes(data)))
        except VbusError as exc:
            peer.error(seq, exc)
        except Exception as exc:
            self._device_bug(peer, handle, exc)
            peer.error(seq, Fault("the device failed this call"))
        finally:
            peer.inflight_calls -= 1

    def _on_shm(self, peer: _Peer, seq: int, msg: protocol.Shm, fds: list[int]) -> None:
        handle = self._handle_of(peer, msg.handle)
        if peer.queue_count >= self.limits.max_queues:
            raise Busy(f"at most {self.limits.max_queues} queues per connection")
        if msg.index in handle.queues:
            raise Busy(f"queue {msg.index} is already registered")
        account = peer.account
        account.take(fds=_QUEUE_FDS, maps=1)  # refused here if this uid holds its share
        resources: list[Any] = []
        size = 0

        def admit(length: int) -> None:
            nonlocal size
            account.take(shm=length)  # NoSpace past the peer's or its uid's bound
            size = length

        try:
            try:
                region = MemfdRegion.from_fd(fds[0], max_size=self.limits.max_region, admit=admit)
                resources.append(region)
                kick = SharedEventfd.adopt(fds[1], "kick", read=True)
                fds[1] = -1
                resources.append(kick)
                call = SharedEventfd.adopt(fds[2], "call", read=False)
                fds[2] = -1
                resources.append(call)
                writable = bool(msg.flags & protocol.SHM_WRITABLE)
                mitigate = not msg.flags & protocol.SHM_NO_MITIGATION
                try:
                    queue = IoqSouth(
                        region, msg.offset, msg.count, call, writable=writable, mitigate=mitigate
                    )
                except Fault as exc:
                    # A ring that is broken from the start faults the connection.
                    peer.error(seq, exc)
                    self._fault(peer, handle, exc.message)
                    raise _AlreadyAnswered() from None
                resources.append(queue)
                session = handle.conn.session
                assert session is not None
                session.shm(msg.index, queue)
            except OSError as exc:  # any step touching a north descriptor
                raise Invalid(f"cannot register the queue: {exc.strerror}") from None
        except BaseException as exc:
            for resource in resources:
                resource.close()
            account.give(shm=size, fds=_QUEUE_FDS, maps=1)
            if isinstance(exc, _AlreadyAnswered):
                return
            raise
        resources.pop()  # the queue is closed through handle.queues
        handle.queues[msg.index] = queue
        handle.resources.extend(resources)
        handle.shm += size
        peer.queue_count += 1
        if handle.poller is None:
            handle.poller = NapiPoller(
                self.loop, session, lambda exc: self._poll_failed(peer, handle, exc)
            )
        if not mitigate:
            handle.poller.budget = 1  # one message per wake-up: no mitigation at all
        handle.poller.watch(kick)
        handle.poller.schedule()
        peer.reply(seq, protocol.Ok())
        peer.log.info(
            "queue.registered",
            handle=handle.id,
            index=msg.index,
            count=msg.count,
            writable=writable,
            size=size,
        )

    # --- faults, revocation, teardown -------------------------------------------
    def _poll_failed(self, peer: _Peer, handle: _Handle, exc: BaseException) -> None:
        if isinstance(exc, VbusError):
            self._fault(peer, handle, exc.message)
        else:
            self._device_bug(peer, handle, exc)
            self._fault(peer, handle, "the device failed")

    def _device_bug(self, peer: _Peer, handle: _Handle, exc: BaseException) -> None:
        peer.log.error(
            "device.error",
            handle=handle.id,
            device=handle.conn.device.name,
            exc_info=(type(exc), exc, exc.__traceback__),
        )

    def _fault(self, peer: _Peer, handle: _Handle, reason: str) -> None:
        if handle.id not in peer.handles:
            return
        self.counters["faults"] += 1
        handle.conn.faults += 1
        peer.log.warning(
            "connection.faulted", handle=handle.id, device=handle.conn.device.name, reason=reason
        )
        peer.event(protocol.EventKind.FAULT, handle.id, reason)
        self._close_handle(peer, handle, f"faulted: {reason}")

    def _revoked(self, peer: _Peer, handle_id: int, kind: str, reason: str) -> None:
        handle = peer.handles.pop(handle_id, None)
        if handle is None:
            return
        peer.queue_count -= len(handle.queues)
        handle.release(self._retired)
        peer.event(_EVENT_KINDS.get(kind, protocol.EventKind.DEVICE_REMOVED), handle_id, reason)
        peer.log.info("device.revoked", handle=handle_id, kind=kind, reason=reason)
        if kind == "bus_gone":
            self.loop.call_soon(self._drop, peer, "bus removed", "info")

    def _close_handle(self, peer: _Peer, handle: _Handle, reason: str) -> None:
        if peer.handles.pop(handle.id, None) is None:
            return
        peer.queue_count -= len(handle.queues)
        handle.release(self._retired)
        self.topology.close(handle.conn, reason)

    def _drop(self, peer: _Peer, reason: str, level: str = "warning") -> None:
        """Disconnect a peer and release everything it held."""
        if peer.closed:
            return
        peer.closed = True
        for handle in list(peer.handles.values()):
            self._close_handle(peer, handle, reason)
        if peer.member is not None:
            self.topology.leave(peer.member)
            peer.member = None
        peer.account.close()
        self._handshake_done(peer)
        uid = peer.cred.uid
        self._per_uid[uid] -= 1
        if not self._per_uid[uid]:
            del self._per_uid[uid]
        self.loop.remove_reader(peer.fd)
        if peer.writing:
            self.loop.remove_writer(peer.fd)
        peer.outbound.clear()
        peer.outbound_bytes = 0
        self.peers.pop(peer.fd, None)
        if level == "warning":
            self.counters["dropped"] += 1
        getattr(peer.log, level)("client.closed", reason=reason)  # before the peer sees EOF
        peer.sock.close()

    def queue_totals(self) -> dict[str, int]:
        """Ring traffic and signalling of every queue since start, closed ones included."""
        totals = dict(self._retired)
        for peer in self.peers.values():
            for handle in peer.handles.values():
                if handle.poller is not None:
                    totals["wakeups"] += handle.poller.stats.wakeups
                    totals["polls"] += handle.poller.stats.polls
                for queue in handle.queues.values():
                    _add_queue_stats(totals, queue)
        # Loop iterations whose polling time slice ran out with pollers still waiting.
        totals["poll_slices_cut"] = PollGroup.of(self.loop).slices_cut
        return {f"queue_{key}": value for key, value in totals.items()}

    def describe(self) -> list[dict[str, Any]]:
        return [
            {
                "peer": p.id,
                "pid": p.cred.pid,
                "uid": p.cred.uid,
                "bus": p.bus.name if p.bus else None,
                "client_id": p.member.client_id if p.member else None,
                "handles": len(p.handles),
                "shm_bytes": p.account.shm,
                "fds": p.account.fds,
                "since": p.since,
            }
            for p in self.peers.values()
        ]


_QUEUE_TOTALS = (
    "messages",
    "bytes",
    "signals_sent",
    "signals_suppressed",
    "stalls",
    "wakeups",
    "polls",
)


def _add_queue_stats(totals: dict[str, int], queue: IoqSouth) -> None:
    stats = queue.stats
    totals["messages"] += stats.messages
    totals["bytes"] += stats.bytes
    totals["signals_sent"] += stats.signals_sent
    totals["signals_suppressed"] += stats.signals_suppressed
    totals["stalls"] += stats.stalls


class _OversizedFrame(TooBig):
    """A datagram past the frame limit: the byte stream is wrong, not a request."""


class _AlreadyAnswered(Exception):
    """Internal: the request already got its reply."""


def _take_fds(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(payload) - len(payload) % 4
            fds.extend(array.array("i", payload[:usable]))
    return fds
