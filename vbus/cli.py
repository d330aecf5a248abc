"""vbus: the user tool.  Talks to vbusd as an ordinary client of its bus."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vbus import __version__
from vbus import tap as tap_command
from vbus.client import connect
from vbus.errors import Denied, VbusError
from vbus.paths import socket_candidates
from vbus.xen import domu as xen_domu

__all__ = ["main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vbus",
        description="Talk to vbusd as a client of your bus.  The socket comes from "
        "--socket, else $VBUS_SOCKET, else the run directory of a daemon of your own uid "
        "($XDG_RUNTIME_DIR/vbus, /tmp/vbus-UID/vbus), else the system daemon's "
        "/run/vbus/vbus.sock.",
    )
    parser.add_argument("--socket", type=Path, help="path of vbusd's socket")
    parser.add_argument("--version", action="version", version=f"vbus {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    devices = sub.add_parser("devices", help="list the devices on your bus")
    devices.add_argument("--json", action="store_true", help="one JSON object, for scripts")
    status = sub.add_parser(
        "status",
        help="the daemon's health (loop lag, clients, memory, fds, errors logged)",
        description="The figures of the admin tree's status file, asked over the socket: "
        "for the daemon's own uid or root.",
    )
    status.add_argument("--json", action="store_true", help="one JSON object, for scripts")
    call = sub.add_parser("call", help="call() a device function and print the reply")
    call.add_argument("device", help="device name or numeric id")
    call.add_argument("func", type=int, help="function number")
    call.add_argument("data", nargs="?", default="", help="request data (UTF-8 text)")
    _add_soak(sub)
    _add_bench(sub)
    tap_command.add_parser(sub)
    xen_domu.add_parser(sub)
    _add_vm(sub)
    return parser


def _add_vm(sub: Any) -> None:
    from vbus.vm.command import add_parser

    add_parser(sub)


def _positive(kind: type[int] | type[float]) -> Callable[[str], float]:
    """An argparse type: a finite number above zero."""

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not math.isfinite(value) or value <= 0:
            raise argparse.ArgumentTypeError(f"must be above zero, not {text!r}")
        return value

    parse.__name__ = kind.__name__
    return parse


def _add_soak(sub: Any) -> None:
    soak = sub.add_parser(
        "soak",
        help="prove the daemon keeps serving good clients next to misbehaving ones",
        description="Start a daemon in a temporary run directory (or attach to one), run "
        "good clients alone for a baseline, then next to misbehaving ones, and check the "
        "bounds.  Exit status 1 when a bound is broken.",
    )
    soak.add_argument(
        "--duration",
        type=_positive(float),
        default=60.0,
        help="seconds of baseline + misbehaving together, at least 4 (default: 60)",
    )
    soak.add_argument(
        "--good",
        type=_positive(int),
        default=8,
        help="good clients, tasks in one process (default: 8)",
    )
    soak.add_argument(
        "--bad",
        default="all",
        help="all, a connector, or a comma-separated list of misbehaviours (default: all; see --list)",
    )
    soak.add_argument("--json", type=Path, help="write every figure to this file")
    soak.add_argument("--attach", type=Path, metavar="SOCKET", help="use a running daemon")
    soak.add_argument(
        "--loop",
        choices=("uvloop", "asyncio"),
        default="uvloop",
        help="event loop of the daemon and the clients (default: uvloop)",
    )
    soak.add_argument(
        "--rate",
        type=_positive(float),
        default=10000.0,
        help="messages/s each good client offers (default: 10000)",
    )
    soak.add_argument("--device", default="echo0", help="the echo device to use (default: echo0)")
    soak.add_argument(
        "--seed", type=int, default=0, help="seed of the misbehaviours' random choices (default: 0)"
    )
    soak.add_argument("--keep", action="store_true", help="keep the temporary directory")
    soak.add_argument("--list", action="store_true", help="list the misbehaviours and exit")


def _soak(args: argparse.Namespace) -> int:
    from vbus.soak.catalogue import catalogue, select
    from vbus.soak.runner import SoakConfig, run_soak

    if args.list:
        for cls in catalogue():
            print(f"{cls.name:<15} {cls.connector:<10} {cls.expect:<12} {cls.summary}")
        return 0
    try:
        select(args.bad)
    except ValueError as exc:
        print(f"vbus: {exc}", file=sys.stderr)
        return 2
    cfg = SoakConfig(
        duration=args.duration,
        good=args.good,
        bad=args.bad,
        json_path=args.json,
        attach=args.attach,
        loop=args.loop,
        rate=args.rate,
        device=args.device,
        seed=args.seed,
        keep=args.keep,
    )
    if args.loop == "uvloop":
        import uvloop

        return int(uvloop.run(run_soak(cfg)))
    return asyncio.run(run_soak(cfg))


def _add_bench(sub: Any) -> None:
    bench = sub.add_parser(
        "bench",
        help="benchmark vbus side by side with what users would pick instead",
        description="Runs every comparison in this run, alternating the sides for several "
        "rounds (each run a fresh process, the vbus side against a daemon of its own), and "
        "prints medians and ratios of medians.  Exit status 1 only if a run crashed.",
    )
    bench.add_argument("--quick", action="store_true", help="one short round (a smoke run)")
    bench.add_argument(
        "--rounds", type=_positive(int), help="rounds per variant (default 3; 1 with --quick)"
    )
    bench.add_argument(
        "--only",
        default="",
        help="comma-separated subjects (default: all but those --list marks as run only when named)",
    )
    bench.add_argument("--json", type=Path, help="write every figure and the machine to FILE")
    bench.add_argument("--plot", type=Path, help="bar chart of the ratios to FILE.png")
    bench.add_argument(
        "--loop",
        choices=("uvloop", "asyncio"),
        default="uvloop",
        help="event loop of every side: the daemon, the client library, the bare echoes (default: uvloop)",
    )
    bench.add_argument("--duration", type=_positive(float), help="seconds per streaming run")
    bench.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="py-spy the measured window of the vbus side (daemon and client; stream, mitigation, bulk, call) into DIR",
    )
    bench.add_argument("--list", action="store_true", help="list the subjects and exit")


def _bench(args: argparse.Namespace) -> int:
    from vbus.bench import BenchConfig, discover, run_bench

    if args.list:
        for subject in discover():
            variants = ", ".join(v.name for v in subject.variants)
            named = "  (run only when named: it boots machines)" if subject.on_request else ""
            print(f"{subject.name:<12} {subject.title}\n{'':<12} variants: {variants}{named}")
        return 0
    config = BenchConfig(
        quick=args.quick,
        rounds=args.rounds,
        only=tuple(name for name in args.only.split(",") if name),
        json_path=args.json,
        plot_path=args.plot,
        loop=args.loop,
        duration=args.duration,
        profile_dir=args.profile,
    )
    try:
        return run_bench(config, ["vbus", *(sys.argv[1:])])
    except (ValueError, RuntimeError) as exc:
        print(f"vbus: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


async def _devices(args: argparse.Namespace) -> int:
    async with connect(args.socket) as bus:
        devices = await bus.devices()
        if args.json:
            listing = [{"id": d.id, "name": d.name, "class": d.deviceclass} for d in devices]
            print(json.dumps({"bus": bus.name, "devices": listing}))
            return 0
        print(f"bus {bus.name}: {len(devices)} device(s)")
        for dev in devices:
            print(f"{dev.id:>6}  {dev.name:<24} {dev.deviceclass}")
    return 0


async def _status(args: argparse.Namespace) -> int:
    try:
        async with connect(args.socket) as bus:
            figures = await bus.status()
    except Denied as exc:
        # Not on any bus (the host administrator often is not): the admin
        # tree's status file says the same to whoever may read it.
        figures = _status_file(args.socket, exc)
    if args.json:
        print(json.dumps({key: _number(value) for key, value in figures.items()}))
        return 0
    width = max((len(key) for key in figures), default=0)
    for key, value in figures.items():
        print(f"{key:<{width}}  {value}")
    return 0


def _status_file(explicit: Path | None, refusal: VbusError) -> dict[str, str]:
    for sock in [explicit] if explicit is not None else socket_candidates():
        try:
            text = (sock.parent / "admin" / "status").read_text()
            break
        except OSError:
            continue
    else:
        raise refusal
    pairs = (line.split(" ", 1) for line in text.splitlines() if " " in line)
    return {key: value for key, value in pairs}


def _number(text: str) -> int | float | str:
    """A figure as JSON would have it: numbers as numbers, the rest as text."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        value = float(text)
    except ValueError:
        return text
    return value if math.isfinite(value) else text


async def _call(args: argparse.Namespace) -> int:
    ref: str | int = int(args.device) if args.device.isdigit() else args.device
    async with connect(args.socket) as bus:
        device = await bus.open(ref)
        reply = await device.call(args.func, args.data.encode())
        sys.stdout.buffer.write(reply + (b"" if reply.endswith(b"\n") else b"\n"))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if args.command == "soak":
        return _soak(args)
    if args.command == "bench":
        return _bench(args)
    if args.command == "tap":
        return tap_command.main(args)
    if args.command == "xen":
        return xen_domu.main(args)
    if args.command == "vm":
        from vbus.vm.command import main as vm_main

        return vm_main(args)
    handler = {"devices": _devices, "status": _status, "call": _call}[args.command]
    try:
        return asyncio.run(handler(args))
    except VbusError as exc:
        print(f"vbus: {exc.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
