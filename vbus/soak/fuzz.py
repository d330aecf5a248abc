"""Fuzz targets for every parser of north input, and ``make fuzz``.

Each target takes one byte string, the input format of every coverage-guided
fuzzer, and raises AssertionError (or anything unexpected) on a finding:

- ``wire``: one frame through ``decode``/``decode_request``/``decode_reply``
  with any fd count.  Only ProtocolError / TooBig may escape, whatever
  decodes re-encodes to the very same bytes (the format has one spelling),
  and the CALL/RESULT fast paths (``split_call``/``split_result``) agree
  with the full decoders on every frame.
- ``session``: a sequence of frames, valid, mutated and raw, through a
  ``ServerSession``: only protocol errors escape, HELLO is taken exactly once
  and first, a failed handshake closes the session for good.
- ``ring``: a descriptor ring whose header, indexes and descriptors are
  patched from the input before and between operations, served by
  ``IoqSouth``: only Fault / Invalid escape, the memory never grows, the
  south's view of pending work stays within the ring.  Popped buffers are
  handed back in any order (the queue contract allows it).
- ``xenstore``: a byte stream from a domain (unprivileged) and from dom0
  through the xenstored wire ``Decoder`` into one ``Store``: only
  ProtocolError escapes, every request gets exactly one reply of its own
  type or ERROR (a name from Xen's list) with its req_id and tx_id, and
  the tree stays whole (every child a node, every node its parent's child).
- ``vhost_wire``: a vhost-user byte stream, cut into chunks that carry
  descriptors, through ``vbus.vhost.wire``'s ``Parser`` and ``Backend``:
  only ProtocolError escapes, replies are well formed, effects claim only
  their message's descriptors, the memory table never overlaps and a started
  ring lies inside it.
- ``kvm``: the kvm ABI (``vbus.kvmabi``): registration frames with any
  descriptor count, call slots, event slots and ENUMERATE replies through
  their decoders (only the documented errors escape; whatever decodes
  re-encodes to the same bytes; a decoded REGISTER's table passes or fails
  ``check_layout`` with Invalid only), and a bridge page patched from the
  input between ``HostBridge`` operations: only ``GuestFault`` escapes, the
  page never grows, and the host never writes a word the guest owns.
- ``netif``: a netfront tx ring of near-valid and raw slots, its indexes
  patched between ``TxBackRing`` operations: only Fault escapes, every packet
  taken has at most 18 data slots after its first, whose fragments stay in their pages and add up
  to its size, and what ``tx_to_venet`` makes of it is a frame venet's
  ``check_tx`` accepts; a venet frame from the input through
  ``venet_to_rx`` and ``RxBackRing.place``, whose copies cover the frame.

``python -m vbus.soak.fuzz [--seconds N] [--engine atheris|hypothesis] [TARGET...]``
runs each target for N seconds: with atheris (libFuzzer, coverage-guided) when
it is installed (``pip install -e '.[fuzz]'``), else with hypothesis and a
large example budget.  Crashes land in ``fuzz-artifacts/``; each one found
becomes a regression test in tests/test_fuzz.py.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from vbus import kvmabi, protocol
from vbus.errors import Fault, Invalid, NotSupported, ProtocolError, TooBig, VbusError
from vbus.ioq import IoqNorth, IoqSouth, pool_layout
from vbus.memory import BufferMemory
from vbus.net import vnet
from vbus.queue import Buffer
from vbus.vhost import wire as vwire
from vbus.xen import netif, xenstore, xswire

__all__ = [
    "TARGETS",
    "kvm_target",
    "main",
    "netif_target",
    "ring_target",
    "session_target",
    "vhost_wire_target",
    "wire_target",
    "xenstore_target",
]


# --- wire -------------------------------------------------------------------------


def wire_target(data: bytes) -> None:
    if not data:
        return
    control, frame = data[0], data[1:]
    nfds = control % 5
    _fast_paths_agree(frame, nfds)
    decoder = (protocol.decode, protocol.decode_request, protocol.decode_reply)[(control >> 3) % 3]
    try:
        seq, msg = decoder(frame, nfds)
    except (ProtocolError, TooBig):
        return
    again = protocol.encode(msg, seq)
    assert again == frame, f"{msg!r} re-encodes differently"
    assert protocol.peek_seq(frame) == seq
    assert nfds == protocol.FD_COUNT[msg.TYPE]


def _fast_paths_agree(frame: bytes, nfds: int) -> None:
    """``split_call`` (the daemon's hot path) and ``split_result`` (the client's)
    accept exactly the CALL / RESULT frames the full decoders accept, with the
    same fields.  Frames over MAX_FRAME never reach them (the socket read is
    capped and truncation is refused first)."""
    if len(frame) > protocol.MAX_FRAME:
        return
    try:
        seq, msg = protocol.decode_request(frame, nfds)
        slow_call = (seq, msg.handle, msg.func, msg.data) if type(msg) is protocol.Call else None
    except (ProtocolError, TooBig):
        slow_call = None
    assert protocol.split_call(frame, nfds) == slow_call, "split_call disagrees with decode"
    try:
        seq, msg = protocol.decode_reply(frame, nfds)
        slow_result = (seq, msg.data) if type(msg) is protocol.Result else None
    except (ProtocolError, TooBig):
        slow_result = None
    assert protocol.split_result(frame, nfds) == slow_result, "split_result disagrees"


# --- session ------------------------------------------------------------------------

_TEMPLATES: tuple[Callable[[bytes], protocol.Message], ...] = (
    lambda b: protocol.Hello(1 + b[0] % 2, 1 + b[1] % 3, b[2:10].hex()),
    lambda b: protocol.Enumerate(),
    lambda b: protocol.Status(),
    lambda b: protocol.Open(name=b[:8].hex()) if b[0] & 1 else protocol.Open(device_id=b[1] or 1),
    lambda b: protocol.Call(b[0], b[1], b[2:]),
    lambda b: protocol.Shm(b[0], b[1], 64 * b[2], 1 << (b[3] % 17), b[4] % 4),
    lambda b: protocol.Close(b[0]),
)


def _frames(data: bytes) -> Iterator[tuple[bytes, int]]:
    """Cut ``data`` into (frame, nfds): each piece is a template message, a
    mutated one, or raw bytes, so the fuzzer reaches past the handshake."""
    pos = 0
    while pos + 2 <= len(data):
        control, size = data[pos], data[pos + 1]
        chunk = data[pos + 2 : pos + 2 + size].ljust(12, b"\0")
        pos += 2 + size
        nfds = (control >> 4) % 4
        kind = control % 4
        if kind == 3:
            yield chunk, nfds
            continue
        msg = _TEMPLATES[(control >> 2) % len(_TEMPLATES)](chunk)
        try:
            frame = bytearray(protocol.encode(msg, chunk[0]))
        except VbusError:
            continue
        nfds = protocol.FD_COUNT[msg.TYPE] if kind == 0 else nfds
        if kind == 1 and frame:  # flip one bit
            bit = chunk[1] * 256 + chunk[2]
            frame[(bit // 8) % len(frame)] ^= 1 << (bit % 8)
        elif kind == 2:  # cut it short
            del frame[chunk[3] % len(frame) :]
        yield bytes(frame), nfds


def session_target(data: bytes) -> None:
    session = protocol.ServerSession()
    hellos = 0
    for frame, nfds in _frames(data):
        before = session.state
        try:
            _seq, msg = session.receive(frame, nfds)
        except (ProtocolError, TooBig, NotSupported):
            if before == "await_hello":
                assert session.state == "closed", "a failed handshake left the session open"
            else:
                assert session.state == before, "an error changed a ready session"
            continue
        assert before != "closed", "a closed session accepted a frame"
        assert msg.TYPE in protocol.CLIENT_TYPES
        if before == "await_hello":
            assert type(msg) is protocol.Hello and session.state == "ready"
            assert session.version == protocol.WIRE_VERSION
            hellos += 1
        else:
            assert type(msg) is not protocol.Hello, "HELLO accepted twice"
    assert hellos <= 1


# --- ring ------------------------------------------------------------------------------

R_COUNT, R_BUF = 8, 32
R_DATA, _ = pool_layout(R_COUNT, R_BUF)
R_SIZE = R_DATA + R_COUNT * R_BUF
_PATCH_SPOTS = (0, 4, 8, 16, 24, 28, 64, 128, *(192 + 32 * i + f for i in range(R_COUNT) for f in (8, 16, 24, 25)))  # fmt: skip


class _Bytes:
    """Reads the fuzzer's input front to back; zeros once it runs out."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk.ljust(n, b"\0")

    def byte(self) -> int:
        return self.take(1)[0]

    @property
    def left(self) -> bool:
        return self.pos < len(self.data)


