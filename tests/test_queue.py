"""vbus.queue and vbus.testing: the queue contract, its batch defaults, MockQueue, DeviceHarness.

``QueueBase``'s batch forms are checked twice: over ``MockQueue`` (a queue
that implements only the core) and over ``IoqSouth``'s own core, where they
must give what ioq's fast overrides give.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Iterator

import pytest

from vbus.core.device import Attribute, DeviceModel, Session
from vbus.core.model import Connection, Device
from vbus.errors import Busy, Invalid, NotSupported
from vbus.ioq import IoqNorth, IoqSouth, pool_layout
from vbus.memory import BufferMemory
from vbus.queue import Buffer, Queue, QueueBase
from vbus.testing import CONNECTOR, DeviceHarness, MockQueue

# --- Buffer ---------------------------------------------------------------------------


def test_buffer_lengths_count_segments_by_kind() -> None:
    buf = Buffer(0, 0, ((0, 12, False), (64, 100, True), (192, 1, True)))
    assert buf.length == 113
    assert buf.capacity == 101
    assert Buffer(1, 0, ((0, 5, False),)).capacity == 0


# --- MockQueue: the north's side and the core -----------------------------------------------


def test_posted_buffers_pop_in_order_with_their_segments() -> None:
    q = MockQueue(writable=False)
    assert q.pending() == 0 and q.pop() is None
    first = q.post(b"hello", cookie=7)
    chain = q.post(b"hdr", 16, b"tail", 8)  # a chain mixing both kinds
    assert q.pending() == 2
    got = q.pop()
    assert got == first and got.cookie == 7
    ((addr, length, writable),) = got.segments
    assert (length, writable) == (5, False)
    assert q.memory.read(addr, length) == b"hello"
    got = q.pop()
    assert got == chain
    assert [(seg[1], seg[2]) for seg in chain.segments] == [
        (3, False),
        (16, True),
        (4, False),
        (8, True),
    ]
    assert q.gather(chain) == b"hdrtail"
    addrs = [seg[0] for seg in chain.segments]
    assert len(set(addrs)) == 4 and all(a % 64 == 0 for a in addrs)  # segments do not overlap
    assert q.memory.read(chain.segments[1][0], 16) == bytes(16)  # room starts zeroed
    assert q.pending() == 0 and q.outstanding == 2
    assert q.calls == ["pop:empty", "pop", "pop"]


def test_completions_come_in_push_order_with_what_was_written() -> None:
    q = MockQueue(writable=True)
    a, b = q.post(8), q.post(b"req:", 4, 4)
    assert q.pop_many(5) == [a, b]
    assert q.scatter(b, b"abcdefXYZ") == 8  # cut to the writable segments, in chain order
    q.push(b, 8)
    q.push(a, 0)  # out of order: any popped buffer, in any order
    assert [c.index for c in q.completions] == [b.index, a.index]
    assert q.written() == [b"abcdefXY", b""]
    assert q.completions[0].written == 8 and q.completions[0].cookie == 0
    assert q.memory.read(b.segments[0][0], 4) == b"req:"  # readable segments untouched
    assert (q.stats.messages, q.stats.bytes) == (2, 8)
    assert q.outstanding == 0


def test_push_refuses_what_the_contract_forbids() -> None:
    q = MockQueue(writable=True)
    a = q.post(4)
    not_popped = q.post(4)
    q.pop()
    with pytest.raises(Invalid, match="not popped"):
        q.push(not_popped)
    with pytest.raises(Invalid, match="not popped"):
        q.push(Buffer(a.index, a.cookie, ((0, 400, True),)))  # forged segments
    with pytest.raises(Invalid, match="capacity 4"):
        q.push(a, 5)
    with pytest.raises(Invalid, match="capacity 4"):
        q.push(a, -1)
    q.push(a, 4)
    with pytest.raises(Invalid, match="pushed already"):
        q.push(a, 4)
    ro = MockQueue(writable=False)
    ro.post(b"data")
    buf = ro.pop()
    assert buf is not None
    with pytest.raises(Invalid, match="capacity 0"):
        ro.push(buf, 1)  # nothing writable in it
    with pytest.raises(Invalid, match="at least one segment"):
        ro.post()


def test_notifications_are_recorded_and_the_north_flag_decides_kicks() -> None:
    q = MockQueue(writable=True)
    assert q.notify_enabled
    q.post(8)
    assert q.wakeups == 1  # posted while the device wanted to be woken
    q.disable_notify()
    q.post(8)
    assert q.wakeups == 1  # the device polls: no wake-up
    assert q.kick_north() is True
    q.north_armed = False  # the north polls
    assert q.kick_north() is False
    assert q.enable_notify() is True  # two buffers are waiting
    assert q.notify_enabled
    q.pop_many(2)
    assert q.enable_notify() is False
    assert (q.stats.signals_sent, q.stats.signals_suppressed) == (1, 1)
    assert q.calls == [
        "disable_notify",
        "kick_north",
        "kick_north",
        "enable_notify",
        "pop",
        "pop",
        "enable_notify",
    ]


def test_a_poll_has_a_byte_credit_when_asked() -> None:
    q = MockQueue(writable=False, poll_bytes=100)
    for _ in range(4):
        q.post(b"x" * 60)
    assert len(q.pop_many(4)) == 4  # outside a poll nothing is bounded
    for _ in range(4):
        q.post(b"x" * 60)
    q.disable_notify()
    assert len(q.pop_many(4)) == 2  # 60 + 60 spends the credit; the first always comes
    assert q.pop() is None and q.pending() == 2
    q.disable_notify()  # the next poll: a fresh credit
    assert len(q.pop_many(4)) == 2
    with pytest.raises(Invalid, match="at least 1"):
        MockQueue(writable=False, poll_bytes=0)


def test_memory_is_reused_once_everything_is_completed() -> None:
    q = MockQueue(writable=False, memory_size=256)
    for _ in range(3):
        for _ in range(4):
            q.post(b"y" * 64)
        with pytest.raises(Invalid, match="memory full"):
            q.post(b"z")
        assert len(q.read_many(8)) == 4
    assert len(q.completions) == 12


def test_a_closed_queue_refuses_every_call() -> None:
    q = MockQueue(writable=False)
    q.post(b"x")
    q.close()
    for call in (q.pending, q.pop, q.kick_north, q.disable_notify, q.enable_notify):
        with pytest.raises(Invalid, match="after close"):
            call()
    with pytest.raises(Invalid, match="after close"):
        q.post(b"x")


# --- QueueBase: the batch forms in terms of the core --------------------------------------------


def test_default_read_paths_join_readable_segments_and_hand_back() -> None:
    q = MockQueue(writable=False)
    q.post(b"one")
    q.post(b"tw", 8, b"o")  # writable room in a north->south chain is skipped
    q.post(b"three")
    assert q.read_many(2) == [b"one", b"two"]
    assert [c.written for c in q.completions] == [0, 0]
    assert q.read_span(8) == (b"three", [5])
    assert q.read_span(8) == (b"", [])
    assert (q.stats.messages, q.stats.bytes) == (3, 11)
    with pytest.raises(Invalid, match="fills"):
        MockQueue(writable=True).read_many(1)
    with pytest.raises(Invalid, match="fills"):
        MockQueue(writable=True).read_span(1)


def test_default_write_many_fills_in_order_truncates_and_counts_stalls() -> None:
    q = MockQueue(writable=True)
    q.post(4)
    q.post(2, 3)  # two writable segments
    assert q.write_many([b"abcdef", b"12345678"]) == 2
    assert q.written() == [b"abcd", b"12345"]
    assert q.stats.stalls == 0
    q.post(16)
    assert q.write_many([b"x", b"y", b"z"]) == 1  # one buffer posted: backpressure
    assert q.stats.stalls == 1
    assert q.write_many([]) == 0
    with pytest.raises(Invalid, match="north fills"):
        MockQueue(writable=False).write_many([b"x"])


def test_default_push_many_is_push_each() -> None:
    q = MockQueue(writable=True)
    bufs = [q.post(4) for _ in range(3)]
    assert q.pop_many(3) == bufs
    q.push_many([(bufs[2], 1), (bufs[0], 2)])
    assert [c.index for c in q.completions] == [bufs[2].index, bufs[0].index]
    with pytest.raises(Invalid):
        q.push_many([(bufs[1], 0), (bufs[1], 0)])


class _IoqPair:
    """One ioq ring, both ends, for comparing the defaults with ioq's overrides."""

    def __init__(self, writable: bool, count: int = 8, buf_size: int = 64) -> None:
        data, size = pool_layout(count, buf_size)
        self.buf = bytearray(size)
        self.north = IoqNorth(self.buf, 0, count, data, buf_size, None)
        self.memory = BufferMemory(self.buf)
        self.south = IoqSouth(self.memory, 0, count, None, writable=writable)

    def close(self) -> None:
        self.south.close()
        self.north.close()
        self.memory.release()


