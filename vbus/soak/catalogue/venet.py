"""Misbehaving venet norths: the catalogue of bad Ethernet drivers.

Each class is one bad north of a venet on the switch its bus shares
(``Context.venets``: venet devices of one switch on the bad client's bus).
Next to every instance, two more venets of that switch ping each other (the
witness): good traffic beside the bad act must lose nothing and keep its
round trip under ``WITNESS_P99`` seconds, or the instance fails.  The bad
norths drive their rings by hand (``vbus.soak.wire``), so they can post
what the client library never would; like the userspace catalogue they are
light on the CPU (bounded bursts, sleeps between them).

A venet is driven by one connection at a time: the instances of this
process take their devices from a pool (``_Pool``) and give them back.
What the device must do about each one is docs/design.md 3.8.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import Callable
from typing import ClassVar

from vbus import protocol
from vbus.devices.venet import BACKLOG_FRAMES
from vbus.net.calls import (
    CALL_CONFIG,
    CALL_LINK_UP,
    CALL_MAC,
    CALL_NEGOTIATE,
    CALL_STATS,
    CONFIG,
    NEGOTIATED,
    U64,
)
from vbus.net.switch import DEFAULT_MAX_MACS_PER_PORT
from vbus.net.vnet import (
    F_VERSION_1,
    GSO_TCPV4,
    HDR_NEEDS_CSUM,
    HDR_SIZE,
    header,
    max_plain_frame,
)
from vbus.soak.catalogue import Context, Misbehaviour, Outcome, Unexpected
from vbus.soak.catalogue.userspace import await_fault, expect_ok, handle_is_gone, member
from vbus.soak.wire import HandRing, WireClient

__all__ = [
    "CATALOGUE",
    "WITNESS_P99",
    "BroadcastStorm",
    "MacFlap",
    "NoRxBuffers",
    "RxOutOfBounds",
    "TxGarbage",
    "VenetMisbehaviour",
    "Witness",
]

WITNESS_PORTS = 2
WITNESS_P99 = 0.5  # seconds: the witness's round trip bound (a noisy, shared machine)
WITNESS_WAIT = 2.0  # seconds a witness ping may take before it counts as lost
_COUNT = 64  # descriptors per ring of a bad port
_WITNESS_COUNT = 256  # the witness drains floods too: a longer rx ring
_TX_BUF = 2048  # at least: every frame these norths send fits
_ETHERTYPE = (0x88B5).to_bytes(2, "big")  # IEEE local experimental
_BROADCAST = b"\xff" * 6
_PAYLOAD_AT = 26  # after the 12-byte header and the Ethernet header


def _frame(dst: bytes, src: bytes, payload: bytes = b"", hdr: bytes | None = None) -> bytes:
    return (hdr if hdr is not None else header()) + dst + src + _ETHERTYPE + payload.ljust(46)


def _local_mac() -> bytes:
    raw = bytearray(secrets.token_bytes(6))
    raw[0] = (raw[0] & 0xFC) | 0x02  # locally administered unicast
    return bytes(raw)


def _result(reply: protocol.Message, what: str) -> bytes:
    if not isinstance(reply, protocol.Result):
        raise Unexpected(f"{what} was answered with {reply}")
    return reply.data


class _Pool:
    """The venet devices of one context, lent to one instance at a time."""

    def __init__(self, names: tuple[str, ...]) -> None:
        self.free = list(names)
        self.changed = asyncio.Condition()

    async def take(self, n: int) -> list[str]:
        async with self.changed:
            await self.changed.wait_for(lambda: len(self.free) >= n)
            taken, self.free = self.free[:n], self.free[n:]
            return taken

    async def give(self, names: list[str]) -> None:
        async with self.changed:
            self.free.extend(names)
            self.changed.notify_all()


_POOLS: dict[int, tuple[Context, _Pool]] = {}


def _pool(ctx: Context) -> _Pool:
    found = _POOLS.get(id(ctx))
    if found is None or found[0] is not ctx:
        found = _POOLS[id(ctx)] = (ctx, _Pool(ctx.venets))
    return found[1]


class NetPort:
    """A north driving one venet by hand: no offloads, both rings, link up."""

    def __init__(
        self, client: WireClient, handle: int, tx: HandRing, rx: HandRing, mac: bytes, mtu: int
    ) -> None:
        self.client = client
        self.handle = handle
        self.tx = tx
        self.rx = rx
        self.mac = mac
        self.mtu = mtu

    @classmethod
    async def open(
        cls,
        stack: contextlib.AsyncExitStack,
        ctx: Context,
        label: str,
        device: str,
        *,
        count: int = _COUNT,
        post: bool = True,
    ) -> NetPort:
        client = await stack.enter_async_context(member(ctx, label))
        handle = await client.open_handle(device)
        negotiated = await client.request(
            protocol.Call(handle, CALL_NEGOTIATE, U64.pack(F_VERSION_1))
        )
        _features, rx_size = NEGOTIATED.unpack(_result(negotiated, "negotiate"))
        config = await client.request(protocol.Call(handle, CALL_CONFIG, b""))
        mac, mtu, _link, _neg = CONFIG.unpack(_result(config, "config"))
        tx = HandRing(count, max(_TX_BUF, HDR_SIZE + max_plain_frame(mtu) + 64))
        stack.callback(tx.close)
        rx = HandRing(count, rx_size)
        stack.callback(rx.close)
        expect_ok(await client.shm(handle, 0, tx, writable=False), "SHM tx")
        expect_ok(await client.shm(handle, 1, rx, writable=True), "SHM rx")
        if post:
            rx.north.post_empty(count)
            rx.north.signal.notify()
        _result(await client.request(protocol.Call(handle, CALL_LINK_UP, b"")), "link up")
        return cls(client, handle, tx, rx, mac, mtu)

    def send(self, frames: list[bytes]) -> int:
        n = self.tx.north.send_many(frames)
        if n:
            self.tx.north.signal.notify()
        return n

    def recv(self) -> list[bytes]:
        frames = self.rx.north.recv_many(self.rx.count)
        if frames:
            self.rx.north.signal.notify()
        return frames

    async def stats(self) -> dict[str, int]:
        reply = await self.client.request(protocol.Call(self.handle, CALL_STATS, b""))
        out: dict[str, int] = {}
        for line in _result(reply, "stats").decode().splitlines():
            key, _, value = line.partition(" ")
            out[key] = int(value)
        return out

    async def mac_query(self) -> bytes:
        return _result(await self.client.request(protocol.Call(self.handle, CALL_MAC, b"")), "mac")


class Witness:
    """Good traffic beside a bad north: two ports of the same switch ping
    each other, one frame at a time, alternating direction, draining
    whatever else the switch floods to them."""

    def __init__(self, a: NetPort, b: NetPort) -> None:
        self.a = a
        self.b = b
        self.sent = 0
        self.lost = 0
        self.rtts: list[float] = []

    async def run(self, stop: asyncio.Event, started: asyncio.Event) -> None:
        seq = 0
        while not stop.is_set():
            src, dst = (self.a, self.b) if seq % 2 == 0 else (self.b, self.a)
            payload = b"witness" + seq.to_bytes(4, "little")
            t0 = time.monotonic()
            while not src.send([_frame(dst.mac, src.mac, payload)]):
                await asyncio.sleep(0.001)  # its own tx ring is full: not a loss yet
            self.sent += 1
            arrived = False
            while not arrived and time.monotonic() - t0 < WITNESS_WAIT:
                src.recv()  # floods for it: drained, ignored
                arrived = any(f[_PAYLOAD_AT : _PAYLOAD_AT + 11] == payload for f in dst.recv())
                if not arrived:
                    await asyncio.sleep(0.001)
            if arrived:
                self.rtts.append(time.monotonic() - t0)
                started.set()
            else:
                self.lost += 1
            seq += 1
            await asyncio.sleep(0.01)

    def p99(self) -> float | None:
        if not self.rtts:
            return None
        ordered = sorted(self.rtts)
        return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]

    def kept(self) -> bool:
        p99 = self.p99()
        return self.sent >= 3 and self.lost == 0 and p99 is not None and p99 <= WITNESS_P99

    def __str__(self) -> str:
        p99 = self.p99()
        rtt = "-" if p99 is None else f"{p99 * 1e3:.1f} ms"
        return f"witness {self.sent - self.lost}/{self.sent} pings, p99 {rtt}"


class VenetMisbehaviour(Misbehaviour):
    """A bad north on ``ports`` venets, next to a witness pair of the same switch."""

    connector = "venet"
    ports: ClassVar[int] = 1
    hold: ClassVar[float] = 1.0  # seconds the bad act lasts

    @classmethod
    def unavailable(cls, ctx: Context) -> str | None:
        need = cls.ports + WITNESS_PORTS
        if len(ctx.venets) < need:
            return (
                f"it needs {need} venet devices on one switch of its bus "
                f"(the daemon under test has {len(ctx.venets)})"
            )
        return super().unavailable(ctx)

    async def run(self, ctx: Context) -> Outcome:
        pool = _pool(ctx)
        names = await pool.take(self.ports + WITNESS_PORTS)
        try:
            async with contextlib.AsyncExitStack() as stack:
                w1 = await NetPort.open(
                    stack, ctx, f"{self.name}-w1", names[-2], count=_WITNESS_COUNT
                )
                w2 = await NetPort.open(
                    stack, ctx, f"{self.name}-w2", names[-1], count=_WITNESS_COUNT
                )
                witness = Witness(w1, w2)
                stop, started = asyncio.Event(), asyncio.Event()
                task = asyncio.ensure_future(witness.run(stop, started))
                try:
                    async with asyncio.timeout(ctx.timeout):
                        await started.wait()
                    outcome = await self.act(ctx, stack, names[: self.ports])
                    await asyncio.sleep(0.1)  # the witness outlives the act a little
                finally:
                    stop.set()
                    await task
        finally:
            await pool.give(names)
        if not witness.kept():
            raise Unexpected(f"good venet traffic broke its bounds: {witness}")
        outcome.detail = f"{outcome.detail}; {witness}" if outcome.detail else str(witness)
        return outcome

    async def act(
        self, ctx: Context, stack: contextlib.AsyncExitStack, devices: list[str]
    ) -> Outcome:
        raise NotImplementedError


async def _settled(
    port: NetPort, done: Callable[[dict[str, int]], bool], timeout: float
) -> dict[str, int]:
    """Stats of ``port`` once ``done(stats)`` holds (or the last ones at the timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        stats = await port.stats()
        if done(stats) or time.monotonic() > deadline:
            return stats
        await asyncio.sleep(0.02)


class NoRxBuffers(VenetMisbehaviour):
    name = "venet_no_rx"
    expect = "backpressure"
    summary = "a venet north that never posts rx buffers while frames pour in for it"
    ports = 2
    hold = 1.5

    async def act(
        self, ctx: Context, stack: contextlib.AsyncExitStack, devices: list[str]
    ) -> Outcome:
        stalled = await NetPort.open(stack, ctx, self.name, devices[0], post=False)
        sender = await NetPort.open(stack, ctx, f"{self.name}-sender", devices[1])
        stalled.send([_frame(_BROADCAST, stalled.mac)])  # the switch learns where it is
        burst = [_frame(stalled.mac, sender.mac, i.to_bytes(4, "little")) for i in range(32)]
        await asyncio.sleep(0.05)
        first = await stalled.stats()
        t0 = time.monotonic()
        detect: float | None = None
        sent = 0
        while time.monotonic() - t0 < self.hold:
            sent += sender.send(burst)
            sender.recv()
            await asyncio.sleep(0.01)
            # Stopped: frames wait in its backlog (floods from other ports of
            # a busy switch may have stopped it before this burst).
            if detect is None and (await stalled.stats())["rx_backlog"]:
                detect = time.monotonic() - t0
        stats = await stalled.stats()
        backlog = stats["rx_backlog"]
        dropped = stats["rx_drop_ring_full"] - first["rx_drop_ring_full"]
        if detect is None or not stats["rx_stops"] or backlog > BACKLOG_FRAMES or not dropped:
            raise Unexpected(f"no bounded backpressure: {stats}")
        if stalled.client.events:
            raise Unexpected(f"a stalled north was punished: {stalled.client.events[0]}")
        # It posts its buffers at last: the backlog comes through.
        stalled.rx.north.post_empty(stalled.rx.count)
        stalled.rx.north.signal.notify()
        got = 0
        deadline = time.monotonic() + ctx.timeout
        while time.monotonic() < deadline:
            got += len(stalled.recv())
            if got >= backlog:
                break
            await asyncio.sleep(0.002)
        if got < backlog:
            raise Unexpected(f"after the stall {got}/{backlog} came through")
        return self.outcome(
            True,
            "backpressure: its backlog bounded, the excess dropped on its own port; resumed",
            detect_s=detect,
            reclaimed=True,
            detail=f"sent {sent}, backlog {backlog}, dropped {dropped}, delivered {got}",
        )


class TxGarbage(VenetMisbehaviour):
    name = "venet_garbage"
    expect = "absorbed"
    summary = "floods its tx ring with runts, oversize frames and lying vnet headers"

    async def act(
        self, ctx: Context, stack: contextlib.AsyncExitStack, devices: list[str]
    ) -> Outcome:
        rng = ctx.rng
        port = await NetPort.open(stack, ctx, self.name, devices[0])
        dst, src = _local_mac(), port.mac
        longest = max_plain_frame(port.mtu)  # Ethernet bytes; 14 of them are its header
        room = port.tx.buf_size - _PAYLOAD_AT + 1
        runts = [rng.randbytes(rng.randrange(1, 26)) for _ in range(16)]
        oversize = [
            header() + dst + src + _ETHERTYPE + rng.randbytes(rng.randrange(longest - 13, room))
            for _ in range(16)
        ]
        lies = [
            header(flags=HDR_NEEDS_CSUM, csum_start=14, csum_offset=16),  # CSUM not negotiated
            header(flags=2),  # DATA_VALID is the device's to set
            header(flags=HDR_NEEDS_CSUM, gso_type=GSO_TCPV4, gso_size=1448, hdr_len=54),
            header(hdr_len=4000),  # longer than the frame
            header(gso_type=9),  # no such GSO type
        ]
        bad_headers = [_frame(dst, src, rng.randbytes(64), hdr) for hdr in lies]
        kinds = {"runt": runts, "oversize": oversize, "bad_header": bad_headers}
        before = await port.stats()
        sent = dict.fromkeys(kinds, 0)
        t0 = time.monotonic()
        while time.monotonic() - t0 < self.hold:
            for kind, frames in kinds.items():
                batch = [rng.choice(frames) for _ in range(8)]
                sent[kind] += port.send(batch)
            port.recv()
            await asyncio.sleep(0.005)

        def counted(stats: dict[str, int]) -> bool:
            return all(stats[f"tx_drop_{k}"] - before[f"tx_drop_{k}"] >= n for k, n in sent.items())

        after = await _settled(port, counted, ctx.timeout)
        detect = time.monotonic() - t0 - self.hold
        drops = {k: after[f"tx_drop_{k}"] - before[f"tx_drop_{k}"] for k in kinds}
        if drops != sent:
            raise Unexpected(f"sent {sent}, counted {drops}")
        if after["tx_frames"] != before["tx_frames"]:
            raise Unexpected(f"garbage passed: {after['tx_frames'] - before['tx_frames']} frames")
        if port.client.events:
            raise Unexpected(f"garbage frames faulted the north: {port.client.events[0]}")
        if await port.mac_query() != port.mac:
            raise Unexpected("call() stopped working after the garbage")
        return self.outcome(
            True,
            "every bad frame dropped and counted by cause; the port still served",
            detect_s=detect,
            detail=", ".join(f"{k} {n}" for k, n in drops.items()),
        )


class RxOutOfBounds(VenetMisbehaviour):
    name = "venet_rx_oob"
    expect = "fault"
    summary = "posts rx buffers pointing outside its memory"
    ports = 2

    async def act(
        self, ctx: Context, stack: contextlib.AsyncExitStack, devices: list[str]
    ) -> Outcome:
        rng = ctx.rng
        bad = await NetPort.open(stack, ctx, self.name, devices[0], post=False)
        sender = await NetPort.open(stack, ctx, f"{self.name}-sender", devices[1])
        bad.send([_frame(_BROADCAST, bad.mac)])  # the switch learns where it is
        await asyncio.sleep(0.05)
        size = bad.rx.size
        ptr, length = rng.choice(
            [
                (size, 64),  # just past the end
                (size - 8, 64),  # straddles the end
                (1 << 40, bad.rx.buf_size),  # far away
                (2**64 - 8, 64),  # wraps a 64-bit address
            ]
        )
        first = bad.rx.valid
        for i in range(4):
            bad.rx.write_desc(first + i, ptr=ptr, length=length)
        bad.rx.publish_index(first + 4)
        t0 = time.monotonic()
        # Posted as any north posts: with a doorbell (a port that floods from
        # the rest of the switch stopped waits for it).  Then a frame for it:
        # the device finds the buffers while delivering and faults the
        # connection at once, with no further move of the bad north.
        bad.rx.doorbell()
        sender.send([_frame(bad.mac, sender.mac, b"for the bad one")])
        event = await await_fault(bad.client, bad.handle, ctx.timeout)
        detect = time.monotonic() - t0
        if "outside" not in event.reason and "exceeds" not in event.reason:
            raise Unexpected(f"fault without a bounds reason: {event.reason}")
        gone = await handle_is_gone(bad.client, bad.handle)
        return self.outcome(
            gone,
            "fault while delivering: rx buffer outside its memory",
            detect_s=detect,
            faults=1,
            reclaimed=gone,
            detail=event.reason,
        )


class MacFlap(VenetMisbehaviour):
    name = "venet_mac_flap"
    expect = "absorbed"
    summary = "the same source MACs from two ports in turn, and more MACs than a port may hold"
    ports = 2

    async def act(
        self, ctx: Context, stack: contextlib.AsyncExitStack, devices: list[str]
    ) -> Outcome:
        a = await NetPort.open(stack, ctx, f"{self.name}-a", devices[0])
        b = await NetPort.open(stack, ctx, f"{self.name}-b", devices[1])
        # Each learns the other's MAC first: the flapping frames then go to
        # the other bad port only, not flooded to the witness.
        a.send([_frame(_BROADCAST, a.mac)])
        b.send([_frame(_BROADCAST, b.mac)])
        await asyncio.sleep(0.05)
        flapping = [_local_mac() for _ in range(8)]
        from_a = [_frame(b.mac, mac) for mac in flapping]
        from_b = [_frame(a.mac, mac) for mac in flapping]
        # Past the per-port bound: the rest must not be learned.
        crowd = [_frame(b.mac, _local_mac()) for _ in range(DEFAULT_MAX_MACS_PER_PORT + 64)]
        before = await a.stats()
        for at in range(0, len(crowd), _COUNT // 2):
            while not a.send(crowd[at : at + _COUNT // 2]):
                await asyncio.sleep(0.002)
            b.recv()
            await asyncio.sleep(0.002)
        t0 = time.monotonic()
        flaps = 0
        while time.monotonic() - t0 < self.hold:
            flaps += a.send(from_a)
            flaps += b.send(from_b)
            a.recv()
            b.recv()
            await asyncio.sleep(0.005)
        after = await _settled(
            a, lambda s: s["tx_learn_refused"] > before["tx_learn_refused"], ctx.timeout
        )
        refused = after["tx_learn_refused"] - before["tx_learn_refused"]
        bound = after["switch_ports"] * DEFAULT_MAX_MACS_PER_PORT
        if not refused or after["switch_macs"] > bound:
            raise Unexpected(f"the MAC table is not bounded: {after}")
        if a.client.events or b.client.events:
            raise Unexpected("a flapping port was faulted")
        return self.outcome(
            True,
            "MACs moved between ports, the table stayed bounded, the witness unaffected",
            detail=f"flapping frames {flaps}, learning refused {refused}, "
            f"table {after['switch_macs']} of {bound}",
        )


class BroadcastStorm(VenetMisbehaviour):
    name = "venet_storm"
    expect = "absorbed"
    summary = "broadcast frames as fast as its tx ring takes them"

    async def act(
        self, ctx: Context, stack: contextlib.AsyncExitStack, devices: list[str]
    ) -> Outcome:
        port = await NetPort.open(stack, ctx, self.name, devices[0])
        storm = [_frame(_BROADCAST, port.mac, i.to_bytes(4, "little")) for i in range(_COUNT)]
        before = await port.stats()
        sent = 0
        t0 = time.monotonic()
        while time.monotonic() - t0 < self.hold:
            sent += port.send(storm)
            port.recv()
            await asyncio.sleep(0.005)
        after = await _settled(
            port, lambda s: s["tx_flooded"] - before["tx_flooded"] >= sent, ctx.timeout
        )
        flooded = after["tx_flooded"] - before["tx_flooded"]
        if flooded < sent:
            raise Unexpected(f"{sent} broadcasts sent, {flooded} flooded")
        return self.outcome(
            True,
            "every broadcast flooded; the other ports kept their traffic",
            detail=f"{flooded} broadcasts in {self.hold:.1f} s",
        )


CATALOGUE: tuple[type[VenetMisbehaviour], ...] = (
    NoRxBuffers,
    TxGarbage,
    RxOutOfBounds,
    MacFlap,
    BroadcastStorm,
)
