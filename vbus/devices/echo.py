"""echo: the smallest useful device, for tests, examples and benchmarks.

- ``call(1, data)`` returns ``data``.
- Queue 0 (north->south) is looped into queue 1 (south->north), a batch per
  poll; with attribute ``mode = sink`` queue 0 is consumed and only counted.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vbus.core.device import Attribute, DeviceModel, Session
from vbus.errors import Busy, Invalid, NotSupported

if TYPE_CHECKING:
    from vbus.core.model import Connection
    from vbus.queue import Queue

__all__ = ["CALL_ECHO", "QUEUE_RX", "QUEUE_TX", "Echo"]

CALL_ECHO = 1
QUEUE_TX = 0  # north -> south
QUEUE_RX = 1  # south -> north


class EchoSession(Session):
    model: Echo

    def call(self, func: int, data: bytes) -> bytes:
        if func != CALL_ECHO:
            raise NotSupported(f"echo: no call function {func}")
        self.model.counters["calls"] += 1
        return data

    def shm(self, index: int, queue: Queue) -> None:
        if index not in (QUEUE_TX, QUEUE_RX):
            raise Invalid(f"echo: queue {index} does not exist (0 = tx, 1 = rx)")
        if index in self.queues:
            raise Busy(f"echo: queue {index} is already registered")
        if queue.writable != (index == QUEUE_RX):
            raise Invalid(f"echo: queue {index} has the wrong direction")
        self.queues[index] = queue

    def poll(self, budget: int) -> int:
        tx = self.queues.get(QUEUE_TX)
        if tx is None:
            return 0
        counters = self.model.counters
        if self.model.sink:
            done = 0
            while done < budget:  # a span stops where the north's data area wraps
                data, lens = tx.read_span(budget - done)
                if not lens:
                    break
                done += len(lens)
                counters["messages"] += len(lens)
                counters["bytes"] += len(data)
                tx.kick_north()  # free space at once: the north may be waiting
            return done
        rx = self.queues.get(QUEUE_RX)
        if rx is None:
            return 0
        n = min(tx.pending(), budget)
        if n == 0:
            return 0
        n = min(n, rx.pending())
        if n == 0:
            # Backpressure: the north has not posted receive buffers.  Leave its
            # messages in its ring; its next rx post wakes us (rearm arms rx).
            counters["stalls"] += 1
            return 0
        payloads = tx.read_many(n)  # may be fewer: the queue bounds bytes per poll
        n = len(payloads)
        rx.write_many(payloads)
        counters["messages"] += n
        counters["bytes"] += sum(map(len, payloads))
        tx.kick_north()
        rx.kick_north()
        return n

    def rearm(self) -> bool:
        tx = self.queues.get(QUEUE_TX)
        rx = self.queues.get(QUEUE_RX)
        tx_ready = tx.enable_notify() if tx is not None else False
        rx_ready = rx.enable_notify() if rx is not None else False
        if self.model.sink:
            return tx_ready
        return tx_ready and rx_ready


class Echo(DeviceModel):
    name = "echo"
    description = "Loops queue 0 into queue 1 and echoes call(1, data); mode=sink only consumes."
    attributes = (
        Attribute(
            "mode",
            "choice",
            "echo",
            doc="echo: loop queue 0 into queue 1; sink: consume queue 0 and count",
            choices=("echo", "sink"),
        ),
    )

    def __init__(self, device: Any) -> None:
        super().__init__(device)
        self.sink = getattr(device, "attrs", {}).get("mode") == "sink"
        self.counters = {"calls": 0, "messages": 0, "bytes": 0, "stalls": 0, "opens": 0}

    def open(self, conn: Connection) -> Session:
        self.counters["opens"] += 1
        return EchoSession(self, conn)

    def attribute_changed(self, name: str, value: Any) -> None:
        if name == "mode":
            self.sink = value == "sink"

    def stats(self) -> dict[str, int]:
        return dict(self.counters)
