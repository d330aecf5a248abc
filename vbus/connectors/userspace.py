"""The userspace connector: processes reach their bus over a Unix socket.

``<run-dir>/vbus.sock`` is an AF_UNIX SOCK_SEQPACKET socket.  A peer is
identified by SO_PEERCRED and admitted only if a member rule of some bus
matches it; it then speaks the wire protocol of ``vbus.protocol``.  Shared
memory arrives as sealed memfds with SCM_RIGHTS, signals as eventfds.  What
happens to a peer's devices, queues, faults and resources is the attachment
core's (``vbus.connectors.base``); this module only moves frames and
descriptors.

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
import os
import socket
import struct
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vbus import protocol
from vbus.connectors.base import Limits, North, NorthCore
from vbus.core.members import Peer
from vbus.core.model import RevokeKind, Topology
from vbus.core.resources import Ledger
from vbus.errors import Denied, Fault, Invalid, ProtocolError, TooBig, TooManyFiles, VbusError
from vbus.ioq import IoqSouth
from vbus.log import get_logger
from vbus.memory import MemfdRegion
from vbus.procfs import ProcTasks
from vbus.signal import SharedEventfd

__all__ = ["Limits", "UserspaceConnector"]

log = get_logger("vbus.userspace")

_MSG_TRUNC = int(socket.MSG_TRUNC)  # plain ints: IntFlag arithmetic is slow
_MSG_CTRUNC = int(socket.MSG_CTRUNC)
_MSG_DONTWAIT = int(socket.MSG_DONTWAIT)
MAX_FDS = 8  # ancillary space: more than any message takes, so excess is detected
_CMSG_SPACE = socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)
_PEERCRED = struct.Struct("3i")
_QUEUE_FDS = 3  # kick and call eventfds, and the dup of the memfd that mmap.mmap keeps (3.11)
_EVENT_KINDS = {
    "device_removed": protocol.EventKind.DEVICE_REMOVED,
    "bus_gone": protocol.EventKind.BUS_GONE,
}


class _Peer:
    """One connected process: its socket and outbound queue.  Also the core's
    ``Hooks``: faults and revocations become EVENT frames."""

    def __init__(self, connector: UserspaceConnector, sock: socket.socket, cred: Peer) -> None:
        self.connector = connector
        self.sock = sock
        self.fd = sock.fileno()
        self.cred = cred
        self.id = connector._next_peer_id()
        self.session = protocol.ServerSession()
        self.outbound: deque[bytes] = deque()
        self.outbound_bytes = 0
        self.writing = False
        self.closed = False
        self.pending = True  # accepted, no HELLO yet
        self.since = time.time()
        self.log = log.bind(peer=self.id, pid=cred.pid, uid=cred.uid)
        self.north: North = connector.core.north(cred, self, self.log)
        self.deadline: asyncio.TimerHandle | None = None

    # --- outbound ------------------------------------------------------------
    def send(self, frame: bytes) -> None:
        if self.closed:
            return
        if not self.outbound:
            try:
                self.sock.send(frame, _MSG_DONTWAIT)
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
                self.sock.send(self.outbound[0], _MSG_DONTWAIT)
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

    def answer(self, seq: int) -> Callable[[bytes | VbusError], None]:
        """The reply to an asynchronous call() (a no-op once the peer is gone)."""

        def later(result: bytes | VbusError) -> None:
            if isinstance(result, VbusError):
                self.error(seq, result)
            else:
                self.send(protocol.result_frame(seq, result))

        return later

    # --- the core's hooks --------------------------------------------------------
    def faulted(self, handle: int, reason: str) -> None:
        self.event(protocol.EventKind.FAULT, handle, reason)

    def revoked(self, handle: int, kind: RevokeKind, reason: str) -> None:
        self.event(_EVENT_KINDS.get(kind, protocol.EventKind.DEVICE_REMOVED), handle, reason)

    def expelled(self, reason: str) -> None:
        self.event(protocol.EventKind.BUS_GONE, 0, reason)
        self.connector._drop(self, reason, level="info")


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
        self.status = status or (lambda: {})
        self.path = socket_path
        self.loop = loop
        self.limits = limits or Limits()
        self.tasks = tasks or ProcTasks()
        self.core = NorthCore(self.name, topology, loop, ledger, self.limits)
        self.counters = self.core.counters
        self.peers: dict[int, _Peer] = {}
        self._listener: socket.socket | None = None
        self._per_uid: dict[int, int] = {}
        self._pending_per_uid: dict[int, dict[int, _Peer]] = {}  # uid -> oldest first
        self._peer_ids = 0
        self._accept_paused = False

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

    def clients(self) -> int:
        return len(self.peers)

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
        cred = Peer(pid=pid, uid=uid, gid=gid, starttime=self.tasks.starttime(pid))
        if self._per_uid.get(uid, 0) >= limits.max_connections_per_uid:
            self._refuse(sock, cred, errno.EAGAIN, f"too many connections for uid {uid}")
            return
        peer = _Peer(self, sock, cred)
        try:
            peer.north.account.take(fds=1)  # its socket
        except VbusError as exc:
            peer.north.release(exc.message)
            self._refuse(sock, cred, exc.errno, exc.message)
            return
        self.peers[peer.fd] = peer
        self._per_uid[uid] = self._per_uid.get(uid, 0) + 1
        self._pending_per_uid.setdefault(uid, {})[peer.id] = peer
        peer.deadline = self.loop.call_later(
            limits.handshake_timeout, self._handshake_expired, peer
        )
        self.counters["accepted"] += 1
        self.loop.add_reader(peer.fd, self._readable, peer)
        peer.log.debug("client.accepted")

    def _refuse(self, sock: socket.socket, cred: Peer, code: int, reason: str) -> None:
        self.counters["refused"] += 1
        log.warning("client.refused", pid=cred.pid, uid=cred.uid, reason=reason)
        with contextlib.suppress(OSError):
            sock.send(protocol.encode(protocol.Error(code, reason), 0), _MSG_DONTWAIT)
        sock.close()

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
                call = protocol.split_call(data, len(fds)) if not peer.pending else None
                if call is not None:
                    self._on_call(peer, *call)  # the hot path: no message objects
                else:
                    self._dispatch(peer, data, fds)
            except VbusError as exc:
                peer.error(protocol.peek_seq(data), exc)
                if isinstance(exc, ProtocolError | _OversizedFrame):
                    # The byte stream itself is wrong: say why, then hang up.
                    self._drop(peer, f"protocol violation: {exc.message}")
                    return
                if peer.session.state == "closed":  # no common version, or no HELLO first
                    self._drop(peer, f"handshake failed: {exc.message}")
                    return
            finally:
                for fd in fds:
                    if fd >= 0:
                        os.close(fd)

    def _dispatch(self, peer: _Peer, data: bytes, fds: list[int]) -> None:
        seq, msg = peer.session.receive(data, len(fds))
        north = peer.north
        if isinstance(msg, protocol.Call):
            self._on_call(peer, seq, msg.handle, msg.func, msg.data)
        elif isinstance(msg, protocol.Hello):
            self._on_hello(peer, seq, msg)
        elif isinstance(msg, protocol.Enumerate):
            bus = north.bus
            devices = tuple(
                protocol.DeviceInfo(bus.id_of(dev), dev.name, dev.deviceclass or "")
                for dev in self.topology.devices_on(bus)
            )
            peer.reply(seq, protocol.Devices(devices))
        elif isinstance(msg, protocol.Open):
            bus = north.bus
            attachment = north.open(msg.device_id if msg.device_id else msg.name)
            device = attachment.conn.device
            peer.reply(
                seq,
                protocol.Opened(
                    attachment.id, bus.id_of(device), device.name, device.deviceclass or ""
                ),
            )
        elif isinstance(msg, protocol.Shm):
            self._on_shm(peer, seq, msg, fds)
        elif isinstance(msg, protocol.Status):
            self._on_status(peer, seq)
        elif isinstance(msg, protocol.Close):
            north.close(msg.handle)
            peer.reply(seq, protocol.Ok())
        else:  # pragma: no cover - ServerSession only yields request types
            raise ProtocolError(f"unexpected message {type(msg).__name__}")

    def _on_hello(self, peer: _Peer, seq: int, msg: protocol.Hello) -> None:
        self._handshake_done(peer)
        member = peer.north.join()
        if member is None:
            peer.error(seq, Denied("not a member of any bus"))
            self._drop(peer, "not a member of any bus", level="debug")
            return
        peer.log = peer.north.log = peer.log.bind(bus=member.bus.name)
        peer.reply(seq, protocol.Welcome(protocol.WIRE_VERSION, member.client_id, member.bus.name))
        peer.log.info("client.ready", client=msg.name)

    def _on_status(self, peer: _Peer, seq: int) -> None:
        """The daemon's own health, for its administrator only (it counts everyone)."""
        peer.north.bus  # noqa: B018 - a peer without a bus gets NotFound
        if peer.cred.uid not in (0, os.getuid()):
            raise Denied("daemon status is for the host administrator")
        lines = "".join(f"{key} {value}\n" for key, value in self.status().items())
        peer.reply(seq, protocol.Result(lines.encode()))

    def _on_call(self, peer: _Peer, seq: int, handle: int, func: int, data: bytes) -> None:
        north = peer.north
        attachment = north.handles.get(handle) or north.handle(handle)
        result = attachment.call(func, data, peer.answer(seq))
        if result is not None:
            peer.send(protocol.result_frame(seq, result))

    def _on_shm(self, peer: _Peer, seq: int, msg: protocol.Shm, fds: list[int]) -> None:
        """Map the memfd, take the eventfds, build the ring, hand it to the core."""
        north = peer.north
        attachment = north.handle(msg.handle)
        account = north.account
        account.take(fds=_QUEUE_FDS, maps=1)  # refused here if this uid holds its share
        resources: list[Any] = []
        size = 0

        def admit(length: int) -> None:
            nonlocal size
            account.take(shm=length)  # NoSpace past the peer's or its uid's bound
            size = length

        writable = bool(msg.flags & protocol.SHM_WRITABLE)
        mitigate = not msg.flags & protocol.SHM_NO_MITIGATION
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
                queue = IoqSouth(
                    region, msg.offset, msg.count, call, writable=writable, mitigate=mitigate
                )
            except OSError as exc:  # any step touching a north descriptor
                raise Invalid(f"cannot register the queue: {exc.strerror}") from None
        except BaseException as exc:
            for resource in reversed(resources):
                resource.close()
            account.give(shm=size, fds=_QUEUE_FDS, maps=1)
            if isinstance(exc, Fault):
                # A ring that is broken from the start faults the connection.
                peer.error(seq, exc)
                attachment.fault(exc.message)
                return
            raise
        attachment.add_queue(
            msg.index,
            queue,
            kick,
            resources,
            held=(size, _QUEUE_FDS, 1),
            budget=None if mitigate else 1,  # no mitigation: one message per wake-up
        )
        peer.reply(seq, protocol.Ok())
        peer.log.info(
            "queue.registered",
            handle=attachment.id,
            index=msg.index,
            count=msg.count,
            writable=writable,
            size=size,
        )

    # --- teardown -----------------------------------------------------------------
    def _drop(self, peer: _Peer, reason: str, level: str = "warning") -> None:
        """Disconnect a peer and release everything it held."""
        if peer.closed:
            return
        peer.closed = True
        peer.north.release(reason)
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
        return self.core.queue_totals()

    def describe(self) -> list[dict[str, Any]]:
        return [
            {
                "peer": p.id,
                "pid": p.cred.pid,
                "uid": p.cred.uid,
                **p.north.describe(),
                "since": p.since,
            }
            for p in self.peers.values()
        ]


class _OversizedFrame(TooBig):
    """A datagram past the frame limit: the byte stream is wrong, not a request."""


def _take_fds(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(payload) - len(payload) % 4
            fds.extend(array.array("i", payload[:usable]))
    return fds
