"""The echo deviceclass against MockQueue: no daemon, no ring, no event loop.

Queue 0 (tx) carries the north's messages, queue 1 (rx) the north's empty
buffers; ``DeviceHarness.poll`` drives the session as the NAPI poller does.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import pytest

from vbus.devices.echo import CALL_ECHO, QUEUE_RX, QUEUE_TX, Echo
from vbus.errors import Busy, Invalid, NotSupported
from vbus.testing import DeviceHarness, MockQueue


@pytest.fixture
def dev() -> Iterator[DeviceHarness[Echo]]:
    with DeviceHarness(Echo) as harness:
        yield harness


@pytest.fixture
def sink() -> Iterator[DeviceHarness[Echo]]:
    with DeviceHarness(Echo, {"mode": "sink"}) as harness:
        yield harness


def _queues(dev: DeviceHarness[Echo]) -> tuple[MockQueue, MockQueue]:
    return dev.queue(QUEUE_TX, writable=False), dev.queue(QUEUE_RX, writable=True)


# --- the queues ---------------------------------------------------------------------------


def test_echoes_bytes_in_order(dev: DeviceHarness[Echo]) -> None:
    tx, rx = _queues(dev)
    messages = [b"hello", b"", b"\x00\xff" * 20, b"x"]
    tx.post_many(messages)
    rx.post_many([64] * 6)
    assert dev.poll() == 4
    assert rx.written() == messages
    assert [c.written for c in rx.completions] == [5, 0, 40, 1]
    assert len(tx.completions) == 4 and tx.pending() == 0
    assert rx.pending() == 2  # the spare buffers stay posted
    counters = dev.model.stats()
    assert (counters["messages"], counters["bytes"], counters["stalls"]) == (4, 46, 0)
    assert tx.stats.messages == rx.stats.messages == 4


def test_multi_segment_buffers_are_gathered_and_scattered(dev: DeviceHarness[Echo]) -> None:
    tx, rx = _queues(dev)
    tx.post(b"head:", b"body", b":tail")  # three readable segments, one message
    tx.post(b"ab", 16, b"cd")  # room in a north->south chain is not part of the message
    rx.post(4, 4, 8)  # three writable segments, one reply
    rx.post(2, 2)
    assert dev.poll() == 2
    assert rx.written() == [b"head:body:tail", b"abcd"]
    first = rx.completions[0].buffer
    pieces = [rx.memory.read(addr, length) for addr, length, _ in first.segments]
    assert pieces == [b"head", b":bod", b"y:tail\x00\x00"]  # filled in chain order


def test_a_reply_longer_than_its_buffer_is_truncated(dev: DeviceHarness[Echo]) -> None:
    tx, rx = _queues(dev)
    tx.post(b"0123456789")
    tx.post(b"fits")
    rx.post(4)
    rx.post(2, 1)
    assert dev.poll() == 2
    # echo cuts the reply to the buffer's capacity; the written length says so.
    assert rx.written() == [b"0123", b"fit"]
    assert [c.written for c in rx.completions] == [4, 3]
    assert rx.stats.bytes == 7  # what reached the north
    assert dev.model.stats()["bytes"] == 14  # what echo took from tx


class _BackwardsQueue(MockQueue):
    """A queue completing out of order, as the contract allows: each batch
    is popped whole, served, then pushed last buffer first."""

    def read_many(self, budget: int) -> list[bytes]:
        bufs = self.pop_many(budget)
        payloads = [self.gather(buf) for buf in bufs]
        for buf in reversed(bufs):
            self.push(buf, 0)
        return payloads

    def write_many(self, payloads: Sequence[bytes]) -> int:
        bufs = self.pop_many(len(payloads))
        if len(bufs) < len(payloads):
            self.stats.stalls += 1
        written = [self.scatter(buf, data) for buf, data in zip(bufs, payloads, strict=False)]
        for buf, n in reversed(list(zip(bufs, written, strict=True))):
            self.push(buf, n)
        return len(bufs)


def test_out_of_order_completion_is_tolerated(dev: DeviceHarness[Echo]) -> None:
    tx = dev.add_queue(QUEUE_TX, _BackwardsQueue(writable=False))
    rx = dev.add_queue(QUEUE_RX, _BackwardsQueue(writable=True))
    assert isinstance(tx, MockQueue) and isinstance(rx, MockQueue)
    sent = [f"m{i}".encode() for i in range(10)]
    tx.post_many(sent)
    rx_bufs = rx.post_many([8] * 10)
    assert dev.poll(budget=4) == 10
    # Completions arrive backwards per batch, yet the i-th posted buffer holds the i-th message.
    assert [c.index for c in rx.completions] != [b.index for b in rx_bufs]
    by_buffer = {c.index: c.data for c in rx.completions}
    assert [by_buffer[b.index] for b in rx_bufs] == sent
    assert sorted(c.index for c in tx.completions) == list(range(10))
    assert dev.model.stats()["messages"] == 10


def test_without_receive_buffers_echo_waits_and_loses_nothing(dev: DeviceHarness[Echo]) -> None:
    tx, rx = _queues(dev)
    tx.post_many([b"a", b"b", b"c"])
    assert dev.poll() == 0  # backpressure: a stall, and the device sleeps
    assert dev.model.stats()["stalls"] == 1
    assert tx.pending() == 3 and tx.completions == []
    assert tx.notify_enabled and rx.notify_enabled  # armed on both: either may wake it
    rx.post(8)
    assert rx.wakeups >= 1  # posting room wakes it
    assert dev.poll() == 1
    rx.post_many([8, 8])
    assert dev.poll() == 2
    assert rx.written() == [b"a", b"b", b"c"]


def test_echo_kicks_the_north_and_the_queue_decides(dev: DeviceHarness[Echo]) -> None:
    tx, rx = _queues(dev)
    tx.post(b"x")
    rx.post(8)
    rx.north_armed = False  # the north is polling its rx queue
    dev.poll()
    for q in (tx, rx):
        assert q.calls.index("kick_north") > q.calls.index("push")  # kick after completing
    assert (tx.stats.signals_sent, rx.stats.signals_sent) == (1, 0)
    assert rx.stats.signals_suppressed == 1


def test_a_poll_takes_at_most_its_budget(dev: DeviceHarness[Echo]) -> None:
    tx, rx = _queues(dev)
    tx.post_many([b"m"] * 10)
    rx.post_many([4] * 10)
    assert dev.session.poll(3) == 3
    assert tx.pending() == 7 and len(rx.completions) == 3


def test_sink_mode_consumes_and_counts(sink: DeviceHarness[Echo]) -> None:
    tx = sink.queue(QUEUE_TX, writable=False)
    tx.post_many([b"12345", b"67", b"8"])
    assert sink.poll() == 3
    assert len(tx.completions) == 3 and tx.pending() == 0
    stats = sink.model.stats()
    assert (stats["messages"], stats["bytes"]) == (3, 8)
    assert "kick_north" in tx.calls  # space freed: the north is told at once


def test_the_mode_can_change_at_run_time(dev: DeviceHarness[Echo]) -> None:
    tx, rx = _queues(dev)
    dev.set_attribute("mode", "sink")
    tx.post(b"gone")
    assert dev.poll() == 1
    assert rx.completions == [] and len(tx.completions) == 1
    with pytest.raises(Invalid):
        dev.set_attribute("mode", "loud")


def test_queue_registration_is_checked(dev: DeviceHarness[Echo]) -> None:
    with pytest.raises(Invalid, match="does not exist"):
        dev.queue(2, writable=False)
    with pytest.raises(Invalid, match="wrong direction"):
        dev.queue(QUEUE_TX, writable=True)
    with pytest.raises(Invalid, match="wrong direction"):
        dev.queue(QUEUE_RX, writable=False)
    dev.queue(QUEUE_TX, writable=False)
    with pytest.raises(Busy, match="already registered"):
        dev.queue(QUEUE_TX, writable=False)


def test_no_queue_no_work(dev: DeviceHarness[Echo]) -> None:
    assert dev.poll() == 0
    tx = dev.queue(QUEUE_TX, writable=False)
    tx.post(b"waits for rx")
    assert dev.poll() == 0  # no rx queue yet: echo leaves tx alone
    assert tx.pending() == 1


# --- the call verb -------------------------------------------------------------------------


def test_call_echo_returns_its_data(dev: DeviceHarness[Echo]) -> None:
    for data in (b"ping", b"", bytes(range(256)) * 64):
        assert dev.call(CALL_ECHO, data) == data
    assert dev.model.stats()["calls"] == 3


@pytest.mark.parametrize("func", [0, 2, 0xFFFFFFFF])
def test_other_call_functions_are_not_supported(dev: DeviceHarness[Echo], func: int) -> None:
    with pytest.raises(NotSupported, match=f"no call function {func}"):
        dev.call(func, b"x")
    assert dev.model.stats()["calls"] == 0


# --- close -------------------------------------------------------------------------------------


def test_close_releases_the_queues() -> None:
    dev = DeviceHarness(Echo)
    tx, rx = _queues(dev)
    tx.post(b"left behind")
    session = dev.session
    dev.close()
    assert session.queues == {}  # the session keeps nothing of the connection
    assert tx.closed and rx.closed
    assert dev.conn.closed and dev.model.stats()["opens"] == 1
    assert session.poll(16) == 0  # a late poll finds nothing to touch
    # The registrations went with the connection: the same indexes register again.
    session.shm(QUEUE_TX, MockQueue(writable=False))
    session.shm(QUEUE_RX, MockQueue(writable=True))
