"""vbusd whatever happens to its output: a reader that died, a pipe nobody reads,
a terminal that was closed.  It keeps serving, and stops on SIGTERM/SIGINT."""

from __future__ import annotations

import fcntl
import json
import os
import resource
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import TEST_LOOP
from vbus.log import LogSink

pytestmark = pytest.mark.integration

VBUS = [sys.executable, "-m", "vbus.cli"]


def vbusd_cmd(tmp_path: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "vbus.daemon",
        "--run-dir",
        str(tmp_path / "run"),
        "--state",
        str(tmp_path / "state.json"),
        "--no-admin",
        "--loop",
        TEST_LOOP,
        "--log-format",
        "json",
        "--log-level",
        "debug",
    ]


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def read_until_ready(fd: int, timeout: float = 20.0) -> bytes:
    seen = b""
    deadline = time.monotonic() + timeout
    while b'"daemon.ready"' not in seen:
        left = deadline - time.monotonic()
        assert left > 0, f"vbusd did not say daemon.ready:\n{seen.decode(errors='replace')}"
        readable, _, _ = select.select([fd], [], [], left)
        if readable:
            chunk = os.read(fd, 65536)
            assert chunk, f"vbusd's output ended before daemon.ready:\n{seen.decode()}"
            seen += chunk
    return seen


def devices(socket: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*VBUS, "--socket", str(socket), "devices"], capture_output=True, text=True, timeout=30
    )


def serves(socket: Path, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if socket.exists() and devices(socket).returncode == 0:
            return True
        time.sleep(0.1)
    return False


def stops(proc: subprocess.Popen[bytes], sig: int, timeout: float = 20.0) -> int:
    proc.send_signal(sig)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"vbusd ignored {signal.Signals(sig).name}") from None


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_reader_gone_at_start_like_head_1(tmp_path: Path, procs: list, sig: int) -> None:
    """``vbusd 2>&1 | head -1``: the reader leaves after the first line."""
    read_end, write_end = os.pipe()
    head = subprocess.Popen(["head", "-1"], stdin=read_end, stdout=subprocess.DEVNULL)
    procs.append(head)
    os.close(read_end)
    daemon = subprocess.Popen(
        vbusd_cmd(tmp_path), stdout=write_end, stderr=write_end, env=clean_env()
    )
    procs.append(daemon)
    os.close(write_end)
    assert head.wait(20) == 0
    assert serves(tmp_path / "run" / "vbus.sock"), "vbusd stopped serving when its reader left"
    # A few more connections: each logs into the broken pipe.
    for _ in range(3):
        assert devices(tmp_path / "run" / "vbus.sock").returncode == 0
    assert stops(daemon, sig) == 0
    assert not (tmp_path / "run" / "vbus.sock").exists()


def test_reader_killed_while_serving(tmp_path: Path, procs: list) -> None:
    read_end, write_end = os.pipe()
    daemon = subprocess.Popen(
        vbusd_cmd(tmp_path), stdout=write_end, stderr=subprocess.STDOUT, env=clean_env()
    )
    procs.append(daemon)
    os.close(write_end)
    read_until_ready(read_end)
    os.close(read_end)  # the reader is gone: every write now gets EPIPE
    sock = tmp_path / "run" / "vbus.sock"
    for _ in range(3):
        assert devices(sock).returncode == 0
    assert stops(daemon, signal.SIGTERM) == 0


def test_full_pipe_nobody_reads(tmp_path: Path, procs: list) -> None:
    """A reader that stopped reading: the pipe fills and writes would block."""
    read_end, write_end = os.pipe()
    fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, 4096)  # the smallest pipe: filled at once
    daemon = subprocess.Popen(
        vbusd_cmd(tmp_path), stdout=write_end, stderr=subprocess.STDOUT, env=clean_env()
    )
    procs.append(daemon)
    os.close(write_end)
    read_until_ready(read_end)
    sock = tmp_path / "run" / "vbus.sock"
    # Each client costs the log several lines of a few hundred bytes: far more
    # than the pipe holds.
    for _ in range(25):
        result = devices(sock)
        assert result.returncode == 0, result.stderr
    assert daemon.poll() is None
    assert stops(daemon, signal.SIGTERM) == 0
    os.close(read_end)


def test_terminal_closed(tmp_path: Path, procs: list) -> None:
    master, slave = os.openpty()
    daemon = subprocess.Popen(vbusd_cmd(tmp_path), stdout=slave, stderr=slave, env=clean_env())
    procs.append(daemon)
    os.close(slave)
    read_until_ready(master)
    os.close(master)  # the terminal hangs up: writes to it now fail with EIO
    sock = tmp_path / "run" / "vbus.sock"
    for _ in range(3):
        assert devices(sock).returncode == 0
    assert stops(daemon, signal.SIGTERM) == 0


def test_sink_gives_up_a_dead_pipe_and_counts() -> None:
    read_end, write_end = os.pipe()
    sink = LogSink(write_end, max_lines=8)
    sink.put("first")
    assert sink.flush(5)
    assert os.read(read_end, 100) == b"first\n"
    os.close(read_end)
    for n in range(5):
        sink.put(f"line {n}")
    sink.flush(5)
    assert sink.dead is not None
    assert sink.dropped == 5  # the one that met EPIPE, and those after it
    sink.put("more")  # never raises
    sink.close()
    os.close(write_end)


def test_sink_never_blocks_on_a_full_pipe() -> None:
    read_end, write_end = os.pipe()
    fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, 4096)
    sink = LogSink(write_end, max_lines=16)
    started = time.monotonic()
    for n in range(1000):
        sink.put(json.dumps({"event": "x", "n": n, "pad": "y" * 2000}))
    assert time.monotonic() - started < 5  # put() returned although nothing is read
    assert not sink.flush(0.2)
    assert sink.dropped > 900
    # Once read again, the writer goes on and says how much was dropped.
    data = b""
    deadline = time.monotonic() + 10
    while b"log.lines_dropped" not in data and time.monotonic() < deadline:
        readable, _, _ = select.select([read_end], [], [], 0.5)
        if readable:
            data += os.read(read_end, 65536)
    assert b"log.lines_dropped count=" in data
    sink.close()
    os.close(read_end)
    os.close(write_end)


def test_a_crash_in_native_code_leaves_every_threads_python_stack(
    tmp_path: Path, procs: list
) -> None:
    """A fatal signal (what a crash in a C extension raises) kills vbusd, but
    its stderr says first where each thread was, in Python."""

    def no_core() -> None:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    daemon = subprocess.Popen(
        vbusd_cmd(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=clean_env(),
        preexec_fn=no_core,
    )
    procs.append(daemon)
    assert daemon.stdout is not None
    read_until_ready(daemon.stdout.fileno())
    assert stops(daemon, signal.SIGSEGV) == -signal.SIGSEGV
    rest = daemon.stdout.read().decode(errors="replace")
    assert "Fatal Python error: Segmentation fault" in rest
    assert "most recent call first" in rest
    assert "vbus/daemon.py" in rest  # the main thread's stack, down to main()