def _patch(buf: bytearray, src: _Bytes) -> None:
    spot = _PATCH_SPOTS[src.byte() % len(_PATCH_SPOTS)]
    size = 1 + src.byte() % 8
    end = min(spot + size, R_SIZE)
    buf[spot:end] = src.take(end - spot)


def ring_target(data: bytes) -> None:
    src = _Bytes(data)
    setup = src.byte()
    writable = bool(setup & 1)
    start = (0, R_COUNT - 1, 0xFFFFFFFE)[(setup >> 1) % 3]
    buf = bytearray(R_SIZE)
    north = IoqNorth(buf, 0, R_COUNT, R_DATA, R_BUF, None)
    struct.pack_into("<II", buf, 64, start, 0)
    struct.pack_into("<I", buf, 128, start)
    north.valid = north.reaped = start
    posted = (setup >> 3) % (R_COUNT + 1)
    if writable:
        north.post_empty(posted)
    else:
        north.send_many([bytes([i]) * (i + 1) for i in range(posted)])
    north.close()
    for _ in range(src.byte() % 4):
        _patch(buf, src)
    memory = BufferMemory(buf)
    try:
        south = IoqSouth(memory, 0, R_COUNT, None, writable=writable, max_len=R_BUF)
    except (Fault, Invalid):
        assert len(buf) == R_SIZE
        memory.release()
        return
    popped: list[Buffer] = []
    try:
        while src.left:
            op = src.byte()
            if op & 0x80:
                _patch(buf, src)
            arg = op % (R_COUNT + 2)
            kind = (op >> 4) % 8
            try:
                if kind == 0:
                    assert 0 <= south.pending() <= R_COUNT
                elif kind == 1 and not popped and not writable:
                    got = south.read_many(arg)
                    assert all(len(m) <= R_BUF for m in got)
                elif kind == 2 and not popped and writable:
                    payloads = [bytes([0xA0 + i]) * (5 * i) for i in range(arg)]
                    assert 0 <= south.write_many(payloads) <= len(payloads)
                elif kind == 3:
                    popped += south.pop_many(arg)
                    assert len(popped) <= R_COUNT
                elif kind == 4 and popped:
                    # Completion in any order: the later buffers from ``k`` on
                    # first (held until the earlier ones come), the rest later.
                    k = arg % len(popped)
                    items = [(b, min(arg, b.length) if writable else 0) for b in popped[k:]]
                    south.push_many(items)
                    del popped[k:]
                elif kind == 5:
                    south.kick_north()
                elif kind == 6:
                    south.enable_notify()
                else:
                    south.disable_notify()
            except (Fault, Invalid):
                assert len(buf) == R_SIZE
                return
            assert len(buf) == R_SIZE, "the south wrote past the end of the memory"
    finally:
        south.close()
        memory.release()


