"""vbusd as a process: start-up, topology, signals, locks, systemd notify, the CLIs."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import Daemon
from vbus.client import connect
from vbus.errors import Closed

pytestmark = pytest.mark.integration

VBUS = [sys.executable, "-m", "vbus.cli"]
VBUSD = [sys.executable, "-m", "vbus.daemon"]


def run(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, **kw)  # type: ignore[call-overload,no-any-return]


def test_help_of_both_commands() -> None:
    daemon_help = run([*VBUSD, "--help"])
    assert daemon_help.returncode == 0
    for option in ("--config", "--run-dir", "--loop", "--log-format", "--handshake-timeout"):
        assert option in daemon_help.stdout
    tool_help = run([*VBUS, "--help"])
    assert tool_help.returncode == 0
    assert "devices" in tool_help.stdout


def test_default_topology_is_served(vbusd) -> None:
    daemon: Daemon = vbusd()
    listing = run([*VBUS, "--socket", str(daemon.socket), "devices"])
    assert listing.returncode == 0, listing.stderr
    assert "bus default: 1 device(s)" in listing.stdout
    assert "echo0" in listing.stdout and "echo" in listing.stdout
    reply = run([*VBUS, "--socket", str(daemon.socket), "call", "echo0", "1", "ping"])
    assert reply.returncode == 0, reply.stderr
    assert reply.stdout == "ping\n"


def test_config_file_topology(vbusd, tmp_path: Path) -> None:
    config = tmp_path / "topo.toml"
    config.write_text(
        '[devices.a]\nclass = "echo"\n[devices.b]\nclass = "echo"\nmode = "sink"\n'
        '[buses.lab]\nmembers = ["uid:self"]\ndevices = ["a", "b"]\n'
    )
    daemon = vbusd("--config", str(config))
    listing = run([*VBUS, "--socket", str(daemon.socket), "devices"])
    assert "bus lab: 2 device(s)" in listing.stdout


def test_bad_config_refused_in_one_line(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text('[devices.a]\nclass = "nosuchclass"\n')
    state = tmp_path / "state.json"  # never the system's: a `make run` daemon may hold it
    result = run(
        [*VBUSD, "--run-dir", str(tmp_path / "run"), "--state", str(state), "--config", str(config)]
    )
    assert result.returncode == 1
    assert "vbusd: bad topology in" in result.stderr
    assert "nosuchclass" in result.stderr


async def test_sigterm_tells_clients_and_cleans_up(vbusd) -> None:
    daemon: Daemon = vbusd()
    async with connect(daemon.socket) as bus:
        dev = await bus.open("echo0")
        daemon.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        event = await _next_event(bus)
        assert event.kind == 4  # SHUTDOWN
        with pytest.raises(Closed):
            for _ in range(100):
                await dev.call(1, b"x")
    assert daemon.proc.wait(10) == 0  # type: ignore[union-attr]
    assert not daemon.socket.exists()
    assert '"daemon.stopped"' in daemon.log()


async def _next_event(bus):  # type: ignore[no-untyped-def]
    import asyncio

    return await asyncio.wait_for(bus.events.get(), 10)


def test_sigint_exits_zero(vbusd) -> None:
    daemon: Daemon = vbusd()
    assert daemon.stop(signal.SIGINT) == 0
    assert not daemon.socket.exists()


def test_second_daemon_on_the_same_run_dir_is_refused(vbusd) -> None:
    daemon: Daemon = vbusd()
    result = run([*VBUSD, "--run-dir", str(daemon.run_dir), "--state", str(daemon.state)])
    assert result.returncode == 1
    assert f"another vbusd (pid {daemon.pid}) is already serving" in result.stderr
    # The first one is unharmed.
    listing = run([*VBUS, "--socket", str(daemon.socket), "devices"])
    assert listing.returncode == 0


def test_stale_socket_of_a_killed_daemon_is_cleaned(vbusd) -> None:
    first: Daemon = vbusd()
    first.stop(signal.SIGKILL)
    assert first.socket.exists()  # left behind
    second = Daemon(first.run_dir, [])
    second.log_path = first.run_dir.parent / "second.log"
    second.start()
    try:
        assert '"daemon.stale_socket_removed"' in second.log()
        listing = run([*VBUS, "--socket", str(second.socket), "devices"])
        assert listing.returncode == 0
    finally:
        assert second.stop() == 0


def test_ready_is_sent_to_notify_socket(tmp_path: Path) -> None:
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(str(path))
        listener.settimeout(20)
        env = dict(os.environ, NOTIFY_SOCKET=str(path))
        daemon = Daemon(tmp_path / "run", [], env)
        daemon.start()
        try:
            assert listener.recv(256) == b"READY=1"
        finally:
            assert daemon.stop() == 0
        assert listener.recv(256) == b"STOPPING=1"


def test_echo_client_example_runs(vbusd) -> None:
    daemon: Daemon = vbusd()
    example = Path(__file__).parent.parent / "examples" / "echo_client.py"
    result = run(
        [sys.executable, str(example), "--socket", str(daemon.socket), "--messages", "20000"]
    )
    assert result.returncode == 0, result.stderr
    assert "echo0" in result.stdout
    assert "call(1, b'hello, vbus') -> b'hello, vbus'" in result.stdout
    assert "20000 messages of 64 B echoed" in result.stdout
    assert "messages/s" in result.stdout
