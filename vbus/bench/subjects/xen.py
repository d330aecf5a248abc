"""Xen: echo through a Xen frontend against the userspace path; xenstore against a bare dict.

``xen``: a domain attached to a fresh vbusd (``vbus.xen.domu``) echoes 64 B
messages through ``echo0`` over rings in granted pages, sending and
receiving at once; msg/s round trip.  ``userspace``: the client library the
same way, rings of the same size.  ``xenstore``: WRITE then READ of one
node, sequentially, on the daemon's ``xenstored.sock`` (a dom0 connection,
a path that is not saved, so no fsync is waited for); pairs/s.  ``dict``:
the same requests to a bare server in a process of its own that decodes
them with the same ``xswire`` and keeps one dict: what the store's
semantics (permissions, watches, transactions, quotas) cost above the wire.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import tempfile
import time
from pathlib import Path

from vbus.bench.subject import Figure, Figures, Params, Subject, Target, Variant

__all__ = ["SUBJECT", "XenSubject"]

_PATH = b"/local/domain/0/backend/bench"  # domain-lifetime: never saved


class XenSubject(Subject):
    name = "xen"
    title = "Xen: echo through a Xen frontend vs userspace; xenstore WRITE+READ vs a dict"
    order = 60
    variants = (
        Variant("xen", "echo, Xen frontend", role="vbus"),
        Variant("userspace", "echo, client library", role="peer"),
        Variant("xenstore", "xenstore WRITE+READ pairs", role="vbus"),
        Variant("dict", "a dict behind the same wire", role="reference"),
    )
    figures = (
        Figure("per_s", "ops/s (msg or pair)", "msg/s"),
        Figure("seconds", "seconds", ""),
    )
    primary = "per_s"
    baseline = "xen"

    def params(self, quick: bool) -> Params:
        return {"messages": 5000 if quick else 100_000, "pairs": 500 if quick else 10_000}

    def run(self, variant: str, params: Params) -> Figures:
        from vbus.bench.daemon import BenchDaemon
        from vbus.bench.procs import run_loop

        loop = params.get("loop", "uvloop")
        if variant == "dict":
            return _dict_pairs(params["pairs"], loop)
        with BenchDaemon(loop=loop) as daemon:
            if variant == "xen":
                return run_loop(loop, _xen_echo(daemon.run_dir / "xen.sock", params["messages"]))
            if variant == "userspace":
                return run_loop(loop, _userspace_echo(daemon.socket, params["messages"]))
            if variant == "xenstore":
                sock = daemon.run_dir / "xenstored.sock"
                return run_loop(loop, _pairs(sock, params["pairs"]))
        raise KeyError(f"xen: no variant {variant!r}")

    def targets(self, medians: dict[str, Figures]) -> list[Target]:
        def ratio(a: str, b: str) -> float | None:
            x, y = medians.get(a, {}).get("per_s"), medians.get(b, {}).get("per_s")
            return x / y if x is not None and y else None

        return [
            Target("xen: echo msg/s >= 0.3x the userspace path", ratio("xen", "userspace"),
                   0.3, ">="),
            Target("xen: xenstore pairs/s >= 0.5x a bare dict on the same wire",
                   ratio("xenstore", "dict"), 0.5, ">="),
        ]  # fmt: skip


async def _echo(send: object, recv: object, n: int) -> Figures:
    payloads = [i.to_bytes(8, "little") * 8 for i in range(n)]

    async def receive() -> int:
        got = 0
        while got < n:
            got += len(await recv(n - got))  # type: ignore[operator]
        return got

    t0 = time.perf_counter()
    receiving = asyncio.ensure_future(receive())
    await send(payloads)  # type: ignore[operator]
    await receiving
    elapsed = time.perf_counter() - t0
    return {"per_s": n / elapsed, "seconds": elapsed}


async def _xen_echo(path: Path, n: int) -> Figures:
    from vbus.bench.daemon import BENCH_DOMID, ECHO_DEVICE
    from vbus.xen.domu import DomU

    domu = await DomU.attach(path, BENCH_DOMID, name="bench")
    try:
        frontend = await domu.frontend(ECHO_DEVICE)
        tx, rx = frontend.queues[0], frontend.queues[1]
        return await _echo(tx.send_many, rx.recv_many, n)
    finally:
        await domu.close()


async def _userspace_echo(path: Path, n: int) -> Figures:
    from vbus.bench.daemon import ECHO_DEVICE
    from vbus.client import connect

    async with connect(path, name="bench-xen") as bus:
        device = await bus.open(ECHO_DEVICE)
        tx = await device.shm(0, "tx", count=64, buf_size=2048)
        rx = await device.shm(1, "rx", count=64, buf_size=2048)
        return await _echo(tx.send_many, rx.recv_many, n)


async def _pairs(path: Path, n: int) -> Figures:
    from vbus.xen import xswire
    from vbus.xen.xswire import XsType

    reader, writer = await asyncio.open_unix_connection(str(path))
    header = xswire.HEADER
    write = xswire.encode(XsType.WRITE, 1, 0, _PATH + b"\0value")
    read = xswire.encode(XsType.READ, 2, 0, _PATH + b"\0")

    async def reply() -> bytes:
        head = await reader.readexactly(header.size)
        body = await reader.readexactly(header.unpack(head)[3])
        if header.unpack(head)[0] == XsType.ERROR:
            raise RuntimeError(f"xenstore answered {body!r}")
        return body

    t0 = time.perf_counter()
    for _ in range(n):
        writer.write(write)
        await reply()
        writer.write(read)
        if await reply() != b"value":
            raise RuntimeError("xenstore read back something else")
    elapsed = time.perf_counter() - t0
    writer.close()
    return {"per_s": n / elapsed, "seconds": elapsed}


def _dict_server(path: str, loop: str, ready: object) -> None:
    from vbus.bench.procs import run_loop
    from vbus.xen import xswire
    from vbus.xen.xswire import XsType

    async def main() -> None:
        data: dict[bytes, bytes] = {}

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            decoder = xswire.Decoder()
            while chunk := await reader.read(65536):
                for msg in decoder.feed(chunk):
                    if msg.type == XsType.WRITE:
                        key, _, value = msg.payload.partition(b"\0")
                        data[key] = value
                        body = b"OK\0"
                    else:
                        body = data.get(msg.payload.rstrip(b"\0"), b"")
                    writer.write(xswire.encode(msg.type, msg.req_id, msg.tx_id, body))
            writer.close()

        server = await asyncio.start_unix_server(serve, path)
        ready.set()  # type: ignore[attr-defined]
        async with server:
            await server.serve_forever()

    run_loop(loop, main())


def _dict_pairs(n: int, loop: str) -> Figures:
    from vbus.bench.procs import run_loop

    directory = tempfile.mkdtemp(prefix="vbus-bench-dict-")
    path = os.path.join(directory, "dict.sock")
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Event()
    server = ctx.Process(target=_dict_server, args=(path, loop, ready), daemon=True)
    server.start()
    try:
        if not ready.wait(30):
            raise RuntimeError("the dict server did not start")
        return run_loop(loop, _pairs(Path(path), n))
    finally:
        server.terminate()
        server.join(10)
        Path(path).unlink(missing_ok=True)
        os.rmdir(directory)


SUBJECT = XenSubject()
