"""upper: a deviceclass that lives outside vbus (docs/deviceclass.md).

- ``call(1, data)`` returns ``data`` in upper case.
- Queue 0 (north->south) carries messages; each comes back on queue 1
  (south->north) in upper case, after the attribute ``prefix``.
"""

from __future__ import annotations

from typing import Any

from vbus.core.device import Attribute, DeviceModel, Session
from vbus.errors import Busy, Invalid, NotSupported
from vbus.queue import Queue

CALL_UPPER = 1
TX, RX = 0, 1


class UpperSession(Session):
    model: Upper

    def call(self, func: int, data: bytes) -> bytes:
        if func != CALL_UPPER:
            raise NotSupported(f"upper: no call function {func}")
        return data.upper()

    def shm(self, index: int, queue: Queue) -> None:
        # Everything here came from an untrusted north: refuse what is wrong.
        if index not in (TX, RX):
            raise Invalid(f"upper: queue {index} does not exist (0 = tx, 1 = rx)")
        if index in self.queues:
            raise Busy(f"upper: queue {index} is already registered")
        if queue.writable != (index == RX):
            raise Invalid(f"upper: queue {index} has the wrong direction")
        self.queues[index] = queue

    def poll(self, budget: int) -> int:
        tx, rx = self.queues.get(TX), self.queues.get(RX)
        if tx is None or rx is None:
            return 0
        n = min(budget, tx.pending(), rx.pending())
        if n == 0:
            return 0  # nothing to do, or no room: rearm() decides when to wake
        requests = tx.read_many(n)  # copied out once; may be fewer (the poll's byte credit)
        prefix = self.model.prefix
        written = rx.write_many([prefix + data.upper() for data in requests])
        self.model.counters["messages"] += written
        tx.kick_north()  # the queues decide whether the north is really woken
        rx.kick_north()
        return len(requests)

    def rearm(self) -> bool:
        # Sleep unless there is work *and* room for its replies: the default
        # would poll again while messages wait for rx buffers.
        tx, rx = self.queues.get(TX), self.queues.get(RX)
        tx_ready = tx.enable_notify() if tx is not None else False
        rx_ready = rx.enable_notify() if rx is not None else False
        return tx_ready and rx_ready


class Upper(DeviceModel):
    name = "upper"
    description = "Answers call(1, data) and queue 0 -> queue 1 in upper case."
    attributes = (
        Attribute(
            "prefix", "str", "", doc="bytes put before every reply on queue 1", max_length=32
        ),
    )

    def __init__(self, device: Any) -> None:
        super().__init__(device)
        self.prefix = str(device.attrs.get("prefix", "")).encode()
        self.counters = {"opens": 0, "messages": 0}

    def open(self, conn: Any) -> Session:
        self.counters["opens"] += 1
        return UpperSession(self, conn)

    def attribute_changed(self, name: str, value: Any) -> None:
        if name == "prefix":
            self.prefix = str(value).encode()

    def stats(self) -> dict[str, int]:
        return dict(self.counters)
