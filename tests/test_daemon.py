"""vbusd as a process: start-up, topology, signals, locks, systemd notify, the CLIs."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import Daemon
from vbus.client import connect
from vbus.daemon import build_parser
from vbus.errors import Closed

pytestmark = pytest.mark.integration

VBUS = [sys.executable, "-m", "vbus.cli"]
VBUSD = [sys.executable, "-m", "vbus.daemon"]


def run(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, **kw)  # type: ignore[call-overload,no-any-return]


def test_help_of_both_commands() -> None:
    daemon_help = run([*VBUSD, "--help"])
    assert daemon_help.returncode == 0
    text = daemon_help.stdout
    for option in ("--config", "--run-dir", "--loop", "--log-format", "--handshake-timeout"):
        assert option in text
    assert "(default: None)" not in text and "(default: False)" not in text
    assert "(default: 5.0)" in " ".join(text.split())  # --handshake-timeout: a number, shown
    assert "(default: uvloop)" in text
    parser = build_parser()
    formatter = parser._get_formatter()
    assert len(parser._actions) > 15
    for action in parser._actions:
        # Every option says what it does, and a default its text states is not repeated.
        assert action.help, f"{action.option_strings} has no help"
        assert (formatter._get_help_string(action) or "").count("(default: ") <= 1, action.help
    # How the topology is chosen at start, and how to start afresh.
    assert "--reset-state" in text and "STATE.old" in text
    assert "the state file (--state), if it exists" in text
    tool_help = run([*VBUS, "--help"])
    assert tool_help.returncode == 0
    assert "devices" in tool_help.stdout


@pytest.mark.parametrize(
    ("option", "value", "says"),
    [
        ("--handshake-timeout", "-1", "must be a positive number of seconds, not '-1'"),
        ("--handshake-timeout", "0", "must be a positive number of seconds"),
        ("--handshake-timeout", "inf", "must be a positive number of seconds"),
        ("--handshake-timeout", "soon", "'soon' is not a number of seconds"),
        ("--max-connections-per-uid", "0", "must be a positive integer, not '0'"),
        ("--max-pending-per-uid", "-3", "must be a positive integer"),
        ("--max-fds-per-uid", "1.5", "'1.5' is not an integer"),
        ("--fd-reserve", "0", "must be a positive integer"),
        ("--max-shm-per-peer", "0", "must be a positive size"),
        ("--max-shm-total", "lots", "lots"),
    ],
)
def test_numeric_options_are_checked(tmp_path: Path, option: str, value: str, says: str) -> None:
    result = run([*VBUSD, "--run-dir", str(tmp_path / "run"), option, value])
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"vbusd: error: argument {option}: "), result.stderr
    assert says in last
    assert not (tmp_path / "run").exists()  # refused before anything was made


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


LAB = """\
[devices.echo0]
class = "echo"
mode = "sink"

