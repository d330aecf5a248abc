"""Misbehaving processes: the userspace connector's catalogue.

Each class is one bad client, done once by ``run``.  They speak the wire and
build their rings by hand (``vbus.soak.wire``), are light on the CPU (bounded
bursts, sleeps between them) so that in a soak they test the daemon and not
the machine, and clean up after themselves whatever happens.  What the daemon
must do about each one is DESIGN.md section 6.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import gc
import json
import os
import resource
import signal
import socket
import struct
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from datetime import datetime
from typing import NoReturn

from vbus import protocol
from vbus.ioq import HEADER_SIZE, MAGIC
from vbus.soak.catalogue import Context, Misbehaviour, Outcome, Unexpected
from vbus.soak.wire import HandRing, PeerClosed, WireClient, eventfd, unsealed_memfd

__all__ = [
    "CATALOGUE",
    "CallFlood",
    "Churn",
    "Crash",
    "DoorbellFlood",
    "FdAbuse",
    "Garbage",
    "Namespace",
    "OutOfBounds",
    "Oversized",
    "Slowloris",
    "Stall",
    "Toctou",
    "Truncated",
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
                if code != errno.EMSGSIZE:
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
    for that pid): the client is dead and cannot see it.  False if not there yet."""
    pending = outcome.pending
    if not pending:
        return True
    closed = _closed_at(log, pending["pid"])
    if closed is None:
        return False
    reason, at = closed
    outcome.detect_s = max(0.0, at - pending["killed_at"])
    outcome.reaction = f"released on {reason}"
    outcome.reclaimed = True
    outcome.faults = 1
    outcome.pending = None
    return True


def _closed_at(log: str, pid: int) -> tuple[str, float] | None:
    needle = f'"pid": {pid},'
    for line in log.splitlines():
        if '"client.closed"' not in line or needle not in line:
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
)