# --- xenstore ---------------------------------------------------------------------------

_XS_PATHS = (b"/local/domain/3", b"/local/domain/3/data", b"data/x", b"/tool", b"/", b"a//b")


def _xs_frames(data: bytes) -> Iterator[tuple[int, bytes]]:
    """(who, bytes): who 0 is dom0, 1 the domain; each piece a near-valid
    message (a known type, a path from a small set, the rest raw) or raw bytes."""
    src = _Bytes(data)
    while src.left:
        control = src.byte()
        who = control & 1
        if control & 2:
            yield who, src.take(src.byte() % 40)
            continue
        mtype = src.byte() % 28
        tx_id = src.byte() % 4
        path = _XS_PATHS[src.byte() % len(_XS_PATHS)]
        tail = src.take(src.byte() % 16)
        payload = path + b"\0" + tail
        yield who, struct.pack("<IIII", mtype, src.byte(), tx_id, len(payload)) + payload


def xenstore_target(data: bytes) -> None:
    store = xenstore.Store(xenstore.Quotas(nodes=20, watches=4, transactions=2))
    events: list[list[bytes]] = [[], []]
    conns = (
        store.connect(0, events[0].append, privileged=True),
        store.connect(3, events[1].append, privileged=False),
    )
    decoders = [xswire.Decoder(), xswire.Decoder()]
    names = {name.encode() + b"\0" for name in xswire.ERROR_NAMES.values()}
    for who, chunk in _xs_frames(data):
        try:
            msgs = decoders[who].feed(chunk)
        except ProtocolError:
            decoders[who] = xswire.Decoder()  # the server hangs up; a new connection
            continue
        for msg in msgs:
            before = len(events[who])
            try:
                reply = store.request(conns[who], msg)
            except xenstore._Answered:
                reply = events[who][before]
            mtype, req_id, tx_id, length = xswire.HEADER.unpack_from(reply)
            assert length == len(reply) - 16 <= xswire.PAYLOAD_MAX
            assert (req_id, tx_id) == (msg.req_id, msg.tx_id), "req_id/tx_id not echoed"
            assert mtype in (msg.type, xswire.XsType.ERROR)
            if mtype == xswire.XsType.ERROR:
                assert reply[16:] in names, f"{reply[16:]!r} is not one of Xen's errors"
    nodes = store.tree.nodes
    for path, node in nodes.items():
        for child in node.children:
            assert xenstore._join(path, child) in nodes, f"{path} lists a missing {child}"
        if path != "/":
            leaf = path.rsplit("/", 1)[1]
            assert leaf in nodes[xenstore._parent(path)].children, f"{path} is an orphan"


