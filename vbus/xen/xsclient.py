"""A xenstore client over a stream socket, for the event loop (sans-IO ``xswire`` inside).

Requests are matched to replies by ``req_id``; watch events go to the
callback registered with the watch's token.  A request is written whole at
once (what the socket does not take waits, in order, for it to be writable),
so concurrent requesters never interleave and nobody awaits the write.  The domains of the Xen
connector use it on the connection the daemon gives them; the dom0 vif
backend uses it on the system xenstored's socket.  Errors are ``XsError``
with Xen's errno names; a lost connection fails every waiter with ``Closed``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
from collections.abc import Awaitable, Callable

from vbus.errors import Closed, ProtocolError, VbusError
from vbus.xen import xswire
from vbus.xen.xswire import XsError, XsType

__all__ = ["XsClient"]

_M32 = 0xFFFFFFFF
MAX_UNSENT = 1 << 20  # requests xenstored has not read yet: past this it is deaf


class XsClient:
    """The xenstore protocol over the domain's own connection (asyncio)."""

    def __init__(self, sock: socket.socket, loop: asyncio.AbstractEventLoop) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.loop = loop
        self.decoder = xswire.Decoder()
        self.pending: dict[int, asyncio.Future[xswire.Msg]] = {}
        self.watches: dict[bytes, Callable[[str], None]] = {}
        self._req = 0
        self._unsent = bytearray()
        self.error: VbusError | None = None
        loop.add_reader(sock.fileno(), self._readable)

    def _readable(self) -> None:
        try:
            data = self.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._lost(Closed(f"xenstore connection: {exc.strerror}"))
            return
        if not data:
            self._lost(Closed("xenstore closed the connection"))
            return
        try:
            msgs = self.decoder.feed(data)
        except ProtocolError as exc:
            self._lost(exc)
            return
        for msg in msgs:
            if msg.type == XsType.WATCH_EVENT:
                parts = xswire.split_strings(msg.payload)
                callback = self.watches.get(parts[1]) if len(parts) > 1 else None
                if callback is not None:
                    callback(parts[0].decode())
                continue
            future = self.pending.pop(msg.req_id, None)
            if future is not None and not future.done():
                future.set_result(msg)

    def _send(self, frame: bytes) -> None:
        if not self._unsent:
            try:
                sent = self.sock.send(frame)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as exc:
                self._lost(Closed(f"xenstore connection: {exc.strerror}"))
                return
            if sent == len(frame):
                return
            self.loop.add_writer(self.sock.fileno(), self._writable)
            frame = frame[sent:]
        self._unsent += frame
        if len(self._unsent) > MAX_UNSENT:
            self._lost(Closed("xenstore does not read its requests"))

    def _writable(self) -> None:
        try:
            sent = self.sock.send(self._unsent)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._lost(Closed(f"xenstore connection: {exc.strerror}"))
            return
        del self._unsent[:sent]
        if not self._unsent:
            self.loop.remove_writer(self.sock.fileno())

    def _lost(self, exc: VbusError) -> None:
        if self.error is None:
            self.error = exc
        with contextlib.suppress(ValueError, OSError):
            self.loop.remove_reader(self.sock.fileno())
        if self._unsent:
            with contextlib.suppress(ValueError, OSError):
                self.loop.remove_writer(self.sock.fileno())
            self._unsent.clear()
        for future in self.pending.values():
            if not future.done():
                future.set_exception(exc)
                future.exception()  # its requester may be gone: nobody else will look
        self.pending.clear()

    async def request(self, mtype: XsType, payload: bytes, tx: int = 0) -> bytes:
        if self.error is not None:
            raise self.error
        self._req = self._req % _M32 + 1
        req = self._req
        future: asyncio.Future[xswire.Msg] = self.loop.create_future()
        self.pending[req] = future
        self._send(xswire.encode(mtype, req, tx, payload))
        msg = await future
        if msg.type == XsType.ERROR:
            raise XsError.from_payload(msg.payload)
        return msg.payload

    async def read(self, path: str, tx: int = 0) -> bytes:
        return await self.request(XsType.READ, path.encode() + b"\0", tx)

    async def write(self, path: str, value: bytes | str, tx: int = 0) -> None:
        data = value.encode() if isinstance(value, str) else value
        await self.request(XsType.WRITE, path.encode() + b"\0" + data, tx)

    async def rm(self, path: str, tx: int = 0) -> None:
        await self.request(XsType.RM, path.encode() + b"\0", tx)

    async def directory(self, path: str) -> list[str]:
        body = await self.request(XsType.DIRECTORY, path.encode() + b"\0")
        return [c.decode() for c in xswire.split_strings(body)]

    async def watch(self, path: str, token: str, callback: Callable[[str], None]) -> None:
        self.watches[token.encode()] = callback
        await self.request(XsType.WATCH, xswire.join_strings([path.encode(), token.encode()]))

    async def unwatch(self, path: str, token: str) -> None:
        self.watches.pop(token.encode(), None)
        with contextlib.suppress(XsError, Closed):
            await self.request(XsType.UNWATCH, xswire.join_strings([path.encode(), token.encode()]))

    async def transaction(self, body: Callable[[int], Awaitable[None]], tries: int = 16) -> None:
        """Run ``body(tx)`` in a transaction, again on EAGAIN."""
        for _ in range(tries):
            tx = int((await self.request(XsType.TRANSACTION_START, b"\0")).rstrip(b"\0"))
            try:
                await body(tx)
            except BaseException:
                with contextlib.suppress(XsError, Closed):
                    await self.request(XsType.TRANSACTION_END, b"F\0", tx)
                raise
            try:
                await self.request(XsType.TRANSACTION_END, b"T\0", tx)
                return
            except XsError as exc:
                if exc.errno != errno.EAGAIN:
                    raise
        raise XsError(errno.EAGAIN, "transaction kept conflicting")

    def close(self) -> None:
        if self.error is None:
            self._lost(Closed("closed"))
        self.sock.close()
