"""A domain's side of the Xen connector: attach, xenstore, grants, event channels, the frontend.

``DomU.attach`` makes the domain's memory and grant table (sealed memfds),
attaches on ``xen.sock`` and keeps the xenstore connection it gets back (an
unprivileged one: this domid's permissions, relative paths under
``/local/domain/N``).  ``DomU.frontend(name)`` runs the vbus frontend of one
device (docs/design.md 4.6), the way a Linux xenbus driver would:

1. read ``device/vbus/ID`` (its ``backend`` path) and wait, through a watch
   on the backend's ``state``, for InitWait;
2. grant the call page and, per queue, the ring page and the buffer pages
   (dom0 reads what the domain sends: those are read-only grants), and
   allocate an unbound event channel per queue and one for calls;
3. write ``call-ref``, ``call-event-channel``, ``queues`` and per queue
   ``queue-I/{ring-ref,count,writable,buf-refs,event-channel}``, then state
   Initialised, in one transaction (retried on EAGAIN);
4. wait for the backend's Connected and go Connected.

Grant references are page frame numbers (gref n grants frame n), so the
addresses in the ring's descriptors, ``gref * 4096 + offset``, are the
domain's own offsets.  Either end can close: ``Frontend.close()`` goes
Closing, waits for the backend to follow, ends access to every grant (which
Xen refuses while the backend still maps one) and goes Closed; a backend
that goes Closing first (a fault, the device unlinked) fails every waiter
with the backend's ``error`` and the frontend follows it down.

``main`` is ``vbus xen domu``.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import contextlib
import os
import signal
import socket
import struct
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from vbus.core.resources import parse_size
from vbus.errors import Closed, Invalid, NotFound, TimedOut, VbusError, from_errno
from vbus.ioq import IoqNorth, ring_bytes
from vbus.memory import PAGE_SIZE, create_memfd
from vbus.mitigation import wait_for_work
from vbus.paths import default_run_dir
from vbus.signal import EventfdTransport
from vbus.xen import abi
from vbus.xen.abi import MsgType, XenbusState
from vbus.xen.grants import ENTRY_SIZE, GrantTable
from vbus.xen.xsclient import XsClient
from vbus.xen.xswire import XsError

__all__ = ["DomU", "FrontQueue", "Frontend", "LocalPort", "XsClient", "main"]

_M32 = 0xFFFFFFFF
_CMSG_SPACE = socket.CMSG_SPACE(abi.MAX_FDS * 4)
MAX_COUNT = 64  # descriptors of a ring that fits its one page (192 + 64 * 32 bytes)


class LocalPort:
    """This domain's end of an event channel: wait on ``inbox``, send through ``outbox``."""

    def __init__(self, port: int, inbox: int, outbox: int) -> None:
        self.port = port
        self.inbox = EventfdTransport(inbox)
        self.outbox = EventfdTransport(outbox)
        os.set_blocking(inbox, False)
        os.set_blocking(outbox, False)

    def send(self) -> None:
        self.outbox.kick()

    def close(self) -> None:
        self.inbox.close()
        self.outbox.close()


