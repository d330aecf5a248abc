"""The xenstore client's writes: whole requests, in order, whatever the socket
takes at a time; a xenstored that stops reading is a lost connection, not a
growing buffer."""

from __future__ import annotations

import asyncio
import socket

import pytest

from vbus.errors import Closed
from vbus.xen import xswire
from vbus.xen.xsclient import MAX_UNSENT, XsClient
from vbus.xen.xswire import XsType


def _pair() -> tuple[socket.socket, socket.socket]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    # small buffers: a few requests fill them
    for sock in (ours, theirs):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    theirs.setblocking(False)
    return ours, theirs


async def test_requests_larger_than_the_socket_arrive_whole_and_in_order() -> None:
    loop = asyncio.get_running_loop()
    ours, theirs = _pair()
    client = XsClient(ours, loop)
    values = [bytes([65 + i % 26]) * (1000 + 97 * i) for i in range(32)]  # < 4096 each
    writes = [asyncio.ensure_future(client.write(f"/k/{i}", v)) for i, v in enumerate(values)]
    decoder = xswire.Decoder()
    seen: list[tuple[str, bytes]] = []
    try:
        while len(seen) < len(values):
            await asyncio.sleep(0.005)  # a slow reader: the client's socket fills
            try:
                data = theirs.recv(1500)
            except BlockingIOError:
                continue
            for msg in decoder.feed(data):
                assert msg.type == XsType.WRITE
                path, _, value = msg.payload.partition(b"\0")
                seen.append((path.decode(), value))
                theirs.setblocking(True)
                theirs.sendall(xswire.encode(XsType.WRITE, msg.req_id, 0, b"OK\0"))
                theirs.setblocking(False)
        await asyncio.wait_for(asyncio.gather(*writes), 10)
        assert seen == [(f"/k/{i}", v) for i, v in enumerate(values)]
        assert client.error is None
    finally:
        client.close()
        theirs.close()


async def test_a_xenstored_that_never_reads_loses_the_connection() -> None:
    loop = asyncio.get_running_loop()
    ours, theirs = _pair()
    client = XsClient(ours, loop)
    value = b"x" * 4000
    count = MAX_UNSENT // len(value) + 64
    writes = [asyncio.ensure_future(client.write("/k", value)) for _ in range(count)]
    try:
        results = await asyncio.wait_for(asyncio.gather(*writes, return_exceptions=True), 10)
        assert all(isinstance(r, Closed) for r in results)
        assert isinstance(client.error, Closed)
        assert "does not read" in str(client.error)
        with pytest.raises(Closed):
            await client.read("/k")
    finally:
        client.close()
        theirs.close()