[buses.lab]
members = ["uid:self", "pid:4242"]
devices = ["echo0"]
"""


def _unused_pid() -> int:
    pid = 4242
    while os.path.exists(f"/proc/{pid}"):
        pid += 1
    return pid


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[devices.a]\nclass = "nosuchclass"\n', ":2: devices.a.class: unknown deviceclass 'nosuchclass'"),
        (LAB, ":6: buses.lab.members: 'pid:PID': no such task PID (a pid rule must name a running process)"),
        (LAB.replace('"sink"', '"loud"'), ":3: devices.echo0.mode: 'loud' is not one of echo, sink"),
        (LAB.replace("[buses.lab]", "[buses.lab"), ":5: not valid TOML ("),
    ],
)  # fmt: skip
def test_bad_config_refused_in_one_line(tmp_path: Path, text: str, message: str) -> None:
    pid = _unused_pid()
    config = tmp_path / "bad.toml"
    config.write_text(text.replace("4242", str(pid)))
    state = tmp_path / "state.json"  # never the system's: a `make run` daemon may hold it
    result = run(
        [*VBUSD, "--run-dir", str(tmp_path / "run"), "--state", str(state), "--config", str(config)]
    )
    assert result.returncode == 1
    # One line: no log of the topology being built and rolled back, the path once.
    [line] = result.stderr.splitlines()
    assert line.startswith(f"vbusd: {config}{message.replace('PID', str(pid))}"), line
    assert line.count(str(config)) == 1
    assert not state.exists()
    assert not (tmp_path / "run" / "vbusd.pid").exists()


def test_missing_config_refused_in_one_line(tmp_path: Path) -> None:
    config = tmp_path / "nope.toml"
    result = run([*VBUSD, "--run-dir", str(tmp_path / "run"), "--state", str(tmp_path / "s.json"),
                  "--config", str(config)])  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"vbusd: cannot read --config {config}: No such file or directory"
    ]


def _config(tmp_path: Path, name: str, bus: str) -> str:
    path = tmp_path / f"{name}.toml"
    path.write_text(
        f'[devices.{bus}0]\nclass = "echo"\n[buses.{bus}]\nmembers = ["uid:self"]\n'
        f'devices = ["{bus}0"]\n'
    )
    return str(path)


def _restart(previous: Daemon, *args: str, name: str) -> Daemon:
    daemon = Daemon(previous.run_dir, list(args))
    daemon.log_path = previous.run_dir.parent / f"{name}.log"
    return daemon.start()


def _served_bus(daemon: Daemon) -> str:
    listing = run([*VBUS, "--socket", str(daemon.socket), "devices"])
    assert listing.returncode == 0, listing.stderr
    return listing.stdout.split(":", 1)[0]


def _events(daemon: Daemon, event: str) -> list[dict[str, object]]:
    found = []
    for line in daemon.log().splitlines():
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if record.get("event") == event:
                found.append(record)
    return found


def test_config_given_while_state_exists_is_a_warning(vbusd, tmp_path: Path) -> None:
    first: Daemon = vbusd("--no-admin", "--config", _config(tmp_path, "a", "lab"))
    assert _served_bus(first) == "bus lab"
    # Its build steps are debug events; the start's outcome is daemon.ready.
    assert all(r["level"] == "debug" for r in _events(first, "device.created"))
    assert first.stop() == 0
    other = _config(tmp_path, "b", "other")
    again = _restart(first, "--no-admin", "--config", other, name="again")
    try:
        assert _served_bus(again) == "bus lab"  # the state file wins
        [warning] = _events(again, "state.config_ignored")
        assert warning["level"] == "warning"
        assert warning["state"] == str(first.state) and warning["config"] == other
        assert "--reset-state" in str(warning["hint"])
    finally:
        assert again.stop() == 0


def test_config_ignored_is_said_in_one_plain_line(vbusd, tmp_path: Path) -> None:
    first: Daemon = vbusd("--no-admin")
    assert first.stop() == 0
    config = _config(tmp_path, "b", "other")
    proc = subprocess.Popen(
        [*VBUSD, "--run-dir", str(first.run_dir), "--state", str(first.state), "--no-admin",
         "--config", config, "--log-format", "console"],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        lines = []
        while not any("daemon.ready" in line for line in lines):
            line = proc.stderr.readline()
            assert line, f"vbusd exited: {lines}"
            lines.append(line)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    plain = [line for line in lines if line.startswith("vbusd: ")]
    assert plain == [
        f"vbusd: warning: --config {config} is not applied: the state file {first.state} "
        "exists and holds the topology; to start from the configuration, use --reset-state\n"
    ]
    assert any("[warning" in line and "state.config_ignored" in line for line in lines)


@pytest.mark.parametrize(
    ("config", "says"),
    [
        ("missing.toml", "cannot read --config"),
        ("bad.toml", "bad.toml:2: devices.a.class: unknown deviceclass 'nope'"),
        (
            "attr.toml",
            "attr.toml:3: devices.a.colour: deviceclass 'echo' has no attribute 'colour'",
        ),
    ],
)
def test_bad_config_is_an_error_even_when_state_exists(
    vbusd, tmp_path: Path, config: str, says: str
) -> None:
    first: Daemon = vbusd("--no-admin")
    assert first.stop() == 0
    (tmp_path / "bad.toml").write_text('[devices.a]\nclass = "nope"\n')
    (tmp_path / "attr.toml").write_text('[devices.a]\nclass = "echo"\ncolour = "red"\n')
    before = first.state.read_bytes()
    result = run([*VBUSD, "--run-dir", str(first.run_dir), "--state", str(first.state),
                  "--no-admin", "--config", str(tmp_path / config)])  # fmt: skip
    assert result.returncode == 1
    [line] = result.stderr.splitlines()
    assert line.startswith("vbusd: ") and says in line, line
    assert first.state.read_bytes() == before


def test_reset_state_starts_from_the_config(vbusd, tmp_path: Path) -> None:
    first: Daemon = vbusd("--no-admin", "--config", _config(tmp_path, "a", "lab"))
    assert first.stop() == 0
    lab_state = first.state.read_bytes()
    other = _config(tmp_path, "b", "other")
    again = _restart(first, "--no-admin", "--config", other, "--reset-state", name="again")
    try:
        assert _served_bus(again) == "bus other"
        assert not _events(again, "state.config_ignored")
        [reset] = _events(again, "state.reset")
        assert reset["previous"] == f"{first.state}.old"
    finally:
        assert again.stop() == 0
    assert Path(f"{first.state}.old").read_bytes() == lab_state
    # The replaced state is the one a plain restart comes back to.
    third = _restart(again, "--no-admin", name="third")
    try:
        assert _served_bus(third) == "bus other"
    finally:
        assert third.stop() == 0


def test_reset_state_without_config_is_the_embedded_default(vbusd, tmp_path: Path) -> None:
    first: Daemon = vbusd("--no-admin", "--config", _config(tmp_path, "a", "lab"))
    assert first.stop() == 0
    again = _restart(first, "--no-admin", "--reset-state", name="again")
    try:
        assert _served_bus(again) == "bus default"
    finally:
        assert again.stop() == 0


def test_damaged_state_points_at_reset_state(vbusd, tmp_path: Path) -> None:
    first: Daemon = vbusd("--no-admin")
    assert first.stop() == 0
    first.state.write_text("{not json")
    args = [*VBUSD, "--run-dir", str(first.run_dir), "--state", str(first.state), "--no-admin"]
    result = run(args)
    assert result.returncode == 1
    [line] = result.stderr.splitlines()
    assert "is not valid JSON" in line and "start with --reset-state to replace it" in line
    again = _restart(first, "--no-admin", "--reset-state", name="again")
    try:
        assert _served_bus(again) == "bus default"
    finally:
        assert again.stop() == 0
    assert Path(f"{first.state}.old").read_text() == "{not json"


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
        assert second.logged('"daemon.stale_socket_removed"')
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