class DomU:
    """An attached domain."""

    def __init__(self, domid: int, memory: int, loop: asyncio.AbstractEventLoop) -> None:
        self.domid = domid
        self.loop = loop
        self.memfd, self.memory = create_memfd(f"domu{domid}-memory", memory)
        self.pages = memory // PAGE_SIZE
        self.table_fd, self.table_map = create_memfd(f"domu{domid}-grants", self.pages * ENTRY_SIZE)
        self.grants = GrantTable(self.table_map)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        self.sock.setblocking(False)
        self.xs: XsClient | None = None
        self.bus = ""
        self.base = f"/local/domain/{domid}"
        self._next_page = 1  # frame 0 is never handed out
        self._seq = 0
        self._lock = asyncio.Lock()
        self.ports: dict[int, LocalPort] = {}
        self.frontends: list[Frontend] = []
        self.closed = False

    @classmethod
    async def attach(
        cls, path: str | os.PathLike[str], domid: int, memory: int = 16 << 20, name: str = ""
    ) -> DomU:
        if memory <= 0 or memory % PAGE_SIZE:
            raise Invalid("memory must be whole pages")
        domu = cls(domid, memory, asyncio.get_running_loop())
        try:
            await domu.loop.sock_connect(domu.sock, os.fspath(path))
            _mtype, fields, fds = await domu._request(
                abi.encode(MsgType.ATTACH, 0, abi.VERSION, domid, memory, domu.pages, name),
                [domu.memfd, domu.table_fd],
            )
            attached = fields[0]
            assert isinstance(attached, abi.Attached)
            domu.bus = attached.bus
            domu.xs = XsClient(socket.socket(fileno=fds[0]), domu.loop)
        except BaseException:
            domu._release()
            raise
        return domu

    async def _request(
        self, frame: bytes, fds: Sequence[int] = ()
    ) -> tuple[MsgType, tuple[object, ...], list[int]]:
        async with self._lock:
            self._seq += 1
            head = frame[:4] + struct.pack("<I", self._seq) + frame[8:]
            if fds:
                self.sock.sendmsg(
                    [head], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
                )
            else:
                await self.loop.sock_sendall(self.sock, head)
            while True:
                ready = self.loop.create_future()
                self.loop.add_reader(self.sock.fileno(), _resolve, ready)
                try:
                    await ready
                finally:
                    self.loop.remove_reader(self.sock.fileno())
                try:
                    data, ancdata, _flags, _ = self.sock.recvmsg(abi.MAX_FRAME, _CMSG_SPACE)
                except BlockingIOError:
                    continue
                break
            got: list[int] = []
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    got.extend(array.array("i", payload[: len(payload) - len(payload) % 4]))
            if not data:
                raise Closed("the daemon closed the domain's attachment")
            mtype, _seq, fields = abi.decode(data)
            if mtype == MsgType.ERROR:
                for fd in got:
                    os.close(fd)
                code, message = fields
                assert isinstance(code, int)
                raise from_errno(code, str(message))
            return mtype, fields, got

    # --- what a hypervisor would do ----------------------------------------------------------
    async def alloc_unbound(self, remote: int = 0) -> LocalPort:
        _t, fields, fds = await self._request(abi.encode(MsgType.EVTCHN_ALLOC_UNBOUND, 0, remote))
        (number,) = fields
        assert isinstance(number, int)
        port = LocalPort(number, fds[0], fds[1])
        self.ports[number] = port
        return port

    async def close_port(self, port: LocalPort) -> None:
        self.ports.pop(port.port, None)
        with contextlib.suppress(VbusError):
            await self._request(abi.encode(MsgType.EVTCHN_CLOSE, 0, port.port))
        port.close()

    def alloc_pages(self, n: int) -> int:
        """The first of ``n`` contiguous fresh page frames."""
        first = self._next_page
        if first + n > self.pages:
            raise Invalid(f"out of memory: {n} more pages do not fit {self.pages}")
        self._next_page += n
        return first

    def grant(self, frame: int, *, readonly: bool = False, domid: int = 0) -> int:
        """Grant ``frame`` to ``domid`` (dom0 unless told); the reference is the frame."""
        self.grants.grant(frame, domid, frame, readonly=readonly)
        return frame

    def end_access(self, ref: int) -> bool:
        return self.grants.end_access(ref)

    # --- devices ---------------------------------------------------------------------------------
    @property
    def store(self) -> XsClient:
        if self.xs is None:
            raise Closed("not attached")
        return self.xs

    async def devices(self) -> list[tuple[int, str, str]]:
        """(id, name, class) of every device the backend published for this domain."""
        out = []
        for entry in await self.store.directory(f"{self.base}/device/vbus"):
            front = f"{self.base}/device/vbus/{entry}"
            name = (await self.store.read(f"{front}/name")).decode()
            deviceclass = (await self.store.read(f"{front}/class")).decode()
            out.append((int(entry), name, deviceclass))
        return out

    async def frontend(self, device: str | int, **options: Any) -> Frontend:
        for devid, name, deviceclass in await self.devices():
            if device in (devid, name):
                frontend = Frontend(self, devid, name, deviceclass)
                self.frontends.append(frontend)
                await frontend.connect(**options)
                return frontend
        raise NotFound(f"no device {device!r} on this domain's bus")

    async def close(self) -> None:
        """Close every frontend properly, then detach."""
        for frontend in list(self.frontends):
            with contextlib.suppress(VbusError, XsError):
                await frontend.close()
        self._release()

    def _release(self) -> None:
        if self.closed:
            return
        self.closed = True
        for frontend in self.frontends:
            frontend._release()
        if self.xs is not None:
            self.xs.close()
        for port in self.ports.values():
            port.close()
        self.ports.clear()
        self.sock.close()
        self.grants.close()
        for mapping in (self.memory, self.table_map):
            with contextlib.suppress(BufferError):
                mapping.close()
        for fd in (self.memfd, self.table_fd):
            with contextlib.suppress(OSError):
                os.close(fd)


