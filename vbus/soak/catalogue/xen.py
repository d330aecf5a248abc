"""Hostile Xen domains: what a domU can do to its backend, and what the backend does about it.

Each instance attaches as a domain of its own (a domid from the context's
pool, admitted by a ``domid:N`` rule on the bus of the context's device),
runs the frontend of ``vbus.xen.domu``, does one bad thing and detaches:

- ``garbage_ring_ref``: a ring reference that grants nothing, names
  another domain's grant or lies past the grant table; the backend refuses
  to map it and goes Closing with the reason (a fault of that device
  connection only).
- ``revoked_grants``: mid-transfer the domain tries to end access to every
  grant the backend maps (Xen refuses each while mapped), then clears the
  entries behind the backend's back; the backend keeps the pages it mapped
  and serves on, and at close unpins without harm.
- ``evtchn_storm``: the domain raises its event channels as fast as it can;
  kicks coalesce in the eventfds, the device still answers and echoes.
- ``xenstore_flood``: the domain writes nodes until ENOSPC, watches until
  E2BIG, and pipelines hundreds of requests; each bound answers with Xen's
  error and the store serves on.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import time
from collections.abc import AsyncIterator

from vbus.errors import Closed, VbusError
from vbus.soak.catalogue import Context, Misbehaviour, Outcome, Unexpected
from vbus.xen.domu import DomU, Frontend
from vbus.xen.grants import ENTRY_SIZE
from vbus.xen.xswire import XsError, XsType

__all__ = ["CATALOGUE", "EvtchnStorm", "GarbageRingRef", "RevokedGrants", "XenstoreFlood"]

_ECHO = 1


class XenMisbehaviour(Misbehaviour):
    connector = "xen"

    @classmethod
    def unavailable(cls, ctx: Context) -> str | None:
        if ctx.xen_socket is None or not ctx.xen_domids:
            return "no domid rule on its bus (xen behaviours need one)"
        return super().unavailable(ctx)


@contextlib.asynccontextmanager
async def domain(ctx: Context, name: str) -> AsyncIterator[DomU]:
    """A domain attached under a domid of the pool, detached on the way out."""
    assert ctx.xen_socket is not None
    async with ctx.xen_domid() as domid:
        domu = await DomU.attach(ctx.xen_socket, domid, 1 << 20, name=f"soak-{name}")
        try:
            yield domu
        finally:
            with contextlib.suppress(VbusError, XsError, OSError):
                await asyncio.wait_for(domu.close(), ctx.timeout)
            domu._release()


async def echo_round(frontend: Frontend, n: int, timeout: float) -> None:
    payloads = [i.to_bytes(4, "little") * 8 for i in range(n)]
    tx, rx = frontend.queues[0], frontend.queues[1]

    async def receive() -> list[bytes]:
        got: list[bytes] = []
        while len(got) < n:
            got += await rx.recv_many(n - len(got))
        return got

    receiving = asyncio.ensure_future(receive())
    try:
        await asyncio.wait_for(tx.send_many(payloads), timeout)
        got = await asyncio.wait_for(receiving, timeout)
    finally:
        receiving.cancel()
    if got != payloads:
        raise Unexpected("echo through the Xen frontend came back wrong")


def _still_mapped(domu: DomU) -> list[int]:
    """The domain's granted references Xen still refuses to end access to."""
    entries = domu.grants.entries
    refs = []
    for frontend in domu.frontends:
        refs += [frontend.call_ref] + [r for q in frontend.queues.values() for r in q.refs()]
    return [r for r in refs if 0 < r < entries and not domu.end_access(r)]


class GarbageRingRef(XenMisbehaviour):
    name = "garbage_ring_ref"
    expect = "fault"
    summary = "a ring-ref that grants nothing, is another domain's, or lies past the table"

    async def run(self, ctx: Context) -> Outcome:
        rng = ctx.rng
        kind = rng.choice(["ungranted", "foreign", "past the table"])
        async with domain(ctx, self.name) as domu:

            def tamper(frontend: Frontend) -> None:
                queue = frontend.queues[rng.choice([0, 1])]
                if kind == "ungranted":
                    queue.ring_ref = domu.pages - 1  # a frame nobody granted
                elif kind == "foreign":
                    assert domu.end_access(queue.ring_ref)
                    domu.grant(queue.ring_ref, domid=rng.randrange(1, 0x7FF0))
                else:
                    queue.ring_ref = domu.grants.entries + rng.randrange(1, 1 << 20)

            t0 = time.monotonic()
            try:
                await domu.frontend(ctx.device, count=16, tamper=tamper)
            except Closed as exc:
                detect = time.monotonic() - t0
                reason = str(exc)
            else:
                raise Unexpected(f"a {kind} ring-ref was accepted")
            refused = _still_mapped(domu)
        return self.outcome(
            not refused,
            f"fault ({kind}): {reason.split(': ', 2)[-1]}",
            detect_s=detect,
            faults=1,
            reclaimed=not refused,
            detail=f"grants left mapped={len(refused)}",
        )


