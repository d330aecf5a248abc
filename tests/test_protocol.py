"""vbus.protocol: round trips, fuzzing, and every rejection the decoder promises."""

from __future__ import annotations

import errno
import struct
import tracemalloc
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vbus.errors import (
    Invalid,
    NotFound,
    NotSupported,
    ProtocolError,
    TooBig,
    VbusError,
    from_errno,
)
from vbus.protocol import (
    CLIENT_TYPES,
    FD_COUNT,
    HEADER_SIZE,
    MAX_CALL_DATA,
    MAX_FRAME,
    MAX_RESULT_DATA,
    NAME_MAX,
    SERVER_TYPES,
    SHM_RESUME,
    SHM_WRITABLE,
    TEXT_MAX,
    WIRE_VERSION,
    Call,
    Close,
    DeviceInfo,
    Devices,
    Enumerate,
    Error,
    Event,
    EventKind,
    Hello,
    Message,
    MessageType,
    Ok,
    Open,
    Opened,
    Result,
    ServerSession,
    Shm,
    Status,
    Welcome,
    decode,
    decode_reply,
    decode_request,
    encode,
    error_reply,
    negotiate,
    peek_seq,
)

FUZZ = settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ROUND = settings(max_examples=400, deadline=None)
SLOW = settings(max_examples=150, deadline=None)

U16 = 0xFFFF
U32 = 0xFFFF_FFFF
U64 = 0xFFFF_FFFF_FFFF_FFFF
HEADER = struct.Struct("<BBHIII")
MESSAGE_CLASSES = (
    Hello,
    Welcome,
    Enumerate,
    Devices,
    Open,
    Opened,
    Call,
    Result,
    Shm,
    Ok,
    Close,
    Error,
    Event,
    Status,
)
DECODERS: list[Callable[..., tuple[int, Message]]] = [decode, decode_request, decode_reply]


def frame(
    mtype: int,
    payload: bytes = b"",
    *,
    seq: int = 1,
    version: int = WIRE_VERSION,
    flags: int = 0,
    reserved: int = 0,
    length: int | None = None,
) -> bytes:
    """A raw frame, for inputs that ``encode`` refuses to produce."""
    size = len(payload) if length is None else length
    return HEADER.pack(version, mtype, flags, seq, size, reserved) + payload