class FrontQueue:
    """The north end of one ring in granted pages."""

    def __init__(
        self, frontend: Frontend, index: int, writable: bool, count: int, buf_size: int
    ) -> None:
        domu = frontend.domu
        if not 1 <= count <= MAX_COUNT or count & (count - 1):
            raise Invalid(f"count {count}: a power of two up to {MAX_COUNT}")
        if buf_size <= 0 or PAGE_SIZE % buf_size:
            raise Invalid(f"buf_size {buf_size} must divide {PAGE_SIZE}")
        self.frontend = frontend
        self.index = index
        self.writable = writable
        self.count = count
        self.buf_size = buf_size
        self.ring_ref = domu.alloc_pages(1)
        npages = (count * buf_size + PAGE_SIZE - 1) // PAGE_SIZE
        self.data = domu.alloc_pages(npages)
        self.buf_refs = list(range(self.data, self.data + npages))
        self.port: LocalPort | None = None
        self.ring: IoqNorth | None = None
        self._waiter: asyncio.Future[None] | None = None
        assert ring_bytes(count) <= PAGE_SIZE

    async def setup(self) -> None:
        domu = self.frontend.domu
        self.port = await domu.alloc_unbound(0)
        self.ring = IoqNorth(
            domu.memory, self.ring_ref * PAGE_SIZE, self.count, self.data * PAGE_SIZE,
            self.buf_size, self.port.outbox,
        )  # fmt: skip
        domu.grant(self.ring_ref)
        for ref in self.buf_refs:
            # What the domain sends, dom0 only reads: read-only grants.
            domu.grant(ref, readonly=not self.writable)
        if self.writable:
            self.ring.post_empty(self.count)

    async def send_many(self, payloads: Sequence[bytes]) -> None:
        ring = self._ring()
        remaining = payloads
        while remaining:
            self.frontend.check()
            done = ring.send_slots(remaining)
            if done:
                ring.signal.notify()
                remaining = remaining[done:]
                continue
            await self._wait(lambda: ring.space() > 0)

    async def recv_many(self, limit: int = 256) -> list[bytes]:
        ring = self._ring()
        while True:
            self.frontend.check()
            msgs = ring.recv_many(limit)
            if msgs:
                ring.signal.notify()
                return msgs
            await self._wait(lambda: ring.completed() > 0)

    def _ring(self) -> IoqNorth:
        if self.ring is None:
            raise Closed("queue not set up")
        return self.ring

    async def _wait(self, has_work: Callable[[], bool]) -> None:
        assert self.ring is not None and self.port is not None
        waiter = asyncio.ensure_future(wait_for_work(self.ring.signal, has_work, self.port.inbox))
        self._waiter = waiter
        try:
            await waiter
        except asyncio.CancelledError:
            if self.frontend.error is not None:
                raise self.frontend.error from None
            raise
        finally:
            self._waiter = None

    def wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.cancel()
            if self.port is not None and self.port.inbox.fd >= 0:
                with contextlib.suppress(ValueError, OSError):
                    self.frontend.domu.loop.remove_reader(self.port.inbox.fd)

    def refs(self) -> list[int]:
        return [self.ring_ref, *self.buf_refs]