class RevokedGrants(XenMisbehaviour):
    name = "revoked_grants"
    expect = "absorbed"
    summary = "ends access to mapped grants mid-transfer, then clears them behind the backend"

    async def run(self, ctx: Context) -> Outcome:
        async with domain(ctx, self.name) as domu:
            frontend = await domu.frontend(ctx.device, count=16)
            await echo_round(frontend, 200, ctx.timeout)
            refs = [frontend.call_ref] + [r for q in frontend.queues.values() for r in q.refs()]
            refused = sum(1 for ref in refs if not domu.end_access(ref))
            if refused != len(refs):
                raise Unexpected(f"{len(refs) - refused} mapped grants could be taken back")
            for ref in refs:  # behind the backend's back: a plain store of zero flags
                domu.grants.atomic.store_u16(ref * ENTRY_SIZE, 0)
            await echo_round(frontend, 200, ctx.timeout)
            if await frontend.call(_ECHO, b"still") != b"still":
                raise Unexpected("call() after revoking came back wrong")
        return self.outcome(
            True,
            f"{refused} end-of-access refused while mapped; served on",
            reclaimed=True,
        )


class EvtchnStorm(XenMisbehaviour):
    name = "evtchn_storm"
    expect = "absorbed"
    summary = "event channel sends as fast as the domain can make them"

    async def run(self, ctx: Context) -> Outcome:
        async with domain(ctx, self.name) as domu:
            frontend = await domu.frontend(ctx.device, count=16)
            ports = [q.port for q in frontend.queues.values()] + [frontend.call_port]
            sends = 0
            deadline = time.monotonic() + 0.5
            while time.monotonic() < deadline:
                for port in ports:
                    if port is not None:
                        for _ in range(100):
                            port.send()
                        sends += 100
                await asyncio.sleep(0)
            await echo_round(frontend, 200, ctx.timeout)
            if await frontend.call(_ECHO, b"storm") != b"storm":
                raise Unexpected("call() after the storm came back wrong")
        return self.outcome(True, f"{sends} sends coalesced; still served", reclaimed=True)


class XenstoreFlood(XenMisbehaviour):
    name = "xenstore_flood"
    expect = "error"
    summary = "nodes until ENOSPC, watches until E2BIG, hundreds of pipelined requests"

    async def run(self, ctx: Context) -> Outcome:
        async with domain(ctx, self.name) as domu:
            store = domu.store
            t0 = time.monotonic()
            nodes = watches = 0
            try:
                for i in range(2000):
                    await store.write(f"data/f{i // 200}/n{i}", "x")
                    nodes += 1
            except XsError as exc:
                if exc.errno != errno.ENOSPC:
                    raise Unexpected(f"node quota answered {exc.name}") from None
            else:
                raise Unexpected("2000 nodes written: no node quota")
            detect = time.monotonic() - t0
            try:
                for i in range(500):
                    await store.watch(f"data/w{i}", f"t{i}", lambda _path: None)
                    watches += 1
            except XsError as exc:
                if exc.errno != errno.E2BIG:
                    raise Unexpected(f"watch quota answered {exc.name}") from None
            else:
                raise Unexpected("500 watches set: no watch quota")
            await store.request(XsType.RESET_WATCHES, b"\0")
            pipelined = await asyncio.gather(
                *(store.request(XsType.READ, b"data/f0/n0\0") for _ in range(500))
            )
            if any(reply != b"x" for reply in pipelined):
                raise Unexpected("pipelined reads answered wrong")
            with contextlib.suppress(XsError):
                await store.rm("data")
            frontend = await domu.frontend(ctx.device, count=16)
            if await frontend.call(_ECHO, b"after") != b"after":
                raise Unexpected("call() after the flood came back wrong")
        return self.outcome(
            True,
            f"ENOSPC after {nodes} nodes, E2BIG after {watches} watches; "
            "500 pipelined reads served",
            detect_s=detect,
            faults=2,
            reclaimed=True,
        )


CATALOGUE: tuple[type[Misbehaviour], ...] = (
    GarbageRingRef,
    RevokedGrants,
    EvtchnStorm,
    XenstoreFlood,
)
