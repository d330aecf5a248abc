"""Misbehaving processes: the userspace connector's catalogue.

Each class is one bad client, done once by ``run``.  They speak the wire and
build their rings by hand (``vbus.soak.wire``), are light on the CPU (bounded
bursts, sleeps between them) so that in a soak they test the daemon and not
the machine, and clean up after themselves whatever happens.  What the daemon
must do about each one is docs/design.md section 6.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import fcntl
import gc
import json
import mmap
import os
import resource
import signal
import socket
import struct
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import datetime
from typing import Any, NoReturn

from vbus import protocol
from vbus.ioq import DEFAULT_MAX_LEN, DESC_SIZE, HEADER_SIZE, MAGIC, format_ring
from vbus.mitigation import wait_for_work
from vbus.soak.catalogue import Context, Misbehaviour, Outcome, Unexpected
from vbus.soak.wire import HandRing, PeerClosed, WireClient, eventfd, unsealed_memfd

__all__ = [
    "CATALOGUE",
    "BlockingCall",
    "BlockingKick",
    "CallFlood",
    "Churn",
    "Crash",
    "CrossTenant",
    "DoorbellFlood",
    "FdAbuse",
    "FdExhaustion",
    "Garbage",
    "HugeBuffers",
    "HugetlbHole",
    "Namespace",
    "OutOfBounds",
    "Oversized",
    "PathFd",
    "RemovedMember",
    "SemaphoreKick",
    "Slowloris",
    "SparseMemory",
    "Stall",
    "Toctou",
    "Truncated",
    "free_hugepages",
    "member_child",
]

_M32 = 0xFFFFFFFF
_RING = 16  # descriptors per hand-built ring
_BUF = 128  # bytes per buffer of a hand-built ring


class UserspaceMisbehaviour(Misbehaviour):
    connector = "userspace"


# --- helpers --------------------------------------------------------------------


@contextlib.asynccontextmanager
async def member(ctx: Context, name: str) -> AsyncIterator[WireClient]:
    """A connection that said HELLO and was welcomed.  Connecting holds the
    context's gate so a slowloris burst cannot evict it while it is pending."""
    async with ctx.gate:
        client = await WireClient.connect(ctx.socket)
        try:
            reply = await client.hello(f"soak-{name}")
        except BaseException:
            client.close()
            raise
    if not isinstance(reply, protocol.Welcome):
        client.close()
        raise Unexpected(f"HELLO was answered with {reply}")
    try:
        yield client
    finally:
        client.close()


@contextlib.contextmanager
def rings(*sizes: int) -> Iterator[list[HandRing]]:
    """Hand-built rings of these sizes, closed on the way out."""
    made = [HandRing(count, _BUF) for count in sizes]
    try:
        yield made
    finally:
        for ring in made:
            ring.close()


def expect_ok(reply: protocol.Message, what: str) -> None:
    if not isinstance(reply, protocol.Ok):
        raise Unexpected(f"{what} was answered with {reply}")


async def register_pair(client: WireClient, handle: int, tx: HandRing, rx: HandRing) -> None:
    """Register queue 0 (tx) and 1 (rx) honestly, and post every rx buffer."""
    expect_ok(await client.shm(handle, 0, tx, writable=False), "SHM tx")
    expect_ok(await client.shm(handle, 1, rx, writable=True), "SHM rx")
    rx.north.post_empty(rx.count)
    rx.north.signal.notify()


async def await_fault(client: WireClient, handle: int, timeout: float) -> protocol.Event:
    try:
        event = await client.event(timeout)
    except TimeoutError:
        raise Unexpected(f"no FAULT event within {timeout} s") from None
    except PeerClosed:
        raise Unexpected("disconnected instead of faulted") from None
    if event.kind != protocol.EventKind.FAULT or event.handle != handle:
        raise Unexpected(f"expected a FAULT of handle {handle}, got {event}")
    return event


async def handle_is_gone(client: WireClient, handle: int) -> bool:
    """After a fault the handle must be closed: a CALL on it is NotFound."""
    reply = await client.request(protocol.Call(handle, 1, b"?"))
    return isinstance(reply, protocol.Error) and reply.errno == errno.ENOENT


async def still_serves(client: WireClient, handle: int) -> bool:
    reply = await client.request(protocol.Call(handle, 1, b"still here"))
    return reply == protocol.Result(b"still here")


def error_of(reply: protocol.Message) -> tuple[int, str]:
    if not isinstance(reply, protocol.Error):
        raise Unexpected(f"expected an ERROR, got {reply}")
    return reply.errno, reply.message


async def echo_round_trip(tx: HandRing, rx: HandRing, n: int, timeout: float) -> bool:
    """Send ``n`` messages honestly and get all of them back, in order."""
    sent = [struct.pack("<I", i) * 8 for i in range(n)]
    if tx.north.send_many(sent) != n:
        return False
    tx.north.signal.notify()
    tx.doorbell()  # also past signal flags this client may have scribbled on
    got: list[bytes] = []
    deadline = time.monotonic() + timeout
    while len(got) < n and time.monotonic() < deadline:
        got.extend(rx.north.recv_many(n))
        rx.north.signal.notify()
        if len(got) < n:
            await asyncio.sleep(0.002)
    return got == sent


# --- rings ------------------------------------------------------------------------


class Stall(UserspaceMisbehaviour):
    name = "stall"
    expect = "backpressure"
    summary = "lets the device fill its rx ring and never drains it"
    hold = 1.5

    async def run(self, ctx: Context) -> Outcome:
        async with member(ctx, self.name) as client:
            handle = await client.open_handle(ctx.device)
            with rings(_RING, _RING) as (tx, rx):
                expect_ok(await client.shm(handle, 0, tx, writable=False), "SHM tx")
                expect_ok(await client.shm(handle, 1, rx, writable=True), "SHM rx")
                room = 4
                rx.north.post_empty(room)
                rx.north.signal.notify()
                sent = [struct.pack("<Q", i) * 4 for i in range(_RING)]
                t0 = time.monotonic()
                assert tx.north.send_many(sent) == _RING
                tx.north.signal.notify()
                # The device echoes what fits into rx, then must stop taking from tx.
                while tx.inuse != room:
                    if tx.inuse > room or time.monotonic() - t0 > ctx.timeout:
                        raise Unexpected(f"tx consumed {tx.inuse} with {room} rx buffers")
                    await asyncio.sleep(0.002)
                detect = time.monotonic() - t0
                # Hold the stall while ringing the doorbell: nothing moves, nothing faults.
                end = time.monotonic() + self.hold
                while time.monotonic() < end:
                    tx.doorbell()
                    await asyncio.sleep(0.05)
                if tx.inuse != room or rx.north.completed() != room:
                    raise Unexpected(f"stalled queue moved: tx {tx.inuse}, rx {rx.inuse}")
                if client.events:
                    raise Unexpected(f"a stalled client was punished: {client.events[0]}")
                if not await still_serves(client, handle):
                    raise Unexpected("call() stopped working on the stalled connection")
                # Drain at last: everything that was acknowledged comes back, in order.
                got: list[bytes] = []
                deadline = time.monotonic() + ctx.timeout
                while len(got) < _RING and time.monotonic() < deadline:
                    got.extend(rx.north.recv_many(_RING))
                    rx.north.signal.notify()
                    await asyncio.sleep(0.002)
                if got != sent:
                    raise Unexpected(f"after the stall {len(got)}/{_RING} came back intact")
        return self.outcome(
            True,
            f"backpressure after {room} messages; resumed, none lost",
            detect_s=detect,
            reclaimed=True,
        )


class Garbage(UserspaceMisbehaviour):
    name = "garbage"
    expect = "fault"
    summary = "random bytes in the ring header, indexes and descriptors"
    pause = 0.25

    async def run(self, ctx: Context) -> Outcome:
        rng = ctx.rng
        before = rng.random() < 0.3
        async with member(ctx, self.name) as client:
            handle = await client.open_handle(ctx.device)
            with rings(_RING, _RING) as (tx, rx):
                span = HEADER_SIZE + _RING * 32
                if before:
                    tx.scribble(0, rng.randbytes(span))
                    if tx.map[0:4] == MAGIC.to_bytes(4, "little"):
                        tx.map[0] ^= 0xFF
                    t0 = time.monotonic()
                    code, message = error_of(await client.shm(handle, 0, tx, writable=False))
                    if code != errno.EFAULT:
                        raise Unexpected(f"garbage ring refused with errno {code}: {message}")
                else:
                    await register_pair(client, handle, tx, rx)
                    inuse = tx.inuse
                    tx.scribble(0, rng.randbytes(span))
                    ahead = rng.choice([rng.randrange(1, _RING + 1), rng.getrandbits(32)])
                    tx.publish_index(inuse + (ahead or 1))
                    if rng.random() < 0.5:  # make sure the first descriptor is broken
                        tx.map[tx.desc_at(inuse) + 24] = rng.choice([0, 2, 255])
                    t0 = time.monotonic()
                    tx.doorbell()
                event = await await_fault(client, handle, ctx.timeout)
                detect = time.monotonic() - t0
                gone = await handle_is_gone(client, handle)
        where = "registration" if before else "service"
        return self.outcome(
            gone,
            f"fault at {where}: {event.reason}",
            detect_s=detect,
            faults=1,
            reclaimed=gone,
        )


