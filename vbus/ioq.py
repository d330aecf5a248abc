"""ioq (docs/design.md 3.3): vbus's descriptor ring in shared memory, both ends.

Layout, little-endian, at a 64-byte aligned offset in the north's memory::

    offset   0: u32 magic 0x56424951 ("VBIQ"), u32 ver 1, u32 count, u32 flags,
                shm_signal (16 bytes), pad to 64          written by both sides
    offset  64: u32 valid; pad to 64                      north only
    offset 128: u32 inuse; pad to 64                      south only
    offset 192: desc[count] { u64 cookie; u64 ptr; u64 len; u8 valid; u8 sown; u8 pad[6]; }

``valid`` and ``inuse`` are free-running u32 counters (slot = index & (count-1)).
The north fills descriptors, sets ``valid``/``sown`` and advances ``valid``;
the south takes them in order, writes ``len`` back on queues it fills, clears
``sown`` and advances ``inuse``.  Handing back is in ring order too, since
``inuse`` is one counter; a device may still complete out of order (the
queue contract, ``vbus.queue``): a buffer pushed ahead of one popped before
it is held, its ``len`` already written, and published with the run it
completes.  Indexes are read and written as single
aligned native 32-bit accesses through ``memoryview.cast('I')``; x86 keeps
stores in order, so descriptor stores before an index store are seen first.

The south (``IoqSouth``) trusts nothing: it copies each range of descriptors
out once and validates the copy (ownership, ``ptr``/``len`` against its
``Memory``, index distance), so a north that rewrites shared memory under it
can only hurt itself.  Any violation is a ``Fault`` of that north context.
Validation is done per batch with slice comparisons that run in C
(docs/design.md 3.7); a per-descriptor pass only runs to name the culprit.

The south works over any ``RingMemory``.  The ring itself (header and
descriptors) must lie inside one region of it, writable, since the south
stores into it.  A single region at address 0 (``BufferMemory``, the
userspace connector's memfd; a ``GuestMemory`` that is one such region) is
the fast path: a descriptor's ``ptr`` is an offset into the one buffer, one
bounds check and one slice per batch.  Over memory of several regions
(guest RAM, mapped pages) a batch that lies in one region is translated
once and sliced from that region's buffer; otherwise each descriptor is
translated on its own.  A buffer that leaves every region, runs across a
region boundary, or (on a queue the south fills) lies in a read-only region
is a ``Fault``, as a buffer outside a single region's memory is.
"""

from __future__ import annotations

import struct
from array import array
from bisect import bisect_right
from collections.abc import Callable, Sequence
from itertools import accumulate
from operator import add

from vbus.errors import Fault, Invalid, TooBig
from vbus.memory import BufferMemory, GuestMemory, RingMemory, SharedBuffer
from vbus.queue import Buffer, QueueBase, QueueStats
from vbus.signal import NORTH, SIGNAL_SIZE, SOUTH, ShmSignal, Transport

__all__ = [
    "DESC_SIZE",
    "HEADER_SIZE",
    "MAX_COUNT",
    "SPLIT_FROM",
    "IoqNorth",
    "IoqSouth",
    "format_ring",
    "pool_layout",
    "ring_bytes",
]

MAGIC = 0x56424951
VERSION = 1
MAX_COUNT = 65536
HEADER_SIZE = 192
DESC_SIZE = 32
SIGNAL_OFFSET = 16
_VALID = 64 // 4  # word index of ``valid`` in the header's u32 view
_INUSE = 128 // 4
_LEN = 2  # u64 index of ``len`` inside a descriptor
_PTR = 1
_FLAG_VALID, _FLAG_SOWN = 24, 25
_M32 = 0xFFFFFFFF
_HEAD = struct.Struct("<IIII")
_DESC = struct.Struct("<QQQBB6x")
_ONES = b"\x01" * MAX_COUNT
_COPY_EACH = 2048  # send_many: messages this long on average are copied one by one
SPLIT_FROM = 1024  # read_many: messages this long on average are copied out one by one
_ZEROS = bytes(MAX_COUNT)
DEFAULT_MAX_LEN = 256 * 1024
# Bytes the south copies out of one queue per poll: ~50 us of copying, so that
# a north posting huge or overlapping buffers cannot make one poll hold the
# loop.  A poll is what lies between disable_notify and enable_notify (the
# NAPI poller's quiesce and rearm); outside one nothing is bounded.  At least
# one message is always taken, so progress never stops.
DEFAULT_POLL_BYTES = 1 << 20
_UNBOUNDED = 1 << 62


def ring_bytes(count: int) -> int:
    return HEADER_SIZE + DESC_SIZE * count


def _check_count(count: int) -> None:
    if not 1 <= count <= MAX_COUNT or count & (count - 1):
        raise Invalid(f"ring size {count} is not a power of two in 1..{MAX_COUNT}")


