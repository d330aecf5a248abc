"""The kvm ABI (vbus/kvmabi.py, docs/design.md 4.5): registration frames, the
memory-table checks, call and event slots, ENUMERATE entries, and both ends
of the bridge page.  Each rejection is named; the fuzz target (tests/test_fuzz.py)
looks for what nobody thought of."""

from __future__ import annotations

import struct

import pytest

from vbus import kvmabi
from vbus.errors import Busy, Invalid, NotSupported, ProtocolError, TooBig
from vbus.kvmabi import (
    CallSlot,
    DeviceEntry,
    Error,
    Event,
    EventKind,
    Faulted,
    FaultReason,
    GuestBridge,
    GuestFault,
    HostBridge,
    Op,
    Region,
    Register,
    Registered,
)

MiB = 1 << 20


def register(**fields: object) -> Register:
    base: dict[str, object] = {
        "name": "guest0",
        "regions": (Region(0, 2 * MiB, 0), Region(4 * MiB, MiB, 2 * MiB, readonly=True)),
        "ndoorbells": 4,
        "nirqs": 3,
        "bridge_gpa": 0x1000,
    }
    base.update(fields)
    return Register(**base)  # type: ignore[arg-type]


# --- registration frames -------------------------------------------------------------


def test_register_round_trips_with_its_descriptor_count() -> None:
    msg = register()
    frame = kvmabi.encode(msg, 7)
    assert len(frame) % 8 == 0  # the region table is 8-byte aligned
    assert kvmabi.decode_request(frame, msg.nfds) == (7, msg)
    assert kvmabi.peek_seq(frame) == 7
    assert msg.nfds == 2 + 4 + 3
    regions, doorbells, irqs = kvmabi.split_fds(msg, list(range(9)))
    assert (regions, doorbells, irqs) == ([0, 1], [2, 3, 4, 5], [6, 7, 8])
    with pytest.raises(ProtocolError, match="announces 9 descriptors, 8 came"):
        kvmabi.split_fds(msg, list(range(8)))


def test_the_layout_is_the_documented_one() -> None:
    frame = kvmabi.encode(register(name="vm", regions=(Region(0, 4096),)), 3)
    assert struct.unpack_from("<HHI", frame) == (1, 0, 3)
    assert struct.unpack_from("<IIIIQH", frame, 8) == (1, 1, 4, 3, 0x1000, 2)
    assert frame[34:36] == b"vm" and frame[36:40] == bytes(4)
    assert struct.unpack_from("<QQQII", frame, 40) == (0, 4096, 0, 0, 0)
    assert len(frame) == 72


@pytest.mark.parametrize(
    ("fields", "nfds", "match"),
    [
        ({"ndoorbells": 0}, 2 + 3, "ndoorbells 0"),
        ({"nirqs": 65}, 2 + 4 + 65, "nirqs 65"),
        ({"regions": ()}, 7, "nregions 0"),
        ({"ndoorbells": 40, "nirqs": 40}, 82, "more than the 64"),
        ({}, 8, "9 descriptors"),
    ],
)
def test_register_counts_are_bounded_and_must_match(
    fields: dict[str, object], nfds: int, match: str
) -> None:
    msg = register(**fields)
    if fields:
        with pytest.raises(Invalid, match=match):
            kvmabi.encode(msg)
        frame = bytearray(kvmabi.encode(register()))
        struct.pack_into(
            "<III",
            frame,
            12,
            len(msg.regions),
            msg.ndoorbells,
            msg.nirqs,
        )
        if not msg.regions:  # cut the table to what the header says
            del frame[-64:]
        data = bytes(frame)
    else:
        data = kvmabi.encode(msg)
    with pytest.raises(ProtocolError, match=match):
        kvmabi.decode(data, nfds)