class OutOfBounds(UserspaceMisbehaviour):
    name = "oob"
    expect = "fault"
    summary = "descriptors pointing outside its memory, or longer than allowed"
    pause = 0.25

    async def run(self, ctx: Context) -> Outcome:
        rng = ctx.rng
        async with member(ctx, self.name) as client:
            handle = await client.open_handle(ctx.device)
            with rings(_RING, _RING) as (tx, rx):
                expect_ok(await client.shm(handle, 0, tx, writable=False), "SHM tx")
                expect_ok(await client.shm(handle, 1, rx, writable=True), "SHM rx")
                rx.north.post_empty(_RING - 1)  # the last rx slot is for the bad one
                rx.north.signal.notify()
                size = tx.size
                ptr, length = rng.choice(
                    [
                        (size, 1),  # just past the end
                        (size - 8, 16),  # straddles the end
                        (1 << 40, 64),  # far away
                        (2**64 - 8, 16),  # wraps a 64-bit address
                        (0, 1 << 30),  # longer than any buffer may be
                    ]
                )
                target = rng.choice(["tx", "rx"])
                if target == "tx":
                    index = tx.valid
                    tx.write_desc(index, ptr=ptr, length=length)
                    tx.publish_index(index + 1)
                    t0 = time.monotonic()
                    tx.doorbell()
                else:
                    # A bad buffer after the good ones; send enough to make the device reach it.
                    index = rx.valid
                    rx.write_desc(index, ptr=ptr, length=length)
                    rx.publish_index(index + 1)
                    t0 = time.monotonic()
                    tx.north.send_many([b"o" * 32] * _RING)
                    tx.north.signal.notify()
                    rx.doorbell()
                event = await await_fault(client, handle, ctx.timeout)
                detect = time.monotonic() - t0
                if "outside" not in event.reason and "exceeds" not in event.reason:
                    raise Unexpected(f"fault without a bounds reason: {event.reason}")
                gone = await handle_is_gone(client, handle)
        return self.outcome(
            gone, f"fault ({target}): {event.reason}", detect_s=detect, faults=1, reclaimed=gone
        )


def _spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