def pool_layout(count: int, buf_size: int) -> tuple[int, int]:
    """(data_offset, total_size) of a ring at 0 followed by ``count`` buffers."""
    _check_count(count)
    data = (ring_bytes(count) + 63) & ~63
    total = data + count * buf_size
    return data, (total + 4095) & ~4095


def format_ring(buf: SharedBuffer, offset: int, count: int) -> None:
    """North: write a fresh, empty ring (both sides' signals enabled)."""
    _check_count(count)
    if offset % 64:
        raise Invalid("ring offset must be 64-byte aligned")
    # Check the fit first: slice assignment past the end of a bytearray grows it
    # (and a negative offset indexes from the end) instead of failing.
    if offset < 0 or offset + ring_bytes(count) > len(buf):
        raise Invalid(f"a ring of {count} descriptors at {offset:#x} does not fit the memory")
    buf[offset : offset + ring_bytes(count)] = bytes(ring_bytes(count))
    _HEAD.pack_into(buf, offset, MAGIC, VERSION, count, 0)
    ShmSignal.format(buf, offset + SIGNAL_OFFSET)


def _stride_store(
    buf: SharedBuffer, base: int, mask: int, first: int, n: int, field: int, fill: bytes
) -> None:
    """Store one byte (``fill``'s) into ``field`` of ``n`` descriptors from ``first``, wrapping."""
    start = first & mask
    end = start + n
    if end <= mask + 1:
        buf[base + start * DESC_SIZE + field : base + end * DESC_SIZE : DESC_SIZE] = fill[:n]
    else:
        head = mask + 1 - start
        buf[base + start * DESC_SIZE + field : base + (mask + 1) * DESC_SIZE : DESC_SIZE] = fill[
            :head
        ]
        buf[base + field : base + (n - head) * DESC_SIZE : DESC_SIZE] = fill[: n - head]