def wire_str(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<H", len(raw)) + raw


def rejects(frame_: bytes, nfds: int = 0, decoder: Callable[..., object] = decode) -> str:
    with pytest.raises(ProtocolError) as info:
        decoder(frame_, nfds)
    assert type(info.value) is ProtocolError
    return info.value.message


# --- strategies -----------------------------------------------------------------

u16 = st.integers(0, U16)
u32 = st.integers(0, U32)
nonzero_u32 = st.integers(1, U32)
_chars = st.characters(exclude_categories=["Cs"], exclude_characters="\x00")
# Up to 16 characters always fit 64 bytes; long ASCII reaches the limit exactly.
names = st.one_of(
    st.text(_chars, max_size=NAME_MAX // 4),
    st.text(st.characters(min_codepoint=1, max_codepoint=127), min_size=50, max_size=NAME_MAX),
)
nonempty_names = names.filter(bool)
texts = st.one_of(
    st.text(st.characters(exclude_categories=["Cs"]), max_size=TEXT_MAX // 4),
    st.text(st.characters(max_codepoint=127), min_size=1000, max_size=TEXT_MAX),
)


@st.composite
def hellos(draw: st.DrawFn) -> Hello:
    lo = draw(st.integers(1, U16))
    return Hello(lo, draw(st.integers(lo, U16)), draw(names))


def messages(data_size: int = 2048, max_devices: int = 20) -> st.SearchStrategy[Message]:
    data = st.binary(max_size=data_size)
    device = st.builds(DeviceInfo, nonzero_u32, names, names)
    return st.one_of(
        hellos(),
        st.builds(Welcome, st.integers(1, U16), u32, names),
        st.just(Enumerate()),
        st.just(Status()),
        st.builds(Devices, st.lists(device, max_size=max_devices).map(tuple)),
        st.builds(Open, device_id=nonzero_u32),
        st.builds(Open, name=nonempty_names),
        st.builds(Opened, nonzero_u32, nonzero_u32, names, names),
        st.builds(Call, u32, u32, data),
        st.builds(Result, data),
        st.builds(
            Shm,
            u32,
            u32,
            st.integers(0, U64 // 64).map(lambda n: n * 64),
            st.integers(0, 16).map(lambda n: 1 << n),
            st.sampled_from([0, SHM_RESUME, SHM_WRITABLE, SHM_RESUME | SHM_WRITABLE]),
        ),
        st.just(Ok()),
        st.builds(Close, u32),
        st.builds(Error, nonzero_u32, texts),
        st.builds(Event, st.sampled_from(EventKind), u32, texts),
    )


def seq_for(msg: Message, seq: int) -> int:
    return 0 if isinstance(msg, Event) else seq


def decodes_or_rejects(decoder: Callable[..., tuple[int, Message]], data: bytes, nfds: int) -> None:
    """Either ProtocolError/TooBig, or a message that re-encodes to the very same bytes."""
    try:
        seq, msg = decoder(data, nfds)
    except (ProtocolError, TooBig):
        return
    assert isinstance(msg, MESSAGE_CLASSES)
    assert nfds == FD_COUNT[msg.TYPE]
    assert encode(msg, seq) == data  # the decoder accepts only canonical frames


# --- round trips ----------------------------------------------------------------


@ROUND
@given(messages(), u32)
def test_round_trip(msg: Message, seq: int) -> None:
    seq = seq_for(msg, seq)
    wire = encode(msg, seq)
    assert len(wire) <= MAX_FRAME
    assert HEADER.unpack_from(wire) == (WIRE_VERSION, msg.TYPE, 0, seq, len(wire) - 16, 0)
    nfds = FD_COUNT[msg.TYPE]
    assert decode(wire, nfds) == (seq, msg)
    assert decode(bytearray(wire), nfds) == (seq, msg)
    assert decode(memoryview(wire), nfds) == (seq, msg)
    if msg.TYPE in CLIENT_TYPES:
        assert decode_request(wire, nfds) == (seq, msg)
        rejects(wire, nfds, decode_reply)
    else:
        assert decode_reply(wire, nfds) == (seq, msg)
        rejects(wire, nfds, decode_request)


def test_every_type_has_a_class_and_a_direction() -> None:
    assert {cls.TYPE for cls in MESSAGE_CLASSES} == set(MessageType)
    assert set(MessageType) == CLIENT_TYPES | SERVER_TYPES
    assert not CLIENT_TYPES & SERVER_TYPES
    assert {t for t, n in FD_COUNT.items() if n} == {MessageType.SHM}
    assert FD_COUNT[MessageType.SHM] == 3


def test_largest_call_and_result_fit() -> None:
    call = Call(1, 2, b"\xaa" * MAX_CALL_DATA)
    wire = encode(call, 3)
    assert len(wire) == MAX_FRAME
    assert decode(wire) == (3, call)
    result = Result(b"\xbb" * MAX_RESULT_DATA)
    assert len(encode(result, 3)) == MAX_FRAME
    assert decode(encode(result, 3)) == (3, result)


def test_data_is_a_copy_not_a_view() -> None:
    buf = bytearray(encode(Call(1, 2, b"hello"), 9))
    _, msg = decode(memoryview(buf))
    assert isinstance(msg, Call)
    assert type(msg.data) is bytes
    buf[-5:] = b"XXXXX"
    assert msg.data == b"hello"
    buf = bytearray(encode(Result(b"world"), 9))
    _, reply = decode(buf)
    assert isinstance(reply, Result)
    assert type(reply.data) is bytes
    buf[-5:] = b"XXXXX"
    assert reply.data == b"world"


def test_encode_accepts_bytes_like_data() -> None:
    assert encode(Call(1, 2, bytearray(b"ab"))) == encode(Call(1, 2, b"ab"))  # type: ignore[arg-type]
    assert encode(Result(memoryview(b"ab"))) == encode(Result(b"ab"))  # type: ignore[arg-type]


def test_event_kind_is_decoded_as_enum() -> None:
    _, msg = decode(encode(Event(EventKind.BUS_GONE, 0, "bus destroyed")))
    assert isinstance(msg, Event)
    assert msg.kind is EventKind.BUS_GONE


# --- fuzzing: garbage never raises anything but ProtocolError / TooBig ---------------


@FUZZ
@given(st.binary(max_size=70000), st.integers(0, 5))
def test_garbage_decode(data: bytes, nfds: int) -> None:
    for decoder in DECODERS:
        decodes_or_rejects(decoder, data, nfds)


@FUZZ
@given(
    st.integers(0, 255),
    st.binary(max_size=400),
    st.integers(0, 3),
    u32,
    st.one_of(st.none(), st.integers(0, 500)),
)
def test_structured_garbage(
    mtype: int, payload: bytes, nfds: int, seq: int, length: int | None
) -> None:
    data = frame(mtype, payload, seq=seq, length=length)
    for decoder in DECODERS:
        decodes_or_rejects(decoder, data, nfds)


# Payloads assembled from plausible pieces get past the header and into the fields.
_pieces = st.one_of(
    u16.map(lambda n: struct.pack("<H", n)),
    u32.map(lambda n: struct.pack("<I", n)),
    st.integers(0, U64).map(lambda n: struct.pack("<Q", n)),
    st.text(max_size=8).map(wire_str),
    st.binary(max_size=8).map(wire_str),
    st.binary(max_size=4),
)


@ROUND
@given(st.sampled_from(MessageType), st.lists(_pieces, max_size=8), st.integers(0, 3))
def test_field_level_garbage(mtype: int, pieces: list[bytes], nfds: int) -> None:
    data = frame(mtype, b"".join(pieces), seq=0)
    for decoder in DECODERS:
        decodes_or_rejects(decoder, data, nfds)


@SLOW
@given(messages(data_size=64, max_devices=3), u32)
def test_truncations(msg: Message, seq: int) -> None:
    seq = seq_for(msg, seq)
    wire = encode(msg, seq)
    nfds = FD_COUNT[msg.TYPE]
    for cut in range(len(wire)):
        rejects(wire[:cut], nfds)  # the header's length no longer matches
        if cut >= HEADER_SIZE:
            # The same cut with a header that agrees: the payload itself is short.
            fixed = frame(msg.TYPE, wire[HEADER_SIZE:cut], seq=seq)
            decodes_or_rejects(decode, fixed, nfds)


@FUZZ
@given(messages(data_size=256, max_devices=4), st.data())
def test_bit_flips(msg: Message, data: st.DataObject) -> None:
    wire = bytearray(encode(msg, seq_for(msg, 7)))
    for _ in range(data.draw(st.integers(1, 3))):
        bit = data.draw(st.integers(0, len(wire) * 8 - 1))
        wire[bit // 8] ^= 1 << (bit % 8)
    for decoder in DECODERS:
        decodes_or_rejects(decoder, bytes(wire), FD_COUNT[msg.TYPE])


# --- the header ---------------------------------------------------------------------


def test_oversized_frame_is_too_big() -> None:
    payload = b"\0" * (MAX_FRAME - HEADER_SIZE + 1)
    with pytest.raises(TooBig):
        decode(frame(MessageType.RESULT, payload))
    with pytest.raises(TooBig):
        decode(b"\xff" * (MAX_FRAME + 1))


def test_encode_too_big() -> None:
    with pytest.raises(TooBig):
        encode(Call(1, 2, b"\0" * (MAX_CALL_DATA + 1)))
    with pytest.raises(TooBig):
        encode(Result(b"\0" * (MAX_RESULT_DATA + 1)))
    many = tuple(DeviceInfo(i, "d" * NAME_MAX, "c" * NAME_MAX) for i in range(1, 1000))
    with pytest.raises(TooBig):
        encode(Devices(many))


@pytest.mark.parametrize("size", [0, 1, 10, 15])
def test_truncated_header(size: int) -> None:
    message = rejects(encode(Ok())[:size])
    assert message == f"frame of {size} bytes is shorter than the 16-byte header"


def test_length_mismatch() -> None:
    assert "payload" in rejects(frame(MessageType.CLOSE, b"\1\0\0\0", length=5))
    assert "payload" in rejects(frame(MessageType.CLOSE, b"\1\0\0\0", length=3))
    assert "payload" in rejects(encode(Close(1)) + b"\0")


@pytest.mark.parametrize("mtype", [0, 15, 99, 255])
def test_unknown_type(mtype: int) -> None:
    assert rejects(frame(mtype)) == f"unknown message type {mtype}"


def test_bad_version_flags_reserved() -> None:
    assert "version" in rejects(frame(MessageType.OK, version=2))
    assert "version" in rejects(frame(MessageType.OK, version=0))
    assert "flags" in rejects(frame(MessageType.OK, flags=1))
    assert "reserved" in rejects(frame(MessageType.OK, reserved=1 << 31))


def test_peek_seq() -> None:
    assert peek_seq(encode(Call(1, 2, b""), 0xDEADBEEF)) == 0xDEADBEEF
    assert peek_seq(frame(99, seq=42)) == 42
    assert peek_seq(b"\1\7") == 0


# --- file descriptors -------------------------------------------------------------


@pytest.mark.parametrize("nfds", [0, 1, 2, 4])
def test_shm_wrong_fd_count(nfds: int) -> None:
    message = rejects(encode(Shm(1, 0, 0, 256)), nfds)
    assert message == f"SHM expects 3 file descriptors, got {nfds}"


@pytest.mark.parametrize("nfds", [1, 3])
def test_call_with_fds(nfds: int) -> None:
    assert rejects(encode(Call(1, 2, b"x")), nfds) == f"CALL expects 0 file descriptors, got {nfds}"


# --- fields -----------------------------------------------------------------------

SHM_LAYOUT = struct.Struct("<IIQII")


@pytest.mark.parametrize("count", [0, 3, 6, 100, 65535, 1 << 17, U32])
def test_shm_count_not_power_of_two(count: int) -> None:
    raw = frame(MessageType.SHM, SHM_LAYOUT.pack(1, 0, 0, count, 0))
    assert "power of two" in rejects(raw, 3)
    with pytest.raises(Invalid):
        encode(Shm(1, 0, 0, count))


def test_shm_count_limits() -> None:
    for count in (1, 2, 1 << 16):
        assert decode(encode(Shm(1, 0, 0, count)), 3)[1] == Shm(1, 0, 0, count)


@pytest.mark.parametrize("flags", [8, 15, 0x80, 1 << 31])
def test_shm_unknown_flag(flags: int) -> None:
    raw = frame(MessageType.SHM, SHM_LAYOUT.pack(1, 0, 0, 4, flags))
    assert "flags" in rejects(raw, 3)
    with pytest.raises(Invalid):
        encode(Shm(1, 0, 0, 4, flags))


def test_shm_resume_flag() -> None:
    msg = Shm(5, 1, 4096, 1024, SHM_RESUME)
    assert decode_request(encode(msg, 3), 3) == (3, msg)


@pytest.mark.parametrize("offset", [1, 32, 63, 65, U64])
def test_shm_misaligned_offset(offset: int) -> None:
    raw = frame(MessageType.SHM, SHM_LAYOUT.pack(1, 0, offset, 4, 0))
    assert "aligned" in rejects(raw, 3)
    with pytest.raises(Invalid):
        encode(Shm(1, 0, offset, 4))


@pytest.mark.parametrize("raw", [b"\xff", b"\xc3", b"\xed\xa0\x80", b"ab\x80", b"\xc0\xaf"])
def test_bad_utf8(raw: bytes) -> None:
    open_ = frame(MessageType.OPEN, struct.pack("<I", 0) + wire_str(raw))
    assert rejects(open_) == "device name is not valid UTF-8"
    hello = frame(MessageType.HELLO, struct.pack("<HH", 1, 1) + wire_str(raw))
    assert rejects(hello) == "client name is not valid UTF-8"
    error = frame(MessageType.ERROR, struct.pack("<I", 5) + wire_str(raw))
    assert rejects(error) == "error message is not valid UTF-8"


def test_string_too_long() -> None:
    name = "n" * (NAME_MAX + 1)
    hello = frame(MessageType.HELLO, struct.pack("<HH", 1, 1) + wire_str(name))
    assert "limit" in rejects(hello)
    with pytest.raises(Invalid):
        encode(Hello(1, 1, name))
    with pytest.raises(Invalid):
        encode(Hello(1, 1, "é" * 33))  # 33 characters, 66 bytes
    reason = "r" * (TEXT_MAX + 1)
    event = frame(MessageType.EVENT, struct.pack("<HI", 1, 0) + wire_str(reason), seq=0)
    assert "limit" in rejects(event)
    with pytest.raises(Invalid):
        encode(Event(EventKind.FAULT, 0, reason))
    # exactly at the limits is fine
    assert decode(encode(Hello(1, 1, "n" * NAME_MAX)))[1] == Hello(1, 1, "n" * NAME_MAX)
    assert decode(encode(Error(5, "m" * TEXT_MAX)))[1] == Error(5, "m" * TEXT_MAX)


def test_string_runs_past_payload() -> None:
    hello = frame(MessageType.HELLO, struct.pack("<HH", 1, 1) + struct.pack("<H", 10) + b"abc")
    assert "past the end" in rejects(hello)
    assert "ends inside" in rejects(frame(MessageType.HELLO, struct.pack("<HH", 1, 1) + b"\0"))
    assert "ends inside" in rejects(frame(MessageType.CLOSE, b"\1\0"))


def test_nul_in_names() -> None:
    raw = frame(MessageType.OPEN, struct.pack("<I", 0) + wire_str("ec\0ho"))
    assert "NUL" in rejects(raw)
    with pytest.raises(Invalid):
        encode(Open(name="ec\0ho"))
    with pytest.raises(Invalid):
        encode(Welcome(1, 1, "bus\0"))
    # texts may carry anything
    msg = Error(errno.EIO, "a\0b")
    assert decode(encode(msg))[1] == msg


def test_trailing_bytes() -> None:
    assert "trailing" in rejects(frame(MessageType.CLOSE, b"\1\0\0\0\0"))
    assert "trailing" in rejects(frame(MessageType.ENUMERATE, b"\0"))
    assert "trailing" in rejects(frame(MessageType.OK, b"x"))
    assert "trailing" in rejects(
        frame(MessageType.HELLO, struct.pack("<HH", 1, 1) + wire_str("a") + b"z")
    )


def test_devices_count_larger_than_payload_does_not_allocate() -> None:
    for count in (U32, 1 << 28, 2):
        raw = frame(MessageType.DEVICES, struct.pack("<I", count) + b"\1\0\0\0\0\0\0\0")
        tracemalloc.start()
        try:
            message = rejects(raw)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert "holds at most 1" in message
        assert peak < 64 * 1024


def test_devices_entry_rules() -> None:
    entry = struct.pack("<I", 0) + wire_str("a") + wire_str("echo")
    assert "device id 0" in rejects(frame(MessageType.DEVICES, struct.pack("<I", 1) + entry))
    with pytest.raises(Invalid):
        encode(Devices((DeviceInfo(0, "a", "echo"),)))
    empty = Devices(())
    assert decode(encode(empty))[1] == empty


@pytest.mark.parametrize(("device_id", "name"), [(0, ""), (3, "echo0")])
def test_open_needs_exactly_one(device_id: int, name: str) -> None:
    raw = frame(MessageType.OPEN, struct.pack("<I", device_id) + wire_str(name))
    assert "exactly one" in rejects(raw)
    with pytest.raises(Invalid):
        encode(Open(device_id, name))


def test_opened_handle_and_id_nonzero() -> None:
    for handle, device_id in ((0, 1), (1, 0)):
        raw = frame(MessageType.OPENED, struct.pack("<II", handle, device_id) + wire_str("") * 2)
        assert ">= 1" in rejects(raw)
        with pytest.raises(Invalid):
            encode(Opened(handle, device_id, "", ""))


@pytest.mark.parametrize(("lo", "hi"), [(0, 1), (0, 0), (2, 1)])
def test_hello_bad_version_range(lo: int, hi: int) -> None:
    raw = frame(MessageType.HELLO, struct.pack("<HH", lo, hi) + wire_str("c"))
    assert "version range" in rejects(raw)
    with pytest.raises(Invalid):
        encode(Hello(lo, hi, "c"))


def test_event_rules() -> None:
    assert "kind" in rejects(
        frame(MessageType.EVENT, struct.pack("<HI", 5, 0) + wire_str(""), seq=0)
    )
    assert "kind" in rejects(
        frame(MessageType.EVENT, struct.pack("<HI", 0, 0) + wire_str(""), seq=0)
    )
    assert "seq 0" in rejects(
        frame(MessageType.EVENT, struct.pack("<HI", 1, 0) + wire_str(""), seq=1)
    )
    with pytest.raises(Invalid):
        encode(Event(EventKind.FAULT, 1, "x"), seq=1)
    with pytest.raises(Invalid):
        encode(Event(7, 1, "x"))  # type: ignore[arg-type]


def test_error_errno_zero() -> None:
    assert "errno 0" in rejects(frame(MessageType.ERROR, struct.pack("<I", 0) + wire_str("")))
    with pytest.raises(Invalid):
        encode(Error(0, ""))


@pytest.mark.parametrize(
    "msg",
    [
        Call(-1, 0, b""),
        Call(U32 + 1, 0, b""),
        Call(0, U32 + 1, b""),
        Call(0, 0, "text"),  # type: ignore[arg-type]
        Close(U32 + 1),
        Shm(1, 0, U64 + 64, 4),
        Welcome(U16 + 1, 0, "b"),
        Welcome(1, -1, "b"),
        Hello(1, 1, 5),  # type: ignore[arg-type]
        Event(EventKind.FAULT, U32 + 1, ""),
    ],
)
def test_encode_out_of_range_is_invalid(msg: Message) -> None:
    with pytest.raises(Invalid):
        encode(msg)


def test_encode_rejects_bad_seq_and_non_messages() -> None:
    with pytest.raises(Invalid):
        encode(Ok(), -1)
    with pytest.raises(Invalid):
        encode(Call(1, 2, b""), U32 + 1)
    with pytest.raises(Invalid):
        encode(DeviceInfo(1, "a", "b"))  # type: ignore[arg-type]


# --- direction --------------------------------------------------------------------


def test_wrong_direction() -> None:
    assert "daemon" in rejects(encode(Ok(), 1), 0, decode_request)
    assert "daemon" in rejects(encode(Welcome(1, 1, "b"), 1), 0, decode_request)
    assert "client" in rejects(encode(Call(1, 2, b""), 1), 0, decode_reply)
    assert "client" in rejects(encode(Shm(1, 0, 0, 4), 1), 3, decode_reply)
    assert decode(encode(Ok(), 1)) == (1, Ok())


# --- errors on the wire -------------------------------------------------------------


def test_error_reply_maps_exceptions() -> None:
    reply = error_reply(NotFound("no such device"))
    assert reply == Error(errno.ENOENT, "no such device")
    _, back = decode_reply(encode(reply, 4))
    assert isinstance(back, Error)
    exc = back.exception()
    assert type(exc) is NotFound
    assert exc.message == "no such device"


def test_error_reply_truncates_on_a_character_boundary() -> None:
    reply = error_reply(Invalid("a" + "é" * 600))
    raw = reply.message.encode()
    assert len(raw) == TEXT_MAX - 1  # the cut "é" is dropped, not mangled
    assert decode(encode(reply))[1] == reply


def test_error_reply_unknown_errno() -> None:
    odd = from_errno(errno.ENOSYS, "not implemented")
    reply = error_reply(odd)
    assert reply.errno == errno.ENOSYS
    exc = reply.exception()
    assert type(exc) is VbusError
    assert exc.errno == errno.ENOSYS
    weird = VbusError("x")
    weird.errno = 0
    assert error_reply(weird).errno == errno.EIO


# --- the server handshake ------------------------------------------------------------


def state(session: ServerSession) -> str:
    return session.state  # read through a call: mypy would narrow the attribute for good


def test_session_happy_path() -> None:
    session = ServerSession()
    assert state(session) == "await_hello"
    assert session.receive(encode(Hello(1, 3, "client"), 1)) == (1, Hello(1, 3, "client"))
    assert state(session) == "ready"
    assert session.version == WIRE_VERSION
    assert session.receive(encode(Enumerate(), 2)) == (2, Enumerate())
    assert session.receive(encode(Shm(1, 0, 0, 8), 3), 3) == (3, Shm(1, 0, 0, 8))
    session.close()
    assert state(session) == "closed"
    rejects(encode(Enumerate(), 4), 0, session.receive)


def test_session_enumerate_before_hello() -> None:
    session = ServerSession()
    assert "HELLO" in rejects(encode(Enumerate(), 1), 0, session.receive)
    assert state(session) == "closed"
    rejects(encode(Hello(1, 1, ""), 2), 0, session.receive)


def test_session_second_hello() -> None:
    session = ServerSession()
    session.receive(encode(Hello(1, 1, "c"), 1))
    assert "twice" in rejects(encode(Hello(1, 1, "c"), 2), 0, session.receive)


def test_session_malformed_frame_when_ready_keeps_the_session() -> None:
    session = ServerSession()
    session.receive(encode(Hello(1, 1, "c"), 1))
    rejects(encode(Shm(1, 0, 0, 8), 2), 0, session.receive)
    rejects(encode(Ok(), 3), 0, session.receive)
    assert state(session) == "ready"
    assert session.receive(encode(Close(1), 4)) == (4, Close(1))


def test_session_version_negotiation_fails() -> None:
    session = ServerSession()
    with pytest.raises(NotSupported, match=r"2\.\.5"):
        session.receive(encode(Hello(2, 5, "future"), 1))
    assert state(session) == "closed"
    assert error_reply(NotSupported("x")).errno == errno.EOPNOTSUPP


def test_negotiate() -> None:
    assert negotiate(Hello(1, 1, "")) == WIRE_VERSION
    assert negotiate(Hello(1, U16, "")) == WIRE_VERSION
    with pytest.raises(NotSupported):
        negotiate(Hello(2, 2, ""))


# --- the call() hot path agrees with the general decoder ------------------------------


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=64), st.integers(0, 2), st.integers(0, 5))
def test_split_call_accepts_exactly_what_decode_accepts(
    garbage: bytes, nfds: int, cut: int
) -> None:
    from vbus.protocol import split_call

    frames = [garbage, encode(Call(3, 1, garbage), 7)]
    frames.append(frames[1][: len(frames[1]) - cut])
    for raw in frames:
        fast = split_call(raw, nfds)
        try:
            seq, msg = decode_request(raw, nfds)
        except (ProtocolError, TooBig):
            assert fast is None
            continue
        if isinstance(msg, Call):
            assert fast == (seq, msg.handle, msg.func, msg.data)
        else:
            assert fast is None


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=64), st.integers(0, 5))
def test_split_result_accepts_exactly_what_decode_accepts(garbage: bytes, cut: int) -> None:
    from vbus.protocol import result_frame, split_result

    good = result_frame(9, garbage)
    assert good == encode(Result(garbage), 9)
    for raw in (garbage, good, good[: len(good) - cut], good[:1] + b"\x07" + good[2:]):
        fast = split_result(raw)
        try:
            seq, msg = decode_reply(raw)
        except (ProtocolError, TooBig):
            assert fast is None
            continue
        if isinstance(msg, Result):
            assert fast == (seq, msg.data)
        else:
            assert fast is None


def test_call_frame_matches_encode_and_checks_ranges() -> None:
    from vbus.protocol import call_frame

    assert call_frame(5, 2, 1, b"abc") == encode(Call(2, 1, b"abc"), 5)
    with pytest.raises(Invalid):
        call_frame(5, -1, 1, b"")
    with pytest.raises(TooBig):
        call_frame(5, 1, 1, b"x" * (MAX_CALL_DATA + 1))
