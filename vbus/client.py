"""The process-side library: reach the devices on your bus from asyncio.

::

    async with vbus.client.connect() as bus:
        print(await bus.devices())
        dev = await bus.open("echo0")
        assert await dev.call(1, b"ping") == b"ping"
        tx = await dev.shm(0, "tx")          # north -> south ring
        rx = await dev.shm(1, "rx")          # south -> north ring
        reader = asyncio.create_task(rx.recv_many(256))   # echo needs room in rx
        await tx.send_many([b"x" * 64] * 200)             # backpressure: waits for space
        msgs = await reader                                # 1..256 messages

The socket path comes from ``path``, else ``$VBUS_SOCKET``, else the caller's
own daemon's run directory, then the system daemon's ``/run/vbus/vbus.sock``.
Errors arrive as the ``vbus.errors`` classes the daemon raised.  Queues live in a sealed memfd this library creates: a ring followed
by a pool of ``count`` buffers of ``buf_size`` bytes.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from vbus import protocol
from vbus.errors import Closed, Fault, Invalid, NotFound, VbusError, from_errno
from vbus.ioq import IoqNorth, pool_layout
from vbus.memory import create_memfd
from vbus.mitigation import wait_for_work
from vbus.paths import default_socket_path, socket_candidates
from vbus.signal import EventfdTransport

__all__ = ["Bus", "ClientQueue", "Device", "connect", "default_socket_path"]

MAX_EVENTS = 1024


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    id: int
    name: str
    deviceclass: str


class Bus:
    """A connection to the daemon: the devices of the caller's bus."""

    def __init__(self, sock: socket.socket, loop: asyncio.AbstractEventLoop) -> None:
        self._sock = sock
        self._loop = loop
        self._seq = 0
        self._pending: dict[int, asyncio.Future[protocol.Message | bytes]] = {}
        self._devices: dict[int, Device] = {}
        self._closed: VbusError | None = None
        self.events: asyncio.Queue[protocol.Event] = asyncio.Queue(MAX_EVENTS)
        self.name = ""
        self.client_id = 0
        loop.add_reader(sock.fileno(), self._read_frame)

    # --- plumbing ---------------------------------------------------------
    async def _call(self, handle: int, func: int, data: bytes) -> bytes:
        """call() round trip: the frames are built and matched without message objects."""
        if self._closed is not None:
            raise self._closed
        self._seq = (self._seq + 1) & 0xFFFFFFFF or 1
        seq = self._seq
        frame = protocol.call_frame(seq, handle, func, data)
        future: asyncio.Future[protocol.Message | bytes] = self._loop.create_future()
        self._pending[seq] = future
        try:
            try:
                self._sock.send(frame)
            except BlockingIOError:
                await self._send(frame, ())
            except OSError as exc:
                raise self._send_failed(exc) from None
            reply = await future
        finally:
            _forget(self._pending.pop(seq, None))
        if type(reply) is bytes:
            return reply
        if isinstance(reply, protocol.Error):
            raise reply.exception()
        raise Closed(f"vbusd answered a call with {type(reply).__name__}")

    async def _request(self, msg: protocol.Message, fds: Sequence[int] = ()) -> protocol.Message:
        if self._closed is not None:
            raise self._closed
        self._seq = (self._seq + 1) & 0xFFFFFFFF or 1
        seq = self._seq
        frame = protocol.encode(msg, seq)
        future: asyncio.Future[protocol.Message | bytes] = self._loop.create_future()
        self._pending[seq] = future
        try:
            await self._send(frame, fds)
            reply = await future
        finally:
            _forget(self._pending.pop(seq, None))
        if isinstance(reply, protocol.Error):
            raise reply.exception()
        if type(reply) is bytes:
            return protocol.Result(reply)
        return reply  # type: ignore[return-value]

    async def _send(self, frame: bytes, fds: Sequence[int]) -> None:
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        while True:
            try:
                self._sock.sendmsg([frame], ancillary)
                return
            except BlockingIOError:
                writable = self._loop.create_future()
                self._loop.add_writer(self._sock.fileno(), _resolve, writable)
                try:
                    await writable
                finally:
                    self._loop.remove_writer(self._sock.fileno())
            except OSError as exc:
                raise self._send_failed(exc) from None

    def _send_failed(self, exc: OSError) -> VbusError:
        self._hang_up(exc)
        assert self._closed is not None
        return self._closed

    def _hang_up(self, exc: OSError) -> None:
        """The daemon hung up (EPIPE, ECONNRESET).  What it said before, say a
        refusal and why, may still wait unread behind the error: that is the
        reason to give, not the broken pipe."""
        for _ in range(64):
            if self._closed is not None:
                return
            try:
                data = self._sock.recv(protocol.MAX_FRAME)
            except OSError:
                break
            if not data:
                break
            result = protocol.split_result(data)
            if result is None:
                self._on_message(data)
            else:
                future = self._pending.get(result[0])
                if future is not None and not future.done():
                    future.set_result(result[1])
        self._lost(Closed(f"connection to vbusd lost: {exc.strerror}"))

    def _read_frame(self) -> bool:
        """Handle one frame; False when there was none to read.

        The reader callback: one frame per wake-up, since a reply is usually
        alone, and reading on until EAGAIN would cost a failed syscall and an
        exception per call().  The loop calls again while more is queued."""
        if self._closed is not None:
            return False
        try:
            # The daemon never sends descriptors, so plain recv: were any sent,
            # the kernel would drop (close) them rather than hand them to us.
            data = self._sock.recv(protocol.MAX_FRAME)
        except BlockingIOError:
            return False
        except OSError as exc:
            self._hang_up(exc)
            return False
        if not data:
            self._lost(Closed("vbusd closed the connection"))
            return False
        result = protocol.split_result(data)
        if result is not None:  # the call() hot path
            future = self._pending.get(result[0])
            if future is not None and not future.done():
                future.set_result(result[1])
        else:
            self._on_message(data)
        return True

    def _on_message(self, data: bytes) -> None:
        try:
            seq, msg = protocol.decode_reply(data, 0)
        except VbusError as exc:
            self._lost(Closed(f"vbusd sent a malformed message: {exc.message}"))
            return
        if isinstance(msg, protocol.Event):
            self._on_event(msg)
            return
        if seq == 0 and isinstance(msg, protocol.Error):
            # No request has sequence 0: this is why the daemon is hanging up
            # (a connection cap, a descriptor bound), sent before it closes.
            self._lost(from_errno(msg.errno, f"vbusd refused the connection: {msg.message}"))
            return
        pending = self._pending.get(seq)
        if pending is not None and not pending.done():
            pending.set_result(msg)

    def _on_event(self, event: protocol.Event) -> None:
        if event.handle:
            device = self._devices.get(event.handle)
            if device is not None:
                device._gone(event)
        elif event.kind in (protocol.EventKind.SHUTDOWN, protocol.EventKind.BUS_GONE):
            for device in list(self._devices.values()):
                device._gone(event)
        if self.events.full():
            self.events.get_nowait()  # keep the newest; never grow without bound
        self.events.put_nowait(event)

    def _lost(self, exc: VbusError) -> None:
        if self._closed is not None:
            return
        self._closed = exc
        self._loop.remove_reader(self._sock.fileno())
        for future in self._pending.values():
            if not future.done():
                future.set_exception(exc)
        for device in list(self._devices.values()):
            device._fail(exc)
        self._sock.close()

    # --- the API -------------------------------------------------------------
    async def hello(self, name: str) -> None:
        reply = await self._request(protocol.Hello(1, 1, protocol.clip(name, protocol.NAME_MAX)))
        assert isinstance(reply, protocol.Welcome)
        self.name = reply.bus
        self.client_id = reply.client_id

    async def devices(self) -> list[DeviceInfo]:
        """The devices on this connection's bus."""
        reply = await self._request(protocol.Enumerate())
        assert isinstance(reply, protocol.Devices)
        return [DeviceInfo(d.id, d.name, d.deviceclass) for d in reply.devices]

    async def open(self, device: str | int) -> Device:
        """Open a device by name or id.  ``NotFound`` if it is not on this bus."""
        if isinstance(device, int):
            msg = protocol.Open(device_id=device)
        else:
            msg = protocol.Open(name=device)
        reply = await self._request(msg)
        assert isinstance(reply, protocol.Opened)
        dev = Device(self, reply.handle, DeviceInfo(reply.device_id, reply.name, reply.deviceclass))
        self._devices[reply.handle] = dev
        return dev

    async def status(self) -> dict[str, str]:
        """The daemon's health counters (for the daemon's own uid or root)."""
        reply = await self._request(protocol.Status())
        assert isinstance(reply, protocol.Result)
        pairs = (line.split(" ", 1) for line in reply.data.decode().splitlines() if " " in line)
        return {key: value for key, value in pairs}

    async def close(self) -> None:
        for device in list(self._devices.values()):
            device._fail(Closed("connection closed"))  # what a waiting send/recv raises
            device._release()
        self._devices.clear()
        self._lost(Closed("connection closed"))

    @property
    def closed(self) -> bool:
        return self._closed is not None