@pytest.mark.parametrize(
    ("patch", "match"),
    [
        (lambda f: struct.pack_into("<H", f, 2, 1), "reserved field in the frame header"),
        (lambda f: struct.pack_into("<H", f, 0, 9), "unknown frame type 9"),
        (lambda f: f.__setitem__(slice(38, 39), b"\x01"), "padding"),
        (lambda f: struct.pack_into("<I", f, 40 + 24, 2), "undefined flags"),
        (lambda f: struct.pack_into("<I", f, 40 + 28, 1), "reserved word"),
        (lambda f: f.extend(b"\0" * 8), "needs"),
        (lambda f: f.__delitem__(slice(-1, None)), "needs"),
        (lambda f: f.__setitem__(slice(34, 40), b"g\xff0\0\0\0"), "not UTF-8"),
        (lambda f: f.__setitem__(slice(34, 40), b"g 0\0\0\0"), "without spaces"),
        (lambda f: struct.pack_into("<H", f, 32, 0), "0 bytes"),
        (lambda f: struct.pack_into("<H", f, 32, 65), "too long"),
    ],
)
def test_register_format_errors_are_protocol_errors(patch: object, match: str) -> None:
    frame = bytearray(kvmabi.encode(register(name="g0", regions=(Region(0, 1 * MiB),)), 1))
    patch(frame)  # type: ignore[operator]
    with pytest.raises(ProtocolError, match=match):
        kvmabi.decode(bytes(frame), 1 + 4 + 3)


def test_another_version_is_not_supported_and_frames_are_bounded() -> None:
    frame = bytearray(kvmabi.encode(register()))
    struct.pack_into("<I", frame, 8, 2)
    with pytest.raises(NotSupported, match="version 2"):
        kvmabi.decode(bytes(frame), 9)
    with pytest.raises(TooBig):
        kvmabi.decode(bytes(4097))
    with pytest.raises(ProtocolError, match="shorter than its header"):
        kvmabi.decode(b"\x01\x00")
    assert kvmabi.peek_seq(b"\x01") == 0


def test_replies_round_trip_and_carry_no_descriptors() -> None:
    for msg in (
        Registered(5, "lab"),
        Error(13, "not a member of any bus"),
        Faulted(FaultReason.DOORBELL_STORM, 2, "doorbell storm"),
    ):
        frame = kvmabi.encode(msg, 9)
        assert kvmabi.decode_reply(frame) == (9, msg)
        with pytest.raises(ProtocolError, match="carries no descriptors"):
            kvmabi.decode(frame, 1)
        with pytest.raises(ProtocolError, match="not something a VMM sends"):
            kvmabi.decode_request(frame, 0)
    with pytest.raises(ProtocolError, match="not something vbusd sends"):
        kvmabi.decode_reply(kvmabi.encode(register()), 9)


def test_reply_fields_are_checked_both_ways() -> None:
    with pytest.raises(Invalid, match="errno"):
        kvmabi.encode(Error(0, "x"))
    with pytest.raises(Invalid, match="FaultReason"):
        kvmabi.encode(Faulted(99, 0, "x"))
    with pytest.raises(Invalid, match="1024-byte"):
        kvmabi.encode(Error(5, "x" * 1025))
    assert len(kvmabi.clip("é" * 600).encode()) <= 1024
    with pytest.raises(Invalid, match="REGISTERED bus"):
        kvmabi.encode(Registered(1, ""))
    frame = bytearray(kvmabi.encode(Error(5, "x")))
    struct.pack_into("<i", frame, 8, -5)
    with pytest.raises(ProtocolError, match="errno -5"):
        kvmabi.decode(bytes(frame))
    frame = bytearray(kvmabi.encode(Faulted(1, 0, "x")))
    struct.pack_into("<I", frame, 8, 42)
    with pytest.raises(ProtocolError, match="reason 42"):
        kvmabi.decode(bytes(frame))


# --- the memory table --------------------------------------------------------------


def test_a_good_table_passes_check_layout() -> None:
    kvmabi.check_layout(register())


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"regions": (Region(0x800, 4096),), "bridge_gpa": 0x800}, "aligned"),
        ({"regions": (Region(0, 4096, 0x10),), "bridge_gpa": 0}, "aligned"),
        ({"regions": (Region(0, 0),), "bridge_gpa": 0}, "empty"),
        ({"regions": (Region(0, 2 * MiB), Region(MiB, 2 * MiB, 2 * MiB))}, "overlap"),
        ({"regions": (Region((1 << 64) - 4096, 8192),)}, "2\\*\\*64"),
        ({"bridge_gpa": 0x1800}, "not 4096-byte aligned"),
        ({"bridge_gpa": 3 * MiB}, "outside every region"),
        ({"bridge_gpa": 4 * MiB}, "read-only"),
        ({"bridge_gpa": 2 * MiB - 4096 + 4096}, "outside every region"),
    ],
)
def test_check_layout_refuses_bad_tables(fields: dict[str, object], match: str) -> None:
    msg = register(**fields)
    frame = kvmabi.encode(msg)  # the format can carry it
    assert kvmabi.decode(frame, msg.nfds)[1] == msg
    with pytest.raises(Invalid, match=match):
        kvmabi.check_layout(msg)


