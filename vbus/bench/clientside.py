"""The vbus side of the stream subjects: the client library pushing into a sink device.

Messages/s are counted as the daemon consumed them: after the last
``send_many`` the producer waits until its ring is empty (every descriptor
handed back by the south), then stops the clock.

Signals per message, both directions, measured at the north:

- north->south: ``ClientQueue.signals_sent`` (kicks that reached the eventfd);
- south->north: what arrived on the queue's ``call`` eventfd.  The client
  library drains it and drops the count, so the bench swaps in a transport
  that keeps it (same fd, same behaviour) and reads what is left at the end.
- north waits: ``ClientQueue.wakeups``, how often the producer slept on a full ring.

Daemon-side counters come from STATUS: any numeric key mentioning signals,
wake-ups or polls (the ``queue_*`` totals) is reported as a delta per
message, ``daemon_<key>_per_msg``.
"""

from __future__ import annotations

import contextlib
import gc
import inspect
import os
import time
from collections.abc import Callable
from typing import Any

from vbus.client import Bus, ClientQueue, Device
from vbus.mitigation import wait_for_work
from vbus.signal import EventfdTransport

__all__ = [
    "CountingTransport",
    "daemon_counters",
    "drained",
    "has_mitigation_switch",
    "open_tx",
    "run_vbus_stream",
    "stream_into",
]

_STATUS_WORDS = ("signal", "wakeup", "kick", "poll", "suppress")


class CountingTransport(EventfdTransport):
    """An eventfd transport that remembers how many kicks it drained."""

    __slots__ = ("received",)

    def __init__(self, fd: int) -> None:
        super().__init__(fd)
        self.received = 0

    def drain(self) -> int:
        n = super().drain()
        self.received += n
        return n


def has_mitigation_switch() -> bool:
    """Whether ``Device.shm`` takes ``mitigation=`` (the hook for mitigation off)."""
    return "mitigation" in inspect.signature(Device.shm).parameters


async def open_tx(
    bus: Bus,
    device: str,
    *,
    count: int,
    buf_size: int,
    mitigation: bool | None = None,
) -> tuple[Device, ClientQueue, CountingTransport]:
    """Open ``device`` and register its queue 0 (north->south)."""
    dev = await bus.open(device)
    kwargs: dict[str, Any] = {} if mitigation is None else {"mitigation": mitigation}
    tx = await dev.shm(0, "tx", count=count, buf_size=buf_size, **kwargs)
    counting = CountingTransport(tx.call.fd)
    tx.call = counting  # same fd: the library closes it, the old object is dropped
    return dev, tx, counting


async def drained(tx: ClientQueue) -> None:
    """Wait until the south has handed back every descriptor of ``tx``."""
    ring = tx.ring

    def empty() -> bool:
        return ring.space() == ring.count

    if not empty():
        await wait_for_work(ring.signal, empty, tx.call)


def _counters(tx: ClientQueue, counting: CountingTransport) -> dict[str, int]:
    return {
        "n2s": tx.signals_sent,
        "s2n": counting.received,
        "waits": tx.wakeups,
    }


def daemon_counters(status: dict[str, str]) -> dict[str, float]:
    """Numeric STATUS keys about signalling (for deltas per message)."""
    out: dict[str, float] = {}
    for key, value in status.items():
        if any(word in key for word in _STATUS_WORDS):
            with contextlib.suppress(ValueError):
                out[key] = float(value)
    return out


async def stream_into(
    tx: ClientQueue,
    counting: CountingTransport,
    *,
    size: int,
    batch: int,
    duration: float,
    warmup: int,
    south_cpu: Callable[[], float] | None = None,
    before: Callable[[], None] | None = None,
) -> dict[str, float]:
    """Saturate ``tx`` for ``duration`` seconds; figures as the south consumed them."""
    messages = [b"\xa5" * size] * batch
    for _ in range(max(1, warmup // batch)):
        await tx.send_many(messages)
    await drained(tx)
    if before is not None:
        before()  # e.g. attach a profiler: after the warm-up, outside the clock
    start = _counters(tx, counting)
    gc0 = sum(gen["collections"] for gen in gc.get_stats())
    cpu0 = time.process_time()
    south0 = south_cpu() if south_cpu is not None else 0.0
    send_many = tx.send_many
    clock = time.perf_counter
    sent = 0
    t0 = clock()
    deadline = t0 + duration
    while True:
        await send_many(messages)
        sent += batch
        if clock() >= deadline:
            break
    await drained(tx)
    elapsed = clock() - t0
    cpu = time.process_time() - cpu0
    south = (south_cpu() - south0) if south_cpu is not None else float("nan")
    with contextlib.suppress(BlockingIOError):
        counting.received += os.eventfd_read(counting.fd)  # kicks nobody waited for
    after = _counters(tx, counting)
    delta = {key: after[key] - start[key] for key in after}
    collections = sum(gen["collections"] for gen in gc.get_stats()) - gc0
    return {
        "msgs_per_s": sent / elapsed,
        "messages": float(sent),
        "seconds": elapsed,
        "n2s_per_msg": delta["n2s"] / sent,
        "s2n_per_msg": delta["s2n"] / sent,
        "signals_per_msg": (delta["n2s"] + delta["s2n"]) / sent,
        "north_waits_per_msg": delta["waits"] / sent,
        "producer_cpu": cpu / elapsed,
        "consumer_cpu": south / elapsed,
        "producer_gc_per_s": collections / elapsed,
    }


def run_vbus_stream(params: dict[str, Any], mitigation: bool | None = None) -> dict[str, float]:
    """One stream run against a fresh daemon: client library -> ``sink0``."""
    from vbus.bench.daemon import SINK_DEVICE, BenchDaemon
    from vbus.bench.procs import run_loop
    from vbus.client import connect

    async def main(daemon: BenchDaemon) -> dict[str, float]:
        async with connect(daemon.socket, name="bench-stream") as bus:
            _dev, tx, counting = await open_tx(
                bus,
                SINK_DEVICE,
                count=params["ring"],
                buf_size=params["size"],
                mitigation=mitigation,
            )
            status0 = daemon_counters(await bus.status())
            profiler = None
            if params.get("profile"):
                from vbus.bench.profile import WindowProfiler

                pids = {"daemon": daemon.pid, "client": os.getpid()}
                profiler = WindowProfiler(params["profile"], pids, params["duration"])
            figures = await stream_into(
                tx,
                counting,
                size=params["size"],
                batch=params["batch"],
                duration=params["duration"],
                warmup=params["warmup"],
                south_cpu=daemon.cpu_seconds,
                before=profiler.start if profiler else None,
            )
            if profiler is not None:
                profiler.stop()
            status1 = daemon_counters(await bus.status())
            sent = figures["messages"]
            for key, value in status1.items():
                if key in status0:
                    figures[f"daemon_{key}_per_msg"] = (value - status0[key]) / sent
            return figures

    with BenchDaemon(params["loop"]) as daemon:
        return run_loop(params["loop"], main(daemon))
