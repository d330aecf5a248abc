"""Raw access for misbehaving clients: the wire and the rings, by hand.

``WireClient`` speaks ``vbus.protocol`` over a SOCK_SEQPACKET socket driven by
asyncio, with full control over every frame and every file descriptor, so a
catalogue entry can say what the client library never would.  ``HandRing`` is
one queue built by hand in a sealed memfd (ring + buffer pool + both
eventfds), with accessors to scribble on any field after it was published.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import os
import socket
import struct
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path

from vbus import protocol
from vbus.ioq import DESC_SIZE, HEADER_SIZE, IoqNorth, pool_layout
from vbus.memory import create_memfd
from vbus.signal import EventfdTransport

__all__ = ["HandRing", "PeerClosed", "WireClient", "eventfd", "unsealed_memfd"]

_VALID_AT = 64
_INUSE_AT = 128
_DESC = struct.Struct("<QQQBB6x")


class PeerClosed(Exception):
    """The daemon closed the connection (EOF, reset or broken pipe)."""


def eventfd() -> int:
    return os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)


class WireClient:
    """One connection to vbusd, spoken by hand.  Events are kept in ``events``."""

    # WELCOMEs received by this process's clients: a bad client alone on its
    # bus checks the client ids the daemon hands out against it.
    welcomes = 0

    def __init__(self, sock: socket.socket, loop: asyncio.AbstractEventLoop) -> None:
        self.sock = sock
        self.loop = loop
        self.seq = 0
        self.events: deque[protocol.Event] = deque(maxlen=256)
        self.closed_at: float | None = None  # monotonic time EOF was seen
        self.welcome: protocol.Welcome | None = None

    @classmethod
    async def connect(cls, path: str | os.PathLike[str], timeout: float = 5.0) -> WireClient:
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        sock.setblocking(False)
        try:
            await asyncio.wait_for(loop.sock_connect(sock, str(Path(path))), timeout)
        except BaseException:
            sock.close()
            raise
        return cls(sock, loop)

    # --- sending ----------------------------------------------------------------
    def try_send(self, frame: bytes, fds: Sequence[int] = ()) -> bool:
        """Send without waiting: False when the socket buffer is full."""
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        try:
            self.sock.sendmsg([frame], anc)
        except BlockingIOError:
            return False
        except (BrokenPipeError, ConnectionResetError, ConnectionRefusedError) as exc:
            self._eof()
            raise PeerClosed(exc.strerror or "connection closed") from None
        return True

    async def send(self, frame: bytes, fds: Sequence[int] = ()) -> None:
        while not self.try_send(frame, fds):
            await self._writable()

    async def _writable(self) -> None:
        ready: asyncio.Future[None] = self.loop.create_future()
        fd = self.sock.fileno()
        self.loop.add_writer(fd, _resolve, ready)
        try:
            await ready
        finally:
            self.loop.remove_writer(fd)

    def next_seq(self) -> int:
        self.seq = (self.seq + 1) & 0xFFFFFFFF or 1
        return self.seq

    # --- receiving --------------------------------------------------------------
    async def recv(self) -> tuple[int, protocol.Message]:
        """The next frame from the daemon (events included).  PeerClosed at EOF."""
        try:
            data = await self.loop.sock_recv(self.sock, protocol.MAX_FRAME)
        except (ConnectionResetError, BrokenPipeError) as exc:
            self._eof()
            raise PeerClosed(exc.strerror or "connection reset") from None
        if not data:
            self._eof()
            raise PeerClosed("EOF")
        seq, msg = protocol.decode_reply(data)
        if isinstance(msg, protocol.Welcome):
            WireClient.welcomes += 1
            self.welcome = msg
        return seq, msg

    async def reply(self, seq: int) -> protocol.Message:
        """The reply to ``seq``; events that arrive first are kept in ``events``."""
        while True:
            got_seq, msg = await self.recv()
            if isinstance(msg, protocol.Event):
                self.events.append(msg)
                continue
            if got_seq == seq:
                return msg

    async def request(
        self, msg: protocol.Message, fds: Sequence[int] = (), timeout: float = 10.0
    ) -> protocol.Message:
        seq = self.next_seq()
        await self.send(protocol.encode(msg, seq), fds)
        return await asyncio.wait_for(self.reply(seq), timeout)

    async def event(self, timeout: float) -> protocol.Event:
        """The next EVENT (one that already arrived first)."""
        if self.events:
            return self.events.popleft()

        async def wait() -> protocol.Event:
            while True:
                _seq, msg = await self.recv()
                if isinstance(msg, protocol.Event):
                    return msg

        return await asyncio.wait_for(wait(), timeout)

    async def wait_closed(self, timeout: float) -> bool:
        """True once the daemon has closed the connection (frames before EOF are
        kept if they are events, dropped otherwise)."""
        if self.closed_at is not None:
            return True
        try:
            async with asyncio.timeout(timeout):
                while True:
                    _seq, msg = await self.recv()
                    if isinstance(msg, protocol.Event):
                        self.events.append(msg)
        except PeerClosed:
            return True
        except TimeoutError:
            return False

    def _eof(self) -> None:
        if self.closed_at is None:
            self.closed_at = time.monotonic()

    # --- the handshake and friends ----------------------------------------------
    async def hello(self, name: str = "soak-bad") -> protocol.Message:
        return await self.request(protocol.Hello(1, 1, name))

    async def open(self, ref: str | int) -> protocol.Message:
        if isinstance(ref, int):
            return await self.request(protocol.Open(device_id=ref))
        return await self.request(protocol.Open(name=ref))

    async def open_handle(self, ref: str | int) -> int:
        reply = await self.open(ref)
        if isinstance(reply, protocol.Error):
            raise reply.exception()
        assert isinstance(reply, protocol.Opened), reply
        return reply.handle

    async def shm(
        self, handle: int, index: int, ring: HandRing, *, writable: bool, flags: int = 0
    ) -> protocol.Message:
        flags |= protocol.SHM_WRITABLE if writable else 0
        return await self.request(
            protocol.Shm(handle, index, 0, ring.count, flags), ring.fds(), timeout=10.0
        )

    def close(self) -> None:
        self.sock.close()


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class HandRing:
    """A ring (docs/design.md 3.3) at offset 0 of a sealed memfd, followed by a pool
    of ``count`` buffers, plus kick (north->south) and call (south->north)
    eventfds.  ``north`` drives it the honest way; the other methods do not."""

    def __init__(self, count: int = 16, buf_size: int = 256) -> None:
        data, total = pool_layout(count, buf_size)
        self.count = count
        self.buf_size = buf_size
        self.size = total
        self.data_offset = data
        self.memfd, self.map = create_memfd("vbus-soak", total)
        self.kick = EventfdTransport.create()
        self.call = EventfdTransport.create()
        self.north = IoqNorth(self.map, 0, count, data, buf_size, self.kick)

    def fds(self) -> tuple[int, int, int]:
        return self.memfd, self.kick.fd, self.call.fd

    # --- raw fields ----------------------------------------------------------
    def desc_at(self, index: int) -> int:
        return HEADER_SIZE + (index & (self.count - 1)) * DESC_SIZE

    def write_desc(
        self, index: int, *, ptr: int, length: int, valid: int = 1, sown: int = 1
    ) -> None:
        """Store a whole descriptor (cookie = index), as a careless north would."""
        self.map[self.desc_at(index) : self.desc_at(index) + DESC_SIZE] = _DESC.pack(
            index & 0xFFFFFFFF, ptr & (2**64 - 1), length & (2**64 - 1), valid, sown
        )

    def set_ptr_len(self, index: int, ptr: int, length: int) -> None:
        at = self.desc_at(index)
        self.map[at + 8 : at + 24] = struct.pack("<QQ", ptr & (2**64 - 1), length & (2**64 - 1))

    @property
    def valid(self) -> int:
        return int.from_bytes(self.map[_VALID_AT : _VALID_AT + 4], "little")

    def publish_index(self, value: int) -> None:
        """Store the north index (aligned 4-byte store, as docs/design.md 3.3 requires)."""
        view = memoryview(self.map)[_VALID_AT : _VALID_AT + 4].cast("I")
        view[0] = value & 0xFFFFFFFF
        view.release()
        self.north.valid = value & 0xFFFFFFFF

    @property
    def inuse(self) -> int:
        return int.from_bytes(self.map[_INUSE_AT : _INUSE_AT + 4], "little")

    def scribble(self, start: int, data: bytes) -> None:
        end = min(start + len(data), self.size)
        self.map[start:end] = data[: end - start]

    def doorbell(self) -> None:
        self.kick.kick()

    def close(self) -> None:
        self.north.close()
        with contextlib.suppress(BufferError):
            self.map.close()
        self.kick.close()
        self.call.close()
        if self.memfd >= 0:
            os.close(self.memfd)
            self.memfd = -1


def unsealed_memfd(size: int) -> int:
    fd = os.memfd_create("vbus-soak-unsealed", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    return fd