# --- vhost-user ----------------------------------------------------------------------------


def vhost_wire_target(data: bytes) -> None:
    """A vhost-user byte stream, cut into chunks with descriptors attached,
    through ``Parser`` and ``Backend``: only ProtocolError escapes; every
    reply is a well-formed reply; effects name only descriptors of their own
    message; the memory table never overlaps; a started ring has a
    power-of-two size and lies, aligned, inside the table."""
    if not data:
        return
    control, stream = data[0], data[1:]
    backend = vwire.Backend((1 << 32) | (1 << 29) | (1 << 28), config=bytes(10))
    parser = vwire.Parser()
    chunk = 1 + control % 61
    next_fd = 100
    for at in range(0, len(stream), chunk):
        nfds = stream[at] % 3 if control & 0x80 else 0
        fds = tuple(range(next_fd, next_fd + nfds))
        next_fd += nfds
        try:
            messages = parser.feed(stream[at : at + chunk], fds)
        except ProtocolError:
            return
        for msg in messages:
            try:
                effects = backend.handle(msg)
            except ProtocolError:
                return
            _check_vhost_effects(backend, msg, effects)


def _check_vhost_effects(
    backend: vwire.Backend, msg: vwire.Message, effects: list[vwire.Effect]
) -> None:
    for effect in effects:
        if isinstance(effect, vwire.Reply):
            req, _payload = vwire.parse_reply(effect.data)
            assert req == msg.request, "a reply to another request"
        if isinstance(effect, vwire.MemTable):
            assert set(effect.fds) <= set(msg.fds)
            assert len(effect.fds) == len(effect.regions)
        if (
            isinstance(effect, vwire.SetKick | vwire.SetCall | vwire.SetErr)
            and effect.fd is not None
        ):
            assert effect.fd in msg.fds
        if isinstance(effect, vwire.StartRing):
            ring = effect.ring
            assert 0 < ring.num <= vwire.MAX_RING and not ring.num & (ring.num - 1)
            guest = [(r.guest, r.guest + r.size) for r in backend.regions]
            for addr, length in (
                (ring.desc, 16 * ring.num),
                (ring.avail, 6 + 2 * ring.num),
                (ring.used, 6 + 8 * ring.num),
            ):
                assert any(lo <= addr and addr + length <= hi for lo, hi in guest), "ring outside"
    vwire.check_regions(backend.regions)


# --- kvm ------------------------------------------------------------------------------