class Device:
    """An open device: ``call()`` and ``shm()``."""

    def __init__(self, bus: Bus, handle: int, info: DeviceInfo) -> None:
        self.bus = bus
        self.handle = handle
        self.info = info
        self.queues: dict[int, ClientQueue] = {}
        self.error: VbusError | None = None

    def call(self, func: int, data: bytes = b"") -> Awaitable[bytes]:
        """Synchronous request/reply: ``await dev.call(func, data)``."""
        if self.error is not None:
            raise self.error
        return self.bus._call(self.handle, func, data)

    async def shm(
        self,
        index: int,
        direction: Literal["tx", "rx"],
        *,
        count: int = 256,
        buf_size: int = 2048,
        mitigation: bool = True,
    ) -> ClientQueue:
        """Register queue ``index``: ``tx`` carries messages to the device,
        ``rx`` brings them back.  ``count`` descriptors of ``buf_size`` bytes.

        ``mitigation=False`` signals every single message in both directions,
        the way a naive ring would: only useful to measure what mitigation buys."""
        if self.error is not None:
            raise self.error
        if direction not in ("tx", "rx"):
            raise Invalid("direction must be 'tx' or 'rx'")
        if buf_size <= 0:
            raise Invalid("buf_size must be positive")
        queue = ClientQueue(self, index, direction, count, buf_size, mitigation)
        flags = protocol.SHM_WRITABLE if direction == "rx" else 0
        if not mitigation:
            flags |= protocol.SHM_NO_MITIGATION
        try:
            await self.bus._request(
                protocol.Shm(self.handle, index, 0, count, flags),
                (queue.memfd, queue.kick.fd, queue.call.fd),
            )
        except BaseException:
            queue._release()
            raise
        os.close(queue.memfd)  # the daemon holds its own reference now
        queue.memfd = -1
        if direction == "rx":
            queue.ring.post_empty(count)
            queue.ring.signal.notify(force=not mitigation)
        self.queues[index] = queue
        return queue

    async def close(self) -> None:
        if self.error is None:
            with contextlib.suppress(Closed, NotFound):
                await self.bus._request(protocol.Close(self.handle))
        self._release()
        self.error = self.error or Closed("device closed")

    def _release(self) -> None:
        for queue in self.queues.values():
            queue._release()
        self.queues.clear()
        self.bus._devices.pop(self.handle, None)

    def _gone(self, event: protocol.Event) -> None:
        kind = protocol.EventKind(event.kind)
        if kind == protocol.EventKind.FAULT:
            self._fail(Fault(f"{self.info.name} faulted: {event.reason}"))
        else:
            self._fail(Closed(f"{self.info.name}: {kind.name.lower()}: {event.reason}"))

    def _fail(self, exc: VbusError) -> None:
        if self.error is None:
            self.error = exc
        for queue in self.queues.values():
            queue._wake_with(self.error)