class Toctou(UserspaceMisbehaviour):
    name = "toctou"
    expect = "fault"
    summary = "rewrites a descriptor right after publishing it (double fetch)"
    pause = 0.25
    rounds = 64

    async def run(self, ctx: Context) -> Outcome:
        rng = ctx.rng
        raced = 0  # rounds the south snapshotted before the rewrite (and echoed correctly)
        async with member(ctx, self.name) as client:
            handle = await client.open_handle(ctx.device)
            with rings(_RING, _RING) as (tx, rx):
                await register_pair(client, handle, tx, rx)
                for _ in range(self.rounds):
                    index = tx.valid
                    slot = index & (_RING - 1)
                    ptr = tx.data_offset + slot * _BUF
                    payload = rng.randbytes(64)
                    tx.map[ptr : ptr + 64] = payload
                    tx.write_desc(index, ptr=ptr, length=64)
                    tx.publish_index(index + 1)
                    tx.doorbell()
                    _spin(rng.choice([0.0, 0.0, 20e-6, 100e-6, 400e-6]))
                    tx.set_ptr_len(index, 1 << 40, 1 << 20)  # now lie about it
                    tx.map[ptr : ptr + 64] = bytes(64)
                    t0 = time.monotonic()
                    outcome = await self._settle(client, rx, ctx.timeout)
                    if outcome == "fault":
                        event = await await_fault(client, handle, 0)
                        detect = time.monotonic() - t0
                        gone = await handle_is_gone(client, handle)
                        return self.outcome(
                            gone,
                            f"fault after {raced} won races: {event.reason}",
                            detect_s=detect,
                            faults=1,
                            reclaimed=gone,
                        )
                    echoed = rx.north.recv_many(_RING)
                    rx.north.signal.notify()
                    # The south copied the descriptor once: its echo is the 64 bytes
                    # at the old address (the payload, or the zeros written after it).
                    if len(echoed) != 1 or len(echoed[0]) != 64:
                        raise Unexpected(f"inconsistent echo {[len(m) for m in echoed]}")
                    raced += 1
                if not await still_serves(client, handle):
                    raise Unexpected("connection stopped working")
        return self.outcome(
            True, f"every one of {raced} rewrites came too late: snapshots held", reclaimed=True
        )

    @staticmethod
    async def _settle(client: WireClient, rx: HandRing, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if client.events:
                return "fault"
            if rx.north.completed():
                return "echo"
            try:
                client.events.appendleft(await client.event(0.002))
                return "fault"
            except TimeoutError:
                pass
        raise Unexpected("neither an echo nor a fault after a rewritten descriptor")


class DoorbellFlood(UserspaceMisbehaviour):
    name = "doorbell_flood"
    expect = "absorbed"
    summary = "rings both doorbells ~100k times/s and scribbles on its signal flags"
    duration = 1.5
    burst = 100

    async def run(self, ctx: Context) -> Outcome:
        rng = ctx.rng
        rung = 0
        async with member(ctx, self.name) as client:
            handle = await client.open_handle(ctx.device)
            with rings(_RING, _RING) as (tx, rx):
                await register_pair(client, handle, tx, rx)
                end = time.monotonic() + self.duration
                while time.monotonic() < end:
                    for _ in range(self.burst):
                        os.eventfd_write(tx.kick.fd, 1)
                        os.eventfd_write(rx.kick.fd, 1)
                    rung += 2 * self.burst
                    if rng.random() < 0.2:  # the south's flags: only it should write them
                        tx.map[16 + 12 : 16 + 15] = rng.randbytes(3)
                    await asyncio.sleep(0.002)
                served = await echo_round_trip(tx, rx, _RING // 2, ctx.timeout)
                if not served:
                    raise Unexpected("the flooded connection stopped being served")
                if client.events:
                    raise Unexpected(f"a doorbell flood was punished: {client.events[0]}")
        return self.outcome(
            True, f"{rung} doorbells coalesced; still served", reclaimed=True, detail=str(rung)
        )


# --- the socket -----------------------------------------------------------------


class CallFlood(UserspaceMisbehaviour):
    name = "call_flood"
    expect = "disconnect"
    summary = "pipelines call()s: first greedy, then without ever reading a reply"
    greedy = 1.0
    size = 32 * 1024

    async def run(self, ctx: Context) -> Outcome:
        calls = 0
        async with member(ctx, self.name) as client:
            handle = await client.open_handle(ctx.device)
            # Greedy but well-formed: 32 in flight, bounded rate.  Must be served.
            end = time.monotonic() + self.greedy
            while time.monotonic() < end:
                seqs = []
                for i in range(32):
                    seq = client.next_seq()
                    await client.send(protocol.encode(protocol.Call(handle, 1, b"%d" % i), seq))
                    seqs.append(seq)
                for i, seq in enumerate(seqs):
                    if await asyncio.wait_for(client.reply(seq), ctx.timeout) != protocol.Result(
                        b"%d" % i
                    ):
                        raise Unexpected("a pipelined call() got a wrong reply")
                calls += 32
                await asyncio.sleep(0.005)
            # Now never read: the daemon may queue a bounded amount, then must hang up.
            big = b"F" * self.size
            t0 = time.monotonic()
            sent = 0
            try:
                while time.monotonic() - t0 < ctx.timeout:
                    await client.send(protocol.encode(protocol.Call(handle, 1, big), 0))
                    sent += 1
                    if sent % 64 == 0:
                        await asyncio.sleep(0)
            except PeerClosed:
                pass
            else:
                raise Unexpected(f"{sent} unread {self.size}-byte calls and still connected")
            detect = time.monotonic() - t0
        return self.outcome(
            True,
            f"served {calls} pipelined calls; dropped after {sent} unread",
            detect_s=detect,
            faults=1,
            reclaimed=True,
            detail=f"unread={sent}",
        )


class Oversized(UserspaceMisbehaviour):
    name = "oversized"
    expect = "disconnect"
    summary = "datagrams larger than the frame limit, or claiming to be"
    pause = 0.25

    async def run(self, ctx: Context) -> Outcome:
        rng = ctx.rng
        kind = rng.choice(["huge", "limit+1", "claims"])
        async with member(ctx, self.name) as client:
            client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
            head = protocol.encode(protocol.Call(1, 1, b""), 7)[:16]
            if kind == "huge":
                frame = head + rng.randbytes(rng.randrange(protocol.MAX_FRAME, 200_000))
            elif kind == "limit+1":
                frame = head + bytes(protocol.MAX_FRAME + 1 - 16)
            else:  # a small frame whose header claims 4 GiB of payload
                frame = head[:8] + struct.pack("<II", _M32, 0) + bytes(8)
            t0 = time.monotonic()
            await client.send(frame)
            try:
                _seq, reply = await asyncio.wait_for(client.recv(), ctx.timeout)
            except PeerClosed:
                raise Unexpected("disconnected without an ERROR") from None
            code, message = error_of(reply)
            if not await client.wait_closed(ctx.timeout):
                raise Unexpected(f"still connected after {kind}: {message}")
            detect = (client.closed_at or time.monotonic()) - t0
        return self.outcome(
            True,
            f"ERROR {errno.errorcode.get(code, code)} + disconnect ({kind}): {message}",
            detect_s=detect,
            faults=1,
            reclaimed=True,
        )


class Truncated(UserspaceMisbehaviour):
    name = "truncated"
    expect = "disconnect"
    summary = "frames cut short: partial headers, payloads shorter than announced"
    pause = 0.25

    async def run(self, ctx: Context) -> Outcome:
        rng = ctx.rng
        kind = rng.choice(["payload", "header", "string", "empty"])
        async with member(ctx, self.name) as client:
            if kind == "payload":
                whole = protocol.encode(protocol.Open(name="echo0"), 5)
                frame = whole[: rng.randrange(16, len(whole))]
            elif kind == "header":
                frame = protocol.encode(protocol.Enumerate(), 5)[: rng.randrange(1, 16)]
            elif kind == "string":  # string length runs past the payload
                frame = protocol.encode(protocol.Open(name="echo0"), 5)
                frame = frame[:20] + struct.pack("<H", 60) + frame[22:]
            else:  # a zero-length datagram reads as EOF: the daemon hangs up
                frame = b""
            t0 = time.monotonic()
            await client.send(frame)
            said = "nothing"
            try:
                _seq, reply = await asyncio.wait_for(client.recv(), ctx.timeout)
                code, message = error_of(reply)
                said = f"ERROR {errno.errorcode.get(code, code)}: {message}"
            except PeerClosed:
                if kind != "empty":
                    raise Unexpected("disconnected without an ERROR") from None
            if not await client.wait_closed(ctx.timeout):
                raise Unexpected(f"still connected after a truncated frame ({kind})")
            detect = (client.closed_at or time.monotonic()) - t0
        return self.outcome(
            True, f"disconnect ({kind}), {said}", detect_s=detect, faults=1, reclaimed=True
        )


class Slowloris(UserspaceMisbehaviour):
    name = "slowloris"
    expect = "disconnect"
    summary = "connects and never says HELLO; piles up connections to the per-uid caps"
    pause = 0.5

    async def run(self, ctx: Context) -> Outcome:
        extra = 4
        idle: list[WireClient] = []
        opened: list[float] = []
        try:
            async with ctx.gate:  # nobody else is half-open during the burst
                for _ in range(ctx.max_pending_per_uid + extra):
                    idle.append(await WireClient.connect(ctx.socket))
                    opened.append(time.monotonic())
            waits = [c.wait_closed(ctx.handshake_timeout + ctx.timeout) for c in idle]
            closed = await asyncio.gather(*waits)
            if not all(closed):
                raise Unexpected(f"{closed.count(False)} silent connections were never dropped")
            lives = [(c.closed_at or 0.0) - t for c, t in zip(idle, opened, strict=True)]
        finally:
            for c in idle:
                c.close()
        evicted = sum(1 for life in lives if life < ctx.handshake_timeout * 0.5)
        timed_out = [life for life in lives if life >= ctx.handshake_timeout * 0.5]
        if evicted < 1:
            raise Unexpected(f"{len(idle)} pending connections and none was evicted")
        if timed_out and max(timed_out) > ctx.handshake_timeout + 2.0:
            raise Unexpected(f"a silent connection lived {max(timed_out):.1f} s")
        reaction = f"{evicted} evicted at the pending cap, {len(timed_out)} timed out"
        refused = ""
        if ctx.cap_safe:
            refused = await self._cap(ctx)
        return self.outcome(
            True,
            reaction + refused,
            detect_s=max(timed_out) if timed_out else max(lives),
            faults=len(idle) + (1 if refused else 0),
            reclaimed=True,
        )

    @staticmethod
    async def _cap(ctx: Context) -> str:
        """Say HELLO on connection after connection until the per-uid cap refuses."""
        async with ctx.gate:
            held: list[WireClient] = []
            try:
                return await Slowloris._fill(ctx, held)
            finally:
                for client in held:
                    client.close()
                # The daemon sees those closes in its own time: keep everyone else
                # out until a newcomer is admitted again.
                await Slowloris._until_admitted(ctx)

    @staticmethod
    async def _fill(ctx: Context, held: list[WireClient]) -> str:
        cap = ctx.max_connections_per_uid
        for _ in range(cap + 64):
            client = await WireClient.connect(ctx.socket)
            held.append(client)
            with contextlib.suppress(PeerClosed):  # a refused one may be gone already
                await client.send(protocol.encode(protocol.Hello(1, 1, "soak-cap"), 1))
            try:
                _seq, reply = await asyncio.wait_for(client.recv(), ctx.timeout)
            except PeerClosed:
                # Writing to a refused socket resets it, and the reset drops the
                # reason queued on it: ask once more, without writing this time.
                if len(held) < cap - 32:
                    raise Unexpected(f"dropped at {len(held)} connections") from None
                probe = await WireClient.connect(ctx.socket)
                held.append(probe)
                try:
                    _seq, reply = await asyncio.wait_for(probe.recv(), ctx.timeout)
                except PeerClosed:
                    raise Unexpected("refused without a reason") from None
            if isinstance(reply, protocol.Welcome):
                continue
            code, message = error_of(reply)
            if code != errno.EAGAIN or "too many connections" not in message:
                raise Unexpected(f"refused with {code}: {message}")
            return f"; refused past {len(held) - 1} connections: {message}"
        raise Unexpected("no per-uid connection cap")

    @staticmethod
    async def _until_admitted(ctx: Context) -> None:
        deadline = time.monotonic() + ctx.timeout
        while time.monotonic() < deadline:
            probe = await WireClient.connect(ctx.socket)
            try:
                await asyncio.wait_for(probe.recv(), 0.05)
            except TimeoutError:
                return  # nothing said: admitted (and closed again at once)
            except PeerClosed:
                pass
            finally:
                probe.close()
            await asyncio.sleep(0.02)


# --- file descriptors ------------------------------------------------------------------


def _sealed(size: int, seals: int) -> int:
    fd = unsealed_memfd(size)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    return fd


def _pipe_end() -> int:
    r, w = os.pipe()
    os.close(w)
    return r


def _socket_end() -> int:
    a, b = socket.socketpair()
    b.close()
    return a.detach()


def _disk_file() -> int:
    fd, path = tempfile.mkstemp(prefix="vbus-soak-")
    os.unlink(path)
    os.ftruncate(fd, 8192)
    return fd


class FdAbuse(UserspaceMisbehaviour):
    name = "fd_abuse"
    expect = "error"
    summary = "wrong fd types, unsealed/half-sealed/empty/huge memfds, fds where none belong"
    pause = 0.5

    async def run(self, ctx: Context) -> Outcome:
        refused = 0
        slowest = 0.0
        seal_both = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
        # (what, memfd factory, kick factory, call factory, errno expected)
        variants = [
            ("pipe as memory", _pipe_end, eventfd, eventfd, errno.EINVAL),
            ("eventfd as memory", eventfd, eventfd, eventfd, errno.EINVAL),
            ("socket as memory", _socket_end, eventfd, eventfd, errno.EINVAL),
            ("/dev/null as memory", lambda: os.open("/dev/null", os.O_RDWR), eventfd, eventfd, errno.EINVAL),
            ("disk file as memory", _disk_file, eventfd, eventfd, errno.EINVAL),
            ("unsealed memfd", lambda: unsealed_memfd(8192), eventfd, eventfd, errno.EINVAL),
            ("shrink-only seal", lambda: _sealed(8192, fcntl.F_SEAL_SHRINK), eventfd, eventfd, errno.EINVAL),
            ("empty memfd", lambda: _sealed(0, seal_both), eventfd, eventfd, errno.EINVAL),
            ("pipe as kick", lambda: _sealed(8192, seal_both), _pipe_end, eventfd, errno.EINVAL),
            ("memfd as call", lambda: _sealed(8192, seal_both), eventfd, lambda: _sealed(4096, seal_both), errno.EINVAL),
        ]  # fmt: skip
        async with member(ctx, self.name) as client:
            handle = await client.open_handle(ctx.device)
            for what, memory, kick, call, expected in variants:
                fds = [memory(), kick(), call()]
                try:
                    t0 = time.monotonic()
                    reply = await client.request(protocol.Shm(handle, 0, 0, 4, 0), fds)
                    slowest = max(slowest, time.monotonic() - t0)
                    code, message = error_of(reply)
                    if code != expected:
                        raise Unexpected(f"{what}: errno {code} ({message})")
                    refused += 1
                    if what == "unsealed memfd":
                        os.ftruncate(fds[0], 0)  # shrink it now: the daemon never mapped it
                finally:
                    for fd in fds:
                        os.close(fd)
            if not await still_serves(client, handle):
                raise Unexpected("connection unusable after refused registrations")
            with rings(4) as (ring,):  # and an honest registration still works
                expect_ok(await client.shm(handle, 0, ring, writable=False), "honest SHM")
        # A memfd over the size cap: refused (the connector also hangs up on it).
        async with member(ctx, self.name) as client:
            handle = await client.open_handle(ctx.device)
            fds = [_sealed(2 << 30, seal_both), eventfd(), eventfd()]
            try:
                t0 = time.monotonic()
                reply = await client.request(protocol.Shm(handle, 0, 0, 4, 0), fds)
                slowest = max(slowest, time.monotonic() - t0)
                code, message = error_of(reply)
                # Past the region cap (EMSGSIZE), or past the peer's shm bound (ENOSPC).
                if code not in (errno.EMSGSIZE, errno.ENOSPC):
                    raise Unexpected(f"2 GiB memfd: errno {code} ({message})")
                refused += 1
            finally:
                for fd in fds:
                    os.close(fd)
        # fds where the protocol allows none (or too many): the byte stream is wrong.
        for what, count, msg in (
            ("fds on a CALL", 2, protocol.Call(1, 1, b"x")),
            ("4 fds on a SHM", 4, protocol.Shm(1, 0, 0, 4, 0)),
            ("2 fds on a SHM", 2, protocol.Shm(1, 0, 0, 4, 0)),
            ("12 fds on a CALL", 12, protocol.Call(1, 1, b"x")),
        ):
            async with member(ctx, self.name) as client:
                fds = [eventfd() for _ in range(count)]
                try:
                    t0 = time.monotonic()
                    await client.send(protocol.encode(msg, 9), fds)
                    if not await client.wait_closed(ctx.timeout):
                        raise Unexpected(f"{what}: still connected")
                    slowest = max(slowest, (client.closed_at or t0) - t0)
                    refused += 1
                finally:
                    for fd in fds:
                        os.close(fd)
        return self.outcome(
            True,
            f"{refused} bad registrations refused / hung up, connection kept when it could be",
            detect_s=slowest,
            faults=refused,
            reclaimed=True,
        )


# --- lifecycle ---------------------------------------------------------------------------


def _crash_child(path: str, device: str, ready: int) -> NoReturn:
    """In a forked child: stream through echo until killed.  Never returns."""
    try:
        gc.disable()  # inherited objects must not be finalised onto reused fd numbers
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        os.closerange(3, ready)
        os.closerange(ready + 1, max(soft, ready + 2))
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sock.settimeout(10)
        sock.connect(path)

        def ask(msg: protocol.Message, seq: int, fds: tuple[int, ...] = ()) -> protocol.Message:
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, bytes(struct.pack(f"{len(fds)}i", *fds)))]
            sock.sendmsg([protocol.encode(msg, seq)], anc if fds else [])
            while True:
                got, reply = protocol.decode_reply(sock.recv(protocol.MAX_FRAME))
                if got == seq:
                    return reply

        ask(protocol.Hello(1, 1, "soak-crash"), 1)
        opened = ask(protocol.Open(name=device), 2)
        assert isinstance(opened, protocol.Opened)
        tx, rx = HandRing(256, _BUF), HandRing(256, _BUF)
        for seq, (index, ring, flags) in enumerate(
            ((0, tx, 0), (1, rx, protocol.SHM_WRITABLE)), start=3
        ):
            ok = ask(protocol.Shm(opened.handle, index, 0, ring.count, flags), seq, ring.fds())
            assert isinstance(ok, protocol.Ok)
        rx.north.post_empty(rx.count)
        rx.north.signal.notify()
        os.write(ready, b"R")
        batch = [b"c" * 64] * 64
        while True:  # mid-transfer, always
            tx.north.send_many(batch)
            tx.north.signal.notify()
            rx.north.recv_many(256)
            rx.north.signal.notify()
            time.sleep(0.002)
    finally:
        os._exit(3)