@pytest.fixture
def ioq_pairs() -> Iterator[list[_IoqPair]]:
    made: list[_IoqPair] = []
    yield made
    for pair in made:
        pair.close()


def test_the_defaults_over_ioqs_core_match_its_fast_paths(ioq_pairs: list[_IoqPair]) -> None:
    payloads = [bytes([i]) * (1 + 7 * i) for i in range(6)]
    fast, slow = _IoqPair(False), _IoqPair(False)
    ioq_pairs += [fast, slow]
    for pair in (fast, slow):
        assert pair.north.send_many(payloads) == 6
    assert QueueBase.read_many(slow.south, 4) == fast.south.read_many(4) == payloads[:4]
    assert QueueBase.read_span(slow.south, 8) == fast.south.read_span(8)
    assert slow.buf == fast.buf  # the same descriptors handed back, the same index

    fast, slow = _IoqPair(True), _IoqPair(True)
    ioq_pairs += [fast, slow]
    for pair in (fast, slow):
        pair.north.post_empty(3)
    long = [b"a" * 70, b"b", b"c" * 64, b"d"]  # one too long for its buffer, one too many
    assert QueueBase.write_many(slow.south, long) == fast.south.write_many(long) == 3
    assert slow.north.recv_many(8) == fast.north.recv_many(8) == [b"a" * 64, b"b", b"c" * 64]
    assert slow.south.stats == fast.south.stats