# Bridge words the guest owns: magic, version, call_head, event_tail, irq_enable, reserved.
_GUEST_WORDS = (0, 1, 4, 7, 8, *range(9, 16))
_BRIDGE_SPOTS = (*range(0, 0x40, 4), *(kvmabi.call_slot_offset(i) + f for i in range(4) for f in (0, 0x18, 0x1C, 0x28, 0x38)))  # fmt: skip


def kvm_target(data: bytes) -> None:
    if not data:
        return
    control, body = data[0], data[1:]
    part = control % 4
    if part == 0:
        _kvm_frame(body, (control >> 2) % (kvmabi.MAX_FDS + 2), control >> 7)
    elif part == 1:
        raw = body[: kvmabi.CALL_SLOT_SIZE].ljust(kvmabi.CALL_SLOT_SIZE, b"\0")
        try:
            slot = kvmabi.decode_call(raw, control)
        except kvmabi.GuestFault as exc:
            assert exc.reason == kvmabi.FaultReason.CALL_RING
            return
        assert kvmabi.encode_call(slot) == raw, f"{slot!r} re-encodes differently"
    elif part == 2:
        raw = body[: kvmabi.EVENT_SLOT_SIZE].ljust(kvmabi.EVENT_SLOT_SIZE, b"\0")
        try:
            event = kvmabi.decode_event(raw)
        except ProtocolError:
            pass
        else:
            assert kvmabi.encode_event(event) == raw
        try:
            entries = kvmabi.decode_devices(body)
        except ProtocolError:
            return
        assert kvmabi.encode_devices(entries) == body
    else:
        _kvm_bridge(_Bytes(body))


def _kvm_frame(frame: bytes, nfds: int, which: int) -> None:
    decoder = kvmabi.decode_request if which else kvmabi.decode
    try:
        seq, msg = decoder(frame, nfds)
    except (ProtocolError, TooBig, NotSupported):
        return
    assert kvmabi.encode(msg, seq) == frame, f"{msg!r} re-encodes differently"
    assert kvmabi.peek_seq(frame) == seq
    if isinstance(msg, kvmabi.Register):
        assert msg.nfds == nfds and nfds <= kvmabi.MAX_FDS
        try:
            kvmabi.check_layout(msg)
        except Invalid:
            pass
    else:
        assert nfds == 0


def _kvm_bridge(src: _Bytes) -> None:
    page = bytearray(kvmabi.BRIDGE_SIZE)
    guest = kvmabi.GuestBridge(page)
    for i in range(src.byte() % 5):
        guest.post(kvmabi.CallSlot(1 + i % 5, arg=i, len=i, reply_cap=64))
    guest.close()
    host = kvmabi.HostBridge(page)
    words = memoryview(page).cast("I")
    try:
        while src.left:
            op = src.byte()
            if op & 0x80:
                spot = _BRIDGE_SPOTS[src.byte() % len(_BRIDGE_SPOTS)]
                page[spot : spot + 4] = src.take(4)
            owned = [words[w] for w in _GUEST_WORDS]
            try:
                kind = op % 5
                if kind == 0:
                    assert 0 <= host.check() <= kvmabi.CALL_SLOTS
                elif kind == 1:
                    slot = host.next()
                    if slot is not None:
                        host.answer(slot.answer(-(op % 7), reply_len=op))
                elif kind == 2:
                    event = kvmabi.Event(1 + op % 5, op, op % 8)
                    host.post_event(event)
                elif kind == 3:
                    host.set_fault(kvmabi.FaultReason(1 + op % 7), op)
                else:
                    _ = host.irq_enabled, host.call_head
            except kvmabi.GuestFault as exc:
                assert exc.reason in kvmabi.WHOLE_GUEST
                return
            finally:
                assert len(page) == kvmabi.BRIDGE_SIZE, "the host grew the page"
            assert [words[w] for w in _GUEST_WORDS] == owned, "the host wrote a guest word"
    finally:
        words.release()
        host.close()


# --- netif ------------------------------------------------------------------------------

