"""Fuzzing every parser of north input, in bounded time (``make fuzz`` runs longer).

- the byte-level targets of ``vbus.soak.fuzz`` (the ones atheris drives):
  the wire decoders, the ServerSession, the south ring parser;
- a stateful fuzz: a north that interleaves honest and hostile ring
  operations against two ``IoqSouth`` rings pumped by the real echo session;
- a socket-level fuzz: random frames with random descriptors against a real
  daemon, which must stay up, leak no descriptor and keep serving.

Tests mirror tests/test_protocol.py and tests/test_ioq.py without repeating
them: those check each rejection; these look for what nobody thought of.
"""

from __future__ import annotations

import array
import os
import socket
import struct
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from tests.conftest import Daemon
from vbus import protocol
from vbus.devices.echo import Echo
from vbus.errors import Fault, Invalid
from vbus.ioq import HEADER_SIZE, IoqNorth, IoqSouth, pool_layout, ring_bytes
from vbus.memory import BufferMemory, create_memfd
from vbus.soak.fuzz import (
    TARGETS,
    _frames,
    kvm_target,
    ring_target,
    session_target,
    wire_target,
)

FAST = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --- the byte-level targets (the ones `make fuzz` runs for minutes) ---------------------


@FAST
@given(st.binary(max_size=300))
def test_wire_target(data: bytes) -> None:
    wire_target(data)


@FAST
@given(st.lists(st.sampled_from(list(protocol.MessageType)), max_size=4), st.binary(max_size=200))
def test_wire_target_near_valid_frames(types: list[int], tail: bytes) -> None:
    # Headers that are right, payloads that are not: the decoders' deepest paths.
    for mtype in types:
        frame = struct.pack("<BBHIII", 1, mtype, 0, 3, len(tail), 0) + tail
        for control in (0, 3, 8, 16):
            wire_target(bytes([control]) + frame)


@FAST
@given(st.binary(max_size=600))
def test_session_target(data: bytes) -> None:
    session_target(data)


@FAST
@given(st.binary(max_size=200))
def test_ring_target(data: bytes) -> None:
    ring_target(data)


@FAST
@given(st.binary(max_size=400))
def test_kvm_target(data: bytes) -> None:
    kvm_target(data)


@FAST
@given(st.integers(0, 255), st.binary(max_size=120))
def test_kvm_target_near_valid_frames(control: int, tail: bytes) -> None:
    # A REGISTER whose header is right and whose table is not, with every fd count.
    from vbus import kvmabi

    msg = kvmabi.Register("g", (kvmabi.Region(0, 4096),), 1, 1, 0)
    frame = kvmabi.encode(msg, 1)
    for nfds_control in (0, 3 << 2, (control % 64) << 2):
        kvm_target(bytes([nfds_control]) + frame[:40] + tail)
        kvm_target(bytes([nfds_control | 0x80]) + frame)


def test_kvm_target_reaches_the_bridge_and_round_trips() -> None:
    from vbus import kvmabi

    msg = kvmabi.Register("g", (kvmabi.Region(0, 4096),), 1, 1, 0)
    kvm_target(bytes([3 << 2]) + kvmabi.encode(msg, 1))  # decodes, re-encodes
    kvm_target(bytes([1]) + kvmabi.encode_call(kvmabi.CallSlot(kvmabi.Op.CALL, len=9)))
    kvm_target(bytes([3, 4]) + bytes(range(1, 200)))  # bridge ops over posted slots


def test_targets_reach_past_the_handshake() -> None:
    # A well-formed HELLO then a CALL, in the target's own framing, are accepted.
    hello = protocol.encode(protocol.Hello(1, 1, "x"))
    frames = list(_frames(bytes([3, len(hello)]) + hello))
    assert frames == [(hello, 0)]
    session = protocol.ServerSession()
    assert isinstance(session.receive(*frames[0])[1], protocol.Hello)
    assert set(TARGETS) == {
        "wire",
        "session",
        "ring",
        "xenstore",
        "vhost_wire",
        "kvm",
        "netif",
    }


# Inputs a fuzzer once produced, kept as regression cases (none has failed so far;
# each new finding is appended here with the target it crashed).
REGRESSIONS: list[tuple[str, bytes]] = [
    ("wire", b""),
    ("wire", b"\x08" + struct.pack("<BBHIII", 1, 4, 0, 0, 4, 0) + b"\xff\xff\xff\xff"),
    ("session", b"\x00\x00"),
    ("ring", b"\xff" * 64),
    ("ring", bytes(range(256))),
    ("kvm", b""),
    ("kvm", bytes(range(256))),
    ("kvm", b"\x03" + b"\xff" * 64),
    ("netif", b""),
    ("netif", bytes(range(256))),
    ("netif", b"\x02" + b"\xff" * 64),
]