class Crash(UserspaceMisbehaviour):
    name = "crash"
    expect = "reclaimed"
    summary = "SIGKILLed mid-transfer with both rings busy"
    pause = 1.0

    async def run(self, ctx: Context) -> Outcome:
        r, w = os.pipe()
        os.set_blocking(r, False)
        loop = asyncio.get_running_loop()
        async with ctx.gate:  # its connect must not meet a slowloris burst either
            WireClient.welcomes += 1  # the child's, counted here where CrossTenant looks
            pid = os.fork()
            if pid == 0:
                os.close(r)
                _crash_child(str(ctx.socket), ctx.device, w)
            os.close(w)
            try:
                ready: asyncio.Future[None] = loop.create_future()
                loop.add_reader(r, _resolve, ready)
                try:
                    await asyncio.wait_for(ready, ctx.timeout)
                finally:
                    loop.remove_reader(r)
                started = os.read(r, 1) == b"R"
            except BaseException:
                os.kill(pid, signal.SIGKILL)
                await _reap(pid)
                raise
            finally:
                os.close(r)
        if not started:
            await _reap(pid)
            raise Unexpected("the streaming child did not get going")
        await asyncio.sleep(ctx.rng.uniform(0.05, 0.3))
        killed_at = time.time()
        os.kill(pid, signal.SIGKILL)
        await _reap(pid)
        outcome = self.outcome(
            True, "SIGKILL mid-transfer", pending={"pid": pid, "killed_at": killed_at}
        )
        if ctx.read_log is not None:
            deadline = time.monotonic() + ctx.timeout
            while not resolve_crash(outcome, ctx.read_log()) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            if outcome.pending is not None:
                raise Unexpected(f"the killed client (pid {pid}) was never released")
        return outcome


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


async def _reap(pid: int) -> None:
    for _ in range(2000):
        done, _status = os.waitpid(pid, os.WNOHANG)
        if done:
            return
        await asyncio.sleep(0.005)


def resolve_crash(outcome: Outcome, log: str) -> bool:
    """Time the daemon's release of a killed client from its log (``client.closed``
    for that pid, or the event ``pending`` names): the client is dead and
    cannot see it.  False if not there yet."""
    pending = outcome.pending
    if not pending:
        return True
    closed = _closed_at(log, pending["pid"], pending.get("event", "client.closed"))
    if closed is None:
        return False
    reason, at = closed
    outcome.detect_s = max(0.0, at - pending["killed_at"])
    outcome.reaction = f"released on {reason}"
    outcome.reclaimed = True
    outcome.faults = 1
    outcome.pending = None
    return True


def _closed_at(log: str, pid: int, event: str = "client.closed") -> tuple[str, float] | None:
    needle = f'"pid": {pid},'
    quoted = f'"{event}"'
    for line in log.splitlines():
        if quoted not in line or needle not in line:
            continue
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("pid") != pid:
            continue
        stamp = datetime.fromisoformat(str(record["timestamp"]).replace("Z", "+00:00"))
        return str(record.get("reason", "")), stamp.timestamp()
    return None


