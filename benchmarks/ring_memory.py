"""Micro-benchmark: what one batch costs the south of a ring, per kind of north memory.

``python -m benchmarks.ring_memory`` times ``IoqSouth.read_span`` (the stream
shape: 64 messages of 64 B, contiguous) and ``IoqSouth.write_many`` over a
single flat region (the userspace connector's memfd) and, where the tree has
them, over guest memory of two regions and over page memory.  The ring is
re-armed by hand between calls (ownership flags and the north index, the same
few stores every time) and that cost is measured apart and subtracted, so the
figures are the south's own.  Best of several repeats: steadier than the
two-process stream bench on a shared machine.
"""

from __future__ import annotations

import argparse
import timeit
from collections.abc import Callable
from typing import Any

from vbus.ioq import DESC_SIZE, HEADER_SIZE, IoqNorth, IoqSouth, pool_layout

COUNT, BUF, BATCH = 256, 64, 64
_VALID_WORD = 64 // 4
_SOWN = 25


def _memories(buf: bytearray, data: int) -> dict[str, Callable[[], Any]]:
    from vbus import memory

    kinds: dict[str, Callable[[], Any]] = {"flat": lambda: memory.BufferMemory(buf)}
    if hasattr(memory, "GuestMemory"):
        # The ring alone in the first region, the buffers in the second one.
        region = memory.GuestRegion
        kinds["guest, 2 regions"] = lambda: memory.GuestMemory(
            [region(0, data, buf, 0), region(data, len(buf) - data, buf, data)]
        )
    return kinds


def _bench(kind: str, writable: bool, number: int) -> float:
    data, total = pool_layout(COUNT, BUF)
    buf = bytearray(total)
    north = IoqNorth(buf, 0, COUNT, data, BUF, None)
    memory = _memories(buf, data)[kind]()
    south = IoqSouth(memory, 0, COUNT, None, writable=writable)
    hdr = memoryview(buf)[:HEADER_SIZE].cast("I")
    payloads = [bytes([i]) * BUF for i in range(BATCH)]
    if writable:
        north.post_empty(COUNT)
        south.write_many(payloads * (COUNT // BATCH))
    else:
        for _ in range(COUNT // BATCH):  # every slot once: pointers laid out as the client does
            north.send_many(payloads)
            south.read_span(BATCH)
    ones = b"\x01" * BATCH
    base = HEADER_SIZE + _SOWN

    def rearm() -> None:
        valid = hdr[_VALID_WORD]
        start = valid % COUNT
        buf[base + start * DESC_SIZE : HEADER_SIZE + (start + BATCH) * DESC_SIZE : DESC_SIZE] = ones
        hdr[_VALID_WORD] = (valid + BATCH) & 0xFFFFFFFF

    if writable:

        def step() -> None:
            rearm()
            south.write_many(payloads)
    else:

        def step() -> None:
            rearm()
            south.read_span(BATCH)

    step()
    ours = min(timeit.repeat(step, number=number, repeat=7)) / number
    armed = min(timeit.repeat(rearm, number=number, repeat=7)) / number
    south.close()
    north.close()
    hdr.release()
    return (ours - armed) * 1e9


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ring_memory")
    parser.add_argument("--number", type=int, default=20000, help="calls per repeat")
    args = parser.parse_args(argv)
    data, total = pool_layout(COUNT, BUF)
    print(f"ring of {COUNT}, batches of {BATCH} x {BUF} B; ns per batch (best of 7)")
    for kind in _memories(bytearray(total), data):
        for writable, what in ((False, "read_span"), (True, "write_many")):
            ns = _bench(kind, writable, args.number)
            print(f"  {kind:18} {what:10} {ns:8.0f} ns   {ns / BATCH:6.1f} ns/msg")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
