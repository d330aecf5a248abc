"""vbus: the user tool.  Talks to vbusd as an ordinary client of its bus."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from vbus import __version__
from vbus.client import connect
from vbus.errors import VbusError

__all__ = ["main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vbus",
        description="Talk to vbusd as a client of your bus.  The socket comes from "
        "--socket, else $VBUS_SOCKET, else the daemon's default run directory.",
    )
    parser.add_argument("--socket", type=Path, help="path of vbusd's socket")
    parser.add_argument("--version", action="version", version=f"vbus {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("devices", help="list the devices on your bus")
    call = sub.add_parser("call", help="call() a device function and print the reply")
    call.add_argument("device", help="device name or numeric id")
    call.add_argument("func", type=int, help="function number")
    call.add_argument("data", nargs="?", default="", help="request data (UTF-8 text)")
    return parser


async def _devices(args: argparse.Namespace) -> int:
    async with connect(args.socket) as bus:
        devices = await bus.devices()
        print(f"bus {bus.name}: {len(devices)} device(s)")
        for dev in devices:
            print(f"{dev.id:>6}  {dev.name:<24} {dev.deviceclass}")
    return 0


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
    handler = {"devices": _devices, "call": _call}[args.command]
    try:
        return asyncio.run(handler(args))
    except VbusError as exc:
        print(f"vbus: {exc.message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