class Churn(UserspaceMisbehaviour):
    name = "churn"
    expect = "absorbed"
    summary = "connect / open / register / close, over and over, often abruptly"
    pause = 0.2
    cycles = 20

    async def run(self, ctx: Context) -> Outcome:
        rng = ctx.rng
        done = 0
        for _ in range(self.cycles):
            async with member(ctx, self.name) as client:
                handle = await client.open_handle(ctx.device)
                if rng.random() < 0.5:
                    with rings(_RING, _RING) as (tx, rx):
                        await register_pair(client, handle, tx, rx)
                        if rng.random() < 0.5 and not await echo_round_trip(tx, rx, 4, ctx.timeout):
                            raise Unexpected("a churning client was not served")
                if rng.random() < 0.5:
                    expect_ok(await client.request(protocol.Close(handle)), "CLOSE")
                # else: hang up with the device open (and maybe its queues registered)
            done += 1
        return self.outcome(True, f"{done} connect/open/close cycles served", reclaimed=True)


class Namespace(UserspaceMisbehaviour):
    name = "namespace"
    expect = "denied"
    summary = "opens device ids and names not on its bus; asks for the daemon's status"
    pause = 0.5

    async def run(self, ctx: Context) -> Outcome:
        rng = ctx.rng
        denied = 0
        slowest = 0.0
        async with member(ctx, self.name) as client:
            listing = await client.request(protocol.Enumerate())
            assert isinstance(listing, protocol.Devices)
            mine = {d.id for d in listing.devices} | {d.name for d in listing.devices}
            reference = await client.open("no-such-device-" + rng.randbytes(4).hex())
            _code, nothing = error_of(reference)
            names = [*ctx.hidden, "echo1", "secret", "../echo0", "ECHO0", "échø", "a" * 64]
            names += ["".join(rng.choices("abcdefghijklmnopqrstuvwxyz0123456789-_.", k=rng.randrange(1, 20))) for _ in range(8)]  # fmt: skip
            top = max((d.id for d in listing.devices), default=0) + 16
            ids: list[int] = [*range(1, top), 2**31, _M32]
            probes: list[str | int] = [n for n in names if n not in mine]
            probes += [i for i in ids if i not in mine]
            for probe in probes:
                t0 = time.monotonic()
                reply = await client.open(probe)
                slowest = max(slowest, time.monotonic() - t0)
                if isinstance(reply, protocol.Opened):
                    raise Unexpected(f"opened {probe!r}, which is not on its bus")
                code, message = error_of(reply)
                if code != errno.ENOENT or message != nothing:
                    raise Unexpected(f"{probe!r} refused differently: {code} {message!r}")
                denied += 1
            if ctx.stranger:
                code, message = error_of(await client.request(protocol.Status()))
                if code != errno.EACCES:
                    raise Unexpected(f"STATUS for a stranger: {code} {message}")
                denied += 1
            if ctx.device not in mine:
                raise Unexpected(f"its own device {ctx.device} is not listed")
        return self.outcome(
            True,
            f"{denied} probes refused alike ({nothing!r})",
            detect_s=slowest,
            faults=denied,
            reclaimed=True,
        )


# --- descriptors shared with the daemon --------------------------------------------------
#
# An eventfd passed with SCM_RIGHTS shares its file description with the
# daemon: the client can clear O_NONBLOCK on it, fill its counter, or hand
# over an EFD_SEMAPHORE or O_PATH one.  The south must never block or spin on
# one (docs/design.md section 6).

_EFD_MAX = 2**64 - 2  # an eventfd counter cannot go higher: the next write of 1 waits


def _take(fd: int) -> int:
    """Empty an eventfd without waiting, whatever its description's flags say."""
    buf = bytearray(8)
    try:
        os.preadv(fd, [buf], -1, os.RWF_NOWAIT)
    except BlockingIOError:
        return 0
    return int.from_bytes(buf, "little")


class BlockingCall(UserspaceMisbehaviour):
    name = "blocking_call"
    expect = "fault"
    summary = "makes its call eventfd blocking with a full counter, then lets the south signal"
    pause = 1.0

    async def run(self, ctx: Context) -> Outcome:
        async with member(ctx, self.name) as client:
            handle = await client.open_handle(ctx.device)
            with rings(_RING, _RING) as (tx, rx):
                await register_pair(client, handle, tx, rx)
                call = rx.call.fd
                while True:  # fill the counter while our own write cannot wait
                    _take(call)
                    with contextlib.suppress(BlockingIOError):
                        os.eventfd_write(call, _EFD_MAX)
                        break
                os.set_blocking(call, True)  # the daemon's file description too
                try:
                    rx.north.signal.ack()
                    rx.north.signal.arm()  # wake me: the south's next push into rx signals
                    t0 = time.monotonic()
                    if tx.north.send_many([b"would you block?"]) != 1:
                        raise Unexpected("no room on a fresh tx ring")
                    tx.north.signal.notify()
                    tx.doorbell()
                    event = await await_fault(client, handle, ctx.timeout)
                    detect = time.monotonic() - t0
                finally:
                    os.set_blocking(call, False)
                    _take(call)  # a daemon stuck writing to it gets through now
                if "would block" not in event.reason.lower():
                    raise Unexpected(f"faulted for another reason: {event.reason}")
                if not await handle_is_gone(client, handle):
                    raise Unexpected("the faulted handle still answers")
            again = await client.open_handle(ctx.device)
            if not await still_serves(client, again):
                raise Unexpected("the connection is unusable after the fault")
        return self.outcome(
            True, f"fault: {event.reason}", detect_s=detect, faults=1, reclaimed=True
        )


class BlockingKick(UserspaceMisbehaviour):
    name = "blocking_kick"
    expect = "absorbed"
    summary = "makes its kick eventfds blocking and races the south: kicks, then drains them itself"
    pause = 1.0
    queues = 8  # kick eventfds raced at once: the south reads them one after another
    races = 300
    slow = 0.05  # a reply later than this may mean the daemon is stuck: look closer

    async def run(self, ctx: Context) -> Outcome:
        rng = ctx.rng
        drained = 0
        async with member(ctx, self.name) as client:
            handles = [await client.open_handle(ctx.device) for _ in range(self.queues)]
            with rings(*[_RING] * (self.queues + 1)) as made:
                rx = made.pop()
                await register_pair(client, handles[0], made[0], rx)
                for handle, ring in zip(handles[1:], made[1:], strict=True):
                    expect_ok(await client.shm(handle, 0, ring, writable=False), "SHM tx")
                kicks = [ring.kick.fd for ring in made]
                for fd in kicks:
                    os.set_blocking(fd, True)
                try:
                    for done in range(1, self.races + 1):
                        for fd in kicks:
                            os.eventfd_write(fd, 1)
                        # Drain after the south has seen them ready, before it reads.
                        _spin(rng.uniform(0.0, 60e-6))
                        drained += sum(1 for fd in kicks if _take(fd))
                        if not await self._answers(client, handles[0], ctx.timeout):
                            raise Unexpected(
                                f"the daemon stopped answering after {done} races ({drained} "
                                "kicks drained under it): it waits on an emptied eventfd"
                            )
                finally:
                    for fd in kicks:  # releases a daemon stuck reading one of them
                        os.eventfd_write(fd, 1)
                        os.set_blocking(fd, False)
                faults = [e for e in client.events if e.kind == protocol.EventKind.FAULT]
                if faults:  # refusing to serve a blocking kick is a fair reaction too
                    return self.outcome(
                        True,
                        f"fault after {self.races} races: {faults[0].reason}",
                        faults=len(faults),
                        reclaimed=True,
                    )
                if not await echo_round_trip(made[0], rx, _RING // 2, ctx.timeout):
                    raise Unexpected("the raced queue stopped being served")
        return self.outcome(
            True,
            f"{self.races} races absorbed ({drained} kicks drained under the south); still served",
            reclaimed=True,
            detail=str(drained),
        )

    async def _answers(self, client: WireClient, handle: int, timeout: float) -> bool:
        seq = client.next_seq()
        await client.send(protocol.encode(protocol.Call(handle, 1, b"?"), seq))
        try:
            await asyncio.wait_for(client.reply(seq), self.slow)
            return True
        except TimeoutError:
            pass
        try:  # slow, or stuck: a stuck daemon never answers
            await asyncio.wait_for(client.reply(seq), timeout)
            return True
        except TimeoutError:
            return False


class SemaphoreKick(UserspaceMisbehaviour):
    name = "semaphore_kick"
    expect = "error"
    summary = "an EFD_SEMAPHORE kick eventfd with a huge counter: each read takes one"
    pause = 0.5

    async def run(self, ctx: Context) -> Outcome:
        async with member(ctx, self.name) as client:
            handle = await client.open_handle(ctx.device)
            with rings(_RING) as (ring,):
                sem = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK | os.EFD_SEMAPHORE)
                try:
                    os.eventfd_write(sem, _EFD_MAX)
                    t0 = time.monotonic()
                    reply = await client.request(
                        protocol.Shm(handle, 0, 0, ring.count, 0), (ring.memfd, sem, ring.call.fd)
                    )
                    detect = time.monotonic() - t0
                finally:
                    os.close(sem)
                if isinstance(reply, protocol.Ok):
                    raise Unexpected("an EFD_SEMAPHORE kick eventfd was accepted")
                code, message = error_of(reply)
                if code != errno.EINVAL or "semaphore" not in message.lower():
                    raise Unexpected(f"refused with {code}: {message}")
                # The connection stays, and an honest registration of that queue works.
                expect_ok(await client.shm(handle, 0, ring, writable=False), "honest SHM")
                if not await still_serves(client, handle):
                    raise Unexpected("the connection is unusable after the refusal")
        return self.outcome(
            True, f"ERROR EINVAL: {message}", detect_s=detect, faults=1, reclaimed=True
        )