@pytest.mark.parametrize("target, data", REGRESSIONS)
def test_regressions(target: str, data: bytes) -> None:
    TARGETS[target](data)


# --- stateful: a north that lies, against the real echo pump ---------------------------

COUNT, BUF = 8, 64
DATA, TOTAL = pool_layout(COUNT, BUF)
RING = ring_bytes(COUNT)


class NorthAgainstEcho(RuleBasedStateMachine):
    """Two rings (tx: north->south, rx: south->north) in two memories, the echo
    device's session in between.  Honest rules stream messages; hostile rules
    scribble on anything the north owns.  Whatever happens: only Fault escapes
    the south, the memories never grow, and while the north is honest every
    message comes back, in order and intact."""

    def __init__(self) -> None:
        super().__init__()
        self.mem = [bytearray(TOTAL), bytearray(TOTAL)]
        self.tx = IoqNorth(self.mem[0], 0, COUNT, DATA, BUF, None)
        self.rx = IoqNorth(self.mem[1], 0, COUNT, DATA, BUF, None)
        self.rx.post_empty(COUNT)
        self.memory = [BufferMemory(m) for m in self.mem]
        self.south_tx = IoqSouth(self.memory[0], 0, COUNT, None, writable=False, max_len=BUF)
        self.south_rx = IoqSouth(self.memory[1], 0, COUNT, None, writable=True, max_len=BUF)
        model = Echo(SimpleNamespace(attrs={}))
        self.session = model.open(None)  # type: ignore[arg-type]
        self.session.shm(0, self.south_tx)
        self.session.shm(1, self.south_rx)
        self.sent: list[bytes] = []
        self.received: list[bytes] = []
        self.seq = 0
        self.lied = False
        self.fault: Fault | None = None

    # honest north
    @precondition(lambda self: not self.lied)
    @rule(n=st.integers(1, COUNT), size=st.integers(0, BUF))
    def send(self, n: int, size: int) -> None:
        batch = [struct.pack("<I", self.seq + i) + bytes([i]) * max(0, size - 4) for i in range(n)]
        done = self.tx.send_many(batch)
        self.sent += batch[:done]
        self.seq += done

    @precondition(lambda self: not self.lied)
    @rule(limit=st.integers(1, COUNT))
    def reap(self, limit: int) -> None:
        self.received += self.rx.recv_many(limit)

    @precondition(lambda self: not self.lied and self.fault is None)
    @rule(n=st.integers(1, COUNT), budget=st.integers(1, 2 * COUNT))
    def round_trip(self, n: int, budget: int) -> None:
        self.send(n, 8 + n)
        self.pump(budget)
        self.reap(COUNT)

    # the south, as the daemon's poller drives it
    @precondition(lambda self: self.fault is None)
    @rule(budget=st.integers(1, 2 * COUNT))
    def pump(self, budget: int) -> None:
        try:
            self.session.quiesce()
            self.session.poll(budget)
            self.session.rearm()
        except Fault as exc:  # the connection would be faulted and torn down
            self.fault = exc

    # hostile north: one rule, so honest steps dominate and traffic is in flight
    @precondition(lambda self: len(self.sent) > 0)
    @rule(
        which=st.integers(0, 1),
        how=st.sampled_from(["scribble", "descriptor", "index", "publish"]),
        at=st.integers(0, RING - 1),
        data=st.binary(min_size=1, max_size=16),
        ptr=st.sampled_from([0, DATA, TOTAL - 1, TOTAL, 2**40, 2**64 - 1]),
        length=st.sampled_from([0, 1, BUF, BUF + 1, 2**32, 2**64 - 1]),
        delta=st.sampled_from([-1, 1, COUNT, COUNT + 1, 2**31]),
    )
    def lie(
        self, which: int, how: str, at: int, data: bytes, ptr: int, length: int, delta: int
    ) -> None:
        self.lied = True
        mem = self.mem[which]
        index = memoryview(mem)[:HEADER_SIZE].cast("I")
        valid, inuse = index[16], index[32]
        if how == "scribble":
            end = min(at + len(data), RING)
            mem[at:end] = data[: end - at]
        elif how == "descriptor":  # rewrite one the south may not have taken yet
            pending = (valid - inuse) & 0xFFFFFFFF
            slot = (inuse + at % max(1, pending)) % COUNT
            struct.pack_into("<QQ", mem, HEADER_SIZE + 32 * slot + 8, ptr, length)
        elif how == "index":
            index[16] = (valid + delta) & 0xFFFFFFFF
        else:  # publish one more descriptor, a bad one
            slot = valid % COUNT
            struct.pack_into("<QQQBB", mem, HEADER_SIZE + 32 * slot, 0, ptr, length, 1, 1)
            index[16] = (valid + 1) & 0xFFFFFFFF
        index.release()

    @invariant()
    def memories_never_grow(self) -> None:
        assert [len(m) for m in self.mem] == [TOTAL, TOTAL]

    @invariant()
    def honest_traffic_comes_back_intact(self) -> None:
        if not self.lied:
            assert self.fault is None, self.fault
            assert self.received == self.sent[: len(self.received)]

    def teardown(self) -> None:
        for ring in (self.south_tx, self.south_rx, self.tx, self.rx):
            ring.close()
        for memory in self.memory:
            memory.release()