# A tx slot as the target writes it: flags from the four NETTXF bits, sizes
# and offsets near the page's edges, ids that say where they came from.
_NETIF_SIZES = (0, 1, 14, 60, 1000, 1514, 4000, 4096, 4097, 65535)
_NETIF_OFFSETS = (0, 2, 96, 2048, 4000, 4095)


# The packets' bytes: untagged IPv4/TCP, IPv6/TCP, IPv4/UDP headers, and nothing.
_NETIF_TEMPLATE = (
    bytes(12) + b"\x08\x00\x45" + bytes(8) + b"\x06" + bytes(22) + b"\x50",
    bytes(12) + b"\x86\xdd\x60" + bytes(5) + b"\x06" + bytes(45) + b"\x50",
    bytes(12) + b"\x08\x00\x45" + bytes(8) + b"\x11",
    b"",
)


def _netif_slot(src: _Bytes, i: int) -> bytes:
    kind = src.byte()
    if kind & 0xC0 == 0xC0:
        return src.take(netif.TX_SLOT)  # raw bytes
    if kind & 0xC0 == 0x80:  # an extra info, GSO most of the time
        etype = (netif.EXTRA_GSO, 0, netif.EXTRA_MCAST_ADD, netif.EXTRA_HASH, 5)[kind % 5]
        gso = netif.ExtraInfo.gso(_NETIF_SIZES[src.byte() % 10], src.byte() % 4, 0, kind >> 3 & 1)
        return netif.pack_extra(netif.ExtraInfo(etype, gso.flags, gso.data)).ljust(12, b"\0")
    size = _NETIF_SIZES[src.byte() % len(_NETIF_SIZES)]
    offset = _NETIF_OFFSETS[src.byte() % len(_NETIF_OFFSETS)]
    return netif.pack_tx_request(netif.TxRequest(i, offset, kind & 15, i, size))


def netif_target(data: bytes) -> None:
    """A netfront's tx ring (near-valid slots, patched indexes) through
    ``TxBackRing`` and the translation to venet; then the rest of the input,
    as a venet frame, through ``venet_to_rx`` and ``RxBackRing.place``."""
    src = _Bytes(data)
    setup = src.byte()
    start = (0, 250, 0xFFFFFFF0, 0x7FFFFFFF)[setup % 4]
    page = bytearray(netif.PAGE_SIZE)
    ring = netif.TxBackRing(memoryview(page))
    ring.req_cons = ring.rsp_prod_pvt = start
    struct.pack_into("<II", page, 8, start, start)
    count = src.byte() % 40
    for i in range(count):
        off = ring.entry(start + i)
        page[off : off + netif.TX_SLOT] = _netif_slot(src, i)
    struct.pack_into("<I", page, 0, (start + count) & 0xFFFFFFFF)
    try:
        for _ in range(src.byte() % 64):
            op = src.byte()
            if op & 0x80:
                spot = (0, 4, 8, 12, 64, 70, 76)[src.byte() % 7]
                page[spot : spot + 4] = src.take(4)
            kind = op % 4
            if kind == 0:
                packet = ring.next_packet()
                if packet is not None:
                    _netif_packet(packet)
                    ring.respond(packet, netif.RSP_OKAY)
            elif kind == 1:
                ring.push()
            elif kind == 2:
                ring.final_check()
            else:
                assert 0 <= ring.unconsumed() <= netif.TX_RING_SIZE
            assert len(page) == netif.PAGE_SIZE, "the backend grew the ring page"
    except Fault:
        assert len(page) == netif.PAGE_SIZE
    _netif_rx(data[src.pos : src.pos + 600], setup)


def _netif_packet(packet: netif.TxPacket) -> None:
    frags = packet.fragments
    assert 1 <= len(frags) <= 1 + netif.LEGACY_SLOTS_MAX
    assert all(n >= 0 and o + n <= netif.PAGE_SIZE for _, o, n in frags)
    assert sum(n for _, _, n in frags) == packet.size
    body = _NETIF_TEMPLATE[packet.requests[0].gref % len(_NETIF_TEMPLATE)].ljust(
        packet.size, b"\0"
    )[: packet.size]
    out = netif.tx_to_venet(packet, body)
    if out is None:
        return
    assert out[vnet.HDR_SIZE :] == body
    verdict = vnet.check_tx(out, vnet.OFFERED, 65535)
    assert verdict not in (vnet.RUNT, vnet.BAD_HEADER) or out[1] != vnet.GSO_NONE


