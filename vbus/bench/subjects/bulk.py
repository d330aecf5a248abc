"""Bulk: 64 KiB messages into the sink device, against a plain memory copy.

``vbus``: the client library's ``send_many`` into a queue of 64 KiB buffers
of the sink-mode echo device; GB/s as the daemon consumed them (each byte is
copied twice: into the ring by the client, message by message, and out of it
by the daemon, a span at a time, on two cores).  ``memcpy``: one process
slicing the same volume out of an mmap of the same size (``mapping[a:b]``,
one copy), the speed of memory here.
"""

from __future__ import annotations

import mmap
import time

from vbus.bench.clientside import run_vbus_stream
from vbus.bench.subject import Figure, Figures, Params, Subject, Target, Variant
from vbus.mitigation import DEFAULT_BUDGET

__all__ = ["SUBJECT", "BulkSubject"]


class BulkSubject(Subject):
    name = "bulk"
    title = "Bulk: 64 KiB messages one way"
    order = 40
    variants = (
        Variant("vbus", "vbus (client -> vbusd sink)", role="vbus"),
        Variant("memcpy", "memory copy, one process", role="ceiling"),
    )
    figures = (
        Figure("gb_per_s", "GB/s", "GB/s"),
        Figure("msgs_per_s", "msg/s", "msg/s"),
        Figure("producer_cpu", "prod CPU", "cores", higher_is_better=False),
        Figure("consumer_cpu", "cons CPU", "cores", higher_is_better=False),
    )
    primary = "gb_per_s"
    baseline = "vbus"

    def params(self, quick: bool) -> Params:
        return {
            "duration": 0.3 if quick else 2.0,
            "size": 65536,
            "batch": 16,
            "ring": 64,
            "budget": DEFAULT_BUDGET,
            "warmup": 64 if quick else 512,
        }

    def run(self, variant: str, params: Params) -> Figures:
        if variant == "vbus":
            figures = run_vbus_stream(params)
            figures["gb_per_s"] = figures["msgs_per_s"] * params["size"] / 1e9
            return figures
        if variant == "memcpy":
            return _memcpy(params)
        raise KeyError(f"bulk: no variant {variant!r}")

    def targets(self, medians: dict[str, Figures]) -> list[Target]:
        vbus = medians.get("vbus", {}).get("gb_per_s")
        copy = medians.get("memcpy", {}).get("gb_per_s")
        ratio = vbus / copy if vbus is not None and copy else None
        return [Target("bulk: vbus >= 0.5x the single-copy bandwidth", ratio, 0.5, ">=")]


def _memcpy(params: Params) -> Figures:
    size, ring = params["size"], params["ring"]
    mapping = mmap.mmap(-1, size * ring)
    mapping.write(b"\xa5" * (size * ring))
    spans = [(i * size, (i + 1) * size) for i in range(ring)]
    clock = time.perf_counter
    copies = 0
    t0 = clock()
    deadline = t0 + params["duration"]
    while clock() < deadline:
        for a, b in spans:
            mapping[a:b]  # one copy into a new bytes object, dropped at once
        copies += ring
    elapsed = clock() - t0
    mapping.close()
    return {
        "gb_per_s": copies * size / elapsed / 1e9,
        "msgs_per_s": copies / elapsed,
        "seconds": elapsed,
        "producer_cpu": 1.0,
    }


SUBJECT = BulkSubject()