class Frontend:
    """The frontend of one vbus device."""

    def __init__(self, domu: DomU, devid: int, name: str, deviceclass: str) -> None:
        self.domu = domu
        self.devid = devid
        self.name = name
        self.deviceclass = deviceclass
        self.path = f"{domu.base}/device/vbus/{devid}"
        self.backend = ""
        self.state = XenbusState.INITIALISING
        self.backend_state = XenbusState.UNKNOWN
        self.queues: dict[int, FrontQueue] = {}
        self.call_ref = 0
        self.call_port: LocalPort | None = None
        self.call_words: memoryview[int] | None = None
        self.error: VbusError | None = None
        self._changed = asyncio.Event()
        self._call_lock = asyncio.Lock()
        self._token = f"be{devid}"
        self._following = False
        self.released = False

    async def _set_state(self, state: XenbusState, tx: int = 0) -> None:
        self.state = state
        await self.domu.store.write(f"{self.path}/state", str(int(state)), tx)

    def _backend_changed(self, _path: str) -> None:
        self.domu.loop.create_task(self._refresh())

    async def _refresh(self) -> None:
        with contextlib.suppress(XsError, Closed, ValueError):
            raw = await self.domu.store.read(f"{self.backend}/state")
            self.backend_state = XenbusState(int(raw))
        self._changed.set()
        if (
            self.backend_state in (XenbusState.CLOSING, XenbusState.CLOSED)
            and self.state == XenbusState.CONNECTED
            and not self._following
        ):
            self._following = True
            reason = "the backend closed"
            with contextlib.suppress(XsError, Closed):
                reason = (await self.domu.store.read(f"{self.backend}/error")).decode()
            self.fail(Closed(f"{self.name}: {reason}"))
            with contextlib.suppress(XsError, Closed):
                await self.close()

    async def wait_backend(self, *states: XenbusState, timeout: float = 10.0) -> XenbusState:
        deadline = time.monotonic() + timeout
        while self.backend_state not in states:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimedOut(f"backend state {self.backend_state.name}, waiting for {states}")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), left)
        return self.backend_state

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    def fail(self, exc: VbusError) -> None:
        if self.error is None:
            self.error = exc
        for queue in self.queues.values():
            queue.wake()

    async def connect(
        self,
        queues: Sequence[tuple[int, bool]] = ((0, False), (1, True)),
        count: int = MAX_COUNT,
        buf_size: int = 2048,
        tamper: Callable[[Frontend], Awaitable[None] | None] | None = None,
    ) -> None:
        """Walk the handshake to Connected.  ``queues``: (index, the device fills
        it).  ``tamper`` runs after the grants and before Initialised (tests)."""
        domu, xs = self.domu, self.domu.store
        self.backend = (await xs.read(f"{self.path}/backend")).decode()
        await xs.watch(f"{self.backend}/state", self._token, self._backend_changed)
        await self.wait_backend(XenbusState.INIT_WAIT)
        self.call_ref = domu.alloc_pages(1)
        domu.grant(self.call_ref)
        self.call_words = memoryview(domu.memory)[
            self.call_ref * PAGE_SIZE : self.call_ref * PAGE_SIZE + abi.CALL_DATA
        ].cast("I")
        self.call_port = await domu.alloc_unbound(0)
        for index, writable in queues:
            queue = FrontQueue(self, index, writable, count, buf_size)
            self.queues[index] = queue
            await queue.setup()
        if tamper is not None:
            maybe = tamper(self)
            if maybe is not None:
                await maybe

        async def publish(tx: int) -> None:
            assert self.call_port is not None
            await xs.write(f"{self.path}/call-ref", str(self.call_ref), tx)
            await xs.write(f"{self.path}/call-event-channel", str(self.call_port.port), tx)
            await xs.write(f"{self.path}/queues", " ".join(map(str, self.queues)), tx)
            for index, queue in self.queues.items():
                assert queue.port is not None
                q = f"{self.path}/queue-{index}"
                await xs.write(f"{q}/ring-ref", str(queue.ring_ref), tx)
                await xs.write(f"{q}/count", str(queue.count), tx)
                await xs.write(f"{q}/writable", "1" if queue.writable else "0", tx)
                await xs.write(f"{q}/buf-refs", " ".join(map(str, queue.buf_refs)), tx)
                await xs.write(f"{q}/event-channel", str(queue.port.port), tx)
            await self._set_state(XenbusState.INITIALISED, tx)

        await xs.transaction(publish)
        state = await self.wait_backend(
            XenbusState.CONNECTED, XenbusState.CLOSING, XenbusState.CLOSED
        )
        if state != XenbusState.CONNECTED:
            reason = (await xs.read(f"{self.backend}/error")).decode()
            raise Closed(f"{self.name}: the backend refused: {reason}")
        await self._set_state(XenbusState.CONNECTED)

    # --- traffic ---------------------------------------------------------------------------------
    async def call(self, func: int, data: bytes = b"") -> bytes:
        if len(data) > abi.CALL_DATA_MAX:
            raise Invalid(f"call data of {len(data)} bytes (at most {abi.CALL_DATA_MAX})")
        async with self._call_lock:
            self.check()
            words, port = self.call_words, self.call_port
            assert words is not None and port is not None
            memory = self.domu.memory
            base = self.call_ref * PAGE_SIZE
            memory[base + abi.CALL_DATA : base + abi.CALL_DATA + len(data)] = data
            words[2] = func
            words[3] = len(data)
            req = (words[0] + 1) & _M32
            words[0] = req
            port.send()
            loop = self.domu.loop
            while words[1] != req:
                self.check()
                ready = loop.create_future()
                loop.add_reader(port.inbox.fd, _resolve, ready)
                try:
                    await asyncio.wait_for(ready, 0.5)
                except TimeoutError:
                    pass
                finally:
                    loop.remove_reader(port.inbox.fd)
                port.inbox.drain()
            status = struct.unpack("<i", struct.pack("<I", words[4]))[0]
            length = words[5]
            if status:
                raise from_errno(-status, f"{self.name}: call {func} failed")
            return bytes(memory[base + abi.CALL_DATA : base + abi.CALL_DATA + length])

    # --- closing ----------------------------------------------------------------------------------
    async def close(self, timeout: float = 10.0) -> None:
        """Closing, the backend follows, access ended to every grant, Closed."""
        if self.released:
            return
        xs = self.domu.store
        if self.state not in (XenbusState.CLOSING, XenbusState.CLOSED):
            await self._set_state(XenbusState.CLOSING)
        self.fail(Closed(f"{self.name}: closed"))
        with contextlib.suppress(TimedOut):
            await self.wait_backend(XenbusState.CLOSING, XenbusState.CLOSED, timeout=timeout)
        refused = self.end_access()
        if refused:
            raise VbusError(f"{self.name}: grants still mapped by the backend: {refused}")
        for port in [q.port for q in self.queues.values()] + [self.call_port]:
            if port is not None:
                await self.domu.close_port(port)
        await self._set_state(XenbusState.CLOSED)
        await xs.unwatch(f"{self.backend}/state", self._token)
        self._release()

    def end_access(self) -> list[int]:
        """End access to every grant of this device; the references Xen refused."""
        refs = [self.call_ref] if self.call_ref else []
        for queue in self.queues.values():
            refs += queue.refs()
        return [ref for ref in refs if not self.domu.end_access(ref)]

    def _release(self) -> None:
        if self.released:
            return
        self.released = True
        for queue in self.queues.values():
            queue.wake()
            if queue.ring is not None:
                queue.ring.close()
        if self.call_words is not None:
            self.call_words.release()
            self.call_words = None


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


