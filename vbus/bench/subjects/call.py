"""call() round trip: ``Device.call`` against a bare uvloop request/response echo.

N sequential awaits, each timed with ``perf_counter_ns``; p50/p99 per variant.

- ``vbus``: ``await dev.call(1, b"x" * 16)`` on the echo device of a real daemon.
The bare echoes run on the bench's loop (``--loop``, uvloop by default) at
both ends, as the daemon and the client library do.

- ``uvloop-seqpacket``: the same shape with nothing of vbus: an AF_UNIX
  SOCK_SEQPACKET server on uvloop (``add_reader``, ``recv``, ``send``), a
  client that sends a frame with an 8-byte header (sequence, length) and
  resolves the matching future from its reader callback.
- ``uvloop-stream``: uvloop ``create_unix_server``/``create_unix_connection``
  with protocols and the same 8-byte header as length prefix (what uvloop's
  own echo benchmarks do).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
import tempfile
import time
from pathlib import Path
from typing import cast

from vbus.bench.daemon import cpu_seconds
from vbus.bench.procs import Channel, fork, percentile, run_loop
from vbus.bench.subject import Figure, Figures, Params, Subject, Target, Variant

__all__ = ["SUBJECT", "CallSubject"]

_HEADER = struct.Struct("<II")  # sequence, payload length


class CallSubject(Subject):
    name = "call"
    title = "call() round trip: 16 B request, sequential"
    order = 20
    variants = (
        Variant("vbus", "vbus Device.call", role="vbus"),
        Variant("uvloop-seqpacket", "bare SEQPACKET echo", role="reference"),
        Variant("uvloop-stream", "bare stream echo", role="reference"),
    )
    figures = (
        Figure("p50_us", "p50", "us", higher_is_better=False),
        Figure("p99_us", "p99", "us", higher_is_better=False),
        Figure("mean_us", "mean", "us", higher_is_better=False),
        Figure("calls_per_s", "calls/s", "calls/s"),
        Figure("client_cpu_us", "client CPU/call", "us", higher_is_better=False),
        Figure("server_cpu_us", "server CPU/call", "us", higher_is_better=False),
    )
    primary = "p50_us"
    baseline = "vbus"

    def params(self, quick: bool) -> Params:
        return {"calls": 2000 if quick else 20000, "warmup": 200 if quick else 2000, "size": 16}

    def run(self, variant: str, params: Params) -> Figures:
        if variant == "vbus":
            return _vbus(params)
        if variant == "uvloop-seqpacket":
            return _bare(params, _seqpacket_server, _SeqpacketClient)
        if variant == "uvloop-stream":
            return _bare(params, _stream_server, _StreamClient)
        raise KeyError(f"call: no variant {variant!r}")

    def targets(self, medians: dict[str, Figures]) -> list[Target]:
        vbus = medians.get("vbus", {}).get("p50_us")
        bare = {
            v.name: medians[v.name]["p50_us"]
            for v in self.variants
            if v.role == "reference" and "p50_us" in medians.get(v.name, {})
        }
        if not bare:
            return [Target("call: vbus p50 <= 1.3x the bare uvloop echo", None, 1.3, "<=")]
        fastest = min(bare, key=lambda name: bare[name])
        return [
            Target(
                "call: vbus p50 <= 1.3x the bare uvloop echo",
                vbus / bare[fastest] if vbus else None,
                1.3,
                "<=",
                f"fastest bare echo: {fastest}",
            )
        ]


def _figures(
    latencies_ns: list[int], elapsed: float, client_cpu: float, server_cpu: float
) -> Figures:
    """``*_cpu``: CPU seconds each side spent over the timed calls."""
    us = [ns / 1e3 for ns in latencies_ns]
    return {
        "p50_us": percentile(us, 0.5),
        "p99_us": percentile(us, 0.99),
        "mean_us": sum(us) / len(us),
        "calls_per_s": len(us) / elapsed,
        "calls": float(len(us)),
        "client_cpu_us": client_cpu / len(us) * 1e6,
        "server_cpu_us": server_cpu / len(us) * 1e6,
    }


def _vbus(params: Params) -> Figures:
    from vbus.bench.daemon import ECHO_DEVICE, BenchDaemon
    from vbus.client import connect

    async def main(daemon: BenchDaemon) -> Figures:
        async with connect(daemon.socket, name="bench-call") as bus:
            dev = await bus.open(ECHO_DEVICE)
            payload = b"x" * params["size"]
            call = dev.call
            for _ in range(params["warmup"]):
                await call(1, payload)
            profiler = None
            if params.get("profile"):
                from vbus.bench.profile import WindowProfiler

                pids = {"daemon": daemon.pid, "client": os.getpid()}
                profiler = WindowProfiler(params["profile"], pids, 2.0)
                profiler.start()
            clock = time.perf_counter_ns
            latencies: list[int] = []
            cpu0, server0 = time.process_time(), daemon.cpu_seconds()
            start = time.perf_counter()
            for _ in range(params["calls"]):
                t = clock()
                await call(1, payload)
                latencies.append(clock() - t)
            elapsed = time.perf_counter() - start
            cpu, server = time.process_time() - cpu0, daemon.cpu_seconds() - server0
            if profiler is not None:
                profiler.stop()
            return _figures(latencies, elapsed, cpu, server)

    with BenchDaemon(params["loop"]) as daemon:
        return run_loop(params["loop"], main(daemon))


# --- the bare echoes ------------------------------------------------------------------


class _Client:
    """Request/response over one socket: ``await request(data)``."""

    async def connect(self, path: Path) -> None:
        raise NotImplementedError

    async def request(self, data: bytes) -> bytes:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


def _bare(params: Params, server: object, client_class: type[_Client]) -> Figures:
    path = Path(tempfile.mkdtemp(prefix="vbus-bench-")) / "echo.sock"

    def serve(channel: Channel) -> None:
        run_loop(params["loop"], server(channel, path))  # type: ignore[operator]

    child = fork(serve)
    try:
        child.recv(30)  # listening

        async def main() -> Figures:
            client = client_class()
            await client.connect(path)
            payload = b"x" * params["size"]
            request = client.request
            for _ in range(params["warmup"]):
                await request(payload)
            clock = time.perf_counter_ns
            latencies: list[int] = []
            cpu0, server0 = time.process_time(), cpu_seconds(child.pid)
            start = time.perf_counter()
            for _ in range(params["calls"]):
                t = clock()
                await request(payload)
                latencies.append(clock() - t)
            elapsed = time.perf_counter() - start
            cpu, server = time.process_time() - cpu0, cpu_seconds(child.pid) - server0
            client.close()
            return _figures(latencies, elapsed, cpu, server)

        return run_loop(params["loop"], main())
    finally:
        child.kill()
        child.join()
        path.unlink(missing_ok=True)
        path.parent.rmdir()


async def _seqpacket_server(channel: Channel, path: Path) -> None:
    loop = asyncio.get_running_loop()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(str(path))
    listener.listen(16)
    listener.setblocking(False)

    def on_readable(conn: socket.socket) -> None:
        while True:
            try:
                frame = conn.recv(65536)
            except BlockingIOError:
                return
            if not frame:
                loop.remove_reader(conn.fileno())
                conn.close()
                return
            seq, length = _HEADER.unpack_from(frame)
            conn.send(_HEADER.pack(seq, length) + frame[_HEADER.size : _HEADER.size + length])

    def on_accept() -> None:
        conn, _ = listener.accept()
        conn.setblocking(False)
        loop.add_reader(conn.fileno(), on_readable, conn)

    loop.add_reader(listener.fileno(), on_accept)
    channel.send({"ready": True})
    await asyncio.Event().wait()  # until killed


class _SeqpacketClient(_Client):
    async def connect(self, path: Path) -> None:
        self.loop = asyncio.get_running_loop()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock.setblocking(False)
        await self.loop.sock_connect(self.sock, str(path))
        self.seq = 0
        self.pending: dict[int, asyncio.Future[bytes]] = {}
        self.loop.add_reader(self.sock.fileno(), self._on_readable)

    def _on_readable(self) -> None:
        while True:
            try:
                frame = self.sock.recv(65536)
            except BlockingIOError:
                return
            seq, length = _HEADER.unpack_from(frame)
            future = self.pending.pop(seq, None)
            if future is not None and not future.done():
                future.set_result(frame[_HEADER.size : _HEADER.size + length])

    async def request(self, data: bytes) -> bytes:
        self.seq = (self.seq + 1) & 0xFFFFFFFF
        future: asyncio.Future[bytes] = self.loop.create_future()
        self.pending[self.seq] = future
        self.sock.send(_HEADER.pack(self.seq, len(data)) + data)
        return await future

    def close(self) -> None:
        self.loop.remove_reader(self.sock.fileno())
        self.sock.close()


class _FrameProtocol(asyncio.Protocol):
    """Splits a byte stream into header + payload frames."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        while len(buf) >= _HEADER.size:
            seq, length = _HEADER.unpack_from(buf)
            end = _HEADER.size + length
            if len(buf) < end:
                return
            payload = bytes(buf[_HEADER.size : end])
            del buf[:end]
            self.frame(seq, payload)

    def frame(self, seq: int, payload: bytes) -> None:
        raise NotImplementedError