def _common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading items ``a`` and ``b`` share (both non-empty, a[0] == b[0])."""
    lo, hi = 1, min(len(a), len(b))
    while lo < hi:  # a[:lo] == b[:lo] holds; a[:hi + 1] differs (or is all)
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


class IoqSouth(QueueBase):
    """The south end of one ring: implements ``vbus.queue.Queue``, the core and
    a fast override of every batch form.

    ``writable`` says which way data flows: False for a north->south queue (the
    south reads the buffers), True for south->north (the south fills them).
    Each descriptor is one segment of that kind.  The data paths
    (``read_span``, ``read_many``, ``write_many``) refuse to run while popped
    buffers are not all handed back: they hand back in ring order.
    """

    memory: RingMemory

    def __init__(
        self,
        memory: RingMemory,
        offset: int,
        count: int,
        transport: Transport | None,
        *,
        writable: bool,
        max_len: int = DEFAULT_MAX_LEN,
        mitigate: bool = True,
        poll_bytes: int = DEFAULT_POLL_BYTES,
    ) -> None:
        _check_count(count)
        if offset % 64:
            raise Invalid("ring offset must be 64-byte aligned")
        try:
            # One region holds the whole ring, and the south writes into it.
            ring, at = memory.translate(offset, ring_bytes(count), write=True)
        except Fault as exc:
            raise Fault(
                f"ioq: a ring of {count} descriptors at {offset:#x} does not fit the memory "
                f"({exc.message})"
            ) from None
        magic, version, ring_count, _flags = _HEAD.unpack_from(memory.read(offset, 16))
        if magic != MAGIC:
            raise Fault(f"ioq: bad magic {magic:#010x}")
        if version != VERSION:
            raise Fault(f"ioq: unsupported version {version}")
        if ring_count != count:
            raise Fault(f"ioq: ring says {ring_count} descriptors, {count} registered")
        ShmSignal.validate(memory.read(offset + SIGNAL_OFFSET, SIGNAL_SIZE), 0)

        self.memory = memory
        self.writable = writable
        self.stats = QueueStats()
        self.max_len = max_len
        self.mitigate = mitigate
        self.poll_bytes = poll_bytes
        self._credit = _UNBOUNDED  # bytes still to be taken in this poll
        self.signal = ShmSignal(ring, at + SIGNAL_OFFSET, SOUTH, transport)
        self._ring = ring  # the buffer holding the ring; _base is where its descriptors start
        self._base = at + HEADER_SIZE
        flat = memory.buf if isinstance(memory, BufferMemory) else None
        if isinstance(memory, GuestMemory):
            flat = memory.flat
        # Data: ``_buf``, with ``ptr`` an offset into it, when the memory is one
        # region at 0 (``_guest`` None).  Otherwise ``_size`` is -1, so that
        # every flat bound check fails and the region-aware path takes over.
        self._guest: RingMemory | None = None if flat is not None else memory
        self._buf = ring if flat is None else flat
        self._size = -1 if flat is None else memory.size
        self._flat = (self._buf, 0)
        self._count = count
        self._mask = count - 1
        self._idx = memory.cast(offset, HEADER_SIZE, "I")
        self._dq = memory.cast(offset + HEADER_SIZE, DESC_SIZE * count, "Q")
        # After a restart the south resumes from inuse (docs/design.md 7).
        self._inuse = self._idx[_INUSE]
        self._cursor = self._inuse
        # Pushed out of order, waiting for the buffers popped before them.
        self._held: set[int] = set()
        self.pending()

    # --- reading the north's progress ---------------------------------------
    def pending(self) -> int:
        valid = self._idx[_VALID]
        n = (valid - self._cursor) & _M32
        if n > self._count:
            raise Fault(
                f"ioq: north index {valid} is {n} descriptors ahead of the south's "
                f"{self._cursor} in a ring of {self._count}"
            )
        return n

    def _snapshot(self, first: int, n: int) -> bytes:
        """Copy descriptors [first, first+n) out of shared memory, once."""
        start = first & self._mask
        end = start + n
        base = self._base
        if end <= self._count:
            return self._ring[base + start * DESC_SIZE : base + end * DESC_SIZE]  # type: ignore[return-value]
        return bytes(self._ring[base + start * DESC_SIZE : base + self._count * DESC_SIZE]) + bytes(
            self._ring[base : base + (end - self._count) * DESC_SIZE]
        )

    def _validate(
        self, raw: bytes, first: int, n: int
    ) -> tuple[list[int], list[int], tuple[SharedBuffer, int] | None]:
        """Ownership and bounds of a snapshot, batch first; returns (ptrs, lens,
        where): ``where`` is (buffer, shift) when every range lies in one
        buffer at ``ptr + shift``, None when they lie in different regions."""
        words = memoryview(raw).cast("Q")
        ptrs = words[_PTR::4].tolist()
        lens = words[_LEN::4].tolist()
        words.release()
        if self._guest is not None:
            return ptrs, lens, self._check_regions(raw, first, n, ptrs, lens)
        if (
            raw[_FLAG_VALID::DESC_SIZE] != _ONES[:n]
            or raw[_FLAG_SOWN::DESC_SIZE] != _ONES[:n]
            or max(lens) > self.max_len
            or max(map(add, ptrs, lens)) > self._size
        ):
            self._find_culprit(raw, first, n)
        return ptrs, lens, self._flat

    def _check_regions(
        self, raw: bytes, first: int, n: int, ptrs: list[int], lens: list[int]
    ) -> tuple[SharedBuffer, int] | None:
        """``_validate`` over memory of several regions: flags and lengths as
        for one region, then one translation when the whole batch lies in one
        region (its buffer and shift are returned), else one per descriptor
        (None).  Writable regions on a queue the south fills."""
        if (
            raw[_FLAG_VALID::DESC_SIZE] != _ONES[:n]
            or raw[_FLAG_SOWN::DESC_SIZE] != _ONES[:n]
            or max(lens) > self.max_len
        ):
            self._find_culprit(raw, first, n)
        where = self._locate(ptrs, lens)
        if where is None and not all(map(self._fits, ptrs, lens)):
            self._find_culprit(raw, first, n)
        return where

    def _locate(self, ptrs: list[int], lens: list[int]) -> tuple[SharedBuffer, int] | None:
        """(buffer, shift) when every range of the batch lies in one region:
        range i is then ``buffer[ptrs[i] + shift :][: lens[i]]``."""
        assert self._guest is not None
        lo = min(ptrs)
        try:
            buf, at = self._guest.translate(lo, max(map(add, ptrs, lens)) - lo, write=self.writable)
        except Fault:
            return None
        return buf, at - lo

    def _fits(self, ptr: int, length: int) -> bool:
        assert self._guest is not None
        try:
            self._guest.translate(ptr, length, write=self.writable)
        except Fault:
            return False
        return True

    def _find_culprit(self, raw: bytes, first: int, n: int) -> None:
        for i in range(n):
            _cookie, ptr, length, valid, sown = _DESC.unpack_from(raw, i * DESC_SIZE)
            where = f"ioq: descriptor {(first + i) & _M32}"
            if valid != 1:
                raise Fault(f"{where} is not valid ({valid})")
            if sown != 1:
                raise Fault(f"{where} is not owned by the south ({sown})")
            if length > self.max_len:
                raise Fault(f"{where}: length {length} exceeds the queue's {self.max_len}")
            if self._guest is not None:
                try:
                    self._guest.translate(ptr, length, write=self.writable)
                except Fault as exc:
                    raise Fault(f"{where}: {exc.message}") from None
            elif ptr + length > self._size:
                raise Fault(f"{where}: [{ptr:#x}, +{length:#x}) lies outside the client's memory")
        raise AssertionError("batch validation failed but no descriptor is bad")

    def _release(self, first: int, n: int) -> None:
        """Hand descriptors [first, first+n) back and publish ``inuse`` once."""
        _stride_store(self._ring, self._base, self._mask, first, n, _FLAG_SOWN, _ZEROS)
        self._inuse = (first + n) & _M32
        # Descriptor stores above are ordered before this index store (x86 TSO).
        self._idx[_INUSE] = self._inuse
        self.stats.messages += n

    # --- batch fast paths ----------------------------------------------------
    def read_span(self, budget: int, gather: bool = False) -> tuple[bytes, list[int]]:
        """North->south fast path: up to ``budget`` messages as one bytes object
        (their payloads back to back) and their lengths; all handed back.

        When the north packed them contiguously (the client library does),
        that is one bounds check and one copy for the whole batch.  Where
        the north's data area wraps, the span stops (when what comes before
        is at least half the batch; the rest is the next span).  ``gather``
        takes all ``budget`` messages, joining pieces where they lie apart.
        """
        data, lens = self._read(budget, gather, split=False)
        return data, lens  # type: ignore[return-value]

    def _read(
        self, budget: int, gather: bool, split: bool
    ) -> tuple[bytes | list[bytes], list[int]]:
        """``read_span``; with ``split``, messages of ``SPLIT_FROM`` bytes or
        more on average come back as a list, each copied out of the north's
        memory once (not into one span first and out of it again)."""
        if self.writable:
            raise Invalid("read_span on a queue the south fills")
        if self._cursor != self._inuse:
            raise Invalid("read_span with buffers popped and not pushed back")
        n = min(self.pending(), budget)
        if n <= 0:
            return b"", []
        first = self._cursor
        raw = self._snapshot(first, n)
        words = memoryview(raw).cast("Q")
        ptrs = words[_PTR::4].tolist()
        lens = words[_LEN::4].tolist()
        words.release()
        length = lens[0]
        uniform = length and lens.count(length) == n
        if raw[_FLAG_VALID::DESC_SIZE] != _ONES[:n] or raw[_FLAG_SOWN::DESC_SIZE] != _ONES[:n]:
            self._find_culprit(raw, first, n)
        fit = self._fit(lens, length if uniform else 0)
        if fit < n:
            if fit == 0:
                return b"", []
            n = fit
            raw = raw[: n * DESC_SIZE]
            del ptrs[n:], lens[n:]
            uniform = length and lens.count(length) == n
        buf = self._buf
        start = ptrs[0]
        if uniform:
            # The usual stream: equal lengths, so contiguity is a comparison
            # against a range (all in C) and one length check covers them all.
            if length > self.max_len:
                self._find_culprit(raw, first, n)
            expected = list(range(start, start + length * n, length))
        else:
            if max(lens) > self.max_len:
                self._find_culprit(raw, first, n)
            expected = list(accumulate(lens[:-1], initial=start))
        if ptrs != expected and n > 1 and not gather:
            # Where the north's data area wraps the batch stops being one
            # span: take the contiguous part when it is most of the batch (the
            # rest is the next call's span), else gather the pieces below.
            k = _common_prefix(ptrs, expected)
            if 2 * k >= n:
                n = k
                raw = raw[: n * DESC_SIZE]
                del ptrs[n:], lens[n:], expected[n:]
        end = expected[-1] + lens[-1]
        contiguous = ptrs == expected
        data: bytes | list[bytes]
        if split and self._guest is None and end - start >= SPLIT_FROM * n:
            if max(map(add, ptrs, lens)) > self._size:
                self._find_culprit(raw, first, n)
            data = [buf[p : p + ln] for p, ln in zip(ptrs, lens, strict=True)]  # type: ignore[misc]
            self._cursor = (first + n) & _M32
            self._release(first, n)
            total = sum(lens)
            self.stats.bytes += total
            self._credit -= total
            return data, lens
        if contiguous and end <= self._size:
            data = buf[start:end]  # type: ignore[assignment]
        elif self._guest is None:
            if max(map(add, ptrs, lens)) > self._size:
                self._find_culprit(raw, first, n)
            data = b"".join([buf[p : p + ln] for p, ln in zip(ptrs, lens, strict=True)])
        else:
            data = self._read_regions(raw, first, n, ptrs, lens, contiguous)
        self._cursor = (first + n) & _M32
        self._release(first, n)
        self.stats.bytes += len(data)
        self._credit -= len(data)
        return data, lens

    def _read_regions(
        self, raw: bytes, first: int, n: int, ptrs: list[int], lens: list[int], contiguous: bool
    ) -> bytes:
        """read_span's copy over memory of several regions: one slice when the
        span is contiguous and in one region, pieces of one region's buffer when
        the batch lies in one region, else each descriptor translated alone."""
        guest = self._guest
        assert guest is not None
        if contiguous:
            start = ptrs[0]
            length = ptrs[-1] + lens[-1] - start
            try:
                region, at = guest.translate(start, length)
            except Fault:
                pass
            else:
                return region[at : at + length]  # type: ignore[return-value]
        located = self._locate(ptrs, lens)
        if located is not None:
            region, shift = located
            return b"".join(
                [region[p + shift : p + shift + ln] for p, ln in zip(ptrs, lens, strict=True)]
            )
        if not all(map(self._fits, ptrs, lens)):
            self._find_culprit(raw, first, n)
        pieces = []
        for p, ln in zip(ptrs, lens, strict=True):
            region, at = guest.translate(p, ln)
            pieces.append(region[at : at + ln])
        return b"".join(pieces)

    def _fit(self, lens: list[int], uniform: int) -> int:
        """How many of ``lens`` this poll's byte credit takes (0 once it is spent,
        else at least 1)."""
        credit = self._credit
        if credit <= 0:
            return 0
        if uniform:
            return min(len(lens), max(1, credit // uniform))
        if sum(lens) <= credit:
            return len(lens)
        return max(1, bisect_right(list(accumulate(lens)), credit))

    def read_many(self, budget: int) -> list[bytes]:
        """North->south: up to ``budget`` payloads, each copied out once."""
        data, lens = self._read(budget, True, split=True)
        if not lens:
            return []
        if isinstance(data, list):
            return data
        first = lens[0]
        if first and lens.count(first) == len(lens):
            return [data[i : i + first] for i in range(0, len(data), first)]
        ends = list(accumulate(lens))
        return [data[e - ln : e] for e, ln in zip(ends, lens, strict=True)]

    def write_many(self, payloads: Sequence[bytes]) -> int:
        if not self.writable:
            raise Invalid("write_many on a queue the north fills")
        if self._cursor != self._inuse:
            raise Invalid("write_many with buffers popped and not pushed back")
        want = len(payloads)
        n = min(self.pending(), want)
        if n < want:
            self.stats.stalls += 1
        if n == 0:
            return 0
        first = self._cursor
        ptrs, caps, where = self._validate(self._snapshot(first, n), first, n)
        if where is None:  # the batch spans regions: one translation each
            return self._write_each(first, n, ptrs, caps, payloads)
        buf, shift = where
        if shift:
            ptrs = [*map(shift.__add__, ptrs)]
        dq = self._dq
        mask = self._mask
        total = 0
        for i in range(n):
            data = payloads[i]
            length = len(data)
            if length > caps[i]:
                length = caps[i]
                data = data[:length]
            ptr = ptrs[i]
            buf[ptr : ptr + length] = data
            dq[((first + i) & mask) * 4 + _LEN] = length
            total += length
        self._cursor = (first + n) & _M32
        self._release(first, n)
        self.stats.bytes += total
        return n

    def _write_each(
        self, first: int, n: int, ptrs: list[int], caps: list[int], payloads: Sequence[bytes]
    ) -> int:
        """write_many over a batch whose buffers lie in different regions."""
        guest = self._guest
        assert guest is not None
        total = 0
        for i in range(n):
            data = payloads[i][: caps[i]]
            guest.write(ptrs[i], data)  # validated above: inside one writable region
            self._dq[((first + i) & self._mask) * 4 + _LEN] = len(data)
            total += len(data)
        self._cursor = (first + n) & _M32
        self._release(first, n)
        self.stats.bytes += total
        return n

    # --- general path: one Buffer at a time -----------------------------------
    def pop_many(self, budget: int) -> list[Buffer]:
        n = min(self.pending(), budget)
        if n <= 0:
            return []
        first = self._cursor
        raw = self._snapshot(first, n)
        ptrs, lens, _where = self._validate(raw, first, n)
        if not self.writable:  # the device will read these: they count against the credit
            fit = self._fit(lens, 0)
            if fit < n:
                if fit == 0:
                    return []
                n = fit
                raw = raw[: n * DESC_SIZE]
                del ptrs[n:], lens[n:]
            self._credit -= sum(lens)
        cookies = memoryview(raw).cast("Q")[0::4].tolist()
        writable = self.writable
        self._cursor = (first + n) & _M32
        return [
            Buffer((first + i) & _M32, cookies[i], ((ptrs[i], lens[i], writable),))
            for i in range(n)
        ]

    def pop(self) -> Buffer | None:
        bufs = self.pop_many(1)
        return bufs[0] if bufs else None

    def push_many(self, items: Sequence[tuple[Buffer, int]]) -> None:
        if not items:
            return
        if self._held:
            self._push_any_order(items)
            return
        first = self._inuse
        cursor = self._cursor
        writable = self.writable
        total = 0
        for i, (buf, written) in enumerate(items):
            if buf.index != (first + i) & _M32 or buf.index == cursor:
                self._push_any_order(items)  # out of order, or not popped
                return
            if written or writable:
                if not writable or not 0 <= written <= buf.length:
                    raise Invalid(f"cannot report {written} bytes written into buffer {buf.index}")
                # Also when 0: on a queue the south fills, len tells the north how
                # much is there, and it still holds the buffer's capacity.
                self._dq[(buf.index & self._mask) * 4 + _LEN] = written
                total += written
        self.stats.bytes += total
        self._release(first, len(items))

    def _push_any_order(self, items: Sequence[tuple[Buffer, int]]) -> None:
        """push_many in any order: every item checked first, then each one's
        ``len`` written and the run from ``inuse`` that is now complete
        handed back; the rest is held until the buffers before it come."""
        inuse = self._inuse
        outstanding = (self._cursor - inuse) & _M32
        held = self._held
        seen: set[int] = set()
        writable = self.writable
        for buf, written in items:
            index = buf.index
            if (index - inuse) & _M32 >= outstanding or index in held or index in seen:
                raise Invalid(f"buffer {index} was not popped, or was handed back already")
            if (written and not writable) or not 0 <= written <= buf.length:
                raise Invalid(f"cannot report {written} bytes written into buffer {index}")
            seen.add(index)
        for buf, written in items:
            if writable:
                self._dq[(buf.index & self._mask) * 4 + _LEN] = written
                self.stats.bytes += written
        held |= seen
        n = 0
        while (inuse + n) & _M32 in held:
            held.discard((inuse + n) & _M32)
            n += 1
        if n:
            self._release(inuse, n)

    def push(self, buf: Buffer, written: int = 0) -> None:
        self.push_many(((buf, written),))

    # --- notification --------------------------------------------------------
    def kick_north(self) -> bool:
        if self.signal.notify(force=not self.mitigate):
            self.stats.signals_sent += 1
            return True
        self.stats.signals_suppressed += 1
        return False

    def disable_notify(self) -> None:
        """Start of a poll: no wake-ups while it runs, and a fresh byte credit."""
        self._credit = self.poll_bytes
        if self.mitigate:
            self.signal.disarm()
        else:
            self.signal.ack()  # stay woken by every kick: no mitigation

    def enable_notify(self) -> bool:
        self._credit = _UNBOUNDED  # the poll is over
        self.signal.arm()
        return self.pending() > 0

    def close(self) -> None:
        self._idx.release()
        self._dq.release()


class IoqNorth:
    """The north end of one ring with a fixed pool: descriptor slot j always
    points at buffer j (``data_offset + j * buf_size``), the layout the south's
    batch checks are fastest on.  Used by the client library.
    """

    def __init__(
        self,
        buf: SharedBuffer,
        offset: int,
        count: int,
        data_offset: int,
        buf_size: int,
        transport: Transport | None,
    ) -> None:
        format_ring(buf, offset, count)
        if data_offset + count * buf_size > len(buf):
            raise Invalid("buffer pool does not fit the memory")
        self.count = count
        self.buf_size = buf_size
        self.signal = ShmSignal(buf, offset + SIGNAL_OFFSET, NORTH, transport)
        self._buf = buf
        self._mask = count - 1
        self._base = offset + HEADER_SIZE
        self._data = data_offset
        self._idx = memoryview(buf)[offset : offset + HEADER_SIZE].cast("I")
        self._dq = memoryview(buf)[self._base : self._base + DESC_SIZE * count].cast("Q")
        for slot in range(count):
            self._dq[slot * 4 + _PTR] = data_offset + slot * buf_size
        self.valid = 0
        self.reaped = 0
        # Transmit packs messages back to back in the data area, used as a byte
        # ring: one join and one copy per batch, and the south can take the
        # whole span at once.  The oldest descriptor in flight marks its tail.
        self._data_size = min(len(buf) - data_offset, (count + 1) * buf_size)
        self._head = 0
        self._view: memoryview | None = None  # the whole buffer, for send_from / recv_each

    def completed(self) -> int:
        """Descriptors the south has handed back and we have not reaped."""
        inuse = self._idx[_INUSE]
        n = (inuse - self.reaped) & _M32
        if n > ((self.valid - self.reaped) & _M32):
            raise Fault(f"ioq: south index {inuse} is beyond what was posted")
        return n

    def space(self) -> int:
        """Slots free for posting once completions are reaped."""
        return self.count - ((self.valid - self._idx[_INUSE]) & _M32)

    def outstanding(self) -> int:
        return (self.valid - self.reaped) & _M32

    def _publish(self, n: int) -> None:
        _stride_store(self._buf, self._base, self._mask, self.valid, n, _FLAG_VALID, _ONES)
        _stride_store(self._buf, self._base, self._mask, self.valid, n, _FLAG_SOWN, _ONES)
        self.valid = (self.valid + n) & _M32
        self._idx[_VALID] = self.valid  # after the descriptor stores (x86 TSO)

    def send_many(self, payloads: Sequence[bytes]) -> int:
        """Post filled buffers (north->south queue); returns how many fitted
        (fewer than asked when the ring or the data area is full)."""
        inuse = self._idx[_INUSE]
        in_flight = (self.valid - inuse) & _M32
        n = min(len(payloads), self.count - in_flight)
        if n <= 0:
            return 0
        self.reaped = inuse  # transmit completions only free space
        batch = payloads if n == len(payloads) else payloads[:n]
        lens = list(map(len, batch))
        first = lens[0]
        uniform = lens.count(first) == n
        longest = first if uniform else max(lens)
        if longest > self.buf_size:
            raise TooBig(f"message of {longest} bytes exceeds the {self.buf_size}-byte buffers")
        size = self._data_size
        used = self._data_used(inuse, in_flight)
        posted = 0
        while posted < n:
            pos = self._head % size
            room = min(size - pos, size - used)
            chunk = lens[posted:] if posted else lens
            total = first * len(chunk) if uniform else sum(chunk)
            if total > room:
                ends = list(accumulate(chunk))
                fit = bisect_right(ends, room)
                if fit == 0:
                    if size - used - (size - pos) < chunk[0]:
                        break  # the south has not freed enough yet
                    used += size - pos  # skip the end of the area: wrap to 0
                    self._head += size - pos
                    continue
                chunk = chunk[:fit]
                total = ends[fit - 1]
            count = len(chunk)
            addr = self._data + pos
            if total >= _COPY_EACH * count:
                # Large messages: each is copied straight into place (a join
                # would copy every byte twice).
                buf, at = self._buf, addr
                for payload, length in zip(batch[posted : posted + count], chunk, strict=True):
                    buf[at : at + length] = payload
                    at += length
            else:
                self._buf[addr : addr + total] = b"".join(batch[posted : posted + count])
            if uniform and first:  # equal lengths: the pointers are a range (built in C)
                ptrs = array("Q", range(addr, addr + total, first))
            else:
                ptrs = array("Q", accumulate(chunk[:-1], initial=addr))
            self._store_descriptors(posted, ptrs, array("Q", chunk))
            self._head += total
            used += total
            posted += count
        if posted:
            self._publish(posted)
        return posted

    def send_slots(self, payloads: Sequence[bytes]) -> int:
        """``send_many`` with each message in its own slot's buffer (slot j at
        ``data_offset + j * buf_size``), never packed across a buffer's end:
        for pools whose buffers are separate grants (a buffer must not cross a
        page).  Returns how many fitted."""
        inuse = self._idx[_INUSE]
        n = min(len(payloads), self.count - ((self.valid - inuse) & _M32))
        if n <= 0:
            return 0
        self.reaped = inuse
        buf, dq, mask, size, data = self._buf, self._dq, self._mask, self.buf_size, self._data
        for i in range(n):
            payload = payloads[i]
            length = len(payload)
            if length > size:
                raise TooBig(f"message of {length} bytes exceeds the {size}-byte buffers")
            slot = (self.valid + i) & mask
            addr = data + slot * size
            buf[addr : addr + length] = payload
            dq[slot * 4 + _PTR] = addr
            dq[slot * 4 + _LEN] = length
        self._publish(n)
        return n

    def _data_used(self, inuse: int, in_flight: int) -> int:
        """Bytes of the data area held by descriptors in flight: from where the
        oldest one starts (its ``ptr``, which we wrote) to where the next goes."""
        if not in_flight:
            return 0
        size = self._data_size
        tail = self._dq[(inuse & self._mask) * 4 + _PTR] - self._data
        used = (self._head % size - tail) % size
        if used == 0:
            # Full, or every message in flight is empty: their lengths decide.
            first = inuse & self._mask
            end = first + in_flight
            lens = self._dq[first * 4 + _LEN : min(end, self.count) * 4 : 4].tolist()
            if end > self.count:
                lens += self._dq[_LEN : (end - self.count) * 4 : 4].tolist()
            return size if sum(lens) else 0
        return used

    def _store_descriptors(self, skip: int, ptrs: array[int], lens: array[int]) -> None:
        """ptr and len of the descriptors from ``valid + skip`` on, strided stores."""
        dq = self._dq
        n = len(lens)
        first = (self.valid + skip) & self._mask
        head = min(n, self.count - first)
        dq[first * 4 + _PTR : (first + head) * 4 : 4] = ptrs[:head]
        dq[first * 4 + _LEN : (first + head) * 4 : 4] = lens[:head]
        if head < n:
            dq[_PTR : (n - head) * 4 : 4] = ptrs[head:]
            dq[_LEN : (n - head) * 4 : 4] = lens[head:]

    def post_empty(self, n: int) -> None:
        """Post ``n`` empty buffers for the south to fill (south->north queue)."""
        n = min(n, self.count - self.outstanding())
        dq = self._dq
        mask = self._mask
        size = self.buf_size
        data = self._data
        for i in range(n):
            slot = (self.valid + i) & mask
            dq[slot * 4 + _PTR] = data + slot * size
            dq[slot * 4 + _LEN] = size
        if n:
            self._publish(n)

    def recv_many(self, limit: int) -> list[bytes]:
        """Reap filled buffers (south->north queue) and post them again."""
        n = min(self.completed(), limit)
        if n == 0:
            return []
        buf = self._buf
        dq = self._dq
        mask = self._mask
        size = self.buf_size
        data = self._data
        out: list[bytes] = []
        first = self.reaped
        for i in range(n):
            slot = (first + i) & mask
            length = dq[slot * 4 + _LEN]
            if length > size:
                raise Fault(f"ioq: south returned {length} bytes in a {size}-byte buffer")
            addr = data + slot * size
            out.append(buf[addr : addr + length])  # type: ignore[arg-type]
        self.reaped = (first + n) & _M32
        self.post_empty(n)
        return out

    # --- without copies: the caller reads or writes the shared buffers itself ---
    def _whole(self) -> memoryview:
        view = self._view
        if view is None:
            view = self._view = memoryview(self._buf)
        return view

    def recv_each(self, consume: Callable[[memoryview], object], limit: int) -> int:
        """``recv_many`` without the copies: ``consume`` gets each filled buffer
        as a view of the shared memory, valid only during the call (it is
        posted again right after).  Returns how many were consumed."""
        n = min(self.completed(), limit)
        if n == 0:
            return 0
        view = self._whole()
        dq = self._dq
        mask = self._mask
        size = self.buf_size
        data = self._data
        first = self.reaped
        for i in range(n):
            slot = (first + i) & mask
            length = dq[slot * 4 + _LEN]
            if length > size:
                raise Fault(f"ioq: south returned {length} bytes in a {size}-byte buffer")
            addr = data + slot * size
            consume(view[addr : addr + length])
        self.reaped = (first + n) & _M32
        self.post_empty(n)
        return n

    def room_for(self, max_len: int) -> bool:
        """A free slot and ``max_len`` bytes of the data area (``send_from`` can post one)."""
        inuse = self._idx[_INUSE]
        in_flight = (self.valid - inuse) & _M32
        if in_flight >= self.count:
            return False
        size = self._data_size
        used = self._data_used(inuse, in_flight)
        pos = self._head % size
        if size - pos < max_len:  # it would wrap: the tail of the area is lost to it
            return size - used - (size - pos) >= max_len
        return size - used >= max_len

    def send_from(
        self, readinto: Callable[[memoryview], int | None], max_len: int, limit: int
    ) -> int:
        """``send_many`` without the copies: post up to ``limit`` messages that
        ``readinto`` writes straight into the data area.  It gets a view of
        ``max_len`` bytes and returns the message's length, a negative number
        to drop what it read (the space is used again), or None to stop (no
        more to read).  Stops early when the ring or the data area is full."""
        if max_len > self.buf_size:
            raise TooBig(f"messages of {max_len} bytes exceed the {self.buf_size}-byte buffers")
        inuse = self._idx[_INUSE]
        in_flight = (self.valid - inuse) & _M32
        slots = min(limit, self.count - in_flight)
        if slots <= 0:
            return 0
        self.reaped = inuse  # transmit completions only free space
        size = self._data_size
        used = self._data_used(inuse, in_flight)
        view = self._whole()
        base = self._data
        ptrs: list[int] = []
        lens: list[int] = []
        while len(ptrs) < slots:
            pos = self._head % size
            if size - pos < max_len:
                if size - used - (size - pos) < max_len:
                    break
                used += size - pos  # skip the end of the area: wrap to 0
                self._head += size - pos
                continue
            if size - used < max_len:
                break
            addr = base + pos
            length = readinto(view[addr : addr + max_len])
            if length is None:
                break
            if length < 0:
                continue
            ptrs.append(addr)
            lens.append(length)
            self._head += length
            used += length
        if ptrs:
            self._store_descriptors(0, array("Q", ptrs), array("Q", lens))
            self._publish(len(ptrs))
        return len(ptrs)

    def close(self) -> None:
        self._idx.release()
        self._dq.release()
        if self._view is not None:
            self._view.release()
            self._view = None
