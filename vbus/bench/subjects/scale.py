"""Scale: 1, 16 and 256 concurrent clients streaming into one daemon.

Each variant starts its own daemon, then forks a few client processes
(asyncio tasks, one connection each; at most one process per core, at
least two once there are two clients):

1. every client connects and says HELLO: the daemon's RSS before and after,
   divided by the clients, is the RSS per idle connection;
2. every client opens the sink device and registers a tx queue;
3. all start together and saturate their queue for the same duration; the
   aggregate messages/s are counted as the daemon consumed them (each client
   waits until its ring is empty);
4. the daemon's STATUS gives the event-loop lag (p99 over the daemon's
   window, which here is its whole life: setup included) and its CPU.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from typing import Any

from vbus.bench.clientside import drained
from vbus.bench.daemon import SINK_DEVICE, BenchDaemon
from vbus.bench.procs import Channel, Child, fork, run_loop
from vbus.bench.subject import Figure, Figures, Params, Subject, Target, Variant

__all__ = ["SUBJECT", "ScaleSubject"]

_CHUNK = 16  # connections set up concurrently per process


class ScaleSubject(Subject):
    name = "scale"
    title = "Scale: concurrent clients, each streaming 64 B messages into its own session"
    order = 50
    variants = (
        Variant("c1", "1 client", role="vbus"),
        Variant("c16", "16 clients", role="vbus"),
        Variant("c256", "256 clients", role="vbus"),
    )
    figures = (
        Figure("msgs_per_s", "msg/s total", "msg/s"),
        Figure("rss_per_idle_conn_kib", "RSS/idle conn", "KiB", higher_is_better=False),
        Figure("loop_lag_p99_ms", "lag p99", "ms", higher_is_better=False),
        Figure("loop_lag_max_ms", "lag max", "ms", higher_is_better=False),
        Figure("daemon_cpu", "daemon CPU", "cores", higher_is_better=False),
    )
    primary = "msgs_per_s"
    baseline = "c1"

    def params(self, quick: bool) -> Params:
        return {
            "duration": 0.3 if quick else 2.0,
            "size": 64,
            "batch": 256,
            "ring": 1024,
            "procs": max(2, os.cpu_count() or 1),
        }

    def run(self, variant: str, params: Params) -> Figures:
        clients = int(variant.removeprefix("c"))
        return _scale(clients, params)

    def targets(self, medians: dict[str, Figures]) -> list[Target]:
        c16 = medians.get("c16", {})
        c256 = medians.get("c256", {})
        ratio = (
            c256["msgs_per_s"] / c16["msgs_per_s"]
            if "msgs_per_s" in c256 and c16.get("msgs_per_s")
            else None
        )
        return [
            Target("scale: 256 clients >= 0.8x the msg/s of 16", ratio, 0.8, ">="),
            Target(
                "scale: <= 64 KiB daemon RSS per idle connection (256 clients)",
                c256.get("rss_per_idle_conn_kib"),
                64.0,
                "<=",
            ),
            Target(
                "scale: event-loop lag p99 <= 5 ms under 256 clients",
                c256.get("loop_lag_p99_ms"),
                5.0,
                "<=",
            ),
        ]


def _split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def _scale(clients: int, params: Params) -> Figures:
    with BenchDaemon(params["loop"]) as daemon:
        rss0 = daemon.rss_kib()
        children: list[Child] = []
        try:
            for share in _split(clients, min(clients, params["procs"])):
                children.append(
                    fork(lambda channel, n=share: _group(channel, daemon, n, params))  # type: ignore[misc]
                )
            for child in children:
                child.recv(120)  # connected
            time.sleep(0.2)  # let the daemon settle what the handshakes allocated
            rss1 = daemon.rss_kib()
            for child in children:
                child.send("open")
            for child in children:
                child.recv(120)  # queues registered
            cpu0 = daemon.cpu_seconds()
            for child in children:
                child.send("start")
            results = [child.recv(120) for child in children]
            cpu1 = daemon.cpu_seconds()
            status = run_loop(params["loop"], _status(daemon))
            for child in children:
                child.send("exit")
        finally:
            for child in children:
                child.join()
    t0 = min(r["t0"] for r in results)
    elapsed = max(r["t_end"] for r in results) - t0
    sent = sum(r["sent"] for r in results)
    return {
        "msgs_per_s": sent / elapsed,
        "messages": float(sent),
        "seconds": elapsed,
        "clients": float(clients),
        "rss_per_idle_conn_kib": (rss1 - rss0) / clients,
        "rss_idle_kib": float(rss1),
        "loop_lag_p99_ms": float(status.get("loop_lag_p99_ms", "nan")),
        "loop_lag_max_ms": float(status.get("loop_lag_max_ms", "nan")),
        "daemon_cpu": (cpu1 - cpu0) / elapsed,
    }


async def _status(daemon: BenchDaemon) -> dict[str, str]:
    from vbus.client import connect

    async with connect(daemon.socket, name="bench-status") as bus:
        return await bus.status()


def _group(channel: Channel, daemon: BenchDaemon, clients: int, params: Params) -> None:
    run_loop(params["loop"], _group_main(channel, daemon, clients, params))


async def _group_main(channel: Channel, daemon: BenchDaemon, clients: int, params: Params) -> None:
    from vbus.client import Bus, ClientQueue, connect

    async with contextlib.AsyncExitStack() as stack:
        buses: list[Bus] = []
        for first in range(0, clients, _CHUNK):
            buses += await asyncio.gather(
                *(
                    stack.enter_async_context(connect(daemon.socket, name=f"bench-scale-{i}"))
                    for i in range(first, min(first + _CHUNK, clients))
                )
            )
        channel.send({"connected": len(buses)})
        await channel.recv_async()  # "open"

        async def open_tx(bus: Bus) -> ClientQueue:
            dev = await bus.open(SINK_DEVICE)
            return await dev.shm(0, "tx", count=params["ring"], buf_size=params["size"])

        queues: list[ClientQueue] = []
        for first in range(0, clients, _CHUNK):
            queues += await asyncio.gather(*(open_tx(bus) for bus in buses[first : first + _CHUNK]))
        channel.send({"ready": True})
        await channel.recv_async()  # "start"

        messages = [b"\xa5" * params["size"]] * params["batch"]
        clock = time.perf_counter
        t0 = clock()
        deadline = t0 + params["duration"]

        async def stream(tx: ClientQueue) -> tuple[int, float]:
            sent = 0
            while clock() < deadline:
                await tx.send_many(messages)
                sent += len(messages)
                await asyncio.sleep(0)  # let the other clients of this process run
            await drained(tx)
            return sent, clock()

        done: list[Any] = await asyncio.gather(*(stream(tx) for tx in queues))
        channel.send(
            {
                "t0": t0,
                "t_end": max(t for _, t in done),
                "sent": sum(n for n, _ in done),
            }
        )
        await channel.recv_async()  # "exit"


SUBJECT = ScaleSubject()