class ClientQueue:
    """North end of one ring.  ``send``/``send_many`` on tx, ``recv``/``recv_many`` on rx."""

    def __init__(
        self,
        device: Device,
        index: int,
        direction: str,
        count: int,
        buf_size: int,
        mitigation: bool = True,
    ) -> None:
        data_offset, total = pool_layout(count, buf_size)
        self.device = device
        self.index = index
        self.direction = direction
        self.memfd, self._map = create_memfd(f"vbus-q{index}", total)
        self.kick = EventfdTransport.create()  # north -> south
        self.call = EventfdTransport.create()  # south -> north
        self.ring = IoqNorth(self._map, 0, count, data_offset, buf_size, self.kick)
        self.wakeups = 0
        self.mitigation = mitigation
        self._waiter: asyncio.Future[None] | None = None
        # Told when the device connection fails (a FAULT, the device or bus
        # gone): for callers that do not wait in send/recv (vbus tap's pump).
        self.on_error: Callable[[VbusError], None] | None = None

    @property
    def signals_sent(self) -> int:
        return self.ring.signal.sent

    async def send(self, data: bytes) -> None:
        await self.send_many((data,))

    async def send_many(self, payloads: Sequence[bytes]) -> None:
        """Post every payload, waiting for ring space as needed (backpressure)."""
        if self.direction != "tx":
            raise Invalid("send on a receive queue")
        ring = self.ring
        if not self.mitigation:
            for payload in payloads:  # one message, one signal
                while True:
                    self._check()
                    if ring.send_many((payload,)):
                        ring.signal.notify(force=True)
                        break
                    await self._wait(lambda: ring.space() > 0)
            return
        remaining = payloads
        while True:
            self._check()
            done = ring.send_many(remaining)
            if done:
                ring.signal.notify()
                if done == len(remaining):
                    return
                remaining = remaining[done:]
                continue
            await self._wait(lambda: ring.space() > 0)

    def post_from(
        self, readinto: Callable[[memoryview], int | None], max_len: int, limit: int
    ) -> int:
        """Post what ``readinto`` writes straight into the ring (``IoqNorth.send_from``),
        at most ``limit`` messages; returns how many, 0 when the ring is full
        (``wait_room``) or there was nothing to read.  Never waits."""
        if self.direction != "tx":
            raise Invalid("post_from on a receive queue")
        self._check()
        ring = self.ring
        done = ring.send_from(readinto, max_len, limit)
        if done:
            ring.signal.notify(force=not self.mitigation)
        return done

    async def wait_room(self, max_len: int) -> None:
        """Until the ring can take a message of ``max_len`` bytes."""
        ring = self.ring
        while not ring.room_for(max_len):
            self._check()
            await self._wait(lambda: ring.room_for(max_len))

    async def recv(self) -> bytes:
        return (await self.recv_many(1))[0]

    async def recv_each(self, consume: Callable[[memoryview], object], limit: int = 256) -> int:
        """``recv_many`` without copies: at least one message, at most ``limit``,
        each handed to ``consume`` as a view valid only during that call."""
        ring = self.ring
        while True:
            n = self.take_each(consume, limit)
            if n:
                return n
            await self._wait(lambda: ring.completed() > 0)

    def take_each(self, consume: Callable[[memoryview], object], limit: int = 256) -> int:
        """``recv_each`` for what is there now (0: nothing); never waits."""
        if self.direction != "rx":
            raise Invalid("recv on a transmit queue")
        self._check()
        ring = self.ring
        n = ring.recv_each(consume, limit)
        if n:
            ring.signal.notify(force=not self.mitigation)  # fresh buffers posted
        return n

    async def recv_many(self, limit: int = 256) -> list[bytes]:
        """At least one message, at most ``limit``."""
        if self.direction != "rx":
            raise Invalid("recv on a transmit queue")
        ring = self.ring
        if not self.mitigation:
            limit = 1
        while True:
            self._check()
            msgs = ring.recv_many(limit)
            if msgs:
                # Fresh buffers posted: wake a south waiting for them.
                ring.signal.notify(force=not self.mitigation)
                return msgs
            await self._wait(lambda: ring.completed() > 0)

    def _check(self) -> None:
        if self.device.error is not None:
            raise self.device.error

    async def _wait(self, has_work: object) -> None:
        self.wakeups += 1
        waiter = asyncio.ensure_future(wait_for_work(self.ring.signal, has_work, self.call))  # type: ignore[arg-type]
        self._waiter = waiter
        try:
            await waiter
        except asyncio.CancelledError:
            if self.device.error is not None and not _current_task_cancelling():
                raise self.device.error from None
            raise
        finally:
            self._waiter = None

    def _wake_with(self, exc: VbusError) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.cancel()
        if self.on_error is not None:
            self.on_error(exc)

    def _release(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.cancel()
            # Unregister now: the waiter's own clean-up only runs after the fd is closed.
            self.device.bus._loop.remove_reader(self.call.fd)
        self.ring.close()
        with contextlib.suppress(BufferError):
            self._map.close()
        self.kick.close()
        self.call.close()
        if self.memfd >= 0:
            os.close(self.memfd)
            self.memfd = -1


def _current_task_cancelling() -> bool:
    task = asyncio.current_task()
    return bool(task is not None and task.cancelling())


def _forget(future: asyncio.Future[protocol.Message | bytes] | None) -> None:
    """A reply future nobody awaits any more: its exception (the connection was
    lost while sending) is already raised to the caller another way."""
    if future is not None and future.done() and not future.cancelled():
        future.exception()


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


@contextlib.asynccontextmanager
async def connect(path: str | os.PathLike[str] | None = None, name: str = "") -> AsyncIterator[Bus]:
    """Connect to vbusd and say HELLO; yields the caller's ``Bus``.

    Without ``path``: ``$VBUS_SOCKET`` if set, else the socket of a daemon of
    the caller's uid, then the system daemon's (``vbus.paths.socket_candidates``)."""
    loop = asyncio.get_running_loop()
    sock = await _connect_socket(loop, path)
    bus = Bus(sock, loop)
    try:
        await bus.hello(name or f"pid-{os.getpid()}")
        yield bus
    finally:
        await bus.close()


async def _connect_socket(
    loop: asyncio.AbstractEventLoop, path: str | os.PathLike[str] | None
) -> socket.socket:
    candidates = [Path(path)] if path is not None else socket_candidates()
    tried: list[str] = []
    for target in candidates:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, str(target))
            return sock
        except OSError as exc:
            sock.close()
            tried.append(f"{target} ({exc.strerror})")
            reason = exc.strerror
    if path is not None:
        raise Closed(f"cannot connect to vbusd at {path}: {reason}")
    origin = " from VBUS_SOCKET" if os.environ.get("VBUS_SOCKET") else ""
    raise Closed(
        f"no vbusd found: tried{origin} {', '.join(tried)}; start vbusd, or choose its "
        "socket with --socket PATH or VBUS_SOCKET=PATH"
    )
