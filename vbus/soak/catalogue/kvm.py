"""Hostile KVM guests: the kvm connector's catalogue.

Each class is one bad guest, done once by ``run``.  The guest and its VMM
are simulated (``vbus.kvmsim.SimGuest``: guest RAM in a sealed memfd
registered as two regions with a hole between them, doorbell and interrupt
eventfds) and register on the daemon's ``kvm.sock``, so the daemon sees
exactly what a real VMM would hand it.  What the daemon must do about each
one is docs/design.md 4.5 (the fault reasons) and section 6: a fault of that
guest alone, with the reason in its fault register, interrupt 0 raised,
FAULTED sent to its VMM and everything it held released.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import os
import random
import resource
import signal
import struct
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import NoReturn

from vbus import kvmabi, kvmsim
from vbus.errors import NotFound
from vbus.ioq import IoqNorth
from vbus.kvmabi import CallSlot, FaultReason, Op
from vbus.kvmsim import BAD_TABLES, HOLE, RAM_SIZE, SimGuest
from vbus.soak.catalogue import Context, Misbehaviour, Outcome, Unexpected
from vbus.soak.catalogue.userspace import resolve_crash
from vbus.soak.wire import WireClient

__all__ = [
    "CATALOGUE",
    "KvmAddress",
    "KvmBridge",
    "KvmCallRing",
    "KvmCrash",
    "KvmNamespace",
    "KvmRegister",
    "KvmStall",
    "KvmStorm",
]

_RING = 16  # descriptors per queue of a bad guest
_BUF = 128  # bytes per buffer
_REPLY = 0x4000  # the simulator's reply buffer (guest-physical)
_QUIET = 0.1  # seconds a faulted guest's last call slot must stay unanswered


class KvmMisbehaviour(Misbehaviour):
    connector = "kvm"

    @classmethod
    def unavailable(cls, ctx: Context) -> str | None:
        if ctx.kvm_socket is None:
            return "the daemon under test has no kvm.sock"
        return super().unavailable(ctx)


# --- helpers --------------------------------------------------------------------


def _joins() -> None:
    """A guest is about to join the bad clients' bus: it takes a client id
    there like any process does, so it is counted where ``cross_tenant``
    checks that ids count the clients of their own bus only.  (A REGISTER
    refused for its memory table has joined first: it counts too.)"""
    WireClient.welcomes += 1


def _name(behaviour: str, rng: random.Random) -> str:
    return f"soak-{behaviour}-{rng.getrandbits(24):06x}"


@contextlib.asynccontextmanager
async def booted(ctx: Context, behaviour: str) -> AsyncIterator[SimGuest]:
    """A registered guest with its bridge page formatted; hung up on the way out."""
    assert ctx.kvm_socket is not None
    guest = SimGuest(ctx.kvm_socket, _name(behaviour, ctx.rng))
    try:
        _joins()
        reply = await guest.register(ctx.timeout)
        if reply.bus == "":
            raise Unexpected("REGISTERED without a bus")
        guest.boot()
        yield guest
    finally:
        guest.close()


async def echo_pair(guest: SimGuest, ctx: Context) -> tuple[int, IoqNorth, IoqNorth]:
    return await guest.echo_pair(ctx.device, count=_RING, buf_size=_BUF)


async def expect_fault(
    guest: SimGuest, reason: FaultReason, t0: float, ctx: Context
) -> tuple[kvmabi.Faulted, float]:
    """The FAULTED frame with ``reason``, the same reason in the fault
    register, interrupt 0 raised; and how long it took from ``t0``."""
    frame = await guest.faulted(ctx.timeout)
    detect = time.monotonic() - t0
    if frame.reason != reason:
        raise Unexpected(f"faulted with reason {frame.reason} ({frame.message}), not {reason.name}")
    if guest.fault[0] != reason:
        raise Unexpected(f"fault register {guest.fault}, FAULTED said {reason.name}")
    if not guest.interrupts(0):
        raise Unexpected("faulted without raising interrupt 0")
    return frame, detect


async def served_no_more(guest: SimGuest) -> bool:
    """A faulted guest's call ring is dead: a fresh slot stays unanswered."""
    bridge = guest.bridge
    assert bridge is not None
    with contextlib.suppress(Exception):  # 16 slots in flight: nothing to post
        bridge.post(CallSlot(Op.ENUMERATE, reply=_REPLY, reply_cap=4096))
    guest.ring(0)
    await asyncio.sleep(_QUIET)
    return not bridge.answered()


