"""Misbehaving VMMs: the vhost-user connector's catalogue.

Each class is one bad front-end (``vbus.vhost.frontend``, blocking, run in a
thread), done once by ``run``, against a venet of its own on the bad
clients' bus: the device is named after the behaviour, and its socket is
``Context.vhost_dir / <name>.sock`` (one front-end per socket at a time, so
behaviours never queue behind each other).  What the daemon must do about
each one is docs/design.md 4.7.
"""

from __future__ import annotations

import asyncio
import os
import struct
import time
from collections.abc import Callable
from typing import ClassVar

from vbus.errors import ProtocolError
from vbus.soak.catalogue import Context, Misbehaviour, Outcome, Unexpected
from vbus.vhost import wire
from vbus.vhost.driver import INDIRECT, NEXT
from vbus.vhost.frontend import USER_BASE, Frontend
from vbus.vhost.wire import P, Region, Request

__all__ = [
    "CATALOGUE",
    "VhostBadRing",
    "VhostBadTable",
    "VhostGarbage",
    "VhostKickStorm",
    "VhostRingFault",
]

TX = 1  # virtio-net transmitq1


class _Vhost(Misbehaviour):
    connector: ClassVar[str] = "vhost_user"

    @classmethod
    def unavailable(cls, ctx: Context) -> str | None:
        if ctx.vhost_dir is None:
            return "no vhost-user devices on the bad clients' bus"
        return super().unavailable(ctx)

    @classmethod
    def device(cls) -> str:
        """The venet this behaviour uses (the soak's topology links one per behaviour)."""
        return cls.name

    def frontend(self, ctx: Context) -> Frontend:
        assert ctx.vhost_dir is not None
        return Frontend(str(ctx.vhost_dir / f"{self.device()}.sock"), timeout=ctx.timeout)

    async def run(self, ctx: Context) -> Outcome:
        return await asyncio.to_thread(self.act, ctx)

    def act(self, ctx: Context) -> Outcome:
        raise NotImplementedError


def _alive(front: Frontend) -> bool:
    try:
        return front.u64(Request.GET_FEATURES) != 0
    except (OSError, ProtocolError):
        return False


class VhostGarbage(_Vhost):
    name = "vhost_garbage"
    expect = "disconnect"
    summary = "random bytes, bad headers, oversized payloads, descriptors stuffed into a message"

    def act(self, ctx: Context) -> Outcome:
        rng = ctx.rng
        with self.frontend(ctx) as front:
            kind = rng.choice(("random", "version", "oversized", "fds", "unknown"))
            if kind == "random":
                data = bytes(rng.getrandbits(8) for _ in range(rng.randint(12, 200)))
                front.send_raw(data[:4] + struct.pack("=I", 0x80) + data[8:])  # no version 1
            elif kind == "version":
                front.send_raw(wire.HEADER.pack(Request.GET_FEATURES, 2, 0))
            elif kind == "oversized":
                front.send_raw(wire.HEADER.pack(Request.SET_FEATURES, 1, 1 << 20))
            elif kind == "fds":
                front.send(Request.SET_VRING_KICK, wire.u64(0), [front.memfd] * 8)
            else:
                front.send(rng.randint(41, 1 << 31))  # unknown, no way to say no: a hang-up
            t0 = time.monotonic()
            if not front.closed_by_peer(ctx.timeout):
                raise Unexpected(f"{kind}: the connection stayed open")
            return self.outcome(
                True, f"disconnected ({kind})", detect_s=time.monotonic() - t0, faults=1
            )


class VhostBadTable(_Vhost):
    name = "vhost_bad_table"
    expect = "error"
    summary = "memory tables that overlap, wrap, outgrow their memfd or are no memfd at all"

    def act(self, ctx: Context) -> Outcome:
        with self.frontend(ctx) as front:
            front.u64(Request.GET_FEATURES)
            front.send(Request.SET_PROTOCOL_FEATURES, wire.u64(P.MQ | P.REPLY_ACK))
            kind = ctx.rng.choice(("overlap", "wrap", "oversized", "not-memfd"))
            fds = [front.memfd, front.memfd]
            if kind == "overlap":
                regions = [Region(0, 1 << 20, USER_BASE, 0), Region(4096, 4096, USER_BASE << 1, 0)]
            elif kind == "wrap":
                regions = [Region(2**64 - 4096, 8192, USER_BASE, 0)]
                fds = fds[:1]
            elif kind == "oversized":
                regions = [Region(0, 1 << 30, USER_BASE, 0)]  # far past the memfd's end
                fds = fds[:1]
            else:
                regions = front.regions
                fds = [front.memfd, front.calls[0] if front.calls else _eventfd(front)]
            t0 = time.monotonic()
            if front.acked(Request.SET_MEM_TABLE, wire.mem_table(regions), fds):
                raise Unexpected(f"{kind}: the memory table was accepted")
            detect = time.monotonic() - t0
            if not _alive(front):
                raise Unexpected(f"{kind}: the connection did not survive the refusal")
            return self.outcome(True, f"refused with a nack ({kind})", detect_s=detect, faults=1)