class _EchoServerProtocol(_FrameProtocol):
    def frame(self, seq: int, payload: bytes) -> None:
        assert self.transport is not None
        self.transport.write(_HEADER.pack(seq, len(payload)) + payload)


async def _stream_server(channel: Channel, path: Path) -> None:
    loop = asyncio.get_running_loop()
    await loop.create_unix_server(_EchoServerProtocol, str(path))
    channel.send({"ready": True})
    await asyncio.Event().wait()  # until killed


class _ClientProtocol(_FrameProtocol):
    def __init__(self) -> None:
        super().__init__()
        self.pending: dict[int, asyncio.Future[bytes]] = {}

    def frame(self, seq: int, payload: bytes) -> None:
        future = self.pending.pop(seq, None)
        if future is not None and not future.done():
            future.set_result(payload)


class _StreamClient(_Client):
    async def connect(self, path: Path) -> None:
        self.loop = asyncio.get_running_loop()
        self.transport, self.proto = await self.loop.create_unix_connection(
            _ClientProtocol, str(path)
        )
        self.seq = 0

    async def request(self, data: bytes) -> bytes:
        self.seq = (self.seq + 1) & 0xFFFFFFFF
        future: asyncio.Future[bytes] = self.loop.create_future()
        self.proto.pending[self.seq] = future
        self.transport.write(_HEADER.pack(self.seq, len(data)) + data)
        return await future

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.transport.close()


SUBJECT = CallSubject()
