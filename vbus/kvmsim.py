"""A KVM guest and its VMM in pure Python: the kvm connector's north where
/dev/kvm is missing, and a hostile guest that can be scripted.

``SimGuest`` does what a VMM and its guest do, through the same memory and
eventfds (docs/design.md 4.5):

- the VMM's part: guest RAM as one sealed memfd, registered as two regions
  with a hole between them (``REGIONS``); doorbell eventfds (what
  KVM_IOEVENTFD would signal on a guest write) and interrupt eventfds (what
  KVM_IRQFD would inject); one REGISTER on ``kvm.sock``;
- the guest's part: it formats the bridge page, rings doorbell 0, posts call
  slots (ENUMERATE, OPEN, CALL, SHM, CLOSE) and waits on interrupt 0; its
  queues are ioq rings in guest RAM (``IoqNorth`` over the RAM mapping,
  where guest-physical address = offset in the memfd), their data areas in
  the second region, so every descriptor the daemon sees is a guest-physical
  address it must translate across regions.

Hostile acts are methods: ``scribble_bridge``, ``garbage_call_ring``,
``post_outside`` (a descriptor into the hole), ``storm`` (a doorbell rung
far beyond any work), a stalled receiver (``shm`` and never ``recv``), and
``register_bad`` (memory tables the daemon must refuse).

``python -m vbus.kvmsim SOCKET`` runs one simulated guest in its own process
(registers, opens ``echo0``, streams echo traffic until killed), printing
``ready`` once traffic flows: a VMM that can be SIGKILLed.  A refused
registration prints ``refused ERRNO MESSAGE`` and exits 1; ``--as-uid``
makes it a VMM of another uid.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import contextlib
import fcntl
import mmap
import os
import random
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from vbus import kvmabi
from vbus.errors import Fault, Invalid, TimedOut, VbusError, from_errno
from vbus.ioq import IoqNorth, ring_bytes
from vbus.kvmabi import CallSlot, GuestBridge, Op, Region
from vbus.memory import REQUIRED_SEALS
from vbus.signal import EventfdTransport

__all__ = [
    "BAD_TABLES",
    "BRIDGE_GPA",
    "HOLE",
    "RAM_SIZE",
    "REGIONS",
    "GuestFaulted",
    "SimGuest",
    "main",
    "run_vmm",
]

MiB = 1 << 20
RAM_SIZE = 4 * MiB
# Guest-physical = memfd offset; [1 MiB, 2 MiB) is a hole no region covers.
REGIONS = (Region(0, MiB, 0), Region(2 * MiB, 2 * MiB, 2 * MiB))
HOLE = (MiB, 2 * MiB)
BRIDGE_GPA = 0x1000
DATA_GPA = 0x2000  # OPEN names and CALL data (4 KiB)
REPLY_GPA = 0x4000  # replies (64 KiB)
RINGS_GPA = 0x20000  # ring k at RINGS_GPA + k * RING_STRIDE, in region 0
RING_STRIDE = 0x10000
POOLS_GPA = 2 * MiB  # pool k at POOLS_GPA + k * POOL_STRIDE, in region 1
POOL_STRIDE = 256 * 1024
MAX_QUEUES = 8

# Memory tables the daemon must refuse, each with what the refusal names.
BAD_TABLES: dict[str, str] = {
    "unsealed": "not sealed",
    "not_memfd": "not a memfd",
    "misaligned": "aligned",
    "overlap": "overlap",
    "beyond_file": "has no",
    "bridge_outside": "outside every region",
    "bridge_readonly": "read-only",
    "fd_count": "descriptors",
    "semaphore": "semaphore",
    "garbage": "",
}


class GuestFaulted(Exception):
    """The daemon faulted this guest (its fault register is set)."""

    def __init__(self, reason: int, detail: int) -> None:
        super().__init__(f"guest faulted: reason {reason}, detail {detail}")
        self.reason = reason
        self.detail = detail


def _eventfd(semaphore: bool = False) -> int:
    flags = os.EFD_NONBLOCK | os.EFD_CLOEXEC | (os.EFD_SEMAPHORE if semaphore else 0)
    return os.eventfd(0, flags)


def _sealed_memfd(name: str, size: int, *, seal: bool = True) -> int:
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    if seal:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, REQUIRED_SEALS | fcntl.F_SEAL_SEAL)
    return fd


class SimGuest:
    """One simulated VMM with its guest, on the caller's event loop."""

    def __init__(
        self, path: Path | str, name: str = "sim0", *, ndoorbells: int = 3, nirqs: int = 2
    ) -> None:
        self.path = Path(path)
        self.name = name
        self.ram_fd = _sealed_memfd(f"{name}-ram", RAM_SIZE)
        self.ram = mmap.mmap(self.ram_fd, RAM_SIZE, mmap.MAP_SHARED)
        self.doorbells = [_eventfd() for _ in range(ndoorbells)]
        self.irqs = [_eventfd() for _ in range(nirqs)]
        self.sock: socket.socket | None = None
        self.frames: asyncio.Queue[kvmabi.Message] = asyncio.Queue()
        self.hung_up: asyncio.Event = asyncio.Event()
        self.registered: kvmabi.Registered | None = None
        self.bridge: GuestBridge | None = None
        self.rings: list[IoqNorth] = []
        self._lock = asyncio.Lock()
        self._queues = 0

    # --- the VMM's part -------------------------------------------------------------------
    def _connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        sock.connect(str(self.path))
        sock.setblocking(False)
        self.sock = sock
        asyncio.get_running_loop().add_reader(sock.fileno(), self._readable)
        return sock

    def _readable(self) -> None:
        assert self.sock is not None
        try:
            data = self.sock.recv(kvmabi.MAX_FRAME)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            asyncio.get_running_loop().remove_reader(self.sock.fileno())
            self.hung_up.set()
            return
        self.frames.put_nowait(kvmabi.decode_reply(data)[1])

    def message(
        self, regions: Sequence[Region] = REGIONS, bridge: int = BRIDGE_GPA
    ) -> kvmabi.Register:
        return kvmabi.Register(
            self.name, tuple(regions), len(self.doorbells), len(self.irqs), bridge
        )

    async def register(self, timeout: float = 10.0) -> kvmabi.Registered:
        """Register the guest as a VMM would; the daemon's ERROR is raised as
        its ``VbusError``."""
        msg = self.message()
        fds = [self.ram_fd] * len(msg.regions) + self.doorbells + self.irqs
        reply = await self.send_register(kvmabi.encode(msg, 1), fds, timeout)
        if isinstance(reply, kvmabi.Error):
            raise from_errno(reply.errno, reply.message)
        assert isinstance(reply, kvmabi.Registered)
        self.registered = reply
        return reply

    async def send_register(
        self, frame: bytes, fds: Sequence[int], timeout: float = 10.0
    ) -> kvmabi.Message:
        sock = self.sock or self._connect()
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, _fd_array(fds))] if fds else []
        sock.sendmsg([frame], ancillary)
        return await self.reply(timeout)

    async def reply(self, timeout: float = 10.0) -> kvmabi.Message:
        """The next frame from the daemon."""
        try:
            async with asyncio.timeout(timeout):
                return await self.frames.get()
        except TimeoutError:
            raise TimedOut("no frame from the daemon") from None

    async def register_bad(self, kind: str, timeout: float = 10.0) -> kvmabi.Message:
        """Send one of ``BAD_TABLES``' registrations; the daemon's answer (it
        hangs up after it)."""
        msg = self.message()
        fds: list[int] = [self.ram_fd] * 2 + self.doorbells + self.irqs
        made: list[int] = []
        frame: bytes | None = None
        if kind == "unsealed":
            made.append(_sealed_memfd("unsealed", RAM_SIZE, seal=False))
            fds[0] = made[-1]
        elif kind == "not_memfd":
            r, w = os.pipe()
            made += [r, w]
            fds[1] = r
        elif kind == "misaligned":
            msg = self.message((Region(0, MiB, 0x100), REGIONS[1]))
        elif kind == "overlap":
            msg = self.message((Region(0, 3 * MiB, 0), REGIONS[1]))
        elif kind == "beyond_file":
            msg = self.message((REGIONS[0], Region(2 * MiB, 4 * MiB, 2 * MiB)))
        elif kind == "bridge_outside":
            msg = self.message(bridge=HOLE[0])
        elif kind == "bridge_readonly":
            msg = self.message((Region(0, MiB, 0, readonly=True), REGIONS[1]))
        elif kind == "fd_count":
            fds = fds[:-1]
        elif kind == "semaphore":
            made.append(_eventfd(semaphore=True))
            fds[2] = made[-1]
        elif kind == "garbage":
            frame = random.Random(len(self.name)).randbytes(200)
        else:
            raise Invalid(f"unknown bad table {kind!r}; known: {', '.join(BAD_TABLES)}")
        try:
            if frame is None:
                frame = kvmabi.encode(msg, 1)
            return await self.send_register(frame, fds, timeout)
        finally:
            for fd in made:
                os.close(fd)

    # --- the guest's part -----------------------------------------------------------------
    def boot(self, irq_enable: bool = True) -> GuestBridge:
        """Format the bridge page (the guest's first act)."""
        self.bridge = GuestBridge(self.ram, BRIDGE_GPA)
        self.bridge.irq_enable = irq_enable
        return self.bridge

    def ring(self, doorbell: int, times: int = 1) -> None:
        """A guest write to a doorbell's address: KVM signals its eventfd."""
        with contextlib.suppress(BlockingIOError):
            os.eventfd_write(self.doorbells[doorbell], times)

    def interrupts(self, irq: int) -> int:
        """How often interrupt ``irq`` was raised since the last look (drains it)."""
        try:
            return os.eventfd_read(self.irqs[irq])
        except BlockingIOError:
            return 0

    @property
    def fault(self) -> tuple[int, int]:
        assert self.bridge is not None
        return self.bridge.fault

    async def _wait_irq(self, irq: int, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        ready = loop.create_future()
        fd = self.irqs[irq]
        loop.add_reader(fd, _wake, ready)
        try:
            # asyncio.timeout, not wait_for: wait_for (3.11) loses a cancellation
            # that arrives as the interrupt does, and the caller runs on.
            async with asyncio.timeout(timeout):
                await ready
        except TimeoutError:
            pass
        finally:
            loop.remove_reader(fd)

    async def request(self, slot: CallSlot, timeout: float = 10.0) -> CallSlot:
        """Post one call slot, ring doorbell 0, wait for its answer."""
        bridge = self.bridge or self.boot()
        async with self._lock:
            bridge.post(slot)
            self.ring(0)
            deadline = time.monotonic() + timeout
            while not bridge.answered():
                reason, detail = bridge.fault
                if reason:
                    raise GuestFaulted(reason, detail)
                if time.monotonic() > deadline:
                    raise TimedOut(f"no answer to {Op(slot.op).name}")
                await self._wait_irq(0, 0.05)
            answer = bridge.reap()
            assert answer is not None
            return answer

    @staticmethod
    def _check(answer: CallSlot) -> CallSlot:
        if answer.status < 0:
            raise from_errno(-answer.status, f"{Op(answer.op).name}: errno {-answer.status}")
        return answer

    async def enumerate(self) -> tuple[kvmabi.DeviceEntry, ...]:
        answer = self._check(
            await self.request(CallSlot(Op.ENUMERATE, reply=REPLY_GPA, reply_cap=65536))
        )
        return kvmabi.decode_devices(self.ram[REPLY_GPA : REPLY_GPA + answer.reply_len])

    async def open(self, name: str) -> int:
        raw = name.encode()
        self.ram[DATA_GPA : DATA_GPA + len(raw)] = raw
        answer = self._check(await self.request(CallSlot(Op.OPEN, addr=DATA_GPA, len=len(raw))))
        return answer.handle

    async def call(self, handle: int, func: int, data: bytes) -> bytes:
        self.ram[DATA_GPA : DATA_GPA + len(data)] = data
        answer = self._check(
            await self.request(
                CallSlot(
                    Op.CALL,
                    handle=handle,
                    arg=func,
                    addr=DATA_GPA,
                    len=len(data),
                    reply=REPLY_GPA,
                    reply_cap=65536,
                )
            )
        )
        return bytes(self.ram[REPLY_GPA : REPLY_GPA + answer.reply_len])

    async def close_handle(self, handle: int) -> None:
        self._check(await self.request(CallSlot(Op.CLOSE, handle=handle)))

    async def shm(
        self,
        handle: int,
        index: int,
        *,
        writable: bool,
        count: int = 256,
        buf_size: int = 512,
        doorbell: int = 1,
        irq: int = 1,
        mitigation: bool = True,
        post: int | None = None,
    ) -> IoqNorth:
        """An ioq ring in guest RAM (region 0), its buffers in region 1,
        registered as queue ``index`` of ``handle``; a writable one gets
        ``post`` empty buffers (all ``count`` unless given)."""
        k = self._queues
        if (
            k >= MAX_QUEUES
            or ring_bytes(count) > RING_STRIDE
            or (count + 1) * buf_size > POOL_STRIDE
        ):
            raise Invalid("the simulator has no room for that queue")
        self._queues += 1
        ring_gpa = RINGS_GPA + k * RING_STRIDE
        pool_gpa = POOLS_GPA + k * POOL_STRIDE
        kick = EventfdTransport(self.doorbells[doorbell])  # not closed by the ring: ours
        ring = IoqNorth(self.ram, ring_gpa, count, pool_gpa, buf_size, kick)
        flags = (kvmabi.SHM_WRITABLE if writable else 0) | (
            0 if mitigation else kvmabi.SHM_NO_MITIGATION
        )
        self._check(
            await self.request(
                CallSlot(
                    Op.SHM,
                    handle=handle,
                    arg=index,
                    addr=ring_gpa,
                    len=count,
                    flags=flags,
                    doorbell=doorbell,
                    irq=irq,
                )
            )
        )
        if writable:
            ring.post_empty(count if post is None else post)
            ring.signal.notify()
        self.rings.append(ring)
        return ring

    async def exchange(
        self,
        tx: IoqNorth,
        rx: IoqNorth,
        payloads: Sequence[bytes],
        *,
        irq: int = 1,
        batch: int = 64,
        timeout: float = 60.0,
    ) -> list[bytes]:
        """Send ``payloads`` through an echo device and return what came back,
        sleeping on the queues' interrupt whenever neither side can move."""
        got: list[bytes] = []
        sent = 0
        total = len(payloads)
        deadline = time.monotonic() + timeout
        while len(got) < total:
            moved = False
            if sent < total:
                n = tx.send_many(payloads[sent : sent + batch])
                if n:
                    sent += n
                    tx.signal.notify()
                    moved = True
            msgs = rx.recv_many(256)
            if msgs:
                got += msgs
                rx.signal.notify()
                moved = True
            if moved:
                continue
            if self.bridge is not None and self.bridge.fault[0]:
                raise GuestFaulted(*self.bridge.fault)
            if time.monotonic() > deadline:
                raise TimedOut(f"only {len(got)} of {total} messages came back")
            tx.signal.arm()
            rx.signal.arm()
            if (sent < total and tx.completed()) or rx.completed():
                tx.signal.disarm()
                rx.signal.disarm()
                continue
            await self._wait_irq(irq, 0.5)
            self.interrupts(irq)
            tx.signal.disarm()
            rx.signal.disarm()
        return got

    async def echo_pair(self, device: str = "echo0", **shm: int) -> tuple[int, IoqNorth, IoqNorth]:
        """Open ``device`` and register its tx (0) and rx (1) queues."""
        handle = await self.open(device)
        tx = await self.shm(handle, 0, writable=False, **shm)  # type: ignore[arg-type]
        rx = await self.shm(handle, 1, writable=True, **shm)  # type: ignore[arg-type]
        return handle, tx, rx

    async def faulted(self, timeout: float = 10.0) -> kvmabi.Faulted:
        """Wait for the FAULTED frame (other frames are skipped)."""
        deadline = time.monotonic() + timeout
        while True:
            frame = await self.reply(max(0.01, deadline - time.monotonic()))
            if isinstance(frame, kvmabi.Faulted):
                return frame

    # --- hostile acts --------------------------------------------------------------------
    def scribble_bridge(self, rng: random.Random | None = None, at: int | None = None) -> None:
        """Garbage into the bridge header's reserved words (or its magic or
        version; ``at``: that offset), then ring."""
        rng = rng or random.Random()
        if at is None:
            at = rng.choice((0x0, 0x4, 0x24, 0x28, 0x30, 0x3C))
        word = rng.randrange(2, 1 << 32)  # never the version (1) nor zero
        self.ram[BRIDGE_GPA + at : BRIDGE_GPA + at + 4] = word.to_bytes(4, "little")
        self.ring(0)

    def garbage_call_ring(self) -> None:
        """call_head far beyond the 16 slots there are, then ring."""
        at = BRIDGE_GPA + 0x10
        head = int.from_bytes(self.ram[at : at + 4], "little")
        self.ram[at : at + 4] = ((head + 1000) & 0xFFFFFFFF).to_bytes(4, "little")
        self.ring(0)

    def post_outside(self, ring: IoqNorth, addr: int = HOLE[0] + 0x1000) -> None:
        """Publish one descriptor whose buffer lies in the hole of guest RAM."""
        slot = ring.valid & (ring.count - 1)
        ring._dq[slot * 4 + 1] = addr  # ptr
        ring._dq[slot * 4 + 2] = 64  # len
        ring._publish(1)
        ring.signal.notify(force=True)

    async def storm(
        self, doorbell: int, seconds: float = 5.0, *, burst: int = 1000, pace: float = 0.0
    ) -> int:
        """Ring ``doorbell`` with nothing posted, ``burst`` rings at a time and
        ``pace`` seconds between bursts (0: as fast as possible), until the
        guest is faulted or ``seconds`` pass; how many rings.  A paced storm
        adds the rings up in one eventfd write per burst (what the daemon
        counts is the same), so it costs the storming process little."""
        rings = 0
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not (self.bridge and self.bridge.fault[0]):
            if pace:
                self.ring(doorbell, burst)
            else:
                for _ in range(burst):
                    self.ring(doorbell)
            rings += burst
            await asyncio.sleep(pace)
        return rings

    # --- teardown --------------------------------------------------------------------------
    def close(self) -> None:
        """Hang up (the daemon releases the guest) and free our side."""
        if self.sock is not None:
            with contextlib.suppress(ValueError, RuntimeError):
                asyncio.get_running_loop().remove_reader(self.sock.fileno())
            self.sock.close()
            self.sock = None
        for ring in self.rings:
            ring.close()
        self.rings.clear()
        if self.bridge is not None:
            self.bridge.close()
            self.bridge = None
        for fd in [*self.doorbells, *self.irqs]:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.doorbells, self.irqs = [], []
        with contextlib.suppress(BufferError):
            self.ram.close()
        if self.ram_fd >= 0:
            os.close(self.ram_fd)
            self.ram_fd = -1


def _wake(ready: asyncio.Future[None]) -> None:
    if not ready.done():
        ready.set_result(None)


def _fd_array(fds: Sequence[int]) -> bytes:
    return array.array("i", fds).tobytes()


# --- a simulated VMM in a process of its own ----------------------------------------------


async def run_vmm(path: Path, name: str, mode: str = "traffic") -> int:
    """One simulated VMM: register, open echo0, echo traffic (``traffic``: until
    killed or faulted; ``idle``: until the daemon hangs up); 1 if refused."""
    guest = SimGuest(path, name)
    try:
        await guest.register()
    except VbusError as exc:
        print(f"refused {exc.errno} {exc.message}", flush=True)
        return 1
    guest.boot()
    _handle, tx, rx = await guest.echo_pair()
    payloads = [i.to_bytes(8, "little") * 8 for i in range(256)]
    if await guest.exchange(tx, rx, payloads) != payloads:
        print("corrupted", flush=True)
        return 1
    print("ready", flush=True)
    while mode == "traffic":
        try:
            if await guest.exchange(tx, rx, payloads) != payloads:
                print("corrupted", flush=True)
                return 1
        except (Fault, GuestFaulted, TimedOut) as exc:
            print(f"stopped: {exc}", flush=True)
            return 1
    await guest.hung_up.wait()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vbus.kvmsim", description=__doc__)
    parser.add_argument("socket", type=Path, help="the daemon's kvm.sock")
    parser.add_argument("--name", default="sim0")
    parser.add_argument("--mode", choices=("traffic", "idle"), default="traffic")
    parser.add_argument(
        "--as-uid", type=int, help="become this uid (and group) before connecting: a stranger VMM"
    )
    args = parser.parse_args(argv)
    if args.as_uid is not None:
        # Everything is imported by now: the interpreter may live where that uid cannot read.
        os.setgroups([])
        os.setresgid(args.as_uid, args.as_uid, args.as_uid)
        os.setresuid(args.as_uid, args.as_uid, args.as_uid)
    return asyncio.run(run_vmm(args.socket, args.name, args.mode))


if __name__ == "__main__":
    sys.exit(main())