def _eventfd(front: Frontend) -> int:
    fd = os.eventfd(0, os.EFD_CLOEXEC)
    front.calls.append(fd)  # closed with the front-end
    return fd


class VhostBadRing(_Vhost):
    name = "vhost_bad_ring"
    expect = "error"
    summary = "ring sizes that are not powers of two, ring addresses outside guest memory"

    def act(self, ctx: Context) -> Outcome:
        with self.frontend(ctx) as front:
            front.u64(Request.GET_FEATURES)
            front.send(Request.SET_PROTOCOL_FEATURES, wire.u64(P.MQ | P.REPLY_ACK))
            if not front.acked(
                Request.SET_MEM_TABLE, wire.mem_table(front.regions), [front.memfd, front.memfd]
            ):
                raise Unexpected("an honest memory table was refused")
            kind = ctx.rng.choice(("size", "outside", "misaligned"))
            t0 = time.monotonic()
            if kind == "size":
                ok = front.acked(
                    Request.SET_VRING_NUM, wire.vring_state(0, ctx.rng.choice((3, 1000, 65536)))
                )
            else:
                front.acked(Request.SET_VRING_NUM, wire.vring_state(0, 256))
                base = USER_BASE + (1 << 40) if kind == "outside" else USER_BASE + 4097
                ok = front.acked(
                    Request.SET_VRING_ADDR, wire.vring_addr(0, base, base + 8192, base + 4096)
                )
            if ok:
                raise Unexpected(f"{kind}: the ring was accepted")
            detect = time.monotonic() - t0
            if not _alive(front):
                raise Unexpected(f"{kind}: the connection did not survive the refusal")
            return self.outcome(True, f"refused with a nack ({kind})", detect_s=detect, faults=1)


class VhostRingFault(_Vhost):
    name = "vhost_ring_fault"
    expect = "fault"
    summary = "a running device given a descriptor loop, a head outside the table, an index jump, nested indirect tables"

    def act(self, ctx: Context) -> Outcome:
        with self.frontend(ctx) as front:
            front.start()
            drv = front.drivers[TX]
            if not _alive(front):  # answered after every request before it: the rings run
                raise Unexpected("the device did not come up")
            kind = ctx.rng.choice(("loop", "head", "jump", "nested"))
            data = front.ram.alloc(64)
            if kind == "loop":
                a, b = drv.free.pop(0), drv.free.pop(0)
                drv.write_desc(a, data, 64, NEXT, b)
                drv.write_desc(b, data, 64, NEXT, a)
                drv.make_available(a)
            elif kind == "head":
                drv.make_available(drv.num + 5)
            elif kind == "jump":
                front.ram.put_u16(drv.avail + 2, drv.avail_idx + drv.num + 1)
            else:
                table = front.ram.alloc(16, 16)
                front.ram.write(table, struct.pack("<QIHH", table, 16, INDIRECT, 0))
                head = drv.free.pop(0)
                drv.write_desc(head, table, 16, INDIRECT)
                drv.make_available(head)
            t0 = time.monotonic()
            front.kick(TX)
            if not _wait(lambda: front.error_signalled(TX), ctx.timeout):
                raise Unexpected(f"{kind}: no error eventfd signal")
            detect = time.monotonic() - t0
            if not front.u64(Request.GET_STATUS) & wire.STATUS_NEEDS_RESET:
                raise Unexpected(f"{kind}: GET_STATUS does not say DEVICE_NEEDS_RESET")
            return self.outcome(True, f"faulted: NEEDS_RESET ({kind})", detect_s=detect, faults=1)


class VhostKickStorm(_Vhost):
    name = "vhost_kick_storm"
    expect = "absorbed"
    summary = "kicks both rings in bursts with nothing posted, for a second"

    def act(self, ctx: Context) -> Outcome:
        with self.frontend(ctx) as front:
            front.start()
            kicks = 0
            deadline = time.monotonic() + 1.0
            while time.monotonic() < deadline:
                for _ in range(200):
                    os.eventfd_write(front.kicks[0], 1)
                    os.eventfd_write(front.kicks[TX], 1)
                kicks += 400
                time.sleep(0.002)  # light on the CPU: it tests the daemon, not the machine
            if not _alive(front) or front.u64(Request.GET_STATUS) & wire.STATUS_NEEDS_RESET:
                raise Unexpected("the kicks were not absorbed")
            return self.outcome(True, f"absorbed {kicks} kicks", detail=f"{kicks} kicks in 1 s")


def _wait(cond: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.01)
    return cond()


CATALOGUE: tuple[type[Misbehaviour], ...] = (
    VhostGarbage,
    VhostBadTable,
    VhostBadRing,
    VhostRingFault,
    VhostKickStorm,
)
