"""The soak's client processes: ``python -m vbus.soak.worker good|bad ...``.

Good clients all live in one process (tasks), misbehaving ones in another, so
the bad ones cannot slow the good ones down on the client side except through
the CPU they take, which they keep small.  A worker reports on stdout, one JSON
object per line, and stops when its stdin says ``stop`` or closes (so it never
outlives the soak):

- good: ``ready``, then a ``tick`` every ``--report`` seconds (cumulative
  counters, latency samples since the last tick), ``final`` after draining.
- bad: ``ready`` (with the behaviours it cannot run and why), an ``outcome``
  per misbehaviour instance, a ``note`` when an instance says how far it got,
  ``final``.  ``--once`` runs each behaviour once and stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

from vbus.soak.catalogue import Context, Misbehaviour, catalogue, run_instance, select
from vbus.soak.good import GoodClient

__all__ = ["main"]


def emit(kind: str, **fields: Any) -> None:
    sys.stdout.write(json.dumps({"type": kind, "t": time.monotonic(), **fields}) + "\n")
    sys.stdout.flush()


def _watch_stdin(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()

    def readable() -> None:
        try:
            data = os.read(0, 4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data or b"stop" in data:
            loop.remove_reader(0)
            stop.set()

    os.set_blocking(0, False)
    loop.add_reader(0, readable)


async def run_good(args: argparse.Namespace) -> int:
    stop = asyncio.Event()
    _watch_stdin(stop)
    clients = [
        GoodClient(
            i + 1,
            args.socket,
            args.device,
            rate=args.rate,
            call_interval=args.call_interval,
        )
        for i in range(args.clients)
    ]
    lag_us: list[int] = []
    lag_task = asyncio.ensure_future(_measure_lag(lag_us))
    try:
        await asyncio.gather(*(client.start() for client in clients))
        emit("ready", clients=len(clients), pid=os.getpid())
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), args.report)
            _tick(clients, lag_us)
        await asyncio.gather(*(client.stop() for client in clients))
        _tick(clients, lag_us)
        failures = [repr(exc) for c in clients if (exc := c.failed()) is not None]
        emit("final", clients=[c.report() for c in clients], failures=failures)
    finally:
        lag_task.cancel()
        await asyncio.gather(*(client.close() for client in clients), return_exceptions=True)
    return 0


async def _measure_lag(samples: list[int], interval: float = 0.005) -> None:
    """The good clients' own event-loop lag: how late a timer fires in this
    process.  It separates latency the daemon causes from CPU this machine lacks."""
    while True:
        due = time.monotonic() + interval
        await asyncio.sleep(interval)
        samples.append(int((time.monotonic() - due) * 1e6))


def _tick(clients: list[GoodClient], lag_us: list[int]) -> None:
    totals: dict[str, int] = {}
    calls: list[int] = []
    ring: list[int] = []
    for client in clients:
        for key, value in client.stats.counters().items():
            totals[key] = totals.get(key, 0) + value
        c, r = client.take_latencies()
        calls += c
        ring += r
    failures = [repr(exc) for c in clients if (exc := c.failed()) is not None]
    lags = lag_us[:]
    lag_us.clear()
    emit("tick", **totals, call_lat_us=calls, ring_lat_us=ring, lag_us=lags, failures=failures)


async def run_bad(args: argparse.Namespace) -> int:
    stop = asyncio.Event()
    _watch_stdin(stop)
    ctx = Context(
        socket=args.socket,
        xen_socket=args.xen_socket,
        xen_domids=tuple(int(d) for d in args.xen_domids.split(",") if d),
        device=args.device,
        hidden=tuple(h for h in args.hidden.split(",") if h),
        cap_safe=args.own_uid,
        stranger=args.own_uid,
        handshake_timeout=args.handshake_timeout,
        max_pending_per_uid=args.max_pending_per_uid,
        max_connections_per_uid=args.max_connections_per_uid,
        timeout=args.timeout,
        seed=args.seed,
        own_bus=args.own_bus,
        sink_device=args.sink_device or None,
        vhost_dir=Path(args.vhost_dir) if args.vhost_dir else None,
        max_shm_per_peer=args.max_shm_per_peer,
        max_shm_per_uid=args.max_shm_per_uid,
        max_fds_per_uid=args.max_fds_per_uid,
        hugepages=args.hugepages,
        members_fd=args.members_fd,
        hold=args.hold,
        venets=tuple(v for v in args.venets.split(",") if v),
        on_note=lambda behaviour, what: emit("note", behaviour=behaviour, what=what),
        kvm_socket=args.kvm_socket or _beside(args.socket, "kvm.sock"),
    )
    behaviours = []
    skipped: dict[str, str] = {}
    for cls in select(args.bad):
        reason = cls.unavailable(ctx)
        if reason is None:
            behaviours.append(cls)
        else:
            skipped[cls.name] = reason
    emit(
        "ready",
        behaviours=[cls.name for cls in behaviours],
        skipped=skipped,
        pid=os.getpid(),
        uid=os.getuid(),
    )
    rng = random.Random(args.seed)

    async def keep_doing(cls: type[Misbehaviour]) -> None:
        if not args.once:
            with contextlib.suppress(TimeoutError):  # stagger the starts
                await asyncio.wait_for(stop.wait(), rng.uniform(0.0, 1.0))
        while not stop.is_set():
            outcome = await run_instance(cls(), ctx)
            emit("outcome", **outcome.as_dict())
            if args.once:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), cls.pause * rng.uniform(0.5, 1.5))

    tasks = [asyncio.ensure_future(keep_doing(cls)) for cls in behaviours]
    if args.once:
        if tasks:
            await asyncio.wait(tasks)
        stop.set()
    await stop.wait()
    # Let every instance in progress finish (each is bounded), then stop.
    done, pending = (
        await asyncio.wait(tasks, timeout=args.timeout * 3 + 5) if tasks else (set(), set())
    )
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    errors = [repr(t.exception()) for t in done if not t.cancelled() and t.exception()]
    emit("final", unfinished=len(pending), errors=errors)
    return 0


def _beside(socket: Path, name: str) -> Path | None:
    """``name`` in the directory of ``socket``, if it is there."""
    path = socket.parent / name
    return path if path.exists() else None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m vbus.soak.worker")
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    parser.add_argument("--as-uid", type=int, help="drop root privileges to this uid first")
    sub = parser.add_subparsers(dest="role", required=True)
    good = sub.add_parser("good")
    good.add_argument("--socket", type=Path, required=True)
    good.add_argument("--device", default="echo0")
    good.add_argument("--clients", type=int, default=8)
    good.add_argument("--rate", type=float, default=10000.0)
    good.add_argument("--call-interval", type=float, default=0.01)
    good.add_argument("--report", type=float, default=0.25)
    bad = sub.add_parser("bad")
    bad.add_argument("--socket", type=Path, required=True)
    bad.add_argument("--device", default="echo0")
    bad.add_argument("--bad", default="all")
    bad.add_argument("--hidden", default="")
    bad.add_argument("--own-uid", action="store_true")
    bad.add_argument("--handshake-timeout", type=float, default=5.0)
    bad.add_argument("--max-pending-per-uid", type=int, default=256)
    bad.add_argument("--max-connections-per-uid", type=int, default=1024)
    bad.add_argument("--timeout", type=float, default=10.0)
    bad.add_argument("--seed", type=int, default=0)
    bad.add_argument("--once", action="store_true", help="each behaviour once, then stop")
    bad.add_argument("--own-bus", action="store_true", help="no other clients on its bus")
    bad.add_argument("--sink-device", default="", help="a sink-mode echo device on its bus")
    bad.add_argument("--vhost-dir", default="", help="its bus's vhost-user socket directory")
    bad.add_argument("--max-shm-per-peer", type=int, help="the daemon's bound, in bytes")
    bad.add_argument("--max-shm-per-uid", type=int, help="the daemon's bound, in bytes")
    bad.add_argument("--max-fds-per-uid", type=int, help="the daemon's bound")
    bad.add_argument("--hugepages", type=int, default=0, help="free huge pages it may take")
    bad.add_argument(
        "--members-file",
        type=Path,
        help="a bus's members file in the admin tree, opened for writing before "
        "privileges are dropped",
    )
    bad.add_argument("--hold", type=float, default=0.2, help="seconds a reached bound is kept")
    bad.add_argument(
        "--kvm-socket", type=Path, help="the daemon's kvm.sock (default: beside --socket)"
    )
    bad.add_argument("--xen-socket", type=Path, help="the daemon's xen.sock")
    bad.add_argument("--xen-domids", default="", help="domids admitted to its bus, comma-separated")
    bad.add_argument("--venets", default="", help="venet devices of one switch on its bus")
    return parser


def drop_privileges(uid: int) -> None:
    """Become ``uid`` (group ``uid``, no supplementary groups) for good.

    The interpreter may live where ``uid`` cannot read (a root-only pyenv), so
    everything imported lazily later is imported now."""
    import concurrent.futures.thread  # noqa: F401 - uvloop imports it on first use

    import uvloop  # noqa: F401

    catalogue()  # imports every connector's catalogue module
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    members = getattr(args, "members_file", None)
    args.members_fd = os.open(members, os.O_WRONLY | os.O_CLOEXEC) if members else None
    if args.as_uid is not None:
        drop_privileges(args.as_uid)
    runner = run_good if args.role == "good" else run_bad
    if args.loop == "uvloop":
        import uvloop

        return int(uvloop.run(runner(args)))
    return asyncio.run(runner(args))


if __name__ == "__main__":
    sys.exit(main())
