"""Process plumbing for subjects: forked children with a JSON channel, the event loop.

Each side of a comparison runs in its own process.  A worker forks its
children before it starts an event loop (forking under a running loop would
copy it), and talks to them over two pipes, one JSON object per line.
``time.perf_counter`` is CLOCK_MONOTONIC, one clock for every process of the
machine, so a producer's start and a consumer's end can be subtracted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import select
import signal
import time
import traceback
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

__all__ = ["Channel", "Child", "fork", "percentile", "run_loop"]

T = TypeVar("T")


def run_loop(loop: str, main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` on a fresh uvloop or asyncio loop."""
    if loop == "uvloop":
        import uvloop

        return uvloop.run(main)
    return asyncio.run(main)


class Channel:
    """One end of a child link: ``send(obj)`` / ``recv(timeout)``, one JSON object per line."""

    def __init__(self, read_fd: int, write_fd: int) -> None:
        self.read_fd = read_fd
        self.write_fd = write_fd
        self._buf = b""

    def send(self, obj: Any) -> None:
        data = (json.dumps(obj) + "\n").encode()
        while data:
            data = data[os.write(self.write_fd, data) :]

    def recv(self, timeout: float | None = 120.0) -> Any:
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select([self.read_fd], [], [], left)
            if not ready:
                raise TimeoutError("no message from the other process")
            chunk = os.read(self.read_fd, 65536)
            if not chunk:
                raise EOFError("the other process closed its channel")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    async def recv_async(self) -> Any:
        """``recv`` from inside an event loop, without blocking it."""
        loop = asyncio.get_running_loop()
        while b"\n" not in self._buf:
            ready: asyncio.Future[None] = loop.create_future()
            loop.add_reader(self.read_fd, _resolve, ready)
            try:
                await ready
            finally:
                loop.remove_reader(self.read_fd)
            chunk = os.read(self.read_fd, 65536)
            if not chunk:
                raise EOFError("the other process closed its channel")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    def close(self) -> None:
        for fd in (self.read_fd, self.write_fd):
            with contextlib.suppress(OSError):
                os.close(fd)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class Child:
    """A forked child running ``target(channel)``; the parent holds the other end."""

    def __init__(self, pid: int, channel: Channel) -> None:
        self.pid = pid
        self.channel = channel
        self.returncode: int | None = None

    def send(self, obj: Any) -> None:
        self.channel.send(obj)

    def recv(self, timeout: float | None = 120.0) -> Any:
        """The child's next message; its failure (``{"error": ...}``) is raised here."""
        msg = self.channel.recv(timeout)
        if isinstance(msg, dict) and set(msg) == {"error"}:
            raise RuntimeError(f"child process failed: {msg['error']}")
        return msg

    def join(self, timeout: float = 30.0) -> int:
        deadline = time.monotonic() + timeout
        while self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
                break
            if time.monotonic() > deadline:
                self.kill()
                break
            time.sleep(0.005)
        self.channel.close()
        return self.returncode if self.returncode is not None else -1

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, sig)
        _, status = os.waitpid(self.pid, 0)
        self.returncode = os.waitstatus_to_exitcode(status)


def fork(target: Callable[[Channel], None]) -> Child:
    """Fork a child that runs ``target(channel)`` and exits (status 1 on an exception)."""
    p2c_r, p2c_w = os.pipe()
    c2p_r, c2p_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            os.close(p2c_w)
            os.close(c2p_r)
            channel = Channel(p2c_r, c2p_w)
            try:
                target(channel)
            except BaseException as exc:
                code = 1
                traceback.print_exc()
                with contextlib.suppress(OSError):
                    channel.send({"error": f"{type(exc).__name__}: {exc}"})
        finally:
            os._exit(code)
    os.close(p2c_r)
    os.close(c2p_w)
    return Child(pid, Channel(c2p_r, p2c_w))


def percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile of ``values`` (0..1)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]
