"""A vhost-user front-end in Python: a VMM for tests, the soak and the bench.

``Frontend`` connects to a device's socket, shares guest RAM (one sealed
memfd, given as two regions the way QEMU splits its RAM), and sets up the
virtqueues the way QEMU does (``start``), each ring a ``vbus.vhost.driver``
``Driver`` with its kick, call and error eventfds.  Every request is a
plain method (``request``, ``call``), so a test can send anything at all:
garbage, tables that overlap, rings outside memory.  Blocking, with
timeouts; one thread.
"""

from __future__ import annotations

import array
import os
import select
import socket
from collections.abc import Sequence
from typing import Final

from vbus.errors import ProtocolError
from vbus.memory import create_memfd
from vbus.vhost import wire
from vbus.vhost.driver import Driver, GuestRam
from vbus.vhost.wire import P, Region, Request

__all__ = ["USER_BASE", "Frontend"]

USER_BASE: Final = 0x7F00_0000_0000  # where the "VMM" says it mapped guest RAM
F_VERSION_1: Final = 1 << 32
F_EVENT_IDX: Final = 1 << 29
F_INDIRECT_DESC: Final = 1 << 28
F_MRG_RXBUF: Final = 1 << 15


def _connect(sock: socket.socket, path: str) -> None:
    """Connect however long ``path`` is: through its directory's /proc/self/fd
    link where it is longer than sun_path allows."""
    if len(os.fsencode(path)) <= 107:
        sock.connect(path)
        return
    head, name = os.path.split(path)
    dirfd = os.open(head, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        sock.connect(f"/proc/self/fd/{dirfd}/{name}")
    finally:
        os.close(dirfd)


class Frontend:
    """One front-end connection with ``size`` bytes of guest RAM at guest-physical 0."""

    def __init__(self, path: str, size: int = 4 << 20, timeout: float = 10.0) -> None:
        self.timeout = timeout
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.sock.settimeout(timeout)
        _connect(self.sock, path)
        self.memfd, self.mapping = create_memfd("guest-ram", size)
        self.ram = GuestRam(self.mapping, 0)
        self.ram.top = 4096  # keep guest-physical 0 unused
        half = size // 2
        self.regions = [
            Region(0, half, USER_BASE, 0),
            Region(half, size - half, USER_BASE + half, half),
        ]
        self.drivers: list[Driver] = []
        self.kicks: list[int] = []
        self.calls: list[int] = []
        self.errs: list[int] = []
        self.features = 0

    # --- the wire ------------------------------------------------------------------
    def send(
        self, req: int, payload: bytes = b"", fds: Sequence[int] = (), *, need_reply: bool = False
    ) -> None:
        self.send_raw(wire.request(req, payload, need_reply=need_reply), fds)

    def send_raw(self, data: bytes, fds: Sequence[int] = ()) -> None:
        ancillary = (
            [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
        )
        self.sock.sendmsg([data], ancillary)

    def reply(self) -> tuple[int, bytes]:
        """The next reply (``ProtocolError`` if the back-end hung up)."""
        head = self._recv_exact(wire.HEADER.size)
        size = wire.HEADER.unpack(head)[2]
        return wire.parse_reply(head + self._recv_exact(size))

    def _recv_exact(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise ProtocolError("the back-end closed the connection")
            data += chunk
        return data

    def call(
        self, req: int, payload: bytes = b"", fds: Sequence[int] = (), *, need_reply: bool = False
    ) -> bytes:
        """Send a request and return its reply's payload."""
        self.send(req, payload, fds, need_reply=need_reply)
        got, data = self.reply()
        if got != req:
            raise ProtocolError(f"reply to {got}, expected {req}")
        return data

    def acked(self, req: int, payload: bytes = b"", fds: Sequence[int] = ()) -> bool:
        """A request with need_reply: True if the back-end acked it with 0."""
        return self.call(req, payload, fds, need_reply=True) == wire.u64(0)

    def u64(self, req: int) -> int:
        return int.from_bytes(self.call(req), "little")

    def closed_by_peer(self, timeout: float | None = None) -> bool:
        """True once the back-end has closed the connection (within ``timeout``)."""
        ready, _, _ = select.select(
            [self.sock], [], [], self.timeout if timeout is None else timeout
        )
        if not ready:
            return False
        try:
            return self.sock.recv(4096, socket.MSG_PEEK) == b""
        except ConnectionResetError:
            return True

    # --- QEMU's sequence -----------------------------------------------------------------
    def start(
        self,
        features: int | None = None,
        *,
        protocol: int = P.MQ | P.REPLY_ACK | P.STATUS,
        num: int = 256,
    ) -> int:
        """Negotiate, share memory, set up every ring and enable it; the features acked."""
        offered = self.u64(Request.GET_FEATURES)
        self.u64(Request.GET_PROTOCOL_FEATURES)
        self.send(Request.SET_PROTOCOL_FEATURES, wire.u64(protocol))
        queues = self.u64(Request.GET_QUEUE_NUM) if protocol & P.MQ else 2
        self.send(Request.SET_OWNER)
        acked = offered if features is None else features
        self.features = acked
        self.send(Request.SET_FEATURES, wire.u64(acked))
        if not self.acked(
            Request.SET_MEM_TABLE, wire.mem_table(self.regions), [self.memfd, self.memfd]
        ):
            raise ProtocolError("the memory table was refused")
        for index in range(queues):
            self.setup_ring(index, num)
        return acked

    def setup_ring(self, index: int, num: int) -> Driver:
        drv = Driver(self.ram, num=num)
        while len(self.drivers) <= index:
            self.drivers.append(drv)
            self.kicks.append(os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC))
            self.calls.append(os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC))
            self.errs.append(os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC))
        self.drivers[index] = drv
        self.send(Request.SET_VRING_CALL, wire.u64(index), [self.calls[index]])
        self.send(Request.SET_VRING_ERR, wire.u64(index), [self.errs[index]])
        self.send(Request.SET_VRING_NUM, wire.vring_state(index, num))
        self.send(Request.SET_VRING_BASE, wire.vring_state(index, 0))
        self.send(
            Request.SET_VRING_ADDR,
            wire.vring_addr(
                index, USER_BASE + drv.desc, USER_BASE + drv.used, USER_BASE + drv.avail
            ),
        )
        self.send(Request.SET_VRING_KICK, wire.u64(index), [self.kicks[index]])
        self.send(Request.SET_VRING_ENABLE, wire.vring_state(index, 1))
        return drv

    def kick(self, index: int) -> None:
        os.eventfd_write(self.kicks[index], 1)

    def wait_call(self, index: int, timeout: float | None = None) -> bool:
        """Wait for an interrupt on ring ``index``; True if one came."""
        fd = self.calls[index]
        ready, _, _ = select.select([fd], [], [], self.timeout if timeout is None else timeout)
        if not ready:
            return False
        os.eventfd_read(fd)
        return True

    def error_signalled(self, index: int) -> bool:
        try:
            return os.eventfd_read(self.errs[index]) > 0
        except BlockingIOError:
            return False

    def vring_base(self, index: int) -> int:
        data = self.call(Request.GET_VRING_BASE, wire.vring_state(index, 0))
        return int.from_bytes(data[4:8], "little")

    def close(self) -> None:
        self.sock.close()
        for fd in (*self.kicks, *self.calls, *self.errs):
            os.close(fd)
        self.kicks, self.calls, self.errs = [], [], []
        self.mapping.close()
        os.close(self.memfd)

    def __enter__(self) -> Frontend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