# --- vbus xen domu ------------------------------------------------------------------------------


def add_parser(sub: Any) -> None:
    xen = sub.add_parser("xen", help="Xen: run a domain's side against vbusd's Xen connector")
    xen_sub = xen.add_subparsers(dest="xen_command", metavar="COMMAND", required=True)
    domu = xen_sub.add_parser(
        "domu",
        help="attach as a Xen domain and run its vbus frontend",
        description="Attach as domain DOMID (admitted by a domid:N member rule), connect "
        "the frontend of a device of its bus through xenstore, grants and event channels, "
        "and echo messages through it; without --messages it stays connected until "
        "interrupted.",
    )
    domu.add_argument("--domid", type=int, required=True, help="the domain id (1..32751)")
    domu.add_argument("--memory", default="16M", help="the domain's memory (default: 16M)")
    domu.add_argument("--device", default=None, help="device name or id (default: the first)")
    domu.add_argument("--messages", type=int, default=0, help="echo N messages, then detach")
    domu.add_argument("--size", type=int, default=64, help="message bytes (default: 64)")
    domu.add_argument("--name", default="", help="the domain's name in xenstore")
    domu.add_argument(
        "--xen-socket",
        type=Path,
        default=None,
        help="vbusd's xen.sock (default: $VBUS_XEN_SOCKET, else in the default run directory)",
    )


