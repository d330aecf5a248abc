"""vbus.vhost.wire: the vhost-user back-end without IO, driven as QEMU and as a hostile front-end."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vbus.errors import ProtocolError
from vbus.soak.fuzz import vhost_wire_target
from vbus.vhost import wire
from vbus.vhost.wire import (
    F_PROTOCOL_FEATURES,
    Ack,
    Backend,
    MemTable,
    Message,
    P,
    Parser,
    Refused,
    Region,
    Reply,
    Request,
    SetCall,
    SetKick,
    StartRing,
    StopRing,
    mem_table,
    vring_addr,
    vring_state,
)

FEATURES = (1 << 32) | (1 << 29) | (1 << 28) | (1 << 5)
# Two regions as QEMU gives 256 MiB of guest RAM: below the VGA hole, then the rest.
LOW = Region(guest=0, size=0xA0000, user=0x7F0000000000, offset=0)
HIGH = Region(guest=0xC0000, size=0xFF40000, user=0x7F00000C0000, offset=0xC0000)


def msg(
    req: int, payload: bytes = b"", fds: tuple[int, ...] = (), need_reply: bool = False
) -> Message:
    (parsed,) = Parser().feed(wire.request(req, payload, need_reply=need_reply), fds)
    return parsed


def reply_of(effects: list[wire.Effect]) -> bytes:
    (reply,) = [e for e in effects if isinstance(e, Reply)]
    _req, payload = wire.parse_reply(reply.data)
    return payload


def negotiated(protocol: int = P.MQ | P.REPLY_ACK | P.STATUS) -> Backend:
    b = Backend(FEATURES, config=b"\x02" + bytes(9))
    b.handle(msg(Request.SET_FEATURES, wire.u64(FEATURES | F_PROTOCOL_FEATURES)))
    b.handle(msg(Request.SET_PROTOCOL_FEATURES, wire.u64(protocol)))
    b.handle(msg(Request.SET_MEM_TABLE, mem_table([LOW, HIGH]), fds=(10, 11), need_reply=True))
    return b


def ring_up(
    b: Backend, index: int, num: int = 256, user: int = HIGH.user + 0x10000
) -> list[wire.Effect]:
    b.handle(msg(Request.SET_VRING_NUM, vring_state(index, num)))
    b.handle(msg(Request.SET_VRING_BASE, vring_state(index, 7)))
    b.handle(msg(Request.SET_VRING_ADDR, vring_addr(index, user, user + 0x2000, user + 0x1000)))
    return b.handle(msg(Request.SET_VRING_KICK, wire.u64(index), fds=(20 + index,)))


def test_the_sequence_qemu_sends() -> None:
    b = Backend(FEATURES, config=b"\x02" + bytes(9))
    offered = int.from_bytes(reply_of(b.handle(msg(Request.GET_FEATURES))), "little")
    assert offered == FEATURES | F_PROTOCOL_FEATURES
    protocol = int.from_bytes(reply_of(b.handle(msg(Request.GET_PROTOCOL_FEATURES))), "little")
    assert (
        protocol & (P.MQ | P.REPLY_ACK | P.CONFIG | P.STATUS)
        == P.MQ | P.REPLY_ACK | P.CONFIG | P.STATUS
    )
    assert b.handle(msg(Request.SET_PROTOCOL_FEATURES, wire.u64(P.MQ | P.REPLY_ACK))) == []
    assert reply_of(b.handle(msg(Request.GET_QUEUE_NUM))) == wire.u64(2)
    assert b.handle(msg(Request.SET_OWNER)) == []
    assert b.handle(msg(Request.SET_VRING_CALL, wire.u64(0), fds=(5,))) == [SetCall(0, 5)]
    # QEMU enables before SET_FEATURES: SET_PROTOCOL_FEATURES was enough
    assert b.handle(msg(Request.SET_VRING_ENABLE, vring_state(0, 1))) == [wire.Enable(0, True)]
    b.handle(msg(Request.SET_FEATURES, wire.u64(FEATURES | F_PROTOCOL_FEATURES)))
    effects = b.handle(
        msg(Request.SET_MEM_TABLE, mem_table([LOW, HIGH]), fds=(10, 11), need_reply=True)
    )
    assert effects == [MemTable((LOW, HIGH), (10, 11)), Ack(Request.SET_MEM_TABLE)]
    assert wire.parse_reply(b.ack(Request.SET_MEM_TABLE, True)) == (
        Request.SET_MEM_TABLE,
        wire.u64(0),
    )
    effects = ring_up(b, 0)
    guest = HIGH.guest + 0x10000
    assert effects == [
        SetKick(0, 20),
        StartRing(wire.Ring(0, 256, guest, guest + 0x1000, guest + 0x2000, 7)),
    ]
    assert b.handle(msg(Request.GET_VRING_BASE, vring_state(0, 0))) == [StopRing(0, reply=True)]
    assert wire.parse_reply(b.stopped(0, 0x1_0009)) == (Request.GET_VRING_BASE, vring_state(0, 9))
    # a stopped ring answers at once with its base
    assert reply_of(b.handle(msg(Request.GET_VRING_BASE, vring_state(0, 0)))) == vring_state(0, 9)


def test_enable_follows_protocol_features() -> None:
    b = negotiated()
    assert b.handle(msg(Request.SET_VRING_ENABLE, vring_state(1, 1))) == [wire.Enable(1, True)]
    plain = Backend(FEATURES)
    plain.handle(msg(Request.SET_FEATURES, wire.u64(FEATURES)))
    with pytest.raises(ProtocolError, match="PROTOCOL_FEATURES"):
        plain.handle(msg(Request.SET_VRING_ENABLE, vring_state(0, 1)))


def test_parser_cuts_the_stream_and_keeps_fds_with_their_message() -> None:
    parser = Parser()
    one = wire.request(Request.SET_VRING_KICK, wire.u64(0))
    two = wire.request(Request.GET_FEATURES)
    assert parser.feed(one[:5], (7,)) == []
    (first,) = parser.feed(one[5:] + two[:3])
    assert first == Message(Request.SET_VRING_KICK, 1, wire.u64(0), (7,))
    (second,) = parser.feed(two[3:])
    assert second.request == Request.GET_FEATURES and second.fds == ()


@pytest.mark.parametrize(
    ("header", "match"),
    [
        (wire.HEADER.pack(1, 2, 0), "version"),
        (wire.HEADER.pack(1, 1 | 4, 0), "reply"),
        (wire.HEADER.pack(1, 1 | 0x10, 0), "flags"),
        (wire.HEADER.pack(5, 1, wire.MAX_PAYLOAD + 1), "payload"),
    ],
)
def test_parser_refuses_a_broken_stream(header: bytes, match: str) -> None:
    parser = Parser()
    with pytest.raises(ProtocolError, match=match):
        parser.feed(header)
    with pytest.raises(ProtocolError):
        parser.feed(b"")  # closed for good


def test_parser_bounds_descriptors() -> None:
    parser = Parser()
    with pytest.raises(ProtocolError, match="descriptors"):
        parser.feed(b"\x05", tuple(range(9)))
    assert parser.take_fds() == list(range(9))


@pytest.mark.parametrize(
    ("regions", "match"),
    [
        ([LOW, Region(0x50000, 0x1000, 0x7F1000000000, 0)], "overlap in guest"),
        ([LOW, Region(0x100000, 0x1000, LOW.user + 0x1000, 0)], "overlap in user"),
        ([Region(2**64 - 4096, 8192, 0, 0)], "wraps"),
        ([Region(0, 0, 0, 0)], "empty"),
        ([Region(0, 4096, 0, 100)], "page aligned"),
    ],
)
def test_memory_tables_are_checked(regions: list[Region], match: str) -> None:
    b = negotiated()
    fds = tuple(range(30, 30 + len(regions)))
    effects = b.handle(msg(Request.SET_MEM_TABLE, mem_table(regions), fds=fds, need_reply=True))
    assert isinstance(effects[0], Refused) and match in effects[0].reason
    assert reply_of(effects) == wire.u64(1)
    assert b.regions == (LOW, HIGH)  # unchanged
    with pytest.raises(ProtocolError, match=match):  # no way to say no without REPLY_ACK
        b.handle(msg(Request.SET_MEM_TABLE, mem_table(regions), fds=fds))


def test_memory_table_counts() -> None:
    b = negotiated()
    nine = wire.vring_state(9, 0) + bytes(8 * 32)  # the header says 9 regions
    effects = b.handle(msg(Request.SET_MEM_TABLE, nine, fds=tuple(range(8)), need_reply=True))
    assert isinstance(effects[0], Refused)
    effects = b.handle(
        msg(Request.SET_MEM_TABLE, mem_table([LOW, HIGH]), fds=(1,), need_reply=True)
    )
    assert isinstance(effects[0], Refused) and "descriptors" in effects[0].reason
    compact = mem_table([LOW], slots=1)
    assert isinstance(b.handle(msg(Request.SET_MEM_TABLE, compact, fds=(1,)))[0], MemTable)
    assert isinstance(
        b.handle(msg(Request.SET_MEM_TABLE, compact + b"x", fds=(1,), need_reply=True))[0], Refused
    )


@pytest.mark.parametrize("num", [0, 3, 255, 65536, 2**31])
def test_ring_sizes_are_powers_of_two_up_to_32768(num: int) -> None:
    b = negotiated()
    effects = b.handle(msg(Request.SET_VRING_NUM, vring_state(0, num), need_reply=True))
    assert isinstance(effects[0], Refused)
    assert b.handle(msg(Request.SET_VRING_NUM, vring_state(0, 32768), need_reply=True)) == [
        Ack(Request.SET_VRING_NUM)
    ]


@pytest.mark.parametrize(
    ("user", "match"),
    [
        (0x1000, "outside the memory table"),
        (LOW.user + LOW.size - 0x1000, "outside the memory table"),  # runs past the region
        (HIGH.user + 8, "aligned"),
    ],
)
def test_ring_addresses_must_lie_in_the_table(user: int, match: str) -> None:
    b = negotiated()
    b.handle(msg(Request.SET_VRING_NUM, vring_state(0, 256)))
    effects = b.handle(
        msg(
            Request.SET_VRING_ADDR,
            vring_addr(0, user, user + 0x2000, user + 0x1000),
            need_reply=True,
        )
    )
    assert isinstance(effects[0], Refused) and match in effects[0].reason


def test_rings_need_size_and_addresses_before_their_kick_and_exist() -> None:
    b = negotiated()
    effects = b.handle(msg(Request.SET_VRING_KICK, wire.u64(0), fds=(3,), need_reply=True))
    assert isinstance(effects[0], Refused)
    effects = b.handle(msg(Request.SET_VRING_NUM, vring_state(2, 256), need_reply=True))
    assert isinstance(effects[0], Refused) and "no virtqueue 2" in effects[0].reason
    effects = b.handle(msg(Request.SET_VRING_KICK, wire.u64(0x100), need_reply=True))
    assert isinstance(effects[0], Refused) and "polled" in effects[0].reason
    effects = b.handle(msg(Request.SET_VRING_CALL, wire.u64(0), need_reply=True))  # fd missing
    assert isinstance(effects[0], Refused) and "descriptors" in effects[0].reason


def test_started_rings_keep_their_layout() -> None:
    b = negotiated()
    ring_up(b, 1)
    effects = b.handle(msg(Request.SET_VRING_NUM, vring_state(1, 128), need_reply=True))
    assert isinstance(effects[0], Refused)
    # a new table that no longer holds a started ring is refused
    effects = b.handle(msg(Request.SET_MEM_TABLE, mem_table([LOW]), fds=(1,), need_reply=True))
    assert isinstance(effects[0], Refused) and "ring 1" in effects[0].reason


def test_unsupported_requests_get_a_clean_answer() -> None:
    b = negotiated()
    effects = b.handle(msg(Request.SET_LOG_BASE, wire.u64(0), need_reply=True))
    assert isinstance(effects[0], Refused) and reply_of(effects) == wire.u64(1)
    effects = b.handle(msg(999, b"junk", need_reply=True))
    assert isinstance(effects[0], Refused)
    with pytest.raises(ProtocolError, match="not supported"):
        b.handle(msg(999))
    with pytest.raises(ProtocolError, match="GET_INFLIGHT_FD"):  # the front-end would wait forever
        b.handle(msg(Request.GET_INFLIGHT_FD, bytes(24), need_reply=True))
    effects = b.handle(msg(Request.SET_FEATURES, wire.u64(1 << 40), need_reply=True))
    assert isinstance(effects[0], Refused) and "not offered" in effects[0].reason


def test_config_space_and_status() -> None:
    b = negotiated(P.MQ | P.REPLY_ACK | P.CONFIG | P.STATUS)
    payload = reply_of(b.handle(msg(Request.GET_CONFIG, wire.config_request(0, 10))))
    assert payload == wire.config_request(0, 10)[:12] + b"\x02" + bytes(9)
    refused = reply_of(b.handle(msg(Request.GET_CONFIG, wire.config_request(250, 10))))
    assert refused == wire.config_request(250, 0)  # size 0: the spec's "no"
    assert reply_of(b.handle(msg(Request.GET_STATUS))) == wire.u64(0)
    b.handle(msg(Request.SET_STATUS, wire.u64(0x0F)))
    b.needs_reset()
    assert reply_of(b.handle(msg(Request.GET_STATUS))) == wire.u64(0x4F)
    b.handle(msg(Request.SET_STATUS, wire.u64(0)))  # the driver resets the device
    assert reply_of(b.handle(msg(Request.GET_STATUS))) == wire.u64(0)


def test_reset_stops_every_ring() -> None:
    b = negotiated(P.MQ | P.REPLY_ACK | P.RESET_DEVICE)
    ring_up(b, 0)
    assert b.handle(msg(Request.RESET_DEVICE)) == [wire.Reset()]
    assert not any(r.started for r in b.rings)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=600))
def test_vhost_wire_target(data: bytes) -> None:
    vhost_wire_target(data)


def test_vhost_wire_target_on_a_real_session() -> None:
    # The honest sequence, as the fuzzer's seed: it must pass the target's checks.
    stream = b"".join(
        [
            wire.request(Request.SET_FEATURES, wire.u64(FEATURES)),
            wire.request(Request.SET_MEM_TABLE, mem_table([LOW, HIGH])),
            wire.request(Request.SET_VRING_NUM, vring_state(0, 256)),
            wire.request(
                Request.SET_VRING_ADDR,
                vring_addr(0, HIGH.user, HIGH.user + 0x2000, HIGH.user + 0x1000),
            ),
            wire.request(Request.SET_VRING_KICK, wire.u64(0)),
            wire.request(Request.GET_VRING_BASE, vring_state(0, 0)),
        ]
    )
    vhost_wire_target(b"\x00" + stream)


def test_parser_wanted_stops_reads_at_message_ends() -> None:
    parser = Parser()
    assert parser.wanted() == 12
    data = wire.request(Request.SET_FEATURES, wire.u64(1))
    parser.feed(data[:5])
    assert parser.wanted() == 7
    parser.feed(data[5:12])
    assert parser.wanted() == 8
    assert len(parser.feed(data[12:])) == 1
    assert parser.wanted() == 12
