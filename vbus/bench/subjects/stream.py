"""Stream: 64-byte messages one way, vbus against what users would pick instead.

Every variant is a producer process and a consumer process moving messages
for the same wall-clock duration; messages/s are counted where the consumer
is done with them (``t_end(consumer) - t_start(producer)`` on the machine's
one monotonic clock).

- ``vbus``: the client library's ``send_many`` in batches into queue 0 of the
  sink-mode echo device of a real daemon (the consumer is the daemon).
- ``ceiling``: the same ioq code in two bare processes sharing a memfd:
  ``IoqNorth.send_many`` and ``IoqSouth.read_many`` (the daemon's budget),
  with the same shm_signal handshake on blocking eventfds (a side with
  nothing to do sleeps in ``read``; the producer waits for ``space() > 0``
  as the client library does).  No daemon, no event loop, no device.
- ``ceiling-spin``: the same, both sides busy-polling (``sched_yield`` when
  there is nothing to do), no signals at all.  On an idle machine the higher
  one; on a shared, loaded one a spinning side takes CPU time its peer needs.
  The target uses the higher of the two.
- ``asyncio-unix``: the bench's loop (uvloop by default) on both ends, one ``transport.write`` per message
  (with the transport's flow control), the reader counts bytes.
- ``seqpacket``: AF_UNIX SOCK_SEQPACKET, a blocking ``send`` per message,
  ``recv_into`` a reused buffer on the consumer.
- ``mp-pipe``: ``multiprocessing.Pipe()``, ``send_bytes``/``recv_bytes``.
- ``zmq-ipc``: pyzmq PUSH/PULL over ``ipc://``.
- ``iceoryx2``: iceoryx2 publish/subscribe (Python bindings), a fixed-size
  payload copied in (loan, memmove, send) and out (``string_at``), the
  publisher blocking (RetryUntilDelivered) on a full subscriber buffer.  It
  still loses a few samples now and then: counted, reported as ``lost``.

The peers end with a short end-of-stream message; each consumer copies every
message out (or receives it into memory) as the sink device does.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

from vbus.bench.clientside import run_vbus_stream
from vbus.bench.procs import Channel, fork, run_loop
from vbus.bench.subject import Figure, Figures, Params, Subject, Target, Unavailable, Variant
from vbus.mitigation import DEFAULT_BUDGET

__all__ = ["SUBJECT", "StreamSubject"]

END = b"E"  # end of stream: shorter than any message


class StreamSubject(Subject):
    name = "stream"
    title = "Stream: 64 B messages one way (producer -> consumer process)"
    order = 10
    variants = (
        Variant("vbus", "vbus (client -> vbusd sink)", role="vbus", kind="shm"),
        Variant("ceiling", "ceiling: bare ioq, eventfd", role="ceiling", kind="shm"),
        Variant("ceiling-spin", "ceiling: bare ioq, busy-poll", role="ceiling", kind="shm"),
        Variant("asyncio-unix", "asyncio Unix stream", kind="socket"),
        Variant("seqpacket", "AF_UNIX SOCK_SEQPACKET", kind="socket"),
        Variant("mp-pipe", "multiprocessing.Pipe", kind="socket"),
        Variant("zmq-ipc", "pyzmq PUSH/PULL ipc://", kind="socket"),
        Variant("iceoryx2", "iceoryx2 pub/sub", kind="shm"),
    )
    figures = (
        Figure("msgs_per_s", "msg/s", "msg/s"),
        Figure("n2s_per_msg", "n->s sig/msg", "/msg", higher_is_better=False),
        Figure("s2n_per_msg", "s->n sig/msg", "/msg", higher_is_better=False),
        Figure("producer_cpu", "prod CPU", "cores", higher_is_better=False),
        Figure("consumer_cpu", "cons CPU", "cores", higher_is_better=False),
        Figure("lost_per_msg", "lost", "/msg", higher_is_better=False),
    )
    primary = "msgs_per_s"
    baseline = "vbus"

    def params(self, quick: bool) -> Params:
        return {
            "duration": 0.3 if quick else 2.0,
            "size": 64,
            "batch": 1024,
            "ring": 16384,
            "budget": DEFAULT_BUDGET,
            "warmup": 4096 if quick else 16384,
        }

    def run(self, variant: str, params: Params) -> Figures:
        if variant == "vbus":
            return run_vbus_stream(params)
        runner = _PEERS.get(variant)
        if runner is None:
            raise KeyError(f"stream: no variant {variant!r}")
        return runner(params)

    def targets(self, medians: dict[str, Figures]) -> list[Target]:
        vbus = medians.get("vbus", {}).get(self.primary)
        sockets = {
            v.name: medians[v.name][self.primary]
            for v in self.variants
            if v.kind == "socket" and self.primary in medians.get(v.name, {})
        }
        out: list[Target] = []
        if sockets:
            fastest = max(sockets, key=lambda name: sockets[name])
            out.append(
                Target(
                    "stream: vbus >= 3x the fastest socket-based peer",
                    vbus / sockets[fastest] if vbus else None,
                    3.0,
                    ">=",
                    f"fastest socket peer: {fastest}",
                )
            )
        ceilings = {
            v.name: medians[v.name][self.primary]
            for v in self.variants
            if v.role == "ceiling" and self.primary in medians.get(v.name, {})
        }
        best = max(ceilings, key=lambda name: ceilings[name]) if ceilings else None
        out.append(
            Target(
                "stream: vbus >= 0.6x the bare two-process ioq ceiling",
                vbus / ceilings[best] if vbus and best else None,
                0.6,
                ">=",
                f"the higher ceiling: {best}" if best else "",
            )
        )
        return out


# --- the measurement shape every peer shares --------------------------------------


def _measure(consumer: Any, produce: Any, params: Params, *, lossy: bool = False) -> Figures:
    """Fork ``consumer(channel, params)``; once it is ready run ``produce(params)``
    (returns messages sent) and combine both ends' clocks.  Messages/s count
    what arrived; a peer that may lose messages (``lossy``) reports how many."""
    child = fork(lambda channel: consumer(channel, params))
    try:
        child.recv(30)  # ready
        cpu0 = time.process_time()
        t0 = time.perf_counter()
        sent = produce(params)
        producer_cpu = time.process_time() - cpu0
        done = child.recv(120)
    finally:
        child.join()
    elapsed = done["t_end"] - t0
    received = done["count"]
    if received != sent and not (lossy and received < sent):
        raise RuntimeError(f"consumer counted {received} messages, {sent} were sent")
    extra = {k: float(v) for k, v in done.items() if k not in ("t_end", "count", "cpu")}
    return {
        "msgs_per_s": received / elapsed,
        "messages": float(received),
        "lost_per_msg": (sent - received) / sent,
        "seconds": elapsed,
        "producer_cpu": producer_cpu / elapsed,
        "consumer_cpu": done["cpu"] / elapsed,
        **extra,
    }


def _finish(
    channel: Channel, count: int, cpu0: float, extra: dict[str, float] | None = None
) -> None:
    t_end = time.perf_counter()
    report = {"t_end": t_end, "count": count, "cpu": time.process_time() - cpu0}
    channel.send({**report, **(extra or {})})


def _payload(params: Params) -> bytes:
    return b"\xa5" * int(params["size"])


def _send_until_deadline(send: Any, params: Params) -> int:
    """One send per message, a batch at a time, until the run's duration is
    up; then the end marker.  Returns how many messages were sent."""
    messages = [_payload(params)] * params["batch"]
    clock = time.perf_counter
    deadline = clock() + params["duration"]
    sent = 0
    while True:
        for message in messages:
            send(message)
        sent += len(messages)
        if clock() >= deadline:
            break
    send(END)
    return sent


# --- ceiling: the ioq code in two bare processes ---------------------------------


def _ceiling(params: Params, *, spin: bool = False) -> Figures:
    from vbus.ioq import IoqNorth, IoqSouth, pool_layout
    from vbus.memory import MemfdRegion, create_memfd
    from vbus.signal import EventfdTransport

    ring, size, budget = params["ring"], params["size"], params["budget"]
    data_offset, total = pool_layout(ring, size)
    fd, mapping = create_memfd("vbus-bench-ceiling", total)
    # Blocking eventfds: a side with nothing to do sleeps in read(), no event loop.
    kick = EventfdTransport(os.eventfd(0, os.EFD_CLOEXEC))  # north -> south
    call = EventfdTransport(os.eventfd(0, os.EFD_CLOEXEC))  # south -> north
    north = IoqNorth(mapping, 0, ring, data_offset, size, kick)
    if spin:  # neither side ever sleeps: keep the other from kicking
        north.signal.disarm()

    def consumer(channel: Channel, params: Params) -> None:
        region = MemfdRegion.from_fd(fd)
        south = IoqSouth(region, 0, ring, call, writable=False)
        if spin:
            south.disable_notify()
        read_span = south.read_span  # what the sink device does with a poll
        count = 0
        channel.send({"ready": True})
        cpu0 = time.process_time()
        while True:
            _, lens = read_span(budget)
            if lens:
                count += len(lens)
                south.kick_north()  # mitigated: only if the north sleeps
                if lens[-1] != size:
                    break
            elif spin:
                south.disable_notify()  # a new poll: a fresh byte credit, as the poller does
                os.sched_yield()  # nothing there: let a peer sharing this CPU run
            elif not south.enable_notify():  # arm, fence, re-check
                os.eventfd_read(kick.fd)
                south.disable_notify()
            else:
                south.disable_notify()
        _finish(channel, count - 1, cpu0, {"s2n": south.stats.signals_sent})

    def produce(params: Params) -> int:
        batch = [_payload(params)] * params["batch"]
        n_batch = len(batch)
        send_many = north.send_many
        signal = north.signal
        clock = time.perf_counter
        deadline = clock() + params["duration"]
        sent = 0

        def post(payloads: list[bytes]) -> None:
            done = 0
            while True:
                n = send_many(payloads[done:] if done else payloads)
                if n:
                    signal.notify()  # mitigated: only if the south sleeps
                    done += n
                if done == len(payloads):
                    return
                if spin:
                    os.sched_yield()
                    continue
                signal.arm()  # ring full: sleep until the south hands some back
                if north.space() == 0:
                    os.eventfd_read(call.fd)
                signal.disarm()

        while True:
            post(batch)
            sent += n_batch
            if clock() >= deadline:
                break
        post([END])
        return sent

    try:
        figures = _measure(consumer, produce, params)
    finally:
        north.close()
        mapping.close()
        os.close(fd)
        kick.close()
        call.close()
    # Signals both ways, as the vbus variant reports them (the end marker's
    # kick included: one message's worth).
    sent = figures["messages"]
    figures["n2s_per_msg"] = north.signal.sent / sent
    figures["s2n_per_msg"] = figures.pop("s2n") / sent
    figures["signals_per_msg"] = figures["n2s_per_msg"] + figures["s2n_per_msg"]
    return figures


# --- asyncio Unix stream, uvloop on both ends -------------------------------------


class _CountingServer(asyncio.Protocol):
    def __init__(self, done: asyncio.Future[int]) -> None:
        self.done = done
        self.received = 0

    def data_received(self, data: bytes) -> None:
        self.received += len(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(self.received)


class _Producer(asyncio.Protocol):
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.paused = False
        self.resumed: asyncio.Future[None] | None = None
        self.closed: asyncio.Future[None] = loop.create_future()

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        if self.resumed is not None and not self.resumed.done():
            self.resumed.set_result(None)

    async def wait_resumed(self) -> None:
        self.resumed = self.loop.create_future()
        await self.resumed

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)


def _asyncio_unix(params: Params) -> Figures:
    path = Path(tempfile.mkdtemp(prefix="vbus-bench-")) / "stream.sock"
    size = params["size"]

    def consumer(channel: Channel, params: Params) -> None:
        async def serve() -> None:
            loop = asyncio.get_running_loop()
            done: asyncio.Future[int] = loop.create_future()
            server = await loop.create_unix_server(lambda: _CountingServer(done), str(path))
            channel.send({"ready": True})
            cpu0 = time.process_time()
            received = await done
            _finish(channel, received // size, cpu0)
            server.close()

        run_loop(params["loop"], serve())

    def produce(params: Params) -> int:
        async def main() -> int:
            loop = asyncio.get_running_loop()
            transport, proto = await loop.create_unix_connection(lambda: _Producer(loop), str(path))
            messages = [_payload(params)] * params["batch"]
            write = transport.write
            clock = time.perf_counter
            deadline = clock() + params["duration"]
            sent = 0
            while True:
                for message in messages:
                    write(message)  # one write per message
                sent += len(messages)
                if proto.paused:
                    await proto.wait_resumed()
                if clock() >= deadline:
                    break
            transport.close()  # flushes what is buffered, then EOF
            await proto.closed
            return sent

        return run_loop(params["loop"], main())

    try:
        return _measure(consumer, produce, params)
    finally:
        path.unlink(missing_ok=True)
        path.parent.rmdir()


# --- SOCK_SEQPACKET -------------------------------------------------------------


def _seqpacket(params: Params) -> Figures:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    size = params["size"]

    def consumer(channel: Channel, params: Params) -> None:
        ours.close()
        buf = bytearray(max(size, 2048))
        recv_into = theirs.recv_into
        count = 0
        channel.send({"ready": True})
        cpu0 = time.process_time()
        while recv_into(buf) == size:
            count += 1
        _finish(channel, count, cpu0)

    def produce(params: Params) -> int:
        theirs.close()
        return _send_until_deadline(ours.send, params)

    try:
        return _measure(consumer, produce, params)
    finally:
        ours.close()
        theirs.close()


# --- multiprocessing.Pipe --------------------------------------------------------


def _mp_pipe(params: Params) -> Figures:
    import multiprocessing

    ours, theirs = multiprocessing.Pipe()
    size = params["size"]

    def consumer(channel: Channel, params: Params) -> None:
        ours.close()
        recv_bytes = theirs.recv_bytes
        count = 0
        channel.send({"ready": True})
        cpu0 = time.process_time()
        while len(recv_bytes()) == size:
            count += 1
        _finish(channel, count, cpu0)

    def produce(params: Params) -> int:
        theirs.close()
        return _send_until_deadline(ours.send_bytes, params)

    try:
        return _measure(consumer, produce, params)
    finally:
        ours.close()
        theirs.close()


# --- pyzmq PUSH/PULL over ipc:// --------------------------------------------------


def _zmq_ipc(params: Params) -> Figures:
    try:
        import zmq
    except ImportError:
        raise Unavailable("pyzmq not installed (pip install 'vbus[bench]')") from None
    path = Path(tempfile.mkdtemp(prefix="vbus-bench-")) / "zmq.ipc"
    endpoint = f"ipc://{path}"
    size = params["size"]

    def consumer(channel: Channel, params: Params) -> None:
        context = zmq.Context()
        pull = context.socket(zmq.PULL)
        # A run now and then never sees the end marker; give up after 10 s of
        # silence and let the shortfall show as ``lost`` instead of hanging.
        pull.setsockopt(zmq.RCVTIMEO, 10_000)
        pull.bind(endpoint)
        recv = pull.recv
        count = 0
        channel.send({"ready": True})
        cpu0 = time.process_time()
        try:
            while len(recv()) == size:
                count += 1
        except zmq.Again:
            pass
        _finish(channel, count, cpu0)
        pull.close()
        context.term()

    def produce(params: Params) -> int:
        context = zmq.Context()
        push = context.socket(zmq.PUSH)
        push.connect(endpoint)
        sent = _send_until_deadline(push.send, params)
        push.close()  # lingers until the queue is delivered
        context.term()
        return sent

    try:
        # PUSH/PULL here drops the odd message (or the end marker) now and then:
        # counted as lost, like iceoryx2, rather than failing the run.
        return _measure(consumer, produce, params, lossy=True)
    finally:
        path.unlink(missing_ok=True)
        path.parent.rmdir()


# --- iceoryx2 publish/subscribe ---------------------------------------------------


def _iceoryx2(params: Params) -> Figures:
    try:
        import iceoryx2 as iox2
    except ImportError:
        raise Unavailable("iceoryx2 not installed (pip install iceoryx2)") from None
    size = params["size"]
    service_name = f"vbus-bench-{os.getpid()}-{time.monotonic_ns()}"
    depth = params["ring"]

    class Payload(ctypes.Structure):
        _fields_ = [("data", ctypes.c_uint8 * size)]

    def service(node: Any) -> Any:
        return (
            node.service_builder(iox2.ServiceName.new(service_name))
            .publish_subscribe(Payload)
            .subscriber_max_buffer_size(depth)
            .enable_safe_overflow(False)
            .open_or_create()
        )

    iox2.set_log_level(iox2.LogLevel.Error)

    def consumer(channel: Channel, params: Params) -> None:
        node = iox2.NodeBuilder.new().create(iox2.ServiceType.Ipc)
        svc = service(node)
        sub = svc.subscriber_builder().buffer_size(depth).create()
        receive = sub.receive
        string_at = ctypes.string_at
        count = 0
        channel.send({"ready": True})
        cpu0 = time.process_time()
        while True:
            sample = receive()
            if sample is None:
                continue
            data = string_at(sample.payload_ptr, size)
            sample.delete()
            if data[0] != 0xA5:
                break
            count += 1
        _finish(channel, count, cpu0)
        sub.delete()
        del svc, node

    def produce(params: Params) -> int:
        node = iox2.NodeBuilder.new().create(iox2.ServiceType.Ipc)
        svc = service(node)
        pub = (
            svc.publisher_builder()
            .backpressure_strategy(iox2.BackpressureStrategy.RetryUntilDelivered)
            .create()
        )
        pub.update_connections()
        payload = _payload(params)
        end = END * size
        loan = pub.loan_uninit
        memmove = ctypes.memmove
        batch = int(params["batch"])
        clock = time.perf_counter
        deadline = clock() + params["duration"]
        sent = 0
        while True:
            for _ in range(batch):
                sample = loan()
                memmove(sample.payload_ptr, payload, size)
                sample.assume_init().send()
            sent += batch
            if clock() >= deadline:
                break
        sample = loan()
        memmove(sample.payload_ptr, end, size)
        sample.assume_init().send()
        pub.delete()
        del svc, node
        return sent

    # RetryUntilDelivered still drops a few samples when the subscriber's
    # buffer first fills (seen with 0.10; upstream issue #305 is of that kind).
    return _measure(consumer, produce, params, lossy=True)


_PEERS = {
    "ceiling": _ceiling,
    "ceiling-spin": lambda params: _ceiling(params, spin=True),
    "asyncio-unix": _asyncio_unix,
    "seqpacket": _seqpacket,
    "mp-pipe": _mp_pipe,
    "zmq-ipc": _zmq_ipc,
    "iceoryx2": _iceoryx2,
}

SUBJECT = StreamSubject()