def main(args: argparse.Namespace) -> int:
    try:
        memory = parse_size(args.memory)
    except (ValueError, VbusError):
        print(f"vbus xen domu: bad --memory {args.memory!r}", file=sys.stderr)
        return 2
    path = args.xen_socket or Path(
        os.environ.get("VBUS_XEN_SOCKET") or default_run_dir() / "xen.sock"
    )
    try:
        return asyncio.run(_run_domu(path, args, memory))
    except (VbusError, XsError) as exc:
        print(f"vbus xen domu: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


async def _run_domu(path: Path, args: argparse.Namespace, memory: int) -> int:
    domu = await DomU.attach(path, args.domid, memory, args.name)
    try:
        print(f"attached: domain {args.domid} on bus {domu.bus}", flush=True)
        devices = await domu.devices()
        if not devices:
            raise NotFound("no device on this domain's bus")
        ref: str | int = args.device if args.device is not None else devices[0][1]
        if isinstance(ref, str) and ref.isdigit():
            ref = int(ref)
        frontend = await domu.frontend(ref)
        print(f"connected: {frontend.name} ({frontend.deviceclass}) frontend and backend "
              f"Connected", flush=True)  # fmt: skip
        if args.messages:
            await _echo(frontend, args.messages, args.size)
        else:
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(signum, stop.set)
            gone = asyncio.ensure_future(_until_closed(frontend))
            waiter = asyncio.ensure_future(stop.wait())
            await asyncio.wait([gone, waiter], return_when=asyncio.FIRST_COMPLETED)
            gone.cancel()
            waiter.cancel()
            frontend.check()
        await domu.close()
        print("detached", flush=True)
        return 0
    finally:
        domu._release()


async def _until_closed(frontend: Frontend) -> None:
    while frontend.error is None:
        await asyncio.sleep(0.2)


async def _echo(frontend: Frontend, n: int, size: int) -> None:
    reply = await frontend.call(1, b"hello from a domain")
    if reply != b"hello from a domain":
        raise VbusError(f"call() echoed {reply!r}")
    tx, rx = frontend.queues[0], frontend.queues[1]
    payloads = [i.to_bytes(8, "little") * (size // 8) for i in range(n)]
    started = time.perf_counter()

    async def receive() -> list[bytes]:
        got: list[bytes] = []
        while len(got) < n:
            got += await rx.recv_many(n - len(got))
        return got

    receiving = asyncio.ensure_future(receive())
    await tx.send_many(payloads)
    got = await receiving
    elapsed = time.perf_counter() - started
    bad = sum(1 for a, b in zip(got, payloads, strict=True) if a != b)
    if bad:
        raise VbusError(f"{bad} of {n} messages came back wrong")
    print(f"echoed: {n} messages of {size} B verified in {elapsed:.3f} s "
          f"({n / elapsed:,.0f} msg/s)", flush=True)  # fmt: skip