def _netif_rx(frame: bytes, setup: int) -> None:
    meta = netif.venet_to_rx(frame)
    if meta is None:
        return
    assert meta.frame == frame[vnet.HDR_SIZE :]
    page = bytearray(netif.PAGE_SIZE)
    ring = netif.RxBackRing(memoryview(page))
    posted = setup % 5
    for i in range(posted):
        off = ring.entry(i)
        page[off : off + 8] = netif.pack_rx_request(i, 100 + i)
    struct.pack_into("<I", page, 0, posted)
    copies = ring.place(meta)
    if copies is None:
        assert posted < ring.slots_for(meta) and ring.req_cons == 0
        return
    assert sum(c.length for c in copies) == len(meta.frame)
    assert ring.req_cons == ring.rsp_prod_pvt == ring.slots_for(meta)
    ring.push()
    assert len(page) == netif.PAGE_SIZE


TARGETS: dict[str, Callable[[bytes], None]] = {
    "wire": wire_target,
    "session": session_target,
    "ring": ring_target,
    "xenstore": xenstore_target,
    "vhost_wire": vhost_wire_target,
    "kvm": kvm_target,
    "netif": netif_target,
}


# --- make fuzz ---------------------------------------------------------------------------


def _run_atheris(name: str, seconds: float, artifacts: Path) -> int:
    atheris = importlib.import_module("atheris")  # optional: the `fuzz` extra
    target = TARGETS[name]
    atheris.instrument_all()
    artifacts.mkdir(exist_ok=True)
    atheris.Setup(
        [sys.argv[0], f"-max_total_time={int(seconds)}", f"-artifact_prefix={artifacts}/{name}-"],
        target,
    )
    atheris.Fuzz()
    return 0  # pragma: no cover - Fuzz() exits the process


def _run_hypothesis(name: str, seconds: float) -> int:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    target = TARGETS[name]
    deadline = time.monotonic() + seconds
    runs = 0

    @settings(
        max_examples=10**9,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(st.binary(max_size=4096))
    def fuzz(data: bytes) -> None:
        nonlocal runs
        runs += 1
        if time.monotonic() > deadline:
            raise _Enough()
        target(data)

    try:
        fuzz()
    except* _Enough:
        # Hypothesis may replay the last example after the deadline and then
        # report _Enough inside a FlakyFailure group: it is still only the end.
        pass
    print(f"{name}: {runs} hypothesis examples in {seconds:.0f} s, nothing found")
    return 0


class _Enough(Exception):
    """The time budget is spent."""


def engine_available() -> str:
    return "atheris" if importlib.util.find_spec("atheris") is not None else "hypothesis"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vbus.soak.fuzz", description=__doc__)
    parser.add_argument("targets", nargs="*", help=f"some of {', '.join(TARGETS)} (default: all)")
    parser.add_argument("--seconds", type=float, default=60.0, help="per target")
    parser.add_argument("--engine", choices=("atheris", "hypothesis"), default=None)
    parser.add_argument("--artifacts", type=Path, default=Path("fuzz-artifacts"))
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    engine = args.engine or engine_available()
    names = args.targets or list(TARGETS)
    unknown = [name for name in names if name not in TARGETS]
    if unknown:
        parser.error(f"unknown target(s) {', '.join(unknown)}; known: {', '.join(TARGETS)}")
    if args.one:  # a child process: atheris owns the process until it exits
        if engine == "atheris":
            return _run_atheris(names[0], args.seconds, args.artifacts)
        return _run_hypothesis(names[0], args.seconds)
    failed = []
    for name in names:
        print(f"== fuzz {name} with {engine} for {args.seconds:.0f} s", flush=True)
        cmd = [sys.executable, "-m", "vbus.soak.fuzz", "--one", "--engine", engine]
        cmd += ["--seconds", str(args.seconds), "--artifacts", str(args.artifacts), name]
        if subprocess.call(cmd) != 0:
            failed.append(name)
    if failed:
        print(f"findings in: {', '.join(failed)} (see {args.artifacts}/)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