class PathFd(UserspaceMisbehaviour):
    name = "path_fd"
    expect = "error"
    summary = "O_PATH descriptors of eventfds as kick or call fd (no read, write or fcntl on them)"
    pause = 0.5

    async def run(self, ctx: Context) -> Outcome:
        refused: list[str] = []
        slowest = 0.0
        async with member(ctx, self.name) as client:
            handle = await client.open_handle(ctx.device)
            with rings(_RING) as (ring,):
                for role in ("kick", "call"):
                    target = ring.kick.fd if role == "kick" else ring.call.fd
                    path = os.open(f"/proc/self/fd/{target}", os.O_PATH | os.O_CLOEXEC)
                    fds = [ring.memfd, ring.kick.fd, ring.call.fd]
                    fds[1 if role == "kick" else 2] = path
                    try:
                        t0 = time.monotonic()
                        reply = await client.request(
                            protocol.Shm(handle, 0, 0, ring.count, 0), fds, timeout=ctx.timeout
                        )
                        slowest = max(slowest, time.monotonic() - t0)
                    except TimeoutError:
                        raise Unexpected(f"O_PATH {role} fd: no reply in {ctx.timeout} s") from None
                    finally:
                        os.close(path)
                    if isinstance(reply, protocol.Ok):
                        raise Unexpected(f"an O_PATH {role} descriptor was accepted")
                    code, message = error_of(reply)
                    if code != errno.EINVAL:
                        raise Unexpected(f"O_PATH {role} fd refused with {code}: {message}")
                    refused.append(message)
                expect_ok(await client.shm(handle, 0, ring, writable=False), "honest SHM")
                if not await still_serves(client, handle):
                    raise Unexpected("the connection is unusable after the refusals")
        return self.outcome(
            True,
            f"ERROR EINVAL (kick, call): {refused[0]}",
            detect_s=slowest,
            faults=len(refused),
            reclaimed=True,
        )


# --- memory that can vanish, memory that costs ----------------------------------------------

_HUGE_PAGE = 2 << 20
_FALLOC_FL_KEEP_SIZE = 1
_FALLOC_FL_PUNCH_HOLE = 2
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]


