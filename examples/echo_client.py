"""Talk to the echo device: list the bus, call(), then stream messages through a queue pair.

Run ``make run`` in one shell, then ``.venv/bin/python examples/echo_client.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import struct
import sys
import time

from vbus.client import connect
from vbus.errors import VbusError

HEADER = struct.Struct("<Q")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--socket", help="vbusd socket (default: $VBUS_SOCKET or the run dir)")
    parser.add_argument("--device", default="echo0")
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--size", type=int, default=64, help="bytes per message")
    parser.add_argument("--batch", type=int, default=256)
    args = parser.parse_args()

    async with connect(args.socket, name="echo-client") as bus:
        devices = await bus.devices()
        print(f"bus {bus.name!r}:")
        for dev in devices:
            print(f"  {dev.id:>4}  {dev.name:<16} {dev.deviceclass}")

        echo = await bus.open(args.device)
        reply = await echo.call(1, b"hello, vbus")
        print(f"call(1, b'hello, vbus') -> {reply!r}")

        tx = await echo.shm(0, "tx", count=1024, buf_size=max(args.size, 64))
        rx = await echo.shm(1, "rx", count=1024, buf_size=max(args.size, 64))
        pad = b"\xa5" * (args.size - HEADER.size)
        batches = [
            [HEADER.pack(i) + pad for i in range(start, min(start + args.batch, args.messages))]
            for start in range(0, args.messages, args.batch)
        ]

        async def produce() -> None:
            for batch in batches:
                await tx.send_many(batch)

        async def consume() -> int:
            expected = 0
            while expected < args.messages:
                for msg in await rx.recv_many(args.batch):
                    (seq,) = HEADER.unpack_from(msg)
                    if seq != expected or len(msg) != args.size:
                        raise SystemExit(f"message {expected}: got seq {seq}, {len(msg)} bytes")
                    expected += 1
            return expected

        start = time.perf_counter()
        _, received = await asyncio.wait_for(asyncio.gather(produce(), consume()), 120)
        elapsed = time.perf_counter() - start

        sent_signals = tx.signals_sent + rx.signals_sent
        waits = tx.wakeups + rx.wakeups
        print(f"{received} messages of {args.size} B echoed in {elapsed:.3f} s")
        print(f"  {received / elapsed:,.0f} messages/s round trip")
        print(f"  north->south signals: {sent_signals} ({sent_signals / received:.4f} per message)")
        print(f"  north waits for the south: {waits} ({waits / received:.4f} per message)")
        await echo.close()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except VbusError as exc:  # no daemon, not on a bus, device gone: say so in one line
        sys.exit(f"echo_client: {exc.message}")
    except KeyboardInterrupt:
        sys.exit(130)