# --- call and event slots, ENUMERATE ---------------------------------------------------


def test_call_slots_round_trip_at_the_documented_offsets() -> None:
    slot = CallSlot(
        Op.SHM, -22, 3, 1, 0x10000, 256, kvmabi.SHM_WRITABLE, 0x2000, 512, 9, 2, 1, 0xABCD
    )
    raw = kvmabi.encode_call(slot)
    assert len(raw) == 64
    assert struct.unpack_from("<I", raw, 0x00)[0] == 4
    assert struct.unpack_from("<i", raw, 0x04)[0] == -22
    assert struct.unpack_from("<Q", raw, 0x10)[0] == 0x10000
    assert struct.unpack_from("<Q", raw, 0x20)[0] == 0x2000
    assert struct.unpack_from("<HHI", raw, 0x30) == (2, 1, 0xABCD)
    assert kvmabi.decode_call(raw) == slot
    assert slot.answer(0, reply_len=4).status == 0
    assert kvmabi.call_slot_offset(17) == 0x40 + 64
    assert kvmabi.event_slot_offset(33) == 0x810


@pytest.mark.parametrize(
    ("slot", "match"),
    [
        (CallSlot(0), "unknown op 0"),
        (CallSlot(6), "unknown op 6"),
        (CallSlot(Op.CALL, len=4097), "4097 data bytes"),
        (CallSlot(Op.OPEN, len=5000), "5000 data bytes"),
        (CallSlot(Op.CALL, reply_cap=65537), "reply_cap"),
        (CallSlot(Op.SHM, flags=4), "SHM flags"),
    ],
)
def test_a_malformed_call_slot_is_a_call_ring_fault(slot: CallSlot, match: str) -> None:
    with pytest.raises(GuestFault, match=match) as info:
        kvmabi.decode_call(kvmabi.encode_call(slot), 5)
    assert info.value.reason == FaultReason.CALL_RING and info.value.detail == 5
    raw = bytearray(kvmabi.encode_call(CallSlot(Op.CLOSE)))
    raw[0x38] = 1
    with pytest.raises(GuestFault, match="reserved word"):
        kvmabi.decode_call(bytes(raw))
    with pytest.raises(Invalid):
        kvmabi.encode_call(CallSlot(Op.CALL, doorbell=1 << 16))


def test_events_and_device_entries_round_trip_and_refuse_garbage() -> None:
    event = Event(EventKind.FAULT, 3, FaultReason.RING)
    assert kvmabi.decode_event(kvmabi.encode_event(event)) == event
    with pytest.raises(ProtocolError):
        kvmabi.decode_event(struct.pack("<IIII", 9, 0, 0, 0))
    with pytest.raises(ProtocolError):
        kvmabi.decode_event(struct.pack("<IIII", 1, 0, 0, 1))
    entries = (DeviceEntry(1, "echo0", "echo"), DeviceEntry(7, "n", "venet"))
    data = kvmabi.encode_devices(entries)
    assert data[:8] == struct.pack("<IHH", 1, 5, 4) and len(data) % 4 == 0
    assert kvmabi.decode_devices(data) == entries
    assert kvmabi.decode_devices(b"") == ()
    with pytest.raises(ProtocolError, match="padding"):
        kvmabi.decode_devices(data[:-1] + b"\x01" + data[len(data) :])
    with pytest.raises(ProtocolError):
        kvmabi.decode_devices(data[:-4])
    with pytest.raises(ProtocolError):
        kvmabi.decode_devices(struct.pack("<IHH", 0, 0, 0))


# --- the bridge page: both ends -------------------------------------------------------