def free_hugepages() -> int:
    """Free huge pages of the default size, system-wide (0 where there are none)."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("HugePages_Free:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _punch_hole(fd: int, length: int) -> None:
    if _libc.fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, 0, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class HugetlbHole(UserspaceMisbehaviour):
    name = "hugetlb_hole"
    expect = "error"
    summary = "a sealed hugetlb memfd: a punched hole and an empty huge-page pool SIGBUS its mapper"
    pause = 1.0

    @classmethod
    def unavailable(cls, ctx: Context) -> str | None:
        if ctx.hugepages < 1:
            return "no huge pages set aside for it"
        return super().unavailable(ctx)

    async def run(self, ctx: Context) -> Outcome:
        flags = os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING | os.MFD_HUGETLB
        fd = os.memfd_create("vbus-soak-hugetlb", flags)
        held: list[tuple[int, mmap.mmap]] = []
        try:
            os.ftruncate(fd, _HUGE_PAGE)
            try:
                mapping = mmap.mmap(fd, _HUGE_PAGE)
            except OSError as exc:
                raise Unexpected(f"no huge page to build the ring in: {exc.strerror}") from None
            held.append((-1, mapping))
            format_ring(mapping, 0, _RING)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
            async with member(ctx, self.name) as client:
                handle = await client.open_handle(ctx.device)
                kick, call = eventfd(), eventfd()
                try:
                    t0 = time.monotonic()
                    reply = await client.request(
                        protocol.Shm(handle, 0, 0, _RING, 0), (fd, kick, call)
                    )
                    detect = time.monotonic() - t0
                    if isinstance(reply, protocol.Ok):
                        raise Unexpected(await self._hole(ctx, client, fd, kick, held))
                finally:
                    os.close(kick)
                    os.close(call)
                code, message = error_of(reply)
                if code != errno.EINVAL or "hugetlb" not in message.lower():
                    raise Unexpected(f"refused with {code}: {message}")
                with rings(_RING) as (ring,):  # the connection stays
                    expect_ok(await client.shm(handle, 0, ring, writable=False), "honest SHM")
                if not await still_serves(client, handle):
                    raise Unexpected("the connection is unusable after the refusal")
        finally:
            for page_fd, page_map in held:
                with contextlib.suppress(BufferError):
                    page_map.close()
                if page_fd >= 0:
                    os.close(page_fd)
            os.close(fd)
        return self.outcome(
            True, f"ERROR EINVAL: {message}", detect_s=detect, faults=1, reclaimed=True
        )

    @staticmethod
    async def _hole(
        ctx: Context, client: WireClient, fd: int, kick: int, held: list[tuple[int, mmap.mmap]]
    ) -> str:
        """The daemon mapped it: free its page and empty the pool, then make it look."""
        await asyncio.sleep(0.05)  # its first poll after registration has touched the page
        took = 0
        for _ in range(3):  # punch again if the daemon faulted a fresh page in meanwhile
            _punch_hole(fd, _HUGE_PAGE)
            take = min(free_hugepages(), ctx.hugepages - took)
            if take <= 0:
                break
            pool = os.memfd_create("vbus-soak-hugetlb-pool", os.MFD_CLOEXEC | os.MFD_HUGETLB)
            try:
                os.ftruncate(pool, take * _HUGE_PAGE)
                pages = mmap.mmap(pool, take * _HUGE_PAGE)
            except OSError:
                os.close(pool)
                break
            held.append((pool, pages))
            for i in range(take):
                pages[i * _HUGE_PAGE] = 1
            took += take
        free = free_hugepages()
        os.eventfd_write(kick, 1)
        pool_text = f"took {took} huge pages, {free} left free"
        if await client.wait_closed(ctx.timeout):
            return f"a hugetlb memfd was accepted; after a punched hole ({pool_text}) the daemon hung up"
        return f"a hugetlb memfd was accepted ({pool_text}; a punched hole can SIGBUS its mapper)"


class HugeBuffers(UserspaceMisbehaviour):
    name = "huge_buffers"
    expect = "absorbed"
    summary = "256 overlapping 256 KiB buffers, re-posted to a sink as fast as it takes them"
    pause = 2.0
    count = 256
    length = DEFAULT_MAX_LEN
    seconds = 1.5

    @classmethod
    def unavailable(cls, ctx: Context) -> str | None:
        if ctx.sink_device is None:
            return "no sink-mode echo device on its bus"
        return super().unavailable(ctx)

    async def run(self, ctx: Context) -> Outcome:
        assert ctx.sink_device is not None
        rounds = 0
        async with member(ctx, self.name) as client:
            handle = await client.open_handle(ctx.sink_device)
            # A pool of exactly one buffer's length: every descriptor covers all of it.
            with contextlib.closing(HandRing(self.count, self.length // self.count)) as ring:
                expect_ok(await client.shm(handle, 0, ring, writable=False), "SHM")
                template = b"".join(
                    _DESC_FIELDS.pack(i, ring.data_offset, self.length, 1, 1)
                    for i in range(self.count)
                )
                descs = slice(HEADER_SIZE, HEADER_SIZE + len(template))
                # At least two rounds however slow the machine: the second proves the
                # sink took the first and asked for more; the clock only adds rounds.
                end = time.monotonic() + self.seconds
                while rounds < 2 or time.monotonic() < end:
                    ring.map[descs] = template
                    ring.publish_index(ring.valid + self.count)
                    ring.doorbell()
                    taken = await _until(ring, lambda: ring.inuse == ring.valid, ctx.timeout)
                    if not taken:
                        raise Unexpected(
                            f"the sink stopped taking huge buffers after {rounds} rounds"
                        )
                    rounds += 1
                if client.events:
                    raise Unexpected(f"well-formed huge buffers were punished: {client.events[0]}")
                if not await still_serves(client, handle):
                    raise Unexpected("call() stopped working beside the huge buffers")
        gib = rounds * self.count * self.length / (1 << 30)
        return self.outcome(
            True,
            f"{rounds} rounds of {self.count} overlapping 256 KiB buffers served ({gib:.1f} GiB)",
            reclaimed=True,
            detail=str(rounds),
        )


_DESC_FIELDS = struct.Struct("<QQQBB6x")


async def _until(ring: HandRing, done: Callable[[], bool], timeout: float) -> bool:
    """Sleep on the ring's call eventfd until ``done()`` (the client library's wait)."""
    try:
        await asyncio.wait_for(wait_for_work(ring.north.signal, done, ring.call), timeout)
    except TimeoutError:
        return False
    return True


class SparseMemory(UserspaceMisbehaviour):
    name = "sparse_memory"
    expect = "error"
    summary = "big sparse memfds walked by a sink, past the shm bounds of its peer and uid"
    pause = 2.0
    walk = 256 * DEFAULT_MAX_LEN  # bytes of each region the sink reads (one ring's worth)

    @classmethod
    def unavailable(cls, ctx: Context) -> str | None:
        if ctx.sink_device is None:
            return "no sink-mode echo device on its bus"
        if ctx.max_shm_per_peer is None or ctx.max_shm_per_uid is None:
            return "the daemon's shared-memory bounds are not known"
        if not ctx.cap_safe:
            return "it reaches the per-uid bound and needs a uid no good client uses"
        return super().unavailable(ctx)

    async def run(self, ctx: Context) -> Outcome:
        assert ctx.sink_device and ctx.max_shm_per_peer and ctx.max_shm_per_uid
        per_peer, per_uid = ctx.max_shm_per_peer, ctx.max_shm_per_uid
        # One region fits a peer's bound, two do not; a few connections reach the uid's.
        chunk = min(per_peer * 3 // 4, 1 << 30)
        buf_size = (chunk - (64 << 10)) // 256
        async with contextlib.AsyncExitStack() as stack:
            regions: list[HandRing] = []

            def region() -> HandRing:
                ring = HandRing(256, buf_size)
                stack.callback(ring.close)
                regions.append(ring)
                return ring

            first = await stack.enter_async_context(member(ctx, self.name))
            handle = await first.open_handle(ctx.sink_device)
            t0 = time.monotonic()
            expect_ok(await first.shm(handle, 0, region(), writable=False), "first region")
            accepted = regions[-1].size
            await self._walk(regions[-1], ctx.timeout)
            # A second region on the same connection: past the peer's bound.
            second = await first.open_handle(ctx.sink_device)
            code, peer_reason = error_of(await first.shm(second, 0, region(), writable=False))
            detect = time.monotonic() - t0
            if code != errno.ENOSPC or not any(w in peer_reason for w in ("peer", "connection")):
                raise Unexpected(f"past the per-peer bound: {code} {peer_reason}")
            if not await still_serves(first, handle):
                raise Unexpected("the connection is unusable after the refusal")
            # More connections of this uid: past the uid's bound at last.
            clients = [first]
            uid_reason = ""
            for _ in range(per_uid // chunk + 2):
                client = await stack.enter_async_context(member(ctx, self.name))
                clients.append(client)
                handle = await client.open_handle(ctx.sink_device)
                reply = await client.shm(handle, 0, region(), writable=False)
                if isinstance(reply, protocol.Ok):
                    accepted += regions[-1].size
                    if accepted > per_uid:
                        raise Unexpected(f"{accepted} bytes registered by one uid")
                    await self._walk(regions[-1], ctx.timeout)
                    continue
                code, uid_reason = error_of(reply)
                if code != errno.ENOSPC or "uid" not in uid_reason:
                    raise Unexpected(f"past the per-uid bound: {code} {uid_reason}")
                if not await still_serves(client, handle):
                    raise Unexpected("the connection is unusable after the refusal")
                break
            else:
                raise Unexpected(f"{accepted} bytes registered and no per-uid bound")
            ctx.note(self.name, "holding")
            await asyncio.sleep(ctx.hold)
            if any(c.closed_at is not None or c.events for c in clients):
                raise Unexpected("a connection holding memory within the bounds was dropped")
        return self.outcome(
            True,
            f"ERROR ENOSPC past the peer's and the uid's bounds ({accepted >> 20} MiB held): "
            f"{uid_reason}",
            detect_s=detect,
            faults=2,
            reclaimed=True,
        )

    async def _walk(self, ring: HandRing, timeout: float) -> None:
        """Hand the sink descriptors over pages this client never touched."""
        length = min(ring.buf_size, DEFAULT_MAX_LEN)
        n = min(ring.count, max(1, self.walk // length))
        ring.map[HEADER_SIZE : HEADER_SIZE + n * DESC_SIZE] = b"".join(
            _DESC_FIELDS.pack(i, ring.data_offset + i * ring.buf_size, length, 1, 1)
            for i in range(n)
        )
        ring.publish_index(n)
        ring.doorbell()
        if not await _until(ring, lambda: ring.inuse == n, timeout):
            raise Unexpected("the sink did not walk the sparse region")


# --- descriptors of the daemon -------------------------------------------------------------


class FdExhaustion(UserspaceMisbehaviour):
    name = "fd_exhaustion"
    expect = "error"
    summary = "opens connections and queues until its uid holds all the daemon's descriptors it may"
    pause = 3.0
    exhausts_uid = True
    per_connection = 64  # queues per connection (the connector's cap)

    async def run(self, ctx: Context) -> Outcome:
        held: list[tuple[WireClient, int]] = []  # a connection and one of its handles
        queues = 0
        refusals: list[str] = []
        limit = (ctx.max_fds_per_uid or 1 << 16) + 512  # registrations tried, at most
        detect = None
        try:
            while queues < limit:
                async with ctx.gate:
                    client = await WireClient.connect(ctx.socket)
                    try:
                        reply = await client.hello(f"soak-{self.name}")
                    except PeerClosed:
                        client.close()
                        reply, client = await self._refusal(ctx)
                if not isinstance(reply, protocol.Welcome):
                    client.close()
                    code, message = error_of(reply)
                    self._check(code, message, queues, "HELLO")
                    refusals.append(f"connection refused, {errno.errorcode[code]}: {message}")
                    break
                held.append((client, 0))
                fresh = True
                refused = False
                for _ in range(self.per_connection):
                    handle = await client.open_handle(ctx.device)
                    held[-1] = (client, handle)
                    with rings(4) as (ring,):  # the daemon keeps its own descriptors
                        t0 = time.monotonic()
                        try:
                            reply = await client.shm(handle, 0, ring, writable=False)
                        except PeerClosed:
                            raise Unexpected(f"disconnected after {queues} queues") from None
                    if isinstance(reply, protocol.Ok):
                        queues += 1
                        fresh = False
                        continue
                    code, message = error_of(reply)
                    if code == errno.EBUSY:
                        break  # this connection's queue cap: go on with another one
                    self._check(code, message, queues, "SHM")
                    detect = time.monotonic() - t0
                    refusals.append(f"{errno.errorcode[code]}: {message}")
                    if not await still_serves(client, handle):
                        raise Unexpected("the refused connection is unusable")
                    refused = True
                    break
                if refused and fresh:
                    break  # a connection holding nothing is refused: the uid's bound
            else:
                raise Unexpected(f"{queues} queues registered and no bound on descriptors")
            ctx.note(self.name, "holding")
            await asyncio.sleep(ctx.hold)
            for client, handle in held:
                if client.closed_at is not None or not await still_serves(client, handle):
                    raise Unexpected("a connection within the bound was dropped")
        finally:
            for client, _handle in held:
                client.close()
        return self.outcome(
            True,
            f"refused past {queues} queues on {len(held)} connections: {refusals[-1]}",
            detect_s=detect,
            faults=len(refusals),
            reclaimed=True,
        )

    @staticmethod
    async def _refusal(ctx: Context) -> tuple[protocol.Message, WireClient]:
        """Writing to a refused socket resets it, and the reset drops the reason
        queued on it: connect once more and listen, without writing."""
        probe = await WireClient.connect(ctx.socket)
        try:
            _seq, reply = await asyncio.wait_for(probe.recv(), ctx.timeout)
        except (PeerClosed, TimeoutError):
            probe.close()
            raise Unexpected("a new connection was dropped without a reason") from None
        return reply, probe

    @staticmethod
    def _check(code: int, message: str, queues: int, what: str) -> None:
        if code not in (errno.EMFILE, errno.ENOSPC):
            name = errno.errorcode.get(code, str(code))
            raise Unexpected(f"{what} refused with {name} after {queues} queues: {message}")


# --- membership and what a bus tells ---------------------------------------------------------


def _close_all_but(*keep: int) -> None:
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    low = 3
    for fd in sorted(keep):
        os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, max(soft, low + 1))


def member_child(path: str, device: str | None, orders: int, report: int, wait: float) -> NoReturn:
    """In a forked child: connect once told to, report the bus; once told its
    rule is gone, keep asking the daemon for things and report what it said."""
    try:
        gc.disable()
        _close_all_but(orders, report)
        os.read(orders, 1)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sock.settimeout(wait)
        sock.connect(path)
        seq = 0
        events: list[list[Any]] = []

        def ask(msg: protocol.Message) -> protocol.Message | None:
            nonlocal seq
            seq += 1
            try:
                sock.send(protocol.encode(msg, seq))
            except OSError:  # hung up on: what it said before is still queued
                seq = -1
            try:
                while True:
                    data = sock.recv(protocol.MAX_FRAME)
                    if not data:
                        return None
                    got, reply = protocol.decode_reply(data)
                    if isinstance(reply, protocol.Event):
                        events.append([int(reply.kind), reply.handle, reply.reason])
                    elif got == seq:
                        return reply
            except OSError:  # reset: gone
                return None

        welcome = ask(protocol.Hello(1, 1, "soak-removed-member"))
        opened = ask(protocol.Open(name=device)) if device is not None else None
        if not isinstance(welcome, protocol.Welcome) or (
            device is not None and not isinstance(opened, protocol.Opened)
        ):
            os.write(report, json.dumps({"error": f"{welcome} / {opened}"}).encode() + b"\n")
            os._exit(0)
        handle = opened.handle if isinstance(opened, protocol.Opened) else 0
        os.write(report, json.dumps({"bus": welcome.bus}).encode() + b"\n")
        os.read(orders, 1)
        t0 = time.monotonic()
        served = 0
        closed_after = None
        while time.monotonic() - t0 < wait and served < 3:
            reply = ask(protocol.Enumerate())
            if reply is not None and handle:
                reply = ask(protocol.Call(handle, 1, b"still mine?"))
            if reply is None:
                closed_after = time.monotonic() - t0
                break
            if isinstance(reply, protocol.Devices | protocol.Result):
                served += 1
            time.sleep(0.02)
        found = {"events": events, "served": served, "closed_after": closed_after}
        os.write(report, json.dumps(found).encode() + b"\n")
    finally:
        os._exit(0)


async def _read_line(fd: int, timeout: float) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    data = b""
    deadline = loop.time() + timeout
    while b"\n" not in data:
        ready: asyncio.Future[None] = loop.create_future()
        loop.add_reader(fd, _resolve, ready)
        try:
            await asyncio.wait_for(ready, max(0.0, deadline - loop.time()))
        except TimeoutError:
            raise Unexpected("the member child did not report in time") from None
        finally:
            loop.remove_reader(fd)
        with contextlib.suppress(BlockingIOError):
            chunk = os.read(fd, 4096)
            if not chunk:
                raise Unexpected("the member child went away")
            data += chunk
    line: dict[str, Any] = json.loads(data.split(b"\n", 1)[0])
    return line


async def _write_rule(fd: int, rule: str) -> None:
    """One ``members`` write through the admin tree (it commits before returning)."""
    try:
        await asyncio.to_thread(os.write, fd, rule.encode() + b"\n")
    except OSError as exc:
        raise Unexpected(f"members write {rule!r}: {exc.strerror}") from None


class RemovedMember(UserspaceMisbehaviour):
    name = "removed_member"
    expect = "disconnect"
    summary = "keeps using its bus after its member rule was removed (with, without a device)"
    pause = 1.0

    @classmethod
    def unavailable(cls, ctx: Context) -> str | None:
        if ctx.members_fd is None:
            return "no admin tree to change member rules through"
        return super().unavailable(ctx)

    async def run(self, ctx: Context) -> Outcome:
        slowest = 0.0
        said = ""
        for device in (None, ctx.device):
            detect, said = await self._once(ctx, device)
            slowest = max(slowest, detect)
        return self.outcome(
            True,
            f"BUS_GONE + disconnect, with and without a device open: {said}",
            detect_s=slowest,
            faults=2,
            reclaimed=True,
        )

    async def _once(self, ctx: Context, device: str | None) -> tuple[float, str]:
        assert ctx.members_fd is not None
        orders_r, orders = os.pipe()
        report, report_w = os.pipe()
        os.set_blocking(report, False)
        ruled = False
        pid = -1
        try:
            async with ctx.gate:
                pid = os.fork()
                if pid == 0:
                    member_child(str(ctx.socket), device, orders_r, report_w, min(ctx.timeout, 3.0))
                os.close(orders_r)
                os.close(report_w)
                orders_r = report_w = -1
                await _write_rule(ctx.members_fd, str(pid))  # a pid rule beats its uid rule
                ruled = True
                os.write(orders, b"c")
                ready = await _read_line(report, ctx.timeout)
            if "error" in ready:
                raise Unexpected(f"admitted through a pid rule, then: {ready['error']}")
            await _write_rule(ctx.members_fd, f"-{pid}")
            ruled = False
            os.write(orders, b"r")
            found = await _read_line(report, ctx.timeout + 5.0)
        finally:
            if ruled:
                with contextlib.suppress(Unexpected):
                    await _write_rule(ctx.members_fd, f"-{pid}")
            if pid > 0:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                await _reap(pid)
            for fd in (orders_r, orders, report, report_w):
                if fd >= 0:
                    os.close(fd)
        what = "with a device open" if device else "with no device open"
        gone = [
            e for e in found["events"]
            if e[0] == protocol.EventKind.BUS_GONE and e[1] == 0 and "no longer a member" in e[2]
        ]  # fmt: skip
        if found["served"]:
            raise Unexpected(
                f"removed from bus {ready['bus']!r} {what}, still served {found['served']} "
                f"requests (events: {found['events']})"
            )
        if not gone:
            raise Unexpected(f"removed {what}: no BUS_GONE for the connection ({found['events']})")
        if found["closed_after"] is None:
            raise Unexpected(f"removed {what}: told, but still connected")
        return float(found["closed_after"]), str(gone[0][2])


class CrossTenant(UserspaceMisbehaviour):
    name = "cross_tenant"
    expect = "denied"
    summary = "reads the daemon's counters through its own bus: device ids and client ids"
    pause = 0.5

    async def run(self, ctx: Context) -> Outcome:
        async with member(ctx, self.name) as client:
            welcome = client.welcome
            assert welcome is not None
            listing = await client.request(protocol.Enumerate())
            assert isinstance(listing, protocol.Devices)
            ids = sorted(d.id for d in listing.devices)
            if ids != list(range(1, len(ids) + 1)):
                raise Unexpected(f"device ids {ids} on its bus count devices of other buses")
            if ctx.own_bus and welcome.client_id > WireClient.welcomes:
                raise Unexpected(
                    f"client_id {welcome.client_id} after {WireClient.welcomes} clients of its "
                    "bus: it counts the clients of other buses"
                )
            _code, nothing = error_of(
                await client.open("no-such-device-" + ctx.rng.randbytes(4).hex())
            )
            probes: list[str | int] = [*ctx.hidden, *range(len(ids) + 1, len(ids) + 9), 2**31]
            slowest = 0.0
            for probe in probes:
                t0 = time.monotonic()
                reply = await client.open(probe)
                slowest = max(slowest, time.monotonic() - t0)
                if isinstance(reply, protocol.Opened):
                    raise Unexpected(f"opened {probe!r}, which is not on its bus")
                code, message = error_of(reply)
                if code != errno.ENOENT or message != nothing:
                    raise Unexpected(f"{probe!r} refused differently: {code} {message!r}")
        return self.outcome(
            True,
            f"ids 1..{len(ids)} and client id {welcome.client_id} of its own bus; "
            f"{len(probes)} foreign ids and names refused alike",
            detect_s=slowest,
            faults=len(probes),
            reclaimed=True,
        )


CATALOGUE: tuple[type[UserspaceMisbehaviour], ...] = (
    Stall,
    Garbage,
    OutOfBounds,
    Toctou,
    DoorbellFlood,
    CallFlood,
    Oversized,
    Truncated,
    Slowloris,
    FdAbuse,
    Crash,
    Churn,
    Namespace,
    BlockingCall,
    BlockingKick,
    SemaphoreKick,
    PathFd,
    HugetlbHole,
    HugeBuffers,
    SparseMemory,
    FdExhaustion,
    RemovedMember,
    CrossTenant,
)