NorthAgainstEcho.TestCase.settings = settings(
    max_examples=150, stateful_step_count=30, deadline=None
)
test_north_against_echo = NorthAgainstEcho.TestCase


# --- the socket: random frames and descriptors against a real daemon -------------------


def _fd_of_kind(kind: int) -> int:
    if kind == 0:
        return os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    if kind == 1:
        fd, mapping = create_memfd("fuzz", 8192)
        mapping.close()
        return fd
    if kind == 2:
        r, w = os.pipe()
        os.close(w)
        return r
    return os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)


def _throw(path: str, frames: list[tuple[bytes, int]], fd_kinds: list[int], hello: bool) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    sock.settimeout(2)
    try:
        sock.connect(path)
        if hello:
            sock.send(protocol.encode(protocol.Hello(1, 1, "fuzz"), 1))
            protocol.decode_reply(sock.recv(protocol.MAX_FRAME))
        for i, (frame, nfds) in enumerate(frames):
            fds = [_fd_of_kind(fd_kinds[(i + j) % len(fd_kinds)]) for j in range(nfds)]
            try:
                anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
                sock.sendmsg([frame], anc)
            except (BrokenPipeError, ConnectionResetError):
                return
            finally:
                for fd in fds:
                    os.close(fd)
        sock.settimeout(0.05)
        try:  # read what it said; every reply must be a well-formed daemon frame
            while data := sock.recv(protocol.MAX_FRAME):
                protocol.decode_reply(data)
        except (TimeoutError, ConnectionResetError):
            pass
    finally:
        sock.close()


@pytest.mark.integration
def test_random_frames_and_descriptors_never_hurt_the_daemon(vbusd: Callable[..., Any]) -> None:
    daemon: Daemon = vbusd("--no-admin")
    path = str(daemon.socket)
    _throw(path, [], [0], hello=True)  # warm up lazily created state
    baseline = daemon.fd_count()

    @settings(
        max_examples=60,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )
    @given(
        st.binary(min_size=2, max_size=400),
        st.lists(st.integers(0, 3), min_size=1, max_size=4),
        st.booleans(),
    )
    def throw(data: bytes, fd_kinds: list[int], hello: bool) -> None:
        _throw(path, list(_frames(data))[:12], fd_kinds, hello)

    throw()
    # Still serving, nothing leaked, nothing logged as an error.
    _throw(path, [(protocol.encode(protocol.Enumerate(), 2), 0)], [0], hello=True)
    deadline = time.monotonic() + 10
    while daemon.fd_count() != baseline and time.monotonic() < deadline:
        time.sleep(0.05)
    assert daemon.fd_count() == baseline
    log = daemon.log()
    assert '"level": "error"' not in log and "Traceback" not in log
    assert daemon.proc is not None and daemon.proc.poll() is None


def test_ring_target_refuses_what_the_south_refuses() -> None:
    # Sanity of the harness: a clean ring runs, a broken magic is refused as Fault.
    buf = bytearray(TOTAL)
    IoqNorth(buf, 0, COUNT, DATA, BUF, None).close()
    buf[0] ^= 0xFF
    memory = BufferMemory(buf)
    with pytest.raises(Fault):
        IoqSouth(memory, 0, COUNT, None, writable=False)
    with pytest.raises(Invalid):
        IoqSouth(memory, 8, COUNT, None, writable=False)
    memory.release()