def test_queues_implement_the_protocol() -> None:
    queues: list[Queue] = [MockQueue(writable=False), MockQueue(writable=True)]
    for q in queues:
        assert q.pending() == 0 and q.pop() is None and q.pop_many(4) == []
        assert q.enable_notify() is False


# --- DeviceHarness ------------------------------------------------------------------------------


class _Counter(DeviceModel):
    """Counts what arrives on queue 0, answers on queue 1 only when asked by call(2)."""

    name = "counter"
    description = "test device"
    attributes = (Attribute("step", "int", 1, minimum=1, maximum=10),)

    def __init__(self, device: Device) -> None:
        super().__init__(device)
        self.seen = 0

    def open(self, conn: Connection) -> Session:
        return _CounterSession(self, conn)


class _CounterSession(Session):
    model: _Counter

    def shm(self, index: int, queue: Queue) -> None:
        if index not in (0, 1):
            raise Invalid(f"no queue {index}")
        self.queues[index] = queue

    def poll(self, budget: int) -> int:
        tx = self.queues.get(0)
        if tx is None:
            return 0
        got = tx.read_many(budget)
        self.model.seen += len(got) * self.model.device.attrs["step"]
        return len(got)

    def call(self, func: int, data: bytes) -> bytes | Awaitable[bytes]:
        if func == 1:
            return str(self.model.seen).encode()
        if func == 2:

            async def later() -> bytes:
                await asyncio.sleep(0)
                return data[::-1]

            return later()
        raise NotSupported(f"no call {func}")


class _Restless(_Counter):
    name = "restless"

    def open(self, conn: Connection) -> Session:
        return _RestlessSession(self, conn)


class _RestlessSession(_CounterSession):
    def rearm(self) -> bool:
        super().rearm()
        return True  # a bug: always "more work"


class _Clingy(_Counter):
    name = "clingy"

    def open(self, conn: Connection) -> Session:
        return _ClingySession(self, conn)


class _ClingySession(_CounterSession):
    def close(self) -> None:
        for queue in self.queues.values():
            queue.pending()  # a bug: the connector has closed its queues already
        super().close()


def test_harness_opens_a_device_as_the_daemon_does() -> None:
    with DeviceHarness(_Counter, {"step": "3"}) as dev:
        assert dev.model.device.attrs == {"step": 3}
        assert dev.conn.connector == CONNECTOR and dev.conn.session is dev.session
        tx = dev.queue(0, writable=False)
        with pytest.raises(Invalid, match="no queue 5"):
            dev.queue(5, writable=False)  # refused by the session's shm()
        tx.post_many([b"a", b"b"])
        assert dev.poll() == 2
        assert dev.model.seen == 6
        assert tx.notify_enabled  # it went to sleep armed
        dev.set_attribute("step", 10)
        with pytest.raises(Invalid):
            dev.set_attribute("step", 11)
        assert dev.call(1, b"") == b"6"
        with pytest.raises(Invalid, match="acall"):
            dev.call(2, b"abc")
        assert asyncio.run(dev.acall(2, b"abc")) == b"cba"
        assert asyncio.run(dev.acall(1, b"")) == b"6"
    with pytest.raises(Invalid, match="above the maximum"):
        DeviceHarness(_Counter, {"step": 11})


def test_harness_poll_drives_budgets_like_the_poller() -> None:
    with DeviceHarness(_Counter) as dev:
        tx = dev.queue(0, writable=False)
        tx.post_many([b"m"] * 10)
        assert dev.poll(budget=4) == 10
        assert dev.polls == 3  # 4, 4, then 2 and asleep
        assert tx.calls.count("disable_notify") == 3 and tx.calls[-1] == "enable_notify"


def test_harness_poll_refuses_a_device_that_never_sleeps() -> None:
    with DeviceHarness(_Restless) as dev:
        dev.queue(0, writable=False)
        with pytest.raises(Busy, match="not asleep after 5 polls"):
            dev.poll(max_polls=5)


def test_harness_close_closes_queues_before_the_session() -> None:
    with DeviceHarness(_Counter) as dev:
        tx = dev.queue(0, writable=False)
    assert tx.closed and dev.conn.closed and dev.session.queues == {}
    dev = DeviceHarness(_Clingy)
    tx = dev.queue(0, writable=False)
    with pytest.raises(Invalid, match="after close"):
        dev.close()  # the session touched a closed queue: the test sees it
    assert tx.closed and dev.conn.closed
    dev.close()  # idempotent