def test_guest_and_host_exchange_calls_and_events() -> None:
    page = bytearray(8192)
    guest = GuestBridge(page, 4096)
    host = HostBridge(page, 4096)
    assert struct.unpack_from("<II", page, 4096) == (kvmabi.BRIDGE_MAGIC, 1)
    assert host.check() == 0 and host.next() is None
    first = guest.post(CallSlot(Op.ENUMERATE, reply=0x100, reply_cap=64, tag=1))
    guest.post(CallSlot(Op.CLOSE, handle=2, tag=2))
    assert first == 0 and host.check() == 2
    slot = host.next()
    assert slot is not None and slot.op == Op.ENUMERATE
    host.answer(slot.answer(0, reply_len=12))
    assert guest.answered() == 1
    reaped = guest.reap()
    assert reaped is not None and (reaped.tag, reaped.reply_len) == (1, 12)
    slot = host.next()
    assert slot is not None
    host.answer(slot.answer(-2))
    reaped = guest.reap()
    assert reaped is not None and reaped.status == -2 and guest.reap() is None
    guest.irq_enable = True
    assert host.irq_enabled
    assert host.post_event(Event(EventKind.DEVICE_REMOVED, 3))
    assert guest.events() == [Event(EventKind.DEVICE_REMOVED, 3, 0)]
    host.set_fault(FaultReason.ADDRESS, 3)
    assert guest.fault == (FaultReason.ADDRESS, 3)
    host.close()
    guest.close()


def test_the_host_keeps_its_own_cursors() -> None:
    page = bytearray(4096)
    guest = GuestBridge(page)
    host = HostBridge(page)
    guest.post(CallSlot(Op.CLOSE, handle=1))
    struct.pack_into("<I", page, 0x14, 1)  # the guest forges call_tail
    assert host.check() == 1  # still one to answer
    slot = host.next()
    assert slot is not None
    host.answer(slot.answer(0))
    assert struct.unpack_from("<I", page, 0x14)[0] == 1


def test_the_event_area_fills_and_a_garbage_tail_faults() -> None:
    page = bytearray(4096)
    GuestBridge(page).close()
    host = HostBridge(page)
    for i in range(32):
        assert host.post_event(Event(EventKind.FAULT, i, 4))
    assert not host.post_event(Event(EventKind.FAULT, 99, 4))  # full: not posted
    struct.pack_into("<I", page, 0x1C, 1000)
    with pytest.raises(GuestFault) as info:
        host.post_event(Event(EventKind.FAULT, 1, 4))
    assert info.value.reason == FaultReason.BRIDGE
    with pytest.raises(GuestFault):
        host.check()


@pytest.mark.parametrize(
    ("offset", "value", "reason", "match"),
    [
        (0x00, 0x12345678, FaultReason.BRIDGE, "magic"),
        (0x04, 2, FaultReason.BRIDGE, "version"),
        (0x24, 1, FaultReason.BRIDGE, "reserved"),
        (0x3C, 1, FaultReason.BRIDGE, "reserved"),
        (0x20, 7, FaultReason.BRIDGE, "irq_enable"),
        (0x10, 17, FaultReason.CALL_RING, "17 slots ahead"),
        (0x10, 0xFFFFFFFF, FaultReason.CALL_RING, "slots ahead"),
    ],
)
def test_garbage_in_the_header_is_a_guest_fault(
    offset: int, value: int, reason: FaultReason, match: str
) -> None:
    page = bytearray(4096)
    GuestBridge(page).close()
    host = HostBridge(page)
    struct.pack_into("<I", page, offset, value)
    with pytest.raises(GuestFault, match=match) as info:
        host.next()
    assert info.value.reason == reason
    assert reason in kvmabi.WHOLE_GUEST


def test_sixteen_slots_is_the_most_a_guest_can_post() -> None:
    page = bytearray(4096)
    guest = GuestBridge(page)
    for i in range(16):
        guest.post(CallSlot(Op.CLOSE, handle=i))
    with pytest.raises(Busy):
        guest.post(CallSlot(Op.CLOSE))
    assert HostBridge(page).check() == 16
    with pytest.raises(Invalid):
        GuestBridge(bytearray(100))
    with pytest.raises(Invalid):
        HostBridge(bytearray(4096), 1)