def _messages(n: int, rng: random.Random) -> list[bytes]:
    tag = rng.getrandbits(32)
    return [struct.pack("<IQI", tag, i, ~i & 0xFFFFFFFF) * (_BUF // 32) for i in range(n)]


def _fault_outcome(
    behaviour: KvmMisbehaviour, what: str, frame: kvmabi.Faulted, detect: float, gone: bool
) -> Outcome:
    reason = FaultReason(frame.reason).name
    return behaviour.outcome(
        gone,
        f"fault {reason} ({what}): {frame.message}"[:200],
        detect_s=detect,
        faults=1,
        reclaimed=gone,
    )


# --- the bridge page and the call ring -------------------------------------------


class KvmBridge(KvmMisbehaviour):
    name = "kvm_bridge"
    expect = "fault"
    summary = "garbage in its bridge page: magic, version, reserved words, event_tail"
    pause = 0.3

    async def run(self, ctx: Context) -> Outcome:
        rng = ctx.rng
        async with booted(ctx, self.name) as guest:
            if rng.random() < 0.5:
                await echo_pair(guest, ctx)  # with a handle to release
            guest.interrupts(0)
            what = rng.choice(["magic", "version", "reserved", "event_tail"])
            t0 = time.monotonic()
            if what == "event_tail":
                at = kvmsim.BRIDGE_GPA + 0x1C
                guest.ram[at : at + 4] = rng.randrange(64, 1 << 32).to_bytes(4, "little")
                guest.ring(0)
            else:
                offset = {"magic": 0x0, "version": 0x4}.get(what, rng.choice((0x24, 0x30, 0x3C)))
                guest.scribble_bridge(rng, at=offset)
            frame, detect = await expect_fault(guest, FaultReason.BRIDGE, t0, ctx)
            gone = await served_no_more(guest)
        return _fault_outcome(self, what, frame, detect, gone)


class KvmCallRing(KvmMisbehaviour):
    name = "kvm_call_ring"
    expect = "fault"
    summary = "call_head far past the 16 slots, or a call slot with an unknown op or garbage"
    pause = 0.3

    async def run(self, ctx: Context) -> Outcome:
        rng = ctx.rng
        async with booted(ctx, self.name) as guest:
            bridge = guest.bridge
            assert bridge is not None
            guest.interrupts(0)
            what = rng.choice(["head", "op", "reserved"])
            t0 = time.monotonic()
            if what == "head":
                guest.garbage_call_ring()
            else:
                index = bridge.post(CallSlot(Op.ENUMERATE, reply=_REPLY, reply_cap=4096))
                slot = kvmsim.BRIDGE_GPA + kvmabi.call_slot_offset(index)
                at, value = (slot, rng.randrange(6, 1 << 32)) if what == "op" else (slot + 0x38, 1)
                guest.ram[at : at + 4] = value.to_bytes(4, "little")
                guest.ring(0)
            frame, detect = await expect_fault(guest, FaultReason.CALL_RING, t0, ctx)
            gone = await served_no_more(guest)
        return _fault_outcome(self, what, frame, detect, gone)


class KvmAddress(KvmMisbehaviour):
    name = "kvm_address"
    expect = "fault"
    summary = (
        "a descriptor or call data outside guest RAM: in the hole, across regions, past the end"
    )
    pause = 0.3

    async def run(self, ctx: Context) -> Outcome:
        rng = ctx.rng
        async with booted(ctx, self.name) as guest:
            _handle, tx, _rx = await echo_pair(guest, ctx)
            guest.interrupts(0)
            what, addr = rng.choice(
                [
                    ("hole", HOLE[0] + rng.randrange(0, HOLE[1] - HOLE[0] - 64, 64)),
                    ("across regions", HOLE[0] - 32),
                    ("past the end", RAM_SIZE + rng.randrange(0, 1 << 30, 4096)),
                    ("far away", 1 << 47),
                    ("call data in the hole", HOLE[0]),
                ]
            )
            t0 = time.monotonic()
            if what.startswith("call"):
                bridge = guest.bridge
                assert bridge is not None
                bridge.post(CallSlot(Op.CALL, handle=_handle, arg=1, addr=addr, len=64))
                guest.ring(0)
            else:
                guest.post_outside(tx, addr)
            frame, detect = await expect_fault(guest, FaultReason.ADDRESS, t0, ctx)
            gone = await served_no_more(guest)
        return _fault_outcome(self, what, frame, detect, gone)


class KvmStorm(KvmMisbehaviour):
    name = "kvm_storm"
    expect = "fault"
    summary = "rings a doorbell (the bridge's or a queue's) far beyond any work it announces"
    pause = 2.0  # a storm lasts about the daemon's 1 s window: keep them apart

    async def run(self, ctx: Context) -> Outcome:
        rng = ctx.rng
        async with booted(ctx, self.name) as guest:
            doorbell = rng.choice([0, 1])
            if doorbell:
                await echo_pair(guest, ctx)
            guest.interrupts(0)
            t0 = time.monotonic()
            # ~30 k rings/s in bursts: far past the threshold, cheap for this process.
            storm = asyncio.ensure_future(guest.storm(doorbell, ctx.timeout, burst=64, pace=0.002))
            try:
                frame, detect = await expect_fault(guest, FaultReason.DOORBELL_STORM, t0, ctx)
            finally:
                rings = await storm
            gone = await served_no_more(guest)
        return _fault_outcome(self, f"doorbell {doorbell}, {rings} rings", frame, detect, gone)


# --- a guest that does not read ----------------------------------------------------


class KvmStall(KvmMisbehaviour):
    name = "kvm_stall"
    expect = "backpressure"
    summary = "lets the device fill its rx ring and never services it"
    hold = 1.5

    async def run(self, ctx: Context) -> Outcome:
        rng = ctx.rng
        async with booted(ctx, self.name) as guest:
            handle, tx, rx = await echo_pair(guest, ctx)
            sent = _messages(2 * _RING, rng)
            t0 = time.monotonic()
            if tx.send_many(sent[:_RING]) != _RING:
                raise Unexpected("an empty tx ring did not take a ring's worth")
            tx.signal.notify()
            deadline = t0 + ctx.timeout
            while rx.completed() < _RING or tx.completed() < _RING:
                if time.monotonic() > deadline:
                    raise Unexpected(f"echo filled {rx.completed()} of {_RING} rx buffers")
                await asyncio.sleep(0.002)
            if tx.send_many(sent[_RING:]) != _RING:
                raise Unexpected("tx did not take the second ring's worth")
            tx.signal.notify()
            detect = time.monotonic() - t0
            # Hold the stall while ringing: nothing moves, nothing faults.
            end = time.monotonic() + self.hold
            while time.monotonic() < end:
                tx.signal.notify(force=True)
                await asyncio.sleep(0.05)
            if tx.completed() or rx.completed() != _RING:
                raise Unexpected(
                    f"the stalled queues moved: tx {tx.completed()}, rx {rx.completed()}"
                )
            if guest.fault[0]:
                raise Unexpected(f"a stalled guest was faulted: {guest.fault}")
            assert guest.bridge is not None
            if guest.bridge.events():
                raise Unexpected("a stalled guest got an event")
            if await guest.call(handle, 1, b"still there") != b"still there":
                raise Unexpected("CALL stopped working for the stalled guest")
            # Service the ring at last: everything comes back, in order.
            got: list[bytes] = []
            deadline = time.monotonic() + ctx.timeout
            while len(got) < len(sent) and time.monotonic() < deadline:
                got += rx.recv_many(_RING)
                rx.signal.notify()
                await asyncio.sleep(0.002)
            if got != sent:
                raise Unexpected(f"after the stall {len(got)}/{len(sent)} came back intact")
        return self.outcome(
            True,
            f"backpressure after {_RING} messages; resumed, none lost",
            detect_s=detect,
            reclaimed=True,
        )


# --- registrations -----------------------------------------------------------------


class KvmRegister(KvmMisbehaviour):
    name = "kvm_register"
    expect = "disconnect"
    summary = "bad memory tables: unsealed, overlapping, misaligned, too many fds, garbage"
    pause = 0.2

    async def run(self, ctx: Context) -> Outcome:
        assert ctx.kvm_socket is not None
        rng = ctx.rng
        kind = rng.choice([*BAD_TABLES, "too_many_fds"])
        guest = SimGuest(ctx.kvm_socket, _name(self.name, rng))
        try:
            _joins()
            t0 = time.monotonic()
            if kind == "too_many_fds":
                frame = kvmabi.encode(guest.message(), 1)
                reply = await guest.send_register(
                    frame, [guest.doorbells[0]] * (kvmabi.MAX_FDS + 1), ctx.timeout
                )
                needle = "descriptors"
            else:
                reply = await guest.register_bad(kind, ctx.timeout)
                needle = BAD_TABLES[kind]
            detect = time.monotonic() - t0
            if not isinstance(reply, kvmabi.Error):
                raise Unexpected(f"a bad registration ({kind}) was answered with {reply}")
            if needle.lower() not in reply.message.lower():
                raise Unexpected(f"{kind} refused for another reason: {reply.message}")
            try:
                async with asyncio.timeout(ctx.timeout):
                    await guest.hung_up.wait()
            except TimeoutError:
                raise Unexpected(
                    f"the daemon kept the VMM connection after refusing {kind}"
                ) from None
        finally:
            guest.close()
        name = errno.errorcode.get(reply.errno, str(reply.errno))
        return self.outcome(
            True,
            f"{kind} refused ({name}) and disconnected",
            detect_s=detect,
            faults=1,
            reclaimed=True,
            detail=reply.message[:200],
        )


# --- a VMM that dies ------------------------------------------------------------------


class KvmCrash(KvmMisbehaviour):
    name = "kvm_crash"
    expect = "reclaimed"
    summary = "a VMM process SIGKILLed while its guest streams echo traffic"
    pause = 1.0

    async def run(self, ctx: Context) -> Outcome:
        assert ctx.kvm_socket is not None
        r, w = os.pipe()
        os.set_blocking(r, False)
        loop = asyncio.get_running_loop()
        name = _name(self.name, ctx.rng)
        _joins()  # the child's, counted here
        pid = os.fork()
        if pid == 0:
            os.close(r)
            _crash_child(str(ctx.kvm_socket), name, w)
        os.close(w)
        try:
            seen = b""
            deadline = time.monotonic() + ctx.timeout
            while b"\n" not in seen:
                ready: asyncio.Future[None] = loop.create_future()
                loop.add_reader(r, _resolve, ready)
                try:
                    async with asyncio.timeout(max(0.01, deadline - time.monotonic())):
                        await ready
                finally:
                    loop.remove_reader(r)
                chunk = os.read(r, 256)
                if not chunk:
                    break
                seen += chunk
        except BaseException:
            os.kill(pid, signal.SIGKILL)
            await _reap(pid)
            raise
        finally:
            os.close(r)
        if not seen.startswith(b"ready"):
            os.kill(pid, signal.SIGKILL)
            await _reap(pid)
            raise Unexpected(f"the streaming VMM did not get going: {seen[:200]!r}")
        await asyncio.sleep(ctx.rng.uniform(0.05, 0.3))
        killed_at = time.time()
        os.kill(pid, signal.SIGKILL)
        await _reap(pid)
        outcome = self.outcome(
            True,
            "SIGKILL mid-transfer",
            pending={"pid": pid, "killed_at": killed_at, "event": "guest.closed"},
        )
        if ctx.read_log is not None:
            deadline = time.monotonic() + ctx.timeout
            while not resolve_crash(outcome, ctx.read_log()) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            if outcome.pending is not None:
                raise Unexpected(f"the killed VMM (pid {pid}) was never released")
        return outcome


def _crash_child(path: str, name: str, ready: int) -> NoReturn:
    """In a forked child: a VMM streaming echo traffic until killed (it says
    ``ready`` on the pipe once traffic flows).  Never returns."""
    try:
        gc.disable()  # inherited objects must not be finalised onto reused fd numbers
        os.dup2(ready, 1)
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        os.closerange(3, max(soft, 4))
        # What it prints goes to the pipe, whatever the parent did with sys.stdout.
        sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
        # The parent's loop is recorded as running in this thread: forget it,
        # and run a loop of the child's own.
        asyncio.events._set_running_loop(None)
        loop = asyncio.SelectorEventLoop()
        asyncio.set_event_loop(loop)
        loop.run_until_complete(kvmsim.run_vmm(Path(path), name, "traffic"))
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.write(1, f"failed {exc!r}\n".encode())
    finally:
        os._exit(3)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


async def _reap(pid: int) -> None:
    for _ in range(2000):
        done, _status = os.waitpid(pid, os.WNOHANG)
        if done:
            return
        await asyncio.sleep(0.005)


# --- what a guest may see ------------------------------------------------------------------


class KvmNamespace(KvmMisbehaviour):
    name = "kvm_namespace"
    expect = "denied"
    summary = "opens devices of other buses by name and ids past its own bus's"
    pause = 0.3

    async def run(self, ctx: Context) -> Outcome:
        refused = 0
        t0 = time.monotonic()
        async with booted(ctx, self.name) as guest:
            devices = await guest.enumerate()
            names = {d.name for d in devices}
            if ctx.device not in names:
                raise Unexpected(f"ENUMERATE does not list {ctx.device}: {sorted(names)}")
            leaked = names & set(ctx.hidden)
            if leaked:
                raise Unexpected(f"ENUMERATE lists devices of other buses: {sorted(leaked)}")
            for hidden in ctx.hidden:
                try:
                    await guest.open(hidden)
                except NotFound:
                    refused += 1
                else:
                    raise Unexpected(f"a guest opened {hidden}, a device of another bus")
            top = max(d.id for d in devices)
            for device_id in range(top + 1, top + 9):
                answer = await guest.request(CallSlot(Op.OPEN, arg=device_id))
                if answer.status != -errno.ENOENT:
                    raise Unexpected(f"OPEN of id {device_id} answered {answer.status}")
                refused += 1
            handle = await guest.open(ctx.device)
            if await guest.call(handle, 1, b"mine") != b"mine":
                raise Unexpected("the guest's own device did not answer")
        return self.outcome(
            True,
            f"{refused} probes refused alike (ENOENT); its own device served",
            detect_s=time.monotonic() - t0,
            faults=refused,
            reclaimed=True,
        )


CATALOGUE: tuple[type[KvmMisbehaviour], ...] = (
    KvmBridge,
    KvmCallRing,
    KvmAddress,
    KvmStorm,
    KvmStall,
    KvmRegister,
    KvmCrash,
    KvmNamespace,
)
