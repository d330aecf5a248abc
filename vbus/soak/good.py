"""Good clients: a steady, verifiable stream through an echo device, plus call()s.

Every message carries the client's id, a u64 sequence number, the time it was
sent and a CRC-32 over all of it, so the receiver can tell a lost message (a
gap in the sequence), a corrupted one (bad CRC, someone else's id, a sequence
number that goes backwards) and the ring round-trip time.  Frame::

    u32 client id   u32 crc32(rest, seed=client id)
    u64 seq         i64 send time (time.monotonic_ns)      body (8..200 bytes)

The sender is paced (``rate`` messages/s, in batches every few ms) instead of
going flat out: on a 2-core machine a flat-out client measures the CPU it
steals, not the daemon.  A sender that falls behind its schedule by more than
``MAX_BEHIND`` seconds drops the backlog, so a starved client shows up as lost
throughput rather than a later burst.  call()s go out every ``call_interval``
seconds and must come back byte for byte.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import struct
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vbus.client import Bus, ClientQueue, Device, connect
from vbus.errors import VbusError

__all__ = ["GoodClient", "GoodStats", "check_message", "make_message"]

_HEAD = struct.Struct("<II")  # client id, crc
_REST = struct.Struct("<Qq")  # seq, send time
_ALL = struct.Struct("<IIQq")
_BODIES = [random.Random(n).randbytes(8 + (n * 37) % 193) for n in range(64)]
MAX_BEHIND = 0.5  # seconds of schedule a sender may lag before it skips ahead
TICK = 0.004  # seconds between two batches


def make_message(cid: int, seq: int, t_ns: int) -> bytes:
    rest = _REST.pack(seq, t_ns) + _BODIES[seq & 63]
    return _HEAD.pack(cid, zlib.crc32(rest, cid)) + rest


def check_message(msg: bytes, cid: int) -> tuple[int, int] | None:
    """``(seq, send time)`` of an intact message of client ``cid``, else None."""
    if len(msg) < _ALL.size:
        return None
    owner, crc, seq, t_ns = _ALL.unpack_from(msg)
    if owner != cid or zlib.crc32(memoryview(msg)[8:], cid) != crc:
        return None
    return seq, t_ns


@dataclass
class GoodStats:
    sent: int = 0
    received: int = 0
    lost: int = 0  # gaps in the sequence, and, at the end, what never came back
    corrupted: int = 0
    skipped: int = 0  # schedule the sender could not keep (starvation)
    calls: int = 0
    call_errors: int = 0
    call_corrupted: int = 0
    call_lat_us: list[int] = field(default_factory=list)  # since the last report
    ring_lat_us: list[int] = field(default_factory=list)

    COUNTERS = (
        "sent",
        "received",
        "lost",
        "corrupted",
        "skipped",
        "calls",
        "call_errors",
        "call_corrupted",
    )

    def counters(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.COUNTERS}


class GoodClient:
    """One well-behaved process-like client: its own connection, device and queues."""

    def __init__(
        self,
        cid: int,
        path: Path,
        device: str = "echo0",
        *,
        rate: float = 10000.0,
        call_interval: float = 0.01,
        count: int = 256,
        buf_size: int = 256,
    ) -> None:
        self.cid = cid
        self.path = path
        self.device_name = device
        self.rate = rate
        self.call_interval = call_interval
        self.count = count
        self.buf_size = buf_size
        self.stats = GoodStats()
        self._stack = contextlib.AsyncExitStack()
        self._bus: Bus | None = None
        self._device: Device | None = None
        self._tx: ClientQueue | None = None
        self._rx: ClientQueue | None = None
        self._expected = 0
        self._stopping = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        self._bus = await self._stack.enter_async_context(
            connect(self.path, name=f"soak-good-{self.cid}")
        )
        self._device = await self._bus.open(self.device_name)
        self._tx = await self._device.shm(0, "tx", count=self.count, buf_size=self.buf_size)
        self._rx = await self._device.shm(1, "rx", count=self.count, buf_size=self.buf_size)
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._send_loop()),
            loop.create_task(self._recv_loop()),
            loop.create_task(self._call_loop()),
        ]

    # --- the three loops ----------------------------------------------------------
    async def _send_loop(self) -> None:
        assert self._tx is not None
        tx = self._tx
        stats = self.stats
        cid = self.cid
        t0 = time.monotonic()
        scheduled = 0  # messages the schedule asked for so far (sent + skipped)
        while not self._stopping.is_set():
            due = int((time.monotonic() - t0) * self.rate)
            behind = due - scheduled
            if behind > self.rate * MAX_BEHIND:
                skip = behind - int(self.rate * TICK)
                stats.skipped += skip
                scheduled += skip
                behind -= skip
            if behind > 0:
                n = min(behind, self.count)
                first = stats.sent
                t_ns = time.monotonic_ns()
                await tx.send_many([make_message(cid, s, t_ns) for s in range(first, first + n)])
                stats.sent += n
                scheduled += n
            await asyncio.sleep(TICK)

    async def _recv_loop(self) -> None:
        assert self._rx is not None
        rx = self._rx
        stats = self.stats
        cid = self.cid
        while True:
            msgs = await rx.recv_many(self.count)
            now = time.monotonic_ns()
            expected = self._expected
            first_t = None
            for msg in msgs:
                checked = check_message(msg, cid)
                if checked is None:
                    stats.corrupted += 1
                    continue
                seq, t_ns = checked
                if first_t is None:
                    first_t = t_ns
                if seq == expected:
                    expected += 1
                elif seq > expected:
                    stats.lost += seq - expected
                    expected = seq + 1
                else:  # duplicated or out of order
                    stats.corrupted += 1
            self._expected = expected
            stats.received += len(msgs)
            if first_t is not None:
                stats.ring_lat_us.append((now - first_t) // 1000)

    async def _call_loop(self) -> None:
        assert self._device is not None
        device = self._device
        stats = self.stats
        rng = random.Random(self.cid)
        seq = 0
        while not self._stopping.is_set():
            payload = make_message(self.cid, seq, 0)
            seq += 1
            t0 = time.perf_counter_ns()
            try:
                reply = await device.call(1, payload)
            except VbusError:
                stats.call_errors += 1
            else:
                stats.call_lat_us.append((time.perf_counter_ns() - t0) // 1000)
                if reply != payload:
                    stats.call_corrupted += 1
            stats.calls += 1
            await asyncio.sleep(self.call_interval * rng.uniform(0.5, 1.5))

    # --- reporting and the end ---------------------------------------------------------
    def take_latencies(self) -> tuple[list[int], list[int]]:
        calls, ring = self.stats.call_lat_us, self.stats.ring_lat_us
        self.stats.call_lat_us, self.stats.ring_lat_us = [], []
        return calls, ring

    def failed(self) -> BaseException | None:
        """The exception a loop died of, if one did (a good client must not)."""
        for task in self._tasks:
            if task.done() and not task.cancelled() and task.exception() is not None:
                return task.exception()
        return None

    async def stop(self, drain_timeout: float = 10.0) -> None:
        """Stop sending, wait until everything sent came back, count the rest as lost."""
        self._stopping.set()
        send, recv, call = self._tasks
        try:
            await asyncio.wait_for(asyncio.gather(send, call), drain_timeout)
        except (TimeoutError, VbusError):
            pass  # failed() says why; what did not come back is counted as lost below
        deadline = time.monotonic() + drain_timeout
        while self._expected < self.stats.sent and time.monotonic() < deadline:
            if recv.done():
                break
            await asyncio.sleep(0.01)
        self.stats.lost += max(0, self.stats.sent - self._expected)
        recv.cancel()
        with contextlib.suppress(asyncio.CancelledError, VbusError):
            await recv

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self._stack.aclose()

    def report(self) -> dict[str, Any]:
        return {"cid": self.cid, **self.stats.counters()}
